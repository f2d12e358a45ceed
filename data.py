"""Image-caption data for CLIP/DeCLIP: the built-in set, CSV/TSV, img2dataset shards, the views.

What is here:
- `SyntheticCaptions` (from builtin_data.py): the built-in image-caption set generated from the
  index alone (no files, no download), with `classnames` and `templates` for zero-shot evaluation.
- `CsvDataset` (OpenCLIP's `filepath` / `title` layout) and `ShardDataset` (img2dataset's webdataset
  tar shards, `KEY.jpg` + `KEY.txt`), both map-style so `DistributedSampler`-like samplers split
  them across ranks and resume is exact. Corrupt, truncated or missing images and empty captions
  come back as None; `collate` drops them and reports how many in `n_skipped`.
- The image views: DeCLIP's (Appendix B, `DeclipView`), CLIP's single view, the eval transform,
  and `label_visible`, which measures how often a view keeps a built-in image's label.
- `ImageText` applies the views so that every sample's augmentation is a pure function of
  (seed, epoch, index): results do not depend on the number of workers or ranks, or on resuming.

Shapes: B batch, L context length, H = W image size.
    image, image_aug (B, 3, H, W) float;  ids, ids_aug (B, L) long;  n_skipped () long

Usage:
    base = build_dataset("builtin", split="train")            # or "cc3m", "my.csv"
    ds = ImageText(base, declip_image_transform(64), views=2, text_aug=eda.augment, seed=0)
    loader = DataLoader(ds, batch_size=128, num_workers=2,
                        collate_fn=functools.partial(collate, tokenizer=tok, context_length=32))
    for epoch in ...: ds.set_epoch(epoch); ...   # batch: image, image_aug, ids, ids_aug, n_skipped

Left out: streaming (IterableDataset) webdataset pipelines, remote (s3/http) shards, compressed
tars, and DataLoader's persistent_workers (a persistent worker keeps the epoch it started with).
"""
import csv
import hashlib
import io
import json
import logging
import os
import random
import tarfile

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from builtin_data import SyntheticCaptions, nearest_colour

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PREPARE_CC3M = ("img2dataset --url_list cc3m.tsv --input_format tsv --url_col url "
                "--caption_col caption --output_format webdataset --output_folder data/cc3m "
                "--image_size 256 --processes_count 16")
MAX_SUBSTITUTES = 100  # unusable samples in a row before ImageText gives up
MAX_WARNINGS = 5  # per dataset copy (i.e. per worker): name the first few bad files, count the rest


# ----------------------------------------------------------------------------- files

class _Skipping(torch.utils.data.Dataset):
    """Shared by the file datasets: decode an image, or warn about the first few bad samples."""
    _n_warned = 0

    def _skip(self, where, why):
        if self._n_warned < MAX_WARNINGS:
            self._n_warned += 1
            log.warning("skipping %s: %s%s", where, why,
                        " (further skips are only counted)" if self._n_warned == MAX_WARNINGS
                        else "")
        return None

    def _decode(self, source, caption, where):
        """source: a path or a file object. Returns (RGB image, caption) or None."""
        if not caption:
            return self._skip(where, "empty caption")
        try:
            with Image.open(source) as im:
                return im.convert("RGB"), caption  # convert() decodes: truncation raises here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return self._skip(where, f"{type(e).__name__}: {e}")


class CsvDataset(_Skipping):
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


def _scan_shard(path):
    """One pass over a tar's headers -> rows [img_offset, img_len, txt_offset, txt_len], -1: absent.

    A sample is every member sharing a key (webdataset: the name up to the basename's first dot).
    """
    samples = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:  # reads headers and seeks past the data
                if not m.isfile():
                    continue
                folder, base = os.path.split(m.name)
                key, _, ext = base.partition(".")
                row = samples.setdefault(os.path.join(folder, key), [-1, -1, -1, -1])
                if ext.lower() in IMAGE_EXTS:
                    row[0:2] = m.offset_data, m.size
                elif ext.lower() == "txt":
                    row[2:4] = m.offset_data, m.size
    except (tarfile.TarError, OSError) as e:  # a cut download: keep the members read so far
        log.warning("%s: %s; using the %d samples before the damage", path, e, len(samples))
    return list(samples.values())


class ShardDataset(_Skipping):
    """img2dataset webdataset shards (`*.tar` with KEY.jpg + KEY.txt), read map-style.

    Each shard is indexed once (member offsets, cached in `<shard>.idx.json` and rebuilt when the
    shard's size or mtime changes; kept in memory if the folder is read-only); a sample is then
    one seek + read. Files are opened lazily in each process, never shared across fork.
    """

    def __init__(self, folder):
        self.shards = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                             if f.endswith(".tar"))
        rows = []
        for k, shard in enumerate(self.shards):
            index = np.array(self._index(shard), np.int64).reshape(-1, 4)
            rows.append(np.concatenate([np.full((len(index), 1), k), index], 1))
        self.rows = np.concatenate(rows) if rows else np.zeros((0, 5), np.int64)  # (N, 5)
        self._files, self._pid = {}, None

    @staticmethod
    def _index(shard):
        st, cache = os.stat(shard), shard + ".idx.json"
        try:
            with open(cache) as f:
                index = json.load(f)
            if index["size"] == st.st_size and index["mtime_ns"] == st.st_mtime_ns:
                return index["rows"]
        except (OSError, ValueError, KeyError):
            pass
        index = dict(size=st.st_size, mtime_ns=st.st_mtime_ns, rows=_scan_shard(shard))
        tmp = f"{cache}.{os.getpid()}.tmp"
        try:  # write-then-rename so concurrent ranks never read half a file
            with open(tmp, "w") as f:
                json.dump(index, f, separators=(",", ":"))
            os.replace(tmp, cache)
        except OSError:  # read-only folder: the index lives in memory only
            if os.path.exists(tmp):
                os.remove(tmp)
        return index["rows"]

    def __len__(self):
        return len(self.rows)

    def __getstate__(self):  # open files do not travel to spawned workers
        return {**self.__dict__, "_files": {}, "_pid": None}

    def _read(self, shard, offset, length):
        if self._pid != os.getpid():  # first use in this process (e.g. a forked worker)
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")
        f = self._files[shard]
        f.seek(offset)
        return f.read(length)

    def _where(self, shard, offset):
        """The member's name, read from its tar header (the 512 bytes before its data)."""
        header = self._read(shard, offset - 512, 512)
        try:
            name = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name
        except tarfile.TarError:
            name = f"member at byte {offset}"
        return f"{self.shards[shard]}:{name}"

    def caption(self, i):
        shard, _, _, txt_offset, txt_len = self.rows[i].tolist()
        if txt_offset < 0:
            return ""
        return self._read(shard, txt_offset, txt_len).decode("utf-8", "replace").strip()

    def __getitem__(self, i):
        shard, img_offset, img_len, txt_offset, _ = self.rows[i].tolist()
        where = self._where(shard, img_offset if img_offset >= 0 else txt_offset)
        if img_offset < 0:
            return self._skip(where, "no image in this sample")
        data = self._read(shard, img_offset, img_len)
        if len(data) < img_len:
            return self._skip(where, "truncated shard")
        return self._decode(io.BytesIO(data), self.caption(i), where)


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


# ----------------------------------------------------------------------------- views

class DeclipView:
    """DeCLIP's image view (Appendix B; SimCLR/SimSiam's recipe with crop scale 0.2-1).

    RandomResizedCrop(scale 0.2-1, bicubic) -> ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 ->
    grayscale with p 0.2 -> Gaussian blur with p 0.5 -> horizontal flip with p 0.5.
    The paper gives blur's sigma range (0.1-2 px at 224 px) but not its probability: we take
    SimCLR's p = 0.5, and scale sigma and the kernel (23 px at 224, ~10% of the side) with the
    image side, so a 64 px image is blurred as much, relative to its content, as a 224 px photo.
    The random draws (`sample`) are kept apart from their application (`apply`) so that a test
    can ask what a view did to the label (builtin_data.label_visible). Draws use torch's global
    RNG, which ImageText reseeds per sample.
    """

    def __init__(self, size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8,
                 p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0), flip=True):
        self.size, self.scale, self.jitter, self.flip = size, scale, jitter, flip
        self.p_jitter, self.p_gray, self.p_blur = p_jitter, p_gray, p_blur
        self.sigma = (sigma[0] * size / 224, sigma[1] * size / 224)
        self.kernel = int(0.1 * size) // 2 * 2 + 1

    def sample(self, image):
        """The random choices of one view of `image` (PIL), as a dict."""
        crop = T.RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))  # i, j, h, w
        b, c, s, h = self.jitter
        jitter = (T.ColorJitter.get_params([1 - b, 1 + b], [1 - c, 1 + c], [1 - s, 1 + s],
                                           [-h, h]) if torch.rand(()) < self.p_jitter else None)
        gray = bool(torch.rand(()) < self.p_gray)
        sigma = (T.GaussianBlur.get_params(*self.sigma) if torch.rand(()) < self.p_blur
                 else None)
        flip = self.flip and bool(torch.rand(()) < 0.5)
        return dict(crop=crop, jitter=jitter, gray=gray, sigma=sigma, flip=flip)

    def apply(self, image, params):
        """PIL image -> normalised (3, size, size) tensor, as `params` say."""
        image = TF.resized_crop(image, *params["crop"], [self.size, self.size],
                                T.InterpolationMode.BICUBIC)
        if params["jitter"] is not None:
            order, brightness, contrast, saturation, hue = params["jitter"]
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                      TF.adjust_hue)
            factors = (brightness, contrast, saturation, hue)
            for k in order.tolist():
                image = adjust[k](image, factors[k])
        if params["gray"]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if params["sigma"] is not None:
            image = TF.gaussian_blur(image, [self.kernel] * 2, [params["sigma"]] * 2)
        if params["flip"]:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), OPENAI_MEAN, OPENAI_STD)

    def __call__(self, image):
        return self.apply(image, self.sample(image))


def label_visible(ds, i, view, params=None):
    """Does a view of built-in item i still show its label? -> (colour shown, shape shown).

    Shape: at least half of one copy of the main object lies inside the crop. Colour: the median
    pixel of the main object in the view is named its colour (builtin_data.nearest_colour: the
    nearest of the 5 hues, or white/black if unsaturated); a grayscale view keeps only white and
    black. `params` (from view.sample) default to a fresh draw from torch's RNG.
    """
    image = ds[i][0]
    params = view.sample(image) if params is None else params
    mask = ds.mask(i)                                                      # (S, S) copy ids
    top, left, h, w = params["crop"]
    inside = np.bincount(mask[top:top + h, left:left + w].ravel(), minlength=mask.max() + 1)
    shape_shown = bool((inside[1:] >= 0.5 * np.bincount(mask.ravel())[1:]).any())
    pixels = view.apply(image, params)                                     # (3, S', S')
    std, mean = torch.tensor(OPENAI_STD)[:, None, None], torch.tensor(OPENAI_MEAN)[:, None, None]
    pixels = pixels * std + mean
    where = TF.resized_crop(Image.fromarray(mask.astype(np.uint8)), top, left, h, w,
                            [view.size, view.size], T.InterpolationMode.NEAREST)
    where = torch.from_numpy(np.asarray(where) > 0)
    where = where.flip(-1) if params["flip"] else where
    if not where.any():
        return False, shape_shown
    rgb = (255 * pixels[:, where].clamp(0, 1)).median(dim=1).values.tolist()  # (3,)
    return nearest_colour(rgb) == ds.scene(i)["colour"], shape_shown


def declip_image_transform(size, flip=True):
    """DeCLIP's image view at `size` px (see DeclipView)."""
    return DeclipView(size, flip=flip)


def clip_image_transform(size):
    """CLIP's single training view as in OpenCLIP: a mild random resized crop."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


def eval_transform(size):
    """OpenAI's preprocessing: shorter side to `size` (bicubic), centre crop."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


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

    def __getitem__(self, i):
        """-> {"image": (3, H, W), ["image_aug": (3, H, W)], "text": str, ["text_aug": str],
        "n_skipped": int}.

        An unusable base sample (corrupt image, empty caption) is replaced by another one chosen
        from (seed, epoch, index), and counted in n_skipped: every batch keeps its size, which
        the all-gather of the global batch under DDP needs, and the step -> batch mapping that
        exact resume relies on stays fixed.
        """
        n_skipped, j = 0, int(i)
        item = self.base[j]
        while item is None:
            n_skipped += 1
            if n_skipped > MAX_SUBSTITUTES:
                raise RuntimeError(f"{MAX_SUBSTITUTES} unusable samples in a row near index {i}: "
                                   f"check the data (see the warnings above)")
            j = _sample_seed(self.seed, self.epoch, int(i), n_skipped) % len(self.base)
            item = self.base[j]
        image, text = item
        seed = _sample_seed(self.seed, self.epoch, j)
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
