"""Tests for optim.py: LiT locking (bodies and BatchNorm frozen), AdamW's parameter groups per
tower, the gradient norm that clips and checks finiteness, the lr schedule, undoing a bad step."""
import pytest
import torch
import torch.nn as nn

import bert
import clip
import factory
import optim

TEXT = dict(context_length=16, vocab_size=100, eot_id=99, transformer_width=32,
            transformer_heads=2, transformer_layers=1)
BW, BHEADS, BVOCAB = 32, 2, 50


def _small_resnet_clip():
    return clip.build_clip(dict(embed_dim=16, image_resolution=64, vision_layers=(1, 1, 1, 1),
                                 vision_width=8, vision_patch_size=None, **TEXT))


def test_lock_tower_freezes_body_and_batchnorm():
    model = _small_resnet_clip()
    optim.lock_tower(model, "image")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith("visual.") and not n.startswith("visual.attnpool.c_proj.")}
    optim.train_mode(model)
    assert model.training and model.transformer.training
    assert not model.visual.bn1.training and not model.visual.layer1[0].bn3.training
    before = model.visual.bn1.running_mean.clone()
    z_img, z_txt, scale = model(torch.randn(2, 3, 64, 64), torch.randint(1, 99, (2, 16)))
    (scale * z_img @ z_txt.T).logsumexp(1).mean().backward()
    assert torch.equal(model.visual.bn1.running_mean, before)  # statistics frozen
    assert model.visual.conv1.weight.grad is None
    assert model.visual.attnpool.c_proj.weight.grad is not None
    text = _small_resnet_clip()
    optim.lock_tower(text, "text", keep_proj=False)
    frozen = {n for n, p in text.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in text.named_parameters()
                      if not n.startswith("visual.") and n != "logit_scale"}


def test_param_groups():
    class Wrapper(nn.Module):  # like DeCLIP: a CLIP plus heads of its own
        def __init__(self):
            super().__init__()
            self.clip = factory.create_model("tiny", **TEXT)
            self.head = nn.Linear(16, 8)

    model = Wrapper()
    model.clip.visual.conv1.weight.requires_grad_(False)
    groups = optim.param_groups(model, lr=1e-3, wd=0.1, image_lr=1e-4, text_lr=1e-5)
    where = {id(p): g for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(where) == len(trainable) == sum(len(g["params"]) for g in groups)
    c = model.clip

    def group(p):
        g = where[id(p)]
        return g["name"], g["lr"], g["weight_decay"]

    assert id(c.visual.conv1.weight) not in where  # frozen: left out
    assert group(c.visual.transformer.resblocks[0].mlp.c_fc.weight) == ("image/decay", 1e-4, 0.1)
    assert group(c.visual.class_embedding) == ("image/no_decay", 1e-4, 0.0)
    assert group(c.visual.ln_pre.weight) == ("image/no_decay", 1e-4, 0.0)
    assert group(c.visual.proj) == ("other/decay", 1e-3, 0.1)  # projections: base lr
    assert group(c.token_embedding.weight) == ("text/decay", 1e-5, 0.1)
    assert group(c.transformer.resblocks[0].attn.in_proj_bias) == ("text/no_decay", 1e-5, 0.0)
    assert group(c.positional_embedding) == ("text/decay", 1e-5, 0.1)
    assert group(c.text_projection) == ("other/decay", 1e-3, 0.1)
    assert group(c.logit_scale) == ("other/no_decay", 1e-3, 0.0)
    assert group(model.head.weight) == ("other/decay", 1e-3, 0.1)
    assert group(model.head.bias) == ("other/no_decay", 1e-3, 0.0)
    assert all(g["base_lr"] == g["lr"] for g in groups)
    torch.optim.AdamW(groups, lr=1e-3)  # a valid optimizer specification
    embed_dim, vision, _ = clip.split_config(factory.PRESETS["tiny"])
    bert_model = clip.CLIP(embed_dim, vision, bert.BertModel(BVOCAB, 16, BW, 1, BHEADS))
    groups = optim.param_groups(bert_model, lr=1e-3, wd=0.1, text_lr=1e-5)
    ln = bert_model.text.encoder.layer[0].output.LayerNorm.weight
    assert any(ln is p for g in groups if g["name"] == "text/no_decay" for p in g["params"])
    assert any(bert_model.text_projection is p for g in groups if g["name"] == "other/decay"
               for p in g["params"])


def test_image_tower_contract_projection_decides_the_body():
    """A module image tower says which of its parameters map into the joint space: those train
    at the base lr and stay unlocked; the rest is the body (locking, image_lr)."""
    class PoolImage(nn.Module):
        projection = ("head",)

        def __init__(self):
            super().__init__()
            self.input_resolution, self.output_dim = 32, 16
            self.config = dict(kind="pool-image")
            self.stem = nn.Conv2d(3, 8, 4, stride=4)
            self.head = nn.Linear(8, 16)

        def forward(self, x):  # (B, 3, R, R) -> (B, D)
            return self.head(self.stem(x).mean(dim=(2, 3)))

    model = clip.CLIP(16, PoolImage(), {**TEXT, "act": "gelu"})
    assert model.config["image_tower"] == {"kind": "pool-image"}
    body = optim.tower_parameters(model, "image")
    assert set(body) == {"visual.stem.weight", "visual.stem.bias"}
    groups = {g["name"]: g for g in optim.param_groups(model, 1e-3, 0.1, image_lr=1e-4)}
    assert any(p is model.visual.head.weight for p in groups["other/decay"]["params"])
    optim.lock_tower(model, "image")
    assert not model.visual.stem.weight.requires_grad and model.visual.head.weight.requires_grad


def test_clip_gradients_equals_clip_grad_norm():
    """The finite check's norm, and clipping only when asked (clip_grad_norm_'s numbers)."""
    torch.manual_seed(0)
    make = lambda: [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for max_norm in (None, 0.5):
        ours, ref = make(), make()
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours[1].grad = None  # e.g. a locked tower
        ref[1].grad = None
        norm = optim.clip_gradients(ours, max_norm)
        expected = torch.nn.utils.clip_grad_norm_(ref, max_norm or float("inf"))
        assert torch.allclose(norm, expected)
        assert all(p.grad is None or torch.equal(p.grad, q.grad) for p, q in zip(ours, ref))
    ours[0].grad[0, 0] = float("nan")
    assert not torch.isfinite(optim.clip_gradients(ours))


def test_lr_schedule():
    lrs = [optim.lr_at(s, total=100, warmup=10, base_lr=1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
