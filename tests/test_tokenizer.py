"""tokenizer.py: OpenAI's ids, cleaning, hand-computed merges, training vs brute force, batching."""
import gzip
import importlib.util
import os
import random
import warnings
from collections import Counter

import pytest
import torch

import tokenizer as T
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.openai()


# ---------------------------------------------------------------- OpenAI's vectors
def test_openai_vectors(tok):
    assert tok(["a photo of a dog."])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269,
                                                         49407]
    assert tok("Hello, world!")[0, :6].tolist() == [49406, 3306, 267, 1002, 256, 49407]
    assert tok("it's 2 cats &amp; 3   dogs")[0, :9].tolist() == [49406, 585, 568, 273, 3989, 261,
                                                                274, 3255, 49407]
    assert tok("")[0, :2].tolist() == [49406, 49407]
    assert tok(" ".join(["word"] * 100), context_length=77)[0].tolist() == (
        [49406] + [2653] * 75 + [49407])


def test_specials(tok):
    assert (tok.sot_id, tok.eot_id, tok.mask_id, tok.vocab_size) == (49406, 49407, 49408, 49409)
    assert len(tok.merges) == 48894 == T.N_OPENAI_MERGES
    assert tok.encode("") == [] and tok.encode(" \t\n ") == []
    # OpenAI's code reads the literal special strings as the special ids
    assert tok.encode("<|startoftext|>a<|endoftext|>") == [49406, 320, 49407]


# ---------------------------------------------------------------- cleaning (ftfy subset)
def test_cleaning(tok):
    assert tok.encode("\u201cit\u2019s\u201d \u2018ok\u2019") == tok.encode("\"it's\" 'ok'")
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")        # NFC
    assert T.clean("Ｆｕｌｌ\u3000ｗｉｄｔｈ ﬁne Ĳ") == "full width fine ij"
    assert T.clean("a\x00b\x7fc \x1b[31mred\x1b[0m \ufeffx") == "abc red x"
    assert T.clean("a\x93b\x94") == 'a"b"'                            # C1 read as Windows-1252
    assert T.clean("A  \t B\n\nC ") == "a b c"
    assert T.clean("\ud83d\udc36 \ud83d") == "\U0001f436 \ufffd"        # surrogates repaired
    # html: ftfy decodes `&...;` until nothing changes, then OpenAI unescapes twice more ...
    assert T.clean("fish &amp;amp;amp; chips &EACUTE;") == "fish & chips é"
    # ... but ftfy stops at the first line holding "<", leaving only the two html.unescape calls
    assert T.clean("a < b &amp;amp;amp; c") == "a < b &amp; c"
    assert T.clean("x &amp;amp;amp;\ny < &amp;amp;amp;") == "x & y < &amp;"


def test_ascii_pattern_matches_unicode_pattern():
    rng = random.Random(0)
    alphabet = "ab'sSltdmrve X9 0!?.,-<|>&#;\"\t"
    for _ in range(2000):
        text = T.clean("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
        assert T.ASCII_PATTERN.findall(text) == T.PATTERN.findall(text), text


# ---------------------------------------------------------------- round trips and decode
TEXTS = ["A photo of a Dog.", "Zürich, São Paulo & 北京 東京タワー!", "emoji 🐶👍🏽👨‍👩‍👧 🇫🇷 ❤️",
         "it's 10:30pm, $3.50 (½ off) -- 2024-01-01...", "fish &amp; chips &lt;3 &quot;yum&quot;",
         "Москва ελληνικά العربية हिन्दी", "weird\t\u00a0spaces\u2003here", "'LL 'S don't",
         "x" * 300, "née naïve ﬁancé"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    decoded = tok.decode(ids)
    # decode gives the cleaned, lower-cased text, with a space at every word end
    assert decoded.replace(" ", "") == T.clean(text).replace(" ", "")
    assert tok.encode(decoded) == ids


def test_decode(tok):
    assert tok.decode(tok.encode("Hello   World")) == "hello world"
    assert tok.decode(tok.encode("fish &amp; chips")) == "fish & chips"
    row = tok(["a photo of a dog."], context_length=16)[0]      # [SOT] ... [EOT] 0 0 0 ...
    assert tok.decode(row) == "a photo of a dog ."               # padding 0 would be "!"
    masked = [tok.sot_id, 320, tok.mask_id, 1929, tok.eot_id, 0, 0]
    assert tok.decode(masked) == "a dog"
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


# ---------------------------------------------------------------- a merges file worked by hand
HAND_MERGES = ["l o</w>", "h e", "l l", "he l", "hel lo</w>"]   # ids 512 + rank: 512 ... 516


def _hand_ids():
    byte = {c: i for i, c in enumerate(T.bytes_to_unicode().values())}   # "!" -> 0, "a" -> 64
    return {"l": byte["l"], "l</w>": 256 + byte["l"], "!</w>": 256 + byte["!"]}


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_hand_made_merges(tmp_path, suffix):
    text = "#version: 0.2\n" + "\n".join(HAND_MERGES) + "\n\n"
    path = tmp_path / ("m" + suffix)
    path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    t = Tokenizer.from_merges(path)
    ids = _hand_ids()
    assert ids == {"l": 75, "l</w>": 331, "!</w>": 256}   # bytes in order from "!" (0x21)
    assert (t.sot_id, t.eot_id, t.mask_id, t.vocab_size) == (517, 518, 519, 520)
    # "hello" = h e l l o</w>. Ranks of its pairs: (h,e) 1, (l,l) 2, (l,o</w>) 0 -> merge rank 0:
    # h e l lo</w>; best now (h,e) 1: he l lo</w>; then (he,l) 3: hel lo</w>; then rank 4: one
    # symbol "hello</w>" = 512 + 4. Rank 2 (l,l) never applies: "l o</w>" came first.
    assert t.encode("hello") == [516]
    # "hell" = h e l l</w>: (h,e) 1 -> he l l</w>; (he,l) 3 -> hel l</w>; no merge (hel,l</w>).
    assert t.encode("hell") == [515, 331]
    # "lll" = l l l</w>: (l,l) 2 merges the left pair only: ll l</w>
    assert t.encode("lll") == [514, 331]
    # "llll" = l l l l</w>: all non-overlapping (l,l) left to right: ll + l + l</w>
    assert t.encode("llll") == [514, 75, 331]
    # pre-tokenisation splits "hell!" into "hell" and "!"; "!" alone is "!</w>"
    assert t.encode("Hello hell!") == [516, 515, 331, 256]
    assert t.decode([516, 515, 331, 256]) == "hello hell !"


def test_bad_merges_file(tmp_path):
    (tmp_path / "bad.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="line 2"):
        Tokenizer.from_merges(tmp_path / "bad.txt")
    with pytest.raises(ValueError):
        Tokenizer([("ab", "c")])                   # "ab" was never made by an earlier merge
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_merges(tmp_path / "missing.txt.gz")


# ---------------------------------------------------------------- batching and truncation
def test_batching_and_truncation(tok):
    out = tok(["a dog", "", "a photo of a dog."], context_length=8)
    assert out.dtype == torch.long and out.shape == (3, 8)
    assert out.tolist() == [[49406, 320, 1929, 49407, 0, 0, 0, 0],
                            [49406, 49407, 0, 0, 0, 0, 0, 0],
                            [49406, 320, 1125, 539, 320, 1929, 269, 49407]]   # exactly fits
    assert tok("a photo of a dog.", context_length=7).tolist() == [
        [49406, 320, 1125, 539, 320, 1929, 49407]]            # cut: last kept position is EOT
    assert tok("a dog").shape == (1, 77)
    assert tok([]).shape == (0, 77)
    with pytest.raises(ValueError):
        tok("a", context_length=1)


def test_cache_is_bounded(tok, monkeypatch):
    monkeypatch.setattr(T, "CACHE_SIZE", 5)
    fresh = Tokenizer(tok.merges)
    words = [f"word{c}" for c in "abcdefghijklmnop"]
    assert [fresh.encode(w) for w in words * 2] == [tok.encode(w) for w in words * 2]
    assert len(fresh.cache) <= 5


# ---------------------------------------------------------------- training
def _corpus(n, seed=0):
    rng = random.Random(seed)
    nouns = "dog cat man woman car tree house bird horse boat beach street café".split()
    adjs = "red blue small big old happy running sitting wooden".split()
    return [f"a {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(['on', 'in', 'near'])} the "
            f"{rng.choice(nouns)}{rng.choice(['.', '!', ''])} {rng.randint(0, 99)}"
            for _ in range(n)]


def _brute_force_merges(texts, n_merges):
    """Textbook BPE: recount every pair after every merge; most frequent pair first, ties broken by
    the order in which the two symbols were created (as Tokenizer.train does)."""
    words = Counter()
    b2u = T.bytes_to_unicode()
    for word in (w for t in texts for w in T.pretokenize(t)):
        syms = [b2u[b] for b in word.encode()]
        words[tuple(syms[:-1] + [syms[-1] + "</w>"])] += 1
    order = {s: i for i, s in enumerate([*b2u.values(), *(s + "</w>" for s in b2u.values())])}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], order[p[0]], order[p[1]]))
        merges.append((a, b))
        order.setdefault(a + b, len(order))
        new_words = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += f
        words = new_words
    return merges


def test_train_matches_brute_force():
    texts = _corpus(300)
    trained = Tokenizer.train(texts, vocab_size=512 + 3 + 60)
    assert trained.merges == _brute_force_merges(texts, 60)
    assert trained.vocab_size == 575 and trained.mask_id == 574
    shuffled = texts[:]
    random.Random(1).shuffle(shuffled)
    assert Tokenizer.train(shuffled, vocab_size=575).merges == trained.merges   # order-free
    # frequent words end up as one token
    assert len(trained.encode("the dog")) == 2


@pytest.mark.parametrize("name", ["vocab.txt", "vocab.txt.gz"])
def test_train_save_load(tmp_path, name):
    trained = Tokenizer.train(_corpus(500), vocab_size=560)
    trained.save(tmp_path / name)
    loaded = Tokenizer.from_merges(tmp_path / name)
    assert loaded.merges == trained.merges and loaded.vocab_size == trained.vocab_size
    held_out = _corpus(50, seed=1) + TEXTS
    assert torch.equal(loaded(held_out), trained(held_out))
    assert all(loaded.decode(loaded.encode(t)) == trained.decode(trained.encode(t))
               for t in held_out)
    if name.endswith(".gz"):
        assert (tmp_path / name).read_bytes()[:2] == b"\x1f\x8b"
        trained.save(tmp_path / "again.gz")          # deterministic bytes (gzip mtime = 0)
        assert (tmp_path / "again.gz").read_bytes() == (tmp_path / name).read_bytes()


def test_train_tiny_corpus():
    with pytest.warns(UserWarning, match="only 1 merges"):
        t = Tokenizer.train(["ab", "AB ab"], vocab_size=1000)
    assert t.merges == [("a", "b</w>")] and t.vocab_size == 516
    assert t.encode("ab") == [512]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tokenizer.train([], vocab_size=515).merges == []    # nothing asked: no warning
    with pytest.raises(ValueError):
        Tokenizer.train(["ab"], vocab_size=100)


# ---------------------------------------------------------------- optional: OpenAI's reference
def test_matches_openai_reference(tok):
    """Same ids as OpenCLIP's copy of OpenAI's SimpleTokenizer on varied strings. Needs open_clip
    and ftfy (not project dependencies). The tokenizer module is loaded on its own: importing the
    whole open_clip package takes seconds."""
    ftfy = pytest.importorskip("ftfy")
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    ref_spec = importlib.util.spec_from_file_location(
        "_openclip_tokenizer", os.path.join(os.path.dirname(spec.origin), "tokenizer.py"))
    ref_module = importlib.util.module_from_spec(ref_spec)
    ref_spec.loader.exec_module(ref_module)
    ref = ref_module.SimpleTokenizer()
    rng = random.Random(0)
    pieces = [*"abcxyz!?.,'\"&;#<>-  ", "dog", "Photo", "'s", "'LL", "&amp;", "&amp;amp;", "&lt;",
              "&EACUTE;", "&#8217;", "&#x27;", "&nbsp;", "&bogus;", "\u201c", "\u2019", "\u02bc",
              "\u00a0", "\u3000", "\t", "\n", "\r\n", "\x85", "\x92", "\x00", "\x1b[1m", "\ufeff",
              "e\u0301", "Å", "ﬁ", "ＡＢ", "ｶﾀ", "İ", "ß", "ΣΑΣ", "北京", "😀", "👍🏽", "🇫🇷", "①", "٣",
              "2024", "$3.50", "½", "\ud83d\ude00", "\udca9", "cafÃ©", "â€™"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    texts += ["".join(chr(rng.randint(0x20, 0x2FFFF)) for _ in range(8)) for _ in range(500)]

    def clean_without_mojibake_repair(text):
        text = ref_module.html.unescape(ref_module.html.unescape(
            ftfy.fix_text(text, fix_encoding=False)))
        return " ".join(text.split()).lower()

    mismatches = [t for t in texts if ref.encode(t) != tok.encode(t)]
    # the only differences allowed: ftfy's mojibake repair, which we leave out
    assert [t for t in mismatches if T.clean(t) != clean_without_mojibake_repair(t)] == []
    plain = [t for t in texts if "Ã" not in t and "â" not in t and "\x92" not in t]
    assert sum(ref.encode(t) != tok.encode(t) for t in plain) < 0.01 * len(plain)
