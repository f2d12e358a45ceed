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

# ~50 frequent caption words (nouns, verbs in caption forms, adjectives, plurals, irregular forms)
# whose most common WordNet sense has a synonym.
COMMON_WORDS = """
dog car man woman red running girl boy child children kid kids men women person photo picture image
group table water snow road building city shop horse cat airplane bicycle bike motorcycle phone
plane train bus truck food pizza plate cake sofa blue green small large big little young sitting
standing walking holding riding eating looking wearing dogs cars sat
""".split()
# Frequent caption words whose most common sense is a one-lemma synset: no synonym (their rarer
# senses have some: "white" -> "caucasian", "tree" -> "corner", "circle" -> "roofy").
NO_SYNONYM_WORDS = "white black tree sky bird boat house room circle star box diamond".split()


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
    assert n_words > 40_000  # 48,857 words whose most common sense has a synonym


def test_shipped_table_format():
    with gzip.open(eda.TABLE_PATH, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if not line.startswith("#")]
    synsets = [line for line in lines if not line.startswith("> ")]
    assert len(synsets) > 30_000
    keys = set()
    for line in synsets:  # "keys | other lemmas", or just "keys"
        head, bar, rest = line.partition(" | ")
        lemmas = head.split(" ") + (rest.split(" ") if bar else [])
        assert len(lemmas) >= 2 and len(set(lemmas)) == len(lemmas), line
        assert all("_" not in w for w in head.split(" ")), line  # keys are single words
        assert all(w == w.lower() and w and w != "|" for w in lemmas), line
        keys.update(head.split(" "))
    for line in lines[len(synsets):]:  # '>' lines come last; their bases have synonyms
        form, *bases = line[2:].split(" ")
        assert line.startswith("> ") and form and "_" not in form and set(bases) <= keys, line
    assert os.path.exists(os.path.join(ROOT, "assets", "LICENSE-wordnet.txt"))


def test_common_caption_words_have_synonyms():
    missing = [w for w in COMMON_WORDS if not eda.synonyms(w)]
    assert not missing, missing
    assert len(COMMON_WORDS) >= 50
    assert [w for w in NO_SYNONYM_WORDS if eda.synonyms(w)] == []


@pytest.mark.parametrize("word, synonym", [
    ("car", "automobile"), ("photo", "photograph"), ("picture", "image"), ("child", "kid"),
    ("big", "large"), ("small", "little"), ("woman", "adult female"), ("dog", "domestic dog"),
    ("children", "kid"), ("dogs", "domestic dog"), ("women", "adult female"), ("sat", "sit down"),
    ("Car", "automobile"), ("cars", "automobile"), ("bigger", "large"), ("green", "greenish"),
    ("red", "crimson"), ("crimson", "red"), ("triangle", "trigon"), ("jumping", "leap"),
])
def test_known_synonym_pairs(word, synonym):
    assert synonym in eda.synonyms(word)


def test_synonyms_exclude_the_word_and_unknowns_are_empty():
    assert "dog" not in eda.synonyms("dog") and "dog" not in eda.synonyms("dogs")
    assert "automobile" in eda.synonyms("auto") and "auto" in eda.synonyms("automobile")
    for word in ["beach", "shirt", "xqzvt", "собака", "狗", "", "123"]:
        assert eda.synonyms(word) == []


# Class words of the built-in data (data.py's COLOURS / SHAPES caption words at the time of
# writing, single words only), and hand-checked terms that still name each class: the class
# words themselves plus shades and shape names WordNet offers as synonyms in the right sense
# ('_' joins the words of a multi-word term).
CLASS_TERMS = {
    "red": "red crimson scarlet reddish ruddy blood-red carmine cerise cherry cherry-red ruby "
           "ruby-red vermilion redness orange_red deep_red",
    "orange": "orange tangerine amber orangish orangeness brownish-yellow yellow-brown",
    "yellow": "yellow golden lemon yellowish xanthous yellowness gold gilded gilt aureate "
              "gamboge maize lemon_yellow",
    "green": "green emerald grass-green greenish light-green dark-green greenness viridity",
    "blue": "blue azure cobalt bluish blueish blueness cerulean sapphire lazuline sky-blue "
            "bright_blue",
    "purple": "purple violet lilac purplish purpleness lavender lilac-colored reddish_blue",
    "white": "white snow-white ivory whiteness snowy off-white pearl bone",
    "black": "black jet-black ebony blackness inkiness coal-black pitchy sooty jet ebon sable "
             "coal_black jet_black pitch_black soot_black",
    "circle": "circle disc disk dot point circular round",
    "square": "square box block tile foursquare",
    "triangle": "triangle wedge trigon trilateral triangular wedge_shape",
    "star": "star starburst",
    "cross": "cross plus",
    "diamond": "diamond rhombus rhomb lozenge",
}
CLASS_TERMS = {c: {t.replace("_", " ") for t in v.split()} for c, v in CLASS_TERMS.items()}
COLOUR_WORDS = ("red crimson scarlet orange tangerine amber yellow golden lemon green emerald "
                "grass-green blue azure cobalt purple violet lilac white snow-white ivory black "
                "jet-black ebony").split()
SHAPE_WORDS = ("circle disc dot square box block tile triangle wedge star starburst cross plus "
               "diamond rhombus lozenge").split()
# Words whose most common WordNet sense is not the colour or shape, so that no sense choice
# without context can keep them: cross (47 tags as the verb "traverse", 2 as the shape), wedge
# (the verb "lodge" ties the shape), disc (a phonograph record), cobalt (the metal; its only
# noun sense), ivory (tusk).
DRIFTING_WORDS = {"cross", "wedge", "disc", "cobalt", "ivory"}


def test_synonyms_come_from_the_most_common_sense():
    # every sense, as EDA takes them, gave these (from ketamine, flunitrazepam, Caucasian...)
    for word, nonsense in [("green", "cat valium"), ("green", "jet"), ("circle", "roofy"),
                           ("circle", "lot"), ("white", "caucasian"), ("star", "superstar"),
                           ("blue", "amytal"), ("dot", "elvis"), ("red", "bolshevik"),
                           ("diamond", "infield"), ("square", "lame"), ("box", "package"),
                           ("plus", "asset"), ("lozenge", "pill"), ("dog", "chase")]:
        assert nonsense not in eda.synonyms(word), (word, nonsense)
    assert set(eda.synonyms("green")) == {"greenish", "light-green", "dark-green"}
    text = "a green circle next to a white star"
    for seed in range(200):
        out = eda.augment(text, random.Random(seed), ops=("sr", "ri"))
        assert not {"cat", "valium", "roofy", "rophy", "caucasian"} & set(out.split()), out


def test_synonym_replacement_keeps_colour_and_shape_meaning():
    """SR on "a <colour> <shape>" captions: a replaced class word's synonym must name the same
    class. With synonyms from every sense (EDA's) 70% of the replacements drift, from 37 of the 40
    words; with the first sense of each part of speech 49% (16 words); here 22%, all from the
    words of DRIFTING_WORDS."""
    term_class = {t: c for c, terms in CLASS_TERMS.items() for t in terms}
    replaced, drifted = collections.Counter(), collections.Counter()
    for colour in COLOUR_WORDS:
        for shape in SHAPE_WORDS:
            text = f"a {colour} {shape}"
            for seed in range(10):
                out = eda.synonym_replacement(text, random.Random(seed))
                if out == text:
                    continue
                word, synonym = ((colour, out[2:-len(shape) - 1]) if out.endswith(" " + shape)
                                 else (shape, out[len(f"a {colour} "):]))
                assert out == f"a {colour} {synonym}" or out == f"a {synonym} {shape}", out
                replaced[word] += 1
                drifted[word] += synonym not in CLASS_TERMS[term_class[word]]
    assert sum(replaced.values()) > 2000  # most class words have a synonym
    assert {w for w, n in drifted.items() if n} <= DRIFTING_WORDS, drifted
    assert sum(drifted.values()) < 0.25 * sum(replaced.values())


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
    # "can", "will", "do", "have" and "off" have WordNet synonyms, but they are stop-words
    assert all(eda.synonyms(w) for w in ["can", "will", "do", "have", "off"])
    text = "i can do it, will you have it off"
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


def load_build_tool():
    spec = importlib.util.spec_from_file_location("build_synonyms",
                                                  os.path.join(ROOT, "experiments",
                                                               "build_synonyms.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def write_toy_wordnet(folder):
    """A tiny WordNet: each case of the sense rule, a satellite adjective, shared offsets."""
    licence = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    data = {  # data.*: offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt [ptr] | gloss
        "noun": ["02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a canid",
                 "09217230 17 n 01 beach 0 000 | an area of sand",
                 "04334599 06 n 02 street_car 0 tram 0 000 | a vehicle",
                 "03000001 06 n 03 ketamine 0 cat_valium 0 green 0 000 | a drug",
                 "13000001 07 n 02 asset 0 plus 0 000 | a useful quality",
                 "13000002 22 n 02 addition 0 plus 1 000 | a sum",
                 "11000001 20 n 01 flower 0 000 | a bloom",
                 "02883344 06 n 02 box 0 case 0 000 | a container"],
        "verb": ["01978965 38 v 02 dog 0 chase 0 000 | go after",
                 "01000002 35 v 02 box 0 package 0 000 | put in a box",
                 "02000003 38 v 02 flow 0 stream 0 000 | move along"],
        "adj": ["00001740 00 a 02 big(a) 0 large(p) 0 000 | above average in size",
                "00002000 00 a 01 chromatic 0 000 | having colour",
                "00002100 00 s 02 green 0 greenish 0 001 & 00002000 a 0000 | grass-coloured"],
        "adv": ["00001740 02 r 02 Dog 0 dog 1 000 | case duplicates only"],
    }
    index = {  # index.*: lemma pos synset_cnt p_cnt sense_cnt tagsense_cnt offsets, sense order
        "noun": ["addition n 1 0 1 0 13000002", "asset n 1 0 1 0 13000001",
                 "beach n 1 0 1 0 09217230", "box n 1 0 1 1 02883344",
                 "canis_familiaris n 1 0 1 0 02084071", "case n 1 0 1 0 02883344",
                 "cat_valium n 1 0 1 0 03000001", "dog n 1 0 1 1 02084071",
                 "domestic_dog n 1 0 1 0 02084071", "flower n 1 0 1 0 11000001",
                 "green n 1 0 1 0 03000001", "ketamine n 1 0 1 0 03000001",
                 "plus n 2 0 2 0 13000001 13000002", "street_car n 1 0 1 0 04334599",
                 "tram n 1 0 1 0 04334599"],
        "verb": ["box v 1 0 1 1 01000002", "chase v 1 0 1 0 01978965", "dog v 1 0 1 1 01978965",
                 "flow v 1 0 1 0 02000003", "package v 1 0 1 0 01000002",
                 "stream v 1 0 1 0 02000003"],
        "adj": ["big a 1 0 1 0 00001740", "chromatic a 1 0 1 0 00002000",
                "green a 1 0 1 1 00002100", "greenish a 1 0 1 0 00002100",
                "large a 1 0 1 0 00001740"],
        "adv": ["dog r 1 0 1 0 00001740"],
    }
    for pos in data:
        (folder / ("data." + pos)).write_text(licence + "\n".join(data[pos]) + "\n")
        (folder / ("index." + pos)).write_text(licence + "\n".join(index[pos]) + "\n")
    (folder / "cntlist.rev").write_text(  # sense_key sense_number tag_cnt
        "box%1:06:00:: 1 3\nbox%2:35:00:: 1 3\ndog%1:05:00:: 1 10\ndog%2:38:00:: 1 1\n"
        "green%1:07:00:: 1 9\ngreen%5:00:00:chromatic:00 1 5\n")  # green%1:07: not in toy
    (folder / "noun.exc").write_text("dogs dog\nbeaches beach\n")
    (folder / "verb.exc").write_text("chased chase\n")


def test_build_tool_on_toy_wordnet(tmp_path):
    write_toy_wordnet(tmp_path)
    out = tmp_path / "syn.txt.gz"
    try:
        check_toy_table(load_build_tool(), tmp_path, out)
    finally:
        eda.load_synonyms()  # later tests use the shipped table again


def check_toy_table(build, tmp_path, out):
    build.main(["--wordnet", str(tmp_path), "--out", str(out)])
    first = out.read_bytes()
    with gzip.open(out, "rt") as f:
        body = [line.rstrip("\n") for line in f if not line.startswith("#")]
    assert body == ["dog | domestic_dog canis_familiaris",  # dog's verb sense: 1 tag against 10
                    "tram | street_car", "ketamine | cat_valium green", "asset | plus",
                    "addition | plus", "box case",  # box: noun and verb tied at 3 tags
                    "chase | dog", "box package", "flow stream", "big large", "green greenish",
                    "> dogs dog", "> chased chase",  # beach has no synonym: no "> beaches"
                    "> flower"]  # a lemma, not "flow" + "er"
    build.main(["--wordnet", str(tmp_path), "--out", str(out)])
    assert out.read_bytes() == first  # no timestamp in the gzip header: reproducible bytes

    assert eda.load_synonyms(str(out)) == 15  # the keys: single words with a common sense
    assert eda.synonyms("dog") == ["domestic dog", "canis familiaris"]  # not "chase"
    assert eda.synonyms("dogs") == ["domestic dog", "canis familiaris"]
    assert eda.synonyms("chase") == ["dog"] and eda.synonyms("chased") == ["dog"]
    assert eda.synonyms("green") == ["greenish"]  # not "cat valium"
    assert eda.synonyms("ketamine") == ["cat valium", "green"]
    assert eda.synonyms("plus") == [] and eda.synonyms("asset") == ["plus"]  # untagged, 2 senses
    assert eda.synonyms("box") == ["case", "package"]
    assert eda.synonyms("flower") == [] and eda.synonyms("flowing") == ["stream"]
    assert eda.synonyms("tram") == ["street car"] and eda.synonyms("large") == ["big"]
    assert eda.synonyms("beach") == []
    (tmp_path / "cntlist.rev").unlink()
    with pytest.raises(SystemExit, match="cntlist.rev"):
        build.main(["--wordnet", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit):
        build.main(["--wordnet", str(tmp_path / "missing"), "--out", str(out)])


WORDNET_DIR = os.environ.get("WORDNET_DIR", "/usr/share/wordnet")


@pytest.mark.skipif(not os.path.exists(os.path.join(WORDNET_DIR, "cntlist.rev")),
                    reason="no WordNet 3.0 files (set WORDNET_DIR; see "
                           "experiments/build_synonyms.py)")
def test_shipped_table_rebuilds_byte_identical(tmp_path):
    out = tmp_path / "synonyms.txt.gz"
    load_build_tool().main(["--wordnet", WORDNET_DIR, "--out", str(out)])
    with open(eda.TABLE_PATH, "rb") as f:
        assert out.read_bytes() == f.read()
