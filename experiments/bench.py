"""Benchmarks, measured side by side in one run so the ratios hold on whatever machine runs them.

    python experiments/bench.py              # everything below, CPU, about 20 minutes
    python experiments/bench.py --only cpu --baseline 236ecf0   # the CPU table, against train.py
    python experiments/bench.py --only step,tokenizer,declip,mlm,methods --models tiny,ViT-B-32
    python experiments/bench.py --only views,index   # the data pipeline, one core
    python experiments/bench.py --gpu        # the GPU check (gpu_check.py); skips without CUDA

- step:      one full training step (forward, loss, backward, AdamW) of our CLIP against OpenCLIP's
             on the same architecture, the same weights and the same batch, with the loss of both
             printed to show the numerics agree. Needs `open_clip_torch` (not a dependency: the
             comparison is skipped without it).
- tokenizer: captions/s of our BPE tokenizer against OpenCLIP's (same ids; checked).
- declip:    DeCLIP step time / CLIP step time on the same model and batch, and the memory ratio
             (peak CUDA memory on a GPU; on CPU the bytes autograd saves for backward, which is
             what the extra views cost); and DeCLIP against CLIP at twice the batch: the towers
             then do the same work, so that ratio minus 1 is DeCLIP's overhead beyond its views.
- mlm:       DeCLIP's step with each MLM text pass (--mlm-pass shared / separate / bidirectional)
             relative to the shared one (the official code's).
- methods:   samples/s of CLIP, FLIP (patch dropout 0.5), SigLIP, SigFLIP and ToMe relative to
             CLIP on the same model and batch (the medium-scale study's Fig. 4).
- views:     the data pipeline per core: decoding, EDA, CLIP's and DeCLIP's views, whole samples
             (bench_data.py).
- attention: clip.attention against torch's fused SDPA kernel on CPU, fp32 and bf16, forward and
             backward at the tiny models' shapes (why the bf16 step uses plain ops on CPU).
- cpu:       the CPU table: FLOPs per sample of the demo's DeCLIP step (flop_counter), a matmul
             peak in fp32 and bf16 measured in the same run, the model-only step in fp32 / bf16 x
             contiguous / channels-last as GFLOP/s and % of that peak, the data pipeline alone,
             and train.py end to end (subprocesses, interleaved) with fp32 + contiguous and with
             its defaults; `--baseline REV` adds train.py as it was at git revision REV.
- index:     the shard index (shards.ShardDataset): building, opening, memory, extrapolated to
             88M pairs (bench_data.py).

Timings interleave the contenders step by step and report medians, so background load hits all
alike. Each row prints how it was measured.
"""
import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# the environment this ran in, for the train.py runs (importing train.py sets OMP_WAIT_POLICY)
START_ENV = dict(os.environ)

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import bench_data  # noqa: E402  (siblings in experiments/)
import gpu_check  # noqa: E402
import train  # noqa: E402
from optim import BadSteps  # noqa: E402
from declip import DeCLIP  # noqa: E402
from factory import build_model, create_model  # noqa: E402
from losses import clip_loss  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: time the work, not the launches


def interleaved(fns, warmup=2, repeat=6):
    """Median seconds of each of several fns, called in turn so that load hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def fake_batch(batch, image_size, context_length, vocab_size, eot_id, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.randint(1, eot_id - 1, (batch, context_length), generator=g)
    ids[:, 0] = eot_id - 1                               # SOT
    ids[:, context_length // 2] = eot_id                 # EOT half way, then padding
    ids[:, context_length // 2 + 1:] = 0
    return images.to(device), ids.to(device)


# ----------------------------------------------------------------------------- ours vs OpenCLIP

def openclip_twin(name):
    """OpenCLIP's model of the same architecture, and ours built from its (random) weights."""
    import open_clip
    if name == "tiny":
        ref = open_clip.model.CLIP(
            128, dict(layers=3, width=128, patch_size=8, image_size=64, head_width=32),
            dict(context_length=32, vocab_size=49409, width=128, heads=4, layers=3))
        ours = build_model(ref.state_dict(), act="gelu", vision_heads=4, transformer_heads=4)
    else:
        ref = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
        ours = build_model(ref.state_dict())
    return ours.train(), ref.train()


def bench_step(models, batch, device, repeat):
    try:
        import open_clip
    except ImportError:
        print("step: open_clip_torch is not installed; `pip install open_clip_torch` to compare")
        return
    print(f"\n## Training step, ours vs OpenCLIP (batch {batch}, {device}, "
          f"{torch.get_num_threads()} threads, median of {repeat} interleaved steps)")
    print("| model | ours (ms) | OpenCLIP, same AdamW (ms) | OpenCLIP, its default AdamW (ms) | "
          "speed-up (same / default) | max loss difference |")
    print("|---|---|---|---|---|---|")
    for name in models:
        ours, ref = openclip_twin(name)
        ours, ref = ours.to(device), ref.to(device)
        cfg = ours.config
        images, ids = fake_batch(batch, cfg["image_resolution"], cfg["context_length"],
                                 cfg["vocab_size"], 49407, device)
        # Our step uses train.py's multi-tensor AdamW. OpenCLIP is timed twice: with the same
        # optimiser (the difference is then model + loss alone) and with the AdamW its training
        # script builds (torch's default: one tensor at a time on CPU, multi-tensor on GPU).
        ref_default = copy.deepcopy(ref)
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, foreach=True)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-5, foreach=True)
        opt_ref_default = torch.optim.AdamW(ref_default.parameters(), lr=1e-5)
        loss_fn_ref = open_clip.ClipLoss()
        losses = {"ours": [], "ref": []}

        def step_ours():
            z_img, z_txt, scale = ours(images, ids)
            loss = clip_loss(z_img, z_txt, scale)
            opt_ours.zero_grad(set_to_none=True)
            loss.backward()
            opt_ours.step()
            losses["ours"].append(loss.detach())

        def step_ref(model, opt, record):
            z_img, z_txt, scale = model(images, ids)[:3]
            loss = loss_fn_ref(z_img, z_txt, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if record:
                losses["ref"].append(loss.detach())

        t = interleaved({"ours": step_ours,
                         "ref": lambda: step_ref(ref, opt_ref, True),
                         "default": lambda: step_ref(ref_default, opt_ref_default, False)},
                        repeat=repeat)
        diff = max(abs(float(a) - float(b)) for a, b in zip(losses["ours"], losses["ref"]))
        print(f"| {name} | {t['ours'] * 1e3:.0f} | {t['ref'] * 1e3:.0f} | "
              f"{t['default'] * 1e3:.0f} | {t['ref'] / t['ours']:.2f}x / "
              f"{t['default'] / t['ours']:.2f}x | {diff:.1e} |")


def bench_tokenizer(n=10000):
    from data import SyntheticCaptions
    from tokenizer import Tokenizer
    captions = [SyntheticCaptions(seed=1).caption(i) for i in range(n)]
    ours = Tokenizer.openai()
    rows = [("ours", lambda: ours(captions, context_length=77))]
    try:
        from open_clip.tokenizer import SimpleTokenizer
        ref = SimpleTokenizer()
        assert torch.equal(ours(captions[:500]), ref(captions[:500]))
        rows.append(("OpenCLIP", lambda: ref(captions, context_length=77)))
    except ImportError:
        pass
    print(f"\n## Tokenizer ({n} built-in captions, batch call, median of 3 after a warm-up)")
    print("| tokenizer | captions/s |")
    print("|---|---|")
    t = interleaved(dict(rows), warmup=1, repeat=3)
    for label, _ in rows:
        print(f"| {label} | {n / t[label]:,.0f} |")


# ----------------------------------------------------------------------------- DeCLIP vs CLIP

def saved_activation_bytes(fn):
    """Bytes autograd keeps for backward during fn() (distinct storages): the CPU memory proxy."""
    seen, total = set(), [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def make_trainer(method, model_name, vocab_size, device, loss="infonce", mlm_pass="shared",
                 **kw):
    """(DeCLIP module, AdamW) for method "clip" (all switches off) or "declip" (all on)."""
    clip = create_model(model_name, vocab_size=vocab_size, eot_id=vocab_size - 2, **kw)
    on = method == "declip"
    model = DeCLIP(clip, mvs=on, ss=on, nns=on, loss=loss, queue_size=8192,
                   mask_id=vocab_size - 1, vocab_size=vocab_size,
                   mlm_pass=mlm_pass).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    return model, opt


def step_fn(model, opt, images, ids):
    two = model.mvs or model.ss

    def step():
        loss, _ = model(images, images.flip(-1) if two else None, ids,
                        ids.clone() if model.mvs else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_declip(models, batch, device, repeat, vocab_size=1024):
    print(f"\n## DeCLIP / CLIP cost (batch {batch}, vocab {vocab_size}, {device}, median of "
          f"{repeat} interleaved steps; memory: "
          + ("peak CUDA allocation)" if device.type == "cuda" else "bytes saved for backward)"))
    print("DeCLIP encodes 2 image views and 2 captions: CLIP at twice the batch does the same "
          "tower work, so DeCLIP / CLIP(2x batch) - 1 is what the heads, losses and queue add.")
    print(f"| model | CLIP step (ms) | DeCLIP step (ms) | CLIP at batch {2 * batch} (ms) | "
          f"time ratio | vs CLIP at 2x batch | memory ratio | memory vs CLIP at 2x batch |")
    print("|---|---|---|---|---|---|---|---|")
    for name in models:
        fns, mem = {}, {}
        for label, method, size in (("clip", "clip", batch), ("declip", "declip", batch),
                                    ("clip2", "clip", 2 * batch)):
            model, opt = make_trainer(method, name, vocab_size, device)
            cfg = model.clip.config
            images, ids = fake_batch(size, cfg["image_resolution"], cfg["context_length"],
                                     vocab_size, vocab_size - 2, device)
            fns[label] = step_fn(model, opt, images, ids)
            mem[label] = peak_memory(fns[label], device)
        t = interleaved(fns, repeat=repeat)
        print(f"| {name} | {t['clip'] * 1e3:.0f} | {t['declip'] * 1e3:.0f} | "
              f"{t['clip2'] * 1e3:.0f} | {t['declip'] / t['clip']:.2f}x | "
              f"{t['declip'] / t['clip2']:.2f}x | {mem['declip'] / mem['clip']:.2f}x | "
              f"{mem['declip'] / mem['clip2']:.2f}x |")


def bench_mlm_pass(models, batch, device, repeat, vocab_size=1024):
    """DeCLIP's step with each MLM text pass, relative to the shared pass."""
    print(f"\n## DeCLIP's MLM text pass (batch {batch}, {device}, median of {repeat} "
          f"interleaved steps)")
    print("| model | shared (ms) | separate (ms) | bidirectional (ms) | separate / shared "
          "| bidirectional / shared |")
    print("|---|---|---|---|---|---|")
    for name in models:
        fns = {}
        for mlm_pass in ("shared", "separate", "bidirectional"):
            model, opt = make_trainer("declip", name, vocab_size, device, mlm_pass=mlm_pass)
            cfg = model.clip.config
            images, ids = fake_batch(batch, cfg["image_resolution"], cfg["context_length"],
                                     vocab_size, vocab_size - 2, device)
            fns[mlm_pass] = step_fn(model, opt, images, ids)
        t = interleaved(fns, repeat=repeat)
        print(f"| {name} | {t['shared'] * 1e3:.0f} | {t['separate'] * 1e3:.0f} | "
              f"{t['bidirectional'] * 1e3:.0f} | {t['separate'] / t['shared']:.2f}x | "
              f"{t['bidirectional'] / t['shared']:.2f}x |")


def peak_memory(fn, device):
    """Peak bytes a training step adds on top of what is allocated before it (weights, Adam
    state and every other contender's tensors), or on CPU the bytes saved for backward."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return saved_activation_bytes(fn)


def bench_methods(models, batch, device, repeat, vocab_size=1024):
    """The study's Fig. 4: samples/s of each variant relative to CLIP (ToMe: r merges per block
    such that about half of the image tokens are gone after the last block)."""
    print(f"\n## Throughput of the CLIP variants (batch {batch}, {device}, median of {repeat} "
          f"interleaved steps; memory as above)")
    print("| model | method | samples/s | vs CLIP | memory vs CLIP |")
    print("|---|---|---|---|---|")
    for name in models:
        cfg = create_model(name, vocab_size=vocab_size).config
        n_tokens = (cfg["image_resolution"] // cfg["vision_patch_size"]) ** 2
        r = max(1, n_tokens // (2 * cfg["vision_layers"]))
        variants = {"CLIP": {}, "FLIP (p=0.5)": {"patch_dropout": 0.5},
                    "SigLIP": {"loss": "siglip"},
                    "SigFLIP": {"loss": "siglip", "patch_dropout": 0.5},
                    f"ToMe (r={r})": {"tome_r": r}}
        fns, mem = {}, {}
        for label, kw in variants.items():
            model, opt = make_trainer("clip", name, vocab_size, device, **kw)
            images, ids = fake_batch(batch, cfg["image_resolution"], cfg["context_length"],
                                     vocab_size, vocab_size - 2, device)
            fns[label] = step_fn(model, opt, images, ids)
            mem[label] = peak_memory(fns[label], device)
        t = interleaved(fns, repeat=repeat)
        for label in fns:
            print(f"| {name} | {label} | {batch / t[label]:.1f} | {t['CLIP'] / t[label]:.2f}x | "
                  f"{mem[label] / mem['CLIP']:.2f}x |")


# ----------------------------------------------------------------------------- the CPU step

def matmul_peak(dtype, n=2048, repeat=5):
    """FLOP/s of an n x n x n matrix product in dtype with this process's threads: the
    practical ceiling the training step is measured against."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = interleaved({"mm": lambda: a @ b}, warmup=2, repeat=repeat)["mm"]
    return 2 * n ** 3 / t


def declip_step(batch, precision, channels_last):
    """train.py's own step (train.train_step: DeCLIP with every term, AdamW, the finite check,
    the queue push) on a fixed random batch of the demo's model, as a closure."""
    cpu = torch.device("cpu")
    args = train.get_args(["--batch-size", str(batch), "--precision", precision, "--steps", "100",
                           "--queue-size", str(4 * batch), "--device", "cpu",
                           "--channels-last" if channels_last else "--no-channels-last"])
    args.total_steps = 100
    vocab = 768  # the demo's learned BPE: its last ids are <start>, <end>, <mask>
    tokenizer = SimpleNamespace(vocab_size=vocab, sot_id=vocab - 3, eot_id=vocab - 2,
                                mask_id=vocab - 1)
    model = train.build_declip(args, tokenizer, 2000, 1, cpu, None)
    ddp, memory_format = train.wrap_model(model, args, cpu, 1)
    optimizer, scaler, autocast = train.build_optimizer(model, args, cpu, None)
    bad = BadSteps(model, max_in_a_row=1)
    cfg = model.clip.config
    images, ids = fake_batch(2 * batch, cfg["image_resolution"], cfg["context_length"], vocab,
                             vocab - 2, "cpu")
    fixed = train.to_device(dict(image=images[:batch], image_aug=images[batch:], ids=ids[:batch],
                                 ids_aug=ids[:batch].roll(1, dims=1)), cpu, memory_format)
    train.train_mode(model)

    def step():
        train.train_step(model, ddp, fixed, optimizer, scaler, autocast, bad, 0, args)
    return step


def step_flops(step):
    """FLOPs of one call of step (forward and backward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def data_samples_per_s(batch, steps=3):
    """Samples/s of train.py's data pipeline in this process (builtin DeCLIP data: render, two
    views, EDA, tokenise, collate), as one DataLoader worker runs it: one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = train.get_args(["--batch-size", str(batch), "--train-size", "2000", "--workers", "0"])
    base = train.build_base(args)
    tokenizer, _ = train.build_tokenizer(args, base, None)
    args.context_length = 32
    loader = train.build_loader(args, base, tokenizer, 64, 0, 1, total_steps=steps + 1)[2]
    batches = iter(loader)
    next(batches)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        next(batches)
    seconds = time.perf_counter() - t
    torch.set_num_threads(threads)
    return steps * batch / seconds


def run_train(root, flags, out):
    """Runs train.py in `root` with flags; -> its training samples/s (from log.jsonl)."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "train.py", *flags, "--output", out], cwd=root, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=START_ENV)
    with open(os.path.join(out, "log.jsonl")) as f:
        final = [json.loads(line) for line in f if '"final"' in line][-1]
    return final["final"]["samples_per_s"]


def baseline_checkout(rev):
    """A detached git worktree of revision rev (train.py as it was), removed at exit."""
    import atexit
    where = tempfile.mkdtemp(prefix="bench-baseline-")
    subprocess.run(["git", "worktree", "add", "--detach", where, rev], cwd=REPO, check=True,
                   capture_output=True)
    atexit.register(subprocess.run, ["git", "worktree", "remove", "--force", where], cwd=REPO,
                    capture_output=True)
    return where


def bench_attention(repeat):
    """clip.attention against F.scaled_dot_product_attention (its fused kernel) at the demo's
    shapes, forward + backward on CPU: why the bf16 step takes the plain formula there."""
    from clip import attention
    print(f"\n## Attention on CPU, forward + backward (median of {repeat} interleaved calls, "
          f"{torch.get_num_threads()} threads)")
    print("| shape (B, H, L, S, d) | dtype | fused SDPA (ms) | clip.attention (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for (B, H, L, S, d), causal in (((512, 4, 17, 17, 32), True), ((512, 4, 1, 5, 4), False)):
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_()
                       for n in (L, S, S))

            def sdpa():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).float().sum().backward()

            def ours():
                attention(q, k, v, is_causal=causal).float().sum().backward()
            t = interleaved({"sdpa": sdpa, "ours": ours}, repeat=repeat)
            print(f"| {(B, H, L, S, d)}{' causal' if causal else ''} | "
                  f"{str(dtype).split('.')[-1]} | {t['sdpa'] * 1e3:.1f} | {t['ours'] * 1e3:.1f} | "
                  f"{t['sdpa'] / t['ours']:.2f}x |")


def bench_cpu(batch, steps, rounds, baseline=None):
    """The CPU table: the DeCLIP demo model's step against this CPU's matmul peak, in fp32 and
    bf16, contiguous and channels-last; the data pipeline; train.py end to end."""
    print(f"\n## The CPU step: DeCLIP tiny-rn, batch {batch}, {torch.get_num_threads()} threads "
          f"({os.cpu_count()} cores; bf16 in hardware: "
          f"{torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()})")
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    flops = step_flops(declip_step(batch, "fp32", False)) / batch
    print(f"FLOPs per sample (forward + backward, flop_counter): {flops / 1e6:.0f} M; "
          f"2048^3 matmul peak: {peak['fp32'] / 1e9:.0f} GFLOP/s fp32, "
          f"{peak['bf16'] / 1e9:.0f} GFLOP/s bf16")
    print("| what | samples/s | GFLOP/s | % of the matmul peak (same precision) | speed-up |")
    print("|---|---|---|---|---|")

    def row(label, samples_per_s, precision, reference):
        achieved = flops * samples_per_s
        print(f"| {label} | {samples_per_s:.0f} | {achieved / 1e9:.0f} | "
              f"{achieved / peak[precision]:.0%} | {samples_per_s / reference:.2f}x |")
    configs = {(p, cl): declip_step(batch, p, cl) for p in ("fp32", "bf16") for cl in (0, 1)}
    t = interleaved(configs, warmup=2, repeat=rounds * 3)
    for (precision, cl), seconds in t.items():
        row(f"model only, {precision}, {'channels-last' if cl else 'contiguous'}",
            batch / seconds, precision, batch / t[("fp32", 0)])
    data = data_samples_per_s(batch)
    print(f"| data pipeline alone, one process, one thread | {data:.0f} | | | |")

    # train.py end to end, data loading included: the old settings (fp32, contiguous) and the
    # defaults; with --baseline REV also train.py as it was at REV, with its own defaults
    common = ["--batch-size", str(batch), "--train-size", "2000", "--steps", str(steps),
              "--eval-size", "42", "--log-every", str(steps)]
    runs = {}
    if baseline:
        runs[f"train.py at {baseline}"] = (baseline_checkout(baseline), common, "fp32")
    runs["train.py --precision fp32 --no-channels-last"] = (
        REPO, common + ["--precision", "fp32", "--no-channels-last"], "fp32")
    runs["train.py (defaults)"] = (REPO, common, train.default_precision(torch.device("cpu")))
    speeds = {k: [] for k in runs}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(rounds):  # interleaved: load on the machine hits every run alike
            for label, (where, flags, _) in runs.items():
                speeds[label].append(run_train(where, flags, os.path.join(out, "run")))
    print(f"\ntrain.py end to end, data loading included (batch {batch}, 2,000 built-in pairs, "
          f"{steps} steps, training samples/s of its log, median of {rounds} interleaved runs; "
          f"speed-up against the first row):")
    print("| run | samples/s | GFLOP/s | % of the matmul peak (same precision) | speed-up |")
    print("|---|---|---|---|---|")
    first = statistics.median(next(iter(speeds.values())))
    for label, (_, _, precision) in runs.items():
        row(label, statistics.median(speeds[label]), precision, first)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only",
                   default="step,tokenizer,declip,mlm,methods,views,index,attention,cpu",
                   help="comma-separated benchmarks (default: all of them, in this order)")
    p.add_argument("--models", default="tiny,ViT-B-32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--view-size", type=int, default=224, help="views: output side (RN50: 224)")
    p.add_argument("--index-samples", type=int, default=100_000,
                   help="index: tiny samples to index (in shards of 10,000)")
    p.add_argument("--cpu-batch", type=int, default=256, help="cpu: batch of the CPU table")
    p.add_argument("--cpu-steps", type=int, default=100,
                   help="cpu: steps of each end-to-end train.py run")
    p.add_argument("--cpu-rounds", type=int, default=2,
                   help="cpu: interleaved rounds of the end-to-end runs")
    p.add_argument("--baseline", default=None,
                   help="cpu: also time train.py as it was at this git revision (its defaults)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpu", action="store_true",
                   help="run only the GPU check: DeCLIP vs CLIP RN50 at 128 per GPU, fp16/bf16, "
                        "memory, MFU, a torchrun smoke run (gpu_check.py)")
    args = p.parse_args()
    if args.gpu:
        raise SystemExit(gpu_check.main([]))
    if args.threads:
        torch.set_num_threads(args.threads)
    device, models, only = torch.device(args.device), args.models.split(","), args.only.split(",")
    torch.manual_seed(0)
    if "step" in only:
        bench_step(models, args.batch, device, args.repeat)
    if "tokenizer" in only:
        bench_tokenizer()
    if "declip" in only:
        bench_declip(models, args.batch, device, args.repeat)
    if "mlm" in only:
        bench_mlm_pass(models, args.batch, device, args.repeat)
    if "methods" in only:
        bench_methods(models, args.batch, device, args.repeat)
    if "views" in only:
        bench_data.bench_views(args.view_size)
    if "attention" in only:
        bench_attention(args.repeat)
    if "cpu" in only:
        bench_cpu(args.cpu_batch, args.cpu_steps, args.cpu_rounds, args.baseline)
    if "index" in only:
        bench_data.bench_index(args.index_samples)


if __name__ == "__main__":
    main()
