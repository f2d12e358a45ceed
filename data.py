"""Image-caption data for CLIP/DeCLIP: built-in synthetic captions, CSV/TSV, img2dataset shards.

What is here:
- `SyntheticCaptions`: a built-in image-caption set generated from the index alone (no files, no
  download) that a tiny CLIP learns in minutes on a CPU; it has `classnames` and `templates` for
  zero-shot evaluation.
- `CsvDataset` (OpenCLIP's `filepath` / `title` layout) and `ShardDataset` (img2dataset's webdataset
  tar shards, `KEY.jpg` + `KEY.txt`), both map-style so `DistributedSampler`-like samplers split
  them across ranks and resume is exact. Corrupt, truncated or missing images and empty captions
  come back as None; `collate` drops them and reports how many in `n_skipped`.
- The image views: DeCLIP's (Appendix B), CLIP's single view, and the eval transform.
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
import math
import os
import random
import tarfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PREPARE_CC3M = ("img2dataset --url_list cc3m.tsv --input_format tsv --url_col url "
                "--caption_col caption --output_format webdataset --output_folder data/cc3m "
                "--image_size 256 --processes_count 16")
MAX_SUBSTITUTES = 100  # unusable samples in a row before ImageText gives up
MAX_WARNINGS = 5  # per dataset copy (i.e. per worker): name the first few bad files, count the rest


# ----------------------------------------------------------------------------- built-in data

# Colour -> (RGB, words a caption may use). Saturated colours plus white/black on muted
# backgrounds keep the main object clearly separable from the background.
COLOURS = {
    "red": ((220, 30, 30), ("red", "crimson", "scarlet")),
    "orange": ((245, 130, 20), ("orange", "tangerine", "amber")),
    "yellow": ((240, 220, 30), ("yellow", "golden", "lemon")),
    "green": ((40, 170, 50), ("green", "emerald", "grass-green")),
    "blue": ((30, 70, 220), ("blue", "azure", "cobalt")),
    "purple": ((140, 40, 180), ("purple", "violet", "lilac")),
    "white": ((245, 245, 245), ("white", "snow-white", "ivory")),
    "black": ((15, 15, 15), ("black", "jet-black", "ebony")),
}
_STAR = [(0.45 ** (k % 2) * math.cos(math.pi * (k / 5 - 0.5)),
          0.45 ** (k % 2) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)]
# Shape -> (outline on the unit square around the centre, or None for a disc; caption words).
SHAPES = {
    "circle": (None, ("circle", "disc", "dot", "round shape")),
    "square": ([(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)], ("square", "box", "block", "tile")),
    "triangle": ([(0, -1), (.87, .5), (-.87, .5)], ("triangle", "wedge", "three-sided shape")),
    "star": (_STAR, ("star", "five-pointed star", "starburst")),
    "cross": ([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1),
               (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)], ("cross", "plus sign", "plus")),
    "diamond": ([(0, -1), (.7, 0), (0, 1), (-.7, 0)], ("diamond", "rhombus", "lozenge")),
}
PREFIXES = ("photo of", "stock image:", "illustration of", "close-up of", "an image of",
            "picture of", "clipart:", "icon of", "image may contain:")
SUFFIXES = ("free download", "vector illustration", "stock photo", "royalty free", "hd wallpaper",
            "- stock vector", "| clipart", "high resolution", "for sale", "on white paper")


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class SyntheticCaptions(torch.utils.data.Dataset):
    """Coloured shapes with web-alt-text-like captions, generated from (seed, split, index).

    Item i is rendered from `random.Random("declip-mini/{seed}/{split}/{i}")`, so the same index
    gives the same pair on every rank and every run, and train and eval never share an item.
    Scene: a muted background (plain, a linear gradient, or noisy; luminance chosen to contrast
    with the main object), the *main object* (one of 6 shapes x 8 colours, radius 20-30% of the
    image, slightly rotated, colour jittered by +-20 per channel, drawn first and never overlapped),
    0-2 small distractors (radius 7-12%, other colours), then uniform pixel noise (numpy).
    Caption: the main object's colour and shape with synonyms ("crimson disc", "star in
    azure"), naming both ~90% of the time (otherwise only one), sometimes with its size, its
    position ("at the top left", from its centre), the distractors, the background, a prefix
    ("stock image:") or an irrelevant suffix ("free download", "in 2014"), as in CC3M.
    Label = colour x 6 + shape of the main object (`classnames[label]` == "red circle"); the eval
    split cycles through the 48 classes so it is exactly balanced.
    Horizontal flips (DeCLIP's view) turn "left" into "right": we keep them and accept the noise,
    because position words are in ~30% of captions and colour/shape, the learnt classes, survive.
    """

    classnames = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    templates = ["a photo of a {c}.", "a {c}.", "an image of a {c}.", "a picture of a {c}.",
                 "a drawing of a {c}.", "a big {c}.", "a {c} on a plain background.",
                 "stock image of a {c}."]

    def __init__(self, split="train", size=None, image_size=64, seed=0):
        if split not in ("train", "eval"):
            raise ValueError(f"SyntheticCaptions: split must be 'train' or 'eval', not {split!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.size = size if size is not None else (1_000_000 if split == "train" else 2_000)

    def __len__(self):
        return self.size

    def scene(self, i):
        """The random choices behind item i (cheap: no pixels), as a dict."""
        if not 0 <= i < self.size:
            raise IndexError(f"SyntheticCaptions: index {i} out of range({self.size})")
        rng, S = random.Random(f"declip-mini/{self.seed}/{self.split}/{i}"), self.image_size
        names, n_classes = list(COLOURS), len(self.classnames)
        label = i % n_classes if self.split == "eval" else rng.randrange(n_classes)
        colour, shape = names[label // len(SHAPES)], list(SHAPES)[label % len(SHAPES)]
        r = rng.uniform(0.2, 0.3) * S
        main = dict(colour=colour, shape=shape, r=r, x=rng.uniform(r, S - r),
                    y=rng.uniform(r, S - r), angle=rng.uniform(-0.26, 0.26))
        lum = {"white": (40, 110), "black": (130, 215)}.get(colour, (50, 210))
        lum = rng.uniform(*lum)
        bg = [lum + rng.uniform(-12, 12) for _ in range(3)]
        # small distractors in other colours that stand out from the background, never touching
        # the main object so it stays clearly visible
        allowed = [c for c in names if c != colour and not (c == "white" and lum > 150)
                   and not (c == "black" and lum < 90)]
        others = []
        for _ in range(rng.choice((0, 1, 1, 2))):
            r2 = rng.uniform(0.07, 0.12) * S
            x, y = rng.uniform(r2, S - r2), rng.uniform(r2, S - r2)
            if math.hypot(x - main["x"], y - main["y"]) > r + r2 + 1 and all(
                    math.hypot(x - o["x"], y - o["y"]) > r2 + o["r"] for o in others):
                others.append(dict(colour=rng.choice(allowed), shape=rng.choice(list(SHAPES)),
                                   r=r2, x=x, y=y, angle=rng.uniform(-0.26, 0.26)))
        for o in [main] + others:
            base_rgb = COLOURS[o["colour"]][0]
            o["rgb"] = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in base_rgb)
        background = rng.choice(("plain", "gradient", "noisy"))
        return dict(label=label, main=main, others=others, bg=bg, background=background,
                    gradient=(rng.random() < 0.5, rng.uniform(-40, 40)),
                    noise=rng.uniform(4, 14) if background == "noisy" else rng.uniform(0, 4),
                    noise_seed=rng.getrandbits(63), caption_seed=rng.getrandbits(63))

    def label(self, i):
        return self.scene(i)["label"]

    def caption(self, i):
        return self._caption(self.scene(i))

    def __getitem__(self, i):
        sc = self.scene(i)
        return self._render(sc), self._caption(sc)

    def _render(self, sc):
        S = self.image_size
        pixels = np.empty((S, S, 3), np.float32)
        pixels[:] = sc["bg"]
        if sc["background"] == "gradient":
            vertical, amplitude = sc["gradient"]
            ramp = np.linspace(-amplitude, amplitude, S, dtype=np.float32)
            pixels += ramp[:, None, None] if vertical else ramp[None, :, None]
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for o in [sc["main"]] + sc["others"]:
            outline, x, y, r = SHAPES[o["shape"]][0], o["x"], o["y"], o["r"]
            if outline is None:
                draw.ellipse((x - r, y - r, x + r, y + r), fill=o["rgb"])
            else:
                cos, sin = math.cos(o["angle"]), math.sin(o["angle"])
                draw.polygon([(x + r * (u * cos - v * sin), y + r * (u * sin + v * cos))
                              for u, v in outline], fill=o["rgb"])
        # uniform noise with the wanted std: 3x cheaper to draw than Gaussian noise
        noise = np.random.default_rng(sc["noise_seed"]).random((S, S, 3), np.float32) - 0.5
        pixels = np.asarray(img, np.float32) + noise * (sc["noise"] * math.sqrt(12))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    def _caption(self, sc):
        rng, main, S = random.Random(sc["caption_seed"]), sc["main"], self.image_size
        colour, shape = rng.choice(COLOURS[main["colour"]][1]), rng.choice(SHAPES[main["shape"]][1])
        u = rng.random()
        if u < 0.06:
            desc = shape
        elif u < 0.10:
            desc = f"{colour} {rng.choice(('object', 'thing', 'icon', 'sign'))}"
        elif u < 0.25:
            desc = f"{shape} in {colour}"
        else:
            desc = f"{colour} {shape}"
        if rng.random() < 0.3:
            desc = f"{rng.choice(('big', 'large'))} {desc}"
        parts = [_a(desc) if rng.random() < 0.7 else desc]
        if rng.random() < 0.3:
            h = "left" if main["x"] < 0.4 * S else "right" if main["x"] > 0.6 * S else ""
            v = "top" if main["y"] < 0.4 * S else "bottom" if main["y"] > 0.6 * S else ""
            parts.append(f"at the {v} {h}" if v and h else f"on the {h}" if h else
                         f"near the {v}" if v else rng.choice(("in the centre", "in the middle")))
        if sc["others"] and rng.random() < 0.5:
            small = [f"{rng.choice(('a small', 'a little', 'a tiny'))} {o['colour']} "
                     f"{rng.choice(SHAPES[o['shape']][1])}" for o in sc["others"]]
            parts.append(f"{rng.choice(('and', 'with', 'next to'))} {' and '.join(small)}")
        if rng.random() < 0.25:
            tone = sc["bg"][0]
            tone = "dark" if tone < 100 else "light grey" if tone > 160 else "grey"
            parts.append(f"on a {rng.choice((tone, 'plain', sc['background']))} background")
        text = " ".join(parts)
        if rng.random() < 0.4:
            text = f"{rng.choice(PREFIXES)} {text}"
        if rng.random() < 0.3:
            text += " " + (f"in {rng.randint(2005, 2019)}" if rng.random() < 0.3
                           else rng.choice(SUFFIXES))
        return text[0].upper() + text[1:] if rng.random() < 0.3 else text


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

def declip_image_transform(size, flip=True):
    """DeCLIP's image view (Appendix B; SimCLR/SimSiam's recipe with crop scale 0.2-1).

    The paper gives blur's sigma range but not its probability: we take SimCLR's p = 0.5 and its
    kernel of ~10% of the image side (odd).
    """
    kernel = int(0.1 * size) // 2 * 2 + 1
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        *([T.RandomHorizontalFlip()] if flip else []),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


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
