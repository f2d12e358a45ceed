"""EDA, Easy Data Augmentation (Wei & Zou, 2019), for DeCLIP's second text view.

DeCLIP (Sec. 3.2, multi-view supervision; Appendix B, "Text augmentations") builds the
augmented caption t~ with EDA: "each text will randomly select one of these three types":
synonym replacement (SR), random swap (RS), random deletion (RD). The official code uses
SR n=1, RS n=1, RD p=0.1, which `augment` follows. EDA's fourth operation, random insertion
(RI), is here too, but `augment` only picks it when asked (ops=...).

    synonym_replacement(text, rng, n=1)  n distinct non-stop-words (every occurrence) -> synonym
    random_insertion(text, rng, n=1)     insert a synonym of a non-stop-word at a random place
    random_swap(text, rng, n=1)          swap the words at two random positions, n times
    random_deletion(text, rng, p=0.1)    drop each word with probability p
    augment(text, rng)                   one of SR / RS / RD, chosen uniformly (DeCLIP's recipe)

"Shapes": a caption is a str, its words are its whitespace-separated tokens, and every
function returns a str. `rng` is a random.Random, so a seeded rng gives the same view anywhere.

Usage (data.py passes `augment` as `text_aug`, with a per-sample rng):
    import random, eda
    eda.augment("A dog runs on the beach.", random.Random(8))  # 'A domestic dog runs on the beach.'

Synonyms come from WordNet 3.0, offline: assets/synonyms.txt.gz (400,318 bytes; 31,755
synsets, 48,857 single words that have a synonym, 3,287 morphology lines), licence in
assets/LICENSE-wordnet.txt, rebuilt from WordNet's data files by experiments/build_synonyms.py.
A word's synonyms are the other lemmas of its *most common sense* only: the sense WordNet's
semantic concordance tagged most often for it, over all parts of speech (all tied senses); a
word never tagged keeps each part of speech where it has a single sense ("rhombus" -> "rhomb")
and nothing where it has several. Multi-word lemmas are replacement candidates with '_' -> ' '
("domestic dog"). The table loads lazily, once per process, on the first lookup (0.1 s on an
idle core; call `load_synonyms()` before DataLoader workers fork). Inflected words ("dogs",
"ran", "children") are looked up through their base forms with WordNet's own morphology: the
irregular forms of its *.exc files and, for words that are not lemmas themselves, its suffix
rules (morphy(7WN); the table marks lemmas such as "flower" that are no inflection of "flow").
Synonyms go in uninflected, as in EDA.

Where this departs from EDA, and why: EDA (Wei & Zou's get_synonyms) takes the lemmas of
*every* synset of a word (NLTK's wordnet.synsets(word): all senses and parts of speech, no
sense selection). For captions that is often another meaning: "green" -> "cat valium"
(ketamine), "circle" -> "roofy" (flunitrazepam), "white" -> "caucasian", "star" -> "superstar".
DeCLIP's text view t~ must stay a positive of its caption: it stands for the same image. So we
keep the most common sense only. On the built-in data's colour and shape words, the share of
SR replacements that no longer name the same colour or shape falls from 70% to 22%
(test_synonym_replacement_keeps_colour_and_shape_meaning). What remains are words whose most
common sense is not the visual one ("cross" is tagged 47 times as the verb "traverse", twice as
the shape); telling those apart needs the caption's context, which EDA does not use either.

Text handling, our choice: EDA lower-cases and keeps only a-z before augmenting. Our captions
then meet a BPE tokenizer that lower-cases by itself, and digits, names and other scripts carry
meaning, so we keep the text as it is: words are split on whitespace (an augmented caption joins
them with single spaces), punctuation stays attached to its word ("dog," is swapped and deleted
as one unit; SR keeps the comma: "hound,"), lookups ignore case and surrounding punctuation,
and replacement or inserted words are lower-case. Stop-words (EDA's English list, below) are
never replaced nor used as the source of an insertion.

Robustness: no function raises on a str, and none returns "" for a non-empty input. When an
operation cannot apply (no word with a synonym, fewer than two words to swap, a deletion that
would drop every word) the input comes back unchanged. EDA does the same for SR/RS; for RD it
keeps one random word, we keep the caption, a truer positive for a contrastive pair.
Non-English text has no synonyms, so SR/RI leave it alone while RS/RD act on its tokens (a
Chinese caption without spaces is one token and comes back unchanged).

Small departures from EDA's code: RI takes a random synonym of a random non-stop-word (as the
paper says; the code takes the first synonym of any word) and may insert at the very end; RS
always swaps two distinct positions. Many common caption words have no synonym in their most
common sense ("beach", "street", "tree", "white", "circle" are one-lemma synsets there): SR/RI
pass over them, as EDA does for words without any synonym.

Left out: EDA's scaling of n with caption length (alpha * words) and its `eda()` that writes
several augmented sentences per input; part-of-speech tagging and choosing a sense from the
caption's context (the sense is chosen per word, by frequency); re-inflecting synonyms.
Standard library only.
"""
import gzip
import os
import random
import re

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                          "synonyms.txt.gz")

# EDA's stop-word list (the NLTK English list it ships inline; its '' entry dropped).
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself it its itself they them their theirs themselves what which who whom this that
these those am is are was were be been being have has had having do does did doing a an the
and but if or because as until while of at by for with about against between into through
during before after above below to from up down in out on off over under again further then
once here there when where why how all any both each few more most other some such no nor not
only own same so than too very s t can will just don should now
""".split())

# WordNet's detachment rules (morphy(7WN)) for nouns, verbs and adjectives, tried on words that
# are not lemmas themselves: "dogs" -> "dog", "boxes" -> "box", "women" -> "woman".
SUFFIX_RULES = (
    ("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
    ("men", "man"), ("ies", "y"),                                                  # nouns
    ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", ""),   # verbs
    ("er", ""), ("est", ""), ("er", "e"), ("est", "e"),                            # adjectives
)

# A token's word runs from its first to its last word character (\w is Unicode-aware, so any
# script counts). A greedy search is linear in the token's length; a lazy
# "^(\W*)(.*?)(\W*)$" match is quadratic on tokens like "a!!!...!!!b".
_CORE = re.compile(r"\w(?:.*\w)?", re.S)

_index = None       # word -> the synset lines (lemmas joined by spaces) it is a key of
_exceptions = None  # irregular form -> its base forms


def load_synonyms(path=TABLE_PATH):
    """Reads a table written by experiments/build_synonyms.py; every later lookup uses it.

    Returns the number of words that have synonyms. A synset line "keys | other lemmas" is
    found through its keys (the words whose most common sense it is) and gives all its lemmas.
    Lines are indexed whole and split only when a word is looked up, which keeps loading at
    about a tenth of a second.
    """
    global _index, _exceptions
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: eda.py needs assets/synonyms.txt.gz beside it (copy it, or "
            "rebuild it with experiments/build_synonyms.py --wordnet DIR)")
    index, exceptions = {}, {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                continue
            line = line.rstrip("\n")
            if line.startswith("> "):
                form, *bases = line[2:].split(" ")
                exceptions[form] = bases
                continue
            keys, bar, _ = line.partition(" | ")
            if bar:  # 'keys | others': every lemma is a synonym, only keys look the line up
                line = line.replace(" | ", " ", 1)
            for word in keys.split(" "):
                index.setdefault(word, []).append(line)
    _index, _exceptions = index, exceptions
    return len(index)


def _base_forms(word):
    """Lemmas to look `word` up under: itself and its irregular bases, else by suffix rules."""
    if word in _index or word in _exceptions:
        return [word] + _exceptions.get(word, [])
    return [word[: -len(old)] + new for old, new in SUFFIX_RULES
            if word.endswith(old) and len(word) > len(old)
            and word[: -len(old)] + new in _index]


def synonyms(word):
    """WordNet synonyms of `word` (any case), in table order, without the word or its bases."""
    if _index is None:
        load_synonyms()
    word = word.lower()
    forms = _base_forms(word)
    out = {}  # an ordered set: a set's order changes with PYTHONHASHSEED, i.e. per process
    for form in forms:
        for line in _index.get(form, ()):
            for lemma in line.split(" "):
                out[lemma.replace("_", " ")] = None
    for form in [word] + forms:
        out.pop(form, None)
    return list(out)


def _split(token):
    """'(Dog,' -> ('(', 'Dog', ','); a token without word characters -> (token, '', '')."""
    m = _CORE.search(token)
    return (token[: m.start()], m.group(), token[m.end():]) if m else (token, "", "")


def _pick_word(words, rng):
    """A random non-stop-word of `words` (lower-cased, unpunctuated) with synonyms, and them.

    As in EDA: shuffle the distinct candidates, take the first that has a synonym. Candidates
    are listed in order of first appearance, not through a set, so a seeded rng gives the same
    answer in every process.
    """
    candidates = list(dict.fromkeys(_split(w)[1].lower() for w in words))
    candidates = [c for c in candidates if c and c not in STOP_WORDS]
    rng.shuffle(candidates)
    for word in candidates:
        syns = synonyms(word)
        if syns:
            return word, syns
    return None, []


def synonym_replacement(text, rng, n=1):
    """Replaces n distinct non-stop-words, every occurrence as in EDA, by a random synonym."""
    words = text.split()
    replaced = set()
    for _ in range(n):
        word, syns = _pick_word([w for w in words if _split(w)[1].lower() not in replaced], rng)
        if word is None:
            break
        synonym = rng.choice(syns)
        for i, w in enumerate(words):
            pre, core, post = _split(w)
            if core.lower() == word:
                words[i] = pre + synonym + post
        replaced.update((word, synonym))  # a new word is not replaced again in this call
    return " ".join(words) if replaced else text


def random_insertion(text, rng, n=1):
    """Inserts a random synonym of a random non-stop-word at a random position, n times."""
    words = text.split()
    inserted = False
    for _ in range(n):
        word, syns = _pick_word(words, rng)
        if word is None:
            break
        words.insert(rng.randint(0, len(words)), rng.choice(syns))  # 0..len: the end too
        inserted = True
    return " ".join(words) if inserted else text


def random_swap(text, rng, n=1):
    """Swaps the words at two distinct random positions, n times (punctuation moves along)."""
    words = text.split()
    if len(words) < 2:
        return text
    for _ in range(n):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def random_deletion(text, rng, p=0.1):
    """Drops each word with probability p; returns the text unchanged if none would be left."""
    words = text.split()
    if len(words) <= 1:
        return text
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept) if kept else text


def augment(text, rng=None, ops=("sr", "rs", "rd"), n=1, p=0.1):
    """DeCLIP's text view: one operation of `ops` ("sr", "ri", "rs", "rd"), chosen uniformly.

    rng: a random.Random (a fresh, unseeded one if None); n: words for SR/RI/RS; p: RD's
    probability. Returns the augmented caption, never "" for a non-empty one.
    """
    rng = random.Random() if rng is None else rng
    op = rng.choice(ops)
    if op == "sr":
        return synonym_replacement(text, rng, n)
    if op == "ri":
        return random_insertion(text, rng, n)
    if op == "rs":
        return random_swap(text, rng, n)
    if op == "rd":
        return random_deletion(text, rng, p)
    raise ValueError(f"eda.augment: unknown op {op!r}; use 'sr', 'ri', 'rs' or 'rd'")
