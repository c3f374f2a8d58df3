"""`task: lm`: next-token training on plain text, for domain-adaptive pretraining.

Before labelling anything, a model can read the user's own unlabelled text (support tickets,
clinical notes, contracts) and adapt to its words; a labelled task then starts from that run
(`init_from: RUN_DIR` takes its adapter, the task's head starts fresh). The data is plain text:
a `.txt` file (one document per paragraph: blank lines separate them) or a JSONL/CSV/TSV file
with a text field (`data.text_field`), no labels. Every token is a target; documents longer than
`data.max_length` are cut into consecutive pieces (nothing is dropped), and pieces are packed
into rows of `data.max_length` tokens without attention across documents. The score is
perplexity on held-out text (lower is better), and the run also reports the base model's
perplexity on the same test text (`test.base_model`), so the gain shows at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.data import pipeline
from finegrain.data.load import read_file as read_table
from finegrain.data.readers import Example, ReadResult
from finegrain.errors import FinegrainError
from finegrain.model.llama import Llama
from finegrain.tasks.base import IGNORE_INDEX, kept
from finegrain.tasks.instruct import InstructEncoded, InstructModel, collate_packed, pack


def read_text(data, path: str) -> ReadResult:
    """Documents of a `.txt` file (paragraphs) or of a table's text field; labels are not read."""
    if Path(path).suffix.lower() != ".txt":
        return read_table(data, path, require_label=False)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FinegrainError(f"{path}: no such file; give a .txt file or a JSONL/CSV/TSV file with a text field") from None
    except UnicodeDecodeError as exc:
        raise FinegrainError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    examples, line = [], 1
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            first = line + len(paragraph) - len(paragraph.lstrip("\n"))  # the paragraph's first line
            examples.append(Example(text=paragraph.strip(), label=None, source=f"{path}:{first}"))
        line += paragraph.count("\n") + 2
    return ReadResult(examples)


class LanguageModelTask:
    """Plain text, packed; the loss on every next token; perplexity as the score."""

    name = "lm"
    endpoint = None  # its adapter steers the language model: served by the generation endpoints
    headline_metric = "perplexity"
    peft_task_type = "CAUSAL_LM"
    head_modules = ()
    predicts_from_prefix = True
    reports_base_model = True  # finegrain.run also scores the test text with the adapter switched off

    def __init__(self, labels: Sequence[str] = ()):
        self.labels: list = []

    @classmethod
    def from_config(cls, config, labels: list) -> LanguageModelTask:
        if config.model.bidirectional:
            raise FinegrainError("model.bidirectional: task lm predicts left to right; remove the key")
        return cls()

    # -- data ------------------------------------------------------------------------------

    @staticmethod
    def load_splits(data):
        """Documents of `data.train` (and `data.validation`/`data.test`, else split off train)."""

        def read(path: str):
            result = read_text(data, path)
            if not result.examples:
                raise FinegrainError(f"{path}: no text")
            return result

        splits = pipeline.load_splits(data, read, task="lm", files="a .txt file or a JSONL/CSV/TSV file of texts")
        splits.labels = []
        return splits

    def read_file(self, data, path: str, require_label: bool = True, skipped: list[str] | None = None) -> list:
        return kept(read_text(data, path), skipped)

    def examples_from_inputs(self, inputs: Sequence[Any], data) -> list:
        return [value if isinstance(value, Example) else Example(text=str(value), label=None, source=f"input:{i + 1}")
                for i, value in enumerate(inputs)]

    def input_record(self, example) -> dict[str, Any]:
        return {"text": example.text}

    def gold(self, examples) -> list:
        return [None] * len(examples)

    # -- tokens ----------------------------------------------------------------------------

    def encode(self, tokenizer, examples: Sequence[Example], max_length: int) -> list[InstructEncoded]:
        """Each document's ids with an end-of-text token, cut into pieces of `max_length`, packed."""
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        pieces = []
        for example in examples:
            ids = tokenizer.encode(example.text, add_special_tokens=False) + end
            for start in range(0, len(ids) - 1, max_length):
                piece = ids[start : start + max_length + 1]  # one more: the last token's target
                inputs, targets = piece[:-1], piece[1:]
                if inputs:
                    pieces.append(InstructEncoded(inputs, targets, [len(inputs)], []))
        return pack(pieces, max_length)

    def collate(self, items: list[InstructEncoded], pad_id: int, hidden: list[torch.Tensor] | None = None):
        return collate_packed(items, pad_id, hidden)

    # -- model -----------------------------------------------------------------------------

    def build_model(self, llama: Llama, tokenizer=None) -> nn.Module:
        return InstructModel(llama)  # per-token losses of the targets: the same model as instruct's

    def set_class_weights(self, train: list) -> None:
        """Nothing to weigh: the targets are the vocabulary's tokens."""

    def long_text_counts(self, items: list) -> None:
        return None  # long documents are cut into pieces, not truncated

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        return float((batch["targets"] != IGNORE_INDEX).sum())

    def loss(self, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.mean() if losses.numel() else losses.sum()

    # -- outputs ---------------------------------------------------------------------------

    def predict(self, model: nn.Module, items: list[InstructEncoded], pad_id: int, batch_size: int = 64,
                hidden: list[torch.Tensor] | None = None, start_layer: int = 0, progress: str | None = None) -> list[dict]:
        """Per row: the summed negative log-likelihood of its targets and their count."""
        was_training = model.training
        model.eval()
        results = []
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                rows = items[start : start + batch_size]
                batch = self.collate(rows, pad_id, hidden[start : start + batch_size] if hidden is not None else None)
                losses = model(batch, start_layer)
                counts = (batch["targets"] != IGNORE_INDEX).sum(1).tolist()
                for part, count in zip(losses.split(counts), counts):
                    results.append({"nll": float(part.double().sum()), "tokens": int(count)})
        model.train(was_training)
        return results

    def metrics(self, predictions: list[dict[str, Any]], gold: list) -> dict[str, Any]:
        tokens = sum(p["tokens"] for p in predictions)
        if not tokens:
            raise FinegrainError("task lm: no tokens to score; the held-out text is empty")
        loss = sum(p["nll"] for p in predictions) / tokens
        return {"perplexity": math.exp(loss), "loss": loss, "tokens": tokens, "num_examples": len(predictions)}

    def write_report(self, run_dir: Path, metrics: dict[str, Any], split: str, title: str) -> None:
        from finegrain.evaluate.report import Table, write_report

        rows = [["perplexity", metrics["perplexity"]], ["loss (nats per token)", metrics["loss"]], ["tokens", metrics["tokens"]]]
        if "base_model" in metrics:
            rows.append(["perplexity of the base model", metrics["base_model"]["perplexity"]])
        summary = f"{split}: perplexity {metrics['perplexity']:.3f} over {metrics['tokens']} tokens"
        write_report(run_dir, title, summary, [Table("Scores", ["metric", "value"], rows)])

    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        lines = [f"  perplexity           {metrics['perplexity']:.3f}", f"  tokens               {metrics['tokens']}"]
        if "base_model" in metrics:
            lines.append(f"  base model           {metrics['base_model']['perplexity']:.3f}")
        return "\n".join(lines)
