"""Image-text retrieval: image->text and text->image Recall@K, as CLIP and OpenCLIP report it.

A set of N images, each with one or more of the M captions (img_of_txt[j] is caption j's image).
Every image and caption is embedded once and L2-normalised; s = z_img @ z_txt.T (N, M).

- image->text: an image is a hit at K when one of its captions is among the K best captions.
- text->image: a caption is a hit at K when its image is among the K best images.

Ties count against the model (pessimistic rank): the rank of an image is the number of *other*
images' captions that score at least as high as its best caption; the rank of a caption is the
number of other images that score at least as high as its own; Recall@K = fraction of rank < K.
So a model that gives every caption the same score gets R@K = 0 (up to K >= all candidates), never
the chance a lucky order would give. Two captions of the same image never compete with each
other. Identical caption strings are embedded once, so a caption shared word for word by two
images is an exact tie (the built-in data has many: "red circles").

Sources (`--dataset`):
- `builtin`: the built-in eval split (builtin_data.py), one caption per image (its alt text).
- a CSV/TSV with `filepath` and `title` columns (OpenCLIP's layout, read by data.CsvDataset);
  rows with the same file are one image with several captions.
- the Karpathy-split JSON of COCO / Flickr30k (`dataset_coco.json`, `dataset_flickr30k.json`):
  images[] with filepath (COCO only), filename, split, sentences[].raw; `--split test` (default,
  5,000 COCO / 1,000 Flickr images with 5 captions each), `--data-root` the image folder (COCO:
  the folder holding val2014/; default: the JSON's folder).

Shapes: N images, M captions, D embedding.

Usage:
    python retrieval.py --checkpoint runs/demo/checkpoint.pt --dataset builtin
    python retrieval.py --checkpoint ViT-B-32.pt --dataset data/coco/dataset_coco.json \
        --data-root data/coco --split test --json results/coco.json
    python retrieval.py --checkpoint ckpt.pt --dataset pairs.tsv

    r = recall_at_k(z_img, z_txt, img_of_txt)  # {"image_to_text": {1: .., 5: .., 10: ..}, ...}

Left out: re-ranking, multi-GPU, and the 1K-image COCO protocol (5 folds of the test split).
"""
import argparse
import json
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

KS = (1, 5, 10)


# ------------------------------------------------------------------------------------- metrics

@torch.no_grad()
def retrieval_ranks(z_img, z_txt, img_of_txt, chunk_elements=1 << 24):
    """Pessimistic 0-based ranks: (image->text (N,), text->image (M,)) long tensors.

    z_img (N, D), z_txt (M, D) as they are (normalise first for cosine); img_of_txt (M,) ints.
    The score matrix is computed in blocks of about chunk_elements entries; every comparison is
    between entries of one block, so a tie is never split by a rounding difference between blocks.
    """
    N, M = len(z_img), len(z_txt)
    img_of_txt = torch.as_tensor(img_of_txt, dtype=torch.long, device=z_txt.device)
    if img_of_txt.shape != (M,):
        raise ValueError(f"img_of_txt has shape {tuple(img_of_txt.shape)}, expected ({M},)")
    if M and (img_of_txt.min() < 0 or img_of_txt.max() >= N):
        raise ValueError(f"img_of_txt holds image indices outside [0, {N})")
    if (torch.bincount(img_of_txt, minlength=N) == 0).any():
        raise ValueError("every image needs at least one caption")
    rank_i2t = torch.empty(N, dtype=torch.long, device=z_img.device)
    step = max(1, chunk_elements // max(M, 1))
    for a in range(0, N, step):
        s = z_img[a:a + step] @ z_txt.T  # (n, M)
        own = img_of_txt[None, :] == torch.arange(a, a + len(s), device=s.device)[:, None]
        best = s.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # (n, 1)
        rank_i2t[a:a + step] = ((s >= best) & ~own).sum(dim=1)
    rank_t2i = torch.empty(M, dtype=torch.long, device=z_txt.device)
    step = max(1, chunk_elements // max(N, 1))
    for a in range(0, M, step):
        s = z_img @ z_txt[a:a + step].T  # (N, m)
        mine = img_of_txt[a:a + step]  # (m,)
        own = torch.arange(N, device=s.device)[:, None] == mine[None, :]  # (N, m)
        pos = s.gather(0, mine[None, :])  # (1, m) the score of each caption's own image
        rank_t2i[a:a + step] = ((s >= pos) & ~own).sum(dim=0)
    return rank_i2t, rank_t2i


def recall_at_k(z_img, z_txt, img_of_txt, ks=KS):
    """{"image_to_text": {k: R@k}, "text_to_image": {k: R@k}, "n_images", "n_texts"}, fractions."""
    rank_i2t, rank_t2i = retrieval_ranks(z_img, z_txt, img_of_txt)
    return {"image_to_text": {k: (rank_i2t < k).sum().item() / len(rank_i2t) for k in ks},
            "text_to_image": {k: (rank_t2i < k).sum().item() / len(rank_t2i) for k in ks},
            "n_images": len(z_img), "n_texts": len(z_txt)}


def format_recall(r):
    def side(d):
        return " ".join(f"R@{k} {100 * v:.1f}%" for k, v in d.items())
    return (f"image->text {side(r['image_to_text'])} | text->image {side(r['text_to_image'])}  "
            f"({r['n_images']} images, {r['n_texts']} captions)")


# --------------------------------------------------------------------------------- datasets

class Pairs(NamedTuple):
    """N images (file paths, or indices into `builtin`), M captions, img_of_txt (M,)."""
    images: list
    captions: list
    img_of_txt: list
    builtin: object = None


def group_captions(rows):
    """[(image key, caption)] -> Pairs: images in order of first appearance, empty captions out."""
    index, images, captions, img_of_txt = {}, [], [], []
    for image, caption in rows:
        caption = (caption or "").strip()
        if not caption:
            continue
        if image not in index:
            index[image] = len(images)
            images.append(image)
        captions.append(caption)
        img_of_txt.append(index[image])
    return Pairs(images, captions, img_of_txt)


def read_csv(path, img_key="filepath", caption_key="title", sep=None):
    """A CSV/TSV of (image path, caption) rows (data.CsvDataset: paths relative to the file)."""
    from data import CsvDataset  # lazy: the metric above needs torch only

    ds = CsvDataset(path, img_key, caption_key, sep)
    pairs = group_captions(zip(ds.paths, ds.captions))
    if not pairs.images:
        raise ValueError(f"{path}: no rows with a caption")
    return pairs


def read_karpathy_json(path, split="test", image_root=None):
    """COCO / Flickr30k Karpathy split: images of `split`, each with its sentences[].raw."""
    try:
        with open(path, encoding="utf-8") as f:
            images = json.load(f)["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Karpathy-split JSON with an 'images' list "
                         f"({type(e).__name__})") from None
    root = image_root or os.path.dirname(os.path.abspath(path))
    rows = []
    for im in images:
        if im.get("split") != split:
            continue
        file = os.path.join(root, im.get("filepath", ""), im["filename"])
        rows += [(file, s.get("raw", "")) for s in im.get("sentences", [])]
    if not rows:
        splits = sorted({im.get("split", "?") for im in images})
        raise ValueError(f"{path}: no images in split {split!r} (it has: {', '.join(splits)}); "
                         f"pass --split")
    return group_captions(rows)


def read_builtin(n=1000, image_size=64, seed=0):
    """The built-in eval split: image i with its one caption."""
    from builtin_data import SyntheticCaptions

    ds = SyntheticCaptions("eval", size=n, image_size=image_size, seed=seed)
    return Pairs(list(range(n)), [ds.caption(i) for i in range(n)], list(range(n)), builtin=ds)


def check_files(pairs, what):
    missing = [p for p in pairs.images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(pairs.images)} images not found, "
                                f"e.g. {missing[0]} (JSON: set --data-root to the image folder)")


class ImageList(Dataset):
    """Pairs' images through `transform`: files opened by path, or built-in items by index."""

    def __init__(self, pairs, transform):
        self.pairs, self.transform = pairs, transform

    def __len__(self):
        return len(self.pairs.images)

    def __getitem__(self, i):
        item = self.pairs.images[i]
        if self.pairs.builtin is not None:
            return self.transform(self.pairs.builtin[item][0])
        try:
            with Image.open(item) as im:
                return self.transform(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{item}: cannot read the image ({type(e).__name__})") from None


# ------------------------------------------------------------------------------------- embedding

@torch.no_grad()
def embed(model, tokenizer, pairs, batch_size=256, workers=0, device="cpu", progress=False):
    """(z_img (N, D), z_txt (M, D)), L2-normalised; identical captions are embedded once."""
    from views import eval_transform  # lazy: this file imports without views.py
    from eval_zeroshot import context_length_of, eval_mode, image_size_of, model_dtype

    loader = DataLoader(ImageList(pairs, eval_transform(image_size_of(model))),
                        batch_size=batch_size, num_workers=workers)
    unique = sorted(set(pairs.captions))
    where = {c: k for k, c in enumerate(unique)}
    z_img, z_txt = [], []
    with eval_mode(model):
        for images in tqdm(loader, desc="images", disable=not progress):
            z_img.append(model.encode_image(images.to(device, model_dtype(model))).float())
        for a in range(0, len(unique), batch_size):
            ids = tokenizer(unique[a:a + batch_size], context_length=context_length_of(model))
            z_txt.append(model.encode_text(ids.to(device)).float())
    z_txt = torch.cat(z_txt)[torch.tensor([where[c] for c in pairs.captions])]  # (M, D)
    return F.normalize(torch.cat(z_img), dim=-1), F.normalize(z_txt, dim=-1)


def read_pairs(args, image_size):
    d = args.dataset
    if d == "builtin":
        return read_builtin(args.n, image_size, args.data_seed)
    if not os.path.isfile(d):
        raise FileNotFoundError(f"--dataset {d}: no such file (builtin, a .csv/.tsv with "
                                f"filepath/title columns, or a Karpathy dataset_*.json)")
    if d.lower().endswith(".json"):
        pairs = read_karpathy_json(d, args.split, args.data_root)
    else:
        pairs = read_csv(d, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    check_files(pairs, f"--dataset {d}")
    return pairs


def main(argv=None):
    p = argparse.ArgumentParser(description="Image-text retrieval Recall@1/5/10 of a CLIP model.")
    p.add_argument("--checkpoint", required=True, help="ours, OpenAI (JIT/state dict) or OpenCLIP")
    p.add_argument("--dataset", default="builtin",
                   help="builtin, a CSV/TSV (filepath, title) or a Karpathy dataset_*.json")
    p.add_argument("--split", default="test", help="Karpathy JSON: which split")
    p.add_argument("--data-root", default=None, help="Karpathy JSON: image folder")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-separator", default=None, help="default: tab for .tsv, comma otherwise")
    p.add_argument("--n", type=int, default=1000, help="builtin: number of eval images")
    p.add_argument("--data-seed", type=int, default=0, help="builtin: which built-in dataset")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(4, (os.cpu_count() or 2) // 2))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the result dict to this file")
    args = p.parse_args(argv)

    from eval_zeroshot import image_size_of, save_json
    from factory import load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer(args.checkpoint, args.device)
        pairs = read_pairs(args, image_size_of(model))
        z_img, z_txt = embed(model, tokenizer, pairs, args.batch_size, args.workers,
                             args.device, progress=True)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"retrieval.py: {str(e).strip().splitlines()[-1]}")
    result = recall_at_k(z_img, z_txt, pairs.img_of_txt)
    images_of = {}
    for caption, image in zip(pairs.captions, pairs.img_of_txt):
        images_of.setdefault(caption, set()).add(image)
    shared = sum(len(images) > 1 for images in images_of.values())
    print(f"{args.dataset}: {format_recall(result)}  ({args.checkpoint})")
    if shared:
        print(f"note: {shared} caption strings belong to several images; those exact ties count "
              f"against the model")
    result.update(dataset=args.dataset, checkpoint=args.checkpoint, shared_captions=shared)
    if args.json:
        save_json(result, args.json)


if __name__ == "__main__":
    main()
