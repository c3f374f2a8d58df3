"""What the batching thread runs: classification batches and generation, on the shared models."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from finegrain.generation import generate
from finegrain.serve.batching import Job
from finegrain.serve.metrics import Metrics
from finegrain.serve.models import AdapterBank, ModelRegistry


@dataclass
class GenerationWork:
    """One prompt to continue. `on_piece` (streams only) gets each new piece of text."""

    prompt: str
    model: str
    max_new_tokens: int
    options: dict[str, Any] = field(default_factory=dict)  # temperature, top_k, top_p, ... for `generate`
    on_piece: Callable[[str], None] | None = None


class Engine:
    """Runs one batch: `run(key, jobs)`, with key `("classify", run_name)` or `("generate", model, ...)`.

    Args:
        registry: the loaded models.
        metrics: counts generated tokens.
    """

    def __init__(self, registry: ModelRegistry, metrics: Metrics):
        self.registry = registry
        self.metrics = metrics

    def run(self, key: Hashable, jobs: list[Job]) -> list[Any]:
        kind = key[0]  # type: ignore[index]
        with torch.inference_mode():
            if kind == "classify":
                return self.classify(key[1], jobs)  # type: ignore[index]
            return self.generate(jobs)

    def classify(self, name: str, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        """Label the encoded texts of every job in one forward pass."""
        run = self.registry.runs[name]
        items = [item for job in jobs for item in job.payload]
        # One right-padded batch: texts are short (at most data.max_length) and the batch at most
        # --max-batch, so padding costs little; the classifier is in eval mode for good.
        batch = run.task.collate(items, run.tokenizer.pad_token_id)
        with run.base.bank.use(name):
            logits = run.classifier(batch)
        predictions = run.task.decode(run.task.probabilities(logits))
        results, start = [], 0
        for job in jobs:
            results.append(predictions[start : start + len(job.payload)])
            start += len(job.payload)
        return results

    def model_of(self, name: str) -> tuple[AdapterBank, Any, str | None]:
        """The bank, tokenizer and adapter (None for a bare base) that generation with `name` uses."""
        if name in self.registry.bases:
            base = self.registry.bases[name]
            return base.bank, base.tokenizer, None
        run = self.registry.runs[name]
        return run.base.bank, run.tokenizer, name

    def generate(self, jobs: list[Job]) -> list[str]:
        """Continue the prompts of jobs that share a model and options, as one left-padded batch."""
        first: GenerationWork = jobs[0].payload
        bank, tokenizer, adapter = self.model_of(first.model)

        def on_piece(piece: str) -> None:
            # Called after every decoded step: the place to stop work no one waits for any more.
            if all(job.cancelled for job in jobs):
                jobs[0].check()
            if first.on_piece is not None:
                first.on_piece(piece)

        with bank.use(adapter):
            texts = generate(
                bank.llama, tokenizer, [job.payload.prompt for job in jobs],
                max_new_tokens=first.max_new_tokens, stream=on_piece, **first.options,
            )
        for text in texts:
            self.metrics.tokens.inc(first.model, amount=len(tokenizer.encode(text, add_special_tokens=False)))
        return texts
