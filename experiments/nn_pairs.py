"""DeCLIP Fig. 9 on the built-in data: which caption would NNS contrast each image with?

    python experiments/nn_pairs.py results/runs/long/declip-all/checkpoint.pt --out /tmp/nn.png

The checkpoint's text tower embeds the first --captions training captions into an NNQueue
(nn_queue.py); the next --queries captions are looked up with NNQueue.nearest. Draws the first
8 (image, caption) pairs above their NN pairs and prints how often the neighbour shares the
query's class, colour and shape (study.py runs this on its last DeCLIP checkpoint).
"""
import argparse
import json
import os
import statistics
import sys
import textwrap

from PIL import Image, ImageDraw

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from charts import INK, NOTE, font  # noqa: E402


def nn_pairs(checkpoint, path, n_captions=4096, n_queries=512, n_show=8, batch=512):
    """The nearest other caption of n_queries captions in a queue of n_captions; -> the fractions.

    The first n_captions training captions are embedded by the checkpoint's text tower and pushed
    into an NNQueue (DeCLIP's queue, nn_queue.py); the next n_queries captions (not in the queue,
    as in training, where the queue only holds earlier steps) are looked up with
    `NNQueue.nearest`. Draws the first n_show (image, caption) pairs above their NN pairs and
    returns how often the neighbour shares the query's class / colour / shape.
    """
    import torch
    import torch.nn.functional as F

    import data
    import eval_zeroshot
    from factory import load_model_and_tokenizer
    from nn_queue import NNQueue

    model, tokenizer = load_model_and_tokenizer(checkpoint)
    size, L = eval_zeroshot.image_size_of(model), eval_zeroshot.context_length_of(model)
    base = data.SyntheticCaptions("train", image_size=size)  # train.py's training captions

    @torch.no_grad()
    def embed(indices):
        out = [F.normalize(model.encode_text(tokenizer([base.caption(i) for i in chunk], L)),
                           dim=-1) for chunk in (indices[k:k + batch]
                                                 for k in range(0, len(indices), batch))]
        return torch.cat(out)  # (N, D)

    z_bank = embed(list(range(n_captions)))                               # (K, D)
    queue = NNQueue(size=n_captions, dim=z_bank.shape[1])
    queue.push(z_bank)
    queries = list(range(n_captions, n_captions + n_queries))
    z_txt = embed(queries)                                                # (Q, D)
    z_txt_nn = queue.nearest(z_txt)                                       # (Q, D)
    # nearest() returns stored features: find the slot each came from (first exact match)
    nn_idx = [int((queue.feats == z).all(1).nonzero()[0]) for z in z_txt_nn]  # Q slot indices
    cos = (z_txt * z_txt_nn).sum(-1).tolist()                             # (Q,)
    n_shapes = base.n_shapes
    same = {"class": 0, "colour": 0, "shape": 0}
    for q, j in zip(queries, nn_idx):
        a, b = base.label(q), base.label(j)
        same["class"] += a == b
        same["colour"] += a // n_shapes == b // n_shapes
        same["shape"] += a % n_shapes == b % n_shapes

    n = len(queries)
    title = (f"Nearest other caption in an NNQueue of {n_captions} training captions "
             f"(DeCLIP Fig. 9; text tower of {checkpoint})")
    footer = (f"Over {n} queries the neighbour has the same class in "
              f"{100 * same['class'] / n:.0f}%, the same colour in {100 * same['colour'] / n:.0f}%,"
              f" the same shape in {100 * same['shape'] / n:.0f}%.")
    draw_nn_pairs(base, queries[:n_show], nn_idx[:n_show], cos, title, footer, path)
    return {"checkpoint": checkpoint, "n_captions": n_captions, "n_queries": n,
            "same_class": same["class"] / n, "same_colour": same["colour"] / n,
            "same_shape": same["shape"] / n, "mean_cosine": statistics.fmean(cos),
            "examples": [{"query": base.caption(q), "nn": base.caption(j), "cosine": s}
                         for q, j, s in list(zip(queries, nn_idx, cos))[:n_show]]}


def draw_nn_pairs(base, queries, neighbours, cos, title, footer, path):
    """One column per query: its (image, caption) on top, its NN pair below (DeCLIP Fig. 9)."""
    thumb, col, pad, text_h = 120, 168, 10, 96
    f, fs = font(12), font(15)
    rows = [("pair", queries), ("NN pair", neighbours)]
    W = 80 + col * len(queries)
    H = 40 + len(rows) * (thumb + text_h + pad) + 24
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill=INK, font=fs)
    for r, (name, indices) in enumerate(rows):
        y = 40 + r * (thumb + text_h + pad)
        draw.text((10, y + thumb // 2), name, fill=INK, font=f)
        for c, i in enumerate(indices):
            x = 80 + c * col
            image, caption = base[i]
            img.paste(image.resize((thumb, thumb), Image.NEAREST), (x, y))
            lines = textwrap.wrap(caption, 24)[:5]
            for k, line in enumerate(lines):
                draw.text((x, y + thumb + 4 + 15 * k), line, fill=INK, font=f)
            draw.text((x, y + thumb + 4 + 15 * len(lines)), f"cos {cos[c]:.3f}" if r else f"#{i}",
                      fill=(120, 120, 120), font=f)
    draw.text((10, H - 20), footer, fill=NOTE, font=f)
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint.pt written by train.py")
    p.add_argument("--out", default="nn_pairs.png", help="the picture")
    p.add_argument("--captions", type=int, default=4096, help="captions in the NN queue")
    p.add_argument("--queries", type=int, default=512, help="captions looked up")
    args = p.parse_args(argv)
    result = nn_pairs(args.checkpoint, args.out, args.captions, args.queries)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
