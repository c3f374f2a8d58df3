"""Experiment trackers a run reports to, as `train.report_to` names them: TensorBoard event files
(`RUN_DIR/tensorboard/`) and MLflow (a local `mlruns/` file store beside the run directory, or
the server `MLFLOW_TRACKING_URI` names; experiment `MLFLOW_EXPERIMENT_NAME`, default finegrain).

Each tracker is a sink of the run's `RunWriter` (finegrain.train.checkpointing), which writes
on rank 0 only: `start` gets the effective config, `log` every metrics.jsonl record, `flush` runs
when training ends, `finish` gets the final metrics and the artefacts (report, plots, adapter)
once `finegrain.run` has written them, and `close` ends the tracker's run. The packages are
optional (`pip install 'finegrain[tracking]'`); a tracker named without its package is a one-line
error before training starts.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from finegrain import rundir
from finegrain.config import dotted
from finegrain.errors import FinegrainError

TRACKERS = ("tensorboard", "mlflow")
INSTALL = "pip install 'finegrain[tracking]'"
ARTEFACTS = (rundir.CONFIG, rundir.METRICS, rundir.REPORT_MD, rundir.REPORT_HTML, rundir.CONFUSION_MATRIX, rundir.LEARNING_CURVE)
PLOTS = (rundir.CONFUSION_MATRIX, rundir.LEARNING_CURVE)


class Sink(Protocol):
    """Where a run's numbers go besides metrics.jsonl."""

    def start(self, config: dict[str, Any]) -> None:
        """The effective config, as dotted keys (`train.lr`)."""

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: its numbers under `train/` or `validation/`, at its step."""

    def flush(self) -> None:
        """Write out what is buffered (training ended; the run's reports come next)."""

    def finish(self, run_dir: Path, step: int) -> None:
        """The final metrics (metrics.json) and the artefacts of a finished run."""

    def close(self, finished: bool) -> None:
        """End the tracker's run; `finished` False: the run stopped early (error, Ctrl-C)."""


def open_sinks(run_dir: Path) -> list[Sink]:
    """The sinks `train.report_to` of the run's config.yaml names, started with that config; none
    without a config.yaml (a bare checkpoint directory)."""
    if not (Path(run_dir) / rundir.CONFIG).is_file():
        return []
    config = rundir.read_config(run_dir)
    check_installed(config.train.report_to)
    sinks: list[Sink] = []
    for name in dict.fromkeys(config.train.report_to):
        sinks.append(TensorBoardSink(Path(run_dir)) if name == "tensorboard" else MlflowSink(Path(run_dir)))
    values = dotted(dataclasses.asdict(config))
    for sink in sinks:
        sink.start(values)
    return sinks


def check_installed(report_to: list[str]) -> None:
    """Refuse a tracker whose package is missing, naming the key and the command that installs it."""
    for name in report_to:
        if importlib.util.find_spec(name) is None:
            raise FinegrainError(f"train.report_to: {name} needs the '{name}' package, which is not installed; "
                                 f"{INSTALL} (or remove {name} from train.report_to)")


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers under `<split>/<key>` (train when it names no split)."""
    prefix = record.get("split", "train")
    return {f"{prefix}/{key}": float(value) for key, value in record.items()
            if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def final_numbers(run_dir: Path) -> dict[str, float]:
    """metrics.json's scores of each split (averages one level down: `test/macro.f1`), to log once at the end."""
    path = run_dir / rundir.METRICS
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text(encoding="utf-8"))
    values = {}
    for split in ("validation", "test"):
        for key, value in dotted(metrics.get(split) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key.count(".") <= 1 and key:
                values[f"final_{split}/{key}"] = float(value)
    return values


class TensorBoardSink:
    """TensorBoard event files in `RUN_DIR/tensorboard/`, through torch's SummaryWriter."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / rundir.TENSORBOARD))

    def start(self, config: dict[str, Any]) -> None:
        text = "\n".join(f"    {key}: {json.dumps(value)}" for key, value in sorted(config.items()))
        self.writer.add_text("config", text)  # indented: TensorBoard shows it as a code block

    def log(self, record: dict[str, Any]) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def finish(self, run_dir: Path, step: int) -> None:
        import matplotlib.image

        for key, value in final_numbers(run_dir).items():
            self.writer.add_scalar(key, value, step)
        for name in PLOTS:
            if (run_dir / name).is_file():
                image = matplotlib.image.imread(run_dir / name)[..., :3]  # (H, W, RGB) floats in [0, 1]
                self.writer.add_image(name.removesuffix(".png"), image, step, dataformats="HWC")
        if (run_dir / rundir.REPORT_MD).is_file():
            self.writer.add_text("report", (run_dir / rundir.REPORT_MD).read_text(encoding="utf-8"), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class MlflowSink:
    """An MLflow run named after the run directory: config keys as parameters, metrics.jsonl as
    metrics, the reports, plots and adapter as artefacts. A run that never reaches `close` (the
    process dies with an error) is ended as FAILED when the process exits."""

    def __init__(self, run_dir: Path):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow keeps its file store only on request now; it is what a local run wants: no server, no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir.resolve().parent / "mlruns").as_uri()
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "finegrain")
        try:
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(
                experiment_id, run_name=run_dir.name, tags={"finegrain.run_dir": str(run_dir.resolve())}
            ).info.run_id
        except Exception as exc:  # MLflow raises its own types, requests' or OSErrors
            raise FinegrainError(f"train.report_to: mlflow at {uri} cannot be used ({type(exc).__name__}: {exc}); "
                                 "check MLFLOW_TRACKING_URI or remove mlflow from train.report_to") from None
        self.ended = False
        atexit.register(self.close, False)

    def start(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, json.dumps(value) if not isinstance(value, str) else value) for key, value in sorted(config.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, record: dict[str, Any]) -> None:
        self._metrics(numbers(record), record["step"])

    def finish(self, run_dir: Path, step: int) -> None:
        self._metrics(final_numbers(run_dir), step)
        for name in ARTEFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if rundir.adapter_dir(run_dir).is_dir():
            self.client.log_artifacts(self.run_id, str(rundir.adapter_dir(run_dir)), rundir.ADAPTER)

    def flush(self) -> None:
        pass  # every call above is sent at once

    def close(self, finished: bool) -> None:
        if not self.ended:
            self.ended = True
            self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if values:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])
