"""Linear-probe evaluation on frozen image features (DeCLIP Sec. 4.2, Appendix D, Table 6).

The image tower is a fixed feature extractor; a multinomial logistic regression is fitted on its
features with full-batch L-BFGS (at most 1000 iterations), as in CLIP (Radford et al., App. A.3):

    z = encode_image(x)                                 # (N, D) frozen features, no grad
    objective(W, b) = sum_i CE(W z_i + b, y_i) + lam/2 * ||W||^2       # W (C, D), b (C,)

Regularisation convention: lam = 1/C of scikit-learn's LogisticRegression (sum of the per-sample
losses, bias not penalised), which is what CLIP used and what the paper's range [1e-6, 1e6] refers
to. We minimise the same objective divided by N (mean CE + lam/(2N) ||W||^2): same minimiser, but
gradients of order one whatever N, which suits L-BFGS's tolerances.

lam is chosen on a validation split by the paper's parametric binary search (`search_lambda`):
evaluate lam in {1e-6, 1e-4, ..., 1e6}, then repeatedly halve the (log-space) step around the best
value until the resolution is 8 steps per decade (15 fits instead of a 97-point sweep). The chosen
lam is refitted on train + validation and the test metric is reported: accuracy, or mean per-class
accuracy for Pets, Flowers-102, Caltech-101 and FGVC-Aircraft (Table 6). Datasets with a validation
split (Flowers-102, DTD, FGVC-Aircraft) use it; the others hold out 20% of the training set
(seed 0).

Shapes: N samples, D feature dim, C classes.

Usage:
    python linear_probe.py --checkpoint out/last.pt --datasets builtin,cifar10 --data-root data \
        --out results/
    # data/<dir> per dataset: cifar (CIFAR-10 and -100), food101, pets, flowers, sun397, cars, dtd,
    # caltech101, aircraft, imagenet (train/ and val/ folders)

    from linear_probe import fit_logistic_regression, linear_probe, search_lambda

Deliberately left out: CLIP's use of pre-projection ViT features (we probe encode_image's embedding,
the same for every architecture), data augmentation, feature caching to disk, multi-GPU extraction.
Where torchvision has no official split (SUN397, Caltech-101), a seeded split of the paper's sizes
is drawn (50 + 50 and 30 + rest images per class) rather than the official partition files.
"""
import argparse
import json
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from eval_zeroshot import (DOWNLOAD_HINT, LabeledImages, eval_mode, image_size_of, imagenet_split,
                           mean_per_class_accuracy, model_dtype, to_rgb, torchvision_dataset)

# name -> (folder under --data-root, Table 6 metric)
DATASETS = {
    "builtin": (None, "accuracy"),
    "cifar10": ("cifar", "accuracy"),
    "cifar100": ("cifar", "accuracy"),
    "food101": ("food101", "accuracy"),
    "pets": ("pets", "mean_per_class"),
    "flowers": ("flowers", "mean_per_class"),
    "sun397": ("sun397", "accuracy"),
    "cars": ("cars", "accuracy"),
    "dtd": ("dtd", "accuracy"),
    "caltech101": ("caltech101", "mean_per_class"),
    "aircraft": ("aircraft", "mean_per_class"),
    "imagenet": ("imagenet", "accuracy"),
}
# torchvision class of each dataset, for the "how to get it" line of a missing-data error
TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "food101": "Food101",
               "pets": "OxfordIIITPet", "flowers": "Flowers102", "sun397": "SUN397",
               "dtd": "DTD", "caltech101": "Caltech101", "aircraft": "FGVCAircraft"}
CARS_HINT = ("place the Stanford Cars files where torchvision.datasets.StanfordCars('{root}') "
             "expects them (torchvision can no longer download them)")


# ------------------------------------------------------------------------------ logistic regression

def fit_logistic_regression(X, y, lam, num_classes, init=None, max_iter=1000):
    """(W (C, D), b (C,)) minimising sum_i CE(W x_i + b, y_i) + lam/2 ||W||^2, full-batch L-BFGS.

    `init` = (W, b) warm-starts the fit (e.g. from the solution for a nearby lam).
    """
    N, D = X.shape
    W = torch.zeros(num_classes, D, dtype=X.dtype, device=X.device)
    b = torch.zeros(num_classes, dtype=X.dtype, device=X.device)
    if init is not None:
        W, b = init[0].to(W).clone(), init[1].to(b).clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # the sklearn objective divided by N: mean CE + lam / (2N) ||W||^2 (same minimiser)
        loss = F.cross_entropy(X @ W.T + b, y) + lam / (2 * N) * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # one step() runs up to max_iter L-BFGS iterations
    return W.detach(), b.detach()


def score(W, b, X, y, metric="accuracy"):
    pred = (X @ W.T + b).argmax(dim=1)  # (N,)
    if metric == "mean_per_class":
        return mean_per_class_accuracy(pred, y, W.shape[0])
    return (pred == y).float().mean().item()


class LambdaSearch(NamedTuple):
    best: float  # the chosen lam
    score: float  # its validation score
    history: list  # [(lam, score)] in evaluation order; len(history) = number of fits


def search_lambda(score_fn, lo=1e-6, hi=1e6, steps_per_decade=8):
    """Parametric binary search for the lam maximising score_fn(lam) (DeCLIP Appendix D).

    Works on the grid lam = 10^(e / steps_per_decade), e integer. First every 2 decades from lo to
    hi (7 values for the default range), then the step around the best value is halved (2, 1, 1/2,
    1/4, 1/8 decade), evaluating the two new neighbours each time, until it is 1/steps_per_decade.
    An interior optimum thus costs 7 + 2·4 = 15 evaluations. Ties go to the larger lam (the
    simpler model). Evaluation goes from strong to weak regularisation, which suits warm starts.
    """
    if steps_per_decade < 1 or steps_per_decade & (steps_per_decade - 1):
        raise ValueError(f"steps_per_decade={steps_per_decade}: must be a power of two (halving)")
    e_lo = round(math.log10(lo) * steps_per_decade)
    e_hi = round(math.log10(hi) * steps_per_decade)
    step = 2 * steps_per_decade
    scores = {}  # exponent e -> score
    history = []

    def evaluate(e):
        if e not in scores and e_lo <= e <= e_hi:
            lam = 10 ** (e / steps_per_decade)
            scores[e] = score_fn(lam)
            history.append((lam, scores[e]))

    for e in reversed(range(e_lo, e_hi + 1, step)):
        evaluate(e)
    best = max(scores, key=lambda e: (scores[e], e))
    while step > 1:
        step //= 2
        for e in (best + step, best - step):
            evaluate(e)
        best = max(scores, key=lambda e: (scores[e], e))
    return LambdaSearch(10 ** (best / steps_per_decade), scores[best], history)


def linear_probe(train, val, test, num_classes, metric="accuracy", device="cpu", max_iter=1000,
                 progress=False):
    """Choose lam on (train, val), refit on train + val, score on test. Splits: (X (N, D), y (N,)).

    Returns {"metric", "lambda", "val", "test", "n_train", "n_val", "n_test", "fits"}.
    """
    (X_tr, y_tr), (X_val, y_val), (X_te, y_te) = [(X.to(device), y.to(device))
                                                  for X, y in (train, val, test)]
    fits = {}  # lam -> (W, b) fitted on train, for warm starts
    bar = tqdm(total=15, desc="lambda search", disable=not progress)

    def val_score(lam):
        near = min(fits, key=lambda other: abs(math.log(other / lam)), default=None)
        fits[lam] = fit_logistic_regression(X_tr, y_tr, lam, num_classes,
                                            init=fits.get(near), max_iter=max_iter)
        bar.update()
        return score(*fits[lam], X_val, y_val, metric)

    search = search_lambda(val_score)
    bar.close()
    W, b = fit_logistic_regression(torch.cat([X_tr, X_val]), torch.cat([y_tr, y_val]), search.best,
                                   num_classes, init=fits[search.best], max_iter=max_iter)
    return {"metric": metric, "lambda": search.best, "val": search.score,
            "test": score(W, b, X_te, y_te, metric), "n_train": len(y_tr), "n_val": len(y_val),
            "n_test": len(y_te), "fits": len(search.history)}


# ---------------------------------------------------------------------------- features and datasets

@torch.no_grad()
def extract_features(model, loader, device="cpu", progress=False, desc="features"):
    """Frozen image features: (X (N, D) float32 on CPU, y (N,) int64)."""
    feats, labels = [], []
    dtype = model_dtype(model)
    with eval_mode(model):
        for images, y in tqdm(loader, desc=desc, disable=not progress):
            feats.append(model.encode_image(images.to(device, dtype)).float().cpu())  # (B, D)
            labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def targets_of(ds):
    """Integer labels of a torchvision dataset without decoding its images."""
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return torch.as_tensor(getattr(ds, attr))
    return torch.as_tensor([ds[i][1] for i in range(len(ds))])  # slow fallback: loads every image


def per_class_split(labels, n_first, n_second=None, seed=0):
    """Indices of n_first random samples per class and of n_second (default: all the rest)."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        first += idx[:n_first].tolist()
        second += idx[n_first:None if n_second is None else n_first + n_second].tolist()
    return first, second


def holdout_split(ds, fraction=0.2, seed=0):
    """(train, val) Subsets: a fixed random `fraction` of the training set becomes validation."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(ds) * fraction))
    return Subset(ds, perm[n_val:]), Subset(ds, perm[:n_val])


def probe_splits(name, root, transform, val_fraction=0.2, seed=0, image_size=64,
                 builtin_sizes=(5000, 1000)):
    """(train, val, test) datasets of (image tensor, label) for one of DATASETS.

    `root` is the dataset's own folder (e.g. data/cifar). download=False always: a missing dataset
    raises a one-line FileNotFoundError naming the root and how to get it.
    """
    tv = torchvision_dataset
    val = None
    if name == "builtin":
        from data import SyntheticCaptions  # lazy: this file imports without data.py

        train, test = (LabeledImages(SyntheticCaptions(split=s, size=n, image_size=image_size,
                                                       seed=seed), transform)
                       for s, n in zip(("train", "eval"), builtin_sizes))
    elif name in ("cifar10", "cifar100"):
        train = tv(name.upper(), root, train=True, transform=transform)
        test = tv(name.upper(), root, train=False, transform=transform)
    elif name == "food101":
        train, test = (tv("Food101", root, split=s, transform=transform) for s in ("train", "test"))
    elif name == "pets":
        train, test = (tv("OxfordIIITPet", root, split=s, transform=transform)
                       for s in ("trainval", "test"))
    elif name == "flowers":
        train, val, test = (tv("Flowers102", root, split=s, transform=transform)
                            for s in ("train", "val", "test"))
    elif name == "dtd":
        train, val, test = (tv("DTD", root, split=s, partition=1, transform=transform)
                            for s in ("train", "val", "test"))
    elif name == "aircraft":
        train, val, test = (tv("FGVCAircraft", root, split=s, annotation_level="variant",
                               transform=transform) for s in ("train", "val", "test"))
    elif name == "cars":
        train, test = (tv("StanfordCars", root, hint=CARS_HINT, split=s, transform=transform)
                       for s in ("train", "test"))
    elif name in ("sun397", "caltech101"):
        # no official split in torchvision: draw one with Table 6's sizes per class
        ds = (tv("SUN397", root, transform=transform) if name == "sun397" else
              tv("Caltech101", root, target_type="category", transform=transform))
        if name == "sun397":
            first, second = per_class_split(targets_of(ds), 50, 50, seed)  # 19,850 + 19,850
        else:
            first, second = per_class_split(targets_of(ds), 30, None, seed)  # 30 per class + rest
        train, test = Subset(ds, first), Subset(ds, second)
    elif name == "imagenet":
        train = imagenet_split(root, "train", transform)
        test = imagenet_split(root, "val", transform)
    else:
        raise ValueError(f"--datasets {name}: unknown; choose from {', '.join(DATASETS)}")
    if val is None:
        train, val = holdout_split(train, val_fraction, seed)
    return train, val, test


def num_classes_of(*splits):
    return int(max(y.max().item() for _, y in splits)) + 1


# ------------------------------------------------------------------------------------ command line

def how_to_get(name, root):
    if name in TORCHVISION:
        return "get it with: " + DOWNLOAD_HINT.format(name=TORCHVISION[name], root=root)
    if name == "cars":
        return CARS_HINT.format(root=root)
    return "it must hold ImageNet-1k's train/ and val/, one folder per wnid, or pass --data-root"


def write_results(results, out_dir):
    """results/linear_probe.json and a markdown table results/linear_probe.md."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "linear_probe.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = ["| dataset | metric | test (%) | val (%) | lambda | train | val | test |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['metric']} | {100 * r['test']:.2f} | {100 * r['val']:.2f} | "
                     f"{r['lambda']:.3g} | {r['n_train']} | {r['n_val']} | {r['n_test']} |")
    if len(results) > 1:
        mean = sum(r["test"] for r in results.values()) / len(results)
        lines.append(f"| **mean** | | {100 * mean:.2f} | | | | | |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "linear_probe.md"), "w") as f:
        f.write(table)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description="Linear-probe accuracy of frozen CLIP/DeCLIP features.")
    p.add_argument("--checkpoint", required=True, help="ours, OpenAI (JIT/state dict) or OpenCLIP")
    p.add_argument("--datasets", default="builtin",
                   help=f"comma-separated from: {', '.join(DATASETS)}")
    p.add_argument("--data-root", default="data", help="one folder per dataset (see the docstring)")
    p.add_argument("--out", default="results", help="folder for linear_probe.json and .md")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the training set held out where there is no validation split")
    p.add_argument("--builtin-sizes", default="5000,1000", help="builtin: train,test sizes")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    for name in names:  # fail before the (slow) model load and feature extraction
        if name not in DATASETS:
            raise SystemExit(f"linear_probe.py: --datasets {name}: unknown; choose from "
                             f"{', '.join(DATASETS)}")
        folder = DATASETS[name][0]
        if folder and not os.path.isdir(os.path.join(args.data_root, folder)):
            root = os.path.join(args.data_root, folder)
            raise SystemExit(f"linear_probe.py: {name}: {root} not found; {how_to_get(name, root)}")
    from factory import load_model_and_tokenizer  # lazy: probing a model needs no loader

    try:
        model, _ = load_model_and_tokenizer(args.checkpoint, args.device)
        from views import eval_transform  # lazy: this file imports without views.py
        from torchvision import transforms

        size = image_size_of(model)
        transform = transforms.Compose([to_rgb, eval_transform(size)])
        sizes = tuple(int(s) for s in args.builtin_sizes.split(","))
        results = {}
        for name in names:
            folder, metric = DATASETS[name]
            root = os.path.join(args.data_root, folder) if folder else None
            splits = probe_splits(name, root, transform, args.val_fraction, image_size=size,
                                  builtin_sizes=sizes)
            loaders = [DataLoader(ds, args.batch_size, num_workers=args.workers) for ds in splits]
            feats = [extract_features(model, loader, args.device, progress=True, desc=f"{name} {s}")
                     for loader, s in zip(loaders, ("train", "val", "test"))]
            results[name] = linear_probe(*feats, num_classes_of(*feats), metric, args.device,
                                         args.max_iter, progress=True)
            r = results[name]
            print(f"{name}: {metric} {100 * r['test']:.2f}% (lambda {r['lambda']:.3g}, "
                  f"val {100 * r['val']:.2f}%)")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"linear_probe.py: {e}")
    print(write_results(results, args.out))


if __name__ == "__main__":
    main()
