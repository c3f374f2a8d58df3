"""Knowledge distillation (finegrain.train.distill) on the tiny model: the loss, the teacher run once,
exact resume, and the one-line errors for a teacher that does not suit the run."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

import finegrain.run
from finegrain.config import load_config
from finegrain.ensemble import create_ensemble
from finegrain.errors import FinegrainError
from finegrain.run import train
from finegrain.tasks.classification import ClassificationTask, Encoded
from finegrain.train.distill import DistillObjective, check_teacher, soft_loss, teacher_logits

from test_train import assert_same_adapter, kill_and_resume, train_cli, write_config, write_data


def test_soft_loss_is_t_squared_kl_of_the_teacher_from_the_student():
    torch.manual_seed(0)
    student, teacher, T = torch.randn(5, 3), torch.randn(5, 3), 2.0
    p_t, log_p_s = (teacher / T).softmax(-1), (student / T).log_softmax(-1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * T**2
    torch.testing.assert_close(soft_loss(student, teacher, T), expected)
    assert soft_loss(teacher, teacher, T).abs() < 1e-6
    # multi-label: each label's sigmoid a two-class distribution
    q_t, q_s = (teacher / T).sigmoid(), (student / T).sigmoid()
    binary = (q_t * (q_t / q_s).log() + (1 - q_t) * ((1 - q_t) / (1 - q_s)).log()).mean(-1).mean() * T**2
    torch.testing.assert_close(soft_loss(student, teacher, T, multi_label=True), binary)


def test_objective_mixes_soft_and_hard_by_alpha():
    task = ClassificationTask(["a", "b", "c"])
    items = [Encoded([5, 6, 7], 0), Encoded([5, 6], 2), Encoded([9], 1)]
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.5, 3.0], [1.0, 1.0, 1.0]])
    student = torch.tensor([[0.3, 0.1, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    objective = DistillObjective(task, items, teacher=teacher, temperature=3.0, alpha=0.25)
    [(batch, weight)] = objective.pieces([2, 0], pad_id=0, max_tokens=None)
    torch.testing.assert_close(batch["teacher_logits"], teacher[[2, 0]])  # each item's own row
    rows = student[[2, 0]]
    loss = objective.loss(lambda b: rows, batch)
    hard = F.cross_entropy(rows, torch.tensor([1, 0]))
    torch.testing.assert_close(loss, 0.25 * soft_loss(rows, teacher[[2, 0]], 3.0) + 0.75 * hard)
    with pytest.raises(ValueError):
        DistillObjective(task, items, teacher=teacher[:2])


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, tmp_path_factory):
    """A finished tiny teacher run (both layers kept) and its data."""
    root = tmp_path_factory.mktemp("teacher")
    data = write_data(root / "data.jsonl", 120)
    config = write_config(root / "teacher.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    train(load_config(str(config), [f"output={root / 'run'}"]), progress=False)
    return root / "run", data


@pytest.fixture(scope="module")
def ensemble(teacher, tiny_model_dir, tmp_path_factory):
    """An ensemble of the tiny teacher and a second one trained with another seed."""
    teacher_dir, data = teacher
    root = tmp_path_factory.mktemp("ensemble")
    second = write_config(root / "second.yaml", tiny_model_dir, data, epochs=1, eval_every=0, seed=1)
    train(load_config(str(second), [f"output={root / 'second'}"]), progress=False)
    create_ensemble([teacher_dir, root / "second"], root / "ens")
    return root / "ens"


def student_config(tmp_path, tiny_model_dir, data, teacher_dir, *overrides):
    path = write_config(tmp_path / "student.yaml", tiny_model_dir, data, epochs=2, eval_every=0, checkpoint_every=2)
    return load_config(str(path), ["model.num_layers=1", f"distill.teacher={teacher_dir}", *overrides])


def test_teacher_runs_once_and_its_term_enters_the_loss(teacher, tiny_model_dir, tmp_path, monkeypatch):
    teacher_dir, data = teacher
    calls = []
    real = finegrain.run.teacher_pass

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(finegrain.run, "teacher_pass", counted)
    monkeypatch.chdir(teacher_dir.parent)
    distilled = tmp_path / "distilled"
    train(student_config(tmp_path, tiny_model_dir, data, teacher_dir.name, f"output={distilled}"), progress=False)
    assert calls == [1]  # two epochs, one teacher pass
    saved = yaml.safe_load((distilled / "config.yaml").read_text())["distill"]
    assert saved == {"teacher": str(teacher_dir.resolve()), "temperature": 2.0, "alpha": 0.5,  # resumable from anywhere
                     "hidden": False, "hidden_weight": 1.0, "unlabelled": None}
    plain = tmp_path / "plain"
    config = student_config(tmp_path, tiny_model_dir, data, teacher_dir, f"output={plain}")
    config.distill.teacher = None
    train(config, progress=False)

    def losses(run):
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [r["train_loss"] for r in records if "train_loss" in r]

    assert len(losses(distilled)) == len(losses(plain))
    assert losses(distilled)[0] != pytest.approx(losses(plain)[0])  # same seed, same batches: the soft term differs
    assert json.loads((distilled / "metrics.json").read_text())["test"]["accuracy"] >= 0


@pytest.mark.parametrize("kind", ["run", "ensemble"])
def test_killed_distilled_run_resumes_exactly(teacher, ensemble, tiny_model_dir, tmp_path, kind):
    teacher_dir, data = teacher
    config = write_config(tmp_path / "student.yaml", tiny_model_dir, data, epochs=2, eval_every=0, checkpoint_every=2)
    spec = yaml.safe_load(config.read_text())
    spec["model"]["num_layers"] = 1
    spec["distill"] = {"teacher": str(teacher_dir if kind == "run" else ensemble), "temperature": 3.0, "alpha": 0.7}
    config.write_text(yaml.safe_dump(spec))
    straight = train_cli(str(config), "--output", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    kill_and_resume(config, tmp_path / "killed", "train_step:17")  # mid-epoch 2
    assert_same_adapter(tmp_path / "straight", tmp_path / "killed")
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("straight", "killed")]
    assert metrics[0]["test"]["accuracy"] == metrics[1]["test"]["accuracy"]


def copy_run(teacher_dir, tmp_path, edit_config=None, labels=None):
    copy = tmp_path / "teacher-copy"
    shutil.copytree(teacher_dir, copy)
    if edit_config:
        spec = yaml.safe_load((copy / "config.yaml").read_text())
        edit_config(spec)
        (copy / "config.yaml").write_text(yaml.safe_dump(spec))
    if labels:
        (copy / "labels.json").write_text(json.dumps(labels))
    return copy


@pytest.mark.parametrize("case, message", [
    ("missing", r"distill.teacher: .* is not a run directory"),
    ("unfinished", r"distill.teacher: .* is an unfinished run"),
    ("task", r"distill.teacher: .* is a regression run and this is a classification run"),
    ("labels", r"distill.teacher: .* has another label set \(it lacks \['rotten'\], and has \['sour'\]"),
    ("larger", r"distill.teacher: the student would keep 2 layers .* keeps 1; set model.num_layers to at most 1"),
])
def test_unsuitable_teacher_is_one_line_before_the_run_directory(teacher, tiny_model_dir, tmp_path, case, message):
    teacher_dir, data = teacher
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "unfinished":  # trained but not yet written out: no adapter
        path = copy_run(teacher_dir, tmp_path)
        shutil.rmtree(path / "adapter")
    elif case == "task":
        path = copy_run(teacher_dir, tmp_path, lambda spec: (spec.update(task="regression"), spec["head"].update(init="random")))
    elif case == "labels":
        path = copy_run(teacher_dir, tmp_path, labels=["fresh", "sour"])
    else:
        path = copy_run(teacher_dir, tmp_path, lambda spec: spec["model"].update(num_layers=1))
    output = tmp_path / "student"
    config = student_config(tmp_path, tiny_model_dir, data, path, f"output={output}")
    if case == "larger":
        config.model.num_layers = 2
    with pytest.raises(FinegrainError, match=message) as error:
        train(config, progress=False)
    assert "\n" not in str(error.value)
    assert not output.exists()


def test_an_ensemble_teaches_its_members_mean_probabilities(teacher, ensemble, tiny_model_dir, tmp_path, monkeypatch):
    """`distill.teacher: ENS`: one pass per member, and the student learns the log of their mean
    probabilities; `distill.hidden` wants a single run."""
    _, data = teacher
    passes, taught = [], []
    real_pass, real_objective = finegrain.run.teacher_pass, finegrain.run.DistillObjective

    def recorded_pass(*args, **kwargs):
        passes.append(real_pass(*args, **kwargs))
        return passes[-1]

    def recorded_objective(*args, **kwargs):
        taught.append(kwargs["teacher"])
        return real_objective(*args, **kwargs)

    monkeypatch.setattr(finegrain.run, "teacher_pass", recorded_pass)
    monkeypatch.setattr(finegrain.run, "DistillObjective", recorded_objective)
    output = tmp_path / "student"
    train(student_config(tmp_path, tiny_model_dir, data, ensemble, f"output={output}"), progress=False)
    assert len(passes) == 2 and len(taught) == 1
    assert not torch.allclose(passes[0].logits, passes[1].logits)  # two seeds, two teachers
    mean = (passes[0].logits.softmax(-1) + passes[1].logits.softmax(-1)) / 2
    torch.testing.assert_close(taught[0].logits.softmax(-1), mean[: len(taught[0])])
    assert "accuracy" in json.loads((output / "metrics.json").read_text())["test"]  # a finished run
    hidden = tmp_path / "hidden"
    with pytest.raises(FinegrainError, match=r"distill.hidden: .*ens is an ensemble.*unset distill.hidden") as error:
        train(student_config(tmp_path, tiny_model_dir, data, ensemble, f"output={hidden}", "distill.hidden=true"),
              progress=False)
    assert "\n" not in str(error.value) and not hidden.exists()


def test_regression_student_learns_the_teachers_values_in_its_own_units(tiny_model_dir, tmp_path):
    from test_regression import write_scores

    from finegrain.run import Predictor, build_trained

    data = write_scores(tmp_path / "scores.jsonl", 120)
    spec = {
        "task": "regression", "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(data), "label_field": "score", "max_length": 8},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [-1]},
        "train": {"epochs": 2, "lr": 1e-2, "batch_size": 16, "threads": 1, "checkpoint_every": 1000},
    }
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(spec))
    train(load_config(str(tmp_path / "teacher.yaml"), [f"output={tmp_path / 'teacher'}"]), progress=False)
    student = load_config(str(tmp_path / "teacher.yaml"), [f"output={tmp_path / 'student'}", "model.num_layers=1",
                                                           f"distill.teacher={tmp_path / 'teacher'}"])
    results = train(student, progress=False)
    assert "r2" in results["test"]

    # The cached targets are the teacher's predicted values, standardised by the student's mean and std.
    predictor = Predictor(tmp_path / "teacher")
    examples = predictor.task.read_file(predictor.config.data, str(data))[:10]
    values = torch.tensor([p["value"] for p in predictor.predict_examples(examples)])
    model, tokenizer, task = build_trained(predictor.config, tmp_path / "teacher")
    labels = ["score", 0.5, 2.0]
    cached = teacher_logits(model, task, tokenizer, examples, 8, labels, progress=False)
    torch.testing.assert_close(cached[:, 0] * 2.0 + 0.5, values, atol=1e-4, rtol=0)
    with pytest.raises(FinegrainError, match=r"distill.teacher: .* predicts 'score' and this run 'rating'"):
        check_teacher(student, ["rating", 0.0, 1.0])


def test_relation_student_trains_on_the_teachers_logits(tiny_model_dir, tmp_path):
    from test_relation import run_config

    path = run_config(tmp_path, tiny_model_dir)
    train(load_config(str(path), [f"output={tmp_path / 'teacher'}"]), progress=False)
    results = train(load_config(str(path), [f"output={tmp_path / 'student'}", "model.num_layers=1",
                                             f"distill.teacher={tmp_path / 'teacher'}", "distill.alpha=0.9"]),
                    progress=False)
    assert 0.0 <= results["test"]["f1"] <= 1.0
