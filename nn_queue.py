"""A FIFO queue of text embeddings and its nearest-neighbour lookup (DeCLIP NNS, Sec. 3.3, Fig. 6).

DeCLIP's nearest-neighbour supervision contrasts each image with the text in a large FIFO queue
(64K in the paper) that is closest to its own caption's embedding, `z_txt_nn = NN(z_txt)` by
cosine similarity. This file holds only the queue: the loss lives in declip.py.

Shapes: B batch, D embedding dim, K queue size (default 65,536), C chunk of the queue.

    queue = NNQueue(size=65536, dim=512)
    z_txt_nn = queue.nearest(z_txt)        # (B, D) stored features; z_txt itself while empty
    queue.push(all_gather(z_txt))          # after the loss, with the whole global batch

Design notes
- The state lives in buffers (`feats`, `ptr`, `filled`), so `state_dict()` / `load_state_dict()`
  save and restore the queue with a checkpoint, and `.to(device)` moves it.
- `ptr` and `filled` are 0-dim int64 tensors, never Python ints: `push` computes its slot indices
  with tensor arithmetic, so it never waits for the GPU (no `.item()`), and there is no Python
  mirror that could drift from the buffers after `load_state_dict`.
- Slots fill from 0 upwards and only wrap around once the queue is full, so the filled slots are
  always exactly `[0, filled)`: `nearest` masks the rest with -inf instead of tracking a set.
- `nearest` walks the queue in chunks of `chunk_size` rows, keeping a running max/argmax, so a
  64K queue needs a (B, chunk_size) similarity matrix at a time, never (B, 64K).
- Before anything has been pushed `nearest` returns `z` itself (detached); DeCLIP zeroes the NNS
  term while `len(queue) == 0` (a tensor, `queue.filled`, so no host sync is needed).
- Distributed training: the caller pushes the *all-gathered* batch, so every rank holds the same
  queue and results do not depend on the number of GPUs. The official DeCLIP code instead keeps one
  queue per GPU filled with that GPU's features only (never gathered), so its neighbours come from
  a (K / world)-step-old slice of 1/world of the data.

Left out: approximate search (FAISS), distances other than cosine, per-sample exclusion of the
sample's own feature. The queue only holds features from *earlier* steps, so in the paper's regime
(a 64K queue, 15M pairs an epoch) a caption is never there; in many-epoch runs of a small set its
previous occurrence could be, and train.py keeps the default queue at a quarter of an epoch.
"""
import torch
import torch.nn as nn


class NNQueue(nn.Module):
    """FIFO queue of L2-normalised embeddings with a chunked top-1 cosine lookup."""

    def __init__(self, size=65536, dim=512, chunk_size=8192):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"NNQueue: size and dim must be positive, got size={size}, dim={dim}")
        self.size, self.dim, self.chunk_size = size, dim, chunk_size
        self.register_buffer("feats", torch.zeros(size, dim))        # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))     # next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # slots [0, filled) valid

    def __len__(self):
        return int(self.filled)  # a host sync: for logging and tests, not for the training step

    @torch.no_grad()
    def push(self, z):
        """Append z (B, D), normalised, oldest entries out first. If B > K the newest K are kept."""
        z = z.detach().to(self.feats.dtype)[-self.size:]                  # (min(B, K), D)
        n = z.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size  # (n,)
        self.feats.index_copy_(0, idx, z)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_((self.filled + n).clamp(max=self.size))

    @torch.no_grad()
    def nearest(self, z, chunk_size=None):
        """Top-1 cosine neighbour in the queue of each row of z (B, D) -> stored features (B, D).

        z must be L2-normalised (the stored features are), so a dot product is the cosine.
        Rows of an empty queue get z itself back.
        """
        chunk_size = chunk_size or self.chunk_size
        z = z.detach()
        zq = z.to(self.feats.dtype)
        best_sim = torch.full((z.shape[0],), float("-inf"), device=z.device, dtype=zq.dtype)
        best_idx = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        slot = torch.arange(self.size, device=z.device)
        empty = torch.zeros(self.size, device=z.device, dtype=zq.dtype)
        empty.masked_fill_(slot >= self.filled, float("-inf"))             # (K,) 0 or -inf
        for start in range(0, self.size, chunk_size):
            chunk = self.feats[start:start + chunk_size]                    # (C, D)
            # addmm adds the -inf of empty slots inside the matmul, so they can never win
            sim = torch.addmm(empty[start:start + chunk_size], zq, chunk.T)  # (B, C)
            sim_max, arg = sim.max(dim=1)                                   # (B,)
            better = sim_max > best_sim                                     # ties: first chunk
            best_sim = torch.where(better, sim_max, best_sim)
            best_idx = torch.where(better, arg + start, best_idx)
        z_nn = self.feats[best_idx].to(z.dtype)                             # (B, D)
        return torch.where((self.filled > 0), z_nn, z)

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}, chunk_size={self.chunk_size}"
