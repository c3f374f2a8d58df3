"""`finegrain ensemble`: averaged probabilities of tiny classification runs, loaded and evaluated like one run."""

import json
import random

import pytest
import yaml

import finegrain
from finegrain.calibrate import calibrate_run
from finegrain.cli import main
from finegrain.ensemble import EnsemblePredictor, create_ensemble
from finegrain.errors import FinegrainError

from serve_helpers import train_run, train_task_run, write_jsonl

SENTIMENT = {"fresh": ["great fun film", "a gripping story", "good cast"], "rotten": ["dull and slow", "badly acted", "a bad story"]}
TOPIC = {"film": ["the movie", "the actors"], "food": ["the soup", "good cheese"], "sport": ["the match", "the team"]}
TEXTS = ["great fun film and good cast", "dull and slow", "a gripping story", "badly acted and a bad story"]


def seed_members(tiny_model_dir, root, seeds) -> tuple:
    """The sentiment task's data (60 rows) and one run of it per seed, the last one calibrated: a member
    predicts with its own temperature, an ensemble applies none of its own."""
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        label = rng.choice(sorted(SENTIMENT))
        rows.append({"text": " and ".join(rng.sample(SENTIMENT[label], 2)), "label": label})
    data = write_jsonl(root / "data", rows)
    members = [train_task_run(tiny_model_dir, root / f"seed{seed}", "classification", data, seed=seed) for seed in seeds]
    calibrate_run(members[-1])
    return data, members


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    data, members = seed_members(tiny_model_dir, root, (0, 1))
    return {"members": members, "data": data, "topic": train_run(tiny_model_dir, root / "topic", TOPIC), "root": root}


def test_ensemble_averages_its_members(runs, capsys):
    ensemble = runs["root"] / "ens"
    assert main(["ensemble", *map(str, runs["members"]), "--output", str(ensemble)]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2: test accuracy" in out and "points over the best run" in out
    spec = json.loads((ensemble / "ensemble.json").read_text())
    assert spec["members"] == [str(run.resolve()) for run in runs["members"]] and spec["labels"] == ["fresh", "rotten"]

    predictor = finegrain.load(ensemble)
    assert isinstance(predictor, EnsemblePredictor)
    predicted = predictor.predict(TEXTS)
    alone = [finegrain.load(run).predict(TEXTS) for run in runs["members"]]
    for i, prediction in enumerate(predicted):
        for label in ("fresh", "rotten"):
            mean = sum(member[i]["probabilities"][label] for member in alone) / len(alone)
            assert prediction["probabilities"][label] == pytest.approx(mean, abs=2e-6)
        assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)

    metrics = json.loads((ensemble / "metrics.json").read_text())
    assert [m["run"] for m in metrics["members"]] == spec["members"]
    assert all(m["test"]["num_examples"] == metrics["test"]["num_examples"] for m in metrics["members"])
    assert "calibration" in metrics["test"]
    for name in ("report.md", "report.html", "confusion_matrix.png", "reliability_diagram.png"):
        assert (ensemble / name).is_file(), name


def test_evaluate_and_predict_an_ensemble(runs, capsys, tmp_path):
    ensemble = runs["root"] / "ens2"
    create_ensemble(runs["members"], ensemble)
    output = tmp_path / "metrics.json"
    assert main(["evaluate", str(ensemble), "--data", str(runs["data"]), "--output", str(output)]) == 0
    assert "weighted avg" in capsys.readouterr().out
    metrics = json.loads(output.read_text())
    examples = [json.loads(line) for line in runs["data"].read_text().splitlines()]
    predictions = finegrain.load(ensemble).predict([e["text"] for e in examples])
    right = sum(p["label"] == e["label"] for p, e in zip(predictions, examples))
    assert metrics["num_examples"] == len(examples) and metrics["accuracy"] == pytest.approx(right / len(examples))

    out_file = tmp_path / "predictions.jsonl"
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["predict", str(ensemble), "--input", str(inputs), "--output", str(out_file)]) == 0
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [line["label"] for line in lines] == [p["label"] for p in finegrain.load(ensemble).predict(TEXTS)]
    assert finegrain.load(ensemble).predict([]) == []
    with pytest.raises(FinegrainError, match="give a list of inputs, such as predict"):
        finegrain.load(ensemble).predict(TEXTS[0])  # not its characters, one by one


def test_ensemble_refusals(runs, tmp_path, capsys):
    first, second = map(str, runs["members"])
    cases = [
        ([first, str(tmp_path / "missing")], "missing: no such run directory"),
        ([first, str(runs["topic"])], "labels ['film', 'food', 'sport'] differ from"),
        ([first], "an ensemble needs at least two runs"),
        ([first, second, first], "named twice; an ensemble averages different runs"),
    ]
    for arguments, message in cases:
        assert main(["ensemble", *arguments, "--output", str(tmp_path / "ens")]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ens").exists()

    multi = tmp_path / "multi"
    multi.mkdir()
    config = yaml.safe_load((runs["members"][0] / "config.yaml").read_text())
    config["data"]["multi_label"] = True
    (multi / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FinegrainError, match="a multi-label classification run"):
        create_ensemble([first, multi], tmp_path / "ens")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(FinegrainError, match="exists and is not an ensemble directory"):
        create_ensemble([first, second], taken)
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "ensemble.json").write_text(json.dumps({"members": [first, second]}))
    with pytest.raises(FinegrainError, match="is an ensemble; name its member runs"):
        create_ensemble([first, nested], tmp_path / "ens3")


def test_commands_that_take_one_run_name_an_ensembles_members(runs, tmp_path, capsys):
    """export, calibrate, prune, interpolate, train --resume and a model path said "not a finegrain
    run directory (no config.yaml); pass the --output of finegrain train" of an ensemble."""
    first, second = map(str, runs["members"])
    ens = tmp_path / "ens"
    assert main(["ensemble", first, second, "--output", str(ens)]) == 0
    capsys.readouterr()
    for command in (["export", str(ens), "--format", "hf", "--output", str(tmp_path / "hf")], ["calibrate", str(ens)],
                    ["prune", str(ens), "--layers", "1", "--output", str(tmp_path / "p")], ["interpolate", str(ens)],
                    ["train", "--resume", str(ens)]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert f"{ens}: an ensemble (finegrain ensemble), which this command does not take" in err, err
        assert f"give it one of its runs: {first}, {second}" in err, err
    assert main(["generate", "--model", str(ens), "--prompt", "hi"]) == 1
    assert f"{ens}: an ensemble of finegrain runs, not a model" in capsys.readouterr().err


def test_seed_ensemble_benchmark_scores_every_subset():
    """benchmarks/ensemble_seeds.py: each subset's ensemble votes by its members' mean probabilities,
    and its gains are measured against the best member and the members' mean."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ensemble_seeds.py"
    spec = importlib.util.spec_from_file_location("ensemble_seeds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gold = ["a", "a", "b", "b"]
    p_a = {0: [0.9, 0.4, 0.2, 0.4], 1: [0.4, 0.9, 0.4, 0.2], 2: [0.7, 0.2, 0.9, 0.1]}  # P(a) per text, per seed
    probabilities = {s: [{"label": "a" if p > 0.5 else "b", "probabilities": {"a": p, "b": 1 - p}} for p in ps]
                     for s, ps in p_a.items()}
    accuracies = {s: sum(p["label"] == g for p, g in zip(ps, gold)) / 4 for s, ps in probabilities.items()}
    rows = module.subsets(accuracies, probabilities, ["a", "b"], gold, 2)
    assert [row["seeds"] for row in rows] == [[0, 1], [0, 2], [1, 2]]
    # Seeds 0 and 1 each get 3 of 4; their mean P(a) is 0.65, 0.65, 0.3, 0.3: all 4 right.
    assert rows[0]["members"] == [0.75, 0.75] and rows[0]["ensemble"] == 1.0
    assert rows[0]["over_best"] == pytest.approx(0.25) and rows[0]["over_mean"] == pytest.approx(0.25)
    # Seeds 0 and 2 (3 and 2 of 4 right): mean P(a) 0.8, 0.3, 0.55, 0.25: 2 of 4, below the best member.
    assert rows[1]["ensemble"] == 0.5
    assert rows[1]["over_best"] == pytest.approx(-0.25) and rows[1]["over_mean"] == pytest.approx(-0.125)
    assert "Over 3 ensembles of 2" in module.table(rows, accuracies, 2)
