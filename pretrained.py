"""Pre-trained towers from local files: DINO, Hugging Face ViT, torchvision ResNet, BERT, XLM-R.

The medium-scale study found that starting CLIP from a self-supervised image tower (DINO) and a
masked-LM text tower (XLM-RoBERTa) gives the largest gain (Sec. 2, Fig. 2), and names locking
them (LiT, Zhai et al. 2022) as worth trying. Weights are read from files you downloaded; nothing
is fetched at run time.

This file converts weights; factory.py resolves the specs "kind:PATH" (factory.towers(): kind ->
loader here, builder, tokenizer) and puts the towers in a CLIP. Every tower keeps clip.py's tower
contract, so CLIP takes it as a module. A loader is (PATH, embed_dim, the preset's settings) ->
tower:
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
Adding a tower: a file with its module (the contract) and loader, and one entry in
factory.towers().

Training them (LiT locking, a learning rate per tower) is optim.py's.

Shapes: B batch, D embedding; ViT: W width, N patches.

Usage:
    load_dino_(model.visual, "dino_deitsmall16_pretrain.pth")     # into a ViT in DINO's layout
    model = factory.create_model("ViT-S-16", image="hf-vit:dino-vits16/",
                                 text="xlmr:xlm-roberta-base/")   # the usual way

Left out: timm and other HF model zoos (HF ViTModel and XLMRobertaModel only), DINOv2, DINO's
ImageNet normalisation (images keep CLIP's mean and std), tokenizers' literal special tokens.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import bert
import xlmr
from clip import VisionTransformer, build_image_tower, checkpointed

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
                         "vision_ln_eps=1e-6, act='gelu' (factory.create_model sets them)")
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
