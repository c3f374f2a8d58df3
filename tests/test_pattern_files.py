"""benchmarks/pattern_files.py: the held-out files of docs/RESULTS.md, from Pattern's test corpora."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from finegrain.data.conll import read_token_examples
from finegrain.data.readers import read_examples

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pattern_files.py"


def _corpora(tmp_path: Path) -> Path:
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    hedge = [f'"{1 if i % 2 else -1}","Sentence number {i} may be true."' for i in range(20)]
    hedge += ['"1","Sentence  NUMBER 1 may be true."',  # a copy of row 1, case and spacing aside
              '"1","Said twice, two ways."', '"-1","said twice, two ways."']  # copies that disagree: dropped
    (corpora / "uncertainty-conll2010.csv").write_text("\ufeff" + "\n".join(hedge) + "\n", encoding="utf-8")
    dutch = [f'"{1 if i % 2 else -1}","Boek {i}."' for i in range(10)]
    (corpora / "polarity-nl-bol.com.csv").write_text("\n".join(dutch) + "\n", encoding="utf-8")
    french = [f'"Livre {i}, bien.","{1 if i % 2 else -1}"' for i in range(10)]  # text first, then label
    (corpora / "polarity-fr-amazon.csv").write_text("\n".join(french) + "\n", encoding="utf-8")
    wsj = ["The/DT cat/NN sat/VBD ./.", "A/DT dog/NN ran/VBD ./.", "Dogs/NNS bark/VBP ./.", "Cats/NNS sit/VBP ./.",
           "The/DT dog/NN sat/VBD ./.", "A/DT cat/NN ran/VBD ./."]
    (corpora / "tagged-en-wsj.txt").write_text("\n".join(wsj) + "\n", encoding="utf-8")
    for name in ("tagged-de-tiger.txt", "tagged-es-wikicorpus.txt", "tagged-it-wacky.txt"):
        (corpora / name).write_text("\n".join(wsj[:5]) + "\n", encoding="utf-8")
    dutch_tags = ["de/Art(bep,zijdofmv,neut) hond/N(soort,ev,neut) blaft/V(intrans,ott,3,ev) ./Punc(punt)"] * 5
    (corpora / "tagged-nl-twnc.txt").write_text("\n".join(dutch_tags) + "\n", encoding="utf-8")
    return corpora


def test_held_out_files_are_unique_split_by_label_and_read_by_finegrain(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), str(_corpora(tmp_path)), str(out)],
                          capture_output=True, text=True, check=True)
    assert "hedge: 16 train, 4 test (20 unique texts)" in done.stdout
    assert "french: 8 train, 2 test (10 unique texts)" in done.stdout
    assert "wsj_pos: 4 train, 2 test sentences" in done.stdout and "baseline, most frequent tag" in done.stdout
    assert "nl_pos: 4 train, 1 test sentences (4 test words, 4 tags)" in done.stdout

    hedge = [json.loads(line) for split in ("train", "test") for line in (out / "hedge" / f"{split}.jsonl").open()]
    assert len({row["text"].lower() for row in hedge}) == 20 and not any("twice" in row["text"] for row in hedge)
    labels = {row["text"]: row["label"] for row in hedge}
    assert labels["Sentence number 1 may be true."] == "certain" and labels["Sentence number 0 may be true."] == "uncertain"
    test = read_examples(out / "hedge" / "test.jsonl").examples
    assert sorted(e.label for e in test) == ["certain", "certain", "uncertain", "uncertain"]  # a fifth of each label
    french = read_examples(out / "french" / "train.jsonl").examples
    assert all(e.text.startswith("Livre") and e.label in ("positive", "negative") for e in french)

    tagged = read_token_examples(out / "wsj_pos" / "train.conll", scheme="plain").examples
    assert len(tagged) == 4 and {tag for e in tagged for tag in e.tags} <= {"DT", "NN", "NNS", "VBD", "VBP", "."}
    dutch = read_token_examples(out / "nl_pos" / "test.conll", scheme="plain").examples
    assert dutch[0].words == ["de", "hond", "blaft", "."] and dutch[0].tags[1] == "N(soort,ev,neut)"
