"""Pre-trained towers from local files, LiT-style locking and per-tower learning rates (SPEC §4).

The medium-scale study found that starting CLIP from a self-supervised image tower (DINO) and a
masked-LM text tower gives the largest gain, and names locking them (LiT, Zhai et al. 2022) as
worth trying. Weights are read from files you downloaded; nothing is fetched at run time.

- DINO ViT (facebookresearch/dino names: cls_token, pos_embed, patch_embed.proj, blocks.{i}.*,
  norm) into our VisionTransformer built with vision_ln_pre=False, vision_ln_eps=1e-6, act="gelu".
  DINO's patch-embedding bias is added to the patch tokens' positional embedding (exact: both are
  added to every patch token before the blocks). Positions are resized bicubically when the
  resolution differs. `proj` stays freshly initialised (DINO has none).
- torchvision's ResNets (`resnet50-*.pth`): TorchvisionResNetTower, torchvision's own network with
  its classifier `fc` resized to the embedding dim (global average pool -> Linear), freshly
  initialised.
- BERT (bert.py): Hugging Face weights and vocab.txt, as CLIP(text_tower="bert").

Shapes: B batch, D embedding; ViT: W width, N patches.

Usage:
    model = create_model("ViT-S-16", image="dino:dino_deitsmall16_pretrain.pth",
                         text="bert:bert-base-uncased/")        # a CLIP; config rebuilds it
    tokenizer = WordPieceTokenizer.from_pretrained("bert-base-uncased/")   # bert.py
    lock_tower(model, "image")                                   # LiT: image body frozen
    opt = torch.optim.AdamW(param_groups(model, lr=5e-4, wd=0.2, text_lr=1e-5))
    train_mode(model)                                            # instead of model.train()

Choices: a tower's *body* is what locking freezes and what image_lr / text_lr apply to; the
projections into the joint space (ViT `proj`, torchvision `fc`, ModifiedResNet `attnpool.c_proj`,
`text_projection`) are fresh for DINO/torchvision/BERT, so they always train at the base lr.
Left out: timm/HF model zoos, XLM-RoBERTa (the study's text tower; BERT stands in), DINOv2.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from bert import load_hf_bert
from clip import CLIP, PRESETS, VisionTransformer

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class TorchvisionResNetTower(nn.Module):
    """torchvision's ResNet (1-conv stem, strided convs, global average pool); `fc` maps to D."""

    def __init__(self, arch, output_dim, input_resolution=224):
        super().__init__()
        import torchvision  # here: the rest of this file needs torch only

        name = arch.removeprefix("tv-")
        if name not in TORCHVISION_RESNETS:
            raise ValueError(f"image_tower={arch!r}: use tv-" + ", tv-".join(TORCHVISION_RESNETS))
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.resnet = getattr(torchvision.models, name)(num_classes=output_dim)

    def forward(self, x):  # (B, 3, R, R) -> (B, D)
        return self.resnet(x)


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


def _copy_into(module, sd, path, keep=()):
    """module.load_state_dict(sd) with one-line errors; the parameters named in `keep` stay."""
    own = module.state_dict()
    sd = {**{k: own[k] for k in keep}, **sd}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(ks)} {what} ({', '.join(ks[:2])}{', ...' if len(ks) > 2 else ''})"
                 for what, ks in (("missing", missing), ("unexpected", unexpected),
                                  ("shape mismatches", wrong)) if ks]
        raise ValueError(f"{path}: weights do not fit this {type(module).__name__}: "
                         + "; ".join(parts))
    module.load_state_dict(sd)


def _resize_positions(pos, grid):  # (1 + n^2, W) -> (1 + grid^2, W), class position unchanged
    n = round((len(pos) - 1) ** 0.5)
    if n == grid:
        return pos
    patches = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, W, n, n)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic",
                            align_corners=False).to(pos.dtype)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


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
    grid = visual.input_resolution // visual.conv1.kernel_size[0]
    pos = _resize_positions(sd.pop("pos_embed")[0], grid)  # (1 + N, W)
    bias = sd.pop("patch_embed.proj.bias", None)
    if bias is not None:  # conv1(x) + b + pos == conv1(x) + (pos + b) for every patch token
        pos = torch.cat([pos[:1], pos[1:] + bias])
    ours = {"class_embedding": sd.pop("cls_token").reshape(-1), "positional_embedding": pos,
            "conv1.weight": sd.pop("patch_embed.proj.weight")}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            name = next((rest.replace(a, b, 1) for a, b in _DINO_BLOCK.items()
                         if rest.startswith(a)), rest)
            k = f"transformer.resblocks.{i}.{name}"
        ours[k.replace("norm.", "ln_post.", 1) if k.startswith("norm.") else k] = v
    _copy_into(visual, ours, path, keep=("proj",))


def load_torchvision_resnet_(visual, path):
    """Copy torchvision ResNet weights (all but the classifier fc) into a TorchvisionResNetTower."""
    if not isinstance(visual, TorchvisionResNetTower):
        raise ValueError(f"{path}: torchvision ResNet weights need CLIP(image_tower='tv-resnet50')")
    sd = _read(path, "torchvision ResNet weights, e.g. resnet50-0676ba61.pth")
    sd = {k: v for k, v in sd.get("state_dict", sd).items() if not k.startswith("fc.")}
    _copy_into(visual.resnet, sd, path, keep=("fc.weight", "fc.bias"))


def _parse(spec, kinds, what):
    kind, sep, path = spec.partition(":")
    if not sep or kind not in kinds or not path:
        raise ValueError(f"{what}={spec!r}: expected one of "
                         + ", ".join(f"{k}:PATH" for k in kinds))
    return kind, path


def create_model(name, image=None, text=None, **overrides):
    """A preset CLIP with pre-trained towers: image "dino:FILE" or "tv-resnet50:FILE" (any
    torchvision ResNet), text "bert:DIR" (or a weights file beside vocab.txt / config.json).

    DINO must match the preset's ViT (ViT-S-16 = ViT-S/16, ViT-B-16 = ViT-B/16) and sets act="gelu"
    (also for a fresh text tower); BERT's sizes and vocabulary come from its weights. The result's
    `config` rebuilds the same architecture (CLIP(**config), clip.load_checkpoint).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    config = {**PRESETS[name], **overrides}
    image_kind = text_sd = None
    if image is not None:
        image_kind, image_path = _parse(image, ["dino"] + [f"tv-{a}" for a in TORCHVISION_RESNETS],
                                        "image")
        if image_kind == "dino":
            config.update(vision_ln_pre=False, vision_ln_eps=1e-6, act="gelu")
        else:
            config.update(image_tower=image_kind)
    if text is not None:
        _, text_path = _parse(text, ["bert"], "text")
        text_sd, cfg = load_hf_bert(text_path, config["context_length"])
        if overrides.get("vocab_size", cfg["vocab_size"]) != cfg["vocab_size"]:
            raise ValueError(f"{text_path}: the weights have {cfg['vocab_size']} tokens but "
                             f"vocab_size={overrides['vocab_size']} (use this BERT's vocab.txt)")
        config.update(text_tower="bert", vocab_size=cfg["vocab_size"],
                      transformer_width=cfg["width"], transformer_layers=cfg["layers"],
                      transformer_heads=cfg["heads"])
    model = CLIP(**config)
    if image_kind == "dino":
        load_dino_(model.visual, image_path)
    elif image_kind is not None:
        load_torchvision_resnet_(model.visual, image_path)
    if text_sd is not None:
        _copy_into(model.bert, text_sd, text_path)
    return model


# ----------------------------------------------------------------------------- training the towers

def _find_clip(model):
    """The CLIP inside `model` (itself, DeCLIP's .clip, or a DDP-wrapped one)."""
    found = next((m for m in model.modules() if isinstance(m, CLIP)), None)
    if found is None:
        raise ValueError(f"no CLIP inside this {type(model).__name__}")
    return found


def _is_projection(name):  # names relative to the CLIP
    return name in ("visual.proj", "text_projection") or name.startswith(
        ("visual.resnet.fc.", "visual.attnpool.c_proj."))


def tower_parameters(model, side):
    """{name: parameter} of one tower's body ("image" or "text"), projection excluded; names are
    relative to the CLIP. The text side is everything of the CLIP outside `visual` except
    `text_projection` and the logit scale."""
    if side not in ("image", "text"):
        raise ValueError(f"tower {side!r}: use 'image' or 'text'")
    clip = _find_clip(model)
    image = side == "image"
    return {n: p for n, p in clip.named_parameters() if n.startswith("visual.") == image
            and not _is_projection(n) and not n.startswith("logit_")}


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
                       if _is_projection(n) and n.startswith(proj)})
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
