"""Continual learning: class- and task-incremental sequences, replay buffers, the accuracy matrix."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from finegrain.cli import main
from finegrain.config import load_config
from finegrain.continual import replay_buffer, stage_training, class_stages, transfer, train_sequence
from finegrain.data.readers import Example
from finegrain.errors import FinegrainError
from finegrain.train.ewc import EwcObjective, anchors, fisher_diagonal
from finegrain.train.lwf import LwfObjective, old_head
from finegrain.train.objectives import TaskObjective

from test_train import assert_same_adapter, kill_and_resume, train_cli

WORDS = {"sport": "goal match team", "tech": "chip code server", "food": "bread soup salt", "art": "paint stage song",
         "spam": "win prize now", "ham": "see you soon"}


def write_labelled(path, labels, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            label = labels[i % len(labels)]
            words = WORDS[label].split()
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(4)), "label": label}) + "\n")
    return path


def write_sequence_config(tmp_path, tiny_model_dir, continual, data):
    config = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"max_length": 16, **data},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
        "train": {"epochs": 2, "lr": 1e-2, "batch_size": 8, "threads": 1, "recipe": "off", "checkpoint_every": 5},
        "continual": continual,
    }
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_replay_buffers_keep_earlier_classes():
    earlier = [Example(text=str(i), label="a" if i < 90 else "b", source=f"d:{i}") for i in range(100)]
    balanced = replay_buffer(earlier, 20, "balanced", seed=0)
    assert Counter(e.label for e in balanced) == {"a": 10, "b": 10}
    reservoir = replay_buffer(earlier, 20, "reservoir", seed=0)
    assert len(reservoir) == 20 and len(set(map(id, reservoir))) == 20
    assert replay_buffer(earlier[:5], 20, "balanced", seed=0) == earlier[:5]


def test_transfer_scores():
    summary = transfer([[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]])
    assert summary["average_accuracy"] == pytest.approx(0.7)
    assert summary["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert summary["forgetting"] == pytest.approx([0.4, 0.1])
    assert "fwt" not in summary
    # Forward transfer: each later stage's diagonal score against that stage trained alone (0.7, 0.95).
    assert transfer([[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]], [0.7, 0.95])["fwt"] == pytest.approx(((0.8 - 0.7) + (0.9 - 0.95)) / 2)


def test_class_incremental_sequence_with_replay_and_its_resume(tiny_model_dir, tmp_path, capsys):
    data = write_labelled(tmp_path / "d.jsonl", ["sport", "tech", "food", "art"], 96)
    continual = {"strategy": "replay", "classes": [["sport", "tech"], ["food", "art"]], "buffer_size": 8}
    path = write_sequence_config(tmp_path, tiny_model_dir, continual, {"train": str(data)})
    config = load_config(path)
    stages = class_stages(config)
    assert [s.labels for s in stages] == [["sport", "tech"], ["sport", "tech", "food", "art"]]
    replayed = stage_training(config, stages, 1)
    assert Counter(e.label for e in replayed[len(stages[1].train):]) == {"sport": 4, "tech": 4}

    output = tmp_path / "seq"
    assert main(["train", str(path), "--output", str(output)]) == 0
    results = json.loads((output / "metrics.json").read_text())["continual"]
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    assert results["bwt"] == pytest.approx(results["accuracy_matrix"][1][0] - results["accuracy_matrix"][0][0])
    # Forward transfer: stage 1 trained alone from the base, on its own examples, with the same head and test set.
    reference = load_config(output / "reference" / "stage-1" / "config.yaml")
    assert reference.init_from is None and reference.data.labels == ["sport", "tech", "food", "art"]
    assert len(open(reference.data.train).readlines()) == len(stages[1].train)  # no replayed examples
    assert results["fwt"] == pytest.approx(results["accuracy_matrix"][1][1] - results["fwt_reference"][0])
    assert (output / "accuracy_matrix.png").stat().st_size > 1000
    assert json.loads((output / "stage-1" / "labels.json").read_text()) == ["sport", "tech", "food", "art"]
    assert load_config(output / "stage-1" / "config.yaml").init_from == str(output / "stage-0")
    assert "backward transfer" in capsys.readouterr().out

    # Killed during the last stage: a rerun reads stage 0 back and trains stage 1 again.
    first = (output / "stage-0" / "metrics.json").read_text()
    shutil.rmtree(output / "stage-1")
    again = train_sequence(load_config(path, [f"output={output}"]), progress=False)["continual"]
    assert (output / "stage-0" / "metrics.json").read_text() == first
    assert again["accuracy_matrix"][0] == results["accuracy_matrix"][0]

    # Run again with another strategy, it had read the replay runs back as the new strategy's (the
    # stages' configs do not hold it), and written their data files anew first.
    written = (output / "data" / "stage-1" / "train.jsonl").read_bytes()
    with pytest.raises(FinegrainError, match=r"seq: this run has continual.strategy: 'replay' \(set\) and this command "
                                             r"sets 'sequential'"):
        train_sequence(load_config(path, [f"output={output}", "continual.strategy=sequential"]), progress=False)
    assert (output / "data" / "stage-1" / "train.jsonl").read_bytes() == written


def test_task_incremental_adapters_forget_nothing(tiny_model_dir, tmp_path):
    topics = write_labelled(tmp_path / "topics.jsonl", ["sport", "tech"], 48)
    spam = write_labelled(tmp_path / "spam.jsonl", ["spam", "ham"], 48, seed=1)
    continual = {"strategy": "adapters", "tasks": [{"train": str(topics)}, {"train": str(spam)}]}
    path = write_sequence_config(tmp_path, tiny_model_dir, continual, {})
    results = train_sequence(load_config(path, [f"output={tmp_path / 'seq'}"]), progress=False)["continual"]
    matrix = results["accuracy_matrix"]
    assert results["stages"] == ["stage-0-topics", "stage-1-spam"] and matrix[1][0] == matrix[0][0]
    assert results["bwt"] == 0 and results["kind"] == "task-incremental"


def test_bad_sequences_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    data = write_labelled(tmp_path / "d.jsonl", ["sport", "tech", "food", "art"], 16)
    bad = {"strategy": "replay", "classes": [["sport", "tech"], ["food", "opera"]]}
    path = write_sequence_config(tmp_path, tiny_model_dir, bad, {"train": str(data)})
    assert main(["train", str(path), "--output", str(tmp_path / "seq")]) != 0
    assert "continual.classes: 'opera' is not a label of the data" in capsys.readouterr().err
    adapters = {"strategy": "adapters", "classes": [["sport", "tech"], ["food", "art"]]}
    path = write_sequence_config(tmp_path, tiny_model_dir, adapters, {"train": str(data)})
    with pytest.raises(FinegrainError, match="adapters needs task-incremental stages"):
        train_sequence(load_config(path, [f"output={tmp_path / 'seq2'}"]), progress=False)
    with pytest.raises(FinegrainError, match="'continual.strategy' must be sequential, replay, joint, adapters, ewc or lwf"):
        load_config(path, ["continual.strategy=si"])
    for groups in ("[[sport,tech]]", "[[sport],[tech,food]]", "[[sport,tech],[food,sport]]", "[[sport,tech],[]]"):
        with pytest.raises(FinegrainError, match="'continual.classes' must be two or more groups"):
            load_config(path, [f"continual.classes={groups}"])
    with pytest.raises(FinegrainError, match="'continual.tasks' must be two or more stages"):
        load_config(path, ["continual.classes=null", "continual.tasks=[{train: a.jsonl}]"])


class LinearModel(nn.Module):
    """A bias-free linear classifier over given features: `model(batch, start_layer)` as a task model's."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.score = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.score.weight.data.copy_(weight)

    def forward(self, batch, start_layer=0):
        return self.score(batch["x"])


def linear_items(xs, ys) -> list:
    return [SimpleNamespace(x=x, label=y, input_ids=[0]) for x, y in zip(xs, ys)]


LINEAR_TASK = SimpleNamespace(
    collate=lambda items, pad_id, hidden=None: {"x": torch.stack([item.x for item in items]),
                                                 "labels": torch.tensor([item.label for item in items])},
    loss=lambda logits, batch: F.cross_entropy(logits, batch["labels"]),
    loss_weight=lambda batch: len(batch["labels"]),
    multi_label=False,
)


def test_fisher_is_the_mean_squared_gradient_of_each_example():
    torch.manual_seed(0)
    weight = torch.randn(3, 4)
    xs, ys = torch.randn(5, 4), [0, 2, 1, 1, 0]
    model = LinearModel(weight)
    fisher = fisher_diagonal(model, LINEAR_TASK, linear_items(xs, ys), {"score.weight"}, pad_id=0)
    # By hand: the cross-entropy gradient of one example is (softmax(W x) - onehot(y)) x^T.
    by_hand = torch.zeros(3, 4)
    for x, y in zip(xs, ys):
        residual = torch.softmax(weight @ x, 0) - F.one_hot(torch.tensor(y), 3).float()
        by_hand += torch.outer(residual, x) ** 2
    torch.testing.assert_close(fisher["score.weight"], by_hand / 5)
    # Not the square of the mean gradient (one batch): per-example squares.
    batch = LINEAR_TASK.collate(linear_items(xs, ys), 0)
    (batch_grad,) = torch.autograd.grad(LINEAR_TASK.loss(model(batch), batch), [model.score.weight])
    assert not torch.allclose(fisher["score.weight"], batch_grad**2)


def test_ewc_penalty_is_zero_at_the_earlier_weights_and_grows_away_from_them():
    torch.manual_seed(0)
    earlier = LinearModel(torch.randn(2, 4))
    items = linear_items(torch.randn(6, 4), [i % 2 for i in range(6)])
    fisher = fisher_diagonal(earlier, LINEAR_TASK, items, {"score.weight"}, pad_id=0)
    # The current run's head has a third label (new): its row is free (F = 0), the old rows map by label.
    current = LinearModel(torch.zeros(3, 4))
    with torch.no_grad():
        current.score.weight[[1, 2]] = earlier.score.weight  # labels [new, a, b] against the earlier [a, b]
    params = dict(current.named_parameters())
    theta, weights = anchors(dict(earlier.named_parameters()), fisher, params, ["score"], ["a", "b"], ["new", "a", "b"])
    assert torch.equal(weights["score.weight"][0], torch.zeros(4))
    torch.testing.assert_close(weights["score.weight"][1:], fisher["score.weight"])
    objective = EwcObjective(TaskObjective(LINEAR_TASK, items), params, theta, weights, strength=100.0)
    assert objective.penalty().item() == 0.0  # at theta*
    with torch.no_grad():
        current.score.weight[0] += 5.0  # the new label's row: free
    assert objective.penalty().item() == 0.0
    with torch.no_grad():
        current.score.weight[1] += 0.1
    expected = 100.0 / 2 * float((fisher["score.weight"][0] * 0.1**2).sum())
    assert objective.penalty().item() == pytest.approx(expected, rel=1e-5) and expected > 0
    # The penalty joins the loss and its gradient pulls the moved row back.
    batch = LINEAR_TASK.collate(items, 0)
    loss = objective.loss(current, batch)
    assert loss.item() == pytest.approx(LINEAR_TASK.loss(current(batch), batch).item() + expected, rel=1e-5)


def test_a_same_width_head_of_other_labels_is_not_held():
    # Task-incremental: Rotten Tomatoes (fresh, rotten) then SMS spam (ham, spam), both 2 wide.
    torch.manual_seed(0)
    earlier = LinearModel(torch.randn(2, 4))
    fisher = fisher_diagonal(earlier, LINEAR_TASK, linear_items(torch.randn(6, 4), [0, 1] * 3), {"score.weight"}, pad_id=0)
    params = dict(LinearModel(torch.zeros(2, 4)).named_parameters())
    theta, weights = anchors(dict(earlier.named_parameters()), fisher, params, ["score"], ["fresh", "rotten"],
                             ["ham", "spam"])
    assert theta == {} and weights == {}
    # The same labels in another order: each row is held to its label's row.
    theta, weights = anchors(dict(earlier.named_parameters()), fisher, params, ["score"], ["a", "b"], ["b", "a"])
    torch.testing.assert_close(weights["score.weight"], fisher["score.weight"].flip(0))
    torch.testing.assert_close(theta["score.weight"], earlier.score.weight.detach().flip(0))


def tiny_fisher_setup(tiny_model_dir, overrides, n=40):
    """A tiny task model with a trained-looking adapter and head, its encoded items of many lengths
    (some of each) and their cached states below the adapted layer."""
    from finegrain.run import build
    from finegrain.train.prefix_cache import compute_prefix, lowest_trainable_layer

    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", "data.max_length=12",
                                "lora.r=4", "lora.alpha=8", "lora.targets=all-linear", "lora.layers=[-1]", *overrides])
    labels = ["sport", "tech", "food"]
    torch.manual_seed(0)
    model, tokenizer, task, _ = build(config, labels, progress=False)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # B = 0 at init would leave A's gradients 0
        for name, p in model.named_parameters():
            if name in names:
                p.add_(0.3 * torch.randn_like(p))
    rng = random.Random(0)
    examples = [Example(text=" ".join(rng.choice(WORDS[label].split()) for _ in range(rng.randint(1, 7))), label=label,
                        source=f"x:{i}") for i, label in enumerate(labels[i % 3] for i in range(n))]
    items = task.encode(tokenizer, examples, config.data.max_length)
    start = lowest_trainable_layer(model, len(model.model.layers))
    hidden = compute_prefix(model.model, task, items, start, tokenizer.pad_token_id, 16, False) if start else None
    return model, task, items, names, tokenizer.pad_token_id, hidden, start


@pytest.mark.parametrize("setting", ["lora", "class_weights", "windows", "no_prefix_cache"])
def test_batched_fisher_is_the_one_example_at_a_time_fisher(setting, tiny_model_dir, monkeypatch):
    import finegrain.train.ewc as ewc

    overrides = {"windows": ["data.long_texts=windows", "data.max_length=4", "data.window_stride=2"],
                 "no_prefix_cache": ["lora.layers=null"]}.get(setting, [])
    model, task, items, names, pad_id, hidden, start = tiny_fisher_setup(tiny_model_dir, overrides)
    assert (start == 1) == (setting != "no_prefix_cache")
    if setting == "class_weights":  # a weighted mean over one example is that example's loss
        task.class_weights = torch.tensor([0.5, 2.0, 1.0])
    if setting == "windows":
        assert any(item.row_lengths for item in items) and any(not item.row_lengths for item in items)
    alone = fisher_diagonal(model, task, items, names, pad_id, hidden, start, batch_size=1)
    lengths = Counter(tuple(item.row_lengths or [len(item.input_ids)]) for item in items)
    assert max(lengths.values()) > 1  # some batches hold several examples
    monkeypatch.setattr(ewc, "_single_sums", lambda *a, **k: pytest.fail("the batched path fell back"))
    batched = fisher_diagonal(model, task, items, names, pad_id, hidden, start, batch_size=8)
    assert batched.keys() == alone.keys() == names
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names) and "score.weight" in names
    for name in names:
        assert float(alone[name].sum()) > 0, name
        torch.testing.assert_close(batched[name], alone[name], rtol=1e-4, atol=1e-6 * float(alone[name].max()))


def test_fisher_runs_examples_alone_where_per_example_gradients_do_not_hold(tiny_model_dir, monkeypatch):
    import finegrain.train.ewc as ewc

    # IA3's scaling vectors have no per-example rule: every example runs alone.
    model, task, items, names, pad_id, hidden, start = tiny_fisher_setup(tiny_model_dir, ["peft.method=ia3"], n=12)
    params = {n: p for n, p in model.named_parameters() if n in names}
    assert not ewc.PerExample(model, params).covers
    alone = fisher_diagonal(model, task, items, names, pad_id, hidden, start, batch_size=1)
    torch.testing.assert_close(fisher_diagonal(model, task, items, names, pad_id, hidden, start), alone)
    # A rule that went wrong (here: twice the gradients) fails the check against autograd's batch
    # gradient, and the examples run alone again: the same F.
    model, task, items, names, pad_id, hidden, start = tiny_fisher_setup(tiny_model_dir, [], n=12)
    alone = fisher_diagonal(model, task, items, names, pad_id, hidden, start, batch_size=1)
    rule = ewc._row_gradients
    monkeypatch.setattr(ewc, "_row_gradients", lambda *a: {k: 2 * v for k, v in rule(*a).items()})
    torch.testing.assert_close(fisher_diagonal(model, task, items, names, pad_id, hidden, start), alone)


def test_lwf_distils_the_cached_earlier_outputs_on_the_old_heads():
    torch.manual_seed(0)
    model = LinearModel(torch.randn(3, 4))  # labels [a, b, new]
    items = linear_items(torch.randn(4, 4), [2] * 4)
    frozen = torch.randn(2, 4)  # another task's head, kept beside
    heads = [old_head(["a", "b"], torch.randn(2, 4), ["a", "b", "new"]), old_head(["yes", "no"], frozen, ["a", "b", "new"])]
    assert heads[0].rows == [0, 1] and heads[0].weight is None and torch.equal(heads[1].weight, frozen)
    x = torch.stack([item.x for item in items])
    with torch.no_grad():
        outputs = model(LINEAR_TASK.collate(items, 0))
    matching = torch.cat([outputs[:, :2], x @ frozen.T], 1)  # what the old heads give now
    forward = lambda batch: model(batch)  # noqa: E731
    objective = LwfObjective(LINEAR_TASK, items, teacher=matching, temperature=2.0, alpha=1.0, model=model, heads=heads)
    (batch, _), = objective.pieces([0, 1, 2, 3], 0, None)
    torch.testing.assert_close(batch["teacher_logits"], matching)  # the cached rows ride with the batch
    assert float(objective.loss(forward, batch)) == pytest.approx(0.0, abs=1e-6)
    other = matching.clone()
    other[:, 0] += 3.0
    objective = LwfObjective(LINEAR_TASK, items, teacher=other, temperature=2.0, alpha=1.0, model=model, heads=heads)
    (batch, _), = objective.pieces([0, 1, 2, 3], 0, None)
    loss = objective.loss(forward, batch)
    expected = F.kl_div(F.log_softmax(outputs[:, :2] / 2, -1), F.log_softmax(other[:, :2] / 2, -1), log_target=True,
                        reduction="batchmean") * 4 / 2  # head 0's KL; head 1's is 0; the mean over the two heads
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    objective = LwfObjective(LINEAR_TASK, items, teacher=other, temperature=2.0, alpha=0.25, model=model, heads=heads)
    mixed = objective.loss(forward, batch)
    hard = LINEAR_TASK.loss(outputs, batch)
    assert float(mixed) == pytest.approx(0.25 * float(expected) + 0.75 * float(hard), rel=1e-5)


@pytest.mark.parametrize("strategy", ["ewc", "lwf"])
def test_class_incremental_ewc_and_lwf_sequences(strategy, tiny_model_dir, tmp_path, monkeypatch):
    import finegrain.run

    calls = []
    for name in ("teacher_outputs", "fisher_diagonal"):
        real = getattr(finegrain.run, name)
        monkeypatch.setattr(finegrain.run, name, lambda *a, _real=real, _name=name, **k: calls.append((_name, _real(*a, **k))) or calls[-1][1])
    data = write_labelled(tmp_path / "d.jsonl", ["sport", "tech", "food", "art"], 64)
    continual = {"strategy": strategy, "classes": [["sport", "tech"], ["food", "art"]], "ewc_lambda": 50.0,
                 "lwf_alpha": 0.7, "fwt": False}
    path = write_sequence_config(tmp_path, tiny_model_dir, continual, {"train": str(data)})
    output = tmp_path / "seq"
    results = train_sequence(load_config(path, [f"output={output}"]), progress=False)["continual"]
    assert results["strategy"] == strategy and [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    assert "fwt" not in results and json.loads((output / "metrics.json").read_text())["continual"] == results
    stage = load_config(output / "stage-1" / "config.yaml")
    assert stage.init_from == str(output / "stage-0") and stage.continual.strategy == strategy
    assert load_config(output / "stage-0" / "config.yaml").continual.strategy == "sequential"
    (name, cached), = calls  # computed once, for stage 1, from stage 0's run
    if strategy == "lwf":
        rows = len(open(stage.data.train).readlines())
        assert name == "teacher_outputs" and cached.shape == (rows, 2)  # stage 0's two classes
    else:
        assert name == "fisher_diagonal" and all(float(f.sum()) > 0 for f in cached.values())


def test_task_incremental_lwf_keeps_each_earlier_head(tiny_model_dir, tmp_path, monkeypatch):
    import finegrain.run

    widths = []
    real = finegrain.run.teacher_outputs
    monkeypatch.setattr(finegrain.run, "teacher_outputs", lambda *a, **k: widths.append(real(*a, **k).shape[1]) or real(*a, **k))
    files = [write_labelled(tmp_path / f"{name}.jsonl", labels, 32, seed=i)
             for i, (name, labels) in enumerate([("topics", ["sport", "tech"]), ("spam", ["spam", "ham"]),
                                                 ("kitchen", ["food", "art"])])]
    continual = {"strategy": "lwf", "tasks": [{"train": str(f)} for f in files]}
    path = write_sequence_config(tmp_path, tiny_model_dir, continual, {})
    output = tmp_path / "seq"
    results = train_sequence(load_config(path, [f"output={output}"]), progress=False)["continual"]
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2, 3] and len(results["fwt_reference"]) == 2
    last = load_config(output / "stage-2-kitchen" / "config.yaml")
    assert last.continual.lwf_heads == [str(output / "stage-0-topics"), str(output / "stage-1-spam")]
    assert widths == [2, 4]  # stage 1 keeps stage 0's head; stage 2 both earlier heads, side by side
    assert "fwt" in results and results["bwt"] <= 1


@pytest.mark.parametrize("strategy", ["ewc", "lwf"])
def test_killed_ewc_and_lwf_runs_resume_exactly(strategy, tiny_model_dir, tmp_path):
    data = write_labelled(tmp_path / "d.jsonl", ["sport", "tech", "food"], 60)
    spec = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"max_length": 16, "train": str(data), "labels": ["sport", "tech"]},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [-1]},  # a frozen prefix: layer 0 cached
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "threads": 1, "recipe": "off", "eval_every": 0},
    }
    two = tmp_path / "two.jsonl"
    two.write_text("".join(line for line in data.read_text().splitlines(True) if '"food"' not in line))
    spec["data"]["train"] = str(two)
    earlier = tmp_path / "earlier.yaml"
    earlier.write_text(yaml.safe_dump(spec))
    assert main(["train", str(earlier), "--output", str(tmp_path / "earlier")]) == 0
    spec["data"] = {"max_length": 16, "train": str(data)}
    spec["train"].update(epochs=2, checkpoint_every=2)
    spec["init_from"] = str(tmp_path / "earlier")
    spec["continual"] = {"strategy": strategy, "ewc_lambda": 1e4}
    later = tmp_path / "later.yaml"
    later.write_text(yaml.safe_dump(spec))
    straight = train_cli(str(later), "--output", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    kill_and_resume(later, tmp_path / "killed", "train_step:9")  # mid-epoch 2
    assert_same_adapter(tmp_path / "straight", tmp_path / "killed")
    # The strategy changed the training: the same run without it ends elsewhere.
    spec.pop("continual")
    later.write_text(yaml.safe_dump(spec))
    assert main(["train", str(later), "--output", str(tmp_path / "plain")]) == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    c = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.allclose(a[key], c[key], atol=1e-6) for key in a)


def test_bad_ewc_and_lwf_settings_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    data = write_labelled(tmp_path / "d.jsonl", ["sport", "tech"], 16)
    path = write_sequence_config(tmp_path, tiny_model_dir, {"classes": [["sport"], ["tech"]]}, {"train": str(data)})
    for override, message in [("continual.ewc_lambda=-1", "'continual.ewc_lambda' must be at least 0"),
                              ("continual.lwf_temperature=0", "'continual.lwf_temperature' must be above 0"),
                              ("continual.lwf_alpha=1.5", "'continual.lwf_alpha' must be in [0, 1]")]:
        with pytest.raises(FinegrainError, match=message.replace("[", r"\[")):
            load_config(path, [override])
    spec = yaml.safe_load(path.read_text())
    spec["continual"] = {"strategy": "ewc"}  # a single run: nothing to hold on to
    path.write_text(yaml.safe_dump(spec))
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err.strip()
    assert "'continual.strategy' must be ewc or lwf in a sequence" in err and "init_from" in err and "\n" not in err
