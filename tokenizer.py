"""Byte-level BPE tokenizer giving the same ids as OpenAI CLIP, plus a [MASK] token and a trainer.

CLIP (Radford et al., 2021, Sec. 2.4) reads text as "a lower-cased byte pair encoding (BPE)
representation with a 49,152 vocab size", bracketed by [SOS] and [EOS]. DeCLIP (Sec. 3.2,
Appendix B) adds text self-supervision by masked language modelling, so we append one [MASK] id
*after* OpenAI's ids: every OpenAI id is unchanged and released CLIP weights keep working.

Pipeline (each step as in OpenAI's `simple_tokenizer.py`):
  1. clean: the ftfy fixes listed below, `html.unescape` twice, whitespace collapsed, lower-cased;
  2. pre-tokenise with `PATTERN` (contractions, letter runs, single digits, punctuation runs);
  3. map each word's UTF-8 bytes to printable characters (`bytes_to_unicode`), mark its last symbol
     with `</w>`, and apply the merges greedily by rank (lowest rank first, all occurrences).
Vocabulary: 256 bytes, 256 bytes + `</w>`, one symbol per merge, then SOT, EOT, MASK. With OpenAI's
48,894 merges: sot_id 49406, eot_id 49407, mask_id 49408, vocab_size 49409.

ftfy: OpenAI runs `ftfy.fix_text` first. We re-implement the fixes that change real captions: HTML
entity decoding (ftfy's rules: only `&...;` forms, repeated, skipped from the first line holding a
"<"), C1 controls read as Windows-1252, Latin ligatures, full-width forms, curly quotes -> straight,
surrogate repair, terminal escapes and control characters removed, NFC normalisation. Not
re-implemented: mojibake repair (e.g. "cafÃ©" -> "café", "â€™" -> "'"), which needs ftfy's
statistical heuristics; such text gets different ids from OpenAI's. OpenCLIP's copy of the tokenizer
spells the specials "<start_of_text>"/"<end_of_text>"; we match OpenAI's "<|startoftext|>" (a text
containing the literal special string encodes to the special id, as in OpenAI's code).

Shapes: N texts, L context length.

Usage:
    tok = Tokenizer.openai()
    tok.encode("a photo of a dog.")       # [320, 1125, 539, 320, 1929, 269]
    ids = tok(["a dog", "a cat"])          # (N, L) = (2, 77): [SOT] ids [EOT] 0 0 ...
    tok.decode(ids[0])                     # "a dog"
    small = Tokenizer.train(captions, vocab_size=8192); small.save("vocab.txt.gz")
    Tokenizer.from_merges("vocab.txt.gz").encode("a dog") == small.encode("a dog")  # True

Caching: `encode` keeps the ids of every word it has seen in a dict, bounded at `CACHE_SIZE` words
(cleared when full: simpler than an LRU, and re-filling costs little since words repeat heavily).

Left out: OpenCLIP's other cleaning modes ("canonicalize") and random/syntax-mask truncation,
`<|...|>` specials beyond SOT/EOT/MASK, and exact `decode` spacing (decode rejoins words with single
spaces, so "dog." decodes to "dog .").
"""
import gzip
import heapq
import html
import html.entities
import re
import unicodedata
import warnings
from array import array
from collections import Counter, defaultdict
from pathlib import Path

import regex
import torch

N_OPENAI_MERGES = 49152 - 256 - 2  # OpenAI keeps 48,894 merges of the 262,144 in its file
CACHE_SIZE = 1 << 18               # words kept by Tokenizer.encode before its cache is cleared
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
# The same split for ASCII text once cleaned (lower-case, single spaces), with the stdlib `re`,
# which is about twice as fast as `regex` on such text.
ASCII_PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]"
                           r"|[^\sa-z0-9]+")
OPENAI_VOCAB = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, so that BPE symbols are plain strings without
    whitespace or control characters. Printable Latin-1 bytes map to themselves; the other 68 bytes
    map, in byte order, to chr(256), chr(257), ... The dict's order is the vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


# ---------------------------------------------------------------- cleaning (ftfy subset + OpenAI)
def _compose(*tables: dict) -> dict:
    """One str.translate table equal to applying `tables` one after the other."""
    out = {}
    for key in set().union(*tables):
        s = chr(key)
        for table in tables:
            s = s.translate(table)
        out[key] = s
    return out


def _sloppy_cp1252(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d: ftfy keeps them as they are
        return chr(byte)


_C1 = {c: _sloppy_cp1252(c) for c in range(0x80, 0xA0)}
_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"})
_WIDTH = {0x3000: " ", **{c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
                         if unicodedata.normalize("NFKC", chr(c)) != chr(c)}}
_QUOTES = {**{c: "'" for c in (0x2BC, 0x2018, 0x2019, 0x201A, 0x201B)},
           **{c: '"' for c in range(0x201C, 0x2020)}}
_FIXES = _compose(_C1, _LIGATURES, _WIDTH, _QUOTES)  # ftfy applies these four in this order
_CONTROL = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                          *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)])
_SURROGATE_PAIR = regex.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = regex.compile("[\ud800-\udfff]")
_ANSI = regex.compile("\x1b\\[[0-9;]*[a-zA-Z]")
_ENTITY = regex.compile(r"&#?[0-9A-Za-z]{1,24};")


def _entity(m) -> str:
    s = m.group(0)
    if s[1] == "#":  # numeric: keep it unless html.unescape consumes the whole reference
        out = html.unescape(s)
        return s if ";" in out else out
    name, table = s[1:], html.entities.html5
    if name in table:
        return table[name]
    # ftfy also reads all-caps spellings of lower-case names ("&EACUTE;" -> "É")
    low = name.lower()
    if name == name.upper() and low in table and html.unescape(s) == s:
        return table[low].upper()
    return s


def _join_surrogates(m) -> str:
    high, low = map(ord, m.group(0))
    return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))


def _fix_line(text: str, unescape: bool) -> str:
    while True:  # like ftfy, repeat until nothing changes ("&amp;quot;" -> "&quot;" -> '"')
        before = text
        if unescape and "&" in text:
            text = _ENTITY.sub(_entity, text)
        if not (text.isascii() and text.isprintable()):  # fast path for plain ASCII captions
            text = text.translate(_FIXES)
            if _SURROGATE.search(text):
                text = _SURROGATE_PAIR.sub(_join_surrogates, text)
                text = _SURROGATE.sub("\ufffd", text)
            if "\x1b" in text:
                text = _ANSI.sub("", text)
            text = unicodedata.normalize("NFC", text.translate(_CONTROL))
        if text == before:
            return text


def clean(text: str) -> str:
    """OpenAI's cleaning: ftfy (our subset), html.unescape twice, whitespace collapsed, lower."""
    lines, unescape = [], True
    for line in text.split("\n"):
        unescape = unescape and "<" not in line  # ftfy: a "<" suggests real HTML; stop decoding
        lines.append(_fix_line(line, unescape))
    text = html.unescape(html.unescape("\n".join(lines)))
    return " ".join(text.split()).lower()


def pretokenize(text: str) -> list[str]:
    """Cleaned text split into the words BPE works on (OpenAI's `re.findall(pat, text)`)."""
    text = clean(text)
    return (ASCII_PATTERN if text.isascii() else PATTERN).findall(text)


# ---------------------------------------------------------------- the tokenizer
class Tokenizer:
    """Byte-level BPE defined by `merges`, a list of (left, right) symbol pairs in rank order
    (strings "left right", as stored in checkpoints, are accepted too)."""

    def __init__(self, merges):
        self.merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols]
        known = set(vocab)
        for i, pair in enumerate(self.merges):
            if len(pair) != 2 or pair[0] not in known or pair[1] not in known:
                raise ValueError(f"merge {i} {pair!r}: expected two symbols made by earlier merges")
            vocab.append(pair[0] + pair[1])
            known.add(vocab[-1])
        self.sot_id, self.eot_id = len(vocab), len(vocab) + 1
        self.mask_id, self.vocab_size = len(vocab) + 2, len(vocab) + 3
        vocab += [*SPECIALS, "<|mask|>"]
        self.encoder = {s: i for i, s in enumerate(vocab)}  # a repeated symbol takes its last id
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        # per id, the bytes it decodes to; a word end becomes a space
        decoder = {v: bytes([k]) for k, v in self.byte_encoder.items()}
        self._bytes = [b"".join(decoder[c] for c in s[:-4]) + b" " if s.endswith("</w>")
                       else b"".join(decoder[c] for c in s) for s in vocab[:self.sot_id]]
        self._byte_syms = [self.byte_encoder[b] for b in range(256)]
        self.cache: dict[str, list[int]] = {}

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"

    # ---- loading / saving
    @classmethod
    def from_merges(cls, path, max_merges: int = N_OPENAI_MERGES) -> "Tokenizer":
        """Read OpenAI's merges format (gzip or plain text): a header line, then one "left right"
        pair per line. Like OpenAI, only the first `max_merges` (48,894) are used."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: merges file not found (OpenAI's is assets/"
                                    "bpe_simple_vocab_16e6.txt.gz; Tokenizer.save writes others)")
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic number, whatever the file is called
            raw = gzip.decompress(raw)
        lines = [ln for ln in raw.decode("utf-8").split("\n")[1:] if ln.strip()][:max_merges]
        for n, line in enumerate(lines, start=2):
            if len(line.split()) != 2:
                raise ValueError(f"{path}: line {n} is {line!r}, expected two symbols 'left right'")
        return cls([tuple(ln.split()) for ln in lines])

    @classmethod
    def openai(cls) -> "Tokenizer":
        """OpenAI CLIP's vocabulary, from assets/bpe_simple_vocab_16e6.txt.gz next to this file."""
        if not OPENAI_VOCAB.is_file():
            raise FileNotFoundError(f"{OPENAI_VOCAB} not found: copy assets/ from declip-mini "
                                    "(the file ships with OpenAI CLIP and OpenCLIP)")
        return cls.from_merges(OPENAI_VOCAB)

    def save(self, path) -> None:
        """Write the merges in the format `from_merges` reads (gzip if `path` ends in .gz). A vocab
        above OpenAI's size reloads fully with `from_merges(path, max_merges=len(tok.merges))`."""
        text = "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges]) + "\n"
        data = text.encode("utf-8")
        if str(path).endswith(".gz"):
            data = gzip.compress(data, mtime=0)  # mtime=0: the same merges give the same bytes
        Path(path).write_bytes(data)

    # ---- encoding
    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenised word: merge the lowest-ranked adjacent pair until none left."""
        if word in SPECIALS:
            return [self.encoder[word]]
        syms = [self._byte_syms[b] for b in word.encode("utf-8")]
        syms[-1] += "</w>"
        ranks, inf = self.ranks, len(self.merges)
        while len(syms) > 1:
            pair_ranks = [ranks.get(p, inf) for p in zip(syms, syms[1:])]
            best = min(pair_ranks)
            if best == inf:
                break
            left, right = self.merges[best]
            merged, i = [], 0
            while i < len(syms):  # all non-overlapping occurrences, left to right
                if i + 1 < len(syms) and syms[i] == left and syms[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        return [self.encoder[s] for s in syms]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without SOT/EOT."""
        ids, cache = [], self.cache
        for word in pretokenize(text):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                word_ids = cache[word] = self._bpe(word)
            ids.extend(word_ids)
        return ids

    def decode(self, ids) -> str:
        """Text of `ids` (a list or 1-D tensor): SOT and MASK are dropped, and decoding stops at the
        first EOT (what follows is padding). Gives the cleaned text with words split by spaces."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eot_id:
                break
            if i in (self.sot_id, self.mask_id):
                continue
            if not 0 <= i < self.sot_id:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            out.append(self._bytes[i])
        return b"".join(out).decode("utf-8", errors="replace").rstrip(" ")

    def __call__(self, texts, context_length: int = 77) -> torch.Tensor:
        """(N, L) int64 ids: [SOT] ids [EOT], zero-padded. A text too long is cut to L tokens and
        its last kept position set to EOT (as OpenAI). A single string gives N = 1."""
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: need at least 2 (SOT and EOT)")
        if isinstance(texts, str):
            texts = [texts]
        n, L = len(texts), context_length
        out = array("q", bytes(8 * n * L))  # int64 zeros; filling an array beats torch.tensor(list)
        for i, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)[:L - 2], self.eot_id]
            out[i * L:i * L + len(ids)] = array("q", ids)
        if n == 0:
            return torch.zeros(0, L, dtype=torch.long)
        return torch.frombuffer(out, dtype=torch.long).view(n, L).clone()  # (N, L)

    # ---- training
    @classmethod
    def train(cls, texts, vocab_size: int, verbose: bool = False) -> "Tokenizer":
        """Learn merges from `texts` (an iterable of captions) until the vocabulary (512 byte
        symbols + merges + SOT, EOT, MASK) has `vocab_size` entries, or no pair is left to merge.

        Standard BPE (Sennrich et al., 2016) on unique words: count words once, then repeatedly
        merge the most frequent adjacent pair (ties: the pair of smallest symbol ids). Pair counts
        are updated only in the words that contain the merged pair, and a heap with lazy deletion
        finds the next best pair, so a step costs what it changes rather than a corpus pass."""
        n_merges = vocab_size - 512 - 3
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size}: must be >= 515 (512 bytes + 3 specials)")
        # symbols are ints while training: 0-255 bytes, 256-511 bytes + </w>, then one per merge
        words, freqs = _words_as_symbols(texts)
        symbols = [*bytes_to_unicode().values()]
        symbols += [s + "</w>" for s in symbols]
        symbol_id = {s: i for i, s in enumerate(symbols)}
        pair_counts, where = _count_pairs(words, freqs)
        heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
        heapq.heapify(heap)

        merges = []
        while len(merges) < n_merges:
            best = _pop_most_frequent(heap, pair_counts)
            if best is None:
                break
            a, b = best
            merges.append((symbols[a], symbols[b]))
            # ("ab", "c") and ("a", "bc") both make "abc": one symbol, as when encoding strings
            new = symbol_id.setdefault(symbols[a] + symbols[b], len(symbols))
            if new == len(symbols):
                symbols.append(symbols[a] + symbols[b])
            for pair in _merge_everywhere(a, b, new, words, freqs, pair_counts, where):
                heapq.heappush(heap, (-pair_counts[pair], *pair))  # only these can have grown
            if verbose and len(merges) % 1000 == 0:
                print(f"tokenizer.train: {len(merges)}/{n_merges} merges, last {merges[-1]}")
        if len(merges) < n_merges:
            warnings.warn(f"tokenizer.train: the corpus allows only {len(merges)} merges; "
                          f"vocab_size is {512 + len(merges) + 3}, not {vocab_size}")
        return cls(merges)


# ---------------------------------------------------------------- training: the steps of BPE
def _words_as_symbols(texts) -> tuple[list[list[int]], list[int]]:
    """The unique words of `texts` as lists of symbol ids (a byte's vocabulary position, + 256 on
    the last one: the `</w>` form), and how often each occurs."""
    counts = Counter()
    for text in texts:
        counts.update(pretokenize(text))
    order = {b: i for i, b in enumerate(bytes_to_unicode())}  # byte -> vocabulary position
    words, freqs = [], []
    for word, freq in counts.items():
        if word in SPECIALS:
            continue
        w = [order[b] for b in word.encode("utf-8")]
        w[-1] += 256
        words.append(w)
        freqs.append(freq)
    return words, freqs


def _count_pairs(words, freqs):
    """-> ({(a, b): weighted number of occurrences}, {(a, b): indices of the words holding it}).
    The second may go stale (list words that no longer hold the pair): merging skips those."""
    pair_counts, where = defaultdict(int), defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)
    return pair_counts, where


def _pop_most_frequent(heap, pair_counts):
    """Pop the heap's most frequent pair (a, b) (ties: the smallest ids), or None when no pair
    is left. Entries are (-count, a, b) and may be stale: counts only go down, so an entry whose
    count has dropped is pushed back with its true count."""
    while heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count <= 0:
            continue
        if count != -neg:
            heapq.heappush(heap, (-count, a, b))
            continue
        return a, b
    return None


def _merge_pair(w, a, b, new):
    """Word w (symbol ids) with every non-overlapping (a, b), left to right, replaced by new."""
    merged, i = [], 0
    while i < len(w):
        if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
            merged.append(new)
            i += 2
        else:
            merged.append(w[i])
            i += 1
    return merged


def _merge_everywhere(a, b, new, words, freqs, pair_counts, where):
    """Merge (a, b) into `new` in every word holding it, updating `words`, `pair_counts` and
    `where` in place. -> the pairs that hold `new` (the only ones whose counts grew)."""
    new_pairs = set()
    for wi in where.pop((a, b)):
        w, f = words[wi], freqs[wi]
        merged = _merge_pair(w, a, b, new)
        if len(merged) == len(w):  # a stale entry of `where`
            continue
        for pair in zip(w, w[1:]):
            pair_counts[pair] -= f
        for pair in zip(merged, merged[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)
            if new in pair:
                new_pairs.add(pair)
        words[wi] = merged
    del pair_counts[(a, b)]
    return new_pairs
