"""BERT as a CLIP text tower: the encoder, its WordPiece tokenizer, and a loader for HF weights.

DeCLIP's largest model and the medium-scale study (Sec. 2) start the text tower from a masked-LM
pre-trained encoder. This file is BERT (Devlin et al. 2019) with the module names of Hugging Face's
`BertModel`, so `pytorch_model.bin` / `model.safetensors` weights load by name:

    x = LayerNorm(word_emb[ids] + pos_emb[:L] + type_emb[0])          # (B, L, W)
    x = LayerNorm(x + attn(x)); x = LayerNorm(x + W2 gelu(W1 x))       # post-LN, per layer
    padding keys (id 0 = [PAD]) are masked; attention is bidirectional; GELU is erf-exact.

BertModel keeps clip.py's text-tower contract (forward(ids) -> (B, L, W), width, context_length,
vocab_size, config): factory.create_model(text="bert:DIR") puts it in a CLIP as `clip.text`,
which takes the [CLS] (position 0) feature times `text_projection` as z_txt; per-token features
(for DeCLIP's MLM head) are the last hidden states. XLM-R (xlmr.py) is this network with
RoBERTa's positions and padding id.

Shapes: B batch, L tokens, W width, H heads, V vocabulary.

Usage:
    tok = WordPieceTokenizer.from_pretrained("bert-base-uncased/")      # vocab.txt (+ configs)
    ids = tok(["a photo of a cat."], context_length=77)                  # [CLS] .. [SEP] 0 ..
    sd, cfg = load_hf_bert("bert-base-uncased/")                         # our names, sizes
    bert = BertModel(**cfg); bert.load_state_dict(sd)                    # pretrained.py does this
    tokens = bert(ids)                                                   # (1, 77, 768)
    config, sd, path = read_hf_folder("some-model/", ("vit",), "a ViTModel")  # any HF folder

WordPiece as BERT's tokenizer: clean the text (drop control characters, whitespace to spaces),
NFC, spaces around CJK ideographs, split on whitespace; for uncased vocabularies lower-case and
strip accents (NFD, drop combining marks); split off every punctuation character; then greedy
longest-match-first against the vocabulary, word-inner pieces prefixed "##", and [UNK] for a word
that cannot be covered or is longer than 100 characters.

Left out: dropout (0.1 in BERT's pre-training), token types other than 0 (one segment), the
pooler and the MLM/NSP heads of the checkpoint, never-split special tokens inside raw text.
"""
import json
import os
import struct
import unicodedata

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-12  # BERT's LayerNorm epsilon


class BertLayer(nn.Module):
    """One post-LN encoder layer; nn.ModuleDicts only reproduce HF's parameter names. `hidden`:
    the MLP's width (default 4 W), `eps`: the LayerNorms' epsilon."""

    def __init__(self, width, heads, hidden=None, eps=LN_EPS):
        super().__init__()
        if width % heads:
            raise ValueError(f"BERT width {width} is not divisible by {heads} heads")
        self.heads = heads
        hidden = hidden or 4 * width
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({n: nn.Linear(width, width) for n in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(width, width),
                                     "LayerNorm": nn.LayerNorm(width, eps=eps)})})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(width, hidden)})
        self.output = nn.ModuleDict({"dense": nn.Linear(hidden, width),
                                     "LayerNorm": nn.LayerNorm(width, eps=eps)})

    def forward(self, x, keep):  # x (B, L, W), keep (B, 1, 1, L) True for real keys
        B, L, W = x.shape
        att = self.attention
        q, k, v = (att.self[n](x).view(B, L, self.heads, W // self.heads).transpose(1, 2)
                   for n in ("query", "key", "value"))  # (B, H, L, W/H) each
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, L, W/H)
        x = att.output.LayerNorm(x + att.output.dense(a.transpose(1, 2).reshape(B, L, W)))
        h = F.gelu(self.intermediate.dense(x))  # (B, L, 4W)
        return self.output.LayerNorm(x + self.output.dense(h))


class BertModel(nn.Module):
    """BERT encoder: ids (B, L) -> last hidden states (B, L, W). [PAD] must be id 0.

    A CLIP text tower (clip.py's contract): `width`, `context_length`, `vocab_size`, and `config`,
    which rebuilds it (BertModel(**config minus "kind")); "kind" names it in factory.towers().
    """

    kind, pad_id = "bert", 0
    position_offset = 0  # position rows beyond context_length (RoBERTa: padding_idx + 1)

    def __init__(self, vocab_size, context_length, width, layers, heads, type_vocab_size=2,
                 hidden=None, eps=LN_EPS):
        super().__init__()
        self.width, self.context_length, self.vocab_size = width, context_length, vocab_size
        self.grad_checkpointing = False  # clip.CLIP.set_grad_checkpointing
        self.config = dict(kind=self.kind, vocab_size=vocab_size, context_length=context_length,
                           width=width, layers=layers, heads=heads,
                           type_vocab_size=type_vocab_size, hidden=hidden, eps=eps)
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(vocab_size, width),
            "position_embeddings": nn.Embedding(context_length + self.position_offset, width),
            "token_type_embeddings": nn.Embedding(type_vocab_size, width),
            "LayerNorm": nn.LayerNorm(width, eps=eps)})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(
            [BertLayer(width, heads, hidden, eps) for _ in range(layers)])})
        for m in self.modules():  # BERT's initialisation (LayerNorms keep ones and zeros)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def position_ids(self, ids):  # (B, L) -> (L,): BERT counts every position, padding included
        return torch.arange(ids.shape[1], device=ids.device)

    def forward(self, ids):  # (B, L) -> (B, L, W)
        e = self.embeddings
        x = (e.word_embeddings(ids) + e.position_embeddings(self.position_ids(ids))
             + e.token_type_embeddings.weight[0])  # one segment: token type 0 everywhere
        x = e.LayerNorm(x)
        keep = (ids != self.pad_id)[:, None, None, :]  # (B, 1, 1, L): no query attends to padding
        for layer in self.encoder.layer:
            if self.grad_checkpointing and torch.is_grad_enabled():  # recompute in backward
                x = checkpoint(layer, x, keep, use_reentrant=False)
            else:
                x = layer(x, keep)
        return x


# ----------------------------------------------------------------------------- Hugging Face files

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path):
    """A .safetensors file as a dict of tensors (8-byte header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        t = torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize,
                             offset=start) if end > start else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def read_weights(path):
    """A state dict from model.safetensors (parsed here) or pytorch_model.bin (tensors only)."""
    try:
        if os.fspath(path).endswith(".safetensors"):
            return read_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # struct/JSON/unpickling errors: say what happened in one line
        raise ValueError(f"{path}: cannot read the weights ({type(e).__name__}); expected a "
                         "safetensors file or a tensor-only torch file") from None


def read_hf_folder(folder, model_types, what):
    """(config.json as a dict, state dict, weights path) of a Hugging Face model folder.

    config.json's model_type must be one of `model_types`; the weights are model.safetensors, or
    pytorch_model.bin if there is none. Errors are one line that names the file and `what` was
    expected (e.g. "a Hugging Face ViTModel folder").
    """
    folder = os.fspath(folder)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file}: no such file (expected {what}: config.json "
                                "and model.safetensors or pytorch_model.bin)")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_file}: not readable JSON ({type(e).__name__})") from None
    got = config.get("model_type") if isinstance(config, dict) else None
    if got not in model_types:
        raise ValueError(f"{config_file}: model_type {got!r}, expected "
                         f"{' or '.join(map(repr, model_types))} ({what})")
    files = [os.path.join(folder, f) for f in ("model.safetensors", "pytorch_model.bin")]
    path = next((f for f in files if os.path.isfile(f)), None)
    if path is None:
        raise FileNotFoundError(f"{files[0]}: no such file, nor pytorch_model.bin (the weights "
                                f"of {what})")
    return config, read_weights(path), path


def copy_weights_(module, sd, path, keep=()):
    """module.load_state_dict(sd) with one-line errors naming `path`; the parameters named in
    `keep` stay as they are (e.g. a fresh projection)."""
    own = module.state_dict()
    sd = {**{k: own[k] for k in keep}, **sd}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(ks)} {what} ({', '.join(ks[:2])}{', ...' if len(ks) > 2 else ''})"
                 for what, ks in (("missing", missing), ("unexpected", unexpected),
                                  ("shape mismatches", wrong)) if ks]
        raise ValueError(f"{path}: weights do not fit this {type(module).__name__}: "
                         + "; ".join(parts))
    module.load_state_dict(sd)


def load_hf_bert(path, context_length=None):
    """Read HF BERT weights (a directory, pytorch_model.bin or model.safetensors).

    Returns (state dict with BertModel's names, BertModel kwargs). Sizes come from the shapes;
    heads from config.json's num_attention_heads when present, else width / 64 (every BERT).
    `context_length` keeps the first positions only (exact for texts that fit).
    """
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")]
        path = next((f for f in files if os.path.isfile(f)), files[-1])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no BERT weights here (put Hugging Face's "
                                "pytorch_model.bin or model.safetensors and vocab.txt there)")
    sd = read_weights(path)
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    rename = {".gamma": ".weight", ".beta": ".bias"}  # TF-converted checkpoints' LayerNorm names
    sd = {next((k[:-len(a)] + b for a, b in rename.items() if k.endswith(a)), k): v
          for k, v in sd.items() if k.startswith(("embeddings.", "encoder."))
          and not k.endswith("position_ids")}  # drops pooler.*, cls.* (heads), buffers
    if "embeddings.word_embeddings.weight" not in sd:
        raise ValueError(f"{path}: not a BERT checkpoint (no bert.embeddings.word_embeddings)")
    vocab_size, width = sd["embeddings.word_embeddings.weight"].shape
    positions = sd["embeddings.position_embeddings.weight"]
    context_length = context_length or len(positions)
    if context_length > len(positions):
        raise ValueError(f"{path}: context_length {context_length} > the {len(positions)} "
                         f"positions BERT was trained with")
    sd["embeddings.position_embeddings.weight"] = positions[:context_length]
    heads = width // 64
    config_file = os.path.join(folder, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            hf = json.load(f)
        heads = hf.get("num_attention_heads", heads)
        act, hidden = hf.get("hidden_act", "gelu"), hf.get("intermediate_size", 4 * width)
        if act != "gelu" or hidden != 4 * width:
            raise ValueError(f"{config_file}: only BERTs with GELU and a 4x MLP are supported")
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    return sd, dict(vocab_size=vocab_size, context_length=context_length, width=width,
                    layers=layers, heads=heads,
                    type_vocab_size=len(sd["embeddings.token_type_embeddings.weight"]))


# ----------------------------------------------------------------------------- tokenizer

def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):  # \t \n \r count as whitespace; HF drops every "C*" category
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch):  # every non-alphanumeric ASCII symbol counts, e.g. "$", "^", "`"
    cp = ord(ch)
    return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
            or unicodedata.category(ch).startswith("P"))


def _is_cjk(ch):  # CJK Unified Ideographs (+ extensions A-E, compatibility): BERT's ranges
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's tokenizer with our Tokenizer's interface: encode, decode, __call__, sot_id ([CLS]),
    eot_id ([SEP]), mask_id ([MASK]), pad_id ([PAD] = 0), vocab_size."""

    MAX_WORD_CHARS = 100

    def __init__(self, vocab, lower_case=True):
        self.vocab, self.lower_case = list(vocab), lower_case
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in self.ids]
        if missing or self.ids["[PAD]"] != 0:
            raise ValueError(f"vocab.txt needs [PAD] at id 0 and [UNK] [CLS] [SEP] [MASK] "
                             f"(BERT's layout); missing: {', '.join(missing) or 'none'}")
        self.pad_id, self.unk_id = self.ids["[PAD]"], self.ids["[UNK]"]
        self.sot_id, self.eot_id, self.mask_id = (self.ids[t] for t in ("[CLS]", "[SEP]", "[MASK]"))
        self.vocab_size = len(self.vocab)
        self._cache = {}

    def __repr__(self):
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lower_case={self.lower_case})"

    @classmethod
    def from_vocab(cls, path, lower_case=None):
        """vocab.txt (one token per line, line number = id). lower_case=None: True unless the
        vocabulary holds upper-case letters outside [SPECIAL] tokens (i.e. a cased BERT)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such vocabulary file (BERT's vocab.txt)")
        with open(path, encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f]
        while vocab and not vocab[-1]:
            vocab.pop()
        if lower_case is None:
            lower_case = not any(t != t.lower() for t in vocab if not t.startswith("["))
        return cls(vocab, lower_case)

    @classmethod
    def from_pretrained(cls, folder):
        """A Hugging Face model folder: vocab.txt, and do_lower_case from tokenizer_config.json."""
        lower_case = None
        config = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config) as f:
                lower_case = json.load(f).get("do_lower_case")
        return cls.from_vocab(os.path.join(folder, "vocab.txt"), lower_case)

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in self.vocab))

    def state(self):
        """What rebuilds this tokenizer: WordPieceTokenizer(**state) (checkpoints keep it)."""
        return dict(vocab=list(self.vocab), lower_case=self.lower_case)

    def basic_tokenize(self, text):
        """Text -> words and punctuation marks, before WordPiece."""
        text = "".join(" " if _is_whitespace(ch) else ch for ch in text
                       if not (ord(ch) in (0, 0xFFFD) or _is_control(ch)))
        text = unicodedata.normalize("NFC", text)
        text = "".join(f" {ch} " if _is_cjk(ch) else ch for ch in text)
        words = []
        for word in text.split():
            if self.lower_case:
                word = "".join(ch for ch in unicodedata.normalize("NFD", word.lower())
                               if unicodedata.category(ch) != "Mn")  # strip accents
            piece = ""
            for ch in word:  # every punctuation character is a word of its own
                if _is_punctuation(ch):
                    words += [piece, ch] if piece else [ch]
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def wordpiece(self, word):
        """Greedy longest-match-first pieces of one word; [UNK] if any part is not covered."""
        if word in self._cache:
            return self._cache[word]
        if len(word) > self.MAX_WORD_CHARS:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    ids.append(self.ids[piece])
                    start = end
                    break
            else:  # no prefix of the rest is in the vocabulary
                ids = [self.unk_id]
                break
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text):
        return [i for word in self.basic_tokenize(text) for i in self.wordpiece(word)]

    def decode(self, ids):
        """Text of `ids`: [CLS], [MASK] and [PAD] dropped, stops at [SEP], "##" pieces joined."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        words = []
        for i in ids:
            if i == self.eot_id:
                break
            if i in (self.sot_id, self.mask_id, self.pad_id):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            words.append(self.vocab[i])
        return " ".join(words).replace(" ##", "")

    def __call__(self, texts, context_length=77):
        """(N, L) int64: [CLS] ids [SEP] then [PAD] (0). A text too long is cut so that [SEP]
        still ends it. A single string gives N = 1."""
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: need at least 2 ([CLS], [SEP])")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # (N, L), [PAD] = 0
        for row, text in zip(out, texts):
            ids = [self.sot_id, *self.encode(text)[:context_length - 2], self.eot_id]
            row[:len(ids)] = torch.tensor(ids)
        return out
