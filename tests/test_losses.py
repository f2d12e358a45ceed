"""losses.py on one process, against hand computations with explicit loops."""
import math

import torch
import torch.nn.functional as F

from losses import (SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT, all_gather_with_grad,
                    clamp_logit_scale_, clip_loss, mlm_loss, siglip_loss, simsiam_loss)


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_clip_loss_matches_hand_computation():
    z_img, z_txt, scale = _features(3, 4, 0), _features(3, 4, 1), 7.5
    a, b = z_img.tolist(), z_txt.tolist()
    sim = [[scale * _dot(a[i], b[j]) for j in range(3)] for i in range(3)]
    i2t = t2i = 0.0
    for i in range(3):
        # -log softmax of the positive in row i (image i vs all texts) and column i (text vs images)
        i2t += -(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(3))))
        t2i += -(sim[i][i] - math.log(sum(math.exp(sim[j][i]) for j in range(3))))
    expected = (i2t / 3 + t2i / 3) / 2
    assert abs(clip_loss(z_img, z_txt, scale).item() - expected) < 1e-12
    # the scale may be a tensor (the model hands over logit_scale.exp())
    assert abs(clip_loss(z_img, z_txt, torch.tensor(scale)).item() - expected) < 1e-12


def test_clip_loss_is_symmetric_and_has_known_limits():
    z_img, z_txt = _features(5, 8, 2), _features(5, 8, 3)
    assert torch.allclose(clip_loss(z_img, z_txt, 10.0), clip_loss(z_txt, z_img, 10.0))
    # identical features with a huge scale: each positive wins its row and column -> loss ~ 0
    eye = torch.eye(5, dtype=torch.float64)
    assert clip_loss(eye, eye, 100.0).item() < 1e-30
    # scale 0: uniform softmax -> log B
    assert abs(clip_loss(z_img, z_txt, 0.0).item() - math.log(5)) < 1e-12


def test_clip_loss_gradient_reaches_both_towers_and_scale():
    z_img = _features(4, 6, 4).requires_grad_()
    z_txt = _features(4, 6, 5).requires_grad_()
    t = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    clip_loss(z_img, z_txt, t.exp()).backward()
    assert z_img.grad.abs().sum() > 0 and z_txt.grad.abs().sum() > 0 and t.grad.abs() > 0


def test_siglip_loss_matches_hand_computation():
    z_img, z_txt, scale, bias = _features(3, 4, 6), _features(3, 4, 7), 10.0, -2.5
    a, b = z_img.tolist(), z_txt.tolist()
    total = 0.0
    for i in range(3):
        for j in range(3):
            y = 1.0 if i == j else -1.0
            total += math.log(1.0 / (1.0 + math.exp(-y * (scale * _dot(a[i], b[j]) + bias))))
    expected = -total / 3
    assert abs(siglip_loss(z_img, z_txt, scale, bias).item() - expected) < 1e-12
    got = siglip_loss(z_img, z_txt, torch.tensor(scale), torch.tensor([bias], dtype=torch.float64))
    assert abs(got.item() - expected) < 1e-12


def test_siglip_init_values():
    # SigLIP (Zhai et al. 2023, Sec. 3): t = exp(t'), t' = log 10, b = -10 at initialisation
    assert math.isclose(math.exp(SIGLIP_LOGIT_SCALE_INIT), 10.0)
    assert SIGLIP_LOGIT_BIAS_INIT == -10.0
    # Why b = -10: with orthogonal features every logit is b, so the B positives cost
    # -log sigmoid(-10) ~ 10 each and the B^2 - B negatives almost nothing; with b = 0 every pair
    # would cost log 2.
    batch = 8
    basis = torch.eye(2 * batch, dtype=torch.float64)
    z_img, z_txt = basis[:batch], basis[batch:]  # (B, 2B): every image orthogonal to every text
    scale = math.exp(SIGLIP_LOGIT_SCALE_INIT)
    loss = siglip_loss(z_img, z_txt, scale, SIGLIP_LOGIT_BIAS_INIT).item()
    expected = math.log1p(math.exp(10.0)) + (batch - 1) * math.log1p(math.exp(-10.0))
    assert abs(loss - expected) < 1e-9 and 10.0 < loss < 10.01
    assert abs(siglip_loss(z_img, z_txt, scale, 0.0).item() - batch * math.log(2)) < 1e-12


def test_simsiam_identical_vectors_and_stop_gradient():
    p = torch.randn(4, 16, dtype=torch.float64)
    p1, p2 = p.clone().requires_grad_(), (2 * p).requires_grad_()  # cosine ignores the norm
    z1, z2 = (3 * p).requires_grad_(), p.clone().requires_grad_()
    loss = simsiam_loss(p1, p2, z1, z2)
    assert abs(loss.item() + 1.0) < 1e-12
    # perturb away from the optimum so that the gradient on p is non-zero
    loss = simsiam_loss(p1 + 0.1 * torch.randn_like(p), p2, z1, z2)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient: nothing reaches the targets
    assert p1.grad.abs().sum() > 0


def test_simsiam_matches_formula():
    p1, p2, z1, z2 = (torch.randn(5, 7, dtype=torch.float64) for _ in range(4))
    cos = [[_dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b)) for a, b in zip(x.tolist(), y.tolist())]
           for x, y in ((p1, z2), (p2, z1))]
    expected = -(sum(cos[0]) / 5 + sum(cos[1]) / 5) / 2
    assert abs(simsiam_loss(p1, p2, z1, z2).item() - expected) < 1e-12


def test_mlm_loss_ignores_unlabelled_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)  # (B, L, V)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 4, 0, 10
    expected = 0.0
    for b, l in ((0, 1), (1, 3), (1, 4)):
        row = logits[b, l].tolist()
        expected += -(row[labels[b, l]] - math.log(sum(math.exp(v) for v in row)))
    expected /= 3
    assert abs(mlm_loss(logits, labels).item() - expected) < 1e-12
    # the flat (M, V) form gives the same, and logits at ignored positions do not matter
    assert abs(mlm_loss(logits.reshape(10, 11), labels.reshape(10)).item() - expected) < 1e-12
    changed = logits.clone()
    changed[labels == -100] += 5 * torch.randn(7, 11, generator=g, dtype=torch.float64)
    assert abs(mlm_loss(changed, labels).item() - expected) < 1e-12


def test_mlm_loss_without_labels_is_zero_with_a_graph():
    logits = torch.randn(3, 4, 9, requires_grad=True)
    loss = mlm_loss(logits, torch.full((3, 4), -100))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()  # must not fail: DDP needs every rank to run backward
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_clamp_logit_scale():
    t = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    clamp_logit_scale_(t)
    assert math.isclose(t.item(), math.log(1 / 0.07), rel_tol=1e-6)  # inside: unchanged
    t.data.fill_(6.0)  # exp(6) ~ 403 > 100
    assert clamp_logit_scale_(t) is t
    assert math.isclose(t.exp().item(), 100.0, rel_tol=1e-5) and t.requires_grad
    t.data.fill_(-1.0)
    clamp_logit_scale_(t)
    assert t.item() == 0.0
    old = torch.nn.Parameter(torch.tensor([9.0]))  # older checkpoints store shape [1]
    clamp_logit_scale_(old, max_scale=50.0)
    assert old.shape == (1,) and math.isclose(old.exp().item(), 50.0, rel_tol=1e-5)
    # after an optimizer step that overshoots, as train.py uses it
    t.data.fill_(4.5)
    (-t.exp()).backward()  # gradient -exp(4.5) ~ -90: SGD pushes t far above log 100
    torch.optim.SGD([t], lr=1.0).step()
    assert t.item() > 90
    clamp_logit_scale_(t)
    assert math.isclose(t.item(), math.log(100.0), rel_tol=1e-6)


def test_all_gather_with_grad_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x
