"""A training run's record: what train.py prints and writes to its --output folder.

    log = RunLog(args, model, dataset, world, step)   # prints the header, writes args.json
    log.steps(step, n, terms, n_bad, n_skipped)       # log.jsonl + a tqdm bar, or plain lines
    log.write({"step": step, "zeroshot": result})     # anything else, one JSON line
    log.finish(result, step, seconds)                 # the last lines; accuracy.png

Plain lines replace the bar when stdout is not a terminal (SLURM, nohup), with the loss terms,
the lr, samples/s and the ETA. `args` is train.py's namespace (output, total_steps, ...).
"""
import datetime
import json
import os
import sys
import time

import torch

from eval_zeroshot import format_result
from optim import lr_at


class RunLog:
    """Rank 0's record of a run: the header, log.jsonl (the loss terms every --log-every steps,
    each evaluation, the final result), a tqdm bar on a terminal and plain lines elsewhere."""

    def __init__(self, args, model, base, world, step):
        os.makedirs(args.output, exist_ok=True)
        self.args, self.world, self.first_step = args, world, step
        self.file = open(os.path.join(args.output, "log.jsonl"), "a")
        with open(os.path.join(args.output, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1, sort_keys=True)
        n_params = sum(p.numel() for p in model.parameters())
        pairs = f" ({len(base):,} pairs)" if args.data == "builtin" else ""
        print(f"{args.method} {args.model} ({n_params / 1e6:.1f}M params) on {args.data}{pairs}, "
              f"{world} x {args.batch_size} per step, {args.total_steps} steps, {args.device}, "
              f"{args.precision}" + (f", resumed at step {step}" if step else "")
              + f"; every argument: {os.path.join(args.output, 'args.json')}")
        from tqdm import tqdm
        self.bar = tqdm(total=args.total_steps, initial=step, dynamic_ncols=True, disable=None)
        self.t_start = self.t_log = time.perf_counter()

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def tick(self):
        self.bar.update(1)

    def steps(self, step, n, terms, n_bad, n_skipped):
        """The mean of the last n steps' terms (a list of dicts of tensors): one host sync."""
        keys = list(terms[0])
        means = torch.stack([sum(t[k] for t in terms) for k in keys]).div(n).tolist()
        record = {k: round(v, 5) for k, v in zip(keys, means)}
        seconds, self.t_log = time.perf_counter() - self.t_log, time.perf_counter()
        record.update(step=step, epoch=(step - 1) // self.args.steps_per_epoch,
                      lr=lr_at(step - 1, self.args.total_steps, self.args.warmup, self.args.lr),
                      samples_per_s=round(n * self.args.batch_size * self.world / seconds, 1),
                      bad_steps=n_bad, skipped_samples=n_skipped)
        self.write(record)
        self.bar.set_postfix(loss=record.get("total"), sps=record["samples_per_s"],
                             lr=f"{record['lr']:.2e}")
        if not sys.stdout.isatty():  # SLURM, nohup: tqdm is silent, print a line
            eta = ((time.perf_counter() - self.t_start) / (step - self.first_step)
                   * (self.args.total_steps - step))
            print(log_line(record, self.args.total_steps, eta), flush=True)

    def finish(self, result, step, train_seconds, footer=None):
        """The final result: log.jsonl, accuracy.png, and the lines a user reads last."""
        self.bar.close()
        args = self.args
        trained = (step - self.first_step) * args.batch_size * self.world  # 0: resumed a done run
        result["samples_per_s"] = trained / train_seconds if trained else 0.0
        result["train_seconds"] = train_seconds
        self.write({"step": step, "final": result})
        self.file.close()
        where = (f"the built-in eval split ({args.eval_size} images)" if args.zeroshot == "builtin"
                 else f"{args.zeroshot} ({result['n']} images)")
        print(f"zero-shot {format_result(result)}  on {where} after {step} steps "
              f"({result['samples_per_s']:.0f} samples/s, {train_seconds:.0f} s training)")
        files = [("checkpoint", "checkpoint.pt"), ("log", "log.jsonl")]
        if plot_accuracy(os.path.join(args.output, "log.jsonl"),
                         os.path.join(args.output, "accuracy.png")):
            files.append(("accuracy over the run", "accuracy.png"))
        print(" | ".join(f"{what}: {os.path.join(args.output, name)}" for what, name in files))
        if footer:
            print(footer)


def log_line(record, total, eta_seconds):
    """One plain line for logs that are files (SLURM, nohup), where tqdm prints nothing: the
    total loss, then its terms (those switched off, exactly 0, are left out)."""
    skip = {"total", "step", "epoch", "lr", "samples_per_s", "bad_steps", "skipped_samples"}
    terms = " ".join([f"total {record['total']:.4f}"] + [f"{k} {v:.4f}" for k, v in
                                                          record.items() if k not in skip and v])
    line = (f"step {record['step']}/{total} | {terms} | lr {record['lr']:.3g} | "
            f"{record['samples_per_s']:.1f} samples/s | ETA "
            f"{datetime.timedelta(seconds=round(eta_seconds))}")
    extra = [f"{record[k]} {k.replace('_', ' ')}" for k in ("bad_steps", "skipped_samples")
             if record.get(k)]
    return line + "".join(f" | {e}" for e in extra)


def plot_accuracy(log_path, png_path):
    """accuracy.png: zero-shot top-1 (and colour / shape on the built-in data) at every
    evaluation in log.jsonl; False if fewer than two evaluations."""
    from charts import line_chart
    with open(log_path) as f:
        evals = [r for r in map(json.loads, f) if r.get("zeroshot")]
    if len(evals) < 2:
        return False
    keys = [("top-1", "top1"), ("colour", "colour"), ("shape", "shape")]
    series = {name: [(r["step"], r["zeroshot"][k]) for r in evals if k in r["zeroshot"]]
              for name, k in keys}
    line_chart({k: v for k, v in series.items() if v}, png_path,
               "Zero-shot accuracy during training", x_label="step", y_label="%", y_scale=100,
               y_max=100)
    return True
