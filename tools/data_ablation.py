"""train.py on variants of the built-in data or of the tiny ResNet, for the README's ablations.

The variants are environment variables, so that train.py keeps no flags for one-off experiments:

    EQUAL_AREA=1  python tools/data_ablation.py --method clip --output /tmp/a   # shapes of equal area
    RENDER=2      python tools/data_ablation.py ...   # images drawn at 2x the model's input size
    WIDTH=32      python tools/data_ablation.py ...   # tiny-rn with width 32 instead of 16
    GRID=2 COPIES=2,2 RADIUS=0.18,0.22 python tools/data_ablation.py ...   # fewer, larger objects

Every other argument goes to train.py unchanged.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_data  # noqa: E402
import clip  # noqa: E402


def polygon_area(points):
    """Shoelace formula."""
    return 0.5 * abs(sum(x0 * y1 - x1 * y0
                         for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])))


def equal_area_shapes():
    """Scale every outline so its area equals the disc's (pi r^2): area no longer tells shapes
    apart (at the same radius a circle covers 2.4x the pixels of a triangle or a star)."""
    for name, (outline, words) in list(builtin_data.SHAPES.items()):
        if outline is not None:
            k = math.sqrt(math.pi / polygon_area(outline))
            builtin_data.SHAPES[name] = ([(k * u, k * v) for u, v in outline], words)


def render_at(factor):
    """Draw every built-in image at `factor` x the requested size: views crop the large image and
    resize to the model's input, as web photos are larger than the 224 px crop."""
    init = builtin_data.SyntheticCaptions.__init__

    def scaled_init(self, split="train", size=None, image_size=64, seed=0):
        init(self, split, size, int(image_size * factor), seed)
    builtin_data.SyntheticCaptions.__init__ = scaled_init


if __name__ == "__main__":
    env = os.environ.get
    if env("EQUAL_AREA"):
        equal_area_shapes()
    if env("RENDER"):
        render_at(float(env("RENDER")))
    if env("WIDTH"):
        clip.PRESETS["tiny-rn"] = dict(clip.PRESETS["tiny-rn"], vision_width=int(env("WIDTH")))
    if env("GRID"):
        builtin_data.GRID = int(env("GRID"))
    if env("COPIES"):
        builtin_data.COPIES = tuple(int(v) for v in env("COPIES").split(","))
    if env("RADIUS"):
        builtin_data.RADIUS = tuple(float(v) for v in env("RADIUS").split(","))
    import train  # noqa: E402
    train.main(sys.argv[1:])
