"""Benchmarks, measured side by side in one run so the ratios hold on whatever machine runs them.

    python bench.py                      # everything below, CPU, about 20 minutes
    python bench.py --only cpu --baseline 236ecf0   # the CPU table, against train.py at a commit
    python bench.py --only step,tokenizer,declip,mlm,methods --models tiny,ViT-B-32 --batch 8
    python bench.py --only views,index   # the data pipeline, one core
    python bench.py --gpu                # the GPU check (tools/gpu_check.py); skips without CUDA

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
- views:     the data pipeline per core, on 256 px JPEGs in an img2dataset-style tar it writes:
             decoding, EDA, CLIP's view, DeCLIP's view (torchvision on PIL images, as before, and
             views.DeclipView's tensor path, the same draws), and whole samples as ImageText makes
             them. CPU seconds of this process with one torch thread, so other load on the
             machine slows every row alike.
- attention: clip.attention against torch's fused SDPA kernel on CPU, fp32 and bf16, forward and
             backward at the tiny models' shapes (why the bf16 step uses plain ops on CPU).
- cpu:       the CPU table: FLOPs per sample of the demo's DeCLIP step (flop_counter), a matmul
             peak in fp32 and bf16 measured in the same run, the model-only step in fp32 / bf16 x
             contiguous / channels-last as GFLOP/s and % of that peak, the data pipeline alone,
             and train.py end to end (subprocesses, interleaved) with fp32 + contiguous and with
             its defaults; `--baseline REV` adds train.py as it was at git revision REV.
- index:     the shard index (data.ShardDataset) on tiny samples in pax tars as img2dataset
             writes them: building, opening, private and shared memory, extrapolated to 88M
             pairs (DeCLIP's largest set).

Timings interleave the contenders step by step and report medians, so background load hits all
alike. Each row prints how it was measured.
"""
import argparse
import copy
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

# the environment this ran in, for the train.py runs (importing train.py sets OMP_WAIT_POLICY)
START_ENV = dict(os.environ)

from clip import build_model, create_model
from declip import DeCLIP
import train
from losses import clip_loss


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


def declip_step(batch, precision, channels_last, model_name="tiny-rn", vocab_size=768):
    """train.py's step (DeCLIP, all terms on, AdamW) on a fixed random batch, as a closure."""
    torch.manual_seed(0)
    clip = create_model(model_name, vocab_size=vocab_size, eot_id=vocab_size - 2)
    model = DeCLIP(clip, queue_size=batch * 4, mask_id=vocab_size - 1, vocab_size=vocab_size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    cfg = clip.config
    images, ids = fake_batch(2 * batch, cfg["image_resolution"], cfg["context_length"],
                             vocab_size, vocab_size - 2, "cpu")
    images = images.contiguous(memory_format=memory_format)
    view1, view2, ids_aug = images[:batch], images[batch:], ids[:batch].roll(1, dims=1)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = model(view1, view2, ids[:batch], ids_aug, push=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.push_queue()
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
    root = os.path.dirname(os.path.abspath(__file__))
    where = tempfile.mkdtemp(prefix="bench-baseline-")
    subprocess.run(["git", "worktree", "add", "--detach", where, rev], cwd=root, check=True,
                   capture_output=True)
    atexit.register(subprocess.run, ["git", "worktree", "remove", "--force", where], cwd=root,
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
    root = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    if baseline:
        runs[f"train.py at {baseline}"] = (baseline_checkout(baseline), common, "fp32")
    runs["train.py --precision fp32 --no-channels-last"] = (
        root, common + ["--precision", "fp32", "--no-channels-last"], "fp32")
    runs["train.py (defaults)"] = (root, common, train.default_precision(torch.device("cpu")))
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


# ----------------------------------------------------------------------------- data pipeline

def photo_jpeg(rng, side=256):
    """A stand-in for a web photo: smooth colour gradients and noise, JPEG quality 90 (~30 KB
    at 256 px, the size img2dataset writes for CC3M)."""
    from PIL import Image
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([np.sin(x * rng.uniform(2, 9) + y * rng.uniform(-5, 5) + rng.uniform(0, 6))
                    for _ in range(3)], -1) * 90 + 128 + rng.normal(0, 15, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, samples):
    """img2dataset's layout, KEY.jpg + KEY.txt + KEY.json, written as webdataset's TarWriter
    writes it: pax format with a float mtime, hence a pax header before every member."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, jpg, caption in samples:
            for ext, payload in (("jpg", jpg), ("txt", caption.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(payload), time.time()
                tar.addfile(info, io.BytesIO(payload))


def torchvision_draws(view, image):
    """views.DeclipView's draws as they were made before: torchvision's get_params, one call to
    torch's RNG a number (DeclipView.sample draws the same distributions in one call)."""
    from torchvision import transforms as T
    crop = T.RandomResizedCrop.get_params(image, view.scale, (3 / 4, 4 / 3))
    b, c, s, h = view.jitter
    jitter = (T.ColorJitter.get_params([1 - b, 1 + b], [1 - c, 1 + c], [1 - s, 1 + s], [-h, h])
              if torch.rand(()) < view.p_jitter else None)
    gray = bool(torch.rand(()) < view.p_gray)
    sigma = T.GaussianBlur.get_params(*view.sigma) if torch.rand(()) < view.p_blur else None
    return dict(crop=crop, jitter=jitter, gray=gray, sigma=sigma,
                flip=view.flip and bool(torch.rand(()) < 0.5))


def cpu_interleaved(fns, n, rounds):
    """Median over rounds of the CPU seconds of this process that each fn(round, i) takes for
    i < n; the fns take turns item by item, so that other load on the machine hits all alike."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        total = dict.fromkeys(fns, 0.0)
        for i in range(n):
            for k, fn in fns.items():
                t = time.process_time()
                fn(r, i)
                total[k] += time.process_time() - t
        for k in fns:
            times[k].append(total[k])
    return {k: statistics.median(v) for k, v in times.items()}


def bench_views(size, n=48, rounds=5):
    """Per core: decoding, EDA, one view, and whole samples as data.ImageText makes them."""
    import data
    import eda
    import views
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    rng = np.random.default_rng(0)
    captions = [data.SyntheticCaptions(seed=1).caption(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        write_shard(os.path.join(folder, "00000.tar"),
                    [(f"{i:09d}", photo_jpeg(rng), captions[i]) for i in range(n)])
        base = data.ShardDataset(folder, index_dir=folder)
        images = [base[i][0] for i in range(n)]
        kb = os.path.getsize(os.path.join(folder, "00000.tar")) / n / 1024
        view, clip_view = views.DeclipView(size), views.clip_image_transform(size)

        def before(image):  # before: torchvision's draws and ops on PIL images
            return view.apply_torchvision(image, torchvision_draws(view, image))

        def one_view(transform):
            def run(r, i):
                torch.default_generator.manual_seed(r * n + i)  # the same draws for all
                transform(images[i])
            return run

        def sample(transform, n_views, text_aug):
            datasets = [data.ImageText(base, transform, views=n_views, text_aug=text_aug)]

            def run(r, i):
                datasets[0].set_epoch(r)  # the same draws for the same (epoch, index)
                datasets[0][i]
            return run
        before_view = "DeCLIP's view, before (torchvision on PIL)"
        before_sample = "DeCLIP sample, before (decode + 2 views + EDA)"
        rows = {
            "read + decode a JPEG": (lambda r, i: base[i], None),
            "EDA, one caption": (lambda r, i: eda.augment(captions[i], random.Random(r)), None),
            "CLIP's view": (one_view(clip_view), None),
            before_view: (one_view(before), None),
            "DeCLIP's view, now (DeclipView)": (one_view(view), before_view),
            "CLIP sample (decode + 1 view)": (sample(clip_view, 1, None), None),
            before_sample: (sample(before, 2, eda.augment), None),
            "DeCLIP sample, now": (sample(view, 2, eda.augment), before_sample),
        }
        t = cpu_interleaved({k: fn for k, (fn, _) in rows.items()}, n, rounds)
    torch.set_num_threads(threads)
    print(f"\n## Data pipeline per core: 256 px JPEGs ({kb:.0f} KB) in a tar shard -> {size} px "
          f"views ({n} images x {rounds} rounds, median round, CPU time, 1 thread)")
    print("| step | ms (CPU) | per second per core | speed-up |")
    print("|---|---|---|---|")
    for k, (_, reference) in rows.items():
        speedup = f"{t[reference] / t[k]:.2f}x" if reference else ""
        print(f"| {k} | {t[k] / n * 1e3:.2f} | {n / t[k]:,.0f} | {speedup} |")
    clip = t["CLIP sample (decode + 1 view)"]
    print(f"A DeCLIP sample costs {t['DeCLIP sample, now'] / clip:.1f} CLIP samples (before: "
          f"{t[before_sample] / clip:.1f}).")


INDEX_PROBE = r"""
import json, os, random, re, sys, time
sys.path.insert(0, {repo!r})
import numpy as np, data
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
anon, mapped = status("RssAnon"), status("RssFile")
cpu, wall = time.process_time(), time.perf_counter()
ds = data.ShardDataset({folder!r})
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
rng = random.Random(0)
t = time.perf_counter()
for _ in range(20000):
    ds.row(rng.randrange(len(ds)))
lookup = (time.perf_counter() - t) / 20000
private = status("RssAnon") - anon
for index in ds.indexes:  # fault in every page of every index
    int(np.asarray(index)[:, 0].sum())
print(json.dumps(dict(n=len(ds), cpu=cpu, wall=wall, private=private, lookup=lookup,
                      mapped=status("RssFile") - mapped)))
"""


def probe_index(folder):
    """ShardDataset(folder) opened in a fresh process: its time, memory and row lookups."""
    code = INDEX_PROBE.format(repo=os.path.dirname(os.path.abspath(__file__)), folder=folder)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_index(n_samples, per_shard=10_000, pairs=88_000_000, ranks=8):
    """Build and open the shard index on tiny samples, extrapolated to `pairs`."""
    n_shards = max(1, n_samples // per_shard)
    with tempfile.TemporaryDirectory() as folder:
        first = os.path.join(folder, "00000.tar")
        write_shard(first, [(f"{i:09d}", b"\xff\xd8 tiny", "a caption") for i in range(per_shard)])
        for k in range(1, n_shards):  # copies: the index does not care that the keys repeat
            shutil.copyfile(first, os.path.join(folder, f"{k:05d}.tar"))
        one = os.path.join(folder, "one")
        os.mkdir(one)
        built = probe_index(folder)  # first open: scans every shard
        for ext in ("", ".idx.npy"):
            os.link(first + ext, os.path.join(one, "00000.tar" + ext))
        cached, single = probe_index(folder), probe_index(one)
        import data
        t = time.process_time()
        data._scan_shard(first)
        ours = time.process_time() - t
        t = time.process_time()
        with tarfile.open(first) as tar:
            for _ in tar:
                pass
        theirs = time.process_time() - t
    n, shards_at_scale = built["n"], pairs / per_shard
    # private memory = fixed + per shard: from 1 shard and from n_shards
    per_shard_bytes = max(0.0, (cached["private"] - single["private"]) / max(1, n_shards - 1))
    scale = pairs / n
    print(f"\n## Shard index: {n:,} tiny samples in {n_shards} pax tars of {per_shard:,} "
          f"(jpg + txt + json, a pax header each, as img2dataset writes them), each open in a "
          f"fresh process; extrapolated to {pairs / 1e6:.0f}M pairs in {shards_at_scale:,.0f} "
          f"shards")
    print(f"| | measured | at {pairs / 1e6:.0f}M pairs |")
    print("|---|---|---|")
    print(f"| first open: scan the tar headers, write `.idx.npy` (CPU) | {built['cpu']:.2f} s "
          f"({built['cpu'] / n * 1e6:.1f} us a sample) | {built['cpu'] * scale / 3600:.2f} h on "
          f"one core, {built['cpu'] * scale / ranks / 60:.1f} min a rank with {ranks} ranks "
          f"(plus reading the headers from disk) |")
    print(f"| later opens, index cached (wall) | {cached['wall'] * 1e3:.0f} ms "
          f"({cached['wall'] / n_shards * 1e3:.2f} ms a shard) | "
          f"{cached['wall'] / n_shards * shards_at_scale:.0f} s |")
    print(f"| private memory a process (RssAnon) | {cached['private'] / 1024:.0f} KiB "
          f"({cached['private'] / n:.2f} B a sample; {per_shard_bytes:,.0f} B a shard) | "
          f"{(single['private'] + per_shard_bytes * shards_at_scale) / 2 ** 20:.0f} MiB a rank "
          f"(before: 41 B a sample = {41 * pairs / 2 ** 30:.1f} GiB a rank) |")
    print(f"| page cache, shared by every rank and worker (RssFile) | "
          f"{cached['mapped'] / n:.1f} B a sample | {cached['mapped'] / n * pairs / 2 ** 30:.1f} "
          f"GiB a node |")
    print(f"| random row lookup | {cached['lookup'] * 1e6:.1f} us | |")
    print(f"| one shard's headers: data's scan / Python's tarfile (CPU) | {ours * 1e3:.0f} ms / "
          f"{theirs * 1e3:.0f} ms ({theirs / ours:.0f}x) | |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only",
                   default="step,tokenizer,declip,mlm,methods,views,index,attention,cpu")
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
                        "memory, MFU, a torchrun smoke run (tools/gpu_check.py)")
    args = p.parse_args()
    if args.gpu:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
        import gpu_check
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
        bench_views(args.view_size)
    if "attention" in only:
        bench_attention(args.repeat)
    if "cpu" in only:
        bench_cpu(args.cpu_batch, args.cpu_steps, args.cpu_rounds, args.baseline)
    if "index" in only:
        bench_index(args.index_samples)


if __name__ == "__main__":
    main()
