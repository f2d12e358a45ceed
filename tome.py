"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023; the medium-scale
study's Sec. 3 measures it for CLIP).

Between the attention and the MLP of each ViT block, r tokens are merged away:

1. split the tokens alternately into A (even positions) and B (odd positions);
2. score every A token against every B token by the cosine similarity of their attention keys
   (averaged over heads); each A token picks its most similar B token;
3. the r A tokens with the best matches are merged into their B partners (size-weighted average;
   several A tokens may land on one B token); the other A tokens and all B tokens are kept.

The class token (position 0) gets similarity -inf, so it is never merged. Token sizes (how many
patches a token stands for) are tracked, and the next attention adds log(size) to its logits
("proportional attention"): a token of size s counts as s identical tokens. The merge is a gather
and a scatter-add, so gradients flow through the merged values (not through the matching, which
is an argmax), as in ToMe; it trains and evaluates alike.

Shapes: B batch, N tokens (class token first), C channels, r merges, N' = N - r.

Usage (what clip.VisionTransformer does per block):
    x = x + attn(ln_1(x), attn_bias=proportional_bias(size))   # attn also returns keys (B, H, N, C)
    merge = bipartite_soft_matching(keys.mean(1), r)            # metric (B, N, C)
    x, size = merge_wavg(merge, x, size)                        # (B, N', C), (B, N', 1)
    x = x + mlp(ln_2(x))

Schedules: `tome_r` on a ViT is an int (r merges in every block, ToMe's default) or a list with
one r per block; `decreasing_schedule(r, layers)` gives ToMe's "decreasing" one (2r in the first
block down to 0 in the last, about the same total) that merges early, where tokens are cheapest
to merge and most redundant. r is clamped to (N - 1) // 2 per block (the mergeable A tokens), so
the class token and at least one other token always remain.

Left out: ToMe's distillation-token protection, source tracking for visualisation, and merging
in the text tower.
"""
import torch


def bipartite_soft_matching(metric, r, class_token=True):
    """Match tokens (B, N, C) by cosine similarity; returns merge(x, mode) for (B, N, C') tensors.

    merge(x, mode="sum"|"mean") -> (B, N - r', C'): the kept A tokens (in their original order,
    so the class token stays first), then the B tokens with their merged A tokens reduced in.
    r' = min(r, (N - class_token) // 2).
    """
    N = metric.shape[1]
    r = min(r, (N - int(class_token)) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():  # the matching is discrete: no gradient to pass through it
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, C), (B, Nb, C)
        scores = a @ b.transpose(1, 2)  # (B, Na, Nb) cosine similarities
        if class_token:
            scores[:, 0] = -float("inf")
        best, dst_of = scores.max(dim=-1)  # (B, Na) best score and its B token, per A token
        order = best.argsort(dim=-1, descending=True)  # (B, Na)
        src_idx = order[:, :r]  # (B, r) A tokens merged away
        unm_idx = order[:, r:].sort(dim=-1).values  # (B, Na - r) A tokens kept, original order
        dst_idx = dst_of.gather(1, src_idx)  # (B, r) where each one goes

    def merge(x, mode="mean"):
        src, dst = x[:, ::2], x[:, 1::2]  # (B, Na, C'), (B, Nb, C')
        C = x.shape[-1]
        unm = src.gather(1, unm_idx[..., None].expand(-1, -1, C))  # (B, Na - r, C')
        src = src.gather(1, src_idx[..., None].expand(-1, -1, C))  # (B, r, C')
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, C), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)  # (B, N - r, C')

    return merge


def merge_wavg(merge, x, size=None):
    """Size-weighted average merge: x (B, N, C), size (B, N, 1) or None (all ones).

    Returns (x (B, N', C), size (B, N', 1)); the sizes always sum to the original token count.
    """
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    x_sum = merge(x * size, mode="sum")  # sizes in float32 even under autocast: they are counts
    size = merge(size, mode="sum")
    return (x_sum / size).to(x.dtype), size


def proportional_bias(size):
    """Attention logits bias log(size) (B, 1, 1, N) from sizes (B, N, 1): a token of size s counts
    as s copies of itself in every softmax. None (no merge yet) stays None."""
    return None if size is None else size.log().transpose(1, 2)[:, None]


def decreasing_schedule(r, layers):
    """ToMe's decreasing schedule: r_i falls linearly from 2r (first block) to 0 (last block)."""
    if layers == 1:
        return [r]
    return [int(2 * r * (1 - i / (layers - 1))) for i in range(layers)]


def remaining_tokens(n, schedule):
    """Token counts after each block for n input tokens (class token included)."""
    out = []
    for r in schedule:
        n -= max(0, min(r, (n - 1) // 2))
        out.append(n)
    return out
