"""finegrain compare on the tiny decoder and the tiny encoder: the cells it plans, the table, plot and
rows it writes (baselines included), and a rerun that reads the finished runs instead of training."""

import json
import signal
import subprocess

import pytest

from finegrain.cli import main
import finegrain.compare
import finegrain.cpu
from finegrain.checkpoint.load import load_model
from finegrain.compare import compare, methods_per_model, plan, prompted_model, summarize
from finegrain.config import load_config
from finegrain.evaluate.prompting import prompted_baseline
from finegrain.errors import RUN_AGAIN, FinegrainError, Interrupted
from test_bert import random_reference, tiny_hf_config, write_tokenizer


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compare-bert") / "tiny-bert"
    random_reference(tiny_hf_config(max_position_embeddings=32)).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-data")
    words = ["good great fine", "bad dull"]
    rows = [{"text": f"the film was {words[i % 2]} {i % 5}", "label": "fresh" if i % 2 == 0 else "rotten"} for i in range(60)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "config.yaml").write_text(
        f"model:\n  num_layers: 2\ndata:\n  train: {root / 'data.jsonl'}\n  split: [0.6, 0.2, 0.2]\n  max_length: 16\n"
        "head:\n  pooling: last\n  tfidf_mix: 0\n"
        "train:\n  epochs: 2\n  batch_size: 8\n  lr: 3.0e-3\n  threads: 1\n  recipe: off\n"
    )
    return root / "config.yaml"


def test_plan_fits_a_decoder_config_to_the_encoder_and_checks_every_cell(tiny_model_dir, encoder_dir, config_path, tmp_path):
    cells = plan(str(config_path), [str(tiny_model_dir), str(encoder_dir)], ["lora", "full"], 2, tmp_path)
    assert [(c.model, c.method, c.seed) for c in cells] == [
        (str(m), method, seed) for m in (tiny_model_dir, encoder_dir) for method in ("lora", "full") for seed in (0, 1)
    ]
    decoder, encoder = cells[0], cells[4]
    assert not any(o.startswith(("model.num_layers", "head.pooling")) for o in decoder.overrides)
    assert {"model.num_layers=null", "head.pooling=mean"} <= set(encoder.overrides)
    assert any("[SEP]" in note for note in encoder.notes)
    assert "train.lr=0.0001" in cells[6].overrides  # full fine-tuning of the encoder: its own lr
    assert cells[5].run_dir.name == "tiny-bert-lora-s1"
    twice = plan(str(config_path), [str(tiny_model_dir)] * 2, ["lora", "lora"], 1, tmp_path)
    assert [(c.model, c.method) for c in twice] == [(str(tiny_model_dir), "lora")]  # one cell, not the same run twice
    with pytest.raises(FinegrainError, match=r"--methods: 'lorra' is not a method"):
        plan(str(config_path), [str(tiny_model_dir)], ["lorra"], 1, tmp_path)
    with pytest.raises(FinegrainError, match="not a task"):  # a cell's config is checked before any run starts
        plan(str(config_path), [str(tiny_model_dir)], ["lora"], 1, tmp_path, ["task=clasification"])


def test_methods_can_be_given_per_model(tiny_model_dir, encoder_dir, config_path, tmp_path):
    decoder, encoder = str(tiny_model_dir), str(encoder_dir)
    cells = plan(str(config_path), [decoder, encoder], [f"{decoder}:lora", f"{encoder}:full"], 1, tmp_path)
    assert [(c.model, c.method) for c in cells] == [(decoder, "lora"), (encoder, "full")]
    assert "train.lr=0.0001" in cells[1].overrides and cells[1].run_dir.name == "tiny-bert-full-s0"
    # A plain method serves the models not named; a named model runs only its own.
    assert methods_per_model([decoder, encoder], ["lora", "ia3", f"{encoder}:full", f"{encoder}:lora"]) == {
        decoder: ["lora", "ia3"], encoder: ["full", "lora"]}
    assert methods_per_model(["C:/models/x", "y"], ["C:/models/x:full", "lora"]) == {"C:/models/x": ["full"], "y": ["lora"]}
    # The decoder's adapted layers (above its cached prefix) are not the encoder's: it trains every layer.
    layered = tmp_path / "layered.yaml"
    layered.write_text(config_path.read_text() + "lora:\n  layers: [-1]\n")
    decoder_cell, encoder_cell = plan(str(layered), [decoder, encoder], [f"{decoder}:lora", f"{encoder}:full"], 1, tmp_path)
    assert "lora.layers=null" in encoder_cell.overrides and "lora.layers=null" not in decoder_cell.overrides
    assert "lora.layers [-1] → every layer (the decoder's adapted layers)" in encoder_cell.notes
    assert load_config(str(layered), encoder_cell.overrides).lora.layers is None
    assert load_config(str(layered), decoder_cell.overrides).lora.layers == [-1]
    kept = plan(str(layered), [encoder], ["lora"], 1, tmp_path, ["lora.layers=[-2]"])[0]  # the user's choice stays
    assert "lora.layers=null" not in kept.overrides and load_config(str(layered), kept.overrides).lora.layers == [-2]
    with pytest.raises(FinegrainError, match=r"--methods: 'minilm:full' names model 'minilm', which is not in --models"):
        methods_per_model([decoder, encoder], ["minilm:full"])
    with pytest.raises(FinegrainError, match=rf"--methods: no method for model '{decoder}'; add {decoder}:METHOD"):
        methods_per_model([decoder, encoder], [f"{encoder}:full"])
    with pytest.raises(FinegrainError, match=r"--methods: 'fulll' is not a method"):
        methods_per_model([decoder, encoder], [f"{encoder}:fulll"])


def test_compare_writes_one_table_with_the_baselines_and_a_rerun_trains_nothing(
    tiny_model_dir, encoder_dir, config_path, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "cmp"
    assert main(["compare", str(config_path), "--models", f"{tiny_model_dir},{encoder_dir}", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "TF-IDF + linear model" in printed and "majority class" in printed
    rows = json.loads((output / "compare.json").read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [(str(tiny_model_dir), "lora"), (str(encoder_dir), "lora")]
    for row in rows:
        assert 0 <= row["score"] <= 1 and row["train_seconds"] > 0 and row["predict_per_s"] > 0
        assert row["peak_rss_mb"] > 50 and row["trainable_parameters"] > 0
    assert rows[0]["baselines"]["tfidf"]["accuracy"] == rows[1]["baselines"]["tfidf"]["accuracy"]  # the same splits
    report = (output / "report.md").read_text()
    assert "| tiny-llama" not in report and f"| {tiny_model_dir} | lora |" in report
    assert "head.pooling last → mean" in report and "compare.png" in report
    assert (output / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (output / "report.html").read_text()

    # The zero-shot prompted decoder: the first decoder of --models, on the runs' own test split.
    prompted = json.loads((output / "prompted.json").read_text())
    assert prompted["model"] == str(tiny_model_dir) and prompted["split"] == "test" and prompted["seconds"] > 0
    config = load_config(str(config_path))
    splits = finegrain.compare.task_class("classification").load_splits(config.data)
    expected = prompted_baseline(*load_model(tiny_model_dir, progress=False), splits.train, splits.test, splits.labels, k=0, seed=0)
    assert (prompted["accuracy"], prompted["examples"]) == (expected["accuracy"], len(splits.test))
    baseline = json.loads((output / "compare.json").read_text())["baselines"][-1]
    assert baseline["model"] == f"zero-shot prompted tiny-llama ({len(splits.test)} test examples)"
    assert baseline["score"] == prompted["accuracy"] and baseline["total_seconds"] == prompted["seconds"]
    assert f"| {baseline['model']} | baseline | 1 | {prompted['accuracy']:.4f} |" in (output / "report.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again, or the prompted baseline computed again")

    monkeypatch.setattr(subprocess, "Popen", no_training)
    monkeypatch.setattr(finegrain.compare, "load_model", no_training)
    again = compare(str(config_path), [str(tiny_model_dir), str(encoder_dir)], ["lora"], 1, output, progress=False)
    again_rows = json.loads(again["json"].read_text())["rows"]
    assert again_rows[0]["score"] == rows[0]["score"]
    assert [r["peak_rss_mb"] for r in again_rows] == [r["peak_rss_mb"] for r in rows]  # kept beside each run
    assert json.loads(again["json"].read_text())["baselines"][-1] == baseline
    with pytest.raises(FinegrainError, match=r"this run has lora.r: 8 \(.*\) and this command sets 4"):
        compare(str(config_path), [str(tiny_model_dir)], ["lora"], 1, output, overrides=["lora.r=4"], progress=False)


def test_the_prompted_decoder_is_the_first_decoder_and_only_for_single_label_classification(
    tiny_model_dir, encoder_dir, config_path
):
    config = load_config(str(config_path))
    assert prompted_model(config, [str(encoder_dir), str(tiny_model_dir)]) == str(tiny_model_dir)
    assert prompted_model(load_config(str(config_path), [f"model.name={tiny_model_dir}"]), [str(encoder_dir)]) == str(tiny_model_dir)
    assert prompted_model(load_config(str(config_path), ["task=regression"]), [str(tiny_model_dir)]) is None
    assert prompted_model(load_config(str(config_path), ["data.multi_label=true"]), [str(tiny_model_dir)]) is None
    assert prompted_model(load_config(str(config_path), [f"model.name={encoder_dir}"]), [str(encoder_dir)]) is None


def test_a_failed_cell_is_one_line_naming_the_run_and_its_log(tiny_model_dir, config_path, tmp_path):
    with pytest.raises(FinegrainError) as error:
        compare(str(config_path), [str(tiny_model_dir)], ["lora"], 1, tmp_path / "cmp", ["model.num_layers=5"], progress=False)
    message = str(error.value)
    assert "run failed" in message and "tiny-llama-lora-s0.log" in message and "model.num_layers: 5" in message
    assert "\n" not in message


def test_ctrl_c_in_a_cell_and_the_same_compare_again_goes_on_from_its_checkpoint(
        tiny_model_dir, config_path, tmp_path, monkeypatch):
    """Ctrl-C reaching a cell's run (here sent by the run itself at its fifth step) stops the compare
    with the way on; run again, the cell's run continues from its checkpoint, where `--output` on
    its directory was refused ("already holds a run") and the compare failed."""
    output, cells = tmp_path / "cmp", ["train.checkpoint_every=2"]
    run = output / "runs" / "tiny-llama-lora-s0"
    monkeypatch.setenv("FINEGRAIN_FAULT", "train_step:5:int")
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, not `cmd &`
    try:
        with pytest.raises(Interrupted) as stopped:
            compare(str(config_path), [str(tiny_model_dir)], ["lora"], 1, output, cells, progress=False, prompted=False)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert str(stopped.value) == RUN_AGAIN
    assert (run / "checkpoint" / "state.json").exists() and not (run / "metrics.json").exists()
    monkeypatch.delenv("FINEGRAIN_FAULT")
    compare(str(config_path), [str(tiny_model_dir)], ["lora"], 1, output, cells, progress=False, prompted=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 11))  # each step once: resumed


def test_no_prompted_leaves_the_prompted_decoder_out(tiny_model_dir, config_path, tmp_path, monkeypatch):
    def no_prompting(*args, **kwargs):
        raise AssertionError("the prompted decoder was loaded")

    monkeypatch.setattr(finegrain.compare, "load_model", no_prompting)
    assert main(["compare", str(config_path), "--models", str(tiny_model_dir), "--output", str(tmp_path / "cmp"),
                 "--no-prompted", "--set", "train.epochs=1"]) == 0
    models = [b["model"] for b in json.loads((tmp_path / "cmp" / "compare.json").read_text())["baselines"]]
    assert models == ["majority class", "TF-IDF + linear model"] and not (tmp_path / "cmp" / "prompted.json").exists()


def test_a_cells_peak_rss_is_its_own_not_the_comparisons(tiny_model_dir, config_path, tmp_path):
    # ru_maxrss of a child carries the parent's memory at the fork: a large comparison process
    # (here 800 MB held) must not show up as the tiny run's peak.
    ballast = b"\x01" * (800 * 2**20)
    parent = finegrain.cpu.peak_rss_mb()
    compare(str(config_path), [str(tiny_model_dir)], ["lora"], 1, tmp_path / "cmp", ["train.epochs=1"],
            progress=False, prompted=False)
    (row,) = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert parent > 800 and 50 < row["peak_rss_mb"] < parent - 400
    assert json.loads((tmp_path / "cmp" / "runs" / "tiny-llama-lora-s0.usage.json").read_text()) == {"peak_rss_mb": row["peak_rss_mb"]}
    del ballast


def test_summary_is_the_mean_and_sample_std_over_seeds():
    rows = [{"model": "m", "method": "lora", "metric": "accuracy", "score": s, "train_seconds": t, "predict_per_s": 10.0,
             "peak_rss_mb": r, "trainable_parameters": 5, "notes": [], "total_seconds": None} for s, t, r in ((0.8, 10.0, 100.0), (0.9, 20.0, 120.0))]
    (line,) = summarize(rows)
    assert line["score"] == pytest.approx(0.85) and line["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert (line["seeds"], line["train_seconds"], line["total_seconds"], line["peak_rss_mb"]) == (2, 15.0, 15.0, 120.0)
