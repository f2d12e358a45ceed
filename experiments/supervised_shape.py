"""Can the demo's image tower learn shape at all in the demo's budget? Train it *supervised*.

The tiny ResNet of `tiny-rn` (random init) plus a linear head, cross-entropy on the main object's
shape (6 classes), AdamW lr 1e-3 wd 0.1, batches of 64 built-in training images, the given view;
prints shape accuracy on 300 eval images every 100 steps. If this learns shape in a few hundred
steps while CLIP does not, the bottleneck is the contrastive problem (the text side), not the
image tower or the data's pixels (docs/findings.md, finding (3)).

    python experiments/supervised_shape.py                 # CLIP's mild view
    python experiments/supervised_shape.py --view declip   # DeCLIP's Appendix B view
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

# the library modules (clip.py, train.py, ...) live at the repo root, one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import builtin_data  # noqa: E402
import factory  # noqa: E402
import views  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--view", choices=["clip", "declip"], default="clip")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    size, n_shapes = 64, builtin_data.SyntheticCaptions.n_shapes
    tower = factory.create_model("tiny-rn").visual
    head = torch.nn.Linear(tower.output_dim, n_shapes)
    train = builtin_data.SyntheticCaptions("train", seed=args.seed)
    val = builtin_data.SyntheticCaptions("eval", size=300, seed=args.seed)
    view = views.DeclipView(size) if args.view == "declip" else views.clip_image_transform(size)
    to_eval = views.eval_transform(size)
    x_val = torch.stack([to_eval(val[i][0]) for i in range(len(val))])      # (300, 3, S, S)
    y_val = torch.tensor([val.label(i) % n_shapes for i in range(len(val))])
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.1)
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train), (64,)).tolist()
        x = torch.stack([view(train[i][0]) for i in idx])                  # (64, 3, S, S)
        y = torch.tensor([train.label(i) % n_shapes for i in idx])
        loss = F.cross_entropy(head(tower(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            tower.eval()
            with torch.no_grad():
                acc = (head(tower(x_val)).argmax(1) == y_val).float().mean().item()
            tower.train()
            print(f"step {step}: loss {loss.item():.3f}, eval shape accuracy {acc:.1%} "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
