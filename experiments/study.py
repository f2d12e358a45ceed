"""The miniature reproductions on the built-in data, with statistics that can tell, in one command.

    python experiments/study.py            # the full study: 3 seeds, 2 CPU cores, < 60 minutes
    python experiments/study.py --quick    # a 1-minute smoke version, written to results/quick/
    python experiments/study.py --seeds 5 --configs clip,declip --sizes 500,all
    python experiments/study.py --regimes results/b64,results/b256   # two finished studies' map

(a) DeCLIP Table 4 (Li et al., ICLR 2022, Sec. 4.4; CC3M, RN50, ImageNet zero-shot top-1): the extra
    supervisions added cumulatively, CLIP 20.6 -> +MVS 24.8 -> +SS 25.4 -> +NNS (= DeCLIP) 27.2.
    Here: the tiny ResNet (`--model tiny-rn`) on a data-limited set (`--train-size`, default 2,000
    unique pairs, each seen ~5 times), since DeCLIP's claim is data efficiency.
(b) The medium-scale study, Figs. 3/4 (CC3M, ViT-S/16): CLIP, FLIP (patch dropout 0.5), SigLIP,
    SigFLIP and ToMe, on the tiny ViT (`--model tiny`: patches to drop and merge), unlimited data.
    Its text: SigLIP is best (+9 points top-1 over CLIP), FLIP and ToMe are below CLIP.
    ToMe merges a constant r per block, chosen so that about half of the tiny ViT's 64 + 1 tokens
    are merged by the last block (`tome_r_for_half`: r = 11, 65 -> 54 -> 43 -> 32 tokens).
(c) DeCLIP Fig. 1 in miniature, a data-efficiency curve: zero-shot top-1 of CLIP and DeCLIP
    against the number of unique training pairs (500, 2,000, unlimited) at the same steps.
(d), (e) Not in the default study (`--configs` adds them): DeCLIP's MLM text pass, shared,
    separate or bidirectional (declip_separate, declip_bidir); and CLIP trained on DeCLIP's
    image views (clip_dview), which splits DeCLIP's gain over CLIP into its views and its losses.

Every configuration gets the same steps, batch, learning rate and warm-up (train.py's defaults
otherwise): nothing is tuned for one method. Every run is `train.main([...])` in this process,
seed-major (all runs of seed 0, then seed 1, ...). A seed changes the initial weights, the data
order, the augmentations and the built-in dataset itself (train and eval, `--data-seed`), so runs
are compared *paired by seed*. Each run has its own folder `<out>/runs/<config>-<size>-s<seed>`
and is started with `--resume auto`: re-running the study re-evaluates finished runs instead of
training them again. A run shared by two groups (CLIP at 2,000 pairs is in (a) and (c)) runs once.

Statistics: mean and 95% confidence interval over seeds (Student's t with n - 1 degrees of
freedom: with 3 seeds the half-width is 2.48 standard deviations); a claim is checked on the
per-seed (paired) differences: "holds" when their interval lies on the paper's side of 0,
"reversed" when it lies on the other side, "inside the noise" when it contains 0.

The regime map (`--regimes`) trains nothing: it reads studies that ran CLIP, CLIP on DeCLIP's
views and DeCLIP at one data size in different regimes (batch 64 and 256 at the same number of
samples), and tabulates each regime's top-1 and paired differences with their verdicts.

Outputs in <out>: study.md (tables, verdicts), study.json (every run and the aggregates),
study.png (top-1 with intervals, per group), curve.png (the data-efficiency curve; only with two
data sizes or more, a single size is a bar row of study.png) and nn_pairs.png (DeCLIP Fig. 9:
captions and the nearest *other* caption the NN queue finds; experiments/nn_pairs.py).

Left out: GPUs and DDP (train.py has them; this is a CPU study), pretrained towers, per-method
tuning, and speed (the samples/s of runs that shared the machine with others are not comparable:
`python experiments/bench.py --only methods,declip` measures speed ratios side by side).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import charts  # noqa: E402
from nn_pairs import nn_pairs  # noqa: E402  (a sibling: DeCLIP Fig. 9)

RN, VIT = ["--model", "tiny-rn"], ["--model", "tiny"]
# name -> (label, train.py flags). CLIP and DeCLIP serve Table 4 and the curve.
CONFIGS = {
    "clip": ("CLIP", RN + ["--method", "clip"]),
    "mvs": ("+MVS", RN + ["--method", "declip", "--no-ss", "--no-nns"]),
    "mvs_ss": ("+MVS+SS", RN + ["--method", "declip", "--no-nns"]),
    "declip": ("+MVS+SS+NNS (DeCLIP)", RN + ["--method", "declip"]),
    "clip_vit": ("CLIP (ViT)", VIT + ["--method", "clip"]),
    "flip": ("FLIP", VIT + ["--method", "clip", "--patch-dropout", "0.5"]),
    "siglip": ("SigLIP", VIT + ["--method", "clip", "--loss", "siglip"]),
    "sigflip": ("SigFLIP", VIT + ["--method", "clip", "--loss", "siglip",
                                  "--patch-dropout", "0.5"]),
    "tome": ("ToMe", VIT + ["--method", "clip", "--tome-r", "{tome_r}"]),
    "declip_separate": ("DeCLIP, separate MLM pass", RN + ["--method", "declip",
                                                           "--mlm-pass", "separate"]),
    "declip_bidir": ("DeCLIP, bidirectional MLM pass", RN + ["--method", "declip",
                                                             "--mlm-pass", "bidirectional"]),
    "clip_dview": ("CLIP on DeCLIP's views", RN + ["--method", "clip", "--image-aug", "declip"]),
}
TABLE4 = ("clip", "mvs", "mvs_ss", "declip")
FIG3 = ("clip_vit", "flip", "siglip", "sigflip", "tome")
CURVE = ("clip", "declip")
TEXTPASS = ("declip", "declip_separate", "declip_bidir")
VIEWS = ("clip", "clip_dview", "declip")
# groups (d) and (e) run only when --configs names one of their own configs
OPTIONAL = {"textpass": TEXTPASS[1:], "views": ("clip_dview",)}
DEFAULT_CONFIGS = [c for c in CONFIGS if not any(c in extra for extra in OPTIONAL.values())]
GROUPS = {
    "table4": "(a) DeCLIP Table 4: supervisions added cumulatively (tiny ResNet, data-limited)",
    "fig3": "(b) Medium-scale study Fig. 3: CLIP variants (tiny ViT, unlimited data)",
    "curve": "(c) DeCLIP Fig. 1: zero-shot top-1 against unique training pairs",
    "textpass": "(d) DeCLIP's MLM text pass: shared (official code), separate, bidirectional",
    "views": "(e) DeCLIP's views or its losses: CLIP, CLIP on DeCLIP's views, DeCLIP",
}
# What the papers report (ImageNet zero-shot top-1 %).
PAPER = {"clip": "20.6", "mvs": "24.8 (+4.2)", "mvs_ss": "25.4 (+4.8)", "declip": "27.2 (+6.6)",
         "clip_vit": "reference", "flip": "below CLIP", "siglip": "best, +9 pts",
         "sigflip": "", "tome": "below CLIP", "declip_separate": "", "declip_bidir": "",
         "clip_dview": ""}
# The papers' claims: (config a, config b, sign of a - b the paper reports, text).
CLAIMS_TABLE4 = [("mvs", "clip", +1, "Table 4: MVS +4.2 pts over CLIP"),
                 ("mvs_ss", "mvs", +1, "Table 4: SS +0.6 pts on top of MVS"),
                 ("declip", "mvs_ss", +1, "Table 4: NNS +1.8 pts on top of MVS+SS"),
                 ("declip", "clip", +1, "Table 4: DeCLIP +6.6 pts over CLIP")]
CLAIMS_FIG3 = [("siglip", "clip_vit", +1, "Fig. 3: SigLIP +9 pts over CLIP"),
               ("flip", "clip_vit", -1, "Fig. 3: FLIP below CLIP"),
               ("tome", "clip_vit", -1, "Fig. 3: ToMe below CLIP"),
               ("sigflip", "flip", +1, "Fig. 3: the sigmoid loss helps FLIP too")]
# Not the papers' claims: two other readings of DeCLIP's MLM text pass, against the shared one.
CLAIMS_TEXTPASS = [
    ("declip_separate", "declip", +1, "(ours) a separate MLM pass beats the shared one"),
    ("declip_bidir", "declip_separate", +1, "(ours) bidirectional MLM beats causal")]
# Not the papers' claims either: the paper's CLIP baseline "only uses random square crop image
# augmentations" (Sec. 3.3), so its Table 4 gain mixes DeCLIP's views with its losses.
CLAIMS_VIEWS = [
    ("clip_dview", "clip", +1, "(ours) DeCLIP's views alone beat CLIP's crop"),
    ("declip", "clip_dview", +1, "(ours) DeCLIP's losses beat CLIP on the same views")]
METRICS = ("top1", "top5", "colour", "shape")
# Student's t, 97.5% quantile, by degrees of freedom (1.96 beyond the table)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1-minute smoke version (3 steps, batch 8, 1 seed) into results/quick")
    p.add_argument("--out", default=None, help="default: results (results/quick with --quick)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, from {','.join(CONFIGS)}")
    p.add_argument("--seeds", default=None,
                   help="number of seeds (3 -> seeds 0,1,2) or a comma list (0,5); default 3")
    p.add_argument("--steps", type=int, default=None, help="default 150 (3 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="default: steps // 8")
    p.add_argument("--table4-size", type=int, default=None,
                   help="unique pairs of Table 4's runs (default 2000; 64 with --quick)")
    p.add_argument("--sizes", default=None,
                   help="the curve's unique pairs, 'all' = unlimited (default 500,2000,all)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="built-in eval images (default 420 = 10 per class; 42 with --quick)")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes per run")
    p.add_argument("--regimes", default=None,
                   help="DIR,DIR,...: no training; the regime map of finished studies (one per "
                        "batch size, each with clip, clip_dview and declip) into <out>/regimes.md")
    p.add_argument("--nn-captions", type=int, default=None,
                   help="captions in the NN queue of nn_pairs.png (default 4096; 64 --quick)")
    args = p.parse_args(argv)
    args.argv = argv
    defaults = (dict(steps=3, batch_size=8, seeds="1", eval_size=42, nn_captions=64,
                     table4_size=64, sizes="64,all") if args.quick else
                dict(steps=150, batch_size=64, seeds="3", eval_size=420, nn_captions=4096,
                     table4_size=2000, sizes="500,2000,all"))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or ("results/quick" if args.quick else "results")
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 8)
    args.seeds = ([int(s) for s in args.seeds.split(",")] if "," in args.seeds
                  else list(range(int(args.seeds))))
    args.sizes = [None if s == "all" else int(s) for s in args.sizes.split(",") if s]
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs or not args.seeds:
        p.error(f"--configs: unknown {unknown} (choose from {','.join(CONFIGS)}) "
                f"or no configs/seeds given")
    return args


def plan(args):
    """The study's runs as {group: [run id]}: '<config>-<size>', size 'all' = unlimited."""
    rid, n = join_id, args.table4_size
    groups = {"table4": [rid(c, n) for c in TABLE4 if c in args.configs],
              "fig3": [rid(c, None) for c in FIG3 if c in args.configs],
              "curve": [rid(c, s) for c in CURVE if c in args.configs for s in args.sizes],
              "textpass": [rid(c, n) for c in TEXTPASS if c in args.configs],
              "views": [rid(c, n) for c in VIEWS if c in args.configs]}
    for g, extra in OPTIONAL.items():
        if len(groups[g]) < 2 or not any(c in args.configs for c in extra):
            groups[g] = []  # DeCLIP alone, or CLIP and DeCLIP alone, compare nothing new here
    return {g: ids for g, ids in groups.items() if ids}


def join_id(name, size):
    """A run id: '<config>-<size>', size None (unlimited) written 'all'."""
    return f"{name}-{'all' if size is None else size}"


def split_id(run_id):
    name, size = run_id.rsplit("-", 1)
    return name, None if size == "all" else int(size)


# ----------------------------------------------------------------------------- numbers

def summarize(values):
    """mean, sample std (0 for one value), 95% interval half-width, min, max of numbers."""
    values = [float(v) for v in values]
    n = len(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    t = T975.get(n - 1) or next((T975[k] for k in sorted(T975, reverse=True) if k <= n - 1), 1.96)
    return {"mean": statistics.fmean(values), "std": std,
            "ci95": t * std / math.sqrt(n) if n > 1 else math.inf,
            "min": min(values), "max": max(values), "n": n, "values": values}


def paired(runs_a, runs_b, metric):
    """Per-seed differences a - b over the seeds both configurations ran."""
    a, b = {r["seed"]: r[metric] for r in runs_a}, {r["seed"]: r[metric] for r in runs_b}
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def check_claim(configs, metric, a, b, sign, text):
    """Does the paper's ordering of a against b hold here? 95% interval of paired differences."""
    diffs = paired(configs[a]["runs"], configs[b]["runs"], metric)
    if not diffs:
        return None
    d = summarize(diffs)
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    agree = sum(x * sign > 0 for x in diffs)
    if sign * lo > 0 and sign * hi > 0:
        verdict = "holds"
    elif sign * lo < 0 and sign * hi < 0:
        verdict = "reversed"
    else:
        verdict = "inside the noise"
    return {"metric": metric, "a": a, "b": b, "paper": text, "diff": d,
            "seeds_agreeing": agree, "verdict": f"{verdict} ({agree}/{len(diffs)} seeds agree)"}


def claims_of(args, groups):
    """The claims the planned runs can check: (metric, run id a, run id b, sign, text).

    Fig. 1's claim is checked on top-1 and on its colour factor, the factor every method learns
    within this budget: data efficiency shows there first."""
    ids = {i for g in groups.values() for i in g}
    n = args.table4_size
    out = [("top1", f"{a}-{n}", f"{b}-{n}", sign, text) for a, b, sign, text in CLAIMS_TABLE4]
    out += [("top1", f"{a}-all", f"{b}-all", sign, text) for a, b, sign, text in CLAIMS_FIG3]
    out += [("top1", f"{a}-{n}", f"{b}-{n}", sign, text)
            for a, b, sign, text in CLAIMS_TEXTPASS + CLAIMS_VIEWS]
    for metric in ("top1", "colour"):
        for s in args.sizes:
            size = "all" if s is None else s
            where = "unlimited pairs" if s is None else f"{s} unique pairs"
            what = "" if metric == "top1" else " (colour factor)"
            out.append((metric, f"declip-{size}", f"clip-{size}", +1,
                        f"Fig. 1{what}: DeCLIP above CLIP at {where}"))
    unique = list(dict.fromkeys(out))
    return [c for c in unique if c[1] in ids and c[2] in ids]


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


def run_one(args, run_id, seed, tome_r):
    """Train (or, if finished, re-evaluate) one run; returns its result row."""
    import train
    name, size = split_id(run_id)
    out = os.path.join(args.out, "runs", f"{run_id}-s{seed}")
    flags = [f.format(tome_r=tome_r) for f in CONFIGS[name][1]]
    flags += ["--train-size", "0" if size is None else str(size)]  # 0: unlimited
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
                             "--log-every", str(log_every(args)), "--eval-every", "0",
                             "--save-every", str(args.steps)]
    print(f"\n=== {run_id} seed {seed}: train.py {' '.join(argv)}", flush=True)
    t0 = time.time()
    result = train.main(argv)
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    trained = [r["final"] for r in records if r.get("final", {}).get("samples_per_s", 0) > 0]
    return {"seed": seed, **{m: result[m] for m in METRICS}, "n": result["n"],
            # a finished run resumed with --resume auto trains 0 steps: its time is in its log
            "resumed": result["samples_per_s"] == 0,
            "train_seconds": trained[-1]["train_seconds"] if trained else math.nan,
            "wall_seconds": time.time() - t0, "output": out}


def aggregate(runs_by_id):
    """{run id: [rows]} -> {run id: {label, size, runs, summaries of METRICS}}."""
    configs = {}
    for run_id, runs in runs_by_id.items():
        name, size = split_id(run_id)
        configs[run_id] = {"label": CONFIGS.get(name, (name,))[0], "name": name, "size": size,
                           "runs": runs, **{m: summarize([r[m] for r in runs]) for m in METRICS}}
    return configs


# ----------------------------------------------------------------------------- report

def pct(s):
    ci = f"{100 * s['ci95']:.1f}" if math.isfinite(s["ci95"]) else "–"
    return f"{100 * s['mean']:.1f} ± {ci}"


def markdown(report):
    st, configs, groups = report["settings"], report["configs"], report["groups"]
    runs = [r for c in configs.values() for r in c["runs"]]
    n_runs, n_reused = len(runs), sum(r["resumed"] for r in runs)
    lines = [
        "# Study: DeCLIP Table 4 and Fig. 1, and the medium-scale study's Fig. 3, in miniature", "",
        f"`{report['command']}` — {len(st['seeds'])} seed(s) {st['seeds']}, every run "
        f"{st['steps']} steps x batch {st['batch_size']} ({st['steps'] * st['batch_size']} "
        f"samples, warm-up {st['warmup']}, lr and everything else train.py's defaults), CPU; "
        f"zero-shot on {st['eval_size']} built-in eval images (42 classes = 7 colours x 6 shapes, "
        f"chance 2.4% top-1, colour 14.3%, shape 16.7%). This invocation: "
        f"{report['wall_seconds'] / 60:.1f} min wall time, {n_reused} of {n_runs} runs re-used "
        f"from an earlier one; training time summed over all runs as first trained: "
        f"{report['train_seconds_total'] / 60:.1f} min.", "",
        "Numbers: mean ± 95% confidence interval over seeds (Student's t). Colour and shape: "
        "the fraction of images whose top-1 class has the right colour / the right shape.", ""]
    for group, ids in groups.items():
        lines += [f"## {GROUPS[group]}", ""]
        if group == "curve":
            sizes = list(dict.fromkeys(configs[i]["size"] for i in ids))
            names = list(dict.fromkeys(configs[i]["name"] for i in ids))
            lines += ["| unique pairs | " + " | ".join(CONFIGS[n][0] + " top-1 %" for n in names)
                      + " | " + " | ".join(CONFIGS[n][0] + " shape %" for n in names) + " |",
                      "|---" * (1 + 2 * len(names)) + "|"]
            for size in sizes:
                row = [configs[join_id(n, size)] for n in names]
                lines.append(f"| {'unlimited' if size is None else size} | "
                             + " | ".join(pct(c["top1"]) for c in row) + " | "
                             + " | ".join(pct(c["shape"]) for c in row) + " |")
            lines += ["", "![curve](curve.png)", ""] if len(sizes) > 1 else [""]
            continue
        lines += ["| config | zero-shot top-1 % | top-5 % | colour % | shape % | per seed (top-1) "
                  "| paper (ImageNet top-1 %) |", "|---|---|---|---|---|---|---|"]
        for i in ids:
            c = configs[i]
            seeds = " / ".join(f"{100 * v:.1f}" for v in c["top1"]["values"])
            lines.append(f"| {c['label']} | {pct(c['top1'])} | {pct(c['top5'])} | "
                         f"{pct(c['colour'])} | {pct(c['shape'])} | {seeds} | {PAPER[c['name']]} |")
        lines.append("")
    if report["claims"]:
        lines += ["## Do the papers' claims hold at this scale?", "",
                  "Paired by seed (same seed = same init, data, data order and eval images); "
                  "difference a − b in points of top-1 (or of the colour factor), mean and 95% "
                  "interval.", "",
                  "| paper says | here | verdict |", "|---|---|---|"]
        for c in report["claims"]:
            d = c["diff"]
            ci = f"{100 * d['ci95']:.1f}" if math.isfinite(d["ci95"]) else "–"
            unit = "" if c["metric"] == "top1" else f" {c['metric']}"
            lines.append(f"| {c['paper']} | {100 * d['mean']:+.1f} ± {ci}{unit} | "
                         f"{c['verdict']} |")
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
                  f"{100 * nn['same_shape']:.0f}%; mean cosine {nn['mean_cosine']:.3f}.", ""]
    lines += ["![study](study.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures

BAR, BAR_SHAPE = (70, 110, 190), (225, 140, 50)
LINES = {"clip": (70, 110, 190), "declip": (200, 60, 50)}


def draw_chart(groups, path, note=""):
    """groups: [(title, [{"label", "top1": summary, "shape": summary}, ...]), ...].

    One row per group: zero-shot top-1 (%) on the left, shape accuracy (%) on the right, bars =
    mean, error bars = 95% interval over seeds, dots = single seeds. Returns
    {(group, metric, label): rect}.
    """
    panels = [("zero-shot top-1 (%)", "top1", BAR), ("shape right (%)", "shape", BAR_SHAPE)]
    return charts.bar_chart(groups, panels, path, "Zero-shot top-1 and shape accuracy (mean ± "
                            "95% interval over seeds, dots = seeds)", note=note)


def draw_curve(configs, ids, path, note=""):
    """DeCLIP Fig. 1 in miniature: top-1 (mean, 95% interval) against unique training pairs,
    in increasing order, 'unlimited' at the right end. Returns {(name, size): (x, y)}."""
    sizes = sorted({configs[i]["size"] for i in ids}, key=lambda s: math.inf if s is None else s)
    series = {}
    for name in dict.fromkeys(configs[i]["name"] for i in ids):
        points = {s: configs[join_id(name, s)]["top1"] for s in sizes
                  if join_id(name, s) in configs}
        series[name] = (CONFIGS[name][0], LINES.get(name, charts.DOT), points)
    ticks = [(s, "unlimited" if s is None else f"{s:,}") for s in sizes]
    return charts.interval_curve(
        series, ticks, path, "Zero-shot top-1 against unique training pairs (mean ± 95% interval)",
        "unique training pairs (same steps for every point)", note=note)


def draw_figures(groups, configs, out, note):
    """study.png, one bar row per group, and curve.png when the curve has two data sizes or
    more; a curve of one size is a bar row instead (none when other rows show its runs).
    Returns the names of the files written."""
    curve = groups.get("curve", [])
    is_curve = len({configs[i]["size"] for i in curve}) > 1
    shown = {i for g, ids in groups.items() if g != "curve" for i in ids}
    bars = [(GROUPS[g], [configs[i] for i in ids]) for g, ids in groups.items()
            if g != "curve" or not (is_curve or set(ids) <= shown)]
    written = []
    if bars:
        draw_chart(bars, os.path.join(out, "study.png"), note=note)
        written.append("study.png")
    if is_curve:
        draw_curve(configs, curve, os.path.join(out, "curve.png"), note=note)
        written.append("curve.png")
    return written


# ----------------------------------------------------------------------------- regime map

REGIME_CLAIMS = [("declip", "clip", "DeCLIP - CLIP"),
                 ("clip_dview", "clip", "CLIP on DeCLIP's views - CLIP"),
                 ("declip", "clip_dview", "DeCLIP - CLIP on DeCLIP's views")]


def regime_map(folders, out):
    """Where DeCLIP's claim holds: one row per finished study (e.g. batch 64 and batch 256 at the
    same number of samples), top-1 of CLIP, CLIP on DeCLIP's views and DeCLIP, and the paired
    differences with their verdicts. Writes <out>/regimes.md; returns its rows."""
    rows = []
    for folder in folders:
        with open(os.path.join(folder, "study.json")) as f:
            report = json.load(f)
        st, configs = report["settings"], report["configs"]
        size = st["table4_size"]
        row = {"folder": folder, "batch": st["batch_size"], "steps": st["steps"],
               "samples": st["batch_size"] * st["steps"], "pairs": size,
               "seeds": st["seeds"], "top1": {}, "claims": {}}
        for name in ("clip", "clip_dview", "declip"):
            if f"{name}-{size}" in configs:
                row["top1"][name] = configs[f"{name}-{size}"]["top1"]
        for a, b, label in REGIME_CLAIMS:
            claim = check_claim(configs, "top1", f"{a}-{size}", f"{b}-{size}", +1, label) \
                if f"{a}-{size}" in configs and f"{b}-{size}" in configs else None
            if claim:
                row["claims"][label] = claim
        rows.append(row)
    lines = ["| batch x steps (samples), unique pairs | " + " | ".join(
        CONFIGS[n][0] for n in ("clip", "clip_dview", "declip")) + " | " + " | ".join(
        label for _, _, label in REGIME_CLAIMS) + " |", "|---" * 7 + "|"]
    for r in rows:
        cells = [pct(r["top1"][n]) if n in r["top1"] else "" for n in ("clip", "clip_dview",
                                                                       "declip")]
        for _, _, label in REGIME_CLAIMS:
            c = r["claims"].get(label)
            cells.append(f"{100 * c['diff']['mean']:+.1f} ± {100 * c['diff']['ci95']:.1f}: "
                         f"{c['verdict']}" if c else "")
        lines.append(f"| {r['batch']} x {r['steps']:,} ({r['samples']:,}), {r['pairs']:,} | "
                     + " | ".join(cells) + " |")
    text = ("Zero-shot top-1 % (mean ± 95% interval over seeds), and paired differences in "
            "points with the verdict of their interval (`python experiments/study.py --regimes "
            f"{','.join(folders)}`):\n\n" + "\n".join(lines) + "\n")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "regimes.md"), "w") as f:
        f.write(text)
    print(text)
    return rows


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
    if args.regimes:
        return regime_map(args.regimes.split(","), args.out)
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
    groups = plan(args)
    ids = list(dict.fromkeys(i for g in groups.values() for i in g))  # shared runs once
    runs = {i: [] for i in ids}
    for seed in args.seeds:  # seed-major: the runs compared with each other run close in time
        for run_id in ids:
            runs[run_id].append(run_one(args, run_id, seed, tome_r))
    configs = aggregate(runs)
    claims = [c for c in (check_claim(configs, *claim) for claim in claims_of(args, groups)) if c]
    nn = None
    declip_runs = [i for i in ids if split_id(i)[0] == "declip"]
    if declip_runs:
        ckpt = os.path.join(configs[declip_runs[-1]]["runs"][0]["output"], "checkpoint.pt")
        nn = nn_pairs(ckpt, os.path.join(args.out, "nn_pairs.png"),
                      n_captions=args.nn_captions, n_queries=min(512, args.nn_captions))
    report = {
        "command": " ".join(["python experiments/study.py",
                             *(sys.argv[1:] if args.argv is None else args.argv)]),
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
                     "warmup": args.warmup, "eval_size": args.eval_size,
                     "table4_size": args.table4_size, "sizes": args.sizes,
                     "workers": args.workers, "tome_r": tome_r,
                     "tome_tokens": tome.remaining_tokens(65, [tome_r] * 3)},
        "groups": groups, "configs": configs, "claims": claims, "nn_pairs": nn,
        "wall_seconds": time.time() - t0,
        "train_seconds_total": sum(r["train_seconds"] for c in configs.values()
                                   for r in c["runs"] if math.isfinite(r["train_seconds"])),
        "load_average": [load_start, os.getloadavg()[0]],
    }
    note = f"{args.steps} steps x batch {args.batch_size}, seeds {args.seeds}, CPU"
    figures = draw_figures(groups, configs, args.out, note)
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(report, f, indent=1, default=lambda x: None)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(markdown(report))
    print("\n" + markdown(report))
    print(f"wrote {args.out}/" + ", ".join(["study.md", "study.json", *figures]
                                           + (["nn_pairs.png"] if nn else []))
          + f" in {report['wall_seconds'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
