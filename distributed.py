"""torchrun's processes as one training run: set-up, sums over ranks, a final check.

    rank, world, device = setup_distributed()   # RANK, WORLD_SIZE, LOCAL_RANK from torchrun
    n = all_ranks_sum(n, world)                  # e.g. the samples every rank skipped
    assert_replicas_agree(model)                 # DDP kept the weights identical

One process without torchrun is rank 0 of 1, with no process group. The gradients' all-reduce
is DDP's; the losses' all-gather with gradients is in losses.py.
"""
import datetime
import os

import torch
import torch.distributed as dist


def setup_distributed(device=None):
    """Read torchrun's environment; NCCL on GPUs, gloo on CPU. device: default cuda if there is
    one. Returns (rank, world, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: a group even for 1 process
        # torchrun keeps one key-value store across restarts (--max-restarts): without a fresh
        # prefix, a restarted group reads the dead workers' addresses and cannot connect.
        store, rank, world = next(dist.rendezvous("env://"))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"restart{restart}/", store)
        # an hour: the other ranks wait in a barrier while rank 0 evaluates (ImageNet: minutes)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=world, timeout=datetime.timedelta(hours=1))
    return rank, world, device


def all_ranks_sum(n, world, device):
    """n summed over the ranks (each rank skips its own unreadable samples); on `device`, since
    NCCL reduces CUDA tensors only."""
    if world == 1:
        return n
    total = torch.tensor(n, device=device)
    dist.all_reduce(total)
    return int(total)


def assert_replicas_agree(model):
    """Every rank must hold the same weights after training (DDP's promise): checked once."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])  # (P,)
    gathered = [torch.empty_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise SystemExit("the ranks' weights diverged: DDP did not synchronise the gradients")
