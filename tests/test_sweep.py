"""`finegrain sweep`: seeds, k-shot sizes and folds, mean ± std, and a killed sweep continuing."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

import finegrain.run
import finegrain.sweep
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.data.pipeline import per_class
from finegrain.data.readers import Example
from finegrain.errors import FinegrainError
from finegrain.sweep import SUMMARY, summarise, sweep
from finegrain.tasks import task_class
from test_train import write_config, write_data


def test_per_class_keeps_k_of_each_label_and_refuses_unlabelled_examples():
    examples = [Example(text=str(i), label="a" if i % 3 else "b", source=f"d:{i}") for i in range(30)]
    kept = per_class(examples, 4, seed=1)
    assert Counter(e.label for e in kept) == {"a": 4, "b": 4}
    assert kept == [e for e in examples if e in kept]  # input order
    assert per_class(examples, 4, seed=1) == kept and per_class(examples, 4, seed=2) != kept
    assert len(per_class(examples, 50, seed=0)) == 30  # a label with fewer keeps them all
    with pytest.raises(FinegrainError, match="data.shots: k examples per class needs one class label"):
        per_class([Example(text="x", label=["a", "b"], source="d:1")], 1, seed=0)


def test_folds_test_every_example_once(tiny_model_dir, tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 40)),
                         ["data.folds=4"])
    tested = []
    for fold in range(4):
        config.data.fold = fold
        splits = task_class("classification").load_splits(config.data)
        assert len(splits.test) == 10 and splits.validation and not set(map(id, splits.test)) & set(map(id, splits.train))
        tested += [e.source for e in splits.test]
    assert len(tested) == len(set(tested)) == 40
    with pytest.raises(FinegrainError, match="'data.fold' must be between 0 and data.folds - 1"):
        load_config(None, ["data.train=x.jsonl", "data.folds=4", "data.fold=4"])


def test_summarise_gives_the_t_interval_of_the_mean():
    s = summarise([0.7, 0.8, 0.9])
    assert s["mean"] == pytest.approx(0.8) and s["std"] == pytest.approx(0.1)
    assert s["high"] - s["mean"] == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)  # t(0.975, 2)
    assert summarise([0.5]) == {"mean": 0.5, "std": 0.0, "low": 0.5, "high": 0.5, "n": 1}


def test_sweep_over_seeds_and_shots_writes_its_table_and_continues_after_a_kill(tiny_model_dir, tmp_path, monkeypatch):
    config_path = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 60), epochs=1)
    output = tmp_path / "sweep"
    assert main(["sweep", str(config_path), "--seeds", "2", "--shots", "4,8", "--output", str(output),
                 "--set", "train.recipe=off"]) == 0
    summary = json.loads((output / SUMMARY).read_text())
    assert [r["name"] for r in summary["runs"]] == ["shots-4/seed-0", "shots-4/seed-1", "shots-8/seed-0", "shots-8/seed-1"]
    for run in summary["runs"]:
        assert json.loads((output / run["name"] / "metrics.json").read_text())["train"]["examples"] == 2 * run["shots"]
    accuracy = summary["summary"]["4"]["accuracy"]
    values = [r["scores"]["accuracy"] for r in summary["runs"] if r["shots"] == 4]
    assert accuracy["mean"] == pytest.approx(sum(values) / 2) and accuracy["n"] == 2
    assert "baseline tfidf accuracy" in summary["summary"]["8"]
    assert (output / "sweep.md").read_text().startswith("# Sweep") and (output / "sweep.png").stat().st_size > 1000

    # A sweep killed during its last run: run again, it reads the finished runs back and trains the rest.
    shutil.rmtree(output / "shots-8" / "seed-1")
    finished = (output / "shots-4" / "seed-0" / "metrics.json").read_text()
    trained = []
    real_train = finegrain.run.train
    monkeypatch.setattr(finegrain.run, "train", lambda config, **kw: trained.append(config.output) or real_train(config, **kw))
    again = sweep(load_config(config_path, ["train.recipe=off"]), output, seeds=2, shots=[4, 8, 4], progress=False)
    assert trained == [str(output / "shots-8" / "seed-1")]  # and a size named twice is one size
    assert again["shots"] == [4, 8] and len(again["runs"]) == 4
    assert (output / "shots-4" / "seed-0" / "metrics.json").read_text() == finished
    assert again["summary"]["4"] == summary["summary"]["4"]

    # Run again with another setting, it would have reported the old runs as the new ones.
    table = (output / SUMMARY).read_bytes()
    with pytest.raises(FinegrainError, match=r"shots-4/seed-0: this run has train.weight_decay: 0.0 \(not set: the "
                       r"recipe's or the default\) and this command sets 0.5; to go on, run the command as it was first run"):
        sweep(load_config(config_path, ["train.recipe=off", "train.weight_decay=0.5"]), output, seeds=2, shots=[4, 8],
              progress=False)
    with pytest.raises(FinegrainError, match=r"this run has train.recipe: False \(set\) and this command leaves it unset"):
        sweep(load_config(config_path), output, seeds=2, shots=[4, 8], progress=False)
    assert (output / SUMMARY).read_bytes() == table

    # Run again after the training file was edited: the finished runs' scores are of the file as it was.
    data = tmp_path / "d.jsonl"
    rows = data.read_text()
    data.write_text(rows + json.dumps({"text": "a late row", "label": "fresh"}) + "\n")
    with pytest.raises(FinegrainError, match=rf"shots-4/seed-0: {data} changed since this run was trained on it, and its "
                       r"scores are of the file as it was; to go on, put the file back as it was, or choose another --output"):
        sweep(load_config(config_path, ["train.recipe=off"]), output, seeds=2, shots=[4, 8], progress=False)
    assert (output / SUMMARY).read_bytes() == table
    data.write_text(rows)
    assert sweep(load_config(config_path, ["train.recipe=off"]), output, seeds=2, shots=[4, 8], progress=False)["summary"] \
        == again["summary"]  # the same runs as after the kill (shots-8/seed-1's train_seconds are its second run's)


def test_a_size_some_class_cannot_fill_is_marked(tiny_model_dir, tmp_path):
    """k per class beyond what a class's training split holds trains on all of it: said, not hidden."""
    config_path = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 60), epochs=1)
    summary = sweep(load_config(config_path, ["train.recipe=off"]), tmp_path / "sweep", seeds=1, shots=[4, 40],
                    progress=False)
    assert summary["short_shots"] == [40]
    assert summary["summary"]["4"]["train_examples"]["mean"] == 8 and summary["summary"]["40"]["train_examples"]["mean"] < 80
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "## 4 training examples per class\n" in table
    assert "## 40 training examples per class (fewer in some classes" in table


def test_bad_sweep_arguments_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    config_path = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 20))
    assert main(["sweep", str(config_path), "--shots", "8,x", "--output", str(tmp_path / "s")]) != 0
    assert "--shots: '8,x' is not a list of whole numbers" in capsys.readouterr().err
    assert main(["sweep", str(config_path), "--folds", "3", "--set", f"data.test={tmp_path / 'd.jsonl'}",
                 "--output", str(tmp_path / "s")]) != 0
    assert "--folds: data.test" in capsys.readouterr().err
    assert main(["sweep", str(config_path), "--prompted", "0,-1", "--output", str(tmp_path / "s")]) != 0
    assert "--prompted: give numbers of examples per class of 0 (zero-shot) or more" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_commands_of_several_runs_refuse_a_run_directory_as_output(tiny_model_dir, tmp_path, capsys):
    """sweep, tune and compare given one run's directory as --output wrote their runs, study and
    logs among its files; now each refuses it and leaves it as it was."""
    config_path = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 20))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: classification\n")
    (run / "metrics.json").write_text("{}")
    for argv, what in ((["sweep", "--seeds", "2"], "the sweep"),
                       (["tune", "--space", "train.lr=1e-4|1e-3", "--trials", "2"], "the study"),
                       (["compare", "--models", str(tiny_model_dir)], "the comparison")):
        assert main([argv[0], str(config_path), *argv[1:], "--output", str(run)]) == 1
        err = capsys.readouterr().err
        assert f"{run}: holds a single run; choose another --output for {what}" in err and err.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.json"]


def test_prompted_labels_take_the_label_with_the_highest_mean_log_probability(tiny_model_dir):
    import torch.nn.functional as F

    from finegrain.checkpoint.load import load_model
    from finegrain.evaluate.prompting import prompt_messages, prompted_labels

    llama, tokenizer = load_model(str(tiny_model_dir), progress=False)
    labels = ["fresh", "rotten", "so so"]
    texts = ["great fun film", "dull and slow"]
    chosen = prompted_labels(llama, tokenizer, texts, labels, batch_size=4)
    for text, label in zip(texts, chosen):
        prompt = tokenizer.encode(tokenizer.apply_chat_template(prompt_messages(text, labels)), add_special_tokens=False)
        scores = []
        for candidate in labels:
            ids = tokenizer.encode(" " + candidate, add_special_tokens=False)
            logprobs = F.log_softmax(llama(torch.tensor([prompt + ids])).float(), -1)[0]
            scores.append(sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids)) / len(ids))
        assert label == labels[max(range(len(labels)), key=scores.__getitem__)]


def test_a_sweep_adds_the_prompted_baselines(tiny_model_dir, tmp_path):
    config_path = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 40), epochs=1)
    summary = sweep(load_config(config_path, ["train.recipe=off"]), tmp_path / "s", seeds=1, prompted=[0, 1],
                    progress=False)
    scores = summary["runs"][0]["scores"]
    assert 0 <= scores["baseline prompted 0-shot accuracy"] <= 1 and "baseline prompted 1-shot macro_f1" in scores
    assert (tmp_path / "s" / "all" / "seed-0" / "prompted.json").is_file()
