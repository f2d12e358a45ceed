"""The losses under DistributedDataParallel equal one process on the concatenated batch.

Two gloo CPU processes each hold half of a global batch of 8 and train a tiny model wrapped in DDP.
For every loss we compare with one process on all 8 samples (no torch.distributed):
- the mean over ranks of the returned local losses equals the single-process loss;
- every parameter gradient, after DDP's averaging, equals the single-process gradient (1e-5).
The known wrong variant, an all-gather *without* gradient (own features substituted at this
rank's slice), gives the same loss but different gradients: the gradient check can fail.

All distributed work happens in one spawn (a module-scoped fixture): spawning costs seconds.
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import losses
from dist_utils import run_in_processes

WORLD, LOCAL = 2, 4  # processes, samples per process
ATOL = 1e-5


class Towers(nn.Module):
    """Two linear "towers", a logit scale and (for SigLIP) a bias: CLIP's interface in miniature."""

    def __init__(self, siglip=False):
        super().__init__()
        self.image, self.text = nn.Linear(6, 5), nn.Linear(7, 5)
        _randomise(self, seed=0)
        # SigLIP's t' = log 10; its bias is -1 here rather than -10 so the gradients are not tiny
        t = math.log(10.0) if siglip else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(t))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0)) if siglip else None

    def forward(self, x_img, x_txt):
        z_img = F.normalize(self.image(x_img), dim=-1)  # (B, 5)
        z_txt = F.normalize(self.text(x_txt), dim=-1)  # (B, 5)
        return z_img, z_txt, self.logit_scale.exp()


class SimSiamNet(nn.Module):
    """A linear encoder (the projector's output z) and a linear predictor (p)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.predictor = nn.Linear(6, 5), nn.Linear(5, 5)
        _randomise(self, seed=1)

    def forward(self, x1, x2):
        z1, z2 = self.encoder(x1), self.encoder(x2)  # (B, 5)
        return self.predictor(z1), self.predictor(z2), z1, z2


def _randomise(module, seed):
    """Same weights in every process, without touching the global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def _global_batch():
    g = torch.Generator().manual_seed(2)
    n = WORLD * LOCAL
    batch = {"img": torch.randn(n, 6, generator=g), "txt": torch.randn(n, 7, generator=g),
             "img_aug": torch.randn(n, 6, generator=g), "tokens": torch.randn(n, 3, 7, generator=g)}
    # MLM labels: rank 0's half has 5 labelled positions, rank 1's half only 1, so a plain local
    # mean would weight the two ranks' tokens differently.
    labels = torch.full((n, 3), -100)
    for (i, l), token in zip([(0, 0), (1, 2), (2, 1), (3, 0), (3, 2), (6, 1)], [3, 7, 0, 10, 5, 2]):
        labels[i, l] = token
    batch["labels"] = labels
    return batch


def _model(case):
    if case.startswith("clip") or case.startswith("siglip"):
        return Towers(siglip=case.startswith("siglip"))
    if case == "simsiam":
        return SimSiamNet()
    mlm_head = nn.Linear(7, 11)  # token features (B, 3, 7) -> logits (B, 3, 11)
    _randomise(mlm_head, seed=3)
    return mlm_head


def _loss(case, model, b):
    """The loss of `case` for `model` (plain or DDP-wrapped) on the batch dict `b`."""
    if case.startswith("clip"):
        return losses.clip_loss(*model(b["img"], b["txt"]))
    if case.startswith("siglip"):
        inner = model.module if isinstance(model, DistributedDataParallel) else model
        return losses.siglip_loss(*model(b["img"], b["txt"]), inner.logit_bias)
    if case == "simsiam":
        return losses.simsiam_loss(*model(b["img"], b["img_aug"]))
    return losses.mlm_loss(model(b["tokens"]), b["labels"])


def _run_case(case, batch):
    model = _model(case)
    if dist.is_initialized():
        model = DistributedDataParallel(model)
    loss = _loss(case, model, batch)
    loss.backward()
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {name: p.grad.clone() for name, p in inner.named_parameters()}
    return {"loss": loss.detach(), "grads": grads}


def _gather_without_grad(x):
    """The wrong variant: gather detached copies, put this rank's own features back in its slice."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


CASES = ["clip", "siglip", "simsiam", "mlm"]
WRONG = ["clip_nograd", "siglip_nograd"]


def _ddp_work(rank, world_size):
    # Every case gets the same global batch; each rank keeps its own slice.
    full = _global_batch()
    local = {k: v[rank * LOCAL:(rank + 1) * LOCAL] for k, v in full.items()}
    results = {case: _run_case(case, local) for case in CASES}
    gather = losses.all_gather_with_grad
    # clip_loss and siglip_loss look the gather up in the module at call time
    losses.all_gather_with_grad = _gather_without_grad
    try:
        results.update({case: _run_case(case, local) for case in WRONG})
    finally:
        losses.all_gather_with_grad = gather
    results["gathered"] = losses.all_gather_with_grad(local["img"])
    return results


@pytest.fixture(scope="module")
def ddp_results():
    return run_in_processes(_ddp_work, WORLD, timeout=120)


@pytest.fixture(scope="module")
def reference():
    return {case: _run_case(case, _global_batch()) for case in CASES}


def test_all_gather_concatenates_in_rank_order(ddp_results):
    for result in ddp_results:
        torch.testing.assert_close(result["gathered"], _global_batch()["img"], atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_ddp_equals_single_process(case, ddp_results, reference):
    ref = reference[case]
    mean_loss = sum(r[case]["loss"] for r in ddp_results) / WORLD
    torch.testing.assert_close(mean_loss, ref["loss"], atol=ATOL, rtol=0)
    for rank, result in enumerate(ddp_results):
        assert result[case]["grads"].keys() == ref["grads"].keys()
        for name, grad in result[case]["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][name], atol=ATOL, rtol=0,
                                       msg=lambda m: f"{case} rank {rank} {name}: {m}")


@pytest.mark.parametrize("case", WRONG)
def test_gather_without_grad_gives_wrong_gradients(case, ddp_results, reference):
    ref = reference[case.split("_")[0]]
    # The forward pass is identical, so the loss agrees ...
    mean_loss = sum(r[case]["loss"] for r in ddp_results) / WORLD
    torch.testing.assert_close(mean_loss, ref["loss"], atol=ATOL, rtol=0)
    # ... but gradients from the other ranks' losses never reach this rank's features.
    worst = max((g - ref["grads"][n]).abs().max().item()
                for r in ddp_results for n, g in r[case]["grads"].items())
    assert worst > 1e-3
