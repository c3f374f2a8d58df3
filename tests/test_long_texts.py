"""Texts longer than data.max_length: counted, kept head and tail, or read in windows (train and predict alike)."""

import json

import pytest
import torch
import yaml

import finegrain
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.data.readers import Example
from finegrain.errors import FinegrainError
from finegrain.run import build
from finegrain.tasks import long_text_line, long_text_summary
from finegrain.tasks.classification import ClassificationTask
from finegrain.inference import sorted_batches
from finegrain.train.prefix_cache import compute_prefix
from finegrain.train.trainer import Trainer, predict_outputs

TEMPLATE = "Review: {text}\nSentiment:"
SHORT = "great fun"
LONG = "A gripping, funny film with a great cast. Two hours I will never get back: dull, slow and badly acted. " * 3


def text_ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def template_ids(tokenizer):
    before, after = TEMPLATE.split("{text}")
    return text_ids(tokenizer, before), text_ids(tokenizer, after)


def classifier(model_dir, *overrides):
    """A tiny classifier (LoRA on the top layer, no dropout) and its task, built as a run builds them."""
    config = load_config(None, [f"model.name={model_dir}", "data.train=x.jsonl", "lora.layers=[-1]", "lora.dropout=0",
                                f"data.template={json.dumps(TEMPLATE)}", *overrides])
    torch.manual_seed(0)
    model, tokenizer, task, _ = build(config, ["fresh", "rotten"], progress=False)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter something to say
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model.eval(), tokenizer, task, config


def test_longer_texts_are_counted_per_split(tiny_model_dir):
    _, tokenizer, task, config = classifier(tiny_model_dir, "data.max_length=34")
    prefix, suffix = template_ids(tokenizer)
    budget = 34 - len(prefix) - len(suffix)
    texts = [SHORT, LONG, LONG[:40], "x " * budget]
    longer = [len(text_ids(tokenizer, t)) > budget for t in texts]
    assert 0 < sum(longer) < len(texts)
    items = task.encode(tokenizer, [Example(t, "fresh", f"x:{i}") for i, t in enumerate(texts)], 34)
    assert all(len(item.input_ids) <= 34 for item in items)
    summary = long_text_summary(task, config.data, {"train": items, "validation": items[:1], "test": []})
    assert summary["longer"] == {"train": sum(longer), "validation": 0, "test": 0}
    assert summary["truncated"] == summary["longer"]  # truncate: every longer text loses its end
    assert summary["max_length"] == 34 and summary["long_texts"] == "truncate"
    line = long_text_line(summary)
    assert f"{sum(longer)} of 4 train" in line and "data.max_length=34" in line
    assert long_text_line(long_text_summary(task, config.data, {"train": items[:1]})) is None


def test_head_tail_keeps_exactly_the_first_and_last_tokens(tiny_model_dir):
    _, tokenizer, task, _ = classifier(tiny_model_dir, "data.long_texts=head_tail")
    prefix, suffix = template_ids(tokenizer)
    for max_length in (38, 39):  # an even and an odd budget
        budget = max_length - len(prefix) - len(suffix)
        body = text_ids(tokenizer, LONG)
        head = budget // 2
        expected = prefix + body[:head] + body[len(body) - (budget - head) :] + suffix
        long, short = task.encode(tokenizer, [Example(LONG, "fresh", "x:1"), Example(SHORT, "fresh", "x:2")], max_length)
        assert long.input_ids == expected and len(expected) == max_length
        assert long.longer and long.truncated and long.row_lengths is None
        assert short.input_ids == prefix + text_ids(tokenizer, SHORT) + suffix and not short.longer


@pytest.mark.parametrize("stride, max_windows", [(None, 40), (5, 50), (None, 8), (3, 2)])
def test_windows_cover_the_text_at_the_stride_up_to_the_cap(tiny_model_dir, stride, max_windows):
    overrides = ["data.long_texts=windows", f"data.max_windows={max_windows}"] + ([f"data.window_stride={stride}"] if stride else [])
    _, tokenizer, task, _ = classifier(tiny_model_dir, *overrides)
    prefix, suffix = template_ids(tokenizer)
    max_length = 30
    budget = max_length - len(prefix) - len(suffix)
    step = stride or budget // 2
    body = text_ids(tokenizer, LONG)
    item = task.encode(tokenizer, [Example(LONG, "fresh", "x:1")], max_length)[0]
    starts = list(range(0, len(body), step))
    needed = next(k for k, s in enumerate(starts) if s + budget >= len(body)) + 1
    count = min(needed, max_windows)
    assert len(item.row_lengths) == count
    windows, at = [], 0
    for n in item.row_lengths:
        windows.append(item.input_ids[at : at + n])
        at += n
    assert at == len(item.input_ids)
    for k, window in enumerate(windows):
        assert window == prefix + body[k * step : k * step + budget] + suffix and len(window) <= max_length
    assert item.longer and item.truncated == (needed > max_windows)
    if needed <= max_windows:
        assert windows[-1][len(prefix) : len(windows[-1]) - len(suffix)][-1] == body[-1]  # read to the end


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_windows_logits_are_the_head_on_the_mean_of_each_window_s_pooled_state(tiny_model_dir, pooling):
    model, tokenizer, task, _ = classifier(tiny_model_dir, "data.long_texts=windows", f"head.pooling={pooling}")
    items = task.encode(tokenizer, [Example(LONG[:100], "fresh", "x:1"), Example(SHORT, "fresh", "x:2")], 30)
    assert len(items[0].row_lengths) > 2 and items[1].row_lengths is None
    backbone = model.model
    with torch.no_grad():
        together = model(task.collate(items, tokenizer.pad_token_id))  # (2, C)
        expected = []
        for item in items:
            sizes = item.row_lengths or [len(item.input_ids)]
            states = []
            for window in torch.tensor(item.input_ids).split(sizes):  # one window at a time, no padding
                hidden = backbone.norm(backbone.run_layers(backbone.embed_tokens(window[None])))[0]  # (T, H)
                states.append(hidden[-1] if pooling == "last" else hidden.mean(0))
            expected.append(model.score(torch.stack(states).mean(0)))
    torch.testing.assert_close(together, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_windows_batch_by_rows_in_prediction_and_through_the_prefix_cache(tiny_model_dir):
    model, tokenizer, task, _ = classifier(tiny_model_dir, "data.long_texts=windows")
    texts = [LONG, SHORT, LONG[:60], LONG[::-1], SHORT * 3]
    items = task.encode(tokenizer, [Example(t, "fresh", f"x:{i}") for i, t in enumerate(texts)], 30)
    rows = [len(item.row_lengths or [0]) for item in items]
    for batch in sorted_batches([len(i.input_ids) for i in items], 4, rows):
        assert sum(rows[i] for i in batch) <= 4 or len(batch) == 1
    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        one_by_one = torch.cat([model(task.collate([item], pad_id)) for item in items])
        torch.testing.assert_close(predict_outputs(model, task, items, pad_id, batch_size=4), one_by_one, atol=1e-5, rtol=1e-5)
        hidden = compute_prefix(model.model, task, items, 1, pad_id, batch_size=4, progress=False)
        assert [h.shape[0] for h in hidden] == [len(item.input_ids) for item in items]
        cached = predict_outputs(model, task, items, pad_id, 3, hidden, start_layer=1)
    torch.testing.assert_close(cached, one_by_one, atol=1e-5, rtol=1e-5)


def windows_trainer(model_dir, run_dir, prefix_cache: bool = True, head_init: str = "random") -> Trainer:
    """A Trainer for 2 epochs of 3 batches on texts of 1 to 3 windows (the same model, data and order each time)."""
    model, tokenizer, task, config = classifier(model_dir, "data.long_texts=windows", "data.max_windows=3",
                                                f"head.init={head_init}")
    config.train.prefix_cache, config.train.batch_size, config.train.epochs = prefix_cache, 3, 2
    config.train.lr, config.train.checkpoint_every, config.train.micro_batch_tokens = 1e-2, 2, 40
    texts = [LONG, SHORT, LONG[:70], LONG[::-1], SHORT * 3, LONG[30:], "dull", LONG[:45]]
    examples = [Example(t, "fresh" if i % 3 else "rotten", f"x:{i}") for i, t in enumerate(texts)]
    items = task.encode(tokenizer, examples, 30)
    assert {len(item.row_lengths or [0]) for item in items} == {1, 2, 3}
    run_dir.mkdir(exist_ok=True)
    return Trainer(model.train(), task, items, config.train, run_dir, tokenizer.pad_token_id, progress=False)


def trained(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head_init", ["random", "probe"])  # probe: the head first fitted on the texts' pooled states
def test_training_with_windows_is_the_same_with_and_without_the_prefix_cache(tiny_model_dir, tmp_path, head_init):
    with_cache = windows_trainer(tiny_model_dir, tmp_path / "cached", head_init=head_init)
    with_cache.fit()
    assert with_cache.start_layer == 1 and with_cache.state.step == 6
    without = windows_trainer(tiny_model_dir, tmp_path / "plain", prefix_cache=False, head_init=head_init)
    without.fit()
    assert without.start_layer == 0
    a, b = trained(with_cache), trained(without)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(a[name], trained(windows_trainer(tiny_model_dir, tmp_path / "fresh"))[name]) for name in a)


def test_a_killed_windows_run_resumes_exactly(tiny_model_dir, tmp_path):
    straight = windows_trainer(tiny_model_dir, tmp_path / "straight")
    straight.fit()
    killed = windows_trainer(tiny_model_dir, tmp_path / "killed")
    loss = killed.task.loss

    def failing(outputs, batch):
        if killed.state.step >= 5:  # in the last step; the last checkpoint was at step 4
            raise KeyboardInterrupt
        return loss(outputs, batch)

    killed.task.loss = failing
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 4
    resumed = windows_trainer(tiny_model_dir, tmp_path / "killed")
    resumed.fit(resume=True)
    a, b = trained(straight), trained(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)


def test_a_windows_run_reports_long_texts_and_predicts_long_inputs(tiny_model_dir, tmp_path, capsys):
    texts = [LONG, SHORT, LONG[:30], "dull and slow", LONG[::-1], SHORT * 2] * 4  # LONG[:30]: 2 windows
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n" for i, t in enumerate(texts)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "lora": {"r": 2, "layers": [-1]},
        "data": {"train": str(data), "max_length": 30, "template": TEMPLATE, "long_texts": "windows", "max_windows": 3,
                 "split": [0.5, 0.25, 0.25]},
        "train": {"epochs": 1, "batch_size": 4, "threads": 1},  # the data recipe (its layer probe) reads windows too
    }))
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run_dir)]) == 0
    assert "long texts: " in capsys.readouterr().out
    section = json.loads((run_dir / "metrics.json").read_text())["data"]
    assert section["long_texts"] == "windows" and section["max_length"] == 30
    assert sum(section["texts"].values()) == len(texts)
    tokenizer = finegrain.load(run_dir).tokenizer
    budget = 30 - sum(map(len, template_ids(tokenizer)))
    assert sum(section["longer"].values()) == sum(len(text_ids(tokenizer, t)) > budget for t in texts)
    assert 0 < sum(section["truncated"].values()) < sum(section["longer"].values())  # LONG needs more than 3 windows

    predictor = finegrain.load(run_dir)
    alone = predictor.predict([LONG])
    together = predictor.predict([SHORT, LONG, LONG[:70]])
    assert "long texts: 2 of 3 input texts" in capsys.readouterr().err
    assert together[1]["label"] == alone[0]["label"]
    for label, p in alone[0]["probabilities"].items():
        assert abs(together[1]["probabilities"][label] - p) < 1e-5
    assert predictor.long_texts["longer"] == {"input": 2}

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"text": LONG}) + "\n" + json.dumps({"text": SHORT}) + "\n")
    assert main(["predict", str(run_dir), "--input", str(inputs), "--output", str(tmp_path / "out.jsonl")]) == 0
    assert "long texts: 1 of 2 input texts" in capsys.readouterr().err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    assert main(["evaluate", str(run_dir), "--data", str(data), "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["data"]["longer"]["input"] == section["longer"]["train"] + \
        section["longer"]["validation"] + section["longer"]["test"]


@pytest.mark.parametrize("override, key", [
    ("data.long_texts=middle", "data.long_texts"), ("data.max_windows=0", "data.max_windows"),
    ("data.window_stride=0", "data.window_stride"), ("data.window_stride=lots", "data.window_stride"),
])
def test_bad_long_text_keys_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(FinegrainError, match=key.replace(".", r"\.")) as error:
        load_config(None, ["data.train=x.jsonl", override])
    assert "\n" not in str(error.value)


def test_a_stride_longer_than_a_window_is_an_error_naming_the_key(tiny_model_dir):
    _, tokenizer, task, _ = classifier(tiny_model_dir, "data.long_texts=windows", "data.window_stride=13")
    with pytest.raises(FinegrainError, match=r"data\.window_stride: 13 .* at most 12$"):
        task.encode(tokenizer, [Example(LONG, "fresh", "x:1")], 30)
    with pytest.raises(FinegrainError, match=r"data\.long_texts: 'middle'"):
        ClassificationTask(["a", "b"], long_texts="middle")


def test_regression_reads_windows_too_and_weighs_its_loss_by_texts(tiny_model_dir):
    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", "task=regression",
                                "data.long_texts=windows", "data.max_windows=4"])
    model, tokenizer, task, _ = build(config, ["score", 0.0, 1.0], progress=False)
    items = task.encode(tokenizer, [Example(LONG, 1.0, "x:1"), Example(SHORT, -1.0, "x:2")], 12)
    batch = task.collate(items, tokenizer.pad_token_id)
    assert len(batch["lengths"]) == 5 and batch["documents"].tolist() == [0, 0, 0, 0, 1]
    with torch.no_grad():
        outputs = model.eval()(batch)
        alone = torch.cat([model(task.collate([item], tokenizer.pad_token_id)) for item in items])
    assert outputs.shape == (2, 1)
    torch.testing.assert_close(outputs, alone, atol=1e-5, rtol=1e-5)
    assert task.loss_weight(batch) == 2.0  # two texts, not five rows
