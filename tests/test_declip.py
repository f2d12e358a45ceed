"""DeCLIP: each term vs a direct computation, switches, masking, MLM head, queue, SigLIP, DDP."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from factory import create_model
from declip import DeCLIP, mask_tokens
from dist_utils import run_in_processes
from losses import clip_loss, simsiam_loss, siglip_loss

VOCAB, SOT, EOT, MASK = 600, 597, 598, 599  # our tokenizer's layout: ... SOT EOT MASK
SPECIALS = (SOT, EOT, MASK)
CTX, RES = 32, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These ops are tiny: with a busy machine, intra-op threads cost far more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(seed=0, queue_fill=40, **kw):
    torch.manual_seed(seed)
    clip = create_model("tiny", vocab_size=VOCAB, eot_id=EOT, image_resolution=RES)
    model = DeCLIP(clip, queue_size=64, **kw)
    if queue_fill and model.nns:
        g = torch.Generator().manual_seed(seed + 1)
        model.queue.push(F.normalize(torch.randn(queue_fill, 128, generator=g), dim=-1))
    return model


def _ids(B, seed, ctx=CTX):
    """Rows [SOT, t_1..t_n, EOT, 0...] with random lengths; real tokens include id 0 ("!")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, ctx, dtype=torch.long)
    lengths = torch.randint(3, ctx - 2, (B,), generator=g)
    tokens = torch.randint(0, SOT, (B, ctx), generator=g)
    pos = torch.arange(ctx)
    real = (pos >= 1) & (pos <= lengths[:, None])
    ids = torch.where(real, tokens, ids)
    ids[:, 0] = SOT
    ids[torch.arange(B), lengths + 1] = EOT
    return ids


def _batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    img1, img2 = torch.randn(2, B, 3, RES, RES, generator=g)
    ids, ids_aug = _ids(B, seed + 1), _ids(B, seed + 2)
    masked = mask_tokens(ids, MASK, VOCAB, SPECIALS, p=0.3, generator=g)
    return img1, img2, ids, ids_aug, masked


def _direct_terms(model, img1, img2, ids_aug, masked, queue_feats):
    """Every DeCLIP term recomputed from separately encoded views, with brute-force NN search."""
    clip, (ids_m, labels) = model.clip, masked
    e1, e2 = clip.encode_image(img1), clip.encode_image(img2)
    e_t, tokens = clip.encode_text(ids_m, return_tokens=True)
    z1, z2 = F.normalize(e1, dim=-1), F.normalize(e2, dim=-1)
    zt, zt_aug = F.normalize(e_t, dim=-1), clip.encode_text(ids_aug, normalize=True)
    s = clip.logit_scale.exp()
    p1, p2 = model.projector(e1), model.projector(e2)
    logits = model.mlm_head(tokens)  # (B, L, V): the full projection
    nn = queue_feats[(zt @ queue_feats.T).argmax(dim=1)]
    labels_b = torch.arange(len(zt))
    return {
        "clip": clip_loss(z1, zt, s),
        "mvs": (clip_loss(z1, zt_aug, s) + clip_loss(z2, zt, s) + clip_loss(z2, zt_aug, s)) / 3,
        "iss": simsiam_loss(model.predictor(p1), model.predictor(p2), p1, p2),
        "tss": F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100),
        "nns": (F.cross_entropy(s * z1 @ nn.T, labels_b)
                + F.cross_entropy(s * z2 @ nn.T, labels_b)) / 2,
    }, zt


def test_every_term_equals_direct_computation():
    model = _build()
    img1, img2, ids, ids_aug, masked = _batch()
    queue_before = model.queue.feats[:len(model.queue)].clone()
    loss, terms = model(img1, img2, ids, ids_aug, masked=masked)
    expected, zt = _direct_terms(model, img1, img2, ids_aug, masked, queue_before)
    for k, v in expected.items():
        assert torch.allclose(terms[k], v, atol=1e-5), (k, terms[k], v)
    total = 0.4 * expected["clip"] + 0.2 * (expected["iss"] + expected["tss"]) \
        + 0.2 * expected["mvs"] + 0.2 * expected["nns"]
    assert torch.allclose(loss, total, atol=1e-5) and torch.equal(terms["total"], loss.detach())
    # the queue got this batch's (masked-pass) text features, newest last
    assert len(model.queue) == 46
    assert torch.allclose(model.queue.feats[40:46], zt, atol=1e-6)


@pytest.mark.parametrize("tower", ["tiny", "tiny-rn"])
def test_bf16_autocast_on_cpu_keeps_every_term_and_the_gradient(tower):
    """train.py's default on CPUs with bf16 in hardware. bf16 keeps 8 significant bits: every
    matmul input is rounded by up to 2^-9 (0.2%), so a logit e^t * cos (|.| <= 14.3 at init)
    moves by up to ~0.03, and a loss term, a log-softmax average of logits, by as much: atol 0.03
    (measured: at most 0.012 over 3 seeds and both towers). The gradient, a sum of many such
    products, must still point the same way: cosine to the fp32 gradient > 0.98 (measured
    >= 0.993; BatchNorm makes the ResNet's the least exact)."""
    torch.manual_seed(0)
    clip = create_model(tower, vocab_size=VOCAB, eot_id=EOT, image_resolution=RES)
    model = DeCLIP(clip, queue_size=64)
    model.queue.push(F.normalize(torch.randn(40, 128), dim=-1))
    img1, img2, ids, ids_aug, masked = _batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    terms, grads = {}, {}
    for precision in ("fp32", "bf16"):
        model.load_state_dict(state)  # the same BatchNorm statistics for both passes
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, terms[precision] = model(img1, img2, ids, ids_aug, masked=masked, push=False)
        loss.backward()
        grads[precision] = torch.cat([p.grad.double().flatten() for p in model.parameters()
                                      if p.grad is not None])
    for k, v in terms["fp32"].items():
        assert abs(float(terms["bf16"][k]) - float(v)) <= 0.03, (k, terms["bf16"][k], v)
    assert F.cosine_similarity(grads["bf16"], grads["fp32"], dim=0) > 0.98


def test_all_switches_off_is_plain_clip_exactly():
    model = _build(mvs=False, ss=False, nns=False)
    img1, _, ids, _, _ = _batch()
    loss, terms = model(img1, None, ids, None)  # views 2 are not needed, hence not encoded
    z_img, z_txt, scale = model.clip(img1, ids)
    assert torch.equal(loss, clip_loss(z_img, z_txt, scale))
    assert all(float(terms[k]) == 0 for k in ("iss", "tss", "mvs", "nns"))
    assert set(dict(model.named_children())) == {"clip"}  # no unused heads


@pytest.mark.parametrize("mvs,ss,nns", [(True, False, False), (True, True, False),
                                        (False, False, True), (False, True, False)])
def test_switches_move_their_weight_to_clip(mvs, ss, nns):
    model = _build(mvs=mvs, ss=ss, nns=nns)
    img1, img2, ids, ids_aug, masked = _batch()
    loss, t = model(img1, img2 if (mvs or ss) else None, ids, ids_aug if mvs else None,
                    masked=masked)
    w_clip = 1 - 0.2 * (mvs + ss + nns)
    total = w_clip * t["clip"] + 0.2 * (t["mvs"] + t["iss"] + t["tss"] + t["nns"])
    assert torch.allclose(loss.detach(), total, atol=1e-6)
    for name, on in [("mvs", mvs), ("iss", ss), ("tss", ss), ("nns", nns)]:
        assert (float(t[name]) != 0) == on, name


@pytest.mark.parametrize("mlm_pass", ["separate", "bidirectional"])
def test_separate_mlm_pass_keeps_contrastive_features_unmasked(mlm_pass):
    """separate/bidirectional: z_txt comes from the *unmasked* caption (so the queue and every
    contrastive term see it), and MLM from its own pass over the masked caption."""
    model = _build(mlm_pass=mlm_pass)
    img1, img2, ids, ids_aug, (ids_m, labels) = _batch()
    queue_before = model.queue.feats[:len(model.queue)].clone()
    loss, terms = model(img1, img2, ids, ids_aug, masked=(ids_m, labels))
    clip = model.clip
    zt = clip.encode_text(ids, normalize=True)                    # unmasked
    z1 = clip.encode_image(img1, normalize=True)
    assert torch.allclose(terms["clip"], clip_loss(z1, zt, clip.logit_scale.exp()), atol=1e-5)
    assert torch.allclose(model.queue.feats[40:46], zt, atol=1e-6)
    _, tokens = clip.encode_text(ids_m, return_tokens=True, causal=mlm_pass == "separate")
    logits = model.mlm_head(tokens)                                # (B, L, V)
    tss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(terms["tss"], tss, atol=1e-5)
    _, shared = _build(mlm_pass="shared")(img1, img2, ids, ids_aug, masked=(ids_m, labels))
    assert not torch.allclose(terms["clip"], shared["clip"])     # the flag changes the features


def test_bidirectional_text_pass_sees_the_right_context_but_not_padding():
    clip = _build().clip
    ids = _ids(4, seed=5)
    eot = (ids == EOT).int().argmax(1)
    later = ids.clone()
    later[0, eot[0] - 1] = (later[0, eot[0] - 1] + 1) % SOT         # the last real token of row 0
    r = int(eot.argmin())                 # the shortest caption: its padding lies inside the
    padded = ids.clone()                  # prefix the tower runs on (up to the batch's last EOT)
    padded[r, eot[r] + 1:] = 7
    for causal in (True, False):
        _, t = clip.encode_text(ids, return_tokens=True, causal=causal)
        _, t_later = clip.encode_text(later, return_tokens=True, causal=causal)
        _, t_pad = clip.encode_text(padded, return_tokens=True, causal=causal)
        # the first real token sees the last one only without the causal mask
        assert torch.allclose(t[0, 1], t_later[0, 1], atol=1e-6) == causal
        assert torch.allclose(t[r, :eot[r] + 1], t_pad[r, :eot[r] + 1], atol=1e-6)


def test_official_weights_fold_views_into_clip_term():
    model = _build(weights="official")
    loss, t = model(*_batch()[:4], masked=_batch()[4])
    total = 0.4 * (t["clip"] + 3 * t["mvs"]) / 4 + 0.2 * (t["iss"] + t["tss"]) + 0.2 * t["nns"]
    assert torch.allclose(loss.detach(), total, atol=1e-6)


def test_mask_tokens_rules_and_proportions():
    ids = _ids(4000, seed=3)
    g = torch.Generator().manual_seed(0)
    ids_m, labels = mask_tokens(ids, MASK, VOCAB, SPECIALS, p=0.15, generator=g)
    pos = torch.arange(CTX)
    eot_pos = (ids == EOT).int().argmax(dim=1, keepdim=True)
    real = (pos >= 1) & (pos < eot_pos)
    chosen = labels != -100
    assert not (chosen & ~real).any()  # SOT, EOT, padding never chosen
    assert torch.equal(ids_m[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    assert ((ids == 0) & real & chosen).any()  # id 0 as a real token can be chosen
    frac = chosen.sum() / real.sum()
    assert abs(frac - 0.15) < 0.01, frac
    n = chosen.sum()
    to_mask = (ids_m == MASK) & chosen
    kept = (ids_m == ids) & chosen
    randomised = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum() / n - 0.8) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02  # (+ ~1/600 random draws equal to the original)
    assert abs(randomised.sum() / n - 0.1) < 0.02
    assert not torch.isin(ids_m[randomised], torch.tensor(SPECIALS)).any()
    again = mask_tokens(ids, MASK, VOCAB, SPECIALS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids_m) and torch.equal(again[1], labels)


def test_mlm_logits_only_at_masked_positions():
    model = _build()
    tokens = torch.randn(5, CTX, 128)
    labels = mask_tokens(_ids(5, 4), MASK, VOCAB, SPECIALS, p=0.3,
                         generator=torch.Generator().manual_seed(1))[1]
    logits, targets = model.mlm_logits(tokens, labels)
    where = labels != -100
    assert logits.shape == (int(where.sum()), VOCAB)
    assert torch.allclose(logits, model.mlm_head(tokens)[where], atol=1e-6)
    assert torch.equal(targets, labels[where])


def test_nns_gives_no_gradient_to_queue_or_text_tower():
    # NNS only: z_txt_nn comes from the queue, so the text tower's gradient is w_clip * CLIP's.
    model = _build(mvs=False, ss=False, nns=True)
    img1, _, ids, _, _ = _batch()
    loss, terms = model(img1, None, ids, None)
    assert float(terms["nns"]) > 0
    text = [model.clip.token_embedding.weight, model.clip.text_projection]
    g_declip = torch.autograd.grad(loss, text)
    z_img, z_txt, scale = model.clip(img1, ids)
    g_clip = torch.autograd.grad(0.8 * clip_loss(z_img, z_txt, scale), text)
    for a, b in zip(g_declip, g_clip):
        assert torch.allclose(a, b, atol=1e-6)
    assert not model.queue.feats.requires_grad and model.queue.feats.grad is None


def test_empty_queue_skips_nns_and_eval_does_not_push():
    model = _build(queue_fill=0)
    batch, masked = _batch()[:4], _batch()[4]
    _, terms = model(*batch, masked=masked)
    assert float(terms["nns"]) == 0 and len(model.queue) == 6
    model.eval()
    _, terms = model(*batch, masked=masked)
    assert float(terms["nns"]) > 0 and len(model.queue) == 6


def test_siglip_variant():
    model = _build(loss="siglip", mvs=False, ss=False, nns=False)
    assert float(model.logit_bias.detach()) == -10 and torch.isclose(model.clip.logit_scale.exp(),
                                                            torch.tensor(10.0))
    img1, _, ids, _, _ = _batch()
    loss, _ = model(img1, None, ids, None)
    z_img, z_txt, scale = model.clip(img1, ids)
    assert torch.equal(loss, siglip_loss(z_img, z_txt, scale, model.logit_bias))
    full = _build(loss="siglip")
    loss, terms = full(*_batch()[:4], masked=_batch()[4])
    loss.backward()
    assert torch.isfinite(loss) and full.logit_bias.grad is not None
    assert all(float(terms[k]) != 0 for k in ("clip", "iss", "tss", "mvs", "nns"))


# ----------------------------------------------------------------------------- DDP equivalence

def _step(model, batch):
    """One DeCLIP forward + backward -> (loss, {param: grad}, {buffer: value})."""
    loss, _ = model(*batch[:4], masked=batch[4])
    loss.backward()
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {n: p.grad.clone() for n, p in inner.named_parameters()}
    return loss.detach(), grads, {n: b.clone() for n, b in inner.named_buffers()}


def _ddp_declip(rank, world_size, losses_to_test):
    img1, img2, ids, ids_aug, (ids_m, labels) = _batch(B=8, seed=5)
    part = slice(rank * 4, (rank + 1) * 4)
    local = (img1[part], img2[part], ids[part], ids_aug[part], (ids_m[part], labels[part]))
    out = {}
    for loss_name in losses_to_test:
        ddp = DistributedDataParallel(_build(loss=loss_name), broadcast_buffers=False)
        loss, grads, buffers = _step(ddp, local)
        dist.all_reduce(loss)
        out[loss_name] = (loss / world_size, grads, buffers)
    return out


def test_two_processes_equal_one_process_on_the_whole_batch():
    losses_to_test = ("infonce", "siglip")
    results = run_in_processes(_ddp_declip, 2, losses_to_test)
    batch = _batch(B=8, seed=5)
    for loss_name in losses_to_test:
        loss, grads, buffers = _step(_build(loss=loss_name), batch)
        for rank_loss, rank_grads, rank_buffers in (r[loss_name] for r in results):
            assert torch.allclose(rank_loss, loss, atol=1e-5), (loss_name, rank_loss, loss)
            assert rank_grads.keys() == grads.keys()
            for n, g in grads.items():
                assert torch.allclose(rank_grads[n], g, atol=1e-5), (loss_name, n)
            for n, b in buffers.items():  # queue contents and SimSiam BN statistics
                assert torch.allclose(rank_buffers[n].float(), b.float(), atol=1e-5), (loss_name, n)
