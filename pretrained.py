"""Pre-trained towers from local files, LiT-style locking and per-tower learning rates (SPEC §4).

The medium-scale study found that starting CLIP from a self-supervised image tower (DINO) and a
masked-LM text tower (XLM-RoBERTa) gives the largest gain (Sec. 2, Fig. 2), and names locking
them (LiT, Zhai et al. 2022) as worth trying. Weights are read from files you downloaded; nothing
is fetched at run time.

Towers are named by specs "kind:PATH", resolved in one place, TOWERS (kind -> loader, builder,
tokenizer). Every tower keeps clip.py's tower contract, so CLIP takes it as a module:
- dino:FILE  DINO ViT, facebookresearch/dino names (cls_token, pos_embed, patch_embed.proj,
  blocks.{i}.*, norm), into OpenAI's ViT built with vision_ln_pre=False, vision_ln_eps=1e-6,
  act="gelu" (it must match the preset: ViT-S-16 = ViT-S/16). DINO's patch-embedding bias is
  added to the patch tokens' positional embedding (exact: both are added to every patch token
  before the blocks). Positions are resized bicubically when the resolution differs.
- hf-vit:DIR  a Hugging Face ViTModel folder (config.json + model.safetensors or
  pytorch_model.bin; e.g. facebook/dino-vits16, the study's "huggingface-ViT-dino"): the same
  ViT, its sizes and LayerNorm eps from config.json (the preset gives the resolution), names
  embeddings.{cls_token, position_embeddings, patch_embeddings.projection},
  encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value},
  attention.output.dense, layernorm_after, intermediate.dense, output.dense}, layernorm
  ("vit." prefixes and the pooler/classifier are dropped).
- tv-resnet50:FILE (any torchvision ResNet): TorchvisionResNetTower, torchvision's network with
  its classifier `fc` resized to the embedding dim (global average pool -> Linear), fresh.
- bert:DIR  BERT (bert.py), with its WordPiece vocabulary.
- xlmr:DIR  XLM-RoBERTa (xlmr.py), with its SentencePiece tokenizer.
ViT towers keep FLIP's patch dropout and ToMe; a fresh OpenAI text tower next to DINO or an HF ViT
uses their exact GELU (one act per CLIP). `proj` / `fc` / `text_projection` start fresh.
Adding a tower: a file with its module (the contract) and loader, and one entry in TOWERS.

Shapes: B batch, D embedding; ViT: W width, N patches.

Usage:
    model = create_model("ViT-S-16", image="hf-vit:dino-vits16/",
                         text="xlmr:xlm-roberta-base/")        # a CLIP; config rebuilds it
    tokenizer = load_tokenizer("xlmr:xlm-roberta-base/")       # the one its weights came with
    model = load_checkpoint("runs/x/checkpoint.pt")           # any tower, from model_config
    lock_tower(model, "image")                                  # LiT: image body frozen
    opt = torch.optim.AdamW(param_groups(model, lr=5e-4, wd=0.2, text_lr=1e-5))
    train_mode(model)                                           # instead of model.train()

Choices: a tower's *body* is what locking freezes and what image_lr / text_lr apply to; the
projections into the joint space (the image tower's `projection`, `text_projection`) are fresh
for every pre-trained tower, so they always train at the base lr.
Left out: timm and other HF model zoos (HF ViTModel and XLMRobertaModel only), DINOv2, DINO's
ImageNet normalisation (images keep CLIP's mean and std), tokenizers' literal special tokens.
"""
import functools
import os
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import bert
import xlmr
from clip import CLIP, PRESETS, VisionTransformer, build_image_tower, checkpointed, split_config
from clip import from_config as clip_from_config, load_checkpoint as clip_load_checkpoint

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class TorchvisionResNetTower(nn.Module):
    """torchvision's ResNet (1-conv stem, strided convs, global average pool); `fc` maps to D."""

    projection = ("resnet.fc",)  # the tower contract: what maps into the joint space

    def __init__(self, arch, output_dim, input_resolution=224):
        super().__init__()
        import torchvision  # here: the rest of this file needs torch only

        name = arch.removeprefix("tv-")
        if name not in TORCHVISION_RESNETS:
            raise ValueError(f"image tower {arch!r}: use tv-" + ", tv-".join(TORCHVISION_RESNETS))
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.config = dict(kind=f"tv-{name}", arch=name, output_dim=output_dim,
                           input_resolution=input_resolution)
        self.resnet = getattr(torchvision.models, name)(num_classes=output_dim)
        self.grad_checkpointing = False  # clip.CLIP.set_grad_checkpointing: per stage

    def forward(self, x):  # (B, 3, R, R) -> (B, D)
        if not self.grad_checkpointing:
            return self.resnet(x)
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))  # (B, C, R/4, R/4)
        for stage in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = checkpointed(stage, x)
        return r.fc(torch.flatten(r.avgpool(x), 1))


# ----------------------------------------------------------------------------- loading

def _read(path, what):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message runs over many lines
        raise ValueError(f"{path}: cannot read it as a tensor-only torch file "
                         f"({type(e).__name__}); save the state dict alone") from None


def _resize_positions(pos, grid):  # (1 + n^2, W) -> (1 + grid^2, W), class position unchanged
    n = round((len(pos) - 1) ** 0.5)
    if n == grid:
        return pos
    patches = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, W, n, n)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic",
                            align_corners=False).to(pos.dtype)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def _vit_embeddings(visual, cls_token, pos, conv_weight, conv_bias):
    """Our ViT's class_embedding, positional_embedding (resized; the patch bias folded in: conv(x)
    + b + pos == conv(x) + (pos + b) for every patch token) and conv1 from a ViT's (W,) class
    token, (1 + N, W) positions, patch conv weight and bias."""
    grid = visual.input_resolution // visual.conv1.kernel_size[0]
    pos = _resize_positions(pos, grid)
    if conv_bias is not None:
        pos = torch.cat([pos[:1], pos[1:] + conv_bias])
    return {"class_embedding": cls_token.reshape(-1), "positional_embedding": pos,
            "conv1.weight": conv_weight}


_DINO_BLOCK = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight",
               "attn.qkv.bias": "attn.in_proj_bias", "attn.proj": "attn.out_proj",
               "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def load_dino_(visual, path):
    """Copy DINO ViT weights (backbone state dict, or a full checkpoint's "teacher") into a
    VisionTransformer built with ln_pre=False, ln_eps=1e-6, act="gelu"; `proj` is kept."""
    obj = _read(path, "DINO ViT weights, e.g. dino_deitsmall16_pretrain.pth")
    obj = obj.get("teacher", obj.get("state_dict", obj))
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj.items()
          if torch.is_tensor(v) and not k.removeprefix("module.").startswith("head.")}
    if "pos_embed" not in sd or "cls_token" not in sd:
        raise ValueError(f"{path}: not a DINO ViT (no pos_embed/cls_token among its keys)")
    if not (isinstance(visual, VisionTransformer) and isinstance(visual.ln_pre, nn.Identity)
            and visual.ln_post.eps == 1e-6
            and isinstance(visual.transformer.resblocks[0].mlp.gelu, nn.GELU)):
        raise ValueError(f"{path}: DINO weights need a ViT with vision_ln_pre=False, "
                         "vision_ln_eps=1e-6, act='gelu' (pretrained.create_model sets them)")
    ours = _vit_embeddings(visual, sd.pop("cls_token"), sd.pop("pos_embed")[0],
                           sd.pop("patch_embed.proj.weight"), sd.pop("patch_embed.proj.bias", None))
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            name = next((rest.replace(a, b, 1) for a, b in _DINO_BLOCK.items()
                         if rest.startswith(a)), rest)
            k = f"transformer.resblocks.{i}.{name}"
        ours[k.replace("norm.", "ln_post.", 1) if k.startswith("norm.") else k] = v
    bert.copy_weights_(visual, ours, path, keep=("proj",))


def load_dino(path, embed_dim, settings):
    """"dino:FILE": OpenAI's ViT of the preset in DINO's layout, holding DINO's weights."""
    visual = build_image_tower(embed_dim, **{**settings, "vision_ln_pre": False,
                                             "vision_ln_eps": 1e-6, "act": "gelu"})
    load_dino_(visual, path)
    return visual


_HF_VIT_LAYER = {"layernorm_before": "ln_1", "attention.output.dense": "attn.out_proj",
                 "layernorm_after": "ln_2", "intermediate.dense": "mlp.c_fc",
                 "output.dense": "mlp.c_proj"}


def load_hf_vit(path, embed_dim, settings):
    """"hf-vit:DIR": OpenAI's ViT sized by a Hugging Face ViTModel's config.json (pre-LN blocks,
    no ln_pre, its eps), holding its weights; the preset gives the resolution, patch dropout and
    ToMe. With `proj` the identity, encode_image is HF's last_hidden_state[:, 0]."""
    what = "a Hugging Face ViTModel folder"
    config_file = os.path.join(os.fspath(path), "config.json")
    cfg, sd, weights = bert.read_hf_folder(path, ("vit",), what)
    try:
        width, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        if (cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("num_channels", 3) != 3
                or cfg.get("intermediate_size", 4 * width) != 4 * width):
            raise ValueError(f"{config_file}: only ViTs with hidden_act gelu, 3 channels and "
                             "intermediate_size = 4 hidden_size are supported")
        visual = build_image_tower(
            embed_dim, settings["image_resolution"], layers, width, cfg["patch_size"],
            cfg["num_attention_heads"], "gelu", settings.get("patch_dropout", 0.0), False,
            cfg.get("layer_norm_eps", 1e-12), settings.get("tome_r", 0))
    except KeyError as e:
        raise ValueError(f"{config_file}: no {e.args[0]!r} ({what} has it)") from None
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("pooler.", "classifier."))}
    try:
        e = "embeddings."
        ours = _vit_embeddings(visual, sd.pop(e + "cls_token"),
                               sd.pop(e + "position_embeddings")[0],
                               sd.pop(e + "patch_embeddings.projection.weight"),
                               sd.pop(e + "patch_embeddings.projection.bias", None))
        for i in range(layers):
            p, q = f"encoder.layer.{i}.", f"transformer.resblocks.{i}."
            qkv = [p + f"attention.attention.{n}." for n in ("query", "key", "value")]
            ours[q + "attn.in_proj_weight"] = torch.cat([sd.pop(n + "weight") for n in qkv])
            if cfg.get("qkv_bias", True):
                ours[q + "attn.in_proj_bias"] = torch.cat([sd.pop(n + "bias") for n in qkv])
            else:
                ours[q + "attn.in_proj_bias"] = torch.zeros(3 * width)
    except KeyError as e:
        raise ValueError(f"{weights}: no {e.args[0]!r}; expected the weights of {what} "
                         f"(ViTModel names)") from None
    for k, v in sd.items():  # the rest by name: per-layer Linear / LayerNorm, final layernorm
        if k.startswith("encoder.layer."):
            _, _, i, rest = k.split(".", 3)
            name = next((rest.replace(a, b, 1) for a, b in _HF_VIT_LAYER.items()
                         if rest.startswith(a + ".")), rest)
            k = f"transformer.resblocks.{i}.{name}"
        ours[k.replace("layernorm.", "ln_post.", 1) if k.startswith("layernorm.") else k] = v
    bert.copy_weights_(visual, ours, weights, keep=("proj",))
    return visual


def load_torchvision_resnet_(visual, path):
    """Copy torchvision ResNet weights (all but the classifier fc) into a TorchvisionResNetTower."""
    if not isinstance(visual, TorchvisionResNetTower):
        raise ValueError(f"{path}: torchvision ResNet weights need a TorchvisionResNetTower")
    sd = _read(path, "torchvision ResNet weights, e.g. resnet50-0676ba61.pth")
    sd = {k: v for k, v in sd.get("state_dict", sd).items() if not k.startswith("fc.")}
    bert.copy_weights_(visual.resnet, sd, path, keep=("fc.weight", "fc.bias"))


def load_torchvision(arch, path, embed_dim, settings):
    """"tv-resnet50:FILE": torchvision's ResNet at the preset's resolution, fresh `fc` to D."""
    if settings.get("patch_dropout") or settings.get("tome_r"):
        raise ValueError("patch_dropout and tome_r need a ViT image tower, not a ResNet")
    visual = TorchvisionResNetTower(arch, embed_dim, settings["image_resolution"])
    load_torchvision_resnet_(visual, path)
    return visual


def load_bert(path, embed_dim, settings):
    """"bert:DIR" (or a weights file beside vocab.txt / config.json): its sizes and vocabulary
    from its weights; the preset's context_length keeps that many positions."""
    sd, cfg = bert.load_hf_bert(path, settings["context_length"])
    tower = bert.BertModel(**cfg)
    bert.copy_weights_(tower, sd, path)
    return tower


def load_xlmr(path, embed_dim, settings):
    """"xlmr:DIR": XLM-RoBERTa sized by its config.json, taking the preset's context_length."""
    return xlmr.load_hf_xlmr(path, settings["context_length"])


class Tower(NamedTuple):
    """An entry of TOWERS: how a spec "kind:PATH" becomes a tower, how its config rebuilds it."""
    side: str                       # "image" or "text"
    load: Callable                  # (path, embed_dim, the preset's settings) -> tower module
    build: Callable = None          # (**config without "kind") -> the untrained tower; None:
    #                                 an OpenAI-layout ViT, which clip.py rebuilds itself
    tokenizer: type = None          # text: .from_pretrained(folder), (**state), .state()


# The one place tower specs are resolved: a new tower is one entry here.
TOWERS = {
    "dino": Tower("image", load_dino),
    "hf-vit": Tower("image", load_hf_vit),
    **{f"tv-{a}": Tower("image", functools.partial(load_torchvision, a), TorchvisionResNetTower)
       for a in TORCHVISION_RESNETS},
    "bert": Tower("text", load_bert, bert.BertModel, bert.WordPieceTokenizer),
    "xlmr": Tower("text", load_xlmr, xlmr.XLMRobertaModel, xlmr.XLMRTokenizer),
}


def _parse(spec, side):
    """"kind:PATH" -> (kind, PATH) for one side, or a one-line error listing the kinds."""
    kinds = [k for k, t in TOWERS.items() if t.side == side]
    kind, sep, path = spec.partition(":")
    if not sep or kind not in kinds or not path:
        raise ValueError(f"{side}={spec!r}: expected one of "
                         + ", ".join(f"{k}:PATH" for k in kinds))
    return kind, path


def create_model(name, image=None, text=None, **overrides):
    """A preset CLIP with pre-trained towers: `image` "dino:FILE", "hf-vit:DIR" or
    "tv-resnet50:FILE" (any torchvision ResNet), `text` "bert:DIR" or "xlmr:DIR"; `overrides`
    replace preset settings (clip.create_model's). Pre-trained text towers bring their vocabulary
    (a vocab_size override must agree). The result's `config` rebuilds the same architecture
    (from_config, load_checkpoint).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    embed_dim, vision, text_tower = split_config({**PRESETS[name], **overrides})
    if image is not None:
        kind, path = _parse(image, "image")
        vision = TOWERS[kind].load(path, embed_dim, vision)
    if text is not None:
        kind, path = _parse(text, "text")
        text_tower = TOWERS[kind].load(path, embed_dim, text_tower)
        if overrides.get("vocab_size", text_tower.vocab_size) != text_tower.vocab_size:
            raise ValueError(f"{path}: the weights have {text_tower.vocab_size} tokens but "
                             f"vocab_size={overrides['vocab_size']} (use the tokenizer that "
                             "comes with them: load_tokenizer)")
    if isinstance(text_tower, dict) and "act" in getattr(vision, "config", {}):
        text_tower["act"] = vision.config["act"]  # OpenAI's text tower shares the ViT's act
    return CLIP(embed_dim, vision, text_tower)


def build_tower(config):
    """The untrained tower that a module tower's config ({"kind": ...}) describes."""
    entry = TOWERS.get(config.get("kind"))
    if entry is None or entry.build is None:
        kinds = [k for k, t in TOWERS.items() if t.build is not None]
        raise ValueError(f"tower kind {config.get('kind')!r} is not one of {', '.join(kinds)}")
    return entry.build(**{k: v for k, v in config.items() if k != "kind"})


def from_config(config):
    """clip.from_config with every tower of TOWERS: the architecture of any model.config."""
    return clip_from_config(config, build_tower)


def load_checkpoint(path, map_location="cpu", **overrides):
    """clip.load_checkpoint for checkpoints with any tower (eval_zeroshot.py loads through it)."""
    return clip_load_checkpoint(path, map_location, build_tower=build_tower, **overrides)


def load_tokenizer(spec):
    """The tokenizer that comes with a text tower's weights: "bert:DIR" (vocab.txt),
    "xlmr:DIR" (tokenizer.json or sentencepiece.bpe.model)."""
    kind, path = _parse(spec, "text")
    return TOWERS[kind].tokenizer.from_pretrained(path if os.path.isdir(path)
                                                  else os.path.dirname(path))


def tokenizer_state(spec, tokenizer):
    """What a checkpoint keeps of the tokenizer of text tower `spec` (tokenizer_from_state)."""
    return {"kind": spec.partition(":")[0], "state": tokenizer.state()}


def tokenizer_from_state(saved):
    entry = TOWERS.get(saved.get("kind"))
    if entry is None or entry.tokenizer is None:
        raise ValueError(f"a checkpoint's tokenizer of kind {saved.get('kind')!r}: expected one "
                         f"of {', '.join(k for k, t in TOWERS.items() if t.tokenizer)}")
    return entry.tokenizer(**saved["state"])


# ----------------------------------------------------------------------------- training the towers

def _find_clip(model):
    """The CLIP inside `model` (itself, DeCLIP's .clip, or a DDP-wrapped one)."""
    found = next((m for m in model.modules() if isinstance(m, CLIP)), None)
    if found is None:
        raise ValueError(f"no CLIP inside this {type(model).__name__}")
    return found


def _is_projection(clip, name):  # names relative to the CLIP; the tower contract's projection
    heads = [f"visual.{p}" for p in getattr(clip.visual, "projection", ())] + ["text_projection"]
    return any(name == h or name.startswith(h + ".") for h in heads)


def tower_parameters(model, side):
    """{name: parameter} of one tower's body ("image" or "text"), projection excluded; names are
    relative to the CLIP. The text side is everything of the CLIP outside `visual` except
    `text_projection` and the logit scale."""
    if side not in ("image", "text"):
        raise ValueError(f"tower {side!r}: use 'image' or 'text'")
    clip = _find_clip(model)
    image = side == "image"
    return {n: p for n, p in clip.named_parameters() if n.startswith("visual.") == image
            and not _is_projection(clip, n) and not n.startswith("logit_")}


def lock_tower(model, side, keep_proj=True):
    """LiT: freeze one tower (requires_grad False) and its BatchNorm statistics (eval mode).

    `model.train()` puts BatchNorm back in training mode: use `train_mode(model)` instead, which
    keeps every BatchNorm whose parameters are all frozen in eval mode. keep_proj=False freezes
    the projection too (for a tower that is already aligned, e.g. a CLIP checkpoint's).
    """
    clip = _find_clip(model)
    params = tower_parameters(clip, side)
    if not keep_proj:
        proj = "visual." if side == "image" else "text_projection"
        params.update({n: p for n, p in clip.named_parameters()
                       if _is_projection(clip, n) and n.startswith(proj)})
    for p in params.values():
        p.requires_grad_(False)
    return train_mode(model, model.training)


def train_mode(model, mode=True):
    """model.train(mode), but BatchNorm layers with only frozen parameters stay in eval mode."""
    model.train(mode)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None \
                and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    return model


def param_groups(model, lr, wd, image_lr=None, text_lr=None):
    """AdamW parameter groups: per tower body (image_lr / text_lr, default lr) x decay or not.

    No weight decay for tensors with ndim < 2 (every norm layer's weight and bias, class
    embeddings), biases, logit_scale / logit_bias.
    Each group carries "name" and "base_lr" (its peak lr): schedule each group from its own,
    e.g. group["lr"] = lr_at(step, total, warmup, group["base_lr"]). Frozen parameters are left
    out, so call lock_tower first.
    """
    clip = _find_clip(model)
    tower = {id(p): "image" for p in tower_parameters(clip, "image").values()}
    tower.update({id(p): "text" for p in tower_parameters(clip, "text").values()})
    peak = {"image": lr if image_lr is None else image_lr,
            "text": lr if text_lr is None else text_lr, "other": lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or name.endswith("bias")
                     or name.rsplit(".", 1)[-1].startswith("logit_"))
        t = tower.get(id(p), "other")
        key = f"{t}/{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": wd if decay else 0.0, "lr": peak[t],
                           "base_lr": peak[t], "name": key}
        groups[key]["params"].append(p)
    return list(groups.values())
