"""Rebuilds assets/synonyms.txt.gz, eda.py's offline synonym table, from WordNet 3.0.

Which synonyms (eda.py says why): only those of a word's most common sense, so that "green"
gives "greenish", never "cat valium" (its ketamine sense), and "circle" never "roofy".
WordNet numbers a word's senses by how often each was tagged in its semantic concordances
(cntlist(5WN)); cntlist.rev holds those counts, which are comparable across parts of speech.
That matters because EDA does not tag captions: "cross" was tagged 47 times as the verb
("traverse") and twice as the shape, "white" 61 times as the adjective and 10 as "Caucasian".
The rule, per single-word lemma:
  - tagged at least once: keep its most tagged sense over all parts of speech (every sense
    with that count on a tie). "red" keeps adjective sense 1 (43 tags: reddish, crimson,
    scarlet...), not "redness" (9) nor "crimson, violent" (8).
  - never tagged: keep each part of speech in which it has a single sense ("rhombus": rhomb,
    diamond). WordNet orders untagged senses without frequency data, so a polysemous untagged
    word keeps nothing ("plus": asset, summation, positive...).
A lemma's senses come from index.noun/.verb/.adj/.adv ("lemma pos synset_cnt p_cnt
[ptr_symbol...] sense_cnt tagsense_cnt synset_offset...", wndb(5WN)); a count is found through
the sense key "lemma%ss_type:lex_filenum:lex_id:head_word:head_id" (senseidx(5WN)) built from the
data.* line, because cntlist.rev's own sense numbers are stale for some words (about 1,900 of
its 37,387 keys name no WordNet 3.0 sense; 130 carry a head word marker like "(a)", dropped here).

Table format, one kept synset per line, then morphology lines:

    # comments (licence pointer, provenance, the rule)
    red reddish blood-red ... crimson scarlet | ruddy ruby   <- keys | the synset's other lemmas
    > children child                                         <- a form, then base(s) to look up
    > flower                                                 <- a lemma, looked up as itself

A key is a single-word lemma whose most common sense is this synset; eda.py looks a word up in
the lines where it is a key, and takes every lemma there as a synonym (the lemmas after '|'
share the sense but it is not their most common one; no '|' when every lemma is a key).
Lemmas are lower-cased, '_' joins multi-word lemmas, adjective markers ("galore(ip)") are
dropped, and a lemma list found in several parts of speech is written once, keys merged.

'>' lines: WordNet's exception lists (noun.exc, verb.exc, adj.exc, adv.exc) map irregular forms
to bases with synonyms ("children", "ran"); and a lemma without synonyms of its own gets the
bases morphy(7WN)'s detachment rules give it in its own parts of speech, when they differ from
eda.py's guess (the same rules, all parts of speech at once): "filled" -> "fill" (not "fille"),
"flower" -> none (not "flow"), "bed" -> none (not "b", bacillus).
The gzip header carries no timestamp: the same WordNet files always give the same bytes.

Get WordNet 3.0 from Debian's package (files land in wn/usr/share/wordnet/):
    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb wn
Then:
    python experiments/build_synonyms.py --wordnet wn/usr/share/wordnet --out assets/synonyms.txt.gz

Standard library only. Deliberately left out: WordNet's relations (hypernyms etc.), glosses,
parts of speech in the table, and choosing a sense from the caption's context.
"""
import argparse
import collections
import gzip
import os
import re

POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}  # file suffix -> pos letter
SS_TYPE_NUMBER = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}  # a sense key's ss_type digit
# morphy(7WN)'s detachment rules per part of speech (eda.SUFFIX_RULES: all, on any word)
MORPHY_RULES = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
          ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
}
HEADER = (
    "# declip-mini EDA synonym table, derived from WordNet 3.0 by experiments/build_synonyms.py.\n"
    "# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.\n"
    "# Licence: see LICENSE-wordnet.txt next to this file.\n"
    "# Format: one synset per line, 'keys | other lemmas' ('_' joins multi-word lemmas). A key\n"
    "# is a word whose most common sense is this synset: its most tagged sense in cntlist.rev\n"
    "# (all tied ones), or for a word never tagged, its only sense in a part of speech.\n"
    "# '> form base...': look the form up under these bases (an irregular form, or a lemma\n"
    "# without synonyms of its own: its bases by morphy's rules, possibly none).\n"
)
_MARKER = re.compile(r"\([a-z]+\)")  # adjective syntactic markers: (a), (p), (ip)


def read_synsets(path):
    """Yields (offset, synset) from one data.* file: "offset lex_filenum ss_type w_cnt word
    lex_id [word lex_id...] p_cnt [ptr...] ...", w_cnt and lex_id hexadecimal.

    synset: {"type": ss_type, "lexfile": lex_filenum, "words": [(lemma, lex_id)] lower-cased,
    "head": an adjective satellite's head synset (its '&' pointer), else None}.
    """
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # the licence header: "  1 This software and database ..."
                continue
            fields = line.split()
            w_cnt = int(fields[3], 16)
            words = [(_MARKER.sub("", fields[4 + 2 * i]).lower(), int(fields[5 + 2 * i], 16))
                     for i in range(w_cnt)]
            p_cnt, ptrs = int(fields[4 + 2 * w_cnt]), fields[5 + 2 * w_cnt:]  # 4 fields a ptr
            head = next((ptrs[4 * i + 1] for i in range(p_cnt) if ptrs[4 * i] == "&"), None)
            yield fields[0], {"type": fields[2], "lexfile": fields[1], "words": words,
                              "head": head if fields[2] == "s" else None}


def read_index(path):
    """Yields (lemma, [synset offsets]) from one index.* file, WordNet's sense order."""
    with open(path, encoding="latin-1") as f:
        for line in f:
            if not line.startswith("  "):
                fields = line.split()
                yield fields[0], fields[-int(fields[2]):]


def read_counts(path):
    """{sense key: tag count} from cntlist.rev ("sense_key sense_number tag_cnt")."""
    with open(path, encoding="latin-1") as f:
        return {_MARKER.sub("", key): int(count) for key, _, count in map(str.split, f)}


def read_exceptions(path):
    """Yields (inflected form, [base forms]) from one WordNet *.exc file."""
    with open(path, encoding="latin-1") as f:
        for line in f:
            fields = line.lower().split()
            if len(fields) >= 2:
                yield fields[0], fields[1:]


def sense_key(lemma, synset, synsets):
    """senseidx(5WN)'s key of `lemma` in `synset`, e.g. 'red%5:00:01:chromatic:00'."""
    lex_id = next(i for w, i in synset["words"] if w == lemma)
    head = synset["head"] and "%s:%02d" % synsets["a", synset["head"]]["words"][0]
    return "%s%%%d:%s:%02d:%s" % (lemma, SS_TYPE_NUMBER[synset["type"]], synset["lexfile"],
                                  lex_id, head or ":")


def read_wordnet(wordnet_dir):
    """-> synsets {(pos, offset): synset}, senses {lemma: [(pos, tag count, (pos, offset))]}."""
    names = [f"{kind}.{pos}" for kind in ("data", "index") for pos in POS_FILES]
    for name in names + ["cntlist.rev"]:
        if not os.path.exists(os.path.join(wordnet_dir, name)):
            raise FileNotFoundError(f"{os.path.join(wordnet_dir, name)} not found: pass "
                                    "--wordnet the folder holding WordNet 3.0's data.*, index.*, "
                                    "cntlist.rev and *.exc files")
    synsets = {}
    for pos, p in POS_FILES.items():
        for offset, synset in read_synsets(os.path.join(wordnet_dir, "data." + pos)):
            synsets[p, offset] = synset
    counts = read_counts(os.path.join(wordnet_dir, "cntlist.rev"))
    senses = {}
    for pos, p in POS_FILES.items():
        for lemma, offsets in read_index(os.path.join(wordnet_dir, "index." + pos)):
            for offset in offsets:
                count = counts.get(sense_key(lemma, synsets[p, offset], synsets), 0)
                senses.setdefault(lemma, []).append((p, count, (p, offset)))
    return synsets, senses


def common_senses(senses):
    """The synsets a word keeps (the rule above). senses: [(pos, tag count, synset id)]."""
    top = max(count for _, count, _ in senses)
    if top:
        return [s for _, count, s in senses if count == top]
    per_pos = collections.Counter(pos for pos, _, _ in senses)
    return [s for pos, _, s in senses if per_pos[pos] == 1]


def _strip(word, rules):
    return [word[:-len(old)] + new for old, new in rules
            if word.endswith(old) and len(word) > len(old)]


def morphology_lines(senses, keys, exceptions):
    """'> form base...' lines: WordNet's irregular forms, then lemmas eda.py would misread."""
    lines = {}
    for form, bases in exceptions:
        bases = [b for b in bases if b in keys and b != form]
        if bases and "_" not in form:
            lines.setdefault(form, {}).update(dict.fromkeys(bases))
    every_rule = [rule for rules in MORPHY_RULES.values() for rule in rules]
    for lemma in sorted(senses):
        if "_" in lemma or lemma in keys or lemma in lines:
            continue
        morphy = {b: None for pos, rules in MORPHY_RULES.items() for b in _strip(lemma, rules)
                  if b in keys and any(p == pos for p, _, _ in senses[b])}
        if set(morphy) != {b for b in _strip(lemma, every_rule) if b in keys}:
            lines[lemma] = morphy
    return [" ".join(["> " + form] + list(bases)) for form, bases in lines.items()]


def build_lines(wordnet_dir):
    """Returns the table's lines (without the header): synsets first, then '>' lines."""
    synsets, senses = read_wordnet(wordnet_dir)
    keys_of = {}  # synset id -> the single-word lemmas whose most common sense it is
    for lemma in sorted(senses):
        if "_" not in lemma:  # a whitespace-split caption only holds single words
            for synset_id in common_senses(senses[lemma]):
                keys_of.setdefault(synset_id, set()).add(lemma)
    merged = {}  # lemma tuple -> keys, in WordNet's file order: a deterministic table
    for synset_id, synset in synsets.items():
        lemmas = tuple(dict.fromkeys(w for w, _ in synset["words"]))
        if synset_id in keys_of and len(lemmas) >= 2:
            merged.setdefault(lemmas, set()).update(keys_of[synset_id])
    lines = []
    for lemmas, keys in merged.items():
        rest = [w for w in lemmas if w not in keys]
        lines.append(" ".join([w for w in lemmas if w in keys] + (["|"] + rest if rest else [])))
    exceptions = [pair for pos in POS_FILES
                  if os.path.exists(os.path.join(wordnet_dir, pos + ".exc"))
                  for pair in read_exceptions(os.path.join(wordnet_dir, pos + ".exc"))]
    return lines + morphology_lines(senses, set().union(*merged.values()), exceptions)


def write_table(lines, out):
    text = HEADER + "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(text.encode("utf-8"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", required=True,
                        help="folder with WordNet 3.0's data.*, index.*, cntlist.rev and *.exc")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets",
                                                      "synonyms.txt.gz"))
    args = parser.parse_args(argv)
    try:
        lines = build_lines(args.wordnet)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    write_table(lines, args.out)
    synset_lines = [line for line in lines if not line.startswith(">")]
    keys = {w for line in synset_lines for w in line.split(" | ")[0].split()}
    print(f"wrote {args.out}: {len(synset_lines)} synsets, {len(keys)} words with synonyms, "
          f"{len(lines) - len(synset_lines)} morphology lines, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
