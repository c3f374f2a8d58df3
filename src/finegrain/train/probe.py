"""Layer-importance probe: which decoder layers carry what a classification task needs.

A frozen model's last-token state after each layer is read for a sample of the training
examples and scored by a linear classifier (ridge regression on one-hot labels, closed form,
on standardised states) against a sample of the validation examples. Where the score peaks
is where adapting pays: `model.num_layers` can stop there (every layer above it costs time
and rarely helps a classifier), and LoRA on the few layers below the peak (`lora.layers`)
lets the frozen-prefix cache skip the rest. Minutes on a CPU instead of one training run per
candidate: the table in docs/PERFORMANCE.md was made this way.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from finegrain.checkpoint.load import load_model
from finegrain.config import RunConfig
from finegrain.data.load import sample
from finegrain.errors import FinegrainError
from finegrain.tasks import task_class
from finegrain.train.batching import sorted_batches

ADAPTED_LAYERS = 6  # what the proposal adapts below the peak, as the main job does


def last_token_states(backbone, task, items: list, pad_id: int, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """(L + 1, N, H): the embedding and every layer's output at each item's last real token."""
    states = torch.empty(len(backbone.layers) + 1, len(items), backbone.config.hidden_size)
    batches = sorted_batches([len(item.input_ids) for item in items], batch_size)
    with torch.no_grad():
        for batch in tqdm(batches, desc="probing layers", unit="batch", disable=not progress, leave=False):
            inputs = task.collate([items[i] for i in batch], pad_id)
            last = inputs["lengths"] - 1  # right padding under a causal mask: the real tokens never see it
            rows = torch.arange(len(batch))
            x = backbone.embed_tokens(inputs["input_ids"])
            states[0, batch] = x[rows, last]
            for layer in range(len(backbone.layers)):
                x = backbone.run_layers(x, start=layer, end=layer + 1)
                states[layer + 1, batch] = x[rows, last]
    return states


def ridge_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, ridge: float | None = None) -> float:
    """Accuracy on (test_x, test_y) of ridge regression onto one-hot labels fitted on the training pair.

    `ridge` defaults to the number of features: with a few hundred examples of a 576-wide state
    a weak penalty fits noise (Rotten Tomatoes, 400 examples: peak accuracy 0.71 at 1, 0.78 at
    100, 0.81 at 1,000, 0.80 at 10,000).
    """
    ridge = float(train_x.shape[1]) if ridge is None else ridge
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    a, b = ((train_x - mean) / std).double(), ((test_x - mean) / std).double()
    a, b = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1), torch.cat([b, torch.ones(len(b), 1, dtype=b.dtype)], 1)
    targets = torch.nn.functional.one_hot(train_y, num_classes).double()
    weights = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets)
    return float(((b @ weights).argmax(1) == test_y).double().mean())


def probe_layers(config: RunConfig, examples: int = 400, progress: bool = True) -> dict[str, Any]:
    """Per layer, the validation accuracy of a linear probe on the frozen model's last-token states.

    Returns:
        `accuracy` (one per layer output, index 0 the embeddings), `best_layer`, the sample sizes,
        and `proposal`: the `model.num_layers` and `lora.layers` to try.
    """
    if config.task != "classification" or config.data.multi_label:
        raise FinegrainError(f"task: probe reads single-label classification data, not task {config.task}"
                             f"{' (multi-label)' if config.data.multi_label else ''}")
    splits = task_class(config.task).load_splits(config.data)
    if not splits.validation:
        raise FinegrainError("data: the probe scores layers on validation examples; give data.validation or a split for it")
    llama, tokenizer = load_model(config.model.name, progress=progress)
    task = task_class(config.task).from_config(config, splits.labels)
    seed = config.data.split_seed
    parts = [sample(part, examples, seed) for part in (splits.train, splits.validation)]
    index = {label: i for i, label in enumerate(splits.labels)}
    x, y = [], []
    for part in parts:
        items = task.encode(tokenizer, part, config.data.max_length)
        x.append(last_token_states(llama.model, task, items, tokenizer.pad_token_id, config.train.eval_batch_size, progress))
        y.append(torch.tensor([index[e.label] for e in part]))
    accuracy = [ridge_accuracy(x[0][k], y[0], x[1][k], y[1], len(splits.labels)) for k in range(len(x[0]))]
    best = max(range(1, len(accuracy)), key=lambda k: (accuracy[k], -k))  # the lowest layer among equals
    adapted = min(ADAPTED_LAYERS, best)
    return {
        "accuracy": [round(a, 4) for a in accuracy],
        "best_layer": best,
        "train_examples": len(parts[0]),
        "validation_examples": len(parts[1]),
        "proposal": {"model.num_layers": best, "lora.layers": list(range(-adapted, 0))},
    }


def probe_text(result: dict[str, Any]) -> str:
    """The probe's table and proposal, for the terminal."""
    lines = [f"linear probe of the last-token state ({result['train_examples']} train, "
             f"{result['validation_examples']} validation examples)", "layer  accuracy"]
    for k, a in enumerate(result["accuracy"]):
        lines.append(f"{'embed' if k == 0 else k:>5}  {a:.3f}{'  <- best' if k == result['best_layer'] else ''}")
    proposal = result["proposal"]
    layers = ",".join(str(i) for i in proposal["lora.layers"])
    lines.append(f"try: --set model.num_layers={proposal['model.num_layers']} --set lora.layers=[{layers}]")
    return "\n".join(lines)
