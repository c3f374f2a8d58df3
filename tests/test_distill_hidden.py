"""distill.hidden and distill.unlabelled on the tiny model: the layer map, the pooled states, the teacher's
states against the decoder's own layers, the hidden term and its projection, a student of another
width with unlabelled texts, a killed run with everything on (prefix cache, FreeLB, averaging) that
resumes exactly, and the one-line errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import finegrain.run
from finegrain.checkpoint.load import load_model
from finegrain.config import load_config
from finegrain.data.readers import Example
from finegrain.errors import FinegrainError
from finegrain.model.backbone import hidden_states
from finegrain.run import train
from finegrain.tasks.classification import ClassificationTask
from finegrain.train.distill import (
    DistillObjective, TeacherOutputs, attach_hidden_match, matched_layers, pooled_states, teacher_pass,
    unlabelled_examples,
)

from test_train import assert_same_adapter, kill_and_resume, train_cli, write_config, write_data

TEXTS = ["great fun film", "dull and slow and badly acted", "a gripping story with a good cast", "bad"]


def test_matched_layers_spread_up_to_the_top_at_the_same_relative_depth():
    assert matched_layers(10, 20, 0) == [(0, 1), (3, 7), (6, 13), (9, 19)]  # four of ten, the top one included
    assert matched_layers(2, 2, 1) == [(1, 1)]  # only the trained layer
    assert matched_layers(1, 2, 0) == [(0, 1)]
    assert matched_layers(3, 30, 1) == [(1, 19), (2, 29)]
    with pytest.raises(FinegrainError, match="distill.hidden: no decoder layer of the student trains"):
        matched_layers(4, 8, 4)


def unit_rms(x):
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def test_pooled_states_are_unit_rms_tokens_averaged_over_the_real_ones():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8) * torch.tensor([1.0, 50.0])[:, None, None]
    batch = {"lengths": torch.tensor([5, 3]), "input_ids": torch.zeros(2, 5, dtype=torch.long)}
    want = torch.stack([unit_rms(x[0]).mean(0), unit_rms(x[1, :3]).mean(0)])
    torch.testing.assert_close(pooled_states(x, batch), want)
    torch.testing.assert_close(pooled_states(x[:, :1], batch), unit_rms(x[:, 0]))  # one position per row: that one
    windows = {**batch, "documents": torch.tensor([0, 0])}  # two windows of one text: their mean
    torch.testing.assert_close(pooled_states(x, windows), want.mean(0, keepdim=True))


@pytest.fixture
def tiny_classifier(tiny_model_dir):
    llama, tokenizer = load_model(str(tiny_model_dir), progress=False)
    task = ClassificationTask(["fresh", "rotten"])
    return task, task.build_model(llama).eval(), tokenizer


def test_the_teachers_states_are_its_layers_outputs_pooled(tiny_classifier):
    task, model, tokenizer = tiny_classifier
    examples = [Example(text, "fresh", f"t:{i}") for i, text in enumerate(TEXTS)]
    outputs = teacher_pass(model, task, tokenizer, examples, 16, ["rotten", "fresh"], batch_size=3, progress=False,
                           layers=[0, 1])
    assert outputs.states.shape == (4, 2, 64)
    for i, item in enumerate(task.encode(tokenizer, examples, 16)):
        batch = task.collate([item], tokenizer.pad_token_id)
        lengths = batch["lengths"]
        with torch.no_grad():
            below = hidden_states(model.model, batch, 0, end_layer=1)  # (1, T, H) after layer 0
            top = hidden_states(model.model, batch, 0, end_layer=2, rows=lengths - 1)  # the head's position only
            logits = model(batch)[0]
        torch.testing.assert_close(outputs.states[i, 0], unit_rms(below[0]).mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs.states[i, 1], unit_rms(top[0, 0]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs.logits[i], logits[[1, 0]], atol=1e-5, rtol=1e-5)  # the student's order


def test_the_hidden_term_joins_the_loss_through_a_trained_projection(tiny_classifier):
    task, model, tokenizer = tiny_classifier
    examples = [Example(text, ["fresh", "rotten"][i % 2], f"t:{i}") for i, text in enumerate(TEXTS)]
    items = task.encode(tokenizer, examples, 16)
    torch.manual_seed(0)
    teacher = TeacherOutputs(torch.randn(4, 2), states=torch.randn(4, 1, 32))  # a teacher 32 wide
    match = attach_hidden_match(model, [(1, 0)], 32, weight=0.5)
    projection = model.distill_projection[0]
    assert projection.weight.shape == (32, 64) and projection.weight.requires_grad
    objective = DistillObjective(task, items, teacher=teacher, temperature=2.0, alpha=0.3, match=match)
    plain = DistillObjective(task, items, teacher=teacher.logits, temperature=2.0, alpha=0.3)
    [(batch, _)] = objective.pieces([0, 1, 2, 3], tokenizer.pad_token_id, None)
    [(plain_batch, _)] = plain.pieces([0, 1, 2, 3], tokenizer.pad_token_id, None)
    loss = objective.loss(model, batch)
    top = hidden_states(model.model, batch, 0, end_layer=2, rows=batch["lengths"] - 1)[:, 0]  # (B, H)
    hidden = F.mse_loss(projection(unit_rms(top)), teacher.states[:, 0])
    torch.testing.assert_close(loss, plain.loss(model, plain_batch) + 0.5 * hidden)
    (grad,) = torch.autograd.grad(loss, projection.weight)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the teacher's states"):
        DistillObjective(task, items, teacher=teacher.logits, match=match)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, tmp_path_factory):
    """A finished tiny teacher (2 layers, hidden 64), its data and a file of unlabelled texts."""
    root = tmp_path_factory.mktemp("hidden-teacher")
    data = write_data(root / "data.jsonl", 80)
    config = write_config(root / "teacher.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    train(load_config(str(config), [f"output={root / 'run'}"]), progress=False)
    unlabelled = root / "unlabelled.jsonl"
    texts = [json.loads(line)["text"] for line in write_data(root / "more.jsonl", 40, seed=7).read_text().splitlines()]
    unlabelled.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return root / "run", data, unlabelled


@pytest.fixture(scope="module")
def narrow_model_dir(tmp_path_factory):
    """A tiny LLaMA 32 wide (the teacher's base is 64) with the same tokenizer: a student of another base."""
    from conftest import tiny_tokenizer

    from finegrain.checkpoint.save import save_pretrained
    from finegrain.model.config import LlamaConfig
    from finegrain.model.llama import Llama

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        num_kv_heads=1, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("narrow") / "narrow-llama"
    save_pretrained(Llama(config).eval(), tokenizer, directory)
    return directory


def test_a_narrower_student_learns_hidden_states_and_unlabelled_texts(teacher, narrow_model_dir, tmp_path, monkeypatch):
    teacher_dir, data, unlabelled = teacher
    seen = []
    real = finegrain.run.teacher_pass

    def counted(model, task, tokenizer, examples, *args, **kwargs):
        seen.append((len(examples), kwargs.get("layers", args[4] if len(args) > 4 else ())))
        return real(model, task, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(finegrain.run, "teacher_pass", counted)
    config = write_config(tmp_path / "student.yaml", narrow_model_dir, data, epochs=1, eval_every=0)
    results = train(load_config(str(config), [
        f"output={tmp_path / 'student'}", f"distill.teacher={teacher_dir}", "distill.hidden=true",
        f"distill.unlabelled={unlabelled}",
    ]), progress=False)
    train_examples = results["train"]["examples"]
    assert results["train"]["unlabelled"] == 40
    assert seen == [(train_examples + 40, [1])]  # one teacher pass over both; the student's layer 1 -> the teacher's 1
    assert results["train"]["steps"] == math.ceil(train_examples / 8) + math.ceil(40 / 8)  # both kinds of batch
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert results["test"]["num_examples"] == teacher_metrics["test"]["num_examples"]  # never in test
    assert results["validation"]["num_examples"] == teacher_metrics["validation"]["num_examples"]
    saved = load_file(tmp_path / "student" / "checkpoint" / "trainable.safetensors")
    assert saved["distill_projection.0.weight"].shape == (64, 32)  # trained and checkpointed beside the adapter
    adapter = load_file(tmp_path / "student" / "adapter" / "adapter_model.safetensors")
    assert not any("distill_projection" in key for key in adapter)  # and not part of the adapter


def test_augment_perturbs_the_unlabelled_texts_too(teacher, tiny_model_dir, tmp_path):
    teacher_dir, data, unlabelled = teacher
    config = write_config(tmp_path / "student.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    run_config = load_config(str(config), [
        f"output={tmp_path / 'student'}", f"distill.teacher={teacher_dir}", f"distill.unlabelled={unlabelled}",
        "augment.typos=0.5", "augment.swap=0.25", "model.num_layers=1",
    ])
    task = ClassificationTask(["fresh", "rotten"])
    texts = unlabelled_examples(task, run_config)
    originals = [json.loads(line)["text"] for line in unlabelled.read_text().splitlines()]
    assert [e.text for e in texts[:40]] == originals  # the file's texts first, as they are
    kinds = [e.source.rsplit("(", 1)[-1] for e in texts[40:]]
    assert kinds == ["swap)"] * 10 + ["typos)"] * 20  # then the copies, in the labelled set's fractions
    assert sum(e.text not in originals for e in texts[40:]) >= 25  # perturbed (a swap of equal words changes nothing)
    assert all(e.label is None for e in texts)
    assert texts == unlabelled_examples(task, run_config)  # seeded: resume sees the same
    results = train(run_config, progress=False)
    assert results["train"]["unlabelled"] == 70  # the teacher labelled the copies too
    added = results["train"]["augmented"]  # the labelled set's copies, counted apart
    labelled = results["train"]["examples"] - added["typos"] - added["swap"]
    assert added == {"typos": round(0.5 * labelled), "swap": round(0.25 * labelled)}


def test_a_killed_run_with_everything_on_resumes_exactly(teacher, tiny_model_dir, tmp_path):
    teacher_dir, data, unlabelled = teacher
    config = write_config(tmp_path / "student.yaml", tiny_model_dir, data, epochs=2, eval_every=3, checkpoint_every=2)
    spec = yaml.safe_load(config.read_text())
    spec["model"]["num_layers"] = 2  # the teacher's two: lora.layers [-1] leaves layer 0 to the prefix cache
    spec["distill"] = {"teacher": str(teacher_dir), "hidden": True, "unlabelled": str(unlabelled), "alpha": 0.7}
    spec["adversarial"] = {"method": "freelb", "steps": 2, "epsilon": 0.5}
    spec["train"]["average_last"] = 3
    config.write_text(yaml.safe_dump(spec))
    straight = train_cli(str(config), "--output", str(tmp_path / "straight"), timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    steps = json.loads((tmp_path / "straight" / "metrics.json").read_text())["train"]["steps"]
    assert steps >= 8
    kill_at = steps * 3 // 4  # in the second epoch, past a checkpoint and some evaluations
    kill_and_resume(config, tmp_path / "killed", f"train_step:{kill_at}", timeout=600)
    assert_same_adapter(tmp_path / "straight", tmp_path / "killed")
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("straight", "killed")]
    assert metrics[0]["train"]["frozen_prefix_layers"] == 1  # the prefix cache was on
    assert metrics[0]["train"]["average_last"] == metrics[1]["train"]["average_last"]
    assert metrics[0]["train"]["unlabelled"] == 40
    assert metrics[0]["test"]["accuracy"] == metrics[1]["test"]["accuracy"]


def test_bad_unlabelled_and_hidden_keys_are_one_line(teacher, tiny_model_dir, tmp_path):
    teacher_dir, data, _ = teacher
    config = write_config(tmp_path / "student.yaml", tiny_model_dir, data, epochs=1)
    with pytest.raises(FinegrainError, match=r"'distill.teacher' must be set \(a finished run\) when distill.hidden") as error:
        load_config(str(config), ["distill.hidden=true"])
    assert "\n" not in str(error.value)
    output = tmp_path / "student"
    missing = load_config(str(config), [f"output={output}", f"distill.teacher={teacher_dir}", "model.num_layers=2",
                                        f"distill.unlabelled={tmp_path / 'nowhere.jsonl'}"])
    with pytest.raises(FinegrainError, match=r"distill.unlabelled: .*nowhere.jsonl is not a file") as error:
        train(missing, progress=False)
    assert "\n" not in str(error.value)
    assert not output.exists()  # nothing left behind
