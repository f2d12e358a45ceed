"""Run a test function in several CPU processes joined by a gloo process group.

`run_in_processes(fn, world_size, *args)` spawns `world_size` processes (torch.multiprocessing,
"spawn"), gives them a free localhost port, calls `init_process_group("gloo")`, runs
`fn(rank, world_size, *args)` in each, destroys the group and returns the ranks' return values
as a list ordered by rank. An exception in any rank is re-raised in the caller with that rank's
traceback in the message.

Import it from a test file as `from dist_utils import run_in_processes`: pytest (default "prepend"
import mode; tests/ has no __init__.py) puts tests/ on sys.path when it collects a test file there,
and tests/conftest.py puts the repository root there, so both work with `python -m pytest -q tests`
from the repository root. Spawned children receive the parent's sys.path, so they can import the
test module too.

Rules for `fn`: a module-level function (spawn pickles it by name); its return value must be
picklable (results travel through torch.save, so dicts of tensors are fine). Spawning costs a few
seconds (each child imports torch), so do all the distributed work of a test file in one call, e.g.
in a module-scoped fixture.

Usage:
    def _work(rank, world_size, seed):
        return {"sum": all_gather_with_grad(torch.full((1,), float(rank))).sum()}
    results = run_in_processes(_work, 2, 0)   # [{"sum": tensor(1.)}, {"sum": tensor(1.)}]

Left out: GPUs/NCCL, and more than one host.
"""
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, fn, world_size, port, out_dir, args):
    # Set here, not in the parent, so that running a test leaves the parent's environment unchanged.
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # no rank tears gloo down while another still talks to it (that aborted a rank at exit,
        # "terminate called without an active exception", in about 1 run of 8)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_in_processes(fn, world_size, *args, timeout=120.0):
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return the results by rank.

    Raises torch.multiprocessing.ProcessRaisedException (with the failing rank's traceback) if a
    rank raises, and TimeoutError (after terminating the children) if they do not finish within
    `timeout` s.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(_child, args=(fn, world_size, _free_port(), out_dir, args),
                           nprocs=world_size, join=False)
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.terminate()
                raise TimeoutError(f"run_in_processes: {fn.__name__} did not finish in {timeout} s")
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
                for rank in range(world_size)]
