"""What the batching thread runs: task batches (classification, NER, ...) and generation, on the shared models."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from finegrain.cpu import threads_now
from finegrain.generation import generate
from finegrain.inference import predict_outputs
from finegrain.serve.batching import Job
from finegrain.serve.metrics import Metrics
from finegrain.serve.models import ModelRegistry, ServedBase


@dataclass
class GenerationWork:
    """One prompt to continue. `on_piece` (streams only) gets each new piece of text."""

    prompt: str
    model: str
    max_new_tokens: int
    options: dict[str, Any] = field(default_factory=dict)  # temperature, top_k, top_p, ... for `generate`
    on_piece: Callable[[str], None] | None = None


class Engine:
    """Runs one batch: `run(key, jobs)`, with key `("task", run_name)` or `("generate", model, ...)`.

    Args:
        registry: the loaded models.
        metrics: counts generated tokens.
    """

    def __init__(self, registry: ModelRegistry, metrics: Metrics):
        self.registry = registry
        self.metrics = metrics
        self.most_threads = torch.get_num_threads()  # --threads, or the cores this process may use
        self.threads = self.most_threads
        self.adapt_threads = os.environ.get("FINEGRAIN_ADAPT_THREADS", "1") != "0"  # 0: always most_threads

    def run(self, key: Hashable, jobs: list[Job]) -> list[Any]:
        kind = key[0]  # type: ignore[index]
        self.pick_threads()
        with torch.inference_mode():
            if kind == "task":
                return self.predict(key[1], jobs)  # type: ignore[index]
            return self.generate(jobs)

    def pick_threads(self) -> None:
        """Run this batch on the cores no other process is using now (`threads_now`): beside a
        busy neighbour, fewer threads cost a share of the time, all of them a collapse. Set on
        the worker thread, where the batch runs (OpenMP's thread count is per calling thread)."""
        threads = threads_now(self.most_threads) if self.adapt_threads else self.most_threads
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads

    def predict(self, name: str, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        """The task's predictions for every job's encoded items.

        The items of all jobs run together, in forward passes of similar lengths (`length_groups`);
        each job's outputs are then decoded on their own by the task (`task.decode`, as
        `task.predict` does: Viterbi for NER, windows merged into one answer for QA). Decoding per
        job keeps what a task groups by, such as QA windows by their question's index in one
        `encode` call, within the request it came from.
        """
        run = self.registry.runs[name]
        if run.members:
            return self.predict_ensemble(name, jobs)
        items = [item for job in jobs for item in job.payload]
        rows: list[torch.Tensor | None] = [None] * len(items)
        with run.base.use(name):
            for group in length_groups([len(item.input_ids) for item in items]):
                outputs = predict_outputs(run.model, run.task, [items[i] for i in group], run.tokenizer.pad_token_id, len(group))
                for i, row in zip(group, outputs):
                    rows[i] = row
        scores = run.task.probabilities(torch.stack(rows))  # type: ignore[arg-type]
        results, start = [], 0
        for job in jobs:
            results.append(run.task.decode(scores[start : start + len(job.payload)], job.payload))
            start += len(job.payload)
        return results

    def predict_ensemble(self, name: str, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        """An ensemble's predictions: each member's (as `predict`: its temperature, its TF-IDF mix),
        their probabilities averaged in the ensemble's label order and decoded, as `finegrain.ensemble` does."""
        run = self.registry.runs[name]
        by_member = [self.predict(member, jobs) for member in run.members]  # [member][job][example]
        labels = run.task.labels
        results = []
        for j in range(len(jobs)):
            stacked = torch.tensor([[[p["probabilities"][label] for label in labels] for p in member[j]]
                                    for member in by_member], dtype=torch.float64)  # (M, N, C)
            results.append(run.task.decode(stacked.mean(0)))
        return results

    def model_of(self, name: str) -> tuple[ServedBase, Any, str | None]:
        """The base, tokenizer and adapter (None for a bare base) that generation with `name` uses."""
        if name in self.registry.bases:
            base = self.registry.bases[name]
            return base, base.tokenizer, None
        run = self.registry.runs[name]
        return run.base, run.tokenizer, name

    def generate(self, jobs: list[Job]) -> list[str]:
        """Continue the prompts of jobs that share a model and options, as one left-padded batch."""
        first: GenerationWork = jobs[0].payload
        base, tokenizer, adapter = self.model_of(first.model)

        def on_piece(piece: str) -> None:
            # Called after every decoded step: the place to stop work no one waits for any more.
            if all(job.cancelled for job in jobs):
                jobs[0].check()
            if first.on_piece is not None:
                first.on_piece(piece)

        with base.use(adapter):
            texts = generate(
                base.llama, tokenizer, [job.payload.prompt for job in jobs],
                max_new_tokens=first.max_new_tokens, stream=on_piece, **first.options,
            )
        for text in texts:
            self.metrics.tokens.inc(first.model, amount=len(tokenizer.encode(text, add_special_tokens=False)))
        return texts


def length_groups(lengths: list[int], max_padding: float = 0.25) -> list[list[int]]:
    """Indices of rows, longest first, cut into groups to run as one right-padded batch each.

    A row joins the current group while the group's padded size (its longest row times its rows)
    stays within `1 + max_padding` times its real tokens: on a CPU a forward pass costs about what
    its padded tokens cost, so a batch of a 60-token text and seven 10-token ones would spend
    most of its time on padding, while similar lengths share a pass almost for free.
    """
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= (1 + max_padding) * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups
