"""Token-level augmentation (augment: deletion, swap, typos) and `finegrain evaluate --robustness`."""

import json
import random
from collections import Counter

import pytest
import yaml

from finegrain.cli import main
from finegrain.config import AugmentConfig, load_config
from finegrain.data.augment import augment_examples, char_typos, perturbed, word_deletion, word_swap
from finegrain.data.readers import Example
from finegrain.errors import FinegrainError

from serve_helpers import train_run

SENTIMENT = {"fresh": ["great fun film", "a gripping story", "good cast"], "rotten": ["dull and slow", "badly acted", "a bad story"]}
TEXT = "the quick brown fox jumps over the lazy dog again and again today"


def examples(n=40):
    return [Example(text=f"{TEXT} number {i}", label="fresh" if i % 2 else "rotten", source=f"train.jsonl:{i + 1}") for i in range(n)]


def test_deletion_removes_words_and_keeps_their_order():
    words = TEXT.split()
    out = word_deletion(TEXT, random.Random(0), rate=0.25).split()
    assert len(out) == len(words) - round(0.25 * len(words))
    it = iter(words)
    assert all(word in it for word in out)  # a subsequence of the original
    assert word_deletion("alone", random.Random(0)) == "alone"


def test_swap_keeps_the_words():
    out = word_swap(TEXT, random.Random(1), rate=0.2)
    assert out != TEXT and Counter(out.split()) == Counter(TEXT.split())


def test_typos_change_only_letters_and_a_few():
    out = char_typos(TEXT, random.Random(2), rate=0.1)
    assert out != TEXT and out.count(" ") == TEXT.count(" ")
    assert sum(a != b for a, b in zip(out, TEXT)) <= 2 * len(TEXT)  # not everything moved
    letters = sum(c.isalpha() for c in TEXT)
    assert abs(sum(c.isalpha() for c in out) - letters) <= round(0.1 * letters)


def test_augment_adds_the_fraction_per_kind_seeded():
    train = examples(40)
    config = AugmentConfig(deletion=0.1, swap=0.25, typos=0.5)
    out, counts = augment_examples(train, config, seed=3)
    assert counts == {"deletion": 4, "swap": 10, "typos": 20}
    assert out[:40] == train and len(out) == 74
    assert all(e.text != "" and e.label in ("fresh", "rotten") for e in out[40:])
    assert [e.source.rsplit(" ", 1)[-1] for e in out[40:]] == ["(deletion)"] * 4 + ["(swap)"] * 10 + ["(typos)"] * 20
    by_source = {e.source: e for e in train}
    for e in out[40:]:  # a perturbed copy keeps its original's label
        assert by_source[e.source.rsplit(" (", 1)[0]].label == e.label
    assert augment_examples(train, config, seed=3)[0] == out  # the same for the same seed (exact resume)
    assert augment_examples(train, config, seed=4)[0] != out
    assert augment_examples(train, AugmentConfig(), seed=3) == (train, {})
    many, counts = augment_examples(train[:3], AugmentConfig(typos=1.0), seed=0)
    assert counts == {"typos": 3} and len({e.source for e in many[3:]}) == 3  # each drawn once before any twice


def test_fractions_out_of_range_are_one_line_errors(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: {dataset: rotten_tomatoes}\naugment: {typos: 1.5}\n")
    with pytest.raises(FinegrainError, match="augment.typos"):
        load_config(str(config))
    with pytest.raises(FinegrainError, match="augment.deletion"):
        load_config(None, ["augment.deletion=-0.1", "data.dataset=rotten_tomatoes"])
    with pytest.raises(FinegrainError, match="did you mean 'augment.swap'"):
        load_config(None, ["augment.swop=0.1", "data.dataset=rotten_tomatoes"])


def test_perturbed_copies_keep_labels_and_refuse_non_text_examples():
    train = examples(5)
    for kind in ("deletion", "swap", "typos"):
        copies = perturbed(train, kind)
        assert [e.label for e in copies] == [e.label for e in train] and copies != train
        assert perturbed(train, kind) == copies
    with pytest.raises(FinegrainError, match="not to this task's examples"):
        perturbed([object()], "typos")


def test_a_run_trains_on_augmented_examples_and_evaluates_robustness(tiny_model_dir, tmp_path, capsys):
    run = train_run(tiny_model_dir, tmp_path / "run", SENTIMENT, sections={"augment": {"deletion": 0.1, "typos": 0.2}})
    metrics = json.loads((run / "metrics.json").read_text())
    base = metrics["train"]["examples"] - sum(metrics["train"]["augmented"].values())
    assert metrics["train"]["augmented"] == {"deletion": round(0.1 * base), "typos": round(0.2 * base)}
    copies = f"{round(0.1 * base) + round(0.2 * base)} augmented copies of them (deletion {round(0.1 * base)}, typos {round(0.2 * base)})"
    for report in ("report.md", "report.html"):  # the report counts them too
        assert f"trained on {base} examples and {copies}; validation and test hold none" in (run / report).read_text()
    assert metrics["test"]["num_examples"] == 6 and metrics["validation"]["num_examples"] == 6  # untouched splits
    data = tmp_path / "run.jsonl"
    output = tmp_path / "robust.json"
    assert main(["evaluate", str(run), "--data", str(data), "--robustness", "--output", str(output)]) == 0
    written = json.loads(output.read_text())
    scores = written["robustness"]
    assert f"robustness (10% of words or letters): {scores['metric']} clean" in capsys.readouterr().out
    assert scores["metric"] == yaml.safe_load((run / "config.yaml").read_text())["train"]["metric"]  # the run's (recipe: macro_f1)
    average, _, name = scores["metric"].partition("_")
    assert scores["clean"] == (written[scores["metric"]] if scores["metric"] in written else written[average][name])
    assert all(0 <= scores[kind] <= 1 for kind in ("deletion", "swap", "typos"))
