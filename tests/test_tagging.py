"""Plain tags (`data.scheme: plain`: parts of speech, chunks), scored word by word, and the baselines
every tagging run is set beside: each word's most frequent tag and a logistic regression on word features."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml
from sklearn.metrics import classification_report

from finegrain.data.conll import entity_types, read_token_examples, split_token_examples
from finegrain.data.split import look_alike_labels
from finegrain.errors import FinegrainError
from finegrain.evaluate.baselines import baseline_warning, tagging_baselines
from finegrain.tags import allowed_transitions, check_tags, convert_tags, entities_to_tags, normalize_scheme, tag_set

LEXICON = {"DT": ["the", "a", "this"], "NN": ["dog", "cat", "film", "story"], "VBZ": ["runs", "sleeps", "ends"],
           "JJ": ["good", "old", "long"], "PRP$": ["his", "her"], ".": ["."]}
PATTERNS = [["DT", "NN", "VBZ", "."], ["PRP$", "JJ", "NN", "VBZ", "."], ["DT", "JJ", "NN", "."]]


def pos_file(path, n: int, seed: int):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines += [f"{rng.choice(LEXICON[tag])}\t{tag}" for tag in rng.choice(PATTERNS)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_plain_scheme_leaves_tags_as_they_are():
    assert normalize_scheme("plain") == normalize_scheme("PLAIN") == "plain"
    assert tag_set(["NN", "B-NP", "$"], "plain") == ["NN", "B-NP", "$"]  # no O put first, no prefixes
    assert convert_tags(["I-NP", "B-NP"], "plain") == ["I-NP", "B-NP"]  # not read as entities
    assert check_tags(["NN", "I-NP", ""], "plain") == [(2, "an empty tag")]
    first, pairs, last = allowed_transitions(["I-NP", "O"], "plain")
    assert first.all() and pairs.all() and last.all()
    with pytest.raises(ValueError, match="plain tags are not written from entities"):
        entities_to_tags([("X", 0, 1)], 1, "plain")


def test_plain_files_read_and_split_by_their_tags(tmp_path):
    path = tmp_path / "pos.conll"
    path.write_text("Pierre\tNNP\nhis\tPRP$\n.\t.\n\nruns\tVBZ\nI-NP\tI-NP\n")
    with pytest.raises(FinegrainError, match=r"pos.conll:1: tag .NNP. .* \(--set data.scheme=plain\)"):
        read_token_examples(path)
    examples = read_token_examples(path, scheme="plain").examples
    assert [e.tags for e in examples] == [["NNP", "PRP$", "."], ["VBZ", "I-NP"]]
    assert entity_types(examples, "plain") == [".", "I-NP", "NNP", "PRP$", "VBZ"]
    assert sorted(map(len, split_token_examples(examples * 5, (0.6, 0.4, 0.0), scheme="plain"))) == [0, 4, 6]

    untagged = tmp_path / "untagged.conll"
    untagged.write_text("the\tDT\ndog\t\n")
    for repair in (False, True):  # nothing to repair in a word without its tag
        with pytest.raises(FinegrainError, match=r"untagged.conll:2: word 'dog': an empty tag; fix the row"):
            read_token_examples(untagged, scheme="plain", repair=repair)

    spans = tmp_path / "spans.jsonl"
    spans.write_text(json.dumps({"text": "Anna sings", "entities": [{"start": 0, "end": 4, "type": "PER"}]}) + "\n")
    with pytest.raises(FinegrainError, match=r"spans.jsonl:1: 'entities' spans are entities, and data.scheme: plain "
                                             r"reads a tag per word"):
        read_token_examples(spans, scheme="plain")


def test_tag_baselines_by_hand():
    train_words, train_tags = [["Paris", "is", "nice"], ["Rome", "is", "old"]], [["B-LOC", "O", "O"], ["B-LOC", "O", "O"]]
    eval_words, eval_tags = [["Paris", "and", "Rome"]], [["B-LOC", "O", "B-LOC"]]
    measured = tagging_baselines(train_words, train_tags, eval_words, eval_tags)
    assert measured["majority"]["f1"] == 1.0 and measured["majority"]["per_class"] == {"LOC": 1.0}
    assert "f1" in measured["linear"] and measured["linear"]["seconds"] >= 0

    # Plain: "Paris" was NNP once and NN twice; "and" was never seen, so it gets the commonest tag (NN).
    words = [["Paris", "Paris", "Paris", "but"]]
    plain = tagging_baselines(words, [["NNP", "NN", "NN", "CC"]], [["Paris", "and"]], [["NNP", "CC"]], scheme="plain")
    assert plain["majority"]["accuracy"] == 0.0 and set(plain["majority"]["per_class"]) == {"CC", "NN", "NNP"}
    one_tag = tagging_baselines([["a", "b"]], [["X", "X"]], [["a"]], [["X"]], scheme="plain")
    assert one_tag["linear"] == {"skipped": "the training split holds one tag only"}

    ours = {"task": "ner", "f1": 0.0, "macro": {"f1": 1.0}}  # F1 lost, macro-F1 not
    warning = baseline_warning(ours, {"split": "test", **measured})
    assert warning.startswith("warning: the logistic regression on word features baseline beats finegrain on the test "
                              "split (F1 ") and "macro-F1" not in warning


def test_tags_told_apart_by_a_mark_are_not_one_label_written_two_ways():
    assert "'PRP' and 'PRP$'" in look_alike_labels(["PRP", "PRP$", "NN"])
    assert look_alike_labels(["PRP", "PRP$", "WP", "WP$"], punctuation=False) is None
    assert "'NN' and 'nn' differ only in case or spaces" in look_alike_labels(["NN", "nn"], punctuation=False)


def test_cli_trains_evaluates_and_predicts_plain_tags(tiny_model_dir, tmp_path, capsys):
    from finegrain.cli import main

    train, test = pos_file(tmp_path / "train.conll", 120, 0), pos_file(tmp_path / "test.conll", 30, 1)
    config = {
        "task": "ner",
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(train), "test": str(test), "scheme": "plain", "max_length": 32, "split": [0.8, 0.2, 0.0]},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [1]},
        "train": {"epochs": 2, "lr": 1e-2, "batch_size": 16, "threads": 1, "checkpoint_every": 1000},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["train", str(tmp_path / "run.yaml"), "--output", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "words in 30 sentences" in out and "differ only" not in out  # PRP$ is a tag of its own
    assert json.loads((run_dir / "labels.json").read_text()) == sorted(LEXICON)

    results = json.loads((run_dir / "metrics.json").read_text())
    metrics = results["test"]
    records = [json.loads(line) for line in (run_dir / "test_predictions.jsonl").read_text().splitlines()]
    gold = [tag for r in records for tag in r["gold"]]
    predicted = [tag for r in records for tag in r["predicted"]]
    assert metrics["num_sentences"] == len(records) == 30 and metrics["num_examples"] == len(gold)
    assert metrics["scheme"] == "plain" and metrics["accuracy"] == np.mean(np.array(gold) == np.array(predicted))
    assert all(r["wrong_words"] == [i for i, (g, p) in enumerate(zip(r["gold"], r["predicted"])) if g != p]
               for r in records)
    expected = classification_report(gold, predicted, labels=sorted(LEXICON), output_dict=True, zero_division=0)
    for tag, scores in metrics["per_class"].items():
        assert scores["f1"] == pytest.approx(expected[tag]["f1-score"]) and scores["support"] == expected[tag]["support"]
    assert metrics["macro"]["f1"] == pytest.approx(expected["macro avg"]["f1-score"])

    baselines = results["baselines"]
    assert set(baselines) >= {"majority", "linear"} and baselines["split"] == "test"
    assert baselines["majority"]["accuracy"] == 1.0  # every word of this grammar has one tag
    report = (run_dir / "report.md").read_text()
    assert f"{len(gold):,} words in 30 sentences" in report and "each word's most frequent training tag" in report
    assert (run_dir / "confusion_matrix.png").is_file()

    assert main(["evaluate", str(run_dir), "--data", str(test)]) == 0
    assert "accuracy" in capsys.readouterr().out
    import finegrain

    prediction = finegrain.load(run_dir).predict([["his", "old", "dog", "sleeps", "."]])[0]
    assert len(prediction["tags"]) == 5 and set(prediction["tags"]) <= set(LEXICON) and prediction["entities"] == []

    bioes = ["train", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "bioes"), "--set", "head.scheme=BIOES"]
    assert main(bioes) == 1 and not (tmp_path / "bioes").exists()  # a head scheme plain tags cannot have
    assert "'head.scheme' must be left unset with data.scheme: plain" in capsys.readouterr().err


def test_compare_and_sweep_read_a_taggers_baselines():
    from finegrain.compare import baseline_lines
    from finegrain.sweep import scores_of

    measured = {"split": "test", "majority": {"f1": 0.21, "macro_f1": 0.17, "seconds": 0.03},
                "linear": {"f1": 0.25, "macro_f1": 0.19, "seconds": 2.9}}
    lines = baseline_lines([{"baselines": measured}], "f1")
    assert [(line["model"], line["score"]) for line in lines] == [
        ("each word's most frequent tag", 0.21), ("logistic regression on word features", 0.25)]
    scores = scores_of({"test": {"f1": 0.5, "macro": {"f1": 0.3}}, "baselines": measured})
    assert scores["baseline linear f1"] == 0.25 and scores["baseline majority macro_f1"] == 0.17


def test_words_past_max_length_are_said_not_dropped_in_silence(tiny_model_dir):
    from finegrain.checkpoint.load import load_model
    from finegrain.config import DataConfig
    from finegrain.data.conll import TokenExample
    from finegrain.tasks import long_text_line, long_text_summary
    from finegrain.tasks.tokens import TokenClassificationTask

    _, tokenizer = load_model(str(tiny_model_dir), progress=False)
    task = TokenClassificationTask(["DT", "NN"], scheme="plain")
    long = TokenExample.from_words(["the", "dog"] * 20, ["DT", "NN"] * 20, "x:1")
    short = TokenExample.from_words(["the", "dog"], ["DT", "NN"], "x:2")
    items = task.encode(tokenizer, [long, short], 16)
    cut = items[0].truncated_words
    assert cut > 0 and items[1].truncated_words == 0
    summary = long_text_summary(task, DataConfig(max_length=16), {"train": items, "test": items[1:]})
    assert summary["unit"] == "words" and summary["longer"] == {"train": 1, "test": 0}
    assert summary["truncated"] == {"train": cut, "test": 0}
    whole = task.encode(tokenizer, [long], 1000)[0]
    assert whole.truncated_words == 0 and summary["longest"] == {"train": len(whole.input_ids), "test": 0}
    enough = 16 * -(-len(whole.input_ids) // 16)
    assert task.encode(tokenizer, [long], enough)[0].truncated_words == 0  # the length the line names reads it whole
    assert long_text_line(summary) == (f"long sentences: 1 of 2 train, 0 of 1 test sentences are longer than "
                                       f"data.max_length=16 tokens; their words past it ({cut} train) are not "
                                       "read by the model (tagged O, or by the word model alone where head.word_mix "
                                       f"mixes one in): raise data.max_length (to {enough}, the longest of them being "
                                       f"{len(whole.input_ids)} tokens)")


def test_a_plain_tag_student_learns_from_a_plain_tag_teacher(tiny_model_dir, tmp_path):
    from finegrain.cli import main

    train = pos_file(tmp_path / "train.conll", 60, 0)
    config = {
        "task": "ner", "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(train), "scheme": "plain", "max_length": 32, "split": [0.7, 0.15, 0.15]},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [1]},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 16, "threads": 1, "checkpoint_every": 1000},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "teacher")]) == 0
    student = ["train", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "student"), "--set", "model.num_layers=1",
               "--set", f"distill.teacher={tmp_path / 'teacher'}", "--set", "lora.layers=[0]"]
    assert main(student) == 0
    results = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert results["test"]["scheme"] == "plain" and 0.0 <= results["test"]["accuracy"] <= 1.0
