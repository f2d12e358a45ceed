"""img2dataset's webdataset shards, read map-style: the tar parser and the per-shard index.

Format: a folder of uncompressed `*.tar` shards; a sample is every member sharing a key
(webdataset: the member name up to the basename's first dot), here `KEY.jpg` (or .jpeg, .png,
.webp) and `KEY.txt`, as img2dataset writes them (`--output_format webdataset`). Other members
(`KEY.json`, ...) are ignored.

Each shard gets a binary index, `<shard>.idx.npy`, built by one pass over the tar's 512-byte
headers (`_scan_shard`) and memory-mapped afterwards: 32 bytes a sample of page cache, shared by
every rank and worker, no private memory per sample. A sample is then one seek + read, so the
dataset is map-style: samplers split it across ranks and a resumed run is exact. Corrupt,
truncated or missing images and empty captions come back as None (data.ImageText replaces
them with other samples).

Usage:
    ds = ShardDataset("data/cc3m")         # or data.build_dataset("cc3m")
    image, caption = ds[0]                 # PIL RGB image, str; or None if unusable

Left out: streaming (IterableDataset) pipelines, remote (s3/http) shards, compressed tars.
"""
import hashlib
import io
import logging
import os
import tarfile

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = (b"jpg", b"jpeg", b"png", b"webp")  # as tar member names hold them
MAX_WARNINGS = 5  # per dataset copy (i.e. per worker): name the first few bad files, count the rest
TAR_BLOCK, EMPTY_BLOCK = 512, bytes(512)
INDEX_FORMAT = 1  # the first number of a shard index (.idx.npy); bump it when the layout changes
MAX_OPEN_SHARDS = 64  # files a process keeps open: an epoch's random order visits every shard


# ----------------------------------------------------------------------------- decoding

class FileDataset(torch.utils.data.Dataset):
    """Shared by the file datasets (ShardDataset, data.CsvDataset): decode an image, or warn
    about the first few bad samples."""
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


# ----------------------------------------------------------------------------- tar headers

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


# ----------------------------------------------------------------------------- the index

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


class ShardDataset(FileDataset):
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
