"""The built-in image-caption set: coloured shapes with web-alt-text-like captions, no files.

It stands in for CC3M's web photos, so that DeCLIP and the CLIP variants can be trained and
compared on a laptop CPU in minutes. It is built so that the paper's supervision has something
to exploit and the paper's augmentations (DeCLIP Appendix B) keep an image's meaning, as they
do for photos:

- The class is colour x shape of the *main object* (7 x 6 = 42 classes): 5 hues 72 degrees
  apart (red, yellow, green, blue, purple) plus white and black. A hue jitter of +-0.1 (+-36
  degrees) never carries a hue past the midpoint to its neighbour, and white/black have no hue.
  Eight colours cannot be 72 degrees apart, which is why there are 7 (the old set had 8, with
  orange/yellow and blue/purple 30-50 degrees apart, and a hue jitter swapped them).
- The main object is *repeated* (3-5 copies in a 3 x 3 grid of cells, like a photo of several
  apples): a 0.2-scale crop, 45% of the side, still holds most of one copy. Backgrounds contrast
  in luminance with the object, so its shape survives a grayscale view.
- Every shape has the same *area* (data v2): only its form tells it apart. In v1 every outline
  spanned the same radius, a circle covered 2.4x the pixels of a star, and "how much of the
  named colour" was a shortcut to shape that crops and colour jitter break (docs/findings.md).
- MVS: a caption describes only part of the image (the main object, sometimes its count, the
  small distractors of other colours, the background, an irrelevant prefix or suffix).
- NNS: captions are drawn from a small grammar ("five red circles", "circles in red on a dark
  background"); in 10% of them every word is drawn from its synonyms ("crimson discs", "tiles
  in azure"; the plain word is one of them, so ~7% name the shape otherwise), so many
  captions across the dataset are near-neighbours. (v1 drew every word from its synonyms; a
  tiny text tower then learns shape words too slowly for any method to learn shape:
  docs/findings.md.)
- SS: images share parts (shapes, colours) and captions share words, across classes.

`label_visible` measures how often the label survives an image view (tests/test_builtin_data.py
and docs/findings.md quote it). Everything is a pure function of (seed, split, index): the same
index gives the same pair on every rank and every run; train and eval never share an item.

    ds = SyntheticCaptions("train", size=2000, seed=0)     # size: unique pairs (data-limited runs)
    image, caption = ds[3]                               # PIL 64 x 64, str
    ds.label(3), ds.classnames[ds.label(3)]              # 17, "green triangles"
    label_visible(ds, 3, views.DeclipView(64))           # (colour shown, shape shown) in a view

Left out: photographs, text in images, more than one labelled object.
"""
import colorsys
import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

# Colour -> (hue in degrees, or None for achromatic; words a caption may use).
COLOURS = {
    "red": (354, ("red", "crimson", "scarlet")),
    "yellow": (66, ("yellow", "golden", "lemon")),
    "green": (138, ("green", "emerald", "grass-green")),
    "blue": (210, ("blue", "azure", "cobalt")),
    "purple": (282, ("purple", "violet", "lilac")),
    "white": (None, ("white", "snow-white", "ivory")),
    "black": (None, ("black", "jet-black", "ebony")),
}
HUE_JITTER = 4  # degrees: an object's own hue varies a little around its colour's
_STAR = [(0.45 ** (k % 2) * math.cos(math.pi * (k / 5 - 0.5)),
          0.45 ** (k % 2) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)]


def polygon_area(points):
    """Shoelace formula."""
    return 0.5 * abs(sum(x0 * y1 - x1 * y0
                         for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])))


def equal_area(outline):
    """The outline scaled to the unit disc's area, pi: at one radius every shape covers as many
    pixels, so the amount of an object's colour does not tell its shape (before, at one radius a
    circle covered 2.4x the pixels of a triangle or a star, and a model could tell shapes by
    area, a cue that crops and colour jitter break)."""
    k = math.sqrt(math.pi / polygon_area(outline))
    return [(k * u, k * v) for u, v in outline]


# Shape -> (outline of area pi around the centre, or None for the unit disc; caption words, the
# first one canonical: the class name's).
SHAPES = {
    "circle": (None, ("circle", "disc", "dot", "round shape")),
    "square": (equal_area([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
               ("square", "box", "block", "tile")),
    "triangle": (equal_area([(0, -1), (.87, .5), (-.87, .5)]),
                 ("triangle", "wedge", "three-sided shape")),
    "star": (equal_area(_STAR), ("star", "five-pointed star", "starburst")),
    "cross": (equal_area([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1),
                          (-.3, 1), (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)]),
              ("cross", "plus sign", "plus")),
    "diamond": (equal_area([(0, -1), (.7, 0), (0, 1), (-.7, 0)]),
                ("diamond", "rhombus", "lozenge")),
}
# How far each shape reaches from its centre, in units of its radius (disc 1, triangle 1.56)
EXTENT = {name: 1.0 if outline is None else max(math.hypot(u, v) for u, v in outline)
          for name, (outline, _) in SHAPES.items()}
GRID = 3  # the image is a GRID x GRID array of cells; every object is centred in its own cell
COPIES = (3, 5)  # how many copies of the main object
# The main object's radius (of the disc of its area), as a fraction of the side: a triangle or a
# star of equal area reaches 1.56x that far, so v1's (0.12, 0.15) made neighbours overlap in 45%
# of images; at (0.10, 0.12) 7% have two objects touching.
RADIUS = (0.10, 0.12)
PREFIXES = ("photo of", "stock image:", "illustration of", "close-up of", "an image of",
            "picture of", "clipart:", "icon of", "image may contain:")
SUFFIXES = ("free download", "vector illustration", "stock photo", "royalty free", "hd wallpaper",
            "- stock vector", "| clipart", "high resolution", "for sale", "on white paper")
COUNTS = ("three", "four", "five")
# a set whose pixels fit is rendered once per dataset copy, i.e. per loader worker (2,000 pairs
# at 64 px: 25 MB)
CACHE_BYTES = 64 * 2 ** 20
# How often a caption uses the class name's own words ("red", "circle") rather than a synonym
# drawn from all of them. Synonyms are what the text tower learns slowest: CLIP's shape accuracy
# after 300 steps is ~20% when every word is drawn from its synonyms, 29% with the class's own
# words half the time, 63% always (docs/findings.md, finding (3)).
CANONICAL = 0.9
# The probabilities of a caption's parts that do not name the class (MVS: partial descriptions).
MENTION_OTHERS, P_WHERE, P_BACKGROUND, P_PREFIX, P_SUFFIX = 0.5, 0.15, 0.25, 0.4, 0.3


def plural(phrase):
    """'red box' -> 'red boxes', 'plus sign' -> 'plus signs' (the last word only)."""
    return phrase + ("es" if phrase.endswith(("s", "x", "sh", "ch")) else "s")


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def colour_rgb(colour, rng):
    """An RGB triple of the named colour, with its own small variation."""
    hue = COLOURS[colour][0]
    if hue is None:
        v = rng.uniform(230, 255) if colour == "white" else rng.uniform(5, 30)
        return (round(v),) * 3
    h = ((hue + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360) / 360
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0))
    return round(255 * r), round(255 * g), round(255 * b)


def luma(rgb):
    """The brightness (ITU-R 601 luma) of one 0-255 RGB colour, as a viewer sees it."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def nearest_colour(rgb):
    """The colour class a viewer would name: white/black if unsaturated, else the nearest hue."""
    r, g, b = (c / 255 for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if s < 0.25 or v < 0.15:
        return "white" if luma(rgb) >= 100 else "black"
    hues = {c: hue for c, (hue, _) in COLOURS.items() if hue is not None}
    return min(hues, key=lambda c: min(abs(h * 360 - hues[c]), 360 - abs(h * 360 - hues[c])))


class SyntheticCaptions(torch.utils.data.Dataset):
    """Repeated coloured shapes with alt-text captions, generated from (seed, split, index).

    Scene: a muted background (plain, gradient or noisy; its luminance at least 70 away from the
    main object's), the main object as 3-5 identical copies (radius 10-12% of the side) in random
    cells of a 3 x 3 grid, 0-2 small distractors (radius 6-9%, other colours) in free cells, then
    uniform pixel noise. Label = colour x 6 + shape of the main object; the eval split cycles
    through the classes, so it is exactly balanced. Horizontal flips turn "left" into "right" in
    the ~15% of captions that say where the objects are; we accept that noise, as for photos.
    """

    classnames = [plural(f"{c} {s}") for c in COLOURS for s in SHAPES]
    templates = ["a photo of {c}.", "{c}.", "an image of {c}.", "a picture of {c}.",
                 "a drawing of {c}.", "a pattern of {c}.", "{c} on a plain background.",
                 "stock image of {c}."]
    n_colours, n_shapes = len(COLOURS), len(SHAPES)

    def __init__(self, split="train", size=None, image_size=64, seed=0):
        if split not in ("train", "eval"):
            raise ValueError(f"SyntheticCaptions: split must be 'train' or 'eval', not {split!r}")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.size = size if size is not None else (1_000_000 if split == "train" else 2_000)
        # A pair is a pure function of its index, so a small set (a data-limited run sees each
        # pair 150 times) is drawn once and kept: a quarter of the loader's work per sample.
        fits = self.size * image_size ** 2 * 3 <= CACHE_BYTES
        self._cache = {} if fits else None

    def __len__(self):
        return self.size

    def scene(self, i):
        """The random choices behind item i (cheap: no pixels), as a dict."""
        if not 0 <= i < self.size:
            raise IndexError(f"SyntheticCaptions: index {i} out of range({self.size})")
        rng, S = random.Random(f"declip-mini/{self.seed}/{self.split}/{i}"), self.image_size
        n_classes, names, shapes = len(self.classnames), list(COLOURS), list(SHAPES)
        label = i % n_classes if self.split == "eval" else rng.randrange(n_classes)
        colour, shape = names[label // len(SHAPES)], shapes[label % len(SHAPES)]
        cell = S / GRID
        cells = rng.sample(range(GRID * GRID), GRID * GRID)
        n_main = rng.randint(*COPIES)
        r = rng.uniform(*RADIUS) * S
        rgb = colour_rgb(colour, rng)
        main = [self._place(cells[k], r, EXTENT[shape] * r, cell, rng) for k in range(n_main)]
        others = []
        for k in range(n_main, n_main + rng.choice((0, 1, 1, 2))):
            other = rng.choice(shapes)
            r_other = rng.uniform(0.06, 0.09) * S
            o = self._place(cells[k], r_other, EXTENT[other] * r_other, cell, rng)
            o.update(colour=rng.choice([c for c in names if c != colour]), shape=other)
            o["rgb"] = colour_rgb(o["colour"], rng)
            others.append(o)
        # background luminance far from the object's, so the shape survives grayscale views
        lo, hi = (40, luma(rgb) - 70), (luma(rgb) + 70, 215)
        lum = rng.uniform(*lo) if hi[0] > hi[1] or (lo[1] > lo[0] and rng.random() < 0.5) \
            else rng.uniform(*hi)
        background = rng.choice(("plain", "gradient", "noisy"))
        return dict(label=label, colour=colour, shape=shape, rgb=rgb, r=r, main=main,
                    others=others, bg=[lum + rng.uniform(-12, 12) for _ in range(3)],
                    background=background, gradient=(rng.random() < 0.5, rng.uniform(-30, 30)),
                    noise=rng.uniform(4, 14) if background == "noisy" else rng.uniform(0, 4),
                    noise_seed=rng.getrandbits(63), caption_seed=rng.getrandbits(63))

    @staticmethod
    def _place(index, r, reach, cell, rng):
        """An object of radius r reaching `reach` from its centre, at a random point of grid cell
        `index`: wholly inside it when it fits, else centred in it (a large triangle or star
        pokes up to ~6% of a cell into the next one at the default sizes)."""
        row, col = divmod(index, GRID)
        slack = max(0.0, cell / 2 - reach)
        return dict(x=(col + 0.5) * cell + rng.uniform(-slack, slack),
                    y=(row + 0.5) * cell + rng.uniform(-slack, slack), r=r,
                    angle=rng.uniform(-0.26, 0.26))

    def label(self, i):
        return self.scene(i)["label"]

    def caption(self, i):
        return self._caption(self.scene(i))

    def __getitem__(self, i):
        item = None if self._cache is None else self._cache.get(i)
        if item is None:
            sc = self.scene(i)
            item = self._render(sc), self._caption(sc)
            if self._cache is not None:
                self._cache[i] = item
        image, caption = item
        return image.copy(), caption  # a copy: a caller may draw on it

    def objects(self, sc):
        """(shape, rgb, x, y, r, angle) of every object of a scene, main copies first."""
        main = [(sc["shape"], sc["rgb"], o["x"], o["y"], o["r"], o["angle"]) for o in sc["main"]]
        return main + [(o["shape"], o["rgb"], o["x"], o["y"], o["r"], o["angle"])
                       for o in sc["others"]]

    def mask(self, i):
        """(S, S) int array: k + 1 on the pixels of the main object's k-th copy, 0 elsewhere."""
        sc = self.scene(i)
        img = Image.new("L", (self.image_size,) * 2, 0)
        draw = ImageDraw.Draw(img)
        for k, obj in enumerate(self.objects(sc)[:len(sc["main"])]):
            _draw(draw, *obj[:1], k + 1, *obj[2:])
        return np.asarray(img, np.int64)

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
        for obj in self.objects(sc):
            _draw(draw, *obj)
        # uniform noise with the wanted std: 3x cheaper to draw than Gaussian noise
        noise = np.random.default_rng(sc["noise_seed"]).random((S, S, 3), np.float32) - 0.5
        pixels = np.asarray(img, np.float32) + noise * (sc["noise"] * math.sqrt(12))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    def _caption(self, sc):
        rng = random.Random(sc["caption_seed"])
        canonical = rng.random() < CANONICAL

        def word(name, vocabulary):
            return vocabulary[name][1][0] if canonical else rng.choice(vocabulary[name][1])
        colour, shape = word(sc["colour"], COLOURS), word(sc["shape"], SHAPES)
        u = rng.random()
        if u < 0.06:
            desc = plural(shape)
        elif u < 0.10:
            desc = f"{colour} {rng.choice(('objects', 'things', 'icons', 'signs'))}"
        elif u < 0.22:
            desc = f"{plural(shape)} in {colour}"
        elif u < 0.32:
            desc = _a(f"{colour} {shape}")  # alt text is often loose about number
        else:
            desc = plural(f"{colour} {shape}")
        v = 1.0 if 0.22 <= u < 0.32 else rng.random()  # no count before "a red star"
        if v < 0.2:
            desc = f"{COUNTS[len(sc['main']) - 3]} {desc}"
        elif v < 0.35:
            desc = f"{rng.choice(('a pattern of', 'a group of', 'several', 'many'))} {desc}"
        parts = [desc]
        if sc["others"] and rng.random() < MENTION_OTHERS:
            small = [f"{rng.choice(('a small', 'a little', 'a tiny'))} {o['colour']} "
                     f"{word(o['shape'], SHAPES)}" for o in sc["others"]]
            parts.append(f"{rng.choice(('and', 'with', 'next to'))} {' and '.join(small)}")
        if rng.random() < P_WHERE:
            parts.append(rng.choice(("in a row", "scattered around", "in a grid", "on a table")))
        if rng.random() < P_BACKGROUND:
            tone = sc["bg"][0]
            tone = "dark" if tone < 100 else "light grey" if tone > 160 else "grey"
            parts.append(f"on a {rng.choice((tone, 'plain', sc['background']))} background")
        text = " ".join(parts)
        if rng.random() < P_PREFIX:
            text = f"{rng.choice(PREFIXES)} {text}"
        if rng.random() < P_SUFFIX:
            text += " " + (f"in {rng.randint(2005, 2019)}" if rng.random() < 0.3
                           else rng.choice(SUFFIXES))
        return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def _draw(draw, shape, fill, x, y, r, angle):
    outline = SHAPES[shape][0]
    if outline is None:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon([(x + r * (u * cos - v * sin), y + r * (u * sin + v * cos))
                      for u, v in outline], fill=fill)


# ----------------------------------------------------------------------------- labels in views

def label_visible(ds, i, view, params=None):
    """Does a view of built-in item i still show its label? -> (colour shown, shape shown).

    Shape: at least half of one copy of the main object lies inside the crop. Colour: the median
    pixel of the main object in the view is named its colour (nearest_colour: the nearest of the
    5 hues, or white/black if unsaturated); a grayscale view keeps only white and black.
    `params` (from view.sample) default to a fresh draw from torch's RNG.
    """
    from torchvision import transforms as T  # here: generating the data needs neither
    from torchvision.transforms import functional as TF
    from views import OPENAI_MEAN, OPENAI_STD

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
