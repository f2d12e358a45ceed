"""Benchmarks, measured side by side in one run so the ratios hold on whatever machine runs them.

    python bench.py                      # everything below, CPU, a few minutes
    python bench.py --only step,tokenizer,declip,mlm,methods --models tiny,ViT-B-32 --batch 8

- step:      one full training step (forward, loss, backward, AdamW) of our CLIP against OpenCLIP's
             on the same architecture, the same weights and the same batch, with the loss of both
             printed to show the numerics agree. Needs `open_clip_torch` (not a dependency: the
             comparison is skipped without it).
- tokenizer: captions/s of our BPE tokenizer against OpenCLIP's (same ids; checked).
- declip:    DeCLIP step time / CLIP step time on the same model and batch, and the memory ratio
             (peak CUDA memory on a GPU; on CPU the bytes autograd saves for backward, which is
             what the extra views cost).
- mlm:       DeCLIP's step with each MLM text pass (--mlm-pass shared / separate / bidirectional)
             relative to the shared one (the official code's).
- methods:   samples/s of CLIP, FLIP (patch dropout 0.5), SigLIP, SigFLIP and ToMe relative to
             CLIP on the same model and batch (the medium-scale study's Fig. 4).

Timings interleave the contenders step by step and report medians, so background load hits all
alike. Each row prints how it was measured.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from clip import build_model, create_model
from declip import DeCLIP
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
    print("| model | CLIP step (ms) | DeCLIP step (ms) | time ratio | memory ratio |")
    print("|---|---|---|---|---|")
    for name in models:
        fns, mem = {}, {}
        for method in ("clip", "declip"):
            model, opt = make_trainer(method, name, vocab_size, device)
            cfg = model.clip.config
            images, ids = fake_batch(batch, cfg["image_resolution"], cfg["context_length"],
                                     vocab_size, vocab_size - 2, device)
            fns[method] = step_fn(model, opt, images, ids)
            mem[method] = peak_memory(fns[method], device)
        t = interleaved(fns, repeat=repeat)
        print(f"| {name} | {t['clip'] * 1e3:.0f} | {t['declip'] * 1e3:.0f} | "
              f"{t['declip'] / t['clip']:.2f}x | {mem['declip'] / mem['clip']:.2f}x |")


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="step,tokenizer,declip,mlm,methods")
    p.add_argument("--models", default="tiny,ViT-B-32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
