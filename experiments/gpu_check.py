"""The GPU check: DeCLIP against CLIP on RN50 at 128 images per GPU (DeCLIP Table 9), and a
one-GPU torchrun/NCCL smoke run of train.py. One run, a few minutes; skips cleanly without CUDA.

    python experiments/gpu_check.py          # or: python experiments/bench.py --gpu
    python experiments/gpu_check.py --peak-tflops 989 --steps 10

For each precision the GPU supports (fp16 with a GradScaler: the V100 path; bf16: the default on
newer GPUs) it times the full training step (forward, loss, backward, fused AdamW) of CLIP and of
DeCLIP on RN50 at 224 px, 128 image-text pairs (DeCLIP: two image views and two captions each),
channels_last, and prints ms/step, samples/s, peak memory, the DeCLIP/CLIP ratios (the paper's
Table 9: 1.5x time, 22.7 vs 15.8 GB on a V100) and the model FLOPs utilisation: the step's
FLOPs, counted once by torch.utils.flop_counter, over its time and the GPU's dense peak for that
precision (a table of common GPUs; `--peak-tflops` for others). Peak memory includes the
previous step's gradients, as in train.py (zero_grad after the forward), for both methods alike.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense tensor-core peak (TFLOP/s) for fp16/bf16 with fp32 accumulation, from vendor data sheets.
PEAK_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756,
               "H100 NVL": 835, "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121,
               "A10G": 70, "A10": 125, "V100": 125, "T4": 65, "RTX 4090": 165, "RTX 3090": 71}


def peak_tflops(name):
    """The data-sheet peak of the GPU called `name` (longest matching key), or None."""
    keys = [k for k in PEAK_TFLOPS if k in name]
    return PEAK_TFLOPS[max(keys, key=len)] if keys else None


def make_step(method, batch, precision, device, grad_checkpointing=False):
    """A closure running one training step of RN50 CLIP or DeCLIP on a fixed random batch."""
    from factory import create_model
    from declip import DeCLIP
    torch.manual_seed(0)
    clip = create_model("RN50")
    if grad_checkpointing and hasattr(clip, "set_grad_checkpointing"):
        clip.set_grad_checkpointing(True)
    declip = method == "declip"
    model = DeCLIP(clip, mvs=declip, ss=declip, nns=declip, queue_size=65536).to(device)
    model = model.to(memory_format=torch.channels_last)
    size, L, V = clip.config["image_resolution"], clip.config["context_length"], 49408
    g = torch.Generator().manual_seed(0)

    def images():
        x = torch.randn(batch, 3, size, size, generator=g)
        return x.to(device).contiguous(memory_format=torch.channels_last)
    ids = torch.randint(1, V - 2, (batch, L), generator=g)
    ids[:, 0], ids[:, 20], ids[:, 21:] = V - 2, V - 1, 0      # SOT, 19 tokens, EOT, padding
    ids = ids.to(device)
    view1, view2 = images(), images() if declip else None
    ids_aug = ids.roll(1, dims=1) if declip else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss, _ = model(view1, view2, ids, ids_aug)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return model, step


def measure(method, batch, precision, steps, grad_checkpointing=False):
    """(ms per step, peak GB, FLOPs per step) of one configuration."""
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device("cuda")
    model, step = make_step(method, batch, precision, device, grad_checkpointing)
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    peak_gb = torch.cuda.max_memory_allocated() / 2 ** 30
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    del model, step
    torch.cuda.empty_cache()
    return ms, peak_gb, flops


def smoke_torchrun():
    """A one-GPU torchrun run of train.py: NCCL process group, DDP, AMP, eval, checkpoint."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "train.py", "--steps", "30", "--batch-size", "64", "--eval-size", "210",
               "--output", os.path.join(out, "run"), "--workers", "4"]
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
        tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"\n## torchrun --nproc_per_node=1 train.py --steps 30 (NCCL): {status}, "
              f"{seconds:.0f} s")
        for line in tail:
            print("    " + line)
        return result.returncode == 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128, help="image-text pairs per GPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense fp16/bf16 peak, if it is not in the table")
    p.add_argument("--no-smoke", action="store_true", help="skip the torchrun smoke run")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu check: no CUDA GPU here; skipped")
        return 0
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    torch.backends.cudnn.benchmark = True
    precisions = ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    print(f"# {name}, torch {torch.__version__}, RN50 224 px, {args.batch} pairs per GPU, "
          f"mean of {args.steps} steps after 3 warm-up steps; peak "
          f"{peak or '?'} TFLOP/s")
    print("\n| precision | method | ms/step | samples/s | peak GB | TFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|")
    for precision in precisions:
        rows = {}
        for method in ("clip", "declip"):
            ms, gb, flops = measure(method, args.batch, precision, args.steps)
            rows[method] = (ms, gb)
            mfu = f"{flops / (ms / 1e3) / (peak * 1e12):.1%}" if peak else "?"
            print(f"| {precision} | {method} | {ms:.0f} | {args.batch / ms * 1e3:.0f} | "
                  f"{gb:.1f} | {flops / 1e12:.2f} | {mfu} |", flush=True)
        (ms_c, gb_c), (ms_d, gb_d) = rows["clip"], rows["declip"]
        print(f"| {precision} | DeCLIP / CLIP | {ms_d / ms_c:.2f}x | | {gb_d / gb_c:.2f}x "
              f"(paper: 1.5x time, 22.7 / 15.8 = 1.44x memory) | | |", flush=True)
    ok = args.no_smoke or smoke_torchrun()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
