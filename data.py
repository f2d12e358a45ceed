"""Image-caption data for CLIP/DeCLIP: the built-in set, CSV/TSV, img2dataset shards, views.

What is here:
- `build_dataset`: a name -> a base (image, caption) dataset: "builtin" (builtin_data.py's
  `SyntheticCaptions`: generated from the index alone, no files, with `classnames` and
  `templates` for zero-shot evaluation), a CSV/TSV file (`CsvDataset`, OpenCLIP's `filepath` /
  `title` layout), or a folder of img2dataset tar shards (shards.py's `ShardDataset`). The file
  datasets are map-style, so `DistributedSampler`-like samplers split them across ranks and
  resume is exact; corrupt, truncated or missing images and empty captions come back as None.
- `ImageText` applies the views (views.py) and the text augmentation (eda.py) so that every
  sample's augmentation is a pure function of (seed, epoch, index): results do not depend on
  the number of workers or ranks, or on resuming. An unusable sample is replaced by another.
- `collate` stacks the images and tokenises the captions, and reports the replaced samples in
  `n_skipped`.
- `StepSampler` gives each rank its (epoch, index) pairs for a range of steps: one DataLoader
  for the whole run, resumable at any step.

Shapes: B batch, L context length, H = W image size.
    image, image_aug (B, 3, H, W) float;  ids, ids_aug (B, L) long;  n_skipped () long

Usage:
    base = build_dataset("builtin", split="train")            # or "cc3m", "my.csv"
    ds = ImageText(base, views.DeclipView(64), views=2, text_aug=eda.augment, seed=0)
    loader = DataLoader(ds, batch_size=128, num_workers=2,
                        collate_fn=functools.partial(collate, tokenizer=tok, context_length=32))
    for epoch in ...: ds.set_epoch(epoch); ...   # batch: image, image_aug, ids, ids_aug, n_skipped
    sampler = StepSampler(len(ds), 128, rank=0, world=1, seed=0, total_steps=1000)
    loader = DataLoader(ds, batch_size=128, sampler=sampler, ...)  # ds[(epoch, i)]: one loader

Left out: streaming (IterableDataset) webdataset pipelines and DataLoader's persistent_workers
(a persistent worker keeps the epoch it started with; train.py instead hands the epoch to the
workers with each index).
"""
import csv
import hashlib
import os
import random

import torch

from builtin_data import SyntheticCaptions
from shards import FileDataset, ShardDataset

PREPARE_CC3M = ("img2dataset --url_list cc3m.tsv --input_format tsv --url_col url "
                "--caption_col caption --output_format webdataset --output_folder data/cc3m "
                "--image_size 256 --processes_count 16")
MAX_SUBSTITUTES = 100  # unusable samples in a row before ImageText gives up


# ----------------------------------------------------------------------------- files

class CsvDataset(FileDataset):
    """Rows of (image path, caption); relative paths are resolved against the file's folder.

    sep: None picks a tab for .tsv and a comma otherwise (OpenCLIP's column names are the defaults).
    """

    def __init__(self, path, img_key="filepath", caption_key="title", sep=None):
        sep = sep or ("\t" if path.lower().endswith(".tsv") else ",")
        root = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            for key, flag in ((img_key, "img_key"), (caption_key, "caption_key")):
                if key not in (reader.fieldnames or []):
                    raise ValueError(f"{path}: no column {key!r} (columns: {reader.fieldnames}); "
                                     f"pass {flag}= (--csv-{flag.replace('_', '-')}) or sep=")
            rows = [(row[img_key], row[caption_key]) for row in reader]
        self.paths = [os.path.join(root, p) for p, _ in rows]
        self.captions = [(c or "").strip() for _, c in rows]

    def __len__(self):
        return len(self.paths)

    def caption(self, i):
        return self.captions[i]

    def __getitem__(self, i):
        return self._decode(self.paths[i], self.captions[i], self.paths[i])


def build_dataset(name, data_root="./data", split="train", image_size=64, seed=0, size=None,
                  img_key="filepath", caption_key="title", sep=None):
    """"builtin", a .csv/.tsv file, a folder, or `<data_root>/<name>` holding shards or a csv/tsv.

    image_size, seed and size apply to the built-in data; img_key, caption_key and sep to CSV/TSV.
    File datasets are used as given (`split` only picks among several csv/tsv files in a folder).
    """
    if name == "builtin":
        return SyntheticCaptions(split, size=size, image_size=image_size, seed=seed)
    csv_kw = dict(img_key=img_key, caption_key=caption_key, sep=sep)
    if os.path.isfile(name) and name.lower().endswith((".csv", ".tsv")):
        return CsvDataset(name, **csv_kw)
    folder = name if os.path.isdir(name) else os.path.join(data_root, name)
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if any(f.endswith(".tar") for f in files):
        return ShardDataset(folder)
    tables = [f for f in files if f.lower().endswith((".csv", ".tsv"))]
    if len(tables) > 1:
        tables = [f for f in tables if split in f] or tables
    if len(tables) == 1:
        return CsvDataset(os.path.join(folder, tables[0]), **csv_kw)
    if tables:
        raise ValueError(f"{folder}: several csv/tsv files {tables}; pass the file's path instead")
    raise FileNotFoundError(f"--data {name}: {folder} has no *.tar shards or .csv/.tsv file; "
                            f"prepare CC3M with: {PREPARE_CC3M}")


# ----------------------------------------------------------------------------- samples, batches

def _sample_seed(*parts):
    """A 63-bit seed that is a pure function of parts (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ImageText(torch.utils.data.Dataset):
    """Wraps a base (image, caption) dataset and applies the views.

    Every sample's randomness comes from (seed, epoch, index) alone: the torchvision transforms run
    on the CPU generator reseeded per sample inside `fork_rng` (so the caller's RNG is untouched),
    and the text augmenter gets its own `random.Random`. Hence batches do not depend on the number
    of workers or ranks, and a resumed run sees exactly the views it would have seen.
    """

    def __init__(self, base, image_transform, views=1, text_aug=None, seed=0):
        if views not in (1, 2):
            raise ValueError(f"ImageText: views must be 1 or 2, not {views}")
        self.base, self.transform, self.views = base, image_transform, views
        self.text_aug, self.seed, self.epoch = text_aug, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        """key: an index i, or (epoch, i) (StepSampler) -> {"image": (3, H, W),
        ["image_aug": (3, H, W)], "text": str, ["text_aug": str], "n_skipped": int}.

        An unusable base sample (corrupt image, empty caption) is replaced by another one chosen
        from (seed, epoch, index), and counted in n_skipped: every batch keeps its size, which
        the all-gather of the global batch under DDP needs, and the step -> batch mapping that
        exact resume relies on stays fixed.
        """
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        n_skipped, j = 0, int(i)
        item = self.base[j]
        while item is None:
            n_skipped += 1
            if n_skipped > MAX_SUBSTITUTES:
                raise RuntimeError(f"{MAX_SUBSTITUTES} unusable samples in a row near index {i}: "
                                   f"check the data (see the warnings above)")
            j = _sample_seed(self.seed, epoch, int(i), n_skipped) % len(self.base)
            item = self.base[j]
        image, text = item
        seed = _sample_seed(self.seed, epoch, j)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators stay as they are
            out = {"image": self.transform(image)}
            if self.views == 2:
                out["image_aug"] = self.transform(image)
        out["text"] = text
        if self.text_aug is not None:
            out["text_aug"] = self.text_aug(text, random.Random(seed))
        out["n_skipped"] = n_skipped
        return out


def collate(batch, tokenizer, context_length=77):
    """Stack the images and tokenise the texts (runs in the DataLoader worker).
    -> {"image": (B, 3, H, W), ["image_aug"], "ids": (B, L), ["ids_aug"], "n_skipped": int}"""
    out = {"n_skipped": sum(b["n_skipped"] for b in batch)}
    out["image"] = torch.stack([b["image"] for b in batch])  # (B, 3, H, W)
    if "image_aug" in batch[0]:
        out["image_aug"] = torch.stack([b["image_aug"] for b in batch])
    out["ids"] = tokenizer([b["text"] for b in batch], context_length=context_length)  # (B, L)
    if "text_aug" in batch[0]:
        out["ids_aug"] = tokenizer([b["text_aug"] for b in batch], context_length=context_length)
    return out


class StepSampler(torch.utils.data.Sampler):
    """This rank's samples for steps [start_step, total_steps): (epoch, index) pairs, epoch after
    epoch of a seeded permutation of the n samples.

    Like DistributedSampler with drop_last, but one iterator spans the whole run: the DataLoader's
    workers live for the run and keep loading across epoch boundaries (a new iterator each epoch
    would restart them and drain the prefetch, every 7 steps at 2,000 pairs and batch 256), and
    it can start at any step, which makes resume exact without replaying the data loader. The
    epoch travels with the index because workers hold their own copy of the dataset.
    """

    def __init__(self, n, batch_size, rank, world, seed, total_steps, start_step=0):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"dataset has {n} samples, fewer than one global batch "
                             f"({batch_size} x {world}): lower --batch-size")

    def __iter__(self):
        step = self.start_step
        while step < self.total_steps:
            epoch, batch = divmod(step, self.steps_per_epoch)
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g)[self.rank::self.world]
            end = min(self.steps_per_epoch, batch + self.total_steps - step)
            for i in order[batch * self.batch_size: end * self.batch_size].tolist():
                yield epoch, i
            step += end - batch

    def __len__(self):
        return (self.total_steps - self.start_step) * self.batch_size
