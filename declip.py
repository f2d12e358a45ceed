"""DeCLIP: CLIP + self-, multi-view and nearest-neighbour supervision (DeCLIP Sec. 3.2-3.3, Eq. 2).

    L = (1 - alpha - beta - gamma) L_CLIP + alpha (L_ISS + L_TSS) + beta L_MVS + gamma L_NNS

- L_CLIP: InfoNCE (Eq. 1) of (z_img, z_txt), or SigLIP's sigmoid loss with `loss="siglip"`.
- L_ISS: SimSiam on two image views: projector D->1024->1024->1024 (BatchNorm after every linear,
  ReLU between) and predictor 1024->512->1024 (BN + ReLU on the hidden layer) on the image embedding
  before its L2 norm, negative cosine with stop-gradient (Appendix B).
- L_TSS: masked language modelling, `Linear(width, vocab)` on the text tower's token features
  (ln_final's; a module tower's last hidden states, e.g. XLM-R's, with its tokenizer's mask id).
- L_MVS: the three extra (image view, text view) pairs (z_img, z_txt_aug), (z_img_aug, z_txt),
  (z_img_aug, z_txt_aug) (Algorithm 1, line 10), text views from EDA.
- L_NNS: image -> z_txt_nn, the nearest neighbour of z_txt in a FIFO queue of earlier text
  embeddings (nn_queue.py), for both image views (z_img only when no second view is encoded).

Shapes: B batch (per rank), N = world * B, D embedding dim, L tokens, W text width, V vocabulary,
M masked tokens.

    clip = create_model("tiny", vocab_size=tok.vocab_size, eot_id=tok.eot_id)
    model = DeCLIP(clip, mask_id=tok.mask_id, vocab_size=tok.vocab_size)
    loss, terms = model(images, images_aug, ids, ids_aug)   # terms: clip iss tss mvs nns total
    loss.backward()

Choices (and where they differ from the paper or the official code, SPEC 3b):
- `mlm_pass` (MLM_PASSES). "shared" (default, the official code): the original caption is masked,
  and the *masked* caption's EOT feature is z_txt for every contrastive term and for the queue;
  MLM is nearly free (one (M, W) x (W, V) matmul), but the tower is causal, so MLM predicts a
  token from its left context only. "separate": z_txt from the unmasked caption, MLM from a
  causal pass over the masked one (the paper's Fig. 5(b) reading), batched into the same
  encode_text call. "bidirectional": that MLM pass attends both ways, padding masked (BERT's
  MLM). On CPU, tiny-rn at batch 64, a step costs 1.05x / 1.03x the shared one (bench.py --only
  mlm). The augmented caption (ids_aug) is never masked.
- Masking is Bernoulli(p) per real token (the official code), not exactly 15% per caption, and
  needs no Python loop. Real tokens lie strictly between SOT and EOT, so padding is never chosen
  even though its id (0) is also the byte "!", which *is* chosen where it is a real token.
- L_MVS and L_NNS are *means* of their pairs (3 and 2 InfoNCE terms), so every contrastive term is
  on one InfoNCE scale and beta, gamma weigh "one InfoNCE"; Algorithm 1 writes a sum, which would
  put 3x beta = 0.6 on MVS against 0.4 on L_CLIP. The official code also averages (its four pairs).
- L_NNS is image -> NN-text only (cross-entropy over the rows of the images; the official code does
  this too): z_txt_nn carries no gradient, so the other direction would only add a softmax over
  repeated, fixed neighbours. With `loss="siglip"` it is siglip_loss(z_img, z_txt_nn).
- Switches: a supervision that is off gets weight 0 and its weight goes to L_CLIP, i.e.
  w_clip = 1 - alpha*ss - beta*mvs - gamma*nns, so the Table 4 rows are flag settings and all-off
  is plain CLIP exactly. The paper does not say how its ablation re-weights.
- The queue starts empty: while it is, L_NNS is multiplied by 0 (a tensor test, no host sync);
  the first step is then (1 - alpha - beta - gamma) L_CLIP + ... without NNS. It is filled after
  every training step with the all-gathered z_txt, so all ranks hold the same queue.
- `weights="official"` folds the multi-view pairs into the CLIP term as the official code does:
  w_clip * mean(4 pairs) + alpha (L_ISS + L_TSS) + gamma L_NNS, i.e. 0.4/0.2/0.2/0.2 by default.
- Only what the switches need is encoded: img_view2 when mvs or ss, ids_aug when mvs (else pass
  None). Both image views go through one encode_image call and both text views through one
  encode_text call; for a ResNet tower (BatchNorm) that means BN statistics over both views.
  Cost on CPU (tiny preset, batch 32, fwd + bwd + AdamW): ~2.2-2.4x a CLIP step, of which the
  second views alone are ~1.8x; activations ~2x (paper, RN50 on GPUs: 1.5x time, 1.44x memory).
- `loss="siglip"`: DeCLIP owns the bias `logit_bias` (init `logit_bias_init`, else -10; train.py
  passes -log(global batch)) and resets clip.logit_scale (to `logit_scale_init`, else)
  log 10 (SPEC 4); every contrastive term becomes siglip_loss.
- Distributed: every loss is exact under DDP (gradients equal one process on the global batch).
  SimSiam's BatchNorm layers are GlobalBatchNorm1d, which take their statistics over all ranks on
  any device (nn.SyncBatchNorm only runs on GPUs); a ResNet image tower's own BatchNorm still needs
  nn.SyncBatchNorm.convert_sync_batchnorm(clip.visual) for exactness. Wrap DeCLIP in DDP with
  broadcast_buffers=False: the queue is identical on all ranks, and re-sending it costs time.

Left out: MLM on the augmented caption, the official code's
per-GPU queues and NN(text_aug) term, any other self-supervision (MoCo, SimCSE).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import (SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT, all_gather_with_grad,
                    clip_loss, mlm_loss, rank_and_world, siglip_loss, simsiam_loss)
from nn_queue import NNQueue

# How MLM gets its token features: from the contrastive pass over the masked caption (shared,
# the official code), or from a pass of its own, causal or bidirectional (BERT's MLM).
MLM_PASSES = ("shared", "separate", "bidirectional")


def mask_tokens(ids, mask_id, vocab_size, special_ids, p=0.15, generator=None):
    """BERT masking of ids (B, L) -> (ids_masked (B, L), labels (B, L), -100 where not chosen).

    Each real token (strictly between the first and the second special token of its row, i.e.
    between SOT and EOT) is chosen with probability p. A chosen token becomes mask_id with
    probability 0.8, a uniformly random non-special token with 0.1, and stays as it is with 0.1;
    its label is the original id. The random draws use `generator` (on its own device) if given.
    """
    specials = torch.as_tensor(list(special_ids), device=ids.device)
    is_special = torch.isin(ids, specials)                                 # (B, L)
    real = ~is_special & (is_special.cumsum(dim=1) == 1)                   # after SOT, before EOT
    device = generator.device if generator is not None else ids.device
    u = torch.rand(ids.shape, generator=generator, device=device).to(ids.device)  # chosen?
    v = torch.rand(ids.shape, generator=generator, device=device).to(ids.device)  # how?
    vocab = torch.arange(vocab_size, device=ids.device)
    allowed = vocab[~torch.isin(vocab, specials)]                          # (V - #specials,)
    pick = torch.randint(len(allowed), ids.shape, generator=generator, device=device)
    random_ids = allowed[pick.to(ids.device)]                              # (B, L)
    chosen = real & (u < p)
    ids_masked = torch.where(chosen & (v < 0.8), mask_id, ids)
    ids_masked = torch.where(chosen & (v >= 0.8) & (v < 0.9), random_ids, ids_masked)
    labels = torch.where(chosen, ids, -100)
    return ids_masked, labels


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


def projection_mlp(dim_in, hidden=1024, dim_out=1024):
    """SimSiam projector: 3 linear layers, BatchNorm after each, ReLU between (not at the end)."""
    return nn.Sequential(
        nn.Linear(dim_in, hidden, bias=False), GlobalBatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False), GlobalBatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, dim_out, bias=False), GlobalBatchNorm1d(dim_out))


def prediction_mlp(dim=1024, hidden=512):
    """SimSiam predictor: a bottleneck 2-layer MLP, BatchNorm + ReLU on the hidden layer only."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), GlobalBatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def _infonce_i2t(z_imgs, z_txt, logit_scale):
    """Image -> text cross-entropy, rows local images, columns the global batch's texts.

    z_imgs: list of (B, D) image views, all paired with z_txt (B, D): one matmul for all views,
    and the mean over their rows is the mean of the per-view losses.
    """
    rank, _ = rank_and_world()
    batch = z_txt.shape[0]
    z_txt_all = all_gather_with_grad(z_txt)                                # (N, D)
    logits = logit_scale * torch.cat(z_imgs) @ z_txt_all.T                 # (views * B, N)
    labels = torch.arange(batch, device=z_txt.device) + rank * batch       # (B,)
    return F.cross_entropy(logits, labels.repeat(len(z_imgs)))


class DeCLIP(nn.Module):
    """A CLIP (`self.clip`) with DeCLIP's extra supervision; forward returns (loss, terms)."""

    def __init__(self, clip, alpha=0.2, beta=0.2, gamma=0.2, mvs=True, ss=True, nns=True,
                 loss="infonce", queue_size=65536, mask_id=None, vocab_size=None,
                 weights="paper", mask_prob=0.15, sot_id=None, eot_id=None, mlm_pass="shared",
                 logit_scale_init=None, logit_bias_init=None):
        super().__init__()
        if loss not in ("infonce", "siglip"):
            raise ValueError(f"DeCLIP: loss={loss!r}; use 'infonce' or 'siglip'")
        if mlm_pass not in MLM_PASSES:
            raise ValueError(f"DeCLIP: mlm_pass={mlm_pass!r}; use one of {', '.join(MLM_PASSES)}")
        if weights not in ("paper", "official"):
            raise ValueError(f"DeCLIP: weights={weights!r}; use 'paper' or 'official'")
        vocab_size = vocab_size or clip.vocab_size
        if vocab_size != clip.vocab_size:
            raise ValueError(f"DeCLIP: vocab_size={vocab_size} but the CLIP has "
                             f"{clip.vocab_size} tokens; build both from the same tokenizer")
        self.clip = clip
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.mvs, self.ss, self.nns = mvs, ss, nns
        self.loss, self.weights, self.mask_prob, self.mlm_pass = loss, weights, mask_prob, mlm_pass
        self.vocab_size = vocab_size
        self.mask_id = vocab_size - 1 if mask_id is None else mask_id
        eot_id = eot_id if eot_id is not None else clip.eot_id
        if eot_id is None:
            raise ValueError("DeCLIP: pass sot_id and eot_id (its tokenizer's) for a CLIP whose "
                             "text tower is a module (BERT, XLM-R)")
        sot_id = sot_id if sot_id is not None else eot_id - 1  # OpenAI's and our tokenizer's layout
        self.special_ids = (sot_id, eot_id, self.mask_id)
        if ss:  # heads exist only when used, so DDP never sees parameters without gradients
            self.projector = projection_mlp(clip.embed_dim)
            self.predictor = prediction_mlp()
            self.mlm_head = nn.Linear(clip.text_width, vocab_size)
        if nns:
            self.queue = NNQueue(queue_size, clip.embed_dim)
        if loss == "siglip":
            bias = SIGLIP_LOGIT_BIAS_INIT if logit_bias_init is None else logit_bias_init
            self.logit_bias = nn.Parameter(torch.tensor(float(bias)))
            if logit_scale_init is None:
                logit_scale_init = math.exp(SIGLIP_LOGIT_SCALE_INIT)
        if logit_scale_init is not None:  # the multiplier t; the parameter is log t
            with torch.no_grad():
                clip.logit_scale.fill_(math.log(logit_scale_init))

    @torch.no_grad()
    def push_queue(self):
        """Append the last training batch's all-gathered text features to the NN queue."""
        if getattr(self, "pending", None) is not None:
            self.queue.push(self.pending)
            self.pending = None

    def contrast(self, z_img, z_txt, logit_scale):
        """The image-text loss of every contrastive term: InfoNCE (Eq. 1) or SigLIP."""
        if self.loss == "siglip":
            return siglip_loss(z_img, z_txt, logit_scale, self.logit_bias)
        return clip_loss(z_img, z_txt, logit_scale)

    def mlm_logits(self, tokens, labels):
        """Vocabulary logits at the labelled positions only -> ((M, V), (M,) targets).

        Gathering the M ~ 0.15 * B * L masked tokens before the head avoids a (B, L, V) tensor
        (with V = 49409 the largest of the whole step). Boolean indexing syncs with the GPU once.
        """
        where = labels != -100                                             # (B, L)
        return self.mlm_head(tokens[where]), labels[where]                 # (M, V), (M,)

    def forward(self, img_view1, img_view2, ids, ids_aug, masked=None, push=True):
        """img_view1/2: (B, 3, H, W) two views; ids/ids_aug: (B, L) original and EDA captions.

        img_view2 / ids_aug may be None when no switch needs them (mvs and ss off / mvs off).
        masked: optional (ids_masked, labels) from mask_tokens, e.g. for reproducible tests;
        otherwise ids are masked here with the global RNG.
        push: push this batch's gathered z_txt to the queue now; train.py passes False and calls
        `push_queue()` only after a step whose gradients were finite, so a skipped step never
        leaves its (possibly non-finite) features in the queue.
        Returns (loss, terms): terms holds detached scalars "clip", "iss", "tss", "mvs", "nns",
        "total" (0 for switched-off terms). In training mode the queue is pushed afterwards.
        """
        B = ids.shape[0]
        two_images = self.mvs or self.ss
        if two_images and img_view2 is None:
            raise ValueError("DeCLIP: mvs/ss need a second image view (img_view2); build the "
                             "data with two views, or turn both off")
        if self.mvs and ids_aug is None:
            raise ValueError("DeCLIP: mvs needs augmented captions (ids_aug); build the data "
                             "with a text augmentation (EDA), or turn mvs off")
        if self.ss:
            if masked is None:
                masked = mask_tokens(ids, self.mask_id, self.vocab_size, self.special_ids,
                                     self.mask_prob)
            ids_masked, mlm_labels = masked
            if self.mlm_pass == "shared":
                ids = ids_masked

        images = torch.cat([img_view1, img_view2]) if two_images else img_view1   # (2B or B, ...)
        texts = torch.cat([ids, ids_aug]) if self.mvs else ids                     # (2B or B, L)
        e_img = self.clip.encode_image(images)                                     # (2B or B, D)
        if self.ss and self.mlm_pass == "bidirectional":
            e_txt = self.clip.encode_text(texts)                                   # (2B or B, D)
            _, tokens = self.clip.encode_text(ids_masked, return_tokens=True, causal=False)
        elif self.ss and self.mlm_pass == "separate":  # one causal call: the masked rows last
            e_txt, tokens = self.clip.encode_text(torch.cat([texts, ids_masked]),
                                                  return_tokens=True)
            e_txt, tokens = e_txt[:len(texts)], tokens[len(texts):]                # (B, L, W)
        elif self.ss:  # shared: the masked caption is also the contrastive one
            e_txt, tokens = self.clip.encode_text(texts, return_tokens=True)      # (2B or B, D)
        else:
            e_txt = self.clip.encode_text(texts)
        z_img_all, z_txt_all = F.normalize(e_img, dim=-1), F.normalize(e_txt, dim=-1)
        z_img, z_txt = z_img_all[:B], z_txt_all[:B]                               # (B, D)
        z_img_aug, z_txt_aug = z_img_all[B:], z_txt_all[B:]                       # (B or 0, D)
        logit_scale = self.clip.logit_scale.exp()

        terms = {"clip": self.contrast(z_img, z_txt, logit_scale)}
        zero = terms["clip"].new_zeros(())
        w_clip = 1.0 - self.alpha * self.ss - self.beta * self.mvs - self.gamma * self.nns

        if self.mvs:
            terms["mvs"] = (self.contrast(z_img, z_txt_aug, logit_scale)
                            + self.contrast(z_img_aug, z_txt, logit_scale)
                            + self.contrast(z_img_aug, z_txt_aug, logit_scale)) / 3
        if self.ss:
            z1, z2 = self.projector(e_img[:B]), self.projector(e_img[B:])          # (B, 1024)
            terms["iss"] = simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2)
            terms["tss"] = mlm_loss(*self.mlm_logits(tokens[:B], mlm_labels))
        if self.nns:
            z_txt_nn = self.queue.nearest(z_txt)                                  # (B, D) no grad
            views = [z_img, z_img_aug] if two_images else [z_img]
            if self.loss == "siglip":
                loss_nns = sum(self.contrast(v, z_txt_nn, logit_scale) for v in views) / len(views)
            else:
                loss_nns = _infonce_i2t(views, z_txt_nn, logit_scale)
            terms["nns"] = loss_nns * (self.queue.filled > 0)  # 0 until the queue has entries

        if self.weights == "official" and self.mvs:
            loss = w_clip * (terms["clip"] + 3 * terms["mvs"]) / 4
        else:
            loss = w_clip * terms["clip"]
            if self.mvs:
                loss = loss + self.beta * terms["mvs"]
        if self.ss:
            loss = loss + self.alpha * (terms["iss"] + terms["tss"])
        if self.nns:
            loss = loss + self.gamma * terms["nns"]

        if self.nns and self.training:
            self.pending = all_gather_with_grad(z_txt.detach())                 # (N, D)
            if push:
                self.push_queue()
        terms["total"] = loss
        return loss, {k: terms.get(k, zero).detach() for k in
                      ("clip", "iss", "tss", "mvs", "nns", "total")}
