"""The training losses of DeCLIP and its CLIP variants, and the distributed pieces they need.

- `clip_loss`: symmetric InfoNCE between image and text features (DeCLIP Eq. 1, CLIP Sec. 2.3).
  DeCLIP's MVS and NNS terms (Sec. 3.3) are the same loss on other pairs of views.
- `siglip_loss`: the pairwise sigmoid loss of SigLIP (Zhai et al. 2023, Sec. 3; the sigmoid
  loss of the medium-scale study), `-(1/B) sum_ij log sigmoid(y_ij (t z_i.z_j + b))`.
- `infonce_i2t`: the image -> text half of InfoNCE, for several image views against one set of
  texts (DeCLIP's NNS, Sec. 3.3: both image views against the nearest-neighbour texts).
- `simsiam_loss`: image self-supervision, SimSiam's negative cosine with stop-gradient
  (DeCLIP Sec. 3.3, ISS).
- `mlm_loss`: text self-supervision, masked-token cross-entropy (DeCLIP Sec. 3.3, TSS).
- `all_gather_with_grad`: the collective that makes the contrastive losses see the global batch.
- `GlobalBatchNorm1d`: BatchNorm over the global batch on any device (SimSiam's heads in DeCLIP).
- `clamp_logit_scale_`: keeps the temperature multiplier at most 100 (see below).

Shapes: B local batch, N = world_size * B global batch, D embedding dim, L tokens, V vocabulary,
M masked positions.

Every function takes `logit_scale` as the *multiplier* `exp(t)`, already exponentiated. The
parameter `t` lives in the model; the multiplier is kept <= 100 by clamping `t` to `[0, log 100]`
after every optimizer step (train.py calls `clamp_logit_scale_(model.logit_scale)`), as CLIP and
DeCLIP do. Clamping the parameter rather than the multiplier inside the loss keeps the gradient of
`t` alive at the boundary, so the optimizer can always walk it back down.

Data parallelism: without `torch.distributed` (or with one process) every function is the textbook
loss on its inputs. Under DDP each rank passes its local batch and gets back a local loss whose
gradient, after DDP's averaging over ranks, equals the gradient of one process on the concatenated
global batch (and the mean over ranks of the returned values equals that process's loss). Every rank
must pass the same batch size (use `drop_last=True`) and call the loss, and its backward, the same
number of times.

Usage:
    z_img, z_txt, logit_scale = clip_model(images, ids)   # (B, D), (B, D) L2-normalised, scalar
    loss = clip_loss(z_img, z_txt, logit_scale)
    loss.backward(); optimizer.step(); clamp_logit_scale_(clip_model.logit_scale)

Left out: label smoothing, OpenCLIP's "neighbour exchange" for SigLIP (we all-gather the texts
instead: same gradient, B x N instead of B x B logits per rank), the no-gradient gather variant
(wrong, see tests/test_ddp_losses.py), and caching of labels across steps.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# SigLIP's initialisation (Zhai et al. 2023, Sec. 3): t' = log 10 so that t = exp(t') = 10, and
# bias b = -10.
# With b = -10 the B^2 - B negative pairs start with a near-zero loss instead of log 2 each, so the
# first steps are not dominated by pushing everything apart.
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def rank_and_world():
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; all_reduce(SUM) of the gradient and this rank's slice backward.

    Why a sum: rank k's loss L_k uses every rank's features (they are its negatives), so the
    gradient of the total sum_k L_k w.r.t. this rank's features x_r is sum_k
    dL_k/d(gathered_k)[slice r]. Each rank only holds its own dL_k/d(gathered_k); summing those over
    ranks and taking slice r gives exactly that term. DDP then divides the parameter gradients by
    world_size, i.e. differentiates mean_k L_k, which is the single-process loss on the global batch
    when each L_k is a mean over local rows.

    Why it runs on gloo and NCCL alike: it uses only all_gather and all_reduce, which every backend
    and torch version implements. A reduce_scatter would move world_size times less data in
    backward, but older gloo builds lack it (torch.distributed.nn still emulates it with all_to_all
    off NCCL); the features are only (N, D), so we keep the collective that works everywhere.
    """

    @staticmethod
    def forward(ctx, x):
        rank, world = rank_and_world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # (N, ...)
        # newer torch renamed all_gather_into_tensor (now a deprecated alias) to all_gather_single
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        # all_reduce works in place, and autograd may hand the same buffer to other consumers.
        grad = grad.contiguous().clone()  # (N, ...)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]  # (B, ...)


def all_gather_with_grad(x):
    """Concatenate `x` (B, ...) of every rank in rank order -> (world*B, ...), with gradient.

    This rank's rows of the result are `x` itself (numerically), and gradients flow back to it from
    every rank's loss. Identity (returns `x`) when not distributed or with a single process.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def clip_loss(z_img, z_txt, logit_scale):
    """Symmetric InfoNCE over the global batch (DeCLIP Eq. 1).

    z_img, z_txt: (B, D) L2-normalised, row i of each is a positive pair; logit_scale: the
    multiplier. Returns the scalar `(CE(image->text) + CE(text->image)) / 2`, averaged over this
    rank's rows.

    Under DDP the rows are the local samples and the columns the global batch: every local image is
    contrasted with all N texts and every local text with all N images, the positive sitting at
    column `rank * B + i`. Both (B, N) blocks are needed: together the ranks' blocks tile the full
    (N, N) matrix once by rows (image->text) and once by columns (text->image).
    """
    rank, world = rank_and_world()
    batch = z_img.shape[0]
    z_txt_all = all_gather_with_grad(z_txt)  # (N, D)
    logits_per_image = logit_scale * z_img @ z_txt_all.T  # (B, N)
    if world == 1:
        logits_per_text = logits_per_image.T  # (B, B): the same matrix, read by columns
    else:
        z_img_all = all_gather_with_grad(z_img)  # (N, D)
        logits_per_text = logit_scale * z_txt @ z_img_all.T  # (B, N)
    labels = torch.arange(batch, device=z_img.device) + rank * batch  # (B,)
    loss_i2t = F.cross_entropy(logits_per_image, labels)
    loss_t2i = F.cross_entropy(logits_per_text, labels)
    return (loss_i2t + loss_t2i) / 2


def infonce_i2t(z_imgs, z_txt, logit_scale):
    """Image -> text cross-entropy: rows the local images, columns the global batch's texts.

    z_imgs: list of (B, D) image views, all paired with z_txt (B, D); logit_scale: the multiplier.
    One matmul for all views, and the mean over their rows is the mean of the per-view losses.
    Under DDP the positive of local row i sits at column `rank * B + i`, as in `clip_loss`.
    """
    rank, _ = rank_and_world()
    batch = z_txt.shape[0]
    z_txt_all = all_gather_with_grad(z_txt)                                # (N, D)
    logits = logit_scale * torch.cat(z_imgs) @ z_txt_all.T                 # (views * B, N)
    labels = torch.arange(batch, device=z_txt.device) + rank * batch       # (B,)
    return F.cross_entropy(logits, labels.repeat(len(z_imgs)))


def siglip_loss(z_img, z_txt, logit_scale, logit_bias):
    """Pairwise sigmoid loss `-(1/B) sum_ij log sigmoid(y_ij (t z_img_i . z_txt_j + b))`.

    z_img, z_txt: (B, D) L2-normalised; logit_scale t (multiplier), logit_bias b: scalars (tensors
    or floats). y_ij = +1 for the matching pair, -1 otherwise. Normalised by the local batch B, as
    in SigLIP.

    Under DDP the image features stay local and the texts of all ranks are gathered: the columns of
    other ranks hold negatives only, and labels are +1 only on this rank's diagonal block. Each pair
    (i, j) of the global N x N matrix is counted once, on the rank that owns image i, so
    mean_k(loss_k) is the single-process loss on the global batch.
    """
    rank, _ = rank_and_world()
    batch = z_img.shape[0]
    z_txt_all = all_gather_with_grad(z_txt)  # (N, D)
    logits = logit_scale * z_img @ z_txt_all.T + logit_bias  # (B, N)
    labels = -torch.ones_like(logits)  # (B, N)
    rows = torch.arange(batch, device=z_img.device)
    labels[rows, rows + rank * batch] = 1.0
    return -F.logsigmoid(labels * logits).sum() / batch


def simsiam_loss(p1, p2, z1, z2):
    """SimSiam's symmetric loss `-(cos(p1, sg(z2)).mean() + cos(p2, sg(z1)).mean()) / 2`.

    p1, p2: (B, D') predictor outputs of the two image views; z1, z2: (B, D') projector outputs.
    The targets z are detached (stop-gradient `sg`), which is what keeps SimSiam from collapsing.
    Returns a scalar in [-1, 1]; -1 when each prediction points along the other view's projection.
    A mean over local rows: with equal batches per rank DDP's averaging gives the global mean.
    """
    cos_12 = F.cosine_similarity(p1, z2.detach(), dim=-1)  # (B,)
    cos_21 = F.cosine_similarity(p2, z1.detach(), dim=-1)  # (B,)
    return -(cos_12.mean() + cos_21.mean()) / 2


def mlm_loss(logits, labels):
    """Masked-token cross-entropy, ignoring positions labelled -100.

    logits: (M, V) or (B, L, V); labels: (M,) or (B, L) original token ids, -100 where nothing is
    predicted. Returns the mean cross-entropy over labelled positions, and 0 (still attached to
    `logits`, so backward runs and gives zero gradients) when no position is labelled.

    Under DDP the ranks mask different numbers of tokens, so a local mean would weight them
    unevenly: the sum is divided by (labelled positions on all ranks) / world_size instead (one
    scalar all_reduce), so that DDP's averaging yields the mean over every labelled token of the
    global batch.
    """
    vocab = logits.shape[-1]
    logits, labels = logits.reshape(-1, vocab), labels.reshape(-1)  # (M, V), (M,)
    # A sum over no labelled position is 0 with a graph; reduction="mean" would give 0/0 = nan.
    loss_sum = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    count = (labels != -100).sum().float()
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return loss_sum / (count.clamp(min=1.0) / world)


@torch.no_grad()
def clamp_logit_scale_(param, max_scale=100.0):
    """Clamp the log-scale parameter `t` (logit_scale = exp(t)) in place to [0, log(max_scale)].

    Call after each optimizer step. Returns `param`. Works for CLIP's `[]`-shaped and older `[1]`
    parameters.
    """
    return param.clamp_(0.0, math.log(max_scale))


class GlobalBatchNorm1d(nn.Module):
    """BatchNorm1d whose training statistics cover the global batch of all ranks, on any device.

    Same parameters and buffers as nn.BatchNorm1d (so the state_dicts match). Under
    torch.distributed it normalises all_gather_with_grad(x) and keeps this rank's rows, which is
    what one process on the whole batch computes (nn.SyncBatchNorm does the same on GPUs only).
    Not an nn.BatchNorm subclass, so convert_sync_batchnorm leaves it alone.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x):                                                  # (B, C)
        rank, world = rank_and_world()
        batch = x.shape[0]
        if self.training:
            self.num_batches_tracked.add_(1)
            if world > 1:
                x = all_gather_with_grad(x)                                # (N, C)
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return y[rank * batch:(rank + 1) * batch] if self.training and world > 1 else y
