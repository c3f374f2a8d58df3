"""What the dashboard shows of span tasks and of sequences: the test predictions an NER, relation or
QA run writes (`test_predictions.jsonl`: gold and predicted spans, checked against the run's own
metrics and against `finegrain.load`), served a page at a time, wrong ones first; and the tables
of a continual sequence (its accuracy matrix and backward transfer)."""

import json
import random

import pytest
import yaml
from fastapi.testclient import TestClient

import finegrain
from finegrain import rundir
from finegrain.cli import main
from finegrain.evaluate.predictions import prediction_records
from finegrain.ui.app import create_app
from serve_helpers import train_qa_run, train_relation_run, train_run, train_task_run
from test_ui import SENTIMENT

ENTITIES = {"PER": ["Anna Berg", "Tom"], "LOC": ["Paris", "New York"]}
FILLER = ["lives", "in", "met", "near", "today", "the"]


def write_conll(path, sentences=60, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        for _ in range(rng.randint(2, 6)):
            kind = rng.choice([*sorted(ENTITIES), None, None])
            words = rng.choice(ENTITIES[kind]).split() if kind else [rng.choice(FILLER)]
            tags = [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1) if kind else ["O"]
            lines += [f"{w}\t{t}\n" for w, t in zip(words, tags)]
        lines.append("\n")
    path.write_text("".join(lines))
    return path


def write_tags(path, sentences=40, seed=0):
    """Plain tags (parts of speech) of a toy grammar, for a `data.scheme: plain` run."""
    rng = random.Random(seed)
    lexicon = {"DT": ["the", "a"], "NN": ["dog", "film", "city"], "VBZ": ["runs", "ends"], "JJ": ["old", "long"]}
    lines = []
    for _ in range(sentences):
        lines += [f"{rng.choice(lexicon[tag])}\t{tag}\n" for tag in rng.choice([["DT", "NN", "VBZ"], ["DT", "JJ", "NN"]])]
        lines.append("\n")
    path.write_text("".join(lines))
    return path


def write_sequence(tmp_path, tiny_model_dir, output):
    rng = random.Random(0)
    words = {"sport": "goal match team", "tech": "chip code server", "food": "bread soup salt", "art": "paint stage song"}
    rows = [{"text": " ".join(rng.choice(words[label].split()) for _ in range(4)), "label": label}
            for i in range(64) for label in [list(words)[i % 4]]]
    (tmp_path / "seq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "seq.jsonl"), "max_length": 16},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [-1]},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "threads": 1, "recipe": "off"},
        "continual": {"strategy": "sequential", "classes": [["sport", "tech"], ["food", "art"]]},
    }
    (tmp_path / "seq.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "seq.yaml"), "--output", str(output)]) == 0


def span_runs(tiny_model_dir, tmp_path_factory):
    """A runs directory: runs of every span task (NER also with plain tags), a classification run, and a
    continual sequence of two stages."""
    root = tmp_path_factory.mktemp("ui-spans") / "runs"
    data = tmp_path_factory.mktemp("ui-spans-data")
    root.mkdir()
    conll = write_conll(data / "ner.conll")
    alone = {"word_mix": 0}  # the taggers alone: their word models tag these sentences right, leaving no errors to show
    train_task_run(tiny_model_dir, root / "ner", "ner", conll, sections={"train": {"epochs": 2, "lr": 1e-2}, "head": alone},
                   test=str(write_conll(data / "ner-test.conll", 30, seed=1)), max_length=24)
    train_task_run(tiny_model_dir, root / "pos", "ner", write_tags(data / "pos.conll"), scheme="plain",
                   test=str(write_tags(data / "pos-test.conll", 20, seed=1)), sections={"train": {"epochs": 1}, "head": alone})
    train_relation_run(tiny_model_dir, root / "relation")
    train_qa_run(tiny_model_dir, root / "qa")
    train_run(tiny_model_dir, root / "sentiment", SENTIMENT)
    write_sequence(data, tiny_model_dir, root / "sequence")
    return root


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    return span_runs(tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def client(root):
    with TestClient(create_app(root)) as client:
        yield client


def records(run_dir):
    return [json.loads(line) for line in (run_dir / rundir.TEST_PREDICTIONS).read_text().splitlines()]


def test_ner_predictions_are_the_runs_own(root):
    rows = records(root / "ner")
    predictor = finegrain.load(root / "ner")
    test = predictor.task.load_splits(predictor.config.data).test
    assert len(rows) == len(test) == 30
    predicted = predictor.predict_examples(test)
    for row, example, p in zip(rows, test, predicted):
        assert row["text"] == example.text and row["source"] == example.source
        assert [(e["type"], e["start"], e["end"], e["text"]) for e in row["predicted"]] == \
            [(e["type"], e["start"], e["end"], e["text"]) for e in p["entities"]]
        for entity in row["gold"]:  # gold spans are the words the gold tags cover
            assert row["text"][entity["start"]:entity["end"]] == entity["text"]
            assert any(entity["text"] in names for names in ENTITIES[entity["type"]])
    metrics = json.loads((root / "ner" / rundir.METRICS).read_text())["test"]
    # Every gold entity found in a sentence marked correct; micro recall counts them all.
    found = sum(len({(e["type"], e["start"], e["end"]) for e in r["gold"]} & {(e["type"], e["start"], e["end"]) for e in r["predicted"]})
                for r in rows)
    assert found / sum(len(r["gold"]) for r in rows) == pytest.approx(metrics["micro"]["recall"])


def test_relation_and_qa_predictions_agree_with_the_metrics(root):
    rows = records(root / "relation")
    metrics = json.loads((root / "relation" / rundir.METRICS).read_text())["test"]
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(metrics["accuracy"])
    for row in rows:
        assert row["text"][row["head"]["start"]:row["head"]["end"]] == row["head"]["text"]
        assert (row["gold"] == row["predicted"]) == row["correct"]

    rows = records(root / "qa")
    metrics = json.loads((root / "qa" / rundir.METRICS).read_text())["test"]
    assert sum(r["exact_match"] for r in rows) / len(rows) == pytest.approx(metrics["exact_match"])
    assert sum(r["f1"] for r in rows) / len(rows) == pytest.approx(metrics["f1"], abs=1e-5)
    for row in rows:
        p = row["predicted"]
        assert p["start"] is None or row["context"][p["start"]:p["end"]] == p["answer"]
        assert all(row["context"][a["start"]:a["end"]] == a["text"] for a in row["gold"])


def test_no_predictions_file_for_other_tasks(root):
    assert not (root / "sentiment" / rundir.TEST_PREDICTIONS).exists()
    assert prediction_records("classification", [object()], [{}]) == []


def test_predictions_are_served_a_page_at_a_time_wrong_ones_first(client, root):
    rows = records(root / "qa")
    wrong = [r for r in rows if not r["correct"]]
    assert wrong, "the tiny QA run gets some answers wrong"
    got = client.get("/api/predictions", params={"run": "qa", "limit": 2}).json()
    assert got["task"] == "qa" and got["total"] == len(rows) and got["errors"] == len(wrong) == got["matched"]
    assert got["records"] == wrong[:2]
    everything = client.get("/api/predictions", params={"run": "qa", "errors": "false", "offset": 1, "limit": 200}).json()
    assert everything["records"] == rows[1:]
    assert client.get("/api/predictions", params={"run": "sentiment"}).status_code == 404
    assert client.get("/api/predictions", params={"run": "../qa"}).status_code == 404
    assert client.get("/api/predictions", params={"run": "qa", "limit": 0}).status_code == 422
    assert rundir.TEST_PREDICTIONS in client.get("/api/run", params={"run": "ner"}).json()["files"]


def test_a_continual_sequence_shows_its_tables(client, root):
    listing = client.get("/api/runs").json()
    assert listing["sequences"] == ["sequence"]
    assert {"sequence/stage-0", "sequence/stage-1"} <= {r["id"] for r in listing["runs"]}  # its stages are runs
    got = client.get("/api/continual", params={"sequence": "sequence"}).json()
    assert got == json.loads((root / "sequence" / rundir.METRICS).read_text())["continual"]
    assert [len(row) for row in got["accuracy_matrix"]] == [1, 2]
    for bad in ("sentiment", "sequence/stage-0", "..", "/tmp"):
        assert client.get("/api/continual", params={"sequence": bad}).status_code == 404
    stages = client.get("/api/compare", params={"run": ["sequence/stage-0", "sequence/stage-1"]}).json()
    assert stages["sequences"] == ["sequence"] and stages["sweeps"] == []
    assert client.get("/api/compare", params={"run": ["sequence/stage-0", "ner"]}).json()["sequences"] == []
