"""How much the text tower tells the built-in classes apart: docs/findings.md, (4).

    python experiments/class_similarity.py results/runs/long/clip-all/checkpoint.pt [MORE.pt ...]

For each checkpoint, the zero-shot classifier's class embeddings (prompt-ensembled, as
eval_zeroshot.py builds them) and the mean cosine between classes of one colour and different
shapes, and of one shape and different colours. A text tower that ignores shape gives ~1 for the
first.
"""
import os
import sys

import torch
import torch.nn.functional as F

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_zeroshot  # noqa: E402
import factory  # noqa: E402
from data import SyntheticCaptions  # noqa: E402


def main(paths):
    ds = SyntheticCaptions(split="eval", size=1)
    n_classes, n_shapes = len(ds.classnames), ds.n_shapes
    colour, shape = torch.arange(n_classes) // n_shapes, torch.arange(n_classes) % n_shapes
    same_colour = (colour[:, None] == colour) & (shape[:, None] != shape)  # (C, C)
    same_shape = (shape[:, None] == shape) & (colour[:, None] != colour)
    for path in paths:
        model, tokenizer = factory.load_model_and_tokenizer(path)
        w = eval_zeroshot.zero_shot_classifier(model, tokenizer, ds.classnames, ds.templates)
        w = F.normalize(w.T if w.shape[0] != n_classes else w, dim=-1)   # (C, D)
        sim = w @ w.T                                                      # (C, C)
        print(f"{path}: one colour, other shapes {sim[same_colour].mean():.3f}; "
              f"one shape, other colours {sim[same_shape].mean():.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
