"""Prediction and evaluation in several processes under torchrun:
`torchrun --nproc-per-node N -m finegrain predict RUN --input big.jsonl --output out.jsonl`
(and `finegrain evaluate`).

Every rank loads the run and reads the whole input, then predicts its shard: examples `rank`,
`rank + world_size`, ... (interleaved, so that long and short texts spread evenly when a file is
sorted by length). Rank 0 gathers the shards (`torch.distributed.gather_object`), puts each
prediction back at its input's place and alone writes the output or scores the metrics; the other
ranks write nothing. The job runs on PyTorch's own backends, as training does
(`finegrain.train.distributed.init_from_env`: gloo on the CPU, nccl on CUDA, one GPU per local rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finegrain import rundir
from finegrain.device import resolve_device
from finegrain.errors import FinegrainError
from finegrain.tasks import score_file
from finegrain.train.distributed import init_from_env, launched, world_size


def rank() -> int:
    """This process's rank in the job (torch.distributed initialised), else 0."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def job_device(run_dir: str | Path, device: str | None) -> torch.device:
    """The device the run predicts on (`--device`, else the run's `train.device`), which picks the
    backend; an ensemble's runs each predict on their own device, so its job joins on the CPU (gloo)."""
    if device is not None:
        return resolve_device(device, "--device")
    if rundir.is_ensemble(run_dir):
        return torch.device("cpu")
    from finegrain.run import run_device

    return run_device(rundir.read_config(run_dir))


def join_job(run_dir: str | Path, device: str | None) -> None:
    """Join the job torchrun describes (nothing at all outside torchrun). The ranks leave it
    together when the command ends (`finegrain.cli.main`), or each at its exit after a failure.

    Args:
        run_dir: the run (or ensemble) that predicts.
        device: the `--device` flag, or None for the run's `train.device`.
    """
    if launched():
        init_from_env(job_device(run_dir, device))


def shard(examples: list, ranks: int, index: int) -> list:
    """Rank `index`'s share of `examples` among `ranks`: every `ranks`-th example from its own."""
    return examples[index::ranks]


def unshard(shards: list[list], total: int) -> list:
    """The interleaved shards (`shard` of each rank, in rank order) back in input order."""
    ordered: list[Any] = [None] * total
    for index, part in enumerate(shards):
        ordered[index :: len(shards)] = part
    return ordered


def check_processes(processes: int, examples: int, source: str) -> None:
    """Refuse more processes than examples: a rank with nothing to predict is a mistake to name."""
    if processes > examples:
        raise FinegrainError(f"torchrun: {processes} processes, but {source} has {examples} examples; "
                             f"run at most {examples} (--nproc-per-node) or give a larger file")


def predict_examples(predictor: Any, examples: list, source: str) -> list[dict[str, Any]] | None:
    """`predictor.predict_examples(examples)`, split across the job's ranks.

    Returns:
        On rank 0 (and outside torchrun) every prediction, in the order of `examples`; None on the
        other ranks, whose predictions rank 0 now holds.
    """
    processes = world_size()
    if processes == 1:
        return predictor.predict_examples(examples)
    check_processes(processes, len(examples), source)
    mine = predictor.predict_examples(shard(examples, processes, rank()), report=False)
    long_texts = getattr(predictor, "long_texts", None)
    gathered: list[Any] | None = [None] * processes if rank() == 0 else None
    dist.gather_object((mine, long_texts), gathered, dst=0)
    if gathered is None:
        return None
    if long_texts is not None:
        predictor.long_texts = merge_long_texts([summary for _, summary in gathered])
        from finegrain.run import report_long_texts

        report_long_texts(predictor.long_texts)  # once, for the whole input
    return unshard([predictions for predictions, _ in gathered], len(examples))


def merge_long_texts(summaries: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The long-text counts (`tasks.base.long_text_summary`) of all ranks' shards as one summary."""
    if any(summary is None for summary in summaries):
        return None
    merged = {**summaries[0]}
    for key in ("texts", "longer", "truncated", "longest"):  # counts add up; a tagger's longest sentence is the max
        if key in merged:
            combine = max if key == "longest" else sum
            merged[key] = {split: combine(summary[key][split] for summary in summaries) for split in summaries[0][key]}
    return merged


def evaluate(predictor: Any, path: str | Path) -> dict[str, Any] | None:
    """`predictor.evaluate(path)`, its predictions split across the job's ranks.

    Returns:
        On rank 0 (and outside torchrun) the metrics, as `predictor.evaluate` gives them; None on
        the other ranks.
    """
    if world_size() == 1:
        return predictor.evaluate(path)
    metrics = score_file(predictor.task, predictor.config.data, path,
                         lambda examples: predict_examples(predictor, examples, str(path)))
    if metrics is None:
        return None
    if getattr(predictor, "long_texts", None):
        metrics["data"] = predictor.long_texts
    return metrics
