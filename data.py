"""Image-caption data for CLIP/DeCLIP: the built-in set, CSV/TSV, img2dataset shards.

What is here:
- `SyntheticCaptions` (from builtin_data.py): the built-in image-caption set generated from the
  index alone (no files, no download), with `classnames` and `templates` for zero-shot evaluation.
- `CsvDataset` (OpenCLIP's `filepath` / `title` layout) and `ShardDataset` (img2dataset's webdataset
  tar shards, `KEY.jpg` + `KEY.txt`), both map-style so `DistributedSampler`-like samplers split
  them across ranks and resume is exact. Corrupt, truncated or missing images and empty captions
  come back as None; `collate` drops them and reports how many in `n_skipped`. A shard's index
  is a memory-mapped `<shard>.idx.npy` (32 bytes a sample of page cache, shared by every rank and
  worker; no private memory per sample), built by one pass over the tar's headers.
- `label_visible`: how often one of views.py's image views keeps a built-in image's label.
- `ImageText` applies the views so that every sample's augmentation is a pure function of
  (seed, epoch, index): results do not depend on the number of workers or ranks, or on resuming.

Shapes: B batch, L context length, H = W image size.
    image, image_aug (B, 3, H, W) float;  ids, ids_aug (B, L) long;  n_skipped () long

Usage:
    base = build_dataset("builtin", split="train")            # or "cc3m", "my.csv"
    ds = ImageText(base, views.DeclipView(64), views=2, text_aug=eda.augment, seed=0)
    loader = DataLoader(ds, batch_size=128, num_workers=2,
                        collate_fn=functools.partial(collate, tokenizer=tok, context_length=32))
    for epoch in ...: ds.set_epoch(epoch); ...   # batch: image, image_aug, ids, ids_aug, n_skipped
    ds[(epoch, i)]   # or the epoch with the index (train.StepSampler): one loader for a whole run

Left out: streaming (IterableDataset) webdataset pipelines, remote (s3/http) shards, compressed
tars, and DataLoader's persistent_workers (a persistent worker keeps the epoch it started with;
train.py instead hands the epoch to the workers with each index).
"""
import csv
import hashlib
import io
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
from views import OPENAI_MEAN, OPENAI_STD

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- labels

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
        """key: an index i, or (epoch, i) (train.StepSampler) -> {"image": (3, H, W),
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
