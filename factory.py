"""Making CLIPs: presets, pre-trained towers, checkpoints of every format, and their tokenizers.

clip.py is the architecture; this file is where a CLIP comes from (as OpenCLIP's factory.py):
- `create_model(name, image=, text=)`: a preset (OpenAI's RN50 / RN101 / ViT-B-32 / ViT-B-16,
  ViT-S-16, and the demo's tiny-rn / tiny), randomly initialised, optionally with pre-trained
  towers read from local files (the medium-scale study, Sec. 2, Fig. 2: a DINO image tower and
  an XLM-R text tower give the largest gain). Tower specs are "kind:PATH":
    image: dino:FILE, hf-vit:DIR (Hugging Face ViTModel), tv-resnet50:FILE (any torchvision
           ResNet);   text: bert:DIR, xlmr:DIR (pretrained.py reads them).
- `from_config(model.config)`: the same architecture again, any tower (a checkpoint's
  "model_config"); `build_model(state_dict)`: OpenAI's state dict, sizes read from its shapes.
- `load_checkpoint(path)`: an OpenAI JIT archive or state dict, an OpenCLIP checkpoint, or one of
  ours (train.py's, with any tower), in eval mode.
- the tokenizer a model was trained with: `load_tokenizer("xlmr:DIR")` (the one that comes with
  a text tower's weights), `tokenizer_state` / `tokenizer_from_state` (what a checkpoint keeps of
  it), `saved_tokenizer(path)`; `load_model_and_tokenizer(path)` gives both.
`towers()` is the one place tower specs are resolved (kind -> loader, builder, tokenizer); it
imports pretrained.py, bert.py and xlmr.py when first called, so plain CLIP use never does.

Usage:
    model = create_model("ViT-B-32")                              # OpenAI's architecture
    model = create_model("ViT-S-16", image="hf-vit:dino-vits16/",
                         text="xlmr:xlm-roberta-base/")           # the study's towers
    tokenizer = load_tokenizer("xlmr:xlm-roberta-base/")          # the one its weights came with
    model = from_config(model.config)                             # same architecture, fresh
    model = load_checkpoint("ViT-B-32.pt")                        # OpenAI, OpenCLIP or ours
    model, tokenizer = load_model_and_tokenizer("runs/x/checkpoint.pt")

A checkpoint of ours is {"state_dict", "model_config", plus the tokenizer: "merges" (OpenAI-style
BPE) or "tokenizer" (a pre-trained text tower's, tokenizer_state)}; train.py writes it.
Left out: downloading weights (every file is local), OpenCLIP's model zoo and its JSON configs.
"""
import functools
import os
import zipfile
from typing import Callable, NamedTuple

import torch

from clip import CLIP, build_clip, split_config

# ----------------------------------------------------------------------------- presets

# vocab_size 49409 = OpenAI's 49408 + DeCLIP's mask token, so MLM inputs embed; OpenAI weights load
# through build_model/load_checkpoint, which read the vocabulary size from the checkpoint.
_TEXT_OPENAI = dict(context_length=77, vocab_size=49409, transformer_width=512,
                    transformer_heads=8, transformer_layers=12)
PRESETS = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, act="quick_gelu", **_TEXT_OPENAI),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3), vision_width=64,
                  vision_patch_size=None, act="quick_gelu", **_TEXT_OPENAI),
    "ViT-B-32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, act="quick_gelu", **_TEXT_OPENAI),
    "ViT-B-16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, act="quick_gelu", **_TEXT_OPENAI),
    "ViT-S-16": dict(embed_dim=384, image_resolution=224, vision_layers=12, vision_width=384,
                     vision_patch_size=16, context_length=77, vocab_size=49409,
                     transformer_width=384, transformer_heads=6, transformer_layers=12, act="gelu"),
    # The demo's model: a ModifiedResNet with one bottleneck per stage (DeCLIP's Table 4 is an
    # RN50), 64 px, and the tiny text tower (the demo: docs/results.md).
    "tiny-rn": dict(embed_dim=128, image_resolution=64, vision_layers=(1, 1, 1, 1),
                    vision_width=16, vision_patch_size=None, context_length=32, vocab_size=49409,
                    transformer_width=128, transformer_heads=4, transformer_layers=3, act="gelu"),
    # A tiny ViT for what needs patches (FLIP's patch dropout, ToMe's merging).
    "tiny": dict(embed_dim=128, image_resolution=64, vision_layers=3, vision_width=128,
                 vision_patch_size=8, vision_heads=4, context_length=32, vocab_size=49409,
                 transformer_width=128, transformer_heads=4, transformer_layers=3, act="gelu"),
}


# ----------------------------------------------------------------------------- pre-trained towers

class Tower(NamedTuple):
    """An entry of towers(): how a spec "kind:PATH" becomes a tower, how its config rebuilds it."""
    side: str                       # "image" or "text"
    load: Callable                  # (path, embed_dim, the preset's settings) -> tower module
    build: Callable = None          # (**config without "kind") -> the untrained tower; None:
    #                                 an OpenAI-layout ViT, which clip.py rebuilds itself
    tokenizer: type = None          # text: .from_pretrained(folder), (**state), .state()


def towers():
    """The one place tower specs are resolved: kind -> Tower; a new tower is one entry here.
    The towers' files are imported here, on first use: plain CLIP use never loads bert / xlmr."""
    import bert
    import pretrained
    import xlmr

    return {
        "dino": Tower("image", pretrained.load_dino),
        "hf-vit": Tower("image", pretrained.load_hf_vit),
        **{f"tv-{a}": Tower("image", functools.partial(pretrained.load_torchvision, a),
                            pretrained.TorchvisionResNetTower)
           for a in pretrained.TORCHVISION_RESNETS},
        "bert": Tower("text", pretrained.load_bert, bert.BertModel, bert.WordPieceTokenizer),
        "xlmr": Tower("text", pretrained.load_xlmr, xlmr.XLMRobertaModel, xlmr.XLMRTokenizer),
    }


def _parse(spec, side):
    """"kind:PATH" -> (its Tower, PATH) for one side, or a one-line error listing the kinds."""
    entries = {k: t for k, t in towers().items() if t.side == side}
    kind, sep, path = spec.partition(":")
    if not sep or kind not in entries or not path:
        raise ValueError(f"{side}={spec!r}: expected one of "
                         + ", ".join(f"{k}:PATH" for k in entries))
    return entries[kind], path


def build_tower(config):
    """The untrained tower that a module tower's config ({"kind": ...}) describes."""
    entries = towers()
    entry = entries.get(config.get("kind"))
    if entry is None or entry.build is None:
        kinds = [k for k, t in entries.items() if t.build is not None]
        raise ValueError(f"tower kind {config.get('kind')!r} is not one of {', '.join(kinds)}")
    return entry.build(**{k: v for k, v in config.items() if k != "kind"})


# ----------------------------------------------------------------------------- models

def create_model(name, image=None, text=None, **overrides):
    """A preset CLIP, randomly initialised, with pre-trained towers if asked: `image`
    "dino:FILE", "hf-vit:DIR" or "tv-resnet50:FILE" (any torchvision ResNet), `text` "bert:DIR"
    or "xlmr:DIR". `overrides` replace any preset setting (clip.VISION_KEYS, clip.TEXT_KEYS,
    embed_dim), e.g. create_model("tiny", vocab_size=100, tome_r=8). Pre-trained text towers
    bring their vocabulary (a vocab_size override must agree). The result's `config` rebuilds
    the same architecture (from_config, load_checkpoint).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    embed_dim, vision, text_tower = split_config({**PRESETS[name], **overrides})
    if image is not None:
        entry, path = _parse(image, "image")
        vision = entry.load(path, embed_dim, vision)
    if text is not None:
        entry, path = _parse(text, "text")
        text_tower = entry.load(path, embed_dim, text_tower)
        if overrides.get("vocab_size", text_tower.vocab_size) != text_tower.vocab_size:
            raise ValueError(f"{path}: the weights have {text_tower.vocab_size} tokens but "
                             f"vocab_size={overrides['vocab_size']} (use the tokenizer that "
                             "comes with them: load_tokenizer)")
    if isinstance(text_tower, dict) and "act" in getattr(vision, "config", {}):
        text_tower["act"] = vision.config["act"]  # OpenAI's text tower shares the ViT's act
    return CLIP(embed_dim, vision, text_tower)


def from_config(config):
    """The CLIP that `config` (model.config, a checkpoint's "model_config") describes, freshly
    initialised: OpenAI's towers by clip.py, module towers ({"kind": ...}) by towers()."""
    return build_clip(config, build_tower)


def _from_state_dict(config, state_dict):
    """from_config(config) holding state_dict's weights, in eval mode."""
    with torch.device("meta"):  # skip initialising weights about to be overwritten (seconds)
        model = from_config(config)
    model = model.to_empty(device=next(iter(state_dict.values())).device if state_dict else "cpu")
    _load_state_dict(model, state_dict)
    return model.eval()


def _load_state_dict(model, state_dict):
    """load_state_dict with one-line errors; accepts logit_scale shaped [1] (as DeCLIP's)."""
    own = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if k in own}
    for k, v in own.items():  # some exports omit BatchNorm's step counters; they are never used
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v)
    if "logit_scale" in sd and sd["logit_scale"].numel() == 1:
        sd["logit_scale"] = sd["logit_scale"].reshape(own["logit_scale"].shape)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in sd if sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def summary(what, keys):
            return f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        parts = [summary(w, ks) for w, ks in (("missing keys", missing),
                 ("unexpected keys", unexpected), ("shape mismatches", wrong)) if ks]
        raise ValueError("state dict does not match this CLIP architecture: " + "; ".join(parts))
    model.load_state_dict(sd)  # copies (and casts fp16 weights) into the fp32 parameters


def _openai_config(sd):
    """The config of OpenAI's CLIP whose state dict is `sd`, read from parameter shapes as
    OpenAI's build_model does (heads: OpenAI's rule, width / 64; act: quick_gelu)."""
    try:
        if "visual.proj" in sd:  # ViT
            vision_width = sd["visual.conv1.weight"].shape[0]
            vision_layers = len([k for k in sd if k.startswith("visual.")
                                 and k.endswith(".attn.in_proj_weight")])
            vision_patch_size = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            image_resolution = vision_patch_size * grid
        else:  # ModifiedResNet: count the blocks of each stage
            vision_layers = tuple(
                len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                for b in (1, 2, 3, 4))
            vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_patch_size, image_resolution = None, grid * 32
        transformer_width = sd["ln_final.weight"].shape[0]
        blocks = {k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}
        return dict(
            embed_dim=sd["text_projection"].shape[1], image_resolution=image_resolution,
            vision_layers=vision_layers, vision_width=vision_width,
            vision_patch_size=vision_patch_size,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=transformer_width,
            transformer_heads=transformer_width // 64, transformer_layers=len(blocks),
            act="quick_gelu")
    except KeyError as e:
        raise ValueError(f"state dict is not a CLIP model: no {e.args[0]!r} among its {len(sd)} "
                         f"keys (first: {', '.join(list(sd)[:3])})") from None


def build_model(state_dict, **overrides):
    """OpenAI's CLIP holding `state_dict` (OpenAI's names), its architecture read from shapes.

    Heads are not visible in shapes: OpenAI's rule (width / 64) is assumed; pass
    `transformer_heads=` or `vision_heads=` otherwise. `act` defaults to "quick_gelu" (OpenAI). A
    larger `vocab_size` appends freshly initialised embedding rows (49409 adds DeCLIP's mask token
    to OpenAI's weights). Returns the model in eval mode.
    """
    sd = state_dict
    config = {**_openai_config(sd), **overrides}
    emb = sd["token_embedding.weight"]
    if config["vocab_size"] > len(emb):  # new rows get the token embedding's initialisation
        new = 0.02 * torch.randn(config["vocab_size"] - len(emb), emb.shape[1], device=emb.device)
        sd = {**sd, "token_embedding.weight": torch.cat([emb, new.to(emb.dtype)])}
    return _from_state_dict(config, sd)


# ----------------------------------------------------------------------------- checkpoints

def _is_torchscript(path):
    """TorchScript archives are zips with code/ and constants.pkl; torch.save files lack both."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _read_checkpoint(path, map_location):
    """(model_config or None, the CLIP's state dict) of a checkpoint file, any format."""
    try:
        if _is_torchscript(path):  # OpenAI's released .pt files
            obj = torch.jit.load(path, map_location=map_location).state_dict()
        else:
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's messages run over many lines: say what happened in one
        msg = f"not a PyTorch or TorchScript file, or truncated ({type(e).__name__})"
        if "Unsupported global" in str(e):
            msg = ("it holds pickled Python objects besides tensors; if you trust it, pass "
                   "torch.load(path, weights_only=False)['state_dict'] to build_model")
        raise ValueError(f"{path}: cannot read the checkpoint: {msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or a dict with 'state_dict', "
                         f"got {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    sd = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}  # DDP prefix
    if "clip.text_projection" in sd:  # a whole DeCLIP state dict: keep the CLIP part
        sd = {k.removeprefix("clip."): v for k, v in sd.items() if k.startswith("clip.")}
    for k in ("input_resolution", "context_length", "vocab_size"):  # OpenAI JIT metadata
        sd.pop(k, None)
    return obj.get("model_config"), sd


def load_checkpoint(path, map_location="cpu", **overrides):
    """A CLIP in eval mode from an OpenAI JIT archive or state dict, an OpenCLIP checkpoint
    ({"state_dict"}, "module." prefixes), or one of ours ({"state_dict", "model_config"}, any
    tower, or a whole DeCLIP's "clip." weights).

    `overrides` replace settings (e.g. act="gelu" for OpenCLIP models trained so).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (expected an OpenAI, OpenCLIP "
                                "or declip-mini .pt file)")
    config, sd = _read_checkpoint(path, map_location)
    try:
        if config is None:
            return build_model(sd, **overrides)
        return _from_state_dict({**config, **overrides}, sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- tokenizers

def load_tokenizer(spec):
    """The tokenizer that comes with a text tower's weights: "bert:DIR" (vocab.txt),
    "xlmr:DIR" (tokenizer.json or sentencepiece.bpe.model)."""
    entry, path = _parse(spec, "text")
    return entry.tokenizer.from_pretrained(path if os.path.isdir(path) else os.path.dirname(path))


def tokenizer_state(spec, tokenizer):
    """What a checkpoint keeps of the tokenizer of text tower `spec` (tokenizer_from_state)."""
    return {"kind": spec.partition(":")[0], "state": tokenizer.state()}


def tokenizer_from_state(saved):
    """The tokenizer a checkpoint's "tokenizer" entry (tokenizer_state) describes."""
    entries = towers()
    entry = entries.get(saved.get("kind"))
    if entry is None or entry.tokenizer is None:
        raise ValueError(f"a checkpoint's tokenizer of kind {saved.get('kind')!r}: expected one "
                         f"of {', '.join(k for k, t in entries.items() if t.tokenizer)}")
    return entry.tokenizer(**saved["state"])


def saved_tokenizer(path):
    """The tokenizer stored in one of our checkpoints: BPE merges, a pre-trained text tower's own
    ("tokenizer": BERT's WordPiece, XLM-R's SentencePiece), or none of them
    (OpenAI / OpenCLIP checkpoints, and ours trained with OpenAI's BPE) -> OpenAI's BPE.

    mmap=True reads the small pickle without pulling the weights into memory (zip format only).
    """
    from tokenizer import Tokenizer  # here: plain CLIP use needs no tokenizer

    ckpt = {}
    for mmap in (True, False):
        try:
            ckpt = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
            break
        except Exception:  # not loadable this way; OpenAI's TorchScript archives fail both ways
            continue
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    if ckpt.get("tokenizer"):
        return tokenizer_from_state(ckpt["tokenizer"])
    merges = ckpt.get("merges")
    return Tokenizer.openai() if merges is None else Tokenizer(merges)  # "a b" strings


def load_model_and_tokenizer(path, device="cpu"):
    """(CLIP in eval mode on `device`, the tokenizer it was trained with) from a checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file (train one with train.py or "
                                f"pass an OpenAI / OpenCLIP .pt file)")
    model = load_checkpoint(path).to(device).eval()
    return model, saved_tokenizer(path)
