"""Two small studies on the built-in data in one command: DeCLIP's Table 4 ablation and the CLIP
variants of the medium-scale study (its Figs. 3/4), every configuration on the same budget.

    python study.py                       # the default study: 2 CPU cores, ~25 minutes
    python study.py --quick               # a 1-minute smoke version, written to results/quick/
    python study.py --seeds 3 --steps 250 --configs clip,declip

(a) DeCLIP Table 4 (Li et al., ICLR 2022, Sec. 4.4; CC3M, RN50, ImageNet zero-shot top-1): the extra
    supervisions added cumulatively, CLIP 20.6 -> +MVS 24.8 -> +SS 25.4 -> +NNS (= DeCLIP) 27.2.
(b) The medium-scale study, Figs. 3/4 (CC3M, ViT-S/16): CLIP, FLIP (patch dropout 0.5), SigLIP,
    SigFLIP and ToMe. Its text: SigLIP is best (+9 points top-1 over CLIP), FLIP and ToMe are below
    CLIP; throughput over CLIP: FLIP +23%, ToMe +16%, the sigmoid loss another +1% (SigFLIP is
    fastest).
    ToMe here merges a constant r per block, chosen so that about half of the tiny ViT's 64 + 1
    tokens are merged by the last block (`tome_r_for_half`: r = 11, 65 -> 54 -> 43 -> 32 tokens).

Every run is `train.main([...])` in this process, one after another, seed-major (all configurations
of seed 0, then seed 1, ...) so runs compared with each other ran close in time. Each run has its
own folder `<out>/runs/<config>-s<seed>` and is started with `--resume auto`: re-running the study
re-evaluates finished runs from their checkpoint instead of training them again (and finishes
interrupted ones). A seed changes the initial weights, the data order, the augmentations and the
built-in eval split (train.py evaluates on the split of its --seed), so configurations are compared
*paired by seed*: same seed, same eval images.

Outputs in <out>: study.md (tables), study.json (every run and the aggregates), study.png (top-1
with error bars and samples/s for both groups, drawn with Pillow) and nn_pairs.png (DeCLIP Fig. 9:
captions and the nearest *other* caption the NN queue finds, from the DeCLIP run's checkpoint).
Spread = sample standard deviation over seeds (n - 1 in the denominator); min-max are given too.

Left out: GPUs and DDP (train.py has them; this is a CPU study), pretrained towers (the study's
Fig. 3 uses a DINO image tower; here everything starts from scratch), and learning-rate tuning per
method: every configuration gets train.py's defaults and the same steps, batch and warm-up.
"""
import argparse
import json
import math
import os
import statistics
import sys
import textwrap
import time

from PIL import Image, ImageDraw, ImageFont

# name -> (label, groups, train.py flags). CLIP is run once and shared by both groups.
CONFIGS = {
    "clip": ("CLIP", ("table4", "fig3"), ["--method", "clip"]),
    "mvs": ("+MVS", ("table4",), ["--method", "declip", "--no-ss", "--no-nns"]),
    "mvs_ss": ("+MVS+SS", ("table4",), ["--method", "declip", "--no-nns"]),
    "declip": ("+MVS+SS+NNS (DeCLIP)", ("table4",), ["--method", "declip"]),
    "flip": ("FLIP", ("fig3",), ["--method", "clip", "--patch-dropout", "0.5"]),
    "siglip": ("SigLIP", ("fig3",), ["--method", "clip", "--loss", "siglip"]),
    "sigflip": ("SigFLIP", ("fig3",), ["--method", "clip", "--loss", "siglip",
                                       "--patch-dropout", "0.5"]),
    "tome": ("ToMe", ("fig3",), ["--method", "clip", "--tome-r", "{tome_r}"]),
}
GROUPS = {
    "table4": "(a) DeCLIP Table 4: supervisions added cumulatively",
    "fig3": "(b) Medium-scale study Figs. 3/4: CLIP variants",
}
# What the papers report (ImageNet zero-shot top-1 %; throughput relative to CLIP), per group.
PAPER = {
    "table4": {"clip": "20.6", "mvs": "24.8 (+4.2)", "mvs_ss": "25.4 (+4.8)",
               "declip": "27.2 (+6.6)"},
    "fig3": {"clip": "reference; 1.00x", "flip": "below CLIP; 1.23x",
             "siglip": "best, +9 pts; 1.01x", "sigflip": "fastest, ~1.24x",
             "tome": "below CLIP; 1.16x"},
}
# The papers' claims, checked pair by pair: (metric, a, b, sign of a - b the paper reports, text).
CLAIMS = [
    ("top1", "mvs", "clip", +1, "Table 4: MVS +4.2 pts over CLIP"),
    ("top1", "mvs_ss", "mvs", +1, "Table 4: SS +0.6 pts on top of MVS"),
    ("top1", "declip", "mvs_ss", +1, "Table 4: NNS +1.8 pts on top of MVS+SS"),
    ("top1", "declip", "clip", +1, "Table 4: DeCLIP +6.6 pts over CLIP"),
    ("top1", "siglip", "clip", +1, "Fig. 3: SigLIP +9 pts over CLIP"),
    ("top1", "flip", "clip", -1, "Fig. 3: FLIP below CLIP"),
    ("top1", "tome", "clip", -1, "Fig. 3: ToMe below CLIP"),
    ("samples_per_s", "flip", "clip", +1, "Fig. 4: FLIP 1.23x CLIP"),
    ("samples_per_s", "tome", "clip", +1, "Fig. 4: ToMe 1.16x CLIP"),
    ("samples_per_s", "sigflip", "flip", +1, "Fig. 4: SigFLIP fastest (1.01x FLIP)"),
]
METRICS = ("top1", "top5", "samples_per_s")
SPREAD = "std over seeds (sample std, n-1); min-max in brackets"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1-minute smoke version (10 steps, batch 16, 1 seed) into results/quick")
    p.add_argument("--out", default=None, help="default: results (results/quick with --quick)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--seeds", default=None,
                   help="number of seeds (2 -> seeds 0,1) or a comma list (0,5); default 2")
    p.add_argument("--steps", type=int, default=None, help="default 150 (10 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (16 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="default: steps // 8")
    p.add_argument("--eval-size", type=int, default=None,
                   help="built-in eval images (default 960 = 20 per class; 96 with --quick)")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes per run")
    p.add_argument("--nn-captions", type=int, default=None,
                   help="captions in the NN queue of nn_pairs.png (default 4096; 512 --quick)")
    args = p.parse_args(argv)
    args.argv = argv
    defaults = (dict(steps=10, batch_size=16, seeds="1", eval_size=96, nn_captions=512)
                if args.quick else
                dict(steps=150, batch_size=64, seeds="2", eval_size=960, nn_captions=4096))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or ("results/quick" if args.quick else "results")
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 8)
    args.seeds = ([int(s) for s in args.seeds.split(",")] if "," in args.seeds
                  else list(range(int(args.seeds))))
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs or not args.seeds:
        p.error(f"--configs: unknown {unknown} (choose from {','.join(CONFIGS)}) "
                f"or no configs/seeds given")
    return args


# ----------------------------------------------------------------------------- numbers

def summarize(values):
    """mean, sample std (0 for one value), min, max of a list of numbers."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def paired(runs_a, runs_b, metric):
    """Per-seed differences a - b (and ratios a / b) over the seeds both configurations ran."""
    a, b = {r["seed"]: r[metric] for r in runs_a}, {r["seed"]: r[metric] for r in runs_b}
    seeds = sorted(set(a) & set(b))
    return [a[s] - b[s] for s in seeds], [a[s] / b[s] if b[s] else math.nan for s in seeds]


def check_claim(configs, metric, a, b, sign, text):
    """Does the paper's ordering of a against b hold here? Counted per seed (paired)."""
    diffs, ratios = paired(configs[a]["runs"], configs[b]["runs"], metric)
    if not diffs:
        return None
    d = summarize(diffs)
    n = len(diffs)
    agree, against = sum(x * sign > 0 for x in diffs), sum(x * sign < 0 for x in diffs)
    if agree == n:
        verdict = "holds (every seed)"
    elif against == n:
        verdict = "does NOT hold (every seed)"
    elif d["mean"] * sign > 0:
        verdict = f"holds on average only ({agree}/{n} seeds agree): within seed noise"
    elif d["mean"] * sign < 0:
        verdict = f"does not hold on average ({agree}/{n} seeds agree): within seed noise"
    else:
        verdict = f"no difference ({agree}/{n} seeds agree, {against} disagree)"
    return {"metric": metric, "a": a, "b": b, "paper": text, "diff": d,
            "ratio": summarize(ratios), "seeds_agreeing": agree, "verdict": verdict}


def tome_r_for_half(n_tokens=65, layers=3):
    """Smallest constant ToMe r that merges half of the n_tokens - 1 patches by the last block."""
    import tome
    for r in range(1, n_tokens):
        if tome.remaining_tokens(n_tokens, [r] * layers)[-1] <= 1 + (n_tokens - 1) // 2:
            return r
    return n_tokens // 2


# ----------------------------------------------------------------------------- running

def log_every(args):
    return max(1, args.steps // 10)


def run_one(args, name, seed, tome_r):
    """Train (or, if finished, re-evaluate) one configuration; returns its result row."""
    import train
    out = os.path.join(args.out, "runs", f"{name}-s{seed}")
    flags = [f.format(tome_r=tome_r) for f in CONFIGS[name][2]]
    budget = ["--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--warmup", str(args.warmup), "--seed", str(seed)]
    # a folder trained with other settings must not be silently continued or re-used
    stamp, stamp_path = {"flags": flags, "budget": budget}, os.path.join(out, "study_run.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            old = json.load(f)
        if old != stamp:
            raise SystemExit(f"{out} was trained with {old}, not {stamp}: delete the folder "
                             f"or pass another --out")
    os.makedirs(out, exist_ok=True)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    argv = flags + budget + ["--output", out, "--resume", "auto", "--eval-size",
                             str(args.eval_size), "--workers", str(args.workers),
                             "--log-every", str(log_every(args)),
                             "--save-every", str(args.steps)]
    print(f"\n=== {name} seed {seed}: train.py {' '.join(argv)}", flush=True)
    t0 = time.time()
    result = train.main(argv)
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    # train.py's own figure covers the whole run, so one burst of load elsewhere on the machine
    # moves it a lot; the median of its logged windows (steps // 10 steps each) hardly moves.
    windows = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    trained = [r["final"] for r in records if r.get("final", {}).get("samples_per_s", 0) > 0]
    row = {"seed": seed, "top1": result["top1"], "top5": result["top5"], "n": result["n"],
           "samples_per_s": statistics.median(windows) if windows else math.nan,
           # a finished run resumed with --resume auto trains 0 steps and reports 0 samples/s:
           # its speed is in the log of the run that trained it
           "resumed": result["samples_per_s"] == 0,
           "samples_per_s_whole_run": trained[-1]["samples_per_s"] if trained else math.nan,
           "train_seconds": trained[-1]["train_seconds"] if trained else math.nan,
           "wall_seconds": time.time() - t0, "output": out}
    return row


def aggregate(runs_by_config):
    """{name: [rows]} -> {name: {label, groups, runs, top1/top5/samples_per_s summaries}}."""
    configs = {}
    for name, runs in runs_by_config.items():
        label, groups, flags = CONFIGS[name]
        configs[name] = {"label": label, "groups": list(groups), "flags": flags, "runs": runs,
                         **{m: summarize([r[m] for r in runs]) for m in METRICS}}
    return configs


# ----------------------------------------------------------------------------- report

def pct(s):
    return (f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} "
            f"[{100 * s['min']:.1f}–{100 * s['max']:.1f}]")


def markdown(report):
    st, configs = report["settings"], report["configs"]
    runs = [r for c in configs.values() for r in c["runs"]]
    n_runs, n_reused = len(runs), sum(r["resumed"] for r in runs)
    lines = [
        "# Study: DeCLIP Table 4 and the medium-scale study's Figs. 3/4 on the built-in data", "",
        f"`{report['command']}` — {len(st['seeds'])} seed(s) {st['seeds']}, {st['steps']} steps "
        f"x batch {st['batch_size']} ({st['steps'] * st['batch_size']} samples, warm-up "
        f"{st['warmup']}), tiny ViT on CPU, zero-shot on {st['eval_size']} built-in eval images "
        f"(48 classes, chance 2.1% top-1). This invocation: {report['wall_seconds'] / 60:.1f} min "
        f"wall time, {n_reused} of {n_runs} runs re-used from an earlier one (re-evaluated, not "
        f"trained); training time summed over all runs as first trained: "
        f"{report['train_seconds_total'] / 60:.1f} min; 1-min load average at the start / end "
        f"{report['load_average'][0]:.1f} / {report['load_average'][1]:.1f} on "
        f"{os.cpu_count()} cores.", "",
        f"Numbers: mean ± {SPREAD}. ToMe: r = {st['tome_r']} per block "
        f"({' -> '.join(map(str, [65] + st['tome_tokens']))} tokens).", "",
        "samples/s are per-run wall-clock figures (data loading included) measured inside the "
        "study, one run after another, so machine load moves them: each is the median of the "
        f"run's {st['steps'] // st['log_every']} logged windows of {st['log_every']} steps "
        "(study.json also has train.py's whole-run figure). `python bench.py --only "
        "methods,declip` measures the speed ratios side by side (interleaved), which is the "
        "figure to quote.", ""]
    for group, title in GROUPS.items():
        names = [n for n in configs if group in configs[n]["groups"]]
        if not names:
            continue
        lines += [f"## {title}", "",
                  "| config | zero-shot top-1 % | top-5 % | samples/s | vs CLIP "
                  "| paper (ImageNet top-1 %; speed) |",
                  "|---|---|---|---|---|---|"]
        ref = configs.get("clip", {}).get("samples_per_s", {}).get("mean")
        for n in names:
            c = configs[n]
            sps = c["samples_per_s"]
            rel = f"{sps['mean'] / ref:.2f}x" if ref else "–"
            lines.append(f"| {c['label']} | {pct(c['top1'])} | {pct(c['top5'])} | "
                         f"{sps['mean']:.0f} ± {sps['std']:.0f} | {rel} | {PAPER[group][n]} |")
        lines.append("")
    if report["claims"]:
        lines += ["## Does the papers' ordering hold at this scale?", "",
                  "Paired by seed (same seed = same init, data order and eval images); "
                  "difference a − b as mean ± std over seeds.", "",
                  "| paper says | here | verdict |", "|---|---|---|"]
        for c in report["claims"]:
            d = c["diff"]
            here = (f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} pts top-1"
                    if c["metric"] == "top1" else
                    f"{c['ratio']['mean']:.2f}x ± {c['ratio']['std']:.2f} samples/s")
            lines.append(f"| {c['paper']} | {here} | {c['verdict']} |")
        lines.append("")
    nn = report.get("nn_pairs")
    if nn:
        lines += ["## Nearest-neighbour captions (DeCLIP Fig. 9): `nn_pairs.png`", "",
                  f"From `{nn['checkpoint']}`: {nn['n_captions']} training captions embedded by "
                  f"its text tower, pushed into an `NNQueue`; {nn['n_queries']} further captions "
                  f"(not in the queue, as in training) looked up with `NNQueue.nearest`. "
                  f"The neighbour names the same colour and shape (the class) for "
                  f"{100 * nn['same_class']:.0f}% of the queries, the same colour for "
                  f"{100 * nn['same_colour']:.0f}%, the same shape for "
                  f"{100 * nn['same_shape']:.0f}%; mean cosine {nn['mean_cosine']:.3f}. "
                  "(Training pushes the *masked* captions' features with the weights of their "
                  "step; this picture uses the final weights and unmasked captions.)", ""]
    sig = report.get("siglip_init")
    if sig and configs["siglip"]["top1"]["mean"] < configs.get("clip", {}).get("top1", {}).get(
            "mean", 0):
        lines += ["## Why SigLIP fails here", "",
                  "train.py's SigLIP starts from the paper's t = 10, b = −10, an init chosen for "
                  "batches of 16k–32k (almost every pair is a negative). At batch 64 the loss "
                  "goes flat early and after training the bias is still "
                  f"{sig['logit_bias']:.3f} and the scale {sig['logit_scale']:.2f} "
                  f"(SigLIP seed {sig['seed']}): at this budget the result says more about that "
                  "init than about the sigmoid loss (b = −log(B − 1) would start a batch of B "
                  "balanced; it is not a flag of train.py).", ""]
    lines += ["![study](study.png)", ""]
    return "\n".join(lines)


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


BAR = (70, 110, 190)
BAR_SPS = (225, 140, 50)
INK, GRID, DOT = (30, 30, 30), (220, 220, 220), (20, 20, 20)


def _nice_max(x):
    """A round axis maximum >= x (1, 2, 2.5, 5 x 10^k)."""
    if x <= 0:
        return 1.0
    k = 10 ** math.floor(math.log10(x))
    return next(m * k for m in (1, 2, 2.5, 5, 10) if m * k >= x)


def _bar_panel(draw, box, title, items, key, scale, colour, fmt):
    """Bars with mean ± std error bars and one dot per seed; returns {label: bar rectangle}."""
    x0, y0, x1, y1 = box
    f, fs = font(14), font(12)
    draw.text((x0, y0), title, fill=INK, font=f)
    top, bottom, left = y0 + 28, y1 - 36, x0 + 44
    vmax = _nice_max(max(it[key]["max"] * scale for it in items) * 1.05)
    for k in range(6):  # horizontal grid and tick labels
        v = vmax * k / 5
        y = bottom - (bottom - top) * k / 5
        draw.line((left, y, x1, y), fill=GRID)
        draw.text((x0, y - 7), f"{v:g}", fill=INK, font=fs)
    slot = (x1 - left) / len(items)
    width = slot * 0.6
    rects = {}
    for i, it in enumerate(items):
        s = it[key]
        cx = left + slot * (i + 0.5)
        to_y = lambda v: bottom - (bottom - top) * v * scale / vmax  # noqa: E731
        rect = (round(cx - width / 2), round(to_y(s["mean"])), round(cx + width / 2), bottom)
        draw.rectangle(rect, fill=colour)
        rects[it["label"]] = rect
        lo, hi = to_y(s["mean"] - s["std"]), to_y(s["mean"] + s["std"])
        draw.line((cx, lo, cx, hi), fill=INK, width=2)
        for y in (lo, hi):
            draw.line((cx - 6, y, cx + 6, y), fill=INK, width=2)
        for j, v in enumerate(s["values"]):  # the seeds themselves, spread sideways
            dx = (j - (len(s["values"]) - 1) / 2) * 5
            draw.ellipse((cx + width / 4 + dx - 2, to_y(v) - 2, cx + width / 4 + dx + 2,
                          to_y(v) + 2), fill=DOT)
        draw.text((cx, min(hi, rect[1]) - 4), fmt(s["mean"] * scale), fill=INK, font=fs,
                  anchor="md")
        for k, line in enumerate(textwrap.wrap(it["label"], 14)[:2]):
            draw.text((cx, bottom + 4 + 14 * k), line, fill=INK, font=fs, anchor="ma")
    draw.line((left, bottom, x1, bottom), fill=INK)
    return rects


def draw_chart(groups, path, note=""):
    """groups: [(title, [{"label", "top1": summary, "samples_per_s": summary}, ...]), ...].

    One row per group: zero-shot top-1 (%) on the left, samples/s on the right, bars = mean,
    error bars = ± std over seeds, dots = single seeds. Returns {(group, metric, label): rect}.
    """
    W, row_h, head = 1300, 340, 40
    img = Image.new("RGB", (W, head + row_h * len(groups) + 24), "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, 10), "Zero-shot top-1 (mean ± std over seeds, dots = seeds) and training "
              "samples/s (wall-clock, per run)", fill=INK, font=font(16))
    rects = {}
    for g, (title, items) in enumerate(groups):
        y0 = head + g * row_h
        draw.text((12, y0 + 4), title, fill=INK, font=font(15))
        halves = [(12, y0 + 30, W // 2 - 20, y0 + row_h - 6),
                  (W // 2 + 10, y0 + 30, W - 14, y0 + row_h - 6)]
        panels = [("zero-shot top-1 (%)", "top1", 100, BAR, lambda v: f"{v:.1f}"),
                  ("training samples/s (median of logged windows)", "samples_per_s", 1, BAR_SPS,
                   lambda v: f"{v:.0f}")]
        for box, (name, key, scale, colour, fmt) in zip(halves, panels):
            for label, rect in _bar_panel(draw, box, name, items, key, scale, colour,
                                          fmt).items():
                rects[(g, key, label)] = rect
    if note:
        draw.text((12, img.height - 20), note, fill=(90, 90, 90), font=font(12))
    img.save(path)
    return rects


# ----------------------------------------------------------------------------- NN pairs (Fig. 9)

def nn_pairs(checkpoint, path, n_captions=4096, n_queries=512, n_show=8, batch=512):
    """DeCLIP Fig. 9 on the built-in data: which caption would NNS contrast each image with?

    The first n_captions training captions are embedded by the checkpoint's text tower and pushed
    into an NNQueue (DeCLIP's queue, nn_queue.py); the next n_queries captions (not in the queue,
    as in training, where the queue only holds earlier steps) are looked up with
    `NNQueue.nearest`. Draws the first n_show (image, caption) pairs above their NN pairs and
    returns how often the neighbour shares the query's class / colour / shape.
    """
    import torch
    import torch.nn.functional as F

    import data
    import eval_zeroshot
    from nn_queue import NNQueue

    model, tokenizer = eval_zeroshot.load_model_and_tokenizer(checkpoint)
    size, L = eval_zeroshot.image_size_of(model), eval_zeroshot.context_length_of(model)
    base = data.SyntheticCaptions("train", image_size=size)  # train.py's training captions

    @torch.no_grad()
    def embed(indices):
        out = [F.normalize(model.encode_text(tokenizer([base.caption(i) for i in chunk], L)),
                           dim=-1) for chunk in (indices[k:k + batch]
                                                 for k in range(0, len(indices), batch))]
        return torch.cat(out)  # (N, D)

    z_bank = embed(list(range(n_captions)))                               # (K, D)
    queue = NNQueue(size=n_captions, dim=z_bank.shape[1])
    queue.push(z_bank)
    queries = list(range(n_captions, n_captions + n_queries))
    z_txt = embed(queries)                                                # (Q, D)
    z_txt_nn = queue.nearest(z_txt)                                       # (Q, D)
    # nearest() returns stored features: find the slot each came from (first exact match)
    nn_idx = [int((queue.feats == z).all(1).nonzero()[0]) for z in z_txt_nn]  # Q slot indices
    cos = (z_txt * z_txt_nn).sum(-1).tolist()                             # (Q,)
    n_shapes = len(data.SHAPES)
    same = {"class": 0, "colour": 0, "shape": 0}
    for q, j in zip(queries, nn_idx):
        a, b = base.label(q), base.label(j)
        same["class"] += a == b
        same["colour"] += a // n_shapes == b // n_shapes
        same["shape"] += a % n_shapes == b % n_shapes

    # the picture: one column per query, (image, caption) on top and its NN pair below (Fig. 9)
    thumb, col, pad, text_h = 120, 168, 10, 96
    f, fs = font(12), font(15)
    rows = [("pair", queries[:n_show]), ("NN pair", nn_idx[:n_show])]
    W = 80 + col * min(n_show, len(queries))
    H = 40 + len(rows) * (thumb + text_h + pad) + 24
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), f"Nearest other caption in an NNQueue of {n_captions} training captions "
              f"(DeCLIP Fig. 9; text tower of {checkpoint})", fill=INK, font=fs)
    for r, (name, indices) in enumerate(rows):
        y = 40 + r * (thumb + text_h + pad)
        draw.text((10, y + thumb // 2), name, fill=INK, font=f)
        for c, i in enumerate(indices):
            x = 80 + c * col
            image, caption = base[i]
            img.paste(image.resize((thumb, thumb), Image.NEAREST), (x, y))
            lines = textwrap.wrap(caption, 24)[:5]
            for k, line in enumerate(lines):
                draw.text((x, y + thumb + 4 + 15 * k), line, fill=INK, font=f)
            draw.text((x, y + thumb + 4 + 15 * len(lines)), f"cos {cos[c]:.3f}" if r else f"#{i}",
                      fill=(120, 120, 120), font=f)
    n = len(queries)
    draw.text((10, H - 20), f"Over {n} queries the neighbour has the same class in "
              f"{100 * same['class'] / n:.0f}%, the same colour in {100 * same['colour'] / n:.0f}%,"
              f" the same shape in {100 * same['shape'] / n:.0f}%.", fill=(90, 90, 90), font=f)
    img.save(path)
    return {"checkpoint": checkpoint, "n_captions": n_captions, "n_queries": n,
            "same_class": same["class"] / n, "same_colour": same["colour"] / n,
            "same_shape": same["shape"] / n, "mean_cosine": statistics.fmean(cos),
            "examples": [{"query": base.caption(q), "nn": base.caption(j), "cosine": s}
                         for q, j, s in list(zip(queries, nn_idx, cos))[:n_show]]}


# ----------------------------------------------------------------------------- main

def lock(out):
    """Refuse to run two studies into one folder: both would train the same run folders at once."""
    path = os.path.join(out, ".study.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
        try:
            os.kill(pid, 0)  # signal 0: only asks whether that process still exists
        except (ProcessLookupError, ValueError):
            os.remove(path)  # left behind by a study that was killed
            return lock(out)
        except PermissionError:
            pass
        raise SystemExit(f"{path}: study.py (pid {pid}) is already writing {out}; wait for it "
                         f"or pass another --out") from None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return path


def main(argv=None):
    args = get_args(argv)
    t0, load_start = time.time(), os.getloadavg()[0]
    os.makedirs(args.out, exist_ok=True)
    lock_path = lock(args.out)
    try:
        return _study(args, t0, load_start)
    finally:
        os.remove(lock_path)


def _study(args, t0, load_start):
    import tome
    tome_r = tome_r_for_half(65, 3)
    runs = {name: [] for name in args.configs}
    for seed in args.seeds:  # seed-major: the runs compared with each other run close in time
        for name in args.configs:
            runs[name].append(run_one(args, name, seed, tome_r))
    configs = aggregate(runs)
    claims = [c for c in (check_claim(configs, *claim) for claim in CLAIMS
                          if claim[1] in configs and claim[2] in configs) if c]
    nn = None
    if "declip" in configs:
        ckpt = os.path.join(configs["declip"]["runs"][0]["output"], "checkpoint.pt")
        nn = nn_pairs(ckpt, os.path.join(args.out, "nn_pairs.png"),
                      n_captions=args.nn_captions, n_queries=min(512, args.nn_captions))
    sig = None
    if "siglip" in configs:  # the learnt temperature and bias explain SigLIP's result here
        import torch
        run = configs["siglip"]["runs"][0]
        state = torch.load(os.path.join(run["output"], "checkpoint.pt"), map_location="cpu",
                           weights_only=False)["model"]
        sig = {"seed": run["seed"], "logit_bias": float(state["logit_bias"]),
               "logit_scale": float(state["clip.logit_scale"].exp())}
    report = {
        "command": " ".join(["python study.py", *(sys.argv[1:] if args.argv is None
                                                   else args.argv)]),
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
                     "warmup": args.warmup, "eval_size": args.eval_size,
                     "workers": args.workers, "log_every": log_every(args), "tome_r": tome_r,
                     "tome_tokens": tome.remaining_tokens(65, [tome_r] * 3), "spread": SPREAD,
                     "samples_per_s": "per-run wall-clock, median of logged windows "
                                      "(load-dependent); see bench.py"},
        "groups": {g: [n for n in configs if g in configs[n]["groups"]] for g in GROUPS},
        "configs": configs, "claims": claims, "nn_pairs": nn, "siglip_init": sig,
        "wall_seconds": time.time() - t0,
        "train_seconds_total": sum(r["train_seconds"] for c in configs.values()
                                   for r in c["runs"]),
        "load_average": [load_start, os.getloadavg()[0]],
    }
    chart = [(GROUPS[g], [configs[n] for n in names])
             for g, names in report["groups"].items() if names]
    draw_chart(chart, os.path.join(args.out, "study.png"),
               note=f"{args.steps} steps x batch {args.batch_size}, seeds {args.seeds}, tiny ViT, "
                    f"CPU; samples/s are per-run wall-clock figures (bench.py measures ratios)")
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(markdown(report))
    print("\n" + markdown(report))
    print(f"wrote {args.out}/study.md, study.json, study.png"
          + (", nn_pairs.png" if nn else "") + f" in {report['wall_seconds'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
