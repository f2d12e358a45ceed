"""Zero-shot top-1 over the steps of several train.py runs, on one chart (README.md's picture).

    python experiments/compare_runs.py runs/demo runs/demo-s1 runs/demo-s2 runs/demo-clip \
        --out results/demo_vs_clip.png

Each run folder's log.jsonl holds its evaluations ({"step", "zeroshot": {"top1", ...}}) and its
args.json the method and seed, which name the line.
"""
import argparse
import json
import os
import sys

# the library modules (charts.py, ...) live at the repo root, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from charts import line_chart  # noqa: E402


def evaluations(run):
    """[(step, top-1)] of a run folder, from its log.jsonl."""
    with open(os.path.join(run, "log.jsonl")) as f:
        return [(r["step"], r["zeroshot"]["top1"]) for r in map(json.loads, f)
                if r.get("zeroshot")]


def label(run):
    with open(os.path.join(run, "args.json")) as f:
        args = json.load(f)
    return f"{'DeCLIP' if args['method'] == 'declip' else 'CLIP'}, seed {args['seed']}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="train.py output folders")
    p.add_argument("--out", default="compare.png")
    p.add_argument("--title", default="Zero-shot top-1 during training, 2,000 built-in pairs")
    args = p.parse_args(argv)
    series = {label(run): evaluations(run) for run in args.runs}
    line_chart(series, args.out, args.title, x_label="step", y_label="top-1 %", y_scale=100,
               y_max=100)
    print(args.out)


if __name__ == "__main__":
    main()
