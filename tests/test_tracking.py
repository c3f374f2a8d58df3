"""`train.report_to`: a tiny run reports to TensorBoard and MLflow (the real packages, skipped
where they are not installed), and what they logged is read back: TensorBoard's
EventAccumulator, MLflow's client on the local file store beside the run directory."""

import importlib.util
import json

import pytest

from finegrain import rundir
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.train import tracking
from serve_helpers import train_run
from test_ui import SENTIMENT


def logged(run_dir):
    """metrics.jsonl's training losses and metrics.json, as the run wrote them."""
    records = [json.loads(line) for line in (run_dir / rundir.METRICS_LOG).read_text().splitlines()]
    losses = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    return losses, json.loads((run_dir / rundir.METRICS).read_text())


def test_report_to_names_known_trackers(tmp_path):
    assert load_config(None, ["train.report_to=[tensorboard, mlflow]", "data.dataset=rotten_tomatoes"]).train.report_to == [
        "tensorboard", "mlflow"]
    with pytest.raises(FinegrainError, match=r"train.report_to.*tensorboard and/or mlflow"):
        load_config(None, ["train.report_to=[wandb]", "data.dataset=rotten_tomatoes"])


def test_a_missing_package_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    with pytest.raises(AssertionError):  # train_run asserts the command succeeded
        train_run(tiny_model_dir, tmp_path / "run", SENTIMENT, sections={"train": {"report_to": ["mlflow"]}})
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.report_to: mlflow needs the 'mlflow' package" in error and "pip install 'finegrain[tracking]'" in error
    assert not (tmp_path / "run").exists()  # refused before the first checkpoint: nothing left behind


def test_tensorboard_reads_back_what_the_run_logged(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'finegrain[tracking]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train_run(tiny_model_dir, tmp_path / "run", SENTIMENT, sections={"train": {"report_to": ["tensorboard"]}})
    losses, metrics = logged(run_dir)
    events = EventAccumulator(str(run_dir / rundir.TENSORBOARD), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/train_loss")] == [(s, pytest.approx(v)) for s, v in losses]
    assert events.Scalars("final_test/accuracy")[-1].value == pytest.approx(metrics["test"]["accuracy"])
    assert events.Scalars("validation/accuracy")[-1].value == pytest.approx(metrics["validation"]["accuracy"])
    assert {"confusion_matrix", "learning_curve"} <= set(events.Tags()["images"])
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '    train.lr: 0.005' in config and '    task: "classification"' in config


def test_mlflow_reads_back_what_the_run_logged(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'finegrain[tracking]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "finegrain-test")
    run_dir = train_run(tiny_model_dir, tmp_path / "run", SENTIMENT, sections={"train": {"report_to": ["mlflow"]}})
    losses, metrics = logged(run_dir)
    client = MlflowClient((tmp_path / "mlruns").as_uri())  # the default store: mlruns/ beside the run directory
    [run] = client.search_runs([client.get_experiment_by_name("finegrain-test").experiment_id])
    assert (run.info.run_name, run.info.status) == ("run", "FINISHED")
    assert run.data.params["train.lr"] == "0.005" and run.data.params["task"] == "classification"
    history = client.get_metric_history(run.info.run_id, "train/train_loss")
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v)) for s, v in losses]
    assert run.data.metrics["final_test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.html", "confusion_matrix.png", "config.yaml", "adapter"} <= artefacts
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}


def test_an_unfinished_run_is_failed_in_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'finegrain[tracking]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "stopped").mkdir()
    sink = tracking.MlflowSink(tmp_path / "stopped")
    sink.log({"step": 1, "train_loss": 0.5, "lr": 0.1})
    sink.close(finished=False)  # what the exit hook does for a run that never finished
    run = MlflowClient((tmp_path / "store").as_uri()).get_run(sink.run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"train/train_loss": 0.5, "train/lr": 0.1}
