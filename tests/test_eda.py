"""Tests for eda.py: each EDA operation against brute-force expectations, the offline WordNet table,
determinism, and captions that could break a naive implementation."""
import collections
import gzip
import importlib.util
import os
import random
import string
import subprocess
import sys
import time

import pytest

import eda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = "A young man rides a red bicycle down the street next to two dogs."

# ~50 frequent caption words (nouns, verbs in caption forms, adjectives, plurals, irregular forms).
COMMON_WORDS = """
dog car man woman red running girl boy child children people men women person photo picture image
group table room water snow sky field road building city house shop bed tree grass horse cat bird
plane train bus truck boat food pizza plate white black blue green small large big old young sitting
standing walking holding playing riding dogs cars ran sat
""".split()


def parts(token):
    """'(Dog,' -> ('(', 'dog', ','), written independently of eda._split."""
    core = token.strip(string.punctuation)
    lead = token[: len(token) - len(token.lstrip(string.punctuation))]
    return lead, core.lower(), token[len(lead) + len(core):]


def sr_outcomes(text):
    """Every result SR (n=1) may give, by brute force: one word type, all its occurrences."""
    words = text.split()
    out = set()
    for w in {parts(x)[1] for x in words} - eda.STOP_WORDS:
        for s in eda.synonyms(w):
            out.add(" ".join(parts(x)[0] + s + parts(x)[2] if parts(x)[1] == w else x
                             for x in words))
    return out


def test_table_loads_fast_and_is_compact():
    path = eda.TABLE_PATH
    assert os.path.getsize(path) < 1_000_000
    t0 = time.perf_counter()
    n_words = eda.load_synonyms(path)
    assert time.perf_counter() - t0 < 1.5  # ~0.1 s on one core; slack for a busy machine
    assert n_words > 50_000


def test_shipped_table_format():
    with gzip.open(eda.TABLE_PATH, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if not line.startswith("#")]
    synsets = [line.split(" ") for line in lines if not line.startswith("> ")]
    assert len(synsets) > 40_000
    for lemmas in synsets:
        assert len(lemmas) >= 2 and len(set(lemmas)) == len(lemmas)
        assert any("_" not in w for w in lemmas)
        assert all(w == w.lower() and w for w in lemmas)
    assert os.path.exists(os.path.join(ROOT, "assets", "LICENSE-wordnet.txt"))


def test_common_caption_words_have_synonyms():
    missing = [w for w in COMMON_WORDS if not eda.synonyms(w)]
    assert not missing, missing
    assert len(COMMON_WORDS) >= 50


@pytest.mark.parametrize("word, synonym", [
    ("car", "automobile"), ("photo", "photograph"), ("picture", "image"), ("child", "kid"),
    ("big", "large"), ("small", "little"), ("woman", "adult female"), ("dog", "domestic dog"),
    ("children", "kid"), ("dogs", "domestic dog"), ("women", "adult female"), ("ran", "scat"),
    ("Car", "automobile"), ("cars", "automobile"), ("bigger", "large"),
])
def test_known_synonym_pairs(word, synonym):
    assert synonym in eda.synonyms(word)


def test_synonyms_exclude_the_word_and_unknowns_are_empty():
    assert "dog" not in eda.synonyms("dog") and "dog" not in eda.synonyms("dogs")
    assert "automobile" in eda.synonyms("auto") and "auto" in eda.synonyms("automobile")
    for word in ["beach", "shirt", "xqzvt", "собака", "狗", "", "123"]:
        assert eda.synonyms(word) == []


def test_synonym_replacement_is_one_wordnet_synonym():
    seen = set()
    for seed in range(200):
        out = eda.synonym_replacement(CAPTION, random.Random(seed))
        assert out in sr_outcomes(CAPTION), out
        seen.add(out)
    assert len(seen) > 20  # it really samples words and synonyms


def test_synonym_replacement_replaces_every_occurrence_keeps_punctuation():
    expected = {f"{s}! {s}, ({s})" for s in eda.synonyms("dog")}
    for seed in range(50):
        assert eda.synonym_replacement("Dog! dog, (DOG)", random.Random(seed)) in expected


def test_stop_words_are_never_replaced():
    # "can", "will", "do", "have" and "out" have WordNet synonyms, but they are stop-words
    assert all(eda.synonyms(w) for w in ["can", "will", "do", "have", "out"])
    text = "i can do it, will you have it out"
    for seed in range(100):
        rng = random.Random(seed)
        assert eda.synonym_replacement(text, rng) == text
        assert eda.random_insertion(text, rng) == text
    mixed = "the dog is in the car with them"
    for seed in range(100):
        out = eda.synonym_replacement(mixed, random.Random(seed))
        assert out in sr_outcomes(mixed)
        assert out.startswith("the ") and out.endswith(" with them")


def test_random_swap_keeps_the_multiset():
    words = CAPTION.split()
    for seed in range(100):
        out = eda.random_swap(CAPTION, random.Random(seed)).split()
        assert collections.Counter(out) == collections.Counter(words)
        assert sum(a != b for a, b in zip(out, words)) == 2  # words are distinct apart from "a"/"A"
    out = eda.random_swap(CAPTION, random.Random(0), n=5).split()
    assert collections.Counter(out) == collections.Counter(words)


def test_random_deletion_probability_and_never_empty():
    words = [f"w{i}" for i in range(20)]
    text = " ".join(words)
    rng = random.Random(0)
    trials, deleted = 2000, 0
    for _ in range(trials):
        out = eda.random_deletion(text, rng, p=0.1).split()
        it = iter(words)
        assert all(w in it for w in out)  # an order-preserving subsequence
        deleted += len(words) - len(out)
    rate = deleted / (trials * len(words))
    assert abs(rate - 0.1) < 0.01, rate  # std 0.0015: a 6-sigma band
    for seed in range(200):
        assert eda.random_deletion("two words", random.Random(seed), p=0.9)
    assert eda.random_deletion("every word goes", random.Random(0), p=1.0) == "every word goes"


def test_random_insertion_inserts_a_synonym_of_a_sentence_word():
    words = CAPTION.split()
    expected = set()
    for w in {parts(x)[1] for x in words} - eda.STOP_WORDS:
        for s in eda.synonyms(w):
            expected |= {" ".join(words[:i] + [s] + words[i:]) for i in range(len(words) + 1)}
    for seed in range(100):
        assert eda.random_insertion(CAPTION, random.Random(seed)) in expected


def test_augment_uses_sr_rs_rd_uniformly():
    counts = collections.Counter()
    for seed in range(600):
        replay = random.Random(seed)
        op = replay.choice(["sr", "rs", "rd"])
        fn = {"sr": eda.synonym_replacement, "rs": eda.random_swap, "rd": eda.random_deletion}[op]
        assert eda.augment(CAPTION, random.Random(seed)) == fn(CAPTION, replay)
        counts[op] += 1
    assert all(150 < counts[op] < 250 for op in ["sr", "rs", "rd"]), counts
    with pytest.raises(ValueError):
        eda.augment(CAPTION, random.Random(0), ops=("xx",))


def test_deterministic_with_a_seed_across_processes():
    captions = [CAPTION, "Two women sitting at a table with cups of coffee", "a cat on a bed"]
    ours = [eda.augment(c, random.Random(i)) for i in range(30) for c in captions]
    assert ours == [eda.augment(c, random.Random(i)) for i in range(30) for c in captions]
    # set iteration order depends on PYTHONHASHSEED: another process must still agree
    code = ("import random, eda, json, sys; caps = json.loads(sys.argv[1]); print(json.dumps("
            "[eda.augment(c, random.Random(i)) for i in range(30) for c in caps]))")
    import json
    for hash_seed in ["1", "2"]:
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", code, json.dumps(captions)], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == ours


EDGE_CASES = ["", "dog", "!!! ...", "xqzvt blorf", "一只狗在海滩上奔跑", "Собака бежит по пляжу",
              "   ", "dog\tcat\n", "the of and", "a", "A dog's t-shirt (red)!", "1 2 3"]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_never_crash_never_empty(text):
    for seed in range(30):
        rng = random.Random(seed)
        for out in [eda.augment(text, rng), eda.augment(text, rng, ops=("ri",)),
                    eda.synonym_replacement(text, rng), eda.random_insertion(text, rng),
                    eda.random_swap(text, rng), eda.random_deletion(text, rng, p=0.99)]:
            assert isinstance(out, str)
            assert (out == "") == (text == "")


def test_untouchable_captions_come_back_unchanged():
    rng = random.Random(0)
    for text in ["一只狗在海滩上奔跑", "xqzvt blorf", "!!!", "   "]:
        assert eda.synonym_replacement(text, rng) == text
        assert eda.random_insertion(text, rng) == text
    assert eda.random_swap("一只狗在海滩上奔跑", rng) == "一只狗在海滩上奔跑"
    assert eda.random_deletion("dog", rng, p=1.0) == "dog"
    assert eda.augment("dog", rng) in {"dog"} | set(eda.synonyms("dog"))


def test_long_caption_is_fast():
    text = " ".join([CAPTION] * 500)  # ~6,500 words
    t0 = time.perf_counter()
    for seed in range(5):
        for op in ["sr", "ri", "rs", "rd"]:
            assert eda.augment(text, random.Random(seed), ops=(op,))
    assert time.perf_counter() - t0 < 2.0
    t0 = time.perf_counter()  # one 100k-character token, punctuation inside: no quadratic regex
    assert eda.augment("a" + "!" * 100_000 + "b c", random.Random(0), ops=("sr",))
    assert time.perf_counter() - t0 < 2.0


def test_missing_table_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_synonyms"):
        eda.load_synonyms(str(tmp_path / "nope.txt.gz"))


def test_build_tool_on_toy_wordnet(tmp_path):
    spec = importlib.util.spec_from_file_location("build_synonyms",
                                                  os.path.join(ROOT, "tools", "build_synonyms.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    licence = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    data = {  # WordNet's data.* line format: offset lex_filenum ss_type w_cnt(hex) word lex_id ...
        "noun": ["02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a canid",
                 "09217230 17 n 01 beach 0 000 | an area of sand",
                 "04334599 06 n 02 street_car 0 tram 0 000 | a vehicle"],
        "verb": ["01978965 38 v 02 dog 0 chase 0 000 | go after"],
        "adj": ["00001740 00 a 02 big(a) 0 large(p) 0 000 | above average in size"],
        "adv": ["00001740 02 r 02 Dog 0 dog 1 000 | case duplicates only"],
    }
    for pos, lines in data.items():
        (tmp_path / ("data." + pos)).write_text(licence + "\n".join(lines) + "\n")
    (tmp_path / "noun.exc").write_text("dogs dog\nbeaches beach\n")
    (tmp_path / "verb.exc").write_text("chased chase\n")
    out = tmp_path / "syn.txt.gz"
    try:
        check_toy_table(build, tmp_path, out)
    finally:
        eda.load_synonyms()  # later tests use the shipped table again


def check_toy_table(build, tmp_path, out):
    build.main(["--wordnet", str(tmp_path), "--out", str(out)])
    first = out.read_bytes()
    with gzip.open(out, "rt") as f:
        body = [line.rstrip("\n") for line in f if not line.startswith("#")]
    assert body == ["dog domestic_dog canis_familiaris", "street_car tram", "dog chase",
                    "big large", "> dogs dog", "> chased chase"]
    build.main(["--wordnet", str(tmp_path), "--out", str(out)])
    assert out.read_bytes() == first  # no timestamp in the gzip header: reproducible bytes

    assert eda.load_synonyms(str(out)) == 5  # dog, tram, chase, big, large: single words only
    assert eda.synonyms("dog") == ["domestic dog", "canis familiaris", "chase"]
    assert eda.synonyms("dogs") == ["domestic dog", "canis familiaris", "chase"]
    assert eda.synonyms("tram") == ["street car"] and eda.synonyms("large") == ["big"]
    assert eda.synonyms("chased") == ["dog"] and eda.synonyms("beach") == []
    with pytest.raises(SystemExit):
        build.main(["--wordnet", str(tmp_path / "missing"), "--out", str(out)])
