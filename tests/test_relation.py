"""Relation extraction: readers (SemEval-2010 Task 8 text, JSON lines), marking and windows, the
marker-embedding model, the metrics (against scikit-learn and the SemEval scorer's rules), and
training, evaluation and prediction end to end on the tiny model."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_tokenizer

from finegrain.checkpoint.load import load_model
from finegrain.config import DataConfig, TrainConfig, load_config
from finegrain.data.relation import (
    RelationExample,
    example_from_input,
    load_relation_splits,
    parse_marked,
    read_relation_file,
)
from finegrain.errors import FinegrainError
from finegrain.peft import LoraConfig, apply_lora
from finegrain.tasks import task_class
from finegrain.tasks.relation import (
    RelationTask,
    fit_window,
    marked_text,
    relation_metrics,
    semeval_official_score,
)
from finegrain.train.prefix_cache import lowest_trainable_layer
from finegrain.train.trainer import Trainer

SEMEVAL = Path(__file__).resolve().parent.parent / "examples" / "data" / "semeval"


def record(sentence_id, sentence, label=None, comment=""):
    lines = [f'{sentence_id}\t"{sentence}"'] + ([label, f"Comment:{comment}"] if label else [])
    return "\n".join(lines) + "\n\n"


# -- readers ---------------------------------------------------------------------------------


def test_the_semeval_fixture_reads_in_full():
    splits = load_relation_splits(DataConfig(
        train=str(SEMEVAL / "train.txt"), validation=str(SEMEVAL / "validation.txt"), test=str(SEMEVAL / "test.txt")
    ))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (60, 20, 20)
    relations = ["Cause-Effect", "Component-Whole", "Content-Container", "Entity-Destination", "Entity-Origin",
                 "Instrument-Agency", "Member-Collection", "Message-Topic", "Product-Producer"]
    assert splits.labels == sorted(["Other"] + [f"{r}({d})" for r in relations for d in ("e1,e2", "e2,e1")])
    for example in splits.train + splits.validation + splits.test:
        path, line = example.source.rsplit(":", 1)
        sentence_id, quoted = Path(path).read_text().splitlines()[int(line) - 1].split("\t")
        head, tail = example.span("head")["text"], example.span("tail")["text"]
        assert f"<e1>{head}</e1>" in quoted and f"<e2>{tail}</e2>" in quoted and example.id == sentence_id
        unmarked = quoted[1:-1]
        for marker in ("<e1>", "</e1>", "<e2>", "</e2>"):
            unmarked = unmarked.replace(marker, "")
        assert unmarked == example.text


def test_semeval_records_crlf_comments_and_unlabelled_lines(tmp_path):
    path = tmp_path / "TRAIN_FILE.TXT"
    text = record(1, "The <e1>fire</e1> made <e2>smoke</e2> rise.", "Cause-Effect(e1,e2)", " a note") + record(
        2, "A <e1>cup</e1> of <e2>tea</e2>.", "Other"
    )
    path.write_bytes(text.replace("\n", "\r\n").encode())
    first, second = read_relation_file(str(path)).examples
    assert first.text == "The fire made smoke rise."
    assert (first.span("head")["text"], first.span("tail")["text"]) == ("fire", "smoke")
    assert (first.label, first.source) == ("Cause-Effect(e1,e2)", f"{path}:1")
    assert (second.label, second.source) == ("Other", f"{path}:5")

    joined = tmp_path / "JOINED.txt"  # two files joined with cat, the second saved with a BOM
    joined.write_bytes(b"\xef\xbb\xbf" + text.encode() + b"\xef\xbb\xbf" + record(3, "A <e1>cup</e1> of <e2>tea</e2>.", "Other").encode())
    assert [e.id for e in read_relation_file(str(joined)).examples] == ["1", "2", "3"]

    unlabelled = tmp_path / "TEST_FILE.txt"  # the official test file: sentence lines only
    unlabelled.write_text('8001\t"The <e1>fire</e1> made <e2>smoke</e2>."\n8002\t"A <e1>cup</e1> of <e2>tea</e2>."\n')
    examples = read_relation_file(str(unlabelled), require_label=False).examples
    assert [(e.id, e.label) for e in examples] == [("8001", None), ("8002", None)]
    with pytest.raises(FinegrainError, match=r"TEST_FILE.txt:1: no label line"):
        read_relation_file(str(unlabelled))


@pytest.mark.parametrize("content, message", [
    (record(1, "The fire made <e2>smoke</e2>.", "Other"), r"bad.txt:1: no <e1> in the sentence"),
    (record(1, "The <e1>fire</e1> made <e1>smoke</e1>.", "Other"), r"bad.txt:1: <e1> 2 times"),
    (record(1, "The </e1>fire<e1> made <e2>smoke</e2>.", "Other"), r"bad.txt:1: </e1> comes before <e1>"),
    (record(1, "The <e1> </e1> made <e2>smoke</e2>.", "Other"), r"bad.txt:1: 'head' \[4, 5\] covers only whitespace"),
    (record(1, "The <e1>fire <e2>made</e1> smoke</e2>.", "Other"),
     r"bad.txt:1: head \[4, 13\] and tail \[9, 19\] overlap"),
    (record(1, "The <e1>fire</e1> made <e2>smoke</e2>.", "Cause Effect"), r"bad.txt:2: label line 'Cause Effect'"),
    (record(1, "A <e1>b</e1> <e2>c</e2>", "Other") * 2, r"bad.txt:5: sentence id 1"),
    ("The <e1>fire</e1> made <e2>smoke</e2>.\nOther\n", r"bad.txt:1: expected a sentence line"),
    (record(1, "A <e1>b</e1> <e2>c</e2>", "Other") + "Other\n", r"bad.txt:5: expected a sentence line"),
    (record(1, "A <e1>b</e1> <e2>c</e2>", "Other").rstrip() + "\nOther\n", r"bad.txt:4: unexpected line 'Other'"),
])
def test_semeval_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(FinegrainError, match=message) as error:
        read_relation_file(str(path))
    assert "\n" not in str(error.value)


def test_skip_bad_rows_keeps_the_good_records_and_the_reasons(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text(
        record(1, "The <e1>fire</e1> made <e2>smoke</e2>.", "Cause-Effect(e1,e2)")
        + "stray words\nOther\nComment:\n\n"
        + record(3, "No markers here.", "Other")
        + record(4, "A <e1>cup</e1> of <e2>tea</e2>.", "Content-Container(e2,e1)")
    )
    result = read_relation_file(str(path), skip_bad_rows=True)
    assert [e.id for e in result.examples] == ["1", "4"]
    assert [s.split(": ")[0] for s in result.skipped] == [f"{path}:5", f"{path}:9"]


def test_relation_ids_as_hugging_face_writes_them_read_with_their_names(tmp_path):
    """Hugging Face's SemEval-2010 Task 8 written with to_json: {"sentence": marked text, "relation": id}."""
    rows = [{"sentence": f"The <e1>fire</e1> caused the <e2>smoke</e2> {i}", "relation": i % 3} for i in range(30)]
    path = tmp_path / "sem_eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    names = ["Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Other"]
    examples = read_relation_file(str(path), "sentence", "relation", label_names=names).examples
    assert [e.label for e in examples[:3]] == names and examples[0].text == "The fire caused the smoke 0"
    data = DataConfig(train=str(path), text_field="sentence", label_field="relation", label_names=names)
    assert load_relation_splits(data).labels == sorted(names)
    with pytest.raises(FinegrainError, match=rf"^{path}:3: label '2' is not an id of data.label_names, which names 2"):
        read_relation_file(str(path), "sentence", "relation", label_names=names[:2])
    assert read_relation_file(str(path), "sentence", "relation", require_label=False, label_names=names[:2]).examples


def test_jsonl_offsets_markers_and_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"text": "Smoke rose from the fire.", "head": [20, 24], "tail": [0, 5], "label": "Cause-Effect(e1,e2)",
         "id": 7},
        {"sentence": "The <e1>cup</e1> held <e2>tea</e2>.", "relation": "Content-Container(e2,e1)"},
    ]
    path.write_text(json.dumps(rows[0]) + "\n")
    (example,) = read_relation_file(str(path)).examples
    assert (example.span("head")["text"], example.span("tail")["text"], example.id) == ("fire", "Smoke", "7")
    path.write_text(json.dumps(rows[1]) + "\n")
    (example,) = read_relation_file(str(path), text_field="sentence", label_field="relation").examples
    assert (example.text, example.head, example.tail) == ("The cup held tea.", (4, 7), (13, 16))

    bad = [
        ({"text": "short", "head": [0, 2], "tail": [3, 9], "label": "x"}, r"'tail' \[3, 9\] is outside the text"),
        ({"text": "short", "head": [2, 2], "tail": [3, 4], "label": "x"}, r"'head' \[2, 2\] is empty"),
        ({"text": "short", "head": [0, 3], "tail": [2, 4], "label": "x"}, r"head \[0, 3\] and tail \[2, 4\] overlap"),
        ({"text": "short", "head": "0-2", "tail": [3, 4], "label": "x"}, r"'head' must be \[start, end\]"),
        ({"text": "plain text", "label": "x"}, r"no 'head' and 'tail' offsets"),
        ({"text": "a <e1>b</e1> c", "head": [0, 1], "tail": [2, 3], "label": "x"}, r"the text contains '<e1>'"),
    ]
    for row, message in bad:
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(FinegrainError, match=rf"data.jsonl:2: {message}"):
            read_relation_file(str(path))


def test_unknown_relation_in_validation_names_the_line(tmp_path):
    validation = tmp_path / "validation.txt"
    validation.write_text(record(5, "The <e1>fire</e1> made <e2>smoke</e2>.", "Other")
                          + record(6, "The <e1>fire</e1> made <e2>smoke</e2>.", "Cause-Effekt(e1,e2)"))
    with pytest.raises(FinegrainError, match=r"validation.txt:5: unknown label 'Cause-Effekt\(e1,e2\)'"):
        load_relation_splits(DataConfig(train=str(SEMEVAL / "train.txt"), validation=str(validation)))
    with pytest.raises(FinegrainError, match=r"data.dataset: task relation has no bundled dataset"):
        load_relation_splits(DataConfig(dataset="trec"))


def test_inputs_from_callers():
    marked = example_from_input("The <e1>fire</e1> made <e2>smoke</e2>.", "input:1")
    offsets = example_from_input({"text": "The fire made smoke.", "head": [4, 8], "tail": [14, 19]}, "input:2")
    assert (marked.text, marked.head, marked.tail) == (offsets.text, offsets.head, offsets.tail)
    assert example_from_input(marked, "input:3") is marked
    with pytest.raises(FinegrainError, match=r"input:4: no <e2>"):
        example_from_input("The <e1>fire</e1> made smoke.", "input:4")
    with pytest.raises(FinegrainError, match=r"input:5: expected a text with <e1>"):
        example_from_input(42, "input:5")


# -- marking and windows ---------------------------------------------------------------------


def test_marked_text_moves_start_markers_before_spaces():
    example = RelationExample("The fire made smoke.", (4, 8), (14, 19), None, "x:1")
    assert marked_text(example) == "The<e1> fire</e1> made<e2> smoke</e2>."
    reversed_order = RelationExample("The fire made smoke.", (14, 19), (4, 8), None, "x:1")
    assert marked_text(reversed_order) == "The<e2> fire</e2> made<e1> smoke</e1>."
    adjacent = RelationExample("ab  cd", (0, 4), (4, 6), None, "x:1")  # the head ends in spaces
    assert marked_text(adjacent) == "<e1>ab  </e1><e2>cd</e2>"
    for example in (example, reversed_order, adjacent):  # the markers only add the leading spaces to the entities
        text, head, tail = parse_marked(marked_text(example))
        assert text == example.text and (head[1], tail[1]) == (example.head[1], example.tail[1])
        assert text[head[0] : head[1]].strip() == example.span("head")["text"].strip()


def test_marked_ids_keep_the_entity_tokens_of_the_plain_sentence():
    tokenizer = tiny_tokenizer()
    task = RelationTask(["a", "b"])
    example = RelationExample("the movie was good and the story was bad", (4, 9), (27, 32), None, "x:1")
    (item,) = task.encode(tokenizer, [example], 64)
    markers = [tokenizer.token_to_id(m) for m in ("<e1>", "</e1>", "<e2>", "</e2>")]
    assert markers == list(range(300, 304))  # new ids, past the base vocabulary
    plain = tokenizer.encode(example.text, add_special_tokens=False)
    assert [i for i in item.input_ids if i not in markers] == plain
    assert item.positions == (item.input_ids.index(markers[1]), item.input_ids.index(markers[3]))


def test_fit_window_keeps_the_entities():
    markers = [101, 102, 103, 104]
    ids = list(range(10)) + [101, 50, 102] + list(range(20, 30)) + [103, 60, 104] + list(range(30, 40))
    near = fit_window(ids, markers, 24, "x:1")  # room for the span and some of the text before it
    assert near == ids[2:26] and near[-1] == 104
    far = fit_window(ids, markers, 10, "x:1")  # the words between the entities are cut in the middle
    assert far == [101, 50, 102, 20, 21, 28, 29, 103, 60, 104]
    assert fit_window(ids, markers, len(ids), "x:1") == ids
    with pytest.raises(FinegrainError, match=r"x:1: the two entities take 6 tokens"):
        fit_window(ids, markers, 5, "x:1")


# -- the model -------------------------------------------------------------------------------


def relation_model(tiny_model_dir, labels=("a", "b", "c"), bidirectional=False):
    llama, tokenizer = load_model(tiny_model_dir, progress=False)
    llama.model.config.causal = not bidirectional
    task = RelationTask(list(labels), no_relation=None)
    torch.manual_seed(0)
    return task, task.build_model(llama, tokenizer), tokenizer


EXAMPLES = [
    RelationExample("the movie was good", (4, 9), (14, 18), "a", "x:1"),
    RelationExample("the story was bad and the actors were fine", (26, 32), (4, 9), "b", "x:2"),
]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_batches_equal_single_examples(tiny_model_dir, bidirectional):
    task, model, tokenizer = relation_model(tiny_model_dir, bidirectional=bidirectional)
    items = task.encode(tokenizer, EXAMPLES, 64)
    with torch.no_grad():
        together = model.eval()(task.collate(items, tokenizer.pad_token_id))
        alone = torch.cat([model(task.collate([item], tokenizer.pad_token_id)) for item in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_only_a_bidirectional_model_reads_text_after_the_entities(tiny_model_dir):
    changed = RelationExample("the movie was good and fine", (4, 9), (14, 18), None, "x:1")
    for bidirectional in (False, True):
        task, model, tokenizer = relation_model(tiny_model_dir, bidirectional=bidirectional)
        items = task.encode(tokenizer, [EXAMPLES[0], changed], 64)
        with torch.no_grad():
            logits = [model.eval()(task.collate([item], tokenizer.pad_token_id)) for item in items]
        assert torch.allclose(*logits, atol=1e-6) != bidirectional


def test_markers_train_in_their_own_module_and_the_base_embeddings_stay(tiny_model_dir):
    task, model, tokenizer = relation_model(tiny_model_dir)
    base = model.model.embed_tokens.weight.detach().clone()
    assert base.shape[0] == 300  # the markers' ids (300-303) are not rows of the base matrix
    lora = LoraConfig(r=2, targets=["q_proj", "v_proj"], layers=[1], modules_to_save=list(task.head_modules))
    apply_lora(model, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "marker_embeddings.weight" in trainable and "score.weight" in trainable
    assert not any("embed_tokens" in n for n in trainable)
    # Inputs change with the marker embeddings: no frozen prefix may be cached.
    assert lowest_trainable_layer(model, len(model.model.layers)) == 0
    items = task.encode(tokenizer, EXAMPLES, 64)
    batch = task.collate(items, tokenizer.pad_token_id)
    before = model.marker_embeddings.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    torch.nn.functional.cross_entropy(model(batch), torch.tensor([0, 1])).backward()
    optimizer.step()
    assert not torch.equal(model.marker_embeddings.weight, before)
    torch.testing.assert_close(model.model.embed_tokens.weight, base, rtol=0, atol=0)


def test_training_learns_the_direction_only_the_markers_tell(tiny_model_dir, tmp_path):
    """The same two words, the relation's direction given only by which one is marked <e1>."""
    rng = random.Random(0)
    words = ["movie", "story", "actors", "film", "cast", "hours"]
    examples = []
    for i in range(48):
        first, second = rng.sample(words, 2)
        text = f"the {first} was good and the {second} was bad"
        spans = [(4, 4 + len(first)), (text.index(second, 12), text.index(second, 12) + len(second))]
        forward = i % 2 == 0
        head, tail = spans if forward else spans[::-1]
        examples.append(RelationExample(text, head, tail, "Rel(e1,e2)" if forward else "Rel(e2,e1)", f"x:{i}"))
    task, model, tokenizer = relation_model(tiny_model_dir, ["Rel(e1,e2)", "Rel(e2,e1)"])
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", modules_to_save=list(task.head_modules)))
    train, validation = task.encode(tokenizer, examples[:40], 32), task.encode(tokenizer, examples[40:], 32)
    config = TrainConfig(epochs=8, lr=1e-2, batch_size=8, warmup_ratio=0.0, checkpoint_every=1000, seed=0)
    trainer = Trainer(model, task, train, config, tmp_path, tokenizer.pad_token_id, validation,
                      lambda predictions: task.metrics(predictions, [e.label for e in examples[40:]]), progress=False)
    state = trainer.fit()
    assert trainer.start_layer == 0
    assert state.best_validation["accuracy"] == 1.0


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_match_scikit_learn_with_the_relations_as_labels():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = ["A(e1,e2)", "A(e2,e1)", "B(e1,e2)", "B(e2,e1)", "Other"]
    rng = np.random.default_rng(0)
    gold = list(rng.choice(labels, 200, p=[0.15, 0.15, 0.15, 0.15, 0.4]))
    predicted = [g if rng.random() < 0.6 else rng.choice(labels) for g in gold]
    metrics = relation_metrics(gold, predicted, labels, "Other")
    relations = labels[:4]
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            gold, predicted, labels=relations, average=average, zero_division=0
        )
        assert metrics[average]["precision"] == pytest.approx(p)
        assert metrics[average]["recall"] == pytest.approx(r)
        assert metrics[average]["f1"] == pytest.approx(f)
    assert metrics["f1"] == metrics["micro"]["f1"] and metrics["task"] == "relation"
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    assert [metrics["per_class"][label]["f1"] for label in labels] == pytest.approx(list(f))
    # Without a no-relation label every label counts: micro F1 is the accuracy.
    assert relation_metrics(gold, predicted, labels, None)["f1"] == pytest.approx(accuracy_score(gold, predicted))


def test_semeval_official_score_follows_the_scorer():
    gold = ["A(e1,e2)", "A(e1,e2)", "A(e2,e1)", "B(e1,e2)", "Other", "Other"]
    predicted = ["A(e1,e2)", "A(e2,e1)", "A(e2,e1)", "A(e1,e2)", "B(e2,e1)", "Other"]
    score = semeval_official_score(gold, predicted)
    # A: 2 right (direction included) of 4 predicted A (any direction, the wrong-direction one
    # counted) and 3 gold A. B: 0 right of 1 predicted and 1 gold. Other is left out.
    a_f1 = 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)
    assert score["per_relation"]["A"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": a_f1, "support": 3})
    assert score["per_relation"]["B"]["f1"] == 0.0
    assert score["f1"] == pytest.approx(a_f1 / 2)
    assert semeval_official_score(["x", "y"], ["x", "x"], None) is None  # not SemEval-style labels
    assert "semeval_f1" in relation_metrics(gold, predicted, sorted(set(gold) | set(predicted)), "Other")


# -- configuration and the whole run ---------------------------------------------------------


def run_config(tmp_path, tiny_model_dir, **overrides):
    config = {
        "task": "relation",
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(SEMEVAL / "train.txt"), "validation": str(SEMEVAL / "validation.txt"),
                 "test": str(SEMEVAL / "test.txt"), "max_length": 48},
        "lora": {"r": 4, "alpha": 8, "layers": [-1]},
        "train": {"epochs": 2, "lr": 5e-3, "batch_size": 16, "threads": 1, "checkpoint_every": 1000},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_errors_name_the_key(tmp_path, tiny_model_dir):
    labels = ["Other", "Rel(e1,e2)"]
    for overrides, message in [
        ({"relation": {"no_relation": "other"}}, r"relation.no_relation: 'other' is not a label"),
        ({"data": {"template": "Text: {text}"}}, r"data.template: task relation"),
        ({"data": {"multi_label": True}}, r"data.multi_label"),
    ]:
        path = run_config(tmp_path, tiny_model_dir)
        values = yaml.safe_load(path.read_text())
        for section, entries in overrides.items():
            values.setdefault(section, {}).update(entries)
        path.write_text(yaml.safe_dump(values))
        with pytest.raises(FinegrainError, match=message):
            task_class("relation").from_config(load_config(path), labels)
    path = run_config(tmp_path, tiny_model_dir)
    config = load_config(path, ["relation.no_relation=null"])
    assert task_class("relation").from_config(config, labels).no_relation is None


def test_cli_train_evaluate_predict_relation(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import io

    import finegrain
    from finegrain.cli import main
    from finegrain.peft.base import read_adapter

    run_dir = tmp_path / "run"
    assert main(["train", str(run_config(tmp_path, tiny_model_dir)), "--output", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "micro avg" in out and "SemEval-2010 Task 8 official score" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics["test"]
    assert test["num_examples"] == 20 and 0.0 <= test["f1"] <= 1.0 and "semeval_f1" in test
    assert metrics["train"]["frozen_prefix_layers"] == 0
    assert len(json.loads((run_dir / "labels.json").read_text())) == 19
    for name in ("report.md", "report.html", "confusion_matrix.png", "learning_curve.png"):
        assert (run_dir / name).is_file()
    assert "averages leave out 'Other'" in (run_dir / "report.md").read_text()
    config, tensors = read_adapter(run_dir / "adapter")
    assert config.modules_to_save == ["marker_embeddings", "score"]
    assert tensors["marker_embeddings.weight"].shape == (4, 64) and tensors["score.weight"].shape == (19, 128)
    assert not any("embed_tokens" in key for key in tensors)

    evaluated = tmp_path / "evaluation.json"
    assert main(["evaluate", str(run_dir), "--data", str(SEMEVAL / "test.txt"), "--output", str(evaluated)]) == 0
    assert "micro avg" in capsys.readouterr().out
    assert json.loads(evaluated.read_text())["f1"] == pytest.approx(test["f1"])

    predictions = tmp_path / "predictions.jsonl"
    assert main(["predict", str(run_dir), "--input", str(SEMEVAL / "test.txt"), "--output", str(predictions)]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["id"] == "8001"
    assert rows[0]["text"][rows[0]["head"]["start"] : rows[0]["head"]["end"]] == rows[0]["head"]["text"] == "juice"
    unseen = tmp_path / "unseen.txt"  # predicting needs no known labels
    unseen.write_text(record(1, "The <e1>fire</e1> made <e2>smoke</e2>.", "Made-Of(e1,e2)"))
    assert main(["predict", str(run_dir), "--input", str(unseen), "--output", str(predictions)]) == 0
    assert json.loads(predictions.read_text())["head"]["text"] == "fire"
    monkeypatch.setattr("sys.stdin", io.StringIO("The <e1>fire</e1> made <e2>smoke</e2>.\n"))
    assert main(["predict", str(run_dir), "--input", "-"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["tail"] == {"start": 14, "end": 19, "text": "smoke"}

    predictor = finegrain.load(run_dir)
    results = predictor.predict(
        ["The <e1>fire</e1> made <e2>smoke</e2>.", {"text": "The fire made smoke.", "head": [4, 8], "tail": [14, 19]}]
    )
    assert results[0]["probabilities"] == results[1]["probabilities"]
    assert set(results[0]) == {"label", "probabilities", "head", "tail"}
    probabilities = results[0]["probabilities"]
    assert results[0]["label"] == max(probabilities, key=probabilities.get)
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-4)
    with pytest.raises(FinegrainError, match=r"input:1: 'head' \[4, 30\] is outside the text"):
        predictor.predict([{"text": "The fire made smoke.", "head": [4, 30], "tail": [0, 3]}])


@pytest.mark.real_model
def test_real_tokenizer_markers_are_new_tokens_and_entities_keep_their_tokens():
    from finegrain.tasks.relation import marker_ids

    llama, tokenizer = load_model(None, progress=False)
    examples = read_relation_file(str(SEMEVAL / "test.txt")).examples
    task = RelationTask(sorted({e.label for e in examples}))
    items = task.encode(tokenizer, examples, 64)
    markers = marker_ids(tokenizer)
    assert min(markers) >= llama.model.embed_tokens.weight.shape[0]  # the base matrix keeps its 49,152 rows
    for item, example in zip(items, examples):
        plain = tokenizer.encode(example.text, add_special_tokens=False)
        assert [i for i in item.input_ids if i not in markers] == plain
    llama.model.layers = llama.model.layers[:2]
    with torch.no_grad():
        logits = task.build_model(llama, tokenizer).eval()(task.collate(items, tokenizer.pad_token_id))
    assert logits.shape == (20, len(task.labels)) and torch.isfinite(logits).all()
