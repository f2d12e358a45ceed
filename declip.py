"""DeCLIP: CLIP + self-, multi-view and nearest-neighbour supervision (DeCLIP Sec. 3.3, Eq. 2).

    L_DeCLIP = (1 - alpha - beta - gamma) L_CLIP + alpha (L_ISS + L_TSS) + beta L_MVS + gamma L_NNS

- L_CLIP: InfoNCE (Eq. 1) of (z_img, z_txt), or SigLIP's sigmoid loss with `loss="siglip"`.
- L_ISS: SimSiam on the two image views (a projector and a predictor on the image embedding).
- L_TSS: masked language modelling on the text tower's token features (BERT's masking).
- L_MVS: the three other (image view, text view) pairs (z_img, z_txt_aug), (z_img_aug, z_txt),
  (z_img_aug, z_txt_aug), text views from EDA (eda.py).
- L_NNS: both image views against z_txt_nn, the nearest neighbour of z_txt in a FIFO queue of
  earlier text embeddings (nn_queue.py).
Where the paper and the official code leave room, the choices made here and their reasons are
in docs/declip.md (MLM's text pass, masking, term means, switches, SigLIP, DDP).

Shapes: B batch (per rank), N = world * B, D embedding dim, L tokens, W text width, V vocabulary,
M masked tokens.

    clip = factory.create_model("tiny", vocab_size=tok.vocab_size, eot_id=tok.eot_id)
    model = DeCLIP(clip, mask_id=tok.mask_id, vocab_size=tok.vocab_size)
    loss, terms = model(images, images_aug, ids, ids_aug)   # terms: clip iss tss mvs nns total
    loss.backward()

Left out: MLM on the augmented caption, the official code's per-GPU queues and NN(text_aug)
term, any other self-supervision (MoCo, SimCSE).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import (SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT, GlobalBatchNorm1d,
                    all_gather_with_grad, clip_loss, infonce_i2t, mlm_loss, siglip_loss,
                    simsiam_loss)
from nn_queue import NNQueue

# How MLM gets its token features: from the contrastive pass over the masked caption (shared,
# the official code), or from a pass of its own, causal or bidirectional (BERT's MLM).
MLM_PASSES = ("shared", "separate", "bidirectional")
TERMS = ("clip", "iss", "tss", "mvs", "nns")  # the terms of Eq. 2, as forward reports them


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


def _split(x, batch):
    """Rows of the first view and of the second (empty without one): (2B or B, D) -> (B, D) x 2."""
    return x[:batch], x[batch:]


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
        self._check_views(img_view2, ids_aug)
        if self.ss and masked is None:
            masked = mask_tokens(ids, self.mask_id, self.vocab_size, self.special_ids,
                                 self.mask_prob)
        ids_masked, mlm_labels = masked if self.ss else (None, None)           # (B, L) each
        e_img, e_txt, tokens = self.encode(img_view1, img_view2, ids, ids_aug, ids_masked)
        z_img, z_img_aug = _split(F.normalize(e_img, dim=-1), len(ids))      # (B, D) each
        z_txt, z_txt_aug = _split(F.normalize(e_txt, dim=-1), len(ids))      # (B or 0, D)
        logit_scale = self.clip.logit_scale.exp()

        l_clip = self.contrast(z_img, z_txt, logit_scale)
        L = dict.fromkeys(TERMS, l_clip.new_zeros(()))  # a switched-off term stays 0
        L["clip"] = l_clip
        if self.ss:
            L["iss"] = self.iss_loss(*_split(e_img, len(ids)))
            L["tss"] = self.tss_loss(tokens, mlm_labels)
        if self.mvs:
            L["mvs"] = self.mvs_loss(z_img, z_txt, z_img_aug, z_txt_aug, logit_scale)
        if self.nns:
            z_imgs = [z_img, z_img_aug] if self.mvs or self.ss else [z_img]
            L["nns"] = self.nns_loss(z_imgs, z_txt, logit_scale)
        L["total"] = loss = self.weighted_sum(L)

        if self.nns and self.training:
            self.remember(z_txt, push)
        return loss, {k: v.detach() for k, v in L.items()}

    def _check_views(self, img_view2, ids_aug):
        """The second views that the switches need must be there."""
        if (self.mvs or self.ss) and img_view2 is None:
            raise ValueError("DeCLIP: mvs/ss need a second image view (img_view2); build the "
                             "data with two views, or turn both off")
        if self.mvs and ids_aug is None:
            raise ValueError("DeCLIP: mvs needs augmented captions (ids_aug); build the data "
                             "with a text augmentation (EDA), or turn mvs off")

    # ---- features
    def encode(self, img_view1, img_view2, ids, ids_aug, ids_masked):
        """Every view through one encode_image and one encode_text call (for a ResNet tower,
        BatchNorm statistics over both views) -> e_img (2B or B, D), e_txt (2B or B, D), and
        the masked caption's token features (B, L, W) for MLM, or None without ss.

        Only what the switches need is encoded: img_view2 when mvs or ss, ids_aug when mvs.
        """
        images = torch.cat([img_view1, img_view2]) if self.mvs or self.ss else img_view1
        if self.ss and self.mlm_pass == "shared":  # the masked caption is the contrastive one
            ids = ids_masked
        texts = torch.cat([ids, ids_aug]) if self.mvs else ids                  # (2B or B, L)
        e_img = self.clip.encode_image(images)                                 # (2B or B, D)
        e_txt, tokens = self.encode_texts(texts, ids_masked)
        return e_img, e_txt, tokens

    def encode_texts(self, texts, ids_masked):
        """texts (T, L) -> (e_txt (T, D), tokens (B, L, W) of ids_masked or None), by mlm_pass."""
        if not self.ss:
            return self.clip.encode_text(texts), None
        if self.mlm_pass == "shared":  # texts starts with ids_masked itself
            e_txt, tokens = self.clip.encode_text(texts, return_tokens=True)
            return e_txt, tokens[:len(ids_masked)]
        if self.mlm_pass == "separate":  # one causal call: the masked rows last
            e_txt, tokens = self.clip.encode_text(torch.cat([texts, ids_masked]),
                                                  return_tokens=True)
            return e_txt[:len(texts)], tokens[len(texts):]
        e_txt = self.clip.encode_text(texts)  # bidirectional: MLM attends both ways
        _, tokens = self.clip.encode_text(ids_masked, return_tokens=True, causal=False)
        return e_txt, tokens

    # ---- the terms of Eq. 2
    def contrast(self, z_img, z_txt, logit_scale):
        """The image-text loss of every contrastive term: InfoNCE (Eq. 1) or SigLIP."""
        if self.loss == "siglip":
            return siglip_loss(z_img, z_txt, logit_scale, self.logit_bias)
        return clip_loss(z_img, z_txt, logit_scale)

    def iss_loss(self, e_img, e_img_aug):
        """L_ISS: SimSiam (Sec. 3.3, Fig. 5a) on the two views' embeddings (B, D) before their
        L2 norm: projections z1, z2 (B, 1024), predictions p1, p2, negative cosine."""
        z1, z2 = self.projector(e_img), self.projector(e_img_aug)             # (B, 1024)
        return simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2)

    def tss_loss(self, tokens, labels):
        """L_TSS: MLM (Sec. 3.3, Fig. 5b) on the masked caption's token features (B, L, W)."""
        return mlm_loss(*self.mlm_logits(tokens, labels))

    def mlm_logits(self, tokens, labels):
        """Vocabulary logits at the labelled positions only -> ((M, V), (M,) targets).

        Gathering the M ~ 0.15 * B * L masked tokens before the head avoids a (B, L, V) tensor
        (with V = 49409 the largest of the whole step). Boolean indexing syncs with the GPU once.
        """
        where = labels != -100                                             # (B, L)
        return self.mlm_head(tokens[where]), labels[where]                 # (M, V), (M,)

    def mvs_loss(self, z_img, z_txt, z_img_aug, z_txt_aug, logit_scale):
        """L_MVS (Sec. 3.3, Algorithm 1): the mean over the three other view pairs."""
        return (self.contrast(z_img, z_txt_aug, logit_scale)
                + self.contrast(z_img_aug, z_txt, logit_scale)
                + self.contrast(z_img_aug, z_txt_aug, logit_scale)) / 3

    def nns_loss(self, z_imgs, z_txt, logit_scale):
        """L_NNS (Sec. 3.3, Fig. 6): each image view (B, D) -> z_txt_nn = NN(z_txt) in the queue,
        image -> text only; 0 while the queue is empty (a tensor test: no host sync)."""
        z_txt_nn = self.queue.nearest(z_txt)                                  # (B, D) no grad
        if self.loss == "siglip":
            loss = sum(self.contrast(z, z_txt_nn, logit_scale) for z in z_imgs) / len(z_imgs)
        else:
            loss = infonce_i2t(z_imgs, z_txt_nn, logit_scale)
        return loss * (self.queue.filled > 0)

    def weighted_sum(self, L):
        """Eq. 2. A switched-off supervision gives its weight to L_CLIP, so all-off is CLIP."""
        alpha, beta, gamma = self.alpha, self.beta, self.gamma
        w_clip = 1.0 - alpha * self.ss - beta * self.mvs - gamma * self.nns
        if self.weights == "official" and self.mvs:  # the 4 view pairs as one CLIP term
            return (w_clip * (L["clip"] + 3 * L["mvs"]) / 4
                    + alpha * (L["iss"] + L["tss"]) + gamma * L["nns"])
        return (w_clip * L["clip"] + alpha * (L["iss"] + L["tss"]) + beta * L["mvs"]
                + gamma * L["nns"])

    # ---- the queue
    def remember(self, z_txt, push):
        """Keep this batch's all-gathered z_txt (N, D) for the queue; push it now if `push`."""
        self.pending = all_gather_with_grad(z_txt.detach())                   # (N, D)
        if push:
            self.push_queue()

    @torch.no_grad()
    def push_queue(self):
        """Append the last training batch's all-gathered text features to the NN queue."""
        if getattr(self, "pending", None) is not None:
            self.queue.push(self.pending)
            self.pending = None
