"""NNQueue: FIFO order, wrap-around, brute-force nearest, partial fill, state_dict, DDP."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_in_processes
from nn_queue import NNQueue


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _fifo_contents(q):
    """Queue contents oldest -> newest (reads the buffers, independent of the implementation)."""
    n, ptr = int(q.filled), int(q.ptr)
    if n < q.size:
        return q.feats[:n]
    return torch.cat([q.feats[ptr:], q.feats[:ptr]])


def test_fifo_order_and_wraparound():
    q = NNQueue(size=10, dim=4)
    stream = _unit(27, 4, 0)
    pushed = []
    for lo, hi in [(0, 3), (3, 7), (7, 9), (9, 16), (16, 17), (17, 27)]:  # 27 > 10: wraps twice
        q.push(stream[lo:hi])
        pushed.append(stream[lo:hi])
        expected = torch.cat(pushed)[-10:]
        assert len(q) == min(hi, 10)
        assert torch.equal(_fifo_contents(q), expected)
    assert int(q.ptr) == 27 % 10


def test_push_larger_than_queue_keeps_newest():
    q = NNQueue(size=5, dim=3)
    q.push(_unit(2, 3, 1))
    z = _unit(12, 3, 2)
    q.push(z)
    assert len(q) == 5
    assert torch.equal(_fifo_contents(q), z[-5:])


def test_push_stores_detached_copy():
    q = NNQueue(size=8, dim=4)
    z = _unit(3, 4, 3).requires_grad_()
    q.push(z * 1.0)
    assert not q.feats.requires_grad
    with torch.no_grad():
        z.mul_(2)  # the queue must not alias the caller's tensor
    assert torch.allclose(q.feats[:3].norm(dim=-1), torch.ones(3))


def test_nearest_matches_brute_force_for_any_chunk_size():
    q = NNQueue(size=100, dim=16)
    q.push(_unit(100, 16, 4))
    z = _unit(7, 16, 5)
    best = (z @ q.feats.T).argmax(dim=1)  # full (B, K) matrix
    for chunk in [1, 7, 32, 100, 1000]:
        assert torch.equal(q.nearest(z, chunk_size=chunk), q.feats[best]), chunk
    # A query that is itself in the queue finds itself (cosine 1).
    assert torch.equal(q.nearest(q.feats[41:42], chunk_size=9), q.feats[41:42])


def test_nearest_ignores_empty_slots():
    q = NNQueue(size=64, dim=8)
    stored = _unit(10, 8, 6).abs()  # all in the positive orthant...
    q.push(stored)
    # ...and queries in the negative one: every stored feature has cosine < 0 with them, so an
    # all-zero empty slot (cosine 0) would win if empty slots were not masked.
    z = -_unit(5, 8, 11).abs()
    for chunk in [3, 10, 16, 64]:
        out = q.nearest(z, chunk_size=chunk)
        best = (z @ stored.T).argmax(dim=1)
        assert torch.equal(out, stored[best])


def test_nearest_on_empty_queue_returns_query():
    q = NNQueue(size=16, dim=4)
    z = _unit(3, 4, 7)
    assert len(q) == 0
    assert torch.equal(q.nearest(z), z)


def test_state_dict_round_trip():
    q = NNQueue(size=12, dim=4)
    q.push(_unit(17, 4, 8))  # wrapped: ptr != 0, full
    sd = q.state_dict()
    assert set(sd) == {"feats", "ptr", "filled"}
    r = NNQueue(size=12, dim=4)
    r.load_state_dict(sd)
    assert int(r.ptr) == int(q.ptr) and len(r) == len(q)
    z, more = _unit(5, 4, 9), _unit(3, 4, 10)
    assert torch.equal(r.nearest(z), q.nearest(z))
    q.push(more)
    r.push(more)  # the restored queue continues the same FIFO
    assert torch.equal(r.feats, q.feats)


def _ddp_queue(rank, world_size):
    q = NNQueue(size=20, dim=6)
    for step in range(5):  # 5 steps x 8 global rows = 40: wraps
        local = _unit(4, 6, 100 * step + rank)  # every rank has different rows
        gathered = torch.empty(world_size * 4, 6)
        dist.all_gather_into_tensor(gathered, local)
        q.push(gathered)
    return {k: v.clone() for k, v in q.state_dict().items()}


def test_two_process_queues_identical_and_equal_single_process():
    results = run_in_processes(_ddp_queue, 2)
    single = NNQueue(size=20, dim=6)
    for step in range(5):
        single.push(torch.cat([_unit(4, 6, 100 * step + r) for r in range(2)]))
    for res in results:
        for k, v in single.state_dict().items():
            assert torch.equal(res[k], v), k
