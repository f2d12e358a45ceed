"""XLM-RoBERTa as a CLIP text tower: the encoder, its SentencePiece tokenizer, and HF loaders.

The medium-scale study starts its text tower from XLM-RoBERTa (Conneau et al. 2020; study Sec. 2,
Fig. 2). XLM-R is RoBERTa, i.e. BERT's post-LN encoder (bert.py, same Hugging Face names) with
two differences, and a SentencePiece Unigram vocabulary of 250,002 ids:

    pos = padding_idx + cumsum(ids != pad)   at real tokens (2, 3, ...; padding is skipped)
    x = LayerNorm(word_emb[ids] + pos_emb[pos] + type_emb[0]);  then BERT's layers, GELU, eps 1e-5
    pad id 1 (its keys are masked), one token type, z_txt from <s> (position 0)

Shapes: B batch, L tokens, W width, V vocabulary.

Usage:
    tok = XLMRTokenizer.from_pretrained("xlm-roberta-base/")   # tokenizer.json or .bpe.model
    ids = tok(["a photo of a cat."], context_length=77)        # <s> .. </s> 1 1 ..  (1, 77)
    tower = load_hf_xlmr("xlm-roberta-base/", context_length=77)
    tokens = tower(ids)                                        # (1, 77, 768)
    model = factory.create_model("ViT-S-16", text="xlmr:xlm-roberta-base/")  # a CLIP

The tokenizer, from scratch (no sentencepiece / tokenizers packages), as Hugging Face's fast
XLMRobertaTokenizer computes ids:
1. normalise as tokenizer.json's normalizer says (Sequence, Precompiled, NFKC/NFC/NFKD/NFD,
   Lowercase, Strip, Replace). SentencePiece's precompiled character map is not decoded from its
   bytes: "Precompiled" is rebuilt from the rules SentencePiece compiles it from, nmt_nfkc = NFKC
   plus: tabs, newlines and other listed spaces become " ", ASCII controls are dropped, the
   fullwidth tilde is kept (Python's Unicode tables may differ on rare code points).
2. pre-tokenise with Metaspace: " " becomes "▁", "▁" is prepended (prepend_scheme always/first,
   or the older add_prefix_space), and the text is split before every "▁" (split=true).
3. segment each word by Viterbi over the pieces' scores (log-probabilities): the best sum wins;
   ties go to the path found first (the piece starting earliest, as HF's forward pass). A
   character no one-character piece covers becomes <unk> with score min(scores) - 10 (as
   SentencePiece), and consecutive unknowns are fused into one <unk> (HF's fuse_unk).
4. <s> ids </s>. Ids are positions in tokenizer.json's vocabulary; from sentencepiece.bpe.model
   they are fairseq's: <s> 0, <pad> 1, </s> 2, <unk> 3, then SentencePiece id + 1, <mask> last.
The .model file is a protobuf read by hand: ModelProto field 1 = SentencePiece {1 piece, 2 score
(float32), 3 type}, field 3 = NormalizerSpec {1 name, 3 add_dummy_prefix, 4
remove_extra_whitespaces}; it becomes a normaliser, Metaspace and vocabulary that give the ids
of the tokenizer.json HF's converter writes from it.
Needs bert.py (BERT's layers, the Hugging Face file readers), torch and regex.

Left out: dropout, the pooler and LM head of the checkpoint, token types other than 0, special
tokens written inside the raw text (HF maps a literal "<mask>" to the mask id; here it is text),
byte fallback, sampling (subword regularisation), decoding offsets.
"""
import json
import os
import struct
import unicodedata
from functools import lru_cache

import regex
import torch

from bert import BertModel, copy_weights_, read_hf_folder

PAD_ID = 1             # RoBERTa's padding_idx
UNK_PENALTY = 10.0     # SentencePiece's kUnkPenalty: an unknown character scores min - 10
SPACE = "\u2581"       # "▁", SentencePiece's visible space
# SentencePiece's whitespace handling as HF writes it: " " -> "▁", "▁" prepended, split before "▁"
METASPACE = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always", "split": True}


# ----------------------------------------------------------------------------- the encoder

class XLMRobertaModel(BertModel):
    """XLM-R encoder: ids (B, L) -> last hidden states (B, L, W), equal to HF's XLMRobertaModel
    with attention_mask = (ids != 1) at the real tokens. A CLIP text tower (clip.py's contract);
    `config` rebuilds it."""

    kind, pad_id = "xlmr", PAD_ID
    position_offset = PAD_ID + 1  # rows 0 and 1 are never used by real tokens

    def __init__(self, vocab_size, context_length, width, layers, heads, type_vocab_size=1,
                 hidden=None, eps=1e-5):
        super().__init__(vocab_size, context_length, width, layers, heads, type_vocab_size,
                         hidden, eps)

    def position_ids(self, ids):  # (B, L) -> (B, L): padding_idx + 1, + 2, ... over real tokens
        real = (ids != self.pad_id).long()
        return real.cumsum(dim=1) * real + self.pad_id


def load_hf_xlmr(path, context_length=None):
    """XLMRobertaModel holding the weights of a Hugging Face folder (config.json, and
    model.safetensors or pytorch_model.bin of XLMRobertaModel or XLMRobertaForMaskedLM).

    Sizes and eps come from config.json. `context_length`: the longest ids it will take (default
    max_position_embeddings - 2 = 512); only the position rows those need are kept (exact).
    """
    config_file = os.path.join(os.fspath(path), "config.json")
    config, sd, weights = read_hf_folder(path, ("xlm-roberta",),
                                         "a Hugging Face XLM-RoBERTa folder")
    try:
        if (config.get("hidden_act", "gelu") != "gelu" or config.get("pad_token_id", 1) != PAD_ID
                or config.get("position_embedding_type", "absolute") != "absolute"):
            raise ValueError(f"{config_file}: only XLM-R with hidden_act gelu, absolute "
                             f"positions and pad_token_id 1 is supported")
        longest = config["max_position_embeddings"] - PAD_ID - 1
        context_length = context_length or longest
        if context_length > longest:
            raise ValueError(f"{config_file}: context_length {context_length} > the {longest} "
                             f"positions XLM-R was trained with")
        sizes = dict(vocab_size=config["vocab_size"], context_length=context_length,
                     width=config["hidden_size"], layers=config["num_hidden_layers"],
                     heads=config["num_attention_heads"], hidden=config["intermediate_size"],
                     eps=config.get("layer_norm_eps", 1e-5),
                     type_vocab_size=config.get("type_vocab_size", 1))
    except KeyError as e:
        raise ValueError(f"{config_file}: no {e.args[0]!r} (XLM-R's config.json has it)") from None
    model = XLMRobertaModel(**sizes)  # a random init, overwritten below
    sd = {k.removeprefix("roberta."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k.startswith(("embeddings.", "encoder."))
          and not k.endswith(("position_ids", "token_type_ids"))}  # drops pooler.*, lm_head.*
    pos = sd.get("embeddings.position_embeddings.weight")
    if pos is not None and len(pos) == longest + PAD_ID + 1:
        sd["embeddings.position_embeddings.weight"] = pos[:context_length + PAD_ID + 1]
    copy_weights_(model, sd, weights)
    return model


# ----------------------------------------------------------------------------- normalisation

# SentencePiece's nmt_nfkc on top of NFKC: these code points become a space, those are removed.
_NMT_SPACES = (0x09, 0x0A, 0x0C, 0x0D, 0x1680, 0x200B, 0x200C, 0x200E, 0x200F, 0x2028, 0x2029,
               0x2581, 0xFEFF, 0xFFFD)
_NMT_REMOVED = (*range(0x01, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0x8F, 0x9F)
_NMT = {**{c: " " for c in _NMT_SPACES}, **{c: None for c in _NMT_REMOVED}}


def nmt_nfkc(text):
    """SentencePiece's default normalisation: NFKC plus the nmt rules (fullwidth ~ kept)."""
    text = text.translate(_NMT)
    return "\uff5e".join(unicodedata.normalize("NFKC", part) for part in text.split("\uff5e"))


@lru_cache(maxsize=None)
def _compiled(pattern):
    return regex.compile(pattern)


def _steps(spec, kinds, where, what):
    """A normalizer / pre_tokenizer JSON spec -> a flat list of its steps (dicts)."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        key = "normalizers" if what == "normalizer" else "pretokenizers"
        return [s for sub in spec[key] for s in _steps(sub, kinds, where, what)]
    if spec.get("type") not in kinds:
        raise ValueError(f"{where}: {what} {spec.get('type')!r} is not supported (supported: "
                         f"Sequence, {', '.join(kinds)})")
    return [spec]


NORMALIZERS = ("Precompiled", "NFKC", "NFC", "NFKD", "NFD", "Lowercase", "Strip", "Replace")
PRE_TOKENIZERS = ("Metaspace", "WhitespaceSplit")


def normalize(text, steps):
    """Apply HF normaliser steps (see NORMALIZERS) to text."""
    for s in steps:
        kind = s["type"]
        if kind == "Precompiled":  # SentencePiece's charsmap: approximated by nmt_nfkc
            text = nmt_nfkc(text) if s.get("precompiled_charsmap") else text
        elif kind in ("NFKC", "NFC", "NFKD", "NFD"):
            text = unicodedata.normalize(kind, text)
        elif kind == "Lowercase":
            text = text.lower()
        elif kind == "Strip":
            text = text.lstrip() if s.get("strip_left", True) else text
            text = text.rstrip() if s.get("strip_right", True) else text
        else:  # Replace: a literal string or a regex
            pattern, content = s["pattern"], s["content"]
            text = (_compiled(pattern["Regex"]).sub(lambda m: content, text)
                    if "Regex" in pattern else text.replace(pattern["String"], content))
    return text


def _split_before(word, mark):
    """HF's split with MergedWithNext: "▁a▁▁b" -> ["▁a", "▁", "▁b"]; "a▁b" -> ["a", "▁b"]."""
    parts, current = [], ""
    for ch in word:
        if ch == mark and current:
            parts.append(current)
            current = ""
        current += ch
    return parts + [current] if current else parts


def pre_tokenize(text, steps):
    """Apply HF pre-tokeniser steps (Metaspace, WhitespaceSplit) -> the words to segment."""
    words = [text]
    for s in steps:
        if s["type"] == "WhitespaceSplit":
            words = [w for word in words for w in word.split()]
            continue
        mark = s.get("replacement", SPACE)
        scheme = s.get("prepend_scheme")  # newer files; older ones say add_prefix_space
        if scheme is None:
            scheme = "always" if s.get("add_prefix_space", True) else "never"
        out = []
        for i, word in enumerate(words):
            word = word.replace(" ", mark)
            # HF prepends nothing to an empty string; "first": only the text's first part
            if word and not word.startswith(mark) and (
                    scheme == "always" or (scheme == "first" and i == 0)):
                word = mark + word
            out += _split_before(word, mark) if s.get("split", True) else [word]
        words = out
    return [w for w in words if w]


# ----------------------------------------------------------------------------- SentencePiece files

def _varint(buf, pos, where):
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError(f"{where}: truncated or not a protobuf (a varint runs past byte "
                             f"{pos}); expected SentencePiece's model file")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def protobuf_fields(buf, where):
    """Protobuf wire format -> [(field number, value)]: varints as int, length-delimited fields as
    bytes, 32- and 64-bit fields as their 4 / 8 raw bytes (little-endian)."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos, where)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"{where}: wire type {wire} at byte {pos} (not a SentencePiece "
                             "model file)")
        if pos > len(buf) or number == 0:
            raise ValueError(f"{where}: truncated or not a protobuf (field {number} ends past "
                             f"byte {len(buf)}); expected SentencePiece's model file")
        fields.append((number, value))
    return fields


def read_sentencepiece_model(path):
    """sentencepiece.bpe.model -> ([(piece, score, type)], {name, add_dummy_prefix,
    remove_extra_whitespaces}). ModelProto: 1 = pieces, 3 = normalizer_spec; the rest skipped."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        buf = f.read()
    pieces, spec = [], dict(name="nmt_nfkc", add_dummy_prefix=True, remove_extra_whitespaces=True)
    for number, value in protobuf_fields(buf, path):
        if number == 1 and isinstance(value, bytes):  # SentencePiece {1 piece, 2 score, 3 type}
            piece, score, kind = "", 0.0, 1  # proto defaults; type 1 = NORMAL
            for n, v in protobuf_fields(value, path):
                if n == 1 and isinstance(v, bytes):
                    piece = v.decode("utf-8", errors="replace")
                elif n == 2 and isinstance(v, bytes) and len(v) == 4:
                    (score,) = struct.unpack("<f", v)
                elif n == 3 and isinstance(v, int):
                    kind = v
            pieces.append((piece, score, kind))
        elif number == 3 and isinstance(value, bytes):  # NormalizerSpec
            for n, v in protobuf_fields(value, path):
                if n == 1 and isinstance(v, bytes):
                    spec["name"] = v.decode("utf-8", errors="replace")
                elif n == 3 and isinstance(v, int):
                    spec["add_dummy_prefix"] = bool(v)
                elif n == 4 and isinstance(v, int):
                    spec["remove_extra_whitespaces"] = bool(v)
    if not pieces:
        raise ValueError(f"{path}: no pieces (field 1) in it; expected SentencePiece's model file")
    return pieces, spec


# ----------------------------------------------------------------------------- the tokenizer

class XLMRTokenizer:
    """XLM-R's tokenizer with our tokenizers' interface: encode (<s> .. </s> included), decode,
    __call__, sot_id (<s>), eot_id (</s>), pad_id (<pad>), unk_id, mask_id (<mask>), vocab_size.

    vocab: [(piece, score)] in id order; `normalizer` / `pre_tokenizer`: tokenizer.json's specs
    (None: no normalisation / SentencePiece's Metaspace). `state()` round-trips through
    checkpoints: XLMRTokenizer(**state).
    """

    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

    def __init__(self, vocab, unk_id, normalizer=None, pre_tokenizer=None, where="XLMRTokenizer"):
        self.vocab = [(str(p), float(s)) for p, s in vocab]
        self.unk_id, self.where = unk_id, where
        self.normalizer, self.pre_tokenizer = normalizer, pre_tokenizer or METASPACE
        self._norm = _steps(normalizer, NORMALIZERS, where, "normalizer")
        self._pre = _steps(self.pre_tokenizer, PRE_TOKENIZERS, where, "pre_tokenizer")
        ids = {p: i for i, (p, _) in enumerate(self.vocab)}  # a repeated piece: its last id (HF)
        missing = [t for t in self.SPECIALS if t not in ids]
        if missing or not 0 <= unk_id < len(self.vocab):
            raise ValueError(f"{where}: the vocabulary needs {', '.join(self.SPECIALS)} and "
                             f"unk_id inside it (XLM-R's layout); missing: "
                             f"{', '.join(missing) or 'none'}")
        self.sot_id, self.pad_id, self.eot_id, _, self.mask_id = (ids[t] for t in self.SPECIALS)
        self.vocab_size = len(self.vocab)
        specials = {ids[t] for t in self.SPECIALS} | {unk_id}
        # HF splits special tokens out of the text before its model runs; they never match here
        self.pieces = {p: (i, self.vocab[i][1]) for p, i in ids.items() if i not in specials}
        self.max_len = max(map(len, self.pieces), default=1)
        self.unk_score = min(s for _, s in self.vocab) - UNK_PENALTY  # min over all (HF)
        self._cache = {}

    def __repr__(self):
        return f"XLMRTokenizer(vocab_size={self.vocab_size}, {self.where})"

    # -- files
    @classmethod
    def from_pretrained(cls, folder):
        """A Hugging Face XLM-R folder: tokenizer.json, or sentencepiece.bpe.model without one."""
        folder = os.fspath(folder)
        for name, read in (("tokenizer.json", cls.from_tokenizer_json),
                           ("sentencepiece.bpe.model", cls.from_sentencepiece)):
            if os.path.isfile(os.path.join(folder, name)):
                return read(os.path.join(folder, name))
        raise FileNotFoundError(f"{os.path.join(folder, 'tokenizer.json')}: no such file, nor "
                                "sentencepiece.bpe.model (XLM-R's tokenizer files)")

    @classmethod
    def from_tokenizer_json(cls, path):
        """HF's tokenizer.json with a Unigram model (vocab [[piece, score], ...], unk_id)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
            model = spec["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({type(e).__name__})") \
                from None
        if model.get("type") != "Unigram" or model.get("byte_fallback"):
            raise ValueError(f"{path}: model type {model.get('type')!r}"
                             f"{' with byte_fallback' if model.get('byte_fallback') else ''}, "
                             "expected 'Unigram' (XLM-R's SentencePiece model)")
        return cls(model["vocab"], model.get("unk_id", 3), spec.get("normalizer"),
                   spec.get("pre_tokenizer"), where=path)

    @classmethod
    def from_sentencepiece(cls, path):
        """sentencepiece.bpe.model with fairseq's ids, as HF's XLMRobertaConverter lays them out:
        <s> <pad> </s> <unk>, the pieces after SentencePiece's first three, <mask>."""
        path = os.fspath(path)
        pieces, spec = read_sentencepiece_model(path)
        if [p for p, _, _ in pieces[:3]] != ["<unk>", "<s>", "</s>"]:
            raise ValueError(f"{path}: the first pieces are {[p for p, _, _ in pieces[:3]]}, "
                             "expected <unk> <s> </s> (XLM-R's SentencePiece model)")
        vocab = ([("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
                 + [(p, s) for p, s, _ in pieces[3:]] + [("<mask>", 0.0)])
        # SentencePiece: charsmap, then strip and collapse spaces, then the dummy "▁" prefix
        norm = {"nmt_nfkc": [{"type": "Precompiled", "precompiled_charsmap": "nmt_nfkc"}],
                "nfkc": [{"type": "NFKC"}]}.get(spec["name"], [])
        if spec["remove_extra_whitespaces"]:
            norm += [{"type": "Strip", "strip_left": True, "strip_right": True},
                     {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
        pre = {**METASPACE, "prepend_scheme": "always" if spec["add_dummy_prefix"] else "never"}
        return cls(vocab, 3, {"type": "Sequence", "normalizers": norm}, pre, where=path)

    def state(self):
        """What rebuilds this tokenizer: XLMRTokenizer(**state) (checkpoints keep it)."""
        return dict(vocab=[list(v) for v in self.vocab], unk_id=self.unk_id,
                    normalizer=self.normalizer, pre_tokenizer=self.pre_tokenizer,
                    where=self.where)

    # -- encoding
    def segment(self, word):
        """Viterbi over the pieces: the ids of the best-scoring segmentation of one word."""
        if word in self._cache:
            return self._cache[word]
        n = len(word)
        best = [None] * (n + 1)  # best[end] = (score, start, id) of the best path ending there
        best[0] = (0.0, 0, None)
        for start in range(n):
            base, single = best[start][0], False
            for end in range(start + 1, min(n, start + self.max_len) + 1):  # shortest first
                hit = self.pieces.get(word[start:end])
                if hit is None:
                    continue
                single = single or end == start + 1
                if best[end] is None or base + hit[1] > best[end][0]:  # ties: first path stays
                    best[end] = (base + hit[1], start, hit[0])
            if not single:  # no piece covers this character alone: <unk>, SentencePiece's score
                if best[start + 1] is None or base + self.unk_score > best[start + 1][0]:
                    best[start + 1] = (base + self.unk_score, start, self.unk_id)
        spans, end = [], n
        while end > 0:
            _, start, i = best[end]
            spans.append((start, end, i))
            end = start
        ids, unknown = [], ""
        for start, end, i in reversed(spans):  # fuse runs of unknown characters into one <unk>
            if i == self.unk_id:
                unknown += word[start:end]
                continue
            if unknown:
                ids.append(self.pieces.get(unknown, (self.unk_id,))[0])
                unknown = ""
            ids.append(i)
        if unknown:
            ids.append(self.pieces.get(unknown, (self.unk_id,))[0])
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def tokenize(self, text):
        """The words the model segments: normalised, with "▁" for spaces."""
        return pre_tokenize(normalize(text, self._norm), self._pre)

    def encode(self, text):
        """<s> ids </s>, HF's input_ids for `text` (no truncation)."""
        return [self.sot_id, *(i for w in self.tokenize(text) for i in self.segment(w)),
                self.eot_id]

    def decode(self, ids):
        """Text of `ids`: <s>, <pad>, <mask> dropped, stops at </s>, "▁" read as a space."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        pieces = []
        for i in ids:
            if i == self.eot_id:
                break
            if i in (self.sot_id, self.pad_id, self.mask_id):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            pieces.append(self.vocab[i][0])
        return "".join(pieces).replace(SPACE, " ").strip()

    def __call__(self, texts, context_length=77):
        """(N, L) int64: <s> ids </s> then <pad> (1). A text too long is cut so that </s> still
        ends it (HF's truncation). A single string gives N = 1."""
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: need at least 2 (<s>, </s>)")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)  # (N, L)
        for row, text in zip(out, texts):
            ids = self.encode(text)
            if len(ids) > context_length:
                ids = ids[:context_length - 1] + [self.eot_id]
            row[:len(ids)] = torch.tensor(ids)
        return out

