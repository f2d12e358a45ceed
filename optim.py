"""What trains, and how fast: AdamW's parameter groups, LiT locking, the lr schedule, clipping.

AdamW with no weight decay on norms, biases and the logit scale/bias (CLIP, OpenCLIP), a peak lr
per tower (the medium-scale study trains pre-trained towers at a lower lr), LiT's locked towers
(Zhai et al., CVPR 2022: a frozen body, BatchNorm statistics included; a tower's *body* is what
locking freezes and what image_lr / text_lr apply to, while the projections into the joint space
are fresh for a pre-trained tower and train at the base lr), linear warm-up then
cosine decay (CLIP, DeCLIP Appendix C), the gradient norm that is both clipping and the step's
finite check, and the undoing of a non-finite step's BatchNorm statistics (BadSteps).

    lock_tower(model, "image")                         # LiT: before building the groups
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, wd=0.1, text_lr=1e-5), betas=(0.9, 0.98))
    for group in opt.param_groups:                     # every step
        group["lr"] = lr_at(step, total, warmup, group["base_lr"])
    train_mode(model)                                  # model.train(), locked BatchNorm frozen
"""
import math

import torch
from torch import nn

from clip import CLIP


# ----------------------------------------------------------------------------- what trains

def _find_clip(model):
    """The CLIP inside `model` (itself, DeCLIP's .clip, or a DDP-wrapped one)."""
    found = next((m for m in model.modules() if isinstance(m, CLIP)), None)
    if found is None:
        raise ValueError(f"no CLIP inside this {type(model).__name__}")
    return found


def _is_projection(clip, name):  # names relative to the CLIP; the tower contract's projection
    heads = [f"visual.{p}" for p in getattr(clip.visual, "projection", ())] + ["text_projection"]
    return any(name == h or name.startswith(h + ".") for h in heads)


def tower_parameters(model, side):
    """{name: parameter} of one tower's body ("image" or "text"), projection excluded; names are
    relative to the CLIP. The text side is everything of the CLIP outside `visual` except
    `text_projection` and the logit scale."""
    if side not in ("image", "text"):
        raise ValueError(f"tower {side!r}: use 'image' or 'text'")
    clip = _find_clip(model)
    image = side == "image"
    return {n: p for n, p in clip.named_parameters() if n.startswith("visual.") == image
            and not _is_projection(clip, n) and not n.startswith("logit_")}


def lock_tower(model, side, keep_proj=True):
    """LiT: freeze one tower (requires_grad False) and its BatchNorm statistics (eval mode).

    `model.train()` puts BatchNorm back in training mode: use `train_mode(model)` instead, which
    keeps every BatchNorm whose parameters are all frozen in eval mode. keep_proj=False freezes
    the projection too (for a tower that is already aligned, e.g. a CLIP checkpoint's).
    """
    clip = _find_clip(model)
    params = tower_parameters(clip, side)
    if not keep_proj:
        proj = "visual." if side == "image" else "text_projection"
        params.update({n: p for n, p in clip.named_parameters()
                       if _is_projection(clip, n) and n.startswith(proj)})
    for p in params.values():
        p.requires_grad_(False)
    return train_mode(model, model.training)


def train_mode(model, mode=True):
    """model.train(mode), but BatchNorm layers with only frozen parameters stay in eval mode."""
    model.train(mode)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None \
                and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    return model


def param_groups(model, lr, wd, image_lr=None, text_lr=None):
    """AdamW parameter groups: per tower body (image_lr / text_lr, default lr) x decay or not.

    No weight decay for tensors with ndim < 2 (every norm layer's weight and bias, class
    embeddings), biases, logit_scale / logit_bias.
    Each group carries "name" and "base_lr" (its peak lr): schedule each group from its own,
    e.g. group["lr"] = lr_at(step, total, warmup, group["base_lr"]). Frozen parameters are left
    out, so call lock_tower first.
    """
    clip = _find_clip(model)
    tower = {id(p): "image" for p in tower_parameters(clip, "image").values()}
    tower.update({id(p): "text" for p in tower_parameters(clip, "text").values()})
    peak = {"image": lr if image_lr is None else image_lr,
            "text": lr if text_lr is None else text_lr, "other": lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or name.endswith("bias")
                     or name.rsplit(".", 1)[-1].startswith("logit_"))
        t = tower.get(id(p), "other")
        key = f"{t}/{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": wd if decay else 0.0, "lr": peak[t],
                           "base_lr": peak[t], "name": key}
        groups[key]["params"].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------- schedule, clipping

def lr_at(step, total, warmup, base_lr):
    """Linear warm-up to base_lr, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def clip_gradients(parameters, max_norm=None):
    """The gradients' global L2 norm, which is the step's finite check, and clipping to max_norm
    with it if given. clip_grad_norm_ would also multiply every gradient by 1 when there is no
    --grad-clip: that second pass over the gradients is skipped. No host sync here."""
    parameters = [p for p in parameters if p.grad is not None]
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf"))
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


class BadSteps:
    """A step whose gradient is not finite is skipped: its weights and NN-queue push never
    happen, and the BatchNorm running statistics its forward changed are put back (a ResNet
    tower's, SimSiam's heads'). Too many in a row abort the run; the last checkpoint stays."""

    def __init__(self, model, max_in_a_row):
        self.stats = [b for n, b in model.named_buffers()
                      if n.rsplit(".", 1)[-1].startswith("running_")]
        self.before = [torch.empty_like(b) for b in self.stats]  # filled in place every step
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, 0, 0

    def snapshot(self):
        if self.stats:
            torch._foreach_copy_(self.before, self.stats)

    def record(self, finite, step):
        if finite:
            self.in_a_row = 0
            return
        torch._foreach_copy_(self.stats, self.before)  # undo what the forward changed
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise SystemExit(f"{self.in_a_row} non-finite steps in a row at step {step}: lower "
                             f"--lr, set --grad-clip, or use --precision bf16/fp32; the last good "
                             f"checkpoint is kept")
