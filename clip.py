"""CLIP: an image tower and a text tower trained to agree (Radford et al. 2021; DeCLIP Sec. 3.1).

OpenAI's CLIP architecture in one file: the ModifiedResNet (RN50/RN101) and ViT image towers,
the GPT-2-style text tower, and the CLIP that joins two towers. Parameter names and shapes are
OpenAI's, so released weights load unchanged. Presets, pre-trained towers and checkpoint loading
are factory.py's (create_model, from_config, build_model, load_checkpoint).

    z_img = normalize(image_tower(x)),  z_txt = normalize(text_tower(t)),  sim = e^t z_img @ z_txt.T

Shapes: B batch, H heads, L text tokens, N image patches (+1 class token), W width, D embedding.

Usage:
    model = CLIP(512, dict(image_resolution=224, vision_layers=12, vision_width=768,
                           vision_patch_size=32), my_text_tower)   # any tower module
    model = build_clip(model.config)                   # the same architecture, freshly initialised
    z_img, z_txt, scale = model(images, ids)           # (B, D), (B, D), []
    logits = scale * z_img @ z_txt.T                   # (B, B)
    model = factory.create_model("ViT-B-32")           # a preset (factory.py)

How a CLIP is composed: `CLIP(embed_dim, vision, text)`, each tower either
- a dict of OpenAI's settings (VISION_KEYS / TEXT_KEYS, the names of OpenAI's build_model; the
  presets are such dicts, flat): this file builds OpenAI's tower with OpenAI's parameter names
  (`visual.*`; the text tower flat on the CLIP: token_embedding, positional_embedding,
  transformer.*, ln_final), so released checkpoints load; or
- an nn.Module built elsewhere that keeps this contract (pretrained.py builds the DINO, Hugging
  Face ViT, torchvision ResNet, BERT and XLM-R towers from the "kind:PATH" specs of
  factory.create_model):
  image tower, stored as `visual`:
    forward(images (B, 3, R, R)) -> (B, D), already in the joint space (it owns its projection);
    `input_resolution` R; `output_dim` D (= embed_dim);
    `projection`: names, relative to the tower, of the parameters (or modules) that map into the
      joint space; the rest is the tower's *body*, which LiT locking freezes and image_lr scales;
    `config`: a dict that rebuilds the architecture (not the weights). With a "kind" key it
      names the tower's entry in factory.towers(); without one it holds OpenAI's settings and
      this file rebuilds it (DINO and HF ViT weights load into OpenAI's ViT this way).
  text tower, stored as `text`:
    forward(ids (B, L)) -> (B, L, W), the last hidden states; padding (its tokenizer's pad id)
      must not change the features of real tokens;
    `width` W, `context_length`, `vocab_size`, `config` (with "kind", as above);
    z_txt = tokens[:, 0] @ text_projection: bidirectional encoders sum the text up in their first
      token ([CLS], <s>); a tower may define `pool(tokens, ids) -> (B, W)` to pool otherwise;
    its ids are its own vocabulary: the tokenizer that comes with its weights (bert.py, xlmr.py)
      gives the sot / eot / pad / mask ids that DeCLIP's masking uses. The whole module is the
      body; `text_projection` (W, D) is the CLIP's and starts fresh.
`config` is one flat dict: OpenAI's settings of OpenAI's towers, plus "image_tower" / "text_tower"
holding a module tower's config. `build_clip(config, build_tower)` rebuilds any CLIP from it
(factory.from_config passes its tower builder), so adding a tower never touches this file.

Where we differ from OpenAI's code:
- The text feature sits at the first position where `ids == eot_id` (equality, never
  `argmax(ids)`), so DeCLIP's mask token (49408, larger than EOT 49407) is never taken for EOT.
- Attention runs on `F.scaled_dot_product_attention`, batch first, `is_causal=True` for the text
  (plain ops on CPU in bf16, where they are faster).
- Mixed precision through `torch.autocast` only: no fp16 weight conversion, plain `nn.LayerNorm`.
- Selectable activation: "quick_gelu" (OpenAI's weights) or "gelu" (our default for new models).
- ViT patch dropout (FLIP, Li et al. 2023) and token merging (ToMe, tome.py: `tome_r`).
Left out: OpenCLIP's extras (layer scale, attentional poolers, timm towers, SigLIP logit bias).
"""
import contextlib
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- checkpointing

class _BatchNormOnce:
    """While checkpointing recomputes a forward in backward, BatchNorm normalises with the same
    batch statistics but must not update its running statistics a second time."""

    def __init__(self, module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.momentum, None if m.num_batches_tracked is None
                       else m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged

    def __exit__(self, *exc):
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def checkpointed(module, *args, **kwargs):
    """module(*args, **kwargs), keeping only its inputs for backward: the activations inside are
    recomputed there (activation checkpointing: less memory for ~1/3 more compute)."""
    if not torch.is_grad_enabled():
        return module(*args, **kwargs)
    if getattr(torch.compiler, "is_compiling", lambda: False)():  # torch >= 2.3
        # a compiled graph applies BatchNorm's buffer updates once, and takes no context_fn
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return checkpoint(module, *args, use_reentrant=False, **kwargs,
                      context_fn=lambda: (contextlib.nullcontext(), _BatchNormOnce(module)))


def attention(q, k, v, attn_mask=None, is_causal=False):
    """softmax(q k^T / sqrt(d) + mask) v over (B, H, L, d) heads: F.scaled_dot_product_attention,
    except on CPU in bf16, where its fused kernel's backward is ~6x slower than these three
    plain ops at CLIP's short lengths (`python experiments/bench.py --only attention`)."""
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5                  # (B, H, L, S)
    if is_causal:
        future = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        logits = logits + attn_mask
    return logits.float().softmax(dim=-1).to(v.dtype) @ v                   # (B, H, L, d)


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation x * sigmoid(1.702 x): OpenAI's weights were trained with it."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (OpenAI weights load).

    The ToMe hook: `attn_bias` is an additive logits bias broadcast to (B, H, L, L), e.g. log(token
    size) shaped (B, 1, 1, L) for proportional attention; `return_keys=True` also returns the keys.
    """

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # q, k, v stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, is_causal=False, attn_bias=None, return_keys=False):
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        qkv = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, W/H) each
        bias = None if attn_bias is None else attn_bias.to(q.dtype)  # SDPA: mask dtype = q's
        x = attention(q, k, v, attn_mask=bias, is_causal=is_causal)  # (B, H, L, W/H)
        x = self.out_proj(x.transpose(1, 2).reshape(B, L, W))  # (B, L, W)
        return (x, k) if return_keys else x


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, act="gelu", ln_eps=1e-5):
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act={act!r} is not supported; use 'gelu' or 'quick_gelu'")
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))

    def forward(self, x, is_causal=False, attn_bias=None):
        x = x + self.attn(self.ln_1(x), is_causal=is_causal, attn_bias=attn_bias)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act="gelu", ln_eps=1e-5):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False  # CLIP.set_grad_checkpointing
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, act, ln_eps) for _ in range(layers)])

    def forward(self, x, is_causal=False, attn_bias=None):  # (B, L, W) -> (B, L, W)
        run = checkpointed if self.grad_checkpointing else lambda block, *a, **k: block(*a, **k)
        for block in self.resblocks:
            x = run(block, x, is_causal=is_causal, attn_bias=attn_bias)
        return x


class PatchDropout(nn.Module):
    """FLIP, training only: keep the class token and max(1, int(N (1 - p))) random patches each."""

    def __init__(self, p=0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"patch_dropout={p} must be in [0, 1)")
        self.p = p

    def forward(self, x):  # (B, 1 + N, W) -> (B, 1 + keep, W)
        if not self.training or self.p == 0.0:
            return x
        cls_token, patches = x[:, :1], x[:, 1:]
        B, N, W = patches.shape
        keep = max(1, int(N * (1 - self.p)))
        idx = torch.rand(B, N, device=x.device).topk(keep, dim=1).indices  # (B, keep) at random
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, W))  # (B, keep, W)
        return torch.cat([cls_token, patches], dim=1)


class VisionTransformer(nn.Module):
    """ViT: patches + class token + positions, `ln_pre`, blocks, `ln_post` on the class token, proj.

    `ln_pre=False` and `ln_eps=1e-6` give DINO's layout (pretrained.py loads DINO weights; its patch
    bias is folded into the patch tokens' positional embedding). `tome_r`: ToMe merges per block,
    an int or one per block (tome.py); it can be changed on a built model.
    """

    projection = ("proj",)  # the tower contract: what maps into the joint space

    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim,
                 act="gelu", patch_dropout=0.0, ln_pre=True, ln_eps=1e-5, tome_r=0):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid ** 2 + 1, width))
        self.patch_dropout = PatchDropout(patch_dropout)
        self.ln_pre = nn.LayerNorm(width, eps=ln_eps) if ln_pre else nn.Identity()
        self.transformer = Transformer(width, layers, heads, act, ln_eps)
        self.ln_post = nn.LayerNorm(width, eps=ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.tome_r = tome_r

    def forward(self, x):  # (B, 3, R, R) -> (B, D)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, W), N = (R / patch)^2
        cls_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls_token, x], dim=1)  # (B, 1 + N, W)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(self.patch_dropout(x))
        r, n = self.tome_r, len(self.transformer.resblocks)
        schedule = list(r) if isinstance(r, (list, tuple)) else [r] * n
        if len(schedule) != n:
            raise ValueError(f"tome_r has {len(schedule)} entries for {n} blocks (one per block)")
        x = self._tome_blocks(x, schedule) if any(schedule) else self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj  # class token only: LayerNorm is per token

    def _tome_blocks(self, x, schedule):  # (B, 1 + N, W) -> (B, 1 + N', W)
        """The blocks with ToMe: size-weighted attention, then r merges before each MLP."""
        import tome  # here, so clip.py alone runs every model without ToMe on torch only

        size = None  # (B, L, 1) patches per token; None until the first merge (all ones)
        for block, r in zip(self.transformer.resblocks, schedule):
            out, keys = block.attn(block.ln_1(x), attn_bias=tome.proportional_bias(size),
                                   return_keys=True)  # (B, L, W), (B, H, L, W/H)
            x = x + out
            if r > 0:
                merge = tome.bipartite_soft_matching(keys.mean(1), r, class_token=True)
                x, size = tome.merge_wavg(merge, x, size)  # (B, L - r, W)
            x = x + block.mlp(block.ln_2(x))
        return x


class Bottleneck(nn.Module):
    """ResNet bottleneck; CLIP swaps strided convs for an avg-pool before conv3 (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([  # OpenAI's names: "-1" has no parameters
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token (query) over itself and all spatial tokens (keys)."""

    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x):  # (B, C, h, w) -> (B, D)
        x = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1 + hw, C)
        x = x + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        H = self.num_heads
        q = self.q_proj(x[:, :1]).view(B, 1, H, C // H).transpose(1, 2)  # (B, H, 1, C/H)
        k = self.k_proj(x).view(B, L, H, C // H).transpose(1, 2)  # (B, H, 1 + hw, C/H)
        v = self.v_proj(x).view(B, L, H, C // H).transpose(1, 2)
        x = attention(q, k, v)  # (B, H, 1, C/H)
        return self.c_proj(x.reshape(B, C))  # (B, D)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem + avg-pool, anti-aliased bottleneck stages, attention pooling."""

    projection = ("attnpool.c_proj",)  # the tower contract: what maps into the joint space

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.grad_checkpointing = False  # CLIP.set_grad_checkpointing: one checkpoint per stage
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width  # mutated by _make_layer while building
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32  # the ResNet feature dimension
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, R, R) -> (B, D)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)  # (B, W/2, R/2, R/2)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)  # (B, W, R/2, R/2)
        x = self.avgpool(x)  # (B, W, R/4, R/4)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = checkpointed(stage, x) if self.grad_checkpointing else stage(x)
        return self.attnpool(x)  # x: (B, 32 W, R/32, R/32)


# ----------------------------------------------------------------------------- composing CLIP

# The settings of OpenAI's towers, in the names of OpenAI's build_model. A CLIP's config is one
# flat dict of them (presets, checkpoints, overrides); `act` is shared by both towers.
VISION_KEYS = ("image_resolution", "vision_layers", "vision_width", "vision_patch_size",
               "vision_heads", "act", "patch_dropout", "vision_ln_pre", "vision_ln_eps", "tome_r")
TEXT_KEYS = ("context_length", "vocab_size", "transformer_width", "transformer_heads",
             "transformer_layers", "act", "eot_id")


def build_image_tower(embed_dim, image_resolution, vision_layers, vision_width,
                      vision_patch_size=None, vision_heads=None, act="gelu", patch_dropout=0.0,
                      vision_ln_pre=True, vision_ln_eps=1e-5, tome_r=0):
    """OpenAI's image tower: a ModifiedResNet when `vision_layers` is a 4-tuple, else a ViT.

    vision_heads=None follows OpenAI (ViT: width / 64, ResNet: 32 width / 64). vision_ln_pre=False
    with vision_ln_eps=1e-6 is DINO's ViT layout. `tome_r`: ToMe merges per ViT block (int or
    list; tome.py); `model.visual.tome_r = r` changes it later (config keeps the value the model
    was built with). The tower's `config` holds these settings, which rebuild it.
    """
    config = dict(image_resolution=image_resolution, vision_layers=vision_layers,
                  vision_width=vision_width, vision_patch_size=vision_patch_size,
                  vision_heads=vision_heads, act=act, patch_dropout=patch_dropout,
                  vision_ln_pre=vision_ln_pre, vision_ln_eps=vision_ln_eps, tome_r=tome_r)
    if isinstance(vision_layers, (tuple, list)):
        if patch_dropout or tome_r:
            raise ValueError("patch_dropout and tome_r need a ViT image tower, not a ResNet")
        tower = ModifiedResNet(tuple(vision_layers), embed_dim,
                               vision_heads or vision_width * 32 // 64, image_resolution,
                               vision_width)
    else:
        tower = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                  vision_layers, vision_heads or vision_width // 64, embed_dim,
                                  act, patch_dropout, vision_ln_pre, vision_ln_eps, tome_r)
    tower.config = config
    return tower


def _check_contract(tower, names, side):
    missing = [n for n in names if not hasattr(tower, n)]
    if missing:
        raise ValueError(f"the {side} tower {type(tower).__name__} lacks {', '.join(missing)} "
                         "(the tower contract: clip.py's docstring)")


class CLIP(nn.Module):
    """Two towers, `text_projection` (W, D) and the logit scale (shape [], as OpenAI's).

    `vision` / `text`: a dict of OpenAI's settings (VISION_KEYS / TEXT_KEYS; OpenAI's tower is
    built here, OpenAI's names) or a module that keeps the tower contract (module docstring).
    `config` is the flat dict that rebuilds the architecture (build_clip). Read sizes from the
    attributes embed_dim, context_length, vocab_size, text_width, and eot_id (OpenAI's text tower:
    the token whose first occurrence carries z_txt; None for a module text tower).
    """

    def __init__(self, embed_dim, vision, text):
        super().__init__()
        own_visual = not isinstance(vision, nn.Module)
        self.visual = build_image_tower(embed_dim, **vision) if own_visual else vision
        _check_contract(self.visual, ("input_resolution", "output_dim", "config"), "image")
        if self.visual.output_dim != embed_dim:
            raise ValueError(f"the image tower maps to {self.visual.output_dim} dimensions but "
                             f"embed_dim is {embed_dim}")
        if isinstance(text, nn.Module):
            _check_contract(text, ("width", "context_length", "vocab_size", "config"), "text")
            self.text = text
            self.context_length, self.vocab_size = text.context_length, text.vocab_size
            self.text_width, self.eot_id = text.width, None
            text_config = {"text_tower": dict(text.config)}
        else:
            self.text = None
            text_config = self._build_text(**text)
        vision_config = dict(self.visual.config)
        if "kind" in vision_config:
            vision_config = {"image_tower": vision_config}
        acts = {vision_config.get("act", None), text_config.get("act", None)} - {None}
        if len(acts) > 1:
            raise ValueError(f"OpenAI's two towers share one act, got {' and '.join(acts)}")
        self.embed_dim = embed_dim
        self.config = {"embed_dim": embed_dim, **vision_config, **text_config}
        self.text_projection = nn.Parameter(torch.empty(self.text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # shape [] as OpenAI
        self.initialize_parameters(own_visual)

    def _build_text(self, context_length, vocab_size, transformer_width, transformer_heads,
                    transformer_layers, act="gelu", eot_id=49407):
        """OpenAI's text tower, its parameters flat on the CLIP as in OpenAI's checkpoints."""
        self.context_length, self.vocab_size, self.eot_id = context_length, vocab_size, eot_id
        self.text_width = transformer_width
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       act)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        return dict(context_length=context_length, vocab_size=vocab_size,
                    transformer_width=transformer_width, transformer_heads=transformer_heads,
                    transformer_layers=transformer_layers, act=act, eot_id=eot_id)

    def initialize_parameters(self, visual=True):
        """OpenAI's initialisation of OpenAI's towers (`visual`: also the ModifiedResNet's, when
        this CLIP built it); other towers arrive initialised or loaded."""
        if self.text is None:
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
        if visual and isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3,
                          self.visual.layer4):
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity
        width = self.text_width
        if self.text is None:
            proj_std = width ** -0.5 * (2 * self.transformer.layers) ** -0.5
            for block in self.transformer.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing in both towers (OpenAI's, torchvision's ResNet, BERT, XLM-R):
        each block (ResNet: each stage) keeps only its input for backward and recomputes the rest
        there. Gradients are unchanged; ViT blocks with ToMe merging run without it."""
        towers = [self.visual.transformer if hasattr(self.visual, "transformer") else self.visual,
                  self.transformer if self.text is None else self.text]
        for tower in towers:
            if not hasattr(tower, "grad_checkpointing"):
                raise ValueError(f"{type(tower).__name__} has no grad_checkpointing switch; "
                                 f"add one (see clip.checkpointed) or train without it")
            tower.grad_checkpointing = enable

    def encode_image(self, images, normalize=False):  # (B, 3, R, R) -> (B, D)
        z = self.visual(images)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, ids, normalize=False, return_tokens=False, causal=True):
        """ids (B, L) -> z (B, D); with return_tokens, (z, token features (B, L, W) for MLM: the
        ln_final outputs (zeros after the batch's last EOT), or a module tower's hidden states).

        causal=False runs OpenAI's text tower with bidirectional attention over each caption's
        tokens up to its EOT (padding is masked out): BERT-style MLM (DeCLIP's separate pass).
        Module towers are bidirectional already and ignore it."""
        B, L = ids.shape
        if L > self.context_length:
            n = self.context_length
            raise ValueError(f"ids have {L} tokens but the model's context_length is {n}; "
                             f"tokenize with context_length={n}")
        if self.text is not None:  # the text contract: tokens, pooled at [CLS]/<s> or by pool()
            tokens = self.text(ids)  # (B, L, W)
            pool = getattr(self.text, "pool", None)
            pooled = tokens[:, 0] if pool is None else pool(tokens, ids)  # (B, W)
        else:
            is_eot = ids == self.eot_id
            # first EOT (argmax of 0/1 returns the first 1); a row without EOT uses its last token
            eot = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), L - 1)  # (B,)
            # Attention is causal, so the padding after the batch's last EOT cannot change any
            # pooled feature: run the tower on the shortest prefix holding every EOT (captions
            # use ~20 of 77 positions). Costs one host sync; identical results.
            n = L if ids.is_meta else int(eot.max()) + 1  # meta tensors (shape checks): no values
            x = self.token_embedding(ids[:, :n]) + self.positional_embedding[:n]  # (B, n, W)
            if causal:
                x = self.transformer(x, is_causal=True)
            else:  # every token sees its caption's tokens up to EOT, never the padding after it
                pad = torch.arange(n, device=ids.device)[None, :] > eot[:, None]  # (B, n)
                bias = torch.zeros(pad.shape, dtype=x.dtype, device=ids.device)
                bias = bias.masked_fill(pad, float("-inf"))[:, None, None, :]      # (B, 1, 1, n)
                x = self.transformer(x, attn_bias=bias)
            rows = torch.arange(B, device=ids.device)
            if return_tokens:
                tokens = self.ln_final(x)  # (B, n, W)
                pooled = tokens[rows, eot]
                tokens = F.pad(tokens, (0, 0, 0, L - n))  # (B, L, W): zeros after the last EOT
            else:
                pooled = self.ln_final(x[rows, eot])  # LayerNorm is per token: only EOT's needed
        z = pooled @ self.text_projection  # (B, D)
        z = F.normalize(z, dim=-1) if normalize else z
        return (z, tokens) if return_tokens else z

    def forward(self, images, ids):
        """Returns (z_img (B, D), z_txt (B, D), logit_scale.exp() []); features L2-normalised."""
        z_img = self.encode_image(images, normalize=True)
        z_txt = self.encode_text(ids, normalize=True)
        return z_img, z_txt, self.logit_scale.exp()


def split_config(config):
    """A flat CLIP config -> (embed_dim, vision, text): each tower's OpenAI settings, or the
    module tower's own config ({"kind": ...}) held in "image_tower" / "text_tower"."""
    known = {"embed_dim", "image_tower", "text_tower", *VISION_KEYS, *TEXT_KEYS}
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ValueError(f"unknown CLIP setting {', '.join(unknown)}; the settings are "
                         + ", ".join(sorted(known)))
    towers = []
    for key, names in (("image_tower", VISION_KEYS), ("text_tower", TEXT_KEYS)):
        tower = config.get(key)  # absent: OpenAI's tower, its sizes flat in the config
        towers.append(dict(tower) if tower is not None
                      else {k: config[k] for k in names if k in config})
    return config["embed_dim"], towers[0], towers[1]


def build_clip(config, build_tower=None):
    """The CLIP that `config` (model.config, a checkpoint's "model_config") describes, freshly
    initialised. A tower config with a "kind" is built by `build_tower(tower_config) -> module`
    (factory.build_tower); OpenAI's towers are built here."""
    embed_dim, vision, text = split_config(config)
    towers = []
    for side, tower in (("image", vision), ("text", text)):
        if "kind" in tower:
            if build_tower is None:
                raise ValueError(f"the {side} tower is {tower['kind']!r}, built outside clip.py: "
                                 "use factory.from_config / factory.load_checkpoint")
            tower = build_tower(tower)
        towers.append(tower)
    return CLIP(embed_dim, *towers)
