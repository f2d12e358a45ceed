"""Image-caption data for CLIP/DeCLIP: the built-in set, CSV/TSV, img2dataset shards, the views.

What is here:
- `SyntheticCaptions` (from builtin_data.py): the built-in image-caption set generated from the
  index alone (no files, no download), with `classnames` and `templates` for zero-shot evaluation.
- `CsvDataset` (OpenCLIP's `filepath` / `title` layout) and `ShardDataset` (img2dataset's webdataset
  tar shards, `KEY.jpg` + `KEY.txt`), both map-style so `DistributedSampler`-like samplers split
  them across ranks and resume is exact. Corrupt, truncated or missing images and empty captions
  come back as None; `collate` drops them and reports how many in `n_skipped`. A shard's index
  is a memory-mapped `<shard>.idx.npy` (32 bytes a sample of page cache, shared by every rank and
  worker; no private memory per sample), built by one pass over the tar's headers.
- The image views: DeCLIP's (Appendix B, `DeclipView`), CLIP's single view, the eval transform,
  and `label_visible`, which measures how often a view keeps a built-in image's label.
  DeclipView draws what torchvision's transforms draw, and applies it 4x cheaper than
  torchvision on PIL images (`apply_torchvision`, kept as the reference): the crop is resized by
  torch's uint8 bicubic (PIL's filter; 1-2 levels of 255 apart in ~1% of the pixels, rounding),
  the colour jitter runs in float on a tensor with the formulas of torchvision's tensor backend,
  and the blur is a separable Gaussian (torchvision's kernel less the taps beyond 4 sigma:
  < 0.07 levels). The views are thus 1.0-1.3 levels a pixel away from torchvision's PIL path on
  average, which is how far torchvision's own PIL and tensor backends are from each other (its
  PIL path rounds to 8 bits after every op and shifts hue in 8-bit HSV); tests/test_data.py
  measures all three gaps.
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
import logging
import math
import os
import random
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from builtin_data import SyntheticCaptions, nearest_colour

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = (b"jpg", b"jpeg", b"png", b"webp")  # as tar member names hold them
PREPARE_CC3M = ("img2dataset --url_list cc3m.tsv --input_format tsv --url_col url "
                "--caption_col caption --output_format webdataset --output_folder data/cc3m "
                "--image_size 256 --processes_count 16")
MAX_SUBSTITUTES = 100  # unusable samples in a row before ImageText gives up
MAX_WARNINGS = 5  # per dataset copy (i.e. per worker): name the first few bad files, count the rest
TAR_BLOCK, EMPTY_BLOCK = 512, bytes(512)
INDEX_FORMAT = 1  # the first number of a shard index (.idx.npy); bump it when the layout changes
MAX_OPEN_SHARDS = 64  # files a process keeps open: an epoch's random order visits every shard


# ----------------------------------------------------------------------------- files

class _Skipping(torch.utils.data.Dataset):
    """Shared by the file datasets: decode an image, or warn about the first few bad samples."""
    _n_warned = 0

    def _skip(self, where, why):
        """where: a name, or a function that finds it (only called for the warned few)."""
        if self._n_warned < MAX_WARNINGS:
            self._n_warned += 1
            log.warning("skipping %s: %s%s", where() if callable(where) else where, why,
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


def _number(field):
    """A tar header's numeric field: octal text, or GNU's base-256 for large values."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def _checksum_ok(header):
    """The header's checksum: the sum of its bytes, its own 8 counted as spaces (some old
    writers summed signed bytes). Costs as much as the rest of the parsing: headers with the
    ustar magic (ustar, GNU, pax) are trusted without it."""
    stored, unsigned = _number(header[148:156]), sum(header) - sum(header[148:156]) + 8 * 32
    return stored == unsigned or stored == unsigned - 256 * sum(b > 127 for b in header)


def _pax_records(meta):
    """A pax extended header's `LEN key=value\\n` records -> {key: value} (bytes)."""
    fields, i = {}, 0
    while i < len(meta) and meta[i] != 0:
        space = meta.index(b" ", i)
        length = int(meta[i:space])
        key, _, value = meta[space + 1:i + length - 1].partition(b"=")
        fields[key] = value
        i += length
    return fields


def _scan_shard(path):
    """One streaming pass over a tar's 512-byte headers -> (N, 4) int64 rows [img_offset,
    img_len, txt_offset, txt_len], -1 where absent; a cut or damaged tar keeps what came before.

    A sample is every member sharing a key (webdataset: the name up to the basename's first dot).
    Reads ustar names with their prefix, GNU long names (L) and pax headers (x: path, size), as
    img2dataset's writer (webdataset's TarWriter, pax with a float mtime) produces them.
    """
    samples, name, size_override, damage = {}, None, None, None
    with open(path, "rb") as f:
        end, pos = os.fstat(f.fileno()).st_size, 0
        while pos + TAR_BLOCK <= end:
            f.seek(pos)
            header = f.read(TAR_BLOCK)
            if header == EMPTY_BLOCK:  # the end-of-archive marker
                break
            try:
                if header[257:262] != b"ustar" and not _checksum_ok(header):  # v7: no magic
                    raise ValueError("checksum")
                size, kind, data = _number(header[124:136]), header[156:157], pos + TAR_BLOCK
                if kind in (b"L", b"K", b"x", b"g"):  # meta-data (of the next member)
                    meta = f.read(size)
                    if kind == b"L":
                        name = meta.split(b"\0", 1)[0]
                    elif kind == b"x":
                        fields = _pax_records(meta)
                        name = fields.get(b"path", name)
                        size_override = int(fields[b"size"]) if b"size" in fields else None
                    pos = data + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
                    continue
            except ValueError:
                damage = f"bad tar header at byte {pos}"
                break
            if size_override is not None:  # pax: the real size of a member over 8 GiB
                size, size_override = size_override, None
            pos = data + (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
            if name is None:
                name = header[:100].split(b"\0", 1)[0]
                if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX: prefix/name
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            if kind in (b"0", b"\0", b"7"):  # a regular file (directories, links: skipped)
                stem, _, base = name.rpartition(b"/")
                key, _, ext = base.partition(b".")
                ext = ext.lower()
                column = 0 if ext in IMAGE_EXTS else 2 if ext == b"txt" else None
                if column is not None:
                    row = samples.setdefault((stem, key), [-1, -1, -1, -1])
                    row[column:column + 2] = data, size
                if data + size > end:
                    damage = f"cut at byte {end}"
                    break
            name = None
        else:
            if pos < end:
                damage = f"cut at byte {end}"
    if damage:
        log.warning("%s: %s; using the %d samples before it", path, damage, len(samples))
    return np.array(list(samples.values()), np.int64).reshape(-1, 4)


def default_index_dir():
    """Where shard indexes go when the shards' folder is read-only."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "declip-mini", "shard-index")


def _load_index(path, st):
    """A memory-mapped index, or None if absent, unreadable or built for another shard state."""
    try:
        index = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    header = [INDEX_FORMAT, st.st_size, st.st_mtime_ns, len(index) - 1]
    if index.ndim != 2 or index.shape[1] != 4 or index[0].tolist() != header:
        return None
    return index


def _save_index(path, index):
    """Write-then-rename, so concurrent ranks never read half a file. -> False if not writable."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, index)
        os.replace(tmp, path)
        return True
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        return False


class ShardDataset(_Skipping):
    """img2dataset webdataset shards (`*.tar` with KEY.jpg + KEY.txt), read map-style.

    Each shard has a binary index, `<shard>.idx.npy`: an int64 (1 + N, 4) array whose first row
    is [format, shard size, shard mtime_ns, N] and whose rows are [img_offset, img_len,
    txt_offset, txt_len] of each sample. It is built by one pass over the tar's headers, rebuilt
    when the shard's size or mtime changes, and memory-mapped: opening 88M pairs costs no private
    memory per sample (the 32 bytes a sample are page cache, shared by every rank and worker).
    A read-only shard folder puts the indexes in `index_dir` (default: default_index_dir()).
    Under torchrun each rank starts indexing at its own share of the shards. A sample is then one
    seek + read; at most MAX_OPEN_SHARDS files are open per process, none shared across fork.
    """

    def __init__(self, folder, index_dir=None):
        self.folder, self.index_dir = folder, index_dir or default_index_dir()
        self.shards = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                             if f.endswith(".tar"))
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        n, self._told = len(self.shards), set()
        first = rank * n // max(world, 1)
        self.indexes = [None] * n  # (1 + N_k, 4) each, memory-mapped
        for k in [*range(first, n), *range(first)]:
            self.indexes[k] = self._index(self.shards[k])
        self.starts = np.cumsum([0] + [len(index) - 1 for index in self.indexes])  # (K + 1,)
        self._files, self._pid = {}, None

    def _index(self, shard):
        st = os.stat(shard)
        name = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
        paths = (shard + ".idx.npy",
                 os.path.join(self.index_dir, f"{name}-{os.path.basename(shard)}.idx.npy"))
        for path in paths:
            index = _load_index(path, st)
            if index is not None:
                return index
        rows = np.asarray(_scan_shard(shard), np.int64).reshape(-1, 4)
        header = np.array([[INDEX_FORMAT, st.st_size, st.st_mtime_ns, len(rows)]], np.int64)
        index = np.concatenate([header, rows])                            # (1 + N, 4)
        for path in paths:
            if _save_index(path, index):
                if path == paths[1]:
                    self._tell(f"{self.folder} is not writable: shard indexes go to "
                               f"{self.index_dir} (ShardDataset's index_dir= chooses another)")
                return np.load(path, mmap_mode="r")
        self._tell(f"neither {self.folder} nor {self.index_dir} is writable: shard indexes are "
                   f"kept in private memory (32 bytes a sample, in every process)")
        return index

    def _tell(self, message):
        """Warn once per dataset, not once per shard."""
        if message not in self._told:
            self._told.add(message)
            log.warning(message)

    def __len__(self):
        return int(self.starts[-1])

    def __getstate__(self):  # to spawned workers: open files stay, memory maps go as paths
        indexes = [getattr(index, "filename", None) or index for index in self.indexes]
        return {**self.__dict__, "indexes": indexes, "_files": {}, "_pid": None}

    def __setstate__(self, state):
        state["indexes"] = [np.load(index, mmap_mode="r") if isinstance(index, str) else index
                            for index in state["indexes"]]
        self.__dict__.update(state)

    def row(self, i):
        """-> (shard, img_offset, img_len, txt_offset, txt_len) of sample i; offsets -1: absent."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return (k, *self.indexes[k][1 + i - int(self.starts[k])].tolist())

    def _read(self, shard, offset, length):
        if self._pid != os.getpid():  # first use in this process (e.g. a forked worker)
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(shard, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_SHARDS:  # close the least recently used
                self._files.pop(next(iter(self._files))).close()
            f = open(self.shards[shard], "rb")
        self._files[shard] = f  # dicts keep insertion order: the most recent is last
        f.seek(offset)
        return f.read(length)

    def _where(self, shard, offset):
        """The member's name, read from its tar header (the 512 bytes before its data)."""
        header = self._read(shard, offset - TAR_BLOCK, TAR_BLOCK)
        try:
            name = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name
        except tarfile.TarError:
            name = f"member at byte {offset}"
        return f"{self.shards[shard]}:{name}"

    def caption(self, i):
        shard, _, _, txt_offset, txt_len = self.row(i)
        if txt_offset < 0:
            return ""
        return self._read(shard, txt_offset, txt_len).decode("utf-8", "replace").strip()

    def __getitem__(self, i):
        shard, img_offset, img_len, txt_offset, _ = self.row(i)
        if img_offset < 0:
            return self._skip(self._where(shard, txt_offset), "no image in this sample")
        data = self._read(shard, img_offset, img_len)
        if len(data) < img_len:
            return self._skip(self._where(shard, img_offset), "truncated shard")
        return self._decode(io.BytesIO(data), self.caption(i),
                            lambda: self._where(shard, img_offset))  # named only if bad


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

# DeclipView's colour ops, on a (3, H, W) float tensor in [0, 255] that they change in place:
# the formulas of torchvision's tensor backend (its adjust_* functions), for one core.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601 luma)
HUE_CENTRES = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1)  # R, G, B on the hue circle of 6
MEAN_255 = torch.tensor(OPENAI_MEAN).view(3, 1, 1) * 255
STD_255 = torch.tensor(OPENAI_STD).view(3, 1, 1) * 255
BLUR_TAPS = 4.0  # the blur's taps reach 4 sigma: the rest of the kernel weighs < 7e-5


def resized_crop(image, crop, size):
    """PIL image -> its crop (top, left, height, width) resized to (3, size, size) uint8 with
    PIL's bicubic filter, as TF.resized_crop does, by torch's uint8 antialiased bicubic: 3x
    faster than PIL's, and the same pixels but for rounding (1-2 levels, in 1% of them)."""
    top, left, h, w = crop
    image = image if image.mode == "RGB" else image.convert("RGB")
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]     # (1, 3, H, W) HWC memory
    x = x[:, :, top:top + h, left:left + w]
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0]


def luma(x):
    """(3, H, W) -> (1, H, W)."""
    r, g, b = x.unbind(0)
    l = (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])
    return l[None]


def adjust_brightness(x, factor):
    return x.mul_(factor).clamp_(0, 255)


def adjust_contrast(x, factor):
    """Towards (factor < 1) or away from the image's mean luma."""
    mean = sum(w * m for w, m in zip(GRAY_WEIGHTS, x.mean((1, 2)).tolist()))
    return x.mul_(factor).add_((1 - factor) * mean).clamp_(0, 255)


def adjust_saturation(x, factor):
    """Towards (factor < 1) or away from each pixel's luma."""
    return torch.lerp(luma(x), x, factor, out=x).clamp_(0, 255)


def adjust_hue(x, shift):
    """Rotate each pixel's HSV hue by `shift` turns; its HSV saturation and value stay.

    With hues in sextants (red 0, green 2, blue 4), hsv -> rgb is, for each channel,
    min + (max - min) * clamp(2 - circular distance from the hue to the channel's hue, 0, 1).
    """
    r, g, b = x.unbind(0)
    high, low = x.amax(0), x.amin(0)                                     # (H, W)
    chroma = high - low
    hue = torch.where(high == r, g - b, torch.where(high == g, torch.add(b - r, chroma, alpha=2),
                                                    torch.add(r - g, chroma, alpha=4)))
    hue = hue.div_(chroma.clamp(min=1e-3))  # [-1, 5]; a grey pixel's hue does not matter
    d = (hue + (6 * shift) % 6 - HUE_CENTRES).abs_()                     # (3, H, W), [0, 12)
    # 2 - circular distance = 2 - (3 - ||d - 6| - 3|) on [0, 12], without a remainder
    weight = d.sub_(6).abs_().sub_(3).abs_().sub_(1).clamp_(0, 1)
    return torch.addcmul(low, chroma, weight, out=x)


def gaussian_blur(x, sigma, kernel):
    """Separable Gaussian blur of (C, H, W), reflect padding: torchvision's gaussian_blur with
    its `kernel`-tap kernel, less the taps beyond BLUR_TAPS sigma. Returns a new tensor."""
    half = min(kernel // 2, int(BLUR_TAPS * sigma))
    if half == 0:
        return x
    w = torch.exp(-0.5 * (torch.arange(half + 1.0) / sigma) ** 2)
    w = (w / (2 * w.sum() - w[0])).tolist()                              # w[0]: the centre
    for dim in (2, 1):  # rows, then columns
        n = x.shape[dim]
        pad = (half, half, 0, 0) if dim == 2 else (0, 0, half, half)
        xp = F.pad(x[None], pad, mode="reflect")[0]
        x = xp.narrow(dim, half, n) * w[0]
        for t in range(1, half + 1):
            x.add_(xp.narrow(dim, half - t, n), alpha=w[t]).add_(xp.narrow(dim, half + t, n),
                                                                  alpha=w[t])
    return x


def _resized_crop_params(size, scale, ratio, u):
    """torchvision's RandomResizedCrop.get_params, drawing from the uniforms `u`."""
    width, height = size
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area = width * height * (scale[0] + (scale[1] - scale[0]) * next(u))
        aspect = math.exp(log_lo + (log_hi - log_lo) * next(u))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(next(u) * (height - h + 1)), int(next(u) * (width - w + 1)), h, w
    w, h = width, height  # torchvision's fallback, the whole image clamped to the ratios
    if w / h < ratio[0]:
        h = round(w / ratio[0])
    elif w / h > ratio[1]:
        w = round(h * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


class DeclipView:
    """DeCLIP's image view (Appendix B; SimCLR/SimSiam's recipe with crop scale 0.2-1).

    RandomResizedCrop(scale 0.2-1, bicubic) -> ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 ->
    grayscale with p 0.2 -> Gaussian blur with p 0.5 -> horizontal flip with p 0.5.
    The paper gives blur's sigma range (0.1-2 px at 224 px) but not its probability: we take
    SimCLR's p = 0.5, and scale sigma and the kernel (23 px at 224, ~10% of the side) with the
    image side, so a 64 px image is blurred as much, relative to its content, as a 224 px photo.
    The random draws (`sample`) are kept apart from their application (`apply`) so that a test
    can ask what a view did to the label (builtin_data.label_visible). Draws use torch's global
    RNG, which ImageText reseeds per sample. `apply` is the fast path (see the module's
    docstring: 4x cheaper per core, within rounding of torchvision's float formulas);
    `apply_torchvision` applies the same draws with torchvision's ops on PIL images.
    """

    def __init__(self, size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8,
                 p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0), flip=True):
        self.size, self.scale, self.jitter, self.flip = size, scale, jitter, flip
        self.p_jitter, self.p_gray, self.p_blur = p_jitter, p_gray, p_blur
        self.sigma = (sigma[0] * size / 224, sigma[1] * size / 224)
        self.kernel = int(0.1 * size) // 2 * 2 + 1

    def sample(self, image):
        """The random choices of one view of `image` (PIL), as a dict: the distributions of
        torchvision's RandomResizedCrop, ColorJitter, RandomGrayscale, GaussianBlur and
        RandomHorizontalFlip, from one call to torch's RNG (their get_params make ~20 calls,
        0.35 ms a view)."""
        u = iter(torch.rand(36, dtype=torch.float64).tolist())  # enough for every draw
        crop = _resized_crop_params(image.size, self.scale, (3 / 4, 4 / 3), u)  # i, j, h, w
        jitter = None
        if next(u) < self.p_jitter:
            keys = [next(u) for _ in range(4)]
            order = sorted(range(4), key=keys.__getitem__)  # a uniform random permutation
            jitter = (order, *(1 - f + 2 * f * next(u) for f in self.jitter[:3]),
                      self.jitter[3] * (2 * next(u) - 1))  # order, brightness, ..., hue
        gray = next(u) < self.p_gray
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * next(u)
        sigma = sigma if next(u) < self.p_blur else None
        flip = self.flip and next(u) < 0.5
        return dict(crop=crop, jitter=jitter, gray=gray, sigma=sigma, flip=flip)

    def apply(self, image, params):
        """PIL image -> normalised (3, size, size) tensor, as `params` say."""
        x = resized_crop(image, params["crop"], self.size)               # (3, S, S) uint8
        if params["flip"]:  # here rather than last: the later ops commute with it (to rounding)
            x = x.flip(-1)
        x = torch.empty(x.shape).copy_(x)                                  # float, 0-255
        if params["jitter"] is not None:
            order, *factors = params["jitter"]
            adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
            for k in map(int, order):
                x = adjust[k](x, float(factors[k]))
        if params["gray"]:
            x = luma(x)                                                    # (1, S, S)
        if params["sigma"] is not None:
            x = gaussian_blur(x, params["sigma"], self.kernel)
        return (x - MEAN_255).div_(STD_255)                                # (3, S, S)

    def apply_torchvision(self, image, params):
        """The reference: torchvision's ops on PIL images (4x slower; tests and bench.py)."""
        image = TF.resized_crop(image, *params["crop"], [self.size, self.size],
                                T.InterpolationMode.BICUBIC)
        if params["jitter"] is not None:
            order, brightness, contrast, saturation, hue = params["jitter"]
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                      TF.adjust_hue)
            factors = (brightness, contrast, saturation, hue)
            for k in map(int, order):
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
