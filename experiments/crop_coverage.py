"""What a DeCLIP crop does to the built-in objects: how often a view holds a whole copy of the main
object, at least half of one (builtin_data.label_visible's rule), or cuts a copy at its border.

    python experiments/crop_coverage.py     # crop scales 0.2, 0.5, 0.75, 0.9 (to 1)
    python experiments/crop_coverage.py --scales 0.2 --n 1000

One crop of each of the first --n eval images per scale, drawn by views.DeclipView (aspect ratio
3/4-4/3) from torch's RNG seeded with --seed; the copies' pixels come from SyntheticCaptions.mask.
"""
import argparse
import os
import sys

import numpy as np
import torch

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_data  # noqa: E402
import views  # noqa: E402


def coverage(ds, view, n):
    """-> (whole, half, cut): fractions of n views with a copy >= 95% inside, a copy >= 50%
    inside, a copy 5-95% inside (cut by the crop's border)."""
    whole = half = cut = 0
    for i in range(n):
        mask = ds.mask(i)                                                 # (S, S) copy ids
        top, left, h, w = view.sample(ds[i][0])["crop"]
        inside = np.bincount(mask[top:top + h, left:left + w].ravel(), minlength=mask.max() + 1)
        f = inside[1:] / np.bincount(mask.ravel())[1:]                    # (copies,) in the crop
        whole, half = whole + (f >= 0.95).any(), half + (f >= 0.5).any()
        cut += ((f > 0.05) & (f < 0.95)).any()
    return whole / n, half / n, cut / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="0.2,0.5,0.75,0.9", help="lower ends of the crop scale")
    p.add_argument("--n", type=int, default=300, help="eval images, one crop each")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ds = builtin_data.SyntheticCaptions("eval", size=args.n)
    torch.manual_seed(args.seed)
    print("crop scale | whole copy | half a copy | a copy cut")
    for lo in map(float, args.scales.split(",")):
        whole, half, cut = coverage(ds, views.DeclipView(64, scale=(lo, 1.0)), args.n)
        print(f"{lo:.2f}-1 | {whole:.0%} | {half:.0%} | {cut:.0%}")


if __name__ == "__main__":
    main()
