"""Tests for pretrained.py and bert.py: DINO / torchvision / BERT weights against reference
forwards written out here, the WordPiece tokenizer on a handmade vocabulary, locking, groups."""
import json
import math
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bert
import clip
import factory
import pretrained

TEXT = dict(context_length=16, vocab_size=100, eot_id=99, transformer_width=32,
            transformer_heads=2, transformer_layers=1)  # a small OpenAI text tower


def _message(fn, *args, **kwargs):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# ----------------------------------------------------------------------------- DINO

W, DEPTH, HEADS, PATCH = 32, 2, 4, 8


def dino_state_dict(grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"cls_token": torch.randn(1, 1, W, generator=g),
          "pos_embed": torch.randn(1, 1 + grid * grid, W, generator=g),
          "patch_embed.proj.weight": torch.randn(W, 3, PATCH, PATCH, generator=g) * 0.1,
          "patch_embed.proj.bias": torch.randn(W, generator=g),
          "norm.weight": 1 + 0.1 * torch.randn(W, generator=g),
          "norm.bias": 0.1 * torch.randn(W, generator=g)}
    for i in range(DEPTH):
        for name, shape in [("norm1", (W,)), ("attn.qkv", (3 * W, W)), ("attn.proj", (W, W)),
                            ("norm2", (W,)), ("mlp.fc1", (4 * W, W)), ("mlp.fc2", (W, 4 * W))]:
            if len(shape) == 1:  # LayerNorm
                sd[f"blocks.{i}.{name}.weight"] = 1 + 0.1 * torch.randn(shape, generator=g)
            else:
                sd[f"blocks.{i}.{name}.weight"] = torch.randn(shape, generator=g) / shape[1] ** 0.5
            sd[f"blocks.{i}.{name}.bias"] = 0.1 * torch.randn(shape[0], generator=g)
    return sd


def dino_reference(sd, images):
    """DINO's ViT forward written out: class-token feature after the final norm (B, W)."""
    def ln(x, name):
        return F.layer_norm(x, (W,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    def linear(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # (B, N, W)
    B, N = x.shape[:2]
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1) + sd["pos_embed"]
    d = W // HEADS
    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv = linear(ln(x, p + "norm1"), p + "attn.qkv").reshape(B, N + 1, 3, HEADS, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, 1 + N, d) each
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(dim=-1)
        x = x + linear((attn @ v).transpose(1, 2).reshape(B, N + 1, W), p + "attn.proj")
        x = x + linear(F.gelu(linear(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
    return ln(x, "norm")[:, 0]


def _features_before_proj(model, images):
    seen = []
    hook = model.visual.ln_post.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model.encode_image(images)
    hook.remove()
    return seen[0]


DINO_VIT = dict(image_resolution=32, vision_width=W, vision_layers=DEPTH, vision_heads=HEADS,
                vision_patch_size=PATCH, embed_dim=16, **TEXT)


@pytest.mark.parametrize("full_checkpoint", [False, True])
def test_dino_matches_reference(tmp_path, full_checkpoint):
    sd = dino_state_dict()
    obj = sd
    if full_checkpoint:  # DINO's training checkpoints: teacher/student with prefixes and heads
        obj = {"teacher": {**{"backbone." + k: v for k, v in sd.items()},
                           "head.mlp.0.weight": torch.zeros(3, W)}, "epoch": torch.tensor(1)}
    torch.save(obj, tmp_path / "dino.pth")
    model = factory.create_model("tiny", image=f"dino:{tmp_path / 'dino.pth'}", **DINO_VIT)
    assert isinstance(model.visual.ln_pre, nn.Identity) and model.config["act"] == "gelu"
    images = torch.randn(2, 3, 32, 32)
    want = dino_reference(sd, images)
    torch.testing.assert_close(_features_before_proj(model, images), want, atol=1e-5, rtol=1e-5)
    # config rebuilds the architecture (OpenAI's ViT: clip.py alone); the state dict the model
    rebuilt = clip.build_clip(model.config)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(_features_before_proj(rebuilt, images), want, atol=1e-5, rtol=1e-5)


def test_dino_matches_timm(tmp_path):
    """timm's ViT uses DINO's names and layout: a second, independent reference."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=PATCH, embed_dim=W, depth=DEPTH, num_heads=HEADS,
        num_classes=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    model = factory.create_model("tiny", vision_ln_pre=False, vision_ln_eps=1e-6, **DINO_VIT)
    pretrained.load_dino_(model.visual, tmp_path / "timm.pth")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.forward_features(images)[:, 0]
    torch.testing.assert_close(_features_before_proj(model, images), want, atol=1e-5, rtol=1e-5)


def test_dino_resized_positions_and_errors(tmp_path):
    sd = dino_state_dict(grid=4)
    torch.save(sd, tmp_path / "dino.pth")
    model = factory.create_model("tiny", image=f"dino:{tmp_path / 'dino.pth'}",
                                    **{**DINO_VIT, "image_resolution": 48})  # grid 6
    pos = model.visual.positional_embedding
    assert pos.shape == (37, W) and torch.equal(pos[0], sd["pos_embed"][0, 0])
    constant = torch.ones(1, 17, W)  # bicubic resizing keeps a constant field constant
    torch.testing.assert_close(pretrained._resize_positions(constant[0], 6), torch.ones(37, W))
    assert model.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 16)
    plain = factory.create_model("tiny", **DINO_VIT)  # with ln_pre: DINO does not fit
    assert "vision_ln_pre=False" in _message(pretrained.load_dino_, plain.visual,
                                             tmp_path / "dino.pth")
    assert "no such file" in _message(factory.create_model, "tiny",
                                      image=f"dino:{tmp_path / 'missing.pth'}")
    assert "expected one of dino:PATH" in _message(factory.create_model, "tiny",
                                                   image="vit:x.pth")
    msg = _message(factory.create_model, "tiny", image=f"dino:{tmp_path / 'dino.pth'}",
                   **{**DINO_VIT, "vision_width": 64, "vision_heads": 4})
    assert "do not fit this VisionTransformer" in msg and "shape mismatches" in msg


# ----------------------------------------------------------------------------- HF ViT (DINO)

HW, HLAYERS, HHEADS, HPATCH, HEPS = 32, 2, 4, 8, 1e-3  # eps far from 1e-5/1e-6: reading it shows


def write_safetensors(path, tensors):
    """The safetensors layout, written by hand: an 8-byte little-endian header size, the JSON
    header {name: {dtype, shape, data_offsets}}, then the raw little-endian buffers."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def hf_vit_config(**changes):
    return {"model_type": "vit", "architectures": ["ViTModel"], "hidden_size": HW,
            "num_hidden_layers": HLAYERS, "num_attention_heads": HHEADS,
            "intermediate_size": 4 * HW, "hidden_act": "gelu", "layer_norm_eps": HEPS,
            "image_size": 32, "patch_size": HPATCH, "num_channels": 3, "qkv_bias": True, **changes}


def hf_vit_state_dict(seed=0, grid=4):
    """A ViTModel's state dict (HF names), random, with the pooler ViTModel also carries."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    e = "embeddings."
    sd = {e + "cls_token": randn(1, 1, HW), e + "position_embeddings": randn(1, 1 + grid ** 2, HW),
          e + "patch_embeddings.projection.weight": randn(HW, 3, HPATCH, HPATCH, scale=0.1),
          e + "patch_embeddings.projection.bias": randn(HW),
          "layernorm.weight": 1 + randn(HW, scale=0.1), "layernorm.bias": randn(HW, scale=0.1),
          "pooler.dense.weight": randn(HW, HW), "pooler.dense.bias": randn(HW)}
    for i in range(HLAYERS):
        p = f"encoder.layer.{i}."
        for name, (o, n) in [("attention.attention.query", (HW, HW)),
                             ("attention.attention.key", (HW, HW)),
                             ("attention.attention.value", (HW, HW)),
                             ("attention.output.dense", (HW, HW)),
                             ("intermediate.dense", (4 * HW, HW)), ("output.dense", (HW, 4 * HW))]:
            sd[p + name + ".weight"] = randn(o, n, scale=n ** -0.5)
            sd[p + name + ".bias"] = randn(o, scale=0.1)
        for name in ("layernorm_before", "layernorm_after"):
            sd[p + name + ".weight"] = 1 + randn(HW, scale=0.1)
            sd[p + name + ".bias"] = randn(HW, scale=0.1)
    return sd


def hf_vit_reference(sd, images):
    """HF's ViTModel written out from its definitions: last_hidden_state[:, 0], (B, W)."""
    def ln(x, name):
        return F.layer_norm(x, (HW,), sd[name + ".weight"], sd[name + ".bias"], eps=HEPS)

    def linear(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    e = "embeddings."
    x = F.conv2d(images, sd[e + "patch_embeddings.projection.weight"],
                 sd[e + "patch_embeddings.projection.bias"], stride=HPATCH)
    x = x.flatten(2).transpose(1, 2)  # (B, N, W)
    B, N = x.shape[0], x.shape[1] + 1
    x = torch.cat([sd[e + "cls_token"].expand(B, -1, -1), x], dim=1)
    x = x + sd[e + "position_embeddings"]  # (B, 1 + N, W)
    d = HW // HHEADS
    for i in range(HLAYERS):
        p = f"encoder.layer.{i}."
        h = ln(x, p + "layernorm_before")
        q, k, v = (linear(h, p + "attention.attention." + n).view(B, N, HHEADS, d).transpose(1, 2)
                   for n in ("query", "key", "value"))  # (B, H, N, d)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(B, N, HW)
        x = linear(context, p + "attention.output.dense") + x
        h = ln(x, p + "layernorm_after")
        x = linear(F.gelu(linear(h, p + "intermediate.dense")), p + "output.dense") + x
    return ln(x, "layernorm")[:, 0]


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hf_vit_matches_reference(tmp_path, weights):
    sd = hf_vit_state_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf_vit_config()))
    if weights == "model.safetensors":
        write_safetensors(tmp_path / weights, sd)
    else:  # ViTForImageClassification-style: "vit." prefixes and a classifier, all dropped
        torch.save({**{"vit." + k: v for k, v in sd.items()},
                    "classifier.weight": torch.zeros(3, HW)}, tmp_path / weights)
    model = factory.create_model("ViT-S-16", image=f"hf-vit:{tmp_path}", image_resolution=32,
                                    embed_dim=HW, **TEXT).eval()
    assert model.config["vision_width"] == HW and model.config["vision_ln_eps"] == HEPS
    assert model.config["act"] == "gelu" and isinstance(model.visual.ln_pre, nn.Identity)
    with torch.no_grad():
        model.visual.proj.copy_(torch.eye(HW))  # proj = identity: the class token's feature
    images = torch.randn(2, 3, 32, 32)
    want = hf_vit_reference(sd, images)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), want, atol=1e-5, rtol=1e-5)
    rebuilt = clip.build_clip(model.config).eval()  # an OpenAI-layout ViT: clip.py rebuilds it
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(images), want, atol=1e-5, rtol=1e-5)
        model.visual.tome_r = 2  # ToMe and FLIP still run on it
        assert model.encode_image(images).shape == (2, HW)
    flip = factory.create_model("ViT-S-16", image=f"hf-vit:{tmp_path}", image_resolution=48,
                                   embed_dim=HW, patch_dropout=0.5, **TEXT)  # positions resized
    assert flip.visual.positional_embedding.shape == (37, HW)
    assert flip.train().encode_image(torch.randn(2, 3, 48, 48)).shape == (2, HW)


def test_hf_vit_errors_are_one_line(tmp_path):
    def create(folder, **kw):
        return factory.create_model("ViT-S-16", image=f"hf-vit:{folder}", image_resolution=32,
                                       embed_dim=HW, **TEXT, **kw)

    assert "config.json: no such file" in _message(create, tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps(hf_vit_config(model_type="bert")))
    assert "model_type 'bert', expected 'vit'" in _message(create, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_vit_config()))
    assert "model.safetensors: no such file, nor pytorch_model.bin" in _message(create, tmp_path)
    sd = hf_vit_state_dict()
    write_safetensors(tmp_path / "model.safetensors", sd)
    (tmp_path / "config.json").write_text(json.dumps(hf_vit_config(hidden_size=64,
                                                                     intermediate_size=256)))
    msg = _message(create, tmp_path)
    assert "model.safetensors: weights do not fit" in msg and "shape mismatches" in msg
    (tmp_path / "config.json").write_text(json.dumps(hf_vit_config()))
    write_safetensors(tmp_path / "model.safetensors",
                      {k: v for k, v in sd.items() if k != "embeddings.cls_token"})
    assert "no 'embeddings.cls_token'" in _message(create, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")  # truncated header
    assert "cannot read the weights" in _message(create, tmp_path)


# ----------------------------------------------------------------------------- torchvision

def test_torchvision_resnet_tower(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(ref.state_dict(), tmp_path / "resnet18-test.pth")
    model = factory.create_model("RN50", image=f"tv-resnet18:{tmp_path / 'resnet18-test.pth'}",
                                    image_resolution=64, embed_dim=16, **TEXT).eval()
    assert model.config["image_tower"]["kind"] == "tv-resnet18"
    assert model.visual.resnet.fc.out_features == 16
    ref.fc = model.visual.resnet.fc  # ours: the same network with a fresh fc to D
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.eval()(images))
    torch.save({"state_dict": model.state_dict(), "model_config": model.config},
               tmp_path / "ckpt.pt")  # what train.py writes; eval_zeroshot reads it back so
    rebuilt = factory.load_checkpoint(tmp_path / "ckpt.pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(images), ref(images))
    assert "built outside clip.py" in _message(clip.build_clip, model.config)  # needs factory
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "bad.pth")
    assert "missing" in _message(pretrained.load_torchvision_resnet_, model.visual,
                                 tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="patch_dropout"):
        factory.create_model("RN50", image=f"tv-resnet18:{tmp_path / 'resnet18-test.pth'}",
                                patch_dropout=0.5)


# ----------------------------------------------------------------------------- BERT

BW, BLAYERS, BHEADS, BVOCAB, BPOS = 32, 2, 2, 50, 40


def bert_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    sd = {"bert.embeddings.word_embeddings.weight": randn(BVOCAB, BW),
          "bert.embeddings.position_embeddings.weight": randn(BPOS, BW),
          "bert.embeddings.token_type_embeddings.weight": randn(2, BW),
          "bert.embeddings.LayerNorm.gamma": 1 + randn(BW, scale=0.1),  # TF-era names
          "bert.embeddings.LayerNorm.beta": randn(BW, scale=0.1),
          "bert.embeddings.position_ids": torch.arange(BPOS)[None],
          "bert.pooler.dense.weight": randn(BW, BW), "bert.pooler.dense.bias": randn(BW),
          "cls.predictions.bias": randn(BVOCAB)}
    for i in range(BLAYERS):
        p = f"bert.encoder.layer.{i}."
        for name, (o, n) in [("attention.self.query", (BW, BW)), ("attention.self.key", (BW, BW)),
                             ("attention.self.value", (BW, BW)),
                             ("attention.output.dense", (BW, BW)),
                             ("intermediate.dense", (4 * BW, BW)), ("output.dense", (BW, 4 * BW))]:
            sd[p + name + ".weight"] = randn(o, n, scale=n ** -0.5)
            sd[p + name + ".bias"] = randn(o, scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + name + ".weight"] = 1 + randn(BW, scale=0.1)
            sd[p + name + ".bias"] = randn(BW, scale=0.1)
    return sd


def bert_reference(sd, ids):
    """BERT written out: post-LN, erf GELU, padding keys (id 0) masked. -> (B, L, W)."""
    def ln(x, w, b):
        return F.layer_norm(x, (BW,), w, b, eps=1e-12)

    def linear(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    e = "bert.embeddings."
    B, L = ids.shape
    x = (sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][:L]
         + sd[e + "token_type_embeddings.weight"][0])
    x = ln(x, sd[e + "LayerNorm.gamma"], sd[e + "LayerNorm.beta"])
    d = BW // BHEADS
    for i in range(BLAYERS):
        p = f"bert.encoder.layer.{i}."

        def heads(t):
            return t.view(B, L, BHEADS, d).transpose(1, 2)  # (B, H, L, d)

        q, k, v = (heads(linear(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        scores = scores.masked_fill((ids == 0)[:, None, None, :], float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, BW)
        a = p + "attention.output."
        x = ln(x + linear(ctx, a + "dense"), sd[a + "LayerNorm.weight"], sd[a + "LayerNorm.bias"])
        h = F.gelu(linear(x, p + "intermediate.dense"))
        x = ln(x + linear(h, p + "output.dense"),
               sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"])
    return x


@pytest.fixture
def bert_dir(tmp_path):
    torch.save(bert_state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": BHEADS, "hidden_act": "gelu", "intermediate_size": 4 * BW}))
    (tmp_path / "vocab.txt").write_text("".join(f"{t}\n" for t in VOCAB))
    return tmp_path


def bert_ids():
    ids = torch.tensor([[2, 7, 8, 9, 10, 3, 0, 0, 0, 0],
                        [2, 11, 12, 3, 0, 0, 0, 0, 0, 0]])
    return ids


def test_bert_matches_reference(bert_dir):
    model = factory.create_model("tiny", text=f"bert:{bert_dir}", context_length=12,
                                    eot_id=3)
    assert model.config["text_tower"]["kind"] == "bert" and model.vocab_size == BVOCAB
    assert not hasattr(model, "token_embedding") and not hasattr(model, "transformer")
    assert isinstance(model.text, bert.BertModel) and model.context_length == 12
    ids = bert_ids()
    want = bert_reference(bert_state_dict(), ids)
    with torch.no_grad():
        z, tokens = model.encode_text(ids, return_tokens=True)
    real = ids != 0
    torch.testing.assert_close(tokens[real], want[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, want[:, 0] @ model.text_projection, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # padding changes nothing; the tower is bidirectional
        longer = torch.cat([ids, torch.zeros(2, 2, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model.encode_text(longer), z, atol=1e-6, rtol=1e-5)
        changed = ids.clone()
        changed[0, 4] = 20
        assert not torch.allclose(model.encode_text(changed)[0], z[0], atol=1e-4)
    rebuilt = factory.from_config(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_text(ids), z, atol=0, rtol=0)
    assert "vocab_size=30" in _message(factory.create_model, "tiny", text=f"bert:{bert_dir}",
                                       context_length=12, vocab_size=30)
    assert "positions BERT was trained with" in _message(
        factory.create_model, "tiny", text=f"bert:{bert_dir}", context_length=77)
    assert "no BERT weights" in _message(bert.load_hf_bert, bert_dir / "nothing")


def test_read_safetensors_matches_library(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).half()}
    safetensors.save_file(sd, tmp_path / "model.safetensors")
    got = bert.read_safetensors(tmp_path / "model.safetensors")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


# ----------------------------------------------------------------------------- WordPiece

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",  # 0-4
         "a", "photo", "of", "the", "cat",               # 5-9
         "un", "##aff", "##able", "play", "##ing",       # 10-14
         ",", ".", "!", "cafe", "你",                     # 15-19
         "好", "##s", "dog", "'", "##a"]                  # 20-24


def test_wordpiece_hand_worked():
    tok = bert.WordPieceTokenizer(VOCAB)
    assert (tok.pad_id, tok.unk_id, tok.sot_id, tok.eot_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 25
    cases = {
        "A photo of the cat.": [5, 6, 7, 8, 9, 16],
        "unaffable": [10, 11, 12],                     # ## pieces, longest match first
        "Playing!": [13, 14, 17],
        "cats,dog": [9, 21, 15, 22],                   # punctuation split off inside a word
        "Café": [18],                                  # lower-cased, accent stripped
        "你好cat": [19, 20, 9],                        # CJK characters are words of their own
        "playx the": [1, 8],                           # not fully covered: the whole word is UNK
        "xyz": [1],
        "the\tcat\x00\u200b 's": [8, 9, 23, 1],        # controls dropped, tab is a space
        "a" * 100: [5] + [24] * 99,
        "a" * 101: [1],                                # longer than 100 characters
        "": [],
    }
    for text, ids in cases.items():
        assert tok.encode(text) == ids, text
    assert tok.decode([2, 10, 11, 12, 13, 14, 4, 3, 9, 0]) == "unaffable playing"
    cased = bert.WordPieceTokenizer(VOCAB + ["Cat"], lower_case=False)
    assert cased.encode("Cat cat Café") == [25, 9, 1]


def test_wordpiece_batch_and_files(tmp_path):
    tok = bert.WordPieceTokenizer(VOCAB)
    ids = tok(["a photo of the cat.", "unaffable"], context_length=8)
    assert ids.tolist() == [[2, 5, 6, 7, 8, 9, 16, 3], [2, 10, 11, 12, 3, 0, 0, 0]]
    assert tok("a photo of the cat.", context_length=6).tolist() == [[2, 5, 6, 7, 8, 3]]
    tok.save(tmp_path / "vocab.txt")
    again = bert.WordPieceTokenizer.from_vocab(tmp_path / "vocab.txt")
    assert again.vocab == VOCAB and again.lower_case
    (tmp_path / "cased.txt").write_text("".join(f"{t}\n" for t in VOCAB + ["Cat"]))
    assert not bert.WordPieceTokenizer.from_vocab(tmp_path / "cased.txt").lower_case
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    assert not bert.WordPieceTokenizer.from_pretrained(tmp_path).lower_case
    assert "no such vocabulary file" in _message(bert.WordPieceTokenizer.from_vocab,
                                                 tmp_path / "missing.txt")
    assert "[MASK]" in _message(bert.WordPieceTokenizer, VOCAB[:4])
