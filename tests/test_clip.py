"""Tests for clip.py and factory.py: presets, OpenAI/OpenCLIP equivalence, checkpoints,
pooling, masking, composition."""
import ast
import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
import factory

# OpenAI's models as counted by open_clip (vocab 49408); verified against open_clip 3.3.0.
OPENAI_PARAMS = {"RN50": 102_007_137, "RN101": 119_688_033, "ViT-B-32": 151_277_313,
                 "ViT-B-16": 149_620_737, "ViT-S-16": 62_257_537}
SMALL = dict(vocab_size=100, eot_id=99)  # a small vocabulary keeps checkpoint tests fast


def text_ids(B, L, vocab=100, seed=0):
    """[SOT] random tokens [EOT] zero padding, OpenAI style: EOT = vocab - 1 is the largest id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 2, (B, L), generator=g)
    ids[:, 0] = vocab - 2
    ends = torch.randint(2, L, (B,), generator=g)
    for b, e in enumerate(ends.tolist()):
        ids[b, e] = vocab - 1
        ids[b, e + 1:] = 0
    return ids


def randomize_(model, seed=0):
    """Perturb every float tensor so no part of the network is trivially zero (e.g. bn3 weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g) * 0.05
            t.copy_(1 + noise.abs() if name.endswith("running_var") else t + noise)
    return model


@pytest.mark.parametrize("name", list(factory.PRESETS))
def test_presets_shapes_and_param_counts(name):
    with torch.device("meta"):  # shapes without allocating weights
        model = factory.create_model(name, vocab_size=49408)
        r, n_ctx = model.visual.input_resolution, model.context_length
        z_img = model.encode_image(torch.empty(2, 3, r, r))
        ids = torch.zeros(2, n_ctx, dtype=torch.long)
        z_txt, tokens = model.encode_text(ids, return_tokens=True)
    D, W = model.config["embed_dim"], model.config["transformer_width"]
    assert z_img.shape == z_txt.shape == (2, D) and tokens.shape == (2, n_ctx, W)
    if name in OPENAI_PARAMS:
        assert sum(p.numel() for p in model.parameters()) == OPENAI_PARAMS[name]
    assert factory.PRESETS[name]["act"] == ("gelu" if name in ("ViT-S-16", "tiny", "tiny-rn")
                                         else "quick_gelu")


def test_tiny_preset_and_logit_scale():
    model = factory.create_model("tiny")
    assert model.vocab_size == 49409 and len(model.visual.transformer.resblocks) == 3
    assert model.visual.transformer.resblocks[0].attn.heads == 4
    assert model.logit_scale.shape == ()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    z_img, z_txt, scale = model(torch.randn(2, 3, 64, 64), text_ids(2, 32, vocab=49408))
    assert z_img.norm(dim=-1).allclose(torch.ones(2)) and z_txt.norm(dim=-1).allclose(torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    rebuilt = clip.build_clip(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    with pytest.raises(ValueError, match="unknown model 'ViT-X'"):
        factory.create_model("ViT-X")


# ------------------------------------------------------------------------ open_clip equivalence

def _open_clip_small(resnet, quick_gelu=True):
    open_clip = pytest.importorskip("open_clip")
    vision = (dict(layers=(1, 2, 1, 1), width=16, image_size=64, head_width=64) if resnet else
              dict(layers=2, width=64, patch_size=16, image_size=64, head_width=16))
    text = dict(context_length=16, vocab_size=100, width=128, heads=2, layers=2)
    torch.manual_seed(0)
    return randomize_(open_clip.model.CLIP(32, vision, text, quick_gelu=quick_gelu)).eval()


@pytest.mark.parametrize("resnet,act",
                         [(True, "quick_gelu"), (False, "quick_gelu"), (False, "gelu")])
def test_matches_open_clip_small(resnet, act):
    ref = _open_clip_small(resnet, quick_gelu=act == "quick_gelu")
    extra = {} if resnet else dict(vision_heads=4)  # head width 16: OpenAI's width / 64 rule fails
    ours = factory.build_model(ref.state_dict(), act=act, eot_id=99, **extra)
    images, ids = torch.randn(2, 3, 64, 64), text_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.encode_image(images),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(ids), ref.encode_text(ids),
                                   atol=1e-5, rtol=1e-5)
    if act == "quick_gelu":  # the wrong activation must be visible, or this test proves nothing
        wrong = factory.build_model(ref.state_dict(), act="gelu", eot_id=99, **extra)
        assert not torch.allclose(wrong.encode_text(ids), ref.encode_text(ids), atol=1e-4)


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_matches_open_clip_full(name):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    ref = open_clip.create_model(name, pretrained=None, force_quick_gelu=True).eval()
    sd = ref.state_dict()
    with torch.device("meta"):
        preset = factory.create_model(name, vocab_size=49408)
    expected = {k: v.shape for k, v in preset.state_dict().items()}
    assert {k: v.shape for k, v in sd.items()} == expected  # OpenAI's names and shapes
    with torch.no_grad():  # bn3 weights start at zero: make every residual branch count
        for k, v in sd.items():
            if k.endswith("bn3.weight"):
                v.normal_(0, 0.2)
    ours = factory.build_model(sd)
    assert ours.config["vision_layers"] == ((3, 4, 6, 3) if name == "RN50" else 12)
    assert ours.config["act"] == "quick_gelu" and ours.vocab_size == 49408
    images, ids = torch.randn(2, 3, 224, 224), text_ids(2, 77, vocab=49408)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.encode_image(images),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.encode_text(ids), ref.encode_text(ids),
                                   atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def small_vit():
    return randomize_(factory.create_model("tiny", **SMALL)).eval()


def _outputs(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(2, 3, 64, 64), text_ids(2, 32))


def test_load_checkpoint_formats(small_vit, tmp_path):
    expected = _outputs(small_vit)
    sd = small_vit.state_dict()
    ours = {"state_dict": sd, "model_config": small_vit.config, "step": 3}
    openclip = {"epoch": 1, "state_dict": {"module." + k: v.reshape(1) if k == "logit_scale" else v
                                           for k, v in sd.items()}}  # DDP prefix, logit_scale [1]
    declip = {"state_dict": {**{"clip." + k: v for k, v in sd.items()}, "mlm.w": torch.ones(2)},
              "model_config": small_vit.config}  # a whole DeCLIP module's state dict
    for i, obj in enumerate([ours, openclip, sd, declip]):
        torch.save(obj, tmp_path / f"{i}.pt")
        # plain and OpenCLIP dicts carry no config: OpenAI's rules give 2 heads, so say 4
        extra = {} if "model_config" in obj else dict(transformer_heads=4, vision_heads=4,
                                                      act="gelu", eot_id=99)
        model = factory.load_checkpoint(tmp_path / f"{i}.pt", **extra)
        assert not model.training and model.logit_scale.shape == ()
        for a, b in zip(_outputs(model), expected):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # OpenAI's rules alone (heads = width / 64) load the weights but compute something else
    openai_rules = factory.load_checkpoint(tmp_path / "2.pt", eot_id=99)
    assert not torch.allclose(_outputs(openai_rules)[1], expected[1], atol=1e-3)


def test_load_torchscript_archive(small_vit, tmp_path):
    """An OpenAI-style JIT archive: traced model, same names, plus three metadata buffers."""
    expected = _outputs(small_vit)
    model = clip.build_clip(small_vit.config).eval()
    model.load_state_dict(small_vit.state_dict())
    for k, v in (("input_resolution", 64), ("context_length", 32), ("vocab_size", 100)):
        model.__dict__.pop(k, None)  # plain attributes in our model; tensors in OpenAI's archives
        model.register_buffer(k, torch.tensor(v))
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(2, 3, 64, 64), text_ids(2, 32)),
                                 check_trace=False)
    torch.jit.save(traced, tmp_path / "jit.pt")
    loaded = factory.load_checkpoint(tmp_path / "jit.pt", transformer_heads=4, vision_heads=4,
                                  act="gelu", eot_id=99)
    for a, b in zip(_outputs(loaded), expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_build_model_extends_vocab(small_vit):
    model = factory.build_model(small_vit.state_dict(), vocab_size=101, transformer_heads=4,
                             vision_heads=4, act="gelu", eot_id=99)
    emb = model.token_embedding.weight
    assert emb.shape[0] == 101 and torch.equal(emb[:100], small_vit.token_embedding.weight)
    assert emb[100].abs().sum() > 0  # the new (mask) row is initialised, not zero


def _error(fn, *args, **kwargs):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_errors_are_one_clear_line(small_vit, tmp_path):
    assert "no such checkpoint file" in _error(factory.load_checkpoint, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot read the checkpoint" in _error(factory.load_checkpoint, tmp_path / "junk.pt")
    torch.save({"fc.weight": torch.zeros(3), "conv1.weight": torch.zeros(3)}, tmp_path / "rn.pt")
    assert "not a CLIP model" in _error(factory.load_checkpoint, tmp_path / "rn.pt")
    sd = dict(small_vit.state_dict())
    sd.pop("ln_final.bias")
    sd["visual.extra"] = torch.zeros(1)
    msg = _error(factory.build_model, sd, eot_id=99)
    assert "1 missing keys (ln_final.bias)" in msg and "1 unexpected keys (visual.extra)" in msg
    sd = {**small_vit.state_dict(), "text_projection": torch.zeros(128, 64)}
    torch.save({"state_dict": sd, "model_config": small_vit.config}, tmp_path / "shape.pt")
    assert "text_projection (128, 64) vs (128, 128)" in _error(factory.load_checkpoint,
                                                                tmp_path / "shape.pt")
    assert "context_length is 32" in _error(small_vit.encode_text, text_ids(1, 40))


# ------------------------------------------------------------------------ text tower

def test_eot_pooling_by_equality(small_vit):
    ids = torch.tensor([[98, 5, 7, 99, 0, 0, 0, 0],     # EOT at 3
                        [98, 5, 100, 8, 99, 0, 0, 0],   # a mask-like id (> EOT) before EOT at 4
                        [98, 99, 6, 99, 0, 0, 0, 0]])  # two EOTs: the first one counts
    model = clip.build_clip({**small_vit.config, "vocab_size": 101})  # 100 plays DeCLIP's mask id
    with torch.no_grad():
        z, tokens = model.encode_text(ids, return_tokens=True)
        manual = tokens[torch.arange(3), torch.tensor([3, 4, 1])] @ model.text_projection
        torch.testing.assert_close(z, manual)
        torch.testing.assert_close(model.encode_text(ids), z)  # EOT-only LayerNorm path
        argmax = tokens[torch.arange(3), ids.argmax(1)] @ model.text_projection
    assert not torch.allclose(argmax[1], z[1])


def test_causal_mask(small_vit):
    ids = text_ids(2, 32)
    changed = ids.clone()
    changed[:, 5] = 42 + (ids[:, 5] == 42).long()
    with torch.no_grad():
        _, a = small_vit.encode_text(ids, return_tokens=True)
        _, b = small_vit.encode_text(changed, return_tokens=True)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=0, rtol=0)
    n = int((ids == small_vit.eot_id).int().argmax(dim=1).max()) + 1  # tokens up to the last EOT
    assert (a[:, 5:n] - b[:, 5:n]).abs().amax(dim=-1).min() > 1e-4  # every later token sees it
    assert not a[:, n:].any()  # past the batch's last EOT the tower does not run: zeros


def test_text_tower_skips_padding_after_the_last_eot(small_vit):
    """A caption's feature does not depend on how long the other captions of its batch are."""
    ids = text_ids(2, 32)
    long = ids[1:].clone()
    long[0, -1] = small_vit.eot_id  # EOT in the last position: the tower runs on all 32 tokens
    long[0, (long[0] == small_vit.eot_id).int().argmax()] = 42
    with torch.no_grad():
        alone = small_vit.encode_text(ids[:1])  # runs on a short prefix
        in_long_batch = small_vit.encode_text(torch.cat([ids[:1], long]))[:1]
    torch.testing.assert_close(alone, in_long_batch, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------ image tower

@pytest.mark.parametrize("N,p", [(64, 0.5), (64, 0.75), (49, 0.5), (3, 0.9)])
def test_patch_dropout_keeps_random_patches(N, p):
    x = torch.randn(4, 1 + N, 8)
    drop = clip.PatchDropout(p).train()
    y = drop(x)
    keep = max(1, int(N * (1 - p)))
    assert y.shape == (4, 1 + keep, 8)
    assert torch.equal(y[:, 0], x[:, 0])  # class token kept
    # each kept row is a distinct patch of the same sample
    match = (y[:, 1:, None, :] == x[:, None, 1:, :]).all(-1)  # (B, keep, N)
    assert (match.sum(-1) == 1).all() and (match.any(1).sum(-1) == keep).all()
    assert torch.equal(drop.eval()(x), x) and torch.equal(clip.PatchDropout(0.0).train()(x), x)


def test_patch_dropout_in_model(small_vit):
    model = clip.build_clip({**small_vit.config, "patch_dropout": 0.5})
    model.load_state_dict(small_vit.state_dict())
    images = torch.randn(2, 3, 64, 64)
    seen = []
    model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images),
                                   small_vit.encode_image(images), atol=0, rtol=0)
        a, b = model.train().encode_image(images), model.encode_image(images)
    assert seen == [65, 33, 33] and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="patch_dropout"):
        factory.create_model("RN50", patch_dropout=0.5)


def test_attention_hook_is_proportional_attention():
    """ToMe's log(size) bias on a token equals attending to that many copies of it."""
    torch.manual_seed(0)
    attn = clip.Attention(32, 4)
    x = torch.randn(2, 6, 32)
    out, keys = attn(x, return_keys=True)
    assert keys.shape == (2, 4, 6, 8)
    torch.testing.assert_close(out, attn(x, attn_bias=torch.zeros(2, 1, 1, 6)))
    bias = torch.zeros(2, 1, 1, 6)
    bias[..., 2] = math.log(3)
    copies = attn(torch.cat([x, x[:, 2:3], x[:, 2:3]], dim=1))[:, :6]
    torch.testing.assert_close(attn(x, attn_bias=bias), copies, atol=1e-6, rtol=1e-5)


def test_attention_plain_path_in_bf16_is_sdpa():
    """On CPU in bf16, clip.attention computes with plain ops what F.scaled_dot_product_attention
    computes (causal, or with an additive bias): outputs and gradients equal fp32 SDPA's
    to bf16's rounding (8 significant bits: 2^-9 relative per input; atol 0.03 on values and
    gradients of order 1); in fp32 it is SDPA itself."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, generator=g) for _ in range(3))
    bias = torch.randn(3, 1, 1, 7, generator=g)
    for causal, mask in ((True, None), (False, bias), (False, None)):
        exact = [t.clone().requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*exact, attn_mask=mask, is_causal=causal)
        out.backward(torch.ones_like(out))
        low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        ours = clip.attention(*low, attn_mask=None if mask is None else mask.bfloat16(),
                              is_causal=causal)
        assert ours.dtype == torch.bfloat16
        ours.float().backward(torch.ones_like(out))
        torch.testing.assert_close(ours.float(), out, atol=3e-2, rtol=0)
        for a, b in zip(low, exact):
            torch.testing.assert_close(a.grad.float(), b.grad, atol=3e-2, rtol=0)
        assert torch.equal(clip.attention(q, k, v, mask, causal),
                           F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal))


def test_resnet_init_and_train_step():
    model = clip.build_clip(dict(
        embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
        vision_patch_size=None, context_length=8, vocab_size=100, transformer_width=32,
        transformer_heads=2, transformer_layers=1, eot_id=99))
    assert all(b.bn3.weight.eq(0).all() for b in model.visual.layer2)  # OpenAI: zero-init bn3
    z_img, z_txt, scale = model(torch.randn(2, 3, 64, 64), text_ids(2, 8))
    (scale * z_img @ z_txt.T).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(small_vit, dtype):
    model = clip.build_clip({**small_vit.config, "patch_dropout": 0.5})
    model.load_state_dict(small_vit.state_dict())
    images, ids = torch.randn(2, 3, 64, 64), text_ids(2, 32)
    with torch.autocast("cpu", dtype=dtype):
        z_img, z_txt, scale = model(images, ids)
        loss = F.cross_entropy(scale * z_img @ z_txt.T, torch.arange(2))
    loss.backward()
    assert z_img.dtype == dtype and torch.isfinite(loss)
    assert model.visual.conv1.weight.grad.dtype == torch.float32  # weights stay fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        low = model.eval().encode_text(ids, normalize=True).float()
    torch.testing.assert_close(low, small_vit.encode_text(ids, normalize=True), atol=3e-2, rtol=0)


# ------------------------------------------------------------------------ the tower contract

class MeanText(nn.Module):
    """A text tower of the contract, as small as can be: each token plus the mean of all."""

    def __init__(self, vocab_size=50, context_length=12, width=24):
        super().__init__()
        self.width, self.context_length, self.vocab_size = width, context_length, vocab_size
        self.config = dict(kind="mean-text", vocab_size=vocab_size,
                           context_length=context_length, width=width)
        self.emb = nn.Embedding(vocab_size, width)
        self.mix = nn.Linear(width, width)

    def forward(self, ids):  # (B, L) -> (B, L, W)
        x = self.emb(ids)
        return x + self.mix(x.mean(dim=1, keepdim=True))


class LastTokenText(MeanText):
    def pool(self, tokens, ids):  # the contract's optional pooling: here the last token
        return tokens[:, -1]


def _rebuild_mean_text(config):
    return MeanText(**{k: v for k, v in config.items() if k != "kind"})


def test_module_text_tower_keeps_the_contract():
    embed_dim, vision, _ = clip.split_config(factory.PRESETS["tiny"])
    torch.manual_seed(0)
    text = MeanText()
    model = clip.CLIP(embed_dim, vision, text).eval()
    assert (model.context_length, model.vocab_size, model.text_width) == (12, 50, 24)
    assert model.config["text_tower"] == text.config and "vocab_size" not in model.config
    names = set(model.state_dict())
    assert {"text.emb.weight", "visual.conv1.weight", "text_projection"} <= names
    assert not any(n.startswith(("token_embedding", "transformer.", "ln_final")) for n in names)
    ids = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        z, tokens = model.encode_text(ids, return_tokens=True)
        torch.testing.assert_close(tokens, text(ids))
        torch.testing.assert_close(z, text(ids)[:, 0] @ model.text_projection)  # position 0
        z_img, z_txt, _ = model(torch.randn(3, 3, 64, 64), ids)
    assert z_img.shape == z_txt.shape == (3, embed_dim)
    # config rebuilds it, given the builder of its kind (factory.build_tower in the project)
    msg = _error(clip.build_clip, model.config)
    assert "'mean-text', built outside clip.py" in msg
    rebuilt = clip.build_clip(model.config, _rebuild_mean_text).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_text(ids), z, atol=0, rtol=0)
    last = clip.CLIP(embed_dim, vision, LastTokenText())
    with torch.no_grad():
        torch.testing.assert_close(last.encode_text(ids),
                                   last.text(ids)[:, -1] @ last.text_projection)


def test_composition_errors_are_one_line():
    embed_dim, vision, text = clip.split_config(factory.PRESETS["tiny"])
    assert "unknown CLIP setting vision_depth" in _error(factory.create_model, "tiny",
                                                            vision_depth=3)
    assert "maps to 128 dimensions but embed_dim is 64" in _error(
        clip.CLIP, 64, clip.build_image_tower(128, **vision), text)
    assert "share one act" in _error(clip.CLIP, embed_dim, {**vision, "act": "quick_gelu"}, text)
    assert "lacks width, context_length, vocab_size, config" in _error(
        clip.CLIP, embed_dim, vision, nn.Embedding(10, 4))


def test_clip_needs_torch_only_and_files_import_no_cycle():
    """clip.py imports torch and the standard library (ToMe's file only inside the ToMe path);
    no files of the project import each other, even lazily inside a function; one factory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    project = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    graph, top_level = {}, {}
    for name in project:
        with open(os.path.join(root, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())

        def imported(nodes):
            return {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import)
                    for a in n.names} | {n.module.split(".")[0] for n in nodes
                                         if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = imported(ast.walk(tree)) & project
        top_level[name] = imported(tree.body)
    assert top_level["clip"] <= {"contextlib", "math", "collections", "torch"}
    assert graph["clip"] == {"tome"} and graph["tome"] == set()
    # factory.py: clip.py at import; the towers' files (bert, xlmr) only when a tower is asked for
    assert top_level["factory"] & project == {"clip"}
    defined = {}  # model-making functions: one definition each in the project, all in factory.py
    for name in project:
        with open(os.path.join(root, name + ".py"), encoding="utf-8") as f:
            for node in ast.parse(f.read()).body:
                if isinstance(node, ast.FunctionDef):
                    defined.setdefault(node.name, []).append(name)
    for fn in ("create_model", "from_config", "load_checkpoint"):
        assert defined[fn] == ["factory"], (fn, defined[fn])
    done, path = set(), []

    def visit(name):  # depth-first search; a name on the current path again is a cycle
        assert name not in path, "import cycle: " + " -> ".join(path + [name])
        if name not in done:
            path.append(name)
            for dep in sorted(graph[name]):
                visit(dep)
            path.pop()
            done.add(name)

    for name in sorted(project):
        visit(name)


def _grads_and_buffers(model, images, ids):
    z_img, z_txt, scale = model(images, ids)
    loss = (scale * z_img @ z_txt.T).logsumexp(dim=1).mean() - (scale * (z_img * z_txt).sum(1)).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("name,overrides", [
    ("tiny-rn", {}),                                        # ModifiedResNet: BatchNorm inside
    ("tiny", {}),                                           # ViT + text Transformer
    ("tiny-rn", {"image_tower": dict(kind="tv-resnet18", arch="resnet18", output_dim=128,
                                     input_resolution=64)}),  # torchvision's ResNet
])
def test_grad_checkpointing_changes_nothing_but_memory(name, overrides):
    """Same loss, gradients (1e-6) and BatchNorm statistics with activation checkpointing; and
    it really checkpoints: autograd keeps fewer tensors for backward."""
    torch.manual_seed(0)
    config = {**factory.PRESETS[name], "vocab_size": 300, "transformer_layers": 2,
              "transformer_width": 32, "image_resolution": 32, **overrides}
    if "image_tower" in config:
        config["image_tower"] = {**config["image_tower"], "input_resolution": 32}
    plain = factory.from_config(config).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(1, 298, (4, 12))
    ids[:, -1] = 299
    plain.eot_id = ckpt.eot_id = 299 if plain.text is None else None
    loss_a, grads_a, bufs_a = _grads_and_buffers(plain, images, ids)
    loss_b, grads_b, bufs_b = _grads_and_buffers(ckpt, images, ids)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n
    for n in bufs_a:  # running statistics updated once, not again by the recomputation
        assert torch.equal(bufs_a[n], bufs_b[n]), n

    def saved_bytes(model):
        total = []
        def pack(t):
            total.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z_img, z_txt, _ = model(images, ids)
        return sum(total)
    assert saved_bytes(ckpt) < 0.7 * saved_bytes(plain)


def test_grad_checkpointing_compiles():
    """torch.compile traces checkpointed blocks (no context_fn inside a compiled graph) and
    gives the eager gradients and BatchNorm statistics."""
    torch.manual_seed(0)
    config = {**factory.PRESETS["tiny-rn"], "vocab_size": 300, "transformer_layers": 1,
              "transformer_width": 32, "image_resolution": 32}
    model = clip.build_clip(config).train()
    model.set_grad_checkpointing(True)
    eager = copy.deepcopy(model)
    images = torch.randn(4, 3, 32, 32)
    torch.compile(model.encode_image, backend="aot_eager")(images).square().sum().backward()
    eager.encode_image(images).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), n
    for (n, b), c in zip(model.named_buffers(), eager.buffers()):
        assert torch.equal(b, c), n
