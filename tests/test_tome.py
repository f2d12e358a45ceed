"""Tests for tome.py and ToMe in clip.VisionTransformer: brute force, invariants, exactness."""
import pytest
import torch
import torch.nn.functional as F

import clip
import factory
import tome


def brute_force_merge(metric, x, size, r, class_token):
    """ToMe's merge spelled out with Python loops: returns (x, size) in ToMe's token order
    (kept A tokens in position order, then the B tokens)."""
    B, N, _ = x.shape
    r = min(r, (N - int(class_token)) // 2)  # the A tokens that may merge
    if r <= 0:
        return x, size  # nothing to merge: ToMe leaves the tokens (and their order) alone
    xs, sizes = [], []
    for b in range(B):
        A, Bset = list(range(0, N, 2)), list(range(1, N, 2))
        match = {}  # A token -> (best cosine, its B token)
        for i in A:
            if class_token and i == 0:
                continue
            sims = [F.cosine_similarity(metric[b, i], metric[b, j], dim=0).item() for j in Bset]
            best = max(range(len(Bset)), key=lambda j: sims[j])
            match[i] = (sims[best], Bset[best])
        merged = sorted(match, key=lambda i: -match[i][0])[:r]
        rows, row_sizes = [], []
        for i in A:
            if i not in merged:
                rows.append(x[b, i])
                row_sizes.append(size[b, i])
        for j in Bset:
            group = [j] + [i for i in merged if match[i][1] == j]
            total = sum(size[b, k] for k in group)
            rows.append(sum(size[b, k] * x[b, k] for k in group) / total)
            row_sizes.append(total)
        xs.append(torch.stack(rows))
        sizes.append(torch.stack(row_sizes))
    return torch.stack(xs), torch.stack(sizes)


@pytest.mark.parametrize("N,r,class_token", [(9, 3, True), (10, 4, True), (10, 3, False),
                                              (7, 10, True), (8, 10, False), (9, 0, True)])
def test_matches_brute_force(N, r, class_token):
    g = torch.Generator().manual_seed(N * 10 + r)
    metric = torch.randn(3, N, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, N, 1), generator=g).double()
    x = torch.randn(3, N, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, N - min(r, (N - int(class_token)) // 2), 6, generator=g,
                    dtype=torch.float64)
    merge = tome.bipartite_soft_matching(metric, r, class_token)
    got_x, got_size = tome.merge_wavg(merge, x, size)
    want_x, want_size = brute_force_merge(metric, x, size, r, class_token)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_size, want_size)
    # gradients flow through the merged values exactly as through the explicit averages
    grad_got, = torch.autograd.grad((got_x * w).sum(), x)
    grad_want, = torch.autograd.grad((want_x * w).sum(), x)
    torch.testing.assert_close(grad_got, grad_want)


def test_class_token_never_merged():
    x = torch.randn(2, 9, 4)
    metric = torch.randn(2, 9, 4)
    metric[:, 0] = metric[:, 1]  # the class token is the best match anyone could have
    merge = tome.bipartite_soft_matching(metric, 4, class_token=True)
    y, size = tome.merge_wavg(merge, x)
    assert y.shape == (2, 5, 4)
    assert torch.equal(y[:, 0], x[:, 0]) and (size[:, 0] == 1).all()


def test_sizes_sum_to_token_count():
    g = torch.Generator().manual_seed(0)
    x, size = torch.randn(2, 65, 8, generator=g), None
    for r in (8, 8, 16, 30, 30, 30, 30, 30):  # 57 49 33 17 9 5 3 2 tokens
        merge = tome.bipartite_soft_matching(torch.randn(2, x.shape[1], 4, generator=g), r)
        x, size = tome.merge_wavg(merge, x, size)
        assert (size.sum(dim=1) == 65).all() and (size >= 1).all()
        assert torch.equal(size, size.round())  # counts of patches
    assert x.shape[1] == 2 and size[0, 0, 0] == 1  # class token + one token of 64 patches


def test_schedules():
    assert tome.decreasing_schedule(4, 3) == [8, 4, 0]
    assert tome.decreasing_schedule(8, 5) == [16, 12, 8, 4, 0]
    assert tome.remaining_tokens(65, [8, 8, 8]) == [57, 49, 41]
    assert tome.remaining_tokens(65, [40, 40, 40]) == [33, 17, 9]  # clamped to (N - 1) // 2


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return clip.VisionTransformer(64, 8, 32, 3, 4, 16).eval()  # 64 patches + class token


def _token_counts(model, images):
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
             for b in model.transformer.resblocks]
    with torch.no_grad():
        out = model(images)
    for h in hooks:
        h.remove()
    return out, seen


def test_token_count_per_block(vit):
    images = torch.randn(2, 3, 64, 64)
    for r, counts in [(8, [57, 49, 41]), ([16, 8, 0], [49, 41, 41]), (40, [33, 17, 9]),
                      (tome.decreasing_schedule(8, 3), [49, 41, 41])]:
        vit.tome_r = r
        _, seen = _token_counts(vit, images)
        assert seen == counts, (r, seen)
    vit.tome_r = 0
    with pytest.raises(ValueError, match="one per block"):
        vit.tome_r = [1, 2]
        vit(images)
    vit.tome_r = 0


def test_r_zero_is_exactly_unchanged(vit):
    images = torch.randn(2, 3, 64, 64)
    vit.tome_r = 0
    with torch.no_grad():
        plain = vit(images)
        vit.tome_r = [0, 0, 0]
        torch.testing.assert_close(vit(images), plain, atol=0, rtol=0)
        x = torch.randn(2, 65, 32)  # the ToMe loop itself, with nothing to merge
        torch.testing.assert_close(vit._tome_blocks(x, [0, 0, 0]), vit.transformer(x),
                                   atol=0, rtol=0)
    vit.tome_r = 0
    model = factory.create_model("tiny", tome_r=4)
    assert model.config["tome_r"] == 4 and model.visual.tome_r == 4
    with pytest.raises(ValueError, match="tome_r"):
        factory.create_model("RN50", tome_r=4)


def test_proportional_attention_equals_duplicated_tokens(monkeypatch):
    """Merging two identical tokens into one of size 2 changes nothing downstream: the log(size)
    bias makes attention treat it as the two copies it replaced."""
    torch.manual_seed(0)
    vit = clip.VisionTransformer(32, 8, 32, 2, 4, 16).eval()  # 16 patches + class token
    with torch.no_grad():
        vit.positional_embedding[2] = vit.positional_embedding[1]
    images = torch.randn(2, 3, 32, 32)
    images[..., :8, 8:16] = images[..., :8, 0:8]  # patch 1 (token 2, set A) = patch 0 (token 1, B)
    vit.tome_r = 0
    with torch.no_grad():
        want = vit(images)
    vit.tome_r = [1, 0]
    got, seen = _token_counts(vit, images)
    assert seen == [16, 16]  # the pair was merged in block 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(tome, "proportional_bias", lambda size: None)  # plain attention instead
    with torch.no_grad():
        assert not torch.allclose(vit(images), want, atol=1e-3)


def test_trains_with_gradients_and_autocast():
    model = factory.create_model("tiny", vocab_size=100, eot_id=99, tome_r=8).train()
    images = torch.randn(4, 3, 64, 64)
    ids = torch.randint(1, 98, (4, 32))
    ids[:, 10] = 99
    z_img, z_txt, scale = model(images, ids)
    F.cross_entropy(scale * z_img @ z_txt.T, torch.arange(4)).backward()
    for name, p in model.visual.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode_image(images)
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()
