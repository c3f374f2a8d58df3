"""`finegrain interpolate`: the run's model between its base and its tuned weights.

θ(α) = θ_base + α (θ_tuned − θ_base) for every weight of the decoder (and an output head it
holds), with the task's head always the tuned one. θ_tuned is the run's merged model (the adapter
folded into the base weights, or a full run's own weights), θ_base the base it was trained from,
cut the same way; for an adapter this scales the adapter's change of each weight by α (LoRA: B·A
times α), for `full` it mixes the two models' weights. α = 1 is the run as trained, α = 0 the base
with the tuned head; α outside [0, 1] extrapolates. Each α is scored on the run's validation split
(and its test split, when it has one) with the run's selection metric, the model alone (a TF-IDF
mix, `head.tfidf_mix`, is not applied). `interpolation.json` and `interpolation.png` go into the run
directory; `save_interpolated` writes the best α as a run directory of its own.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain import rundir
from finegrain.atomic import atomic_dir, atomic_path, atomic_write_json
from finegrain.config import RunConfig, dump_yaml
from finegrain.errors import FinegrainError
from finegrain.evaluate.metrics import higher_is_better
from finegrain.export import merged_model, require_mergeable
from finegrain.peft.base import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, read_adapter, save_weights
from finegrain.peft.full_files import save_model_dir
from finegrain.run import build
from finegrain.train.trainer import flat_metrics, unknown_metric

DEFAULT_ALPHAS = "0,0.25,0.5,0.75,1"
_ALPHAS_HELP = "comma-separated numbers such as 0,0.5,1, or a start, a second value, ... and an end: 0,0.1,...,1"


def parse_alphas(text: str) -> list[float]:
    """`"0,0.5,1"` -> [0.0, 0.5, 1.0]; `"0,0.1,...,1"` -> 0 to 1 in steps of 0.1 (the step of the first two).

    Raises:
        FinegrainError: a value is not a finite number, the `...` form is malformed, or nothing is left.
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if "..." in parts:
        if len(parts) != 4 or parts[2] != "...":
            raise FinegrainError(f"--alphas: '{text}': the ... form is start,second,...,end; give {_ALPHAS_HELP}")
        start, second, end = (_number(p, text) for p in (parts[0], parts[1], parts[3]))
        step = second - start
        if step == 0 or (end - start) / step < 0:
            raise FinegrainError(f"--alphas: '{text}': the step {step:g} never reaches {end:g}; give {_ALPHAS_HELP}")
        count = int(math.floor((end - start) / step + 1e-9)) + 1
        values = [round(start + i * step, 10) for i in range(count)]
    else:
        values = [_number(p, text) for p in parts]
    if not values:
        raise FinegrainError(f"--alphas: no value given; give {_ALPHAS_HELP}")
    return list(dict.fromkeys(values))


def _number(part: str, text: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise FinegrainError(f"--alphas: '{part}' (in '{text}') is not a number; give {_ALPHAS_HELP}") from None
    if not math.isfinite(value):
        raise FinegrainError(f"--alphas: '{part}' is not a finite number; give {_ALPHAS_HELP}")
    return value


class Interpolation:
    """The run's tuned model with its base weights beside it, set to θ(α) by `set_alpha`.

    Only the weights that differ between the two are kept twice (for a LoRA run, the adapted
    matrices); the rest are the tuned model's own.
    """

    def __init__(self, run_dir: str | Path, progress: bool = False):
        self.run_dir = Path(run_dir)
        self.config = rundir.read_config(self.run_dir)
        rundir.require_adapter(self.run_dir)
        require_mergeable(self.config, self.run_dir, "interpolated",
                          "interpolation scales a change of the weights, which this method does not make")
        float32 = copy.deepcopy(self.config)
        float32.model.dtype, float32.model.quantize = "float32", None  # as `merged_model` reads the base
        self.model, self.tokenizer, self.task = merged_model(self.run_dir, float32)
        base, _, _, _ = build(float32, rundir.read_labels(self.run_dir), progress, with_adapter=False)
        base_state = base.state_dict()
        self.pairs: dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        for name, param in self.model.named_parameters():  # each shared (tied) parameter once
            if not name.startswith(("model.", "lm_head.")):
                continue
            # A bias a method added (bitfit) is zero in the base: the layer had none.
            base_value = base_state[name] if name in base_state else torch.zeros_like(param)
            if not torch.equal(param, base_value):
                self.pairs[name] = (param, base_value, param.detach().clone())
        del base, base_state
        self.alpha = 1.0

    @torch.no_grad()
    def set_alpha(self, alpha: float) -> None:
        """Put θ_base + α (θ_tuned − θ_base) into the model's weights."""
        for param, base, tuned in self.pairs.values():
            param.copy_(torch.lerp(base, tuned, alpha))
        self.alpha = alpha

    def evaluate(self, items: list, examples: list, batch_size: int) -> dict[str, Any]:
        """The task's metrics of the model at the current α on encoded `items` of `examples`."""
        predictions = self.task.predict(self.model, items, self.tokenizer.pad_token_id, batch_size)
        return self.task.metrics(predictions, self.task.gold(examples))


def interpolate_run(run_dir: str | Path, alphas: list[float], save: str | Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Score θ(α) for each α on the run's validation (and test) split; write `interpolation.json`
    and `interpolation.png` into the run directory, and with `save` the best α as a new run.

    Returns:
        interpolation.json's content: the metric, each α's flat metrics, the best α on validation.

    Raises:
        FinegrainError: not a finished run, a method that cannot merge, `save` exists, no validation split.
    """
    run_dir = Path(run_dir)
    rundir.read_config(run_dir)
    if save is not None and Path(save).exists():
        raise FinegrainError(f"{save}: already exists; choose another --save directory (a new run is written there)")
    interpolation = Interpolation(run_dir, progress=False)
    config, task = interpolation.config, interpolation.task
    splits = task.load_splits(config.data)
    if not splits.validation:
        raise FinegrainError(f"{run_dir}: the run has no validation split to choose α on; set data.validation in its config.yaml")
    sets = {"validation": splits.validation, **({"test": splits.test} if splits.test else {})}
    encoded = {name: task.encode(interpolation.tokenizer, examples, config.data.max_length) for name, examples in sets.items()}
    metric = config.train.metric or task.headline_metric
    points = []
    for alpha in alphas:
        interpolation.set_alpha(alpha)
        point: dict[str, Any] = {"alpha": alpha}
        for name, examples in sets.items():
            point[name] = flat_metrics(interpolation.evaluate(encoded[name], examples, config.train.eval_batch_size))
        if metric not in point["validation"]:
            raise unknown_metric("train.metric", metric, point["validation"])
        points.append(point)
        if progress:
            print(point_line(point, metric), flush=True)
    sign = 1.0 if higher_is_better(metric) else -1.0
    best = max(points, key=lambda p: (sign * p["validation"][metric], -abs(p["alpha"] - 1.0)))  # ties: nearer the run
    results = {"run": str(run_dir), "method": config.peft.method, "metric": metric, "best_alpha": best["alpha"],
               "points": points}
    atomic_write_json(run_dir / rundir.INTERPOLATION, results)
    plot_interpolation(results, run_dir / rundir.INTERPOLATION_PLOT)
    if save is not None:
        interpolation.set_alpha(best["alpha"])
        save_interpolated(interpolation, Path(save), best)
        results["saved"] = str(save)
    return results


def point_line(point: dict[str, Any], metric: str) -> str:
    """`alpha 0.50  validation accuracy 0.8125  test accuracy 0.7900`"""
    scores = "  ".join(f"{name} {metric} {point[name][metric]:.4f}" for name in ("validation", "test") if name in point)
    return f"alpha {point['alpha']:<6g} {scores}"


def plot_interpolation(results: dict[str, Any], path: Path) -> None:
    """The metric against α, validation and test, the best α marked; written atomically."""
    from matplotlib.figure import Figure

    metric, points = results["metric"], results["points"]
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    alphas = [p["alpha"] for p in points]
    for split, style in (("validation", "o-"), ("test", "s--")):
        if split in points[0]:
            axes.plot(alphas, [p[split][metric] for p in points], style, label=split)
    axes.axvline(results["best_alpha"], color="grey", linestyle=":", label=f"best α = {results['best_alpha']:g}")
    axes.set_xlabel("α  (0: base weights, 1: the tuned run)")
    axes.set_ylabel(metric)
    axes.set_title(f"θ(α) = θ_base + α (θ_tuned − θ_base): {Path(results['run']).name}")
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)


def save_interpolated(interpolation: Interpolation, directory: Path, point: dict[str, Any]) -> Path:
    """Write the model at `interpolation.alpha` as a finished run directory that `finegrain.load` reads.

    A LoRA run stays a LoRA run (its B matrices times α: the same change of every weight, in PEFT's
    format); any other method is saved as a full run (`model/`, peft.method: full) holding θ(α).
    """
    source, alpha = interpolation.run_dir, interpolation.alpha
    config: RunConfig = copy.deepcopy(interpolation.config)
    config.output = str(directory)
    with atomic_dir(directory) as tmp:
        tmp = Path(tmp)
        shutil.copy2(source / rundir.LABELS, tmp / rundir.LABELS)
        if config.peft.method == "lora" and not rundir.has_model(source):
            _scaled_lora_adapter(rundir.adapter_dir(source), rundir.adapter_dir(tmp), alpha)
        else:
            config.peft.method, config.peft.options = "full", {}
            save_model_dir(interpolation.model, interpolation.tokenizer, interpolation.task.head_modules, rundir.model_dir(tmp))
        (tmp / rundir.CONFIG).write_text(dump_yaml(config), encoding="utf-8")
        summary = {"interpolated_from": str(source), "alpha": alpha, "validation": point["validation"]}
        if "test" in point:
            summary["test"] = point["test"]
        (tmp / rundir.INTERPOLATION).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return directory


def _scaled_lora_adapter(source: Path, target: Path, alpha: float) -> None:
    """The adapter directory `source` with every lora_B times α (the head unchanged)."""
    _, tensors = read_adapter(source)
    scaled = {PEFT_PREFIX + k: (v * alpha if k.endswith(".lora_B.weight") else v).contiguous() for k, v in tensors.items()}
    target.mkdir(parents=True)
    save_weights(scaled, target / WEIGHTS_NAME)
    shutil.copy2(source / CONFIG_NAME, target / CONFIG_NAME)
