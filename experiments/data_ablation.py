"""train.py on variants of the built-in data, the tiny ResNet or DeCLIP's view (docs/findings.md).

The variants are environment variables, so that train.py keeps no flags for one-off experiments:

    AREA_CUE=1 python experiments/data_ablation.py --method clip ...  # v1's shapes and radius
    CANONICAL=0 python experiments/data_ablation.py ...  # v1's captions: words drawn from synonyms
    CLEAN=1 python experiments/data_ablation.py ...      # the caption is the class name
    SHAPE_ONLY=0.25 python experiments/data_ablation.py ...  # 1/4 of captions name the shape only
    NUISANCE=0.5 python experiments/data_ablation.py ...  # half as many caption parts off the class
    MENTION_OTHERS=0 python experiments/data_ablation.py ...  # never name the small distractors
    RENDER=2 python experiments/data_ablation.py ...     # images drawn at 2x the model's input size
    WIDTH=32 python experiments/data_ablation.py ...     # tiny-rn with width 32 instead of 16
    GRID=2 COPIES=2,2 RADIUS=0.17,0.21 python experiments/data_ablation.py ...  # fewer, larger
    CROP_RATIO=1,1 python experiments/data_ablation.py --image-aug declip ...  # square crops only
    CROP_SCALE=0.9 AUG_JITTER=0 AUG_GRAY=0 AUG_BLUR=0 AUG_HUE=0.05 \
        python experiments/data_ablation.py ...
        # DeCLIP's view (Appendix B: crops of 0.2-1, p 0.8 jitter with hue 0.1, p 0.2 grayscale,
        # p 0.5 blur) with another smallest crop, jitter / grayscale / blur probability, hue shift

Every other argument goes to train.py unchanged; the variables set go to <output>/variant.json.
"""
import functools
import json
import os
import random
import sys

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_data  # noqa: E402
import factory  # noqa: E402
import views  # noqa: E402


def area_cue_shapes():
    """Data v1's shapes and radius: the outlines as v1 drew them (each spanning about the unit
    radius), so at one radius a circle covers 2.4x the pixels of a triangle or a star and area
    tells shapes apart. The scenes are v1's in distribution, not item by item (v2 draws in
    another order)."""
    v1 = {"square": [(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)],
          "triangle": [(0, -1), (.87, .5), (-.87, .5)],
          "star": builtin_data._STAR,
          "cross": [(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1),
                    (-.3, 1), (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)],
          "diamond": [(0, -1), (.7, 0), (0, 1), (-.7, 0)]}
    for name, outline in v1.items():
        builtin_data.SHAPES[name] = (outline, builtin_data.SHAPES[name][1])
        builtin_data.EXTENT[name] = 1.0  # v1 placed every object by its radius
    builtin_data.RADIUS = (0.12, 0.15)


def shape_only_captions(p):
    """With probability p a caption names only the main object's shape ("circles"), no colour;
    its word follows CANONICAL as every caption's does."""
    caption = builtin_data.SyntheticCaptions._caption

    def new_caption(self, sc):
        rng = random.Random(sc["caption_seed"] + 1)
        if rng.random() < p:
            words = builtin_data.SHAPES[sc["shape"]][1]
            canonical = rng.random() < builtin_data.CANONICAL
            return builtin_data.plural(words[0] if canonical else rng.choice(words))
        return caption(self, sc)
    builtin_data.SyntheticCaptions._caption = new_caption


def render_at(factor):
    """Draw every built-in image at `factor` x the requested size: views crop the large image and
    resize to the model's input, as web photos are larger than the 224 px crop."""
    init = builtin_data.SyntheticCaptions.__init__

    def scaled_init(self, split="train", size=None, image_size=64, seed=0):
        init(self, split, size, int(image_size * factor), seed)
    builtin_data.SyntheticCaptions.__init__ = scaled_init


VARIANTS = ("AREA_CUE", "CANONICAL", "CLEAN", "SHAPE_ONLY", "NUISANCE", "MENTION_OTHERS", "RENDER",
            "WIDTH", "GRID", "COPIES", "RADIUS", "CROP_RATIO", "CROP_SCALE", "AUG_JITTER",
            "AUG_GRAY", "AUG_BLUR", "AUG_HUE")


def declip_view_overrides(env):
    """DeclipView's arguments that the environment changes (train.py builds the view)."""
    kw = {}
    if env("CROP_RATIO"):  # aspect-ratio range (paper: 3/4-4/3)
        kw["ratio"] = tuple(float(v) for v in env("CROP_RATIO").split(","))
    if env("CROP_SCALE"):
        kw["scale"] = (float(env("CROP_SCALE")), 1.0)
    if env("AUG_HUE"):
        kw["jitter"] = (0.4, 0.4, 0.4, float(env("AUG_HUE")))
    for name, key in (("AUG_JITTER", "p_jitter"), ("AUG_GRAY", "p_gray"), ("AUG_BLUR", "p_blur")):
        if env(name):
            kw[key] = float(env(name))
    return kw


if __name__ == "__main__":
    env = os.environ.get
    if env("AREA_CUE"):
        area_cue_shapes()
    if env("SHAPE_ONLY"):
        shape_only_captions(float(env("SHAPE_ONLY")))
    if env("CLEAN"):  # the caption is the class name: no synonyms, distractors or noise
        builtin_data.SyntheticCaptions._caption = lambda self, sc: self.classnames[sc["label"]]
    if env("CANONICAL"):
        builtin_data.CANONICAL = float(env("CANONICAL"))
    if env("MENTION_OTHERS"):
        builtin_data.MENTION_OTHERS = float(env("MENTION_OTHERS"))
    if env("NUISANCE"):  # scale the probabilities of a caption's irrelevant parts
        k = float(env("NUISANCE"))
        for name in ("P_WHERE", "P_BACKGROUND", "P_PREFIX", "P_SUFFIX", "MENTION_OTHERS"):
            setattr(builtin_data, name, k * getattr(builtin_data, name))
    if env("RENDER"):
        render_at(float(env("RENDER")))
    if env("WIDTH"):
        factory.PRESETS["tiny-rn"] = dict(factory.PRESETS["tiny-rn"],
                                          vision_width=int(env("WIDTH")))
    if env("GRID"):
        builtin_data.GRID = int(env("GRID"))
    if env("COPIES"):
        builtin_data.COPIES = tuple(int(v) for v in env("COPIES").split(","))
    if env("RADIUS"):
        builtin_data.RADIUS = tuple(float(v) for v in env("RADIUS").split(","))
    views.DeclipView = functools.partial(views.DeclipView, **declip_view_overrides(env))
    import train  # noqa: E402
    output = train.get_args(sys.argv[1:]).output  # the variant is kept with the run's args.json
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "variant.json"), "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k in VARIANTS}, f, indent=1)
    train.main(sys.argv[1:])
