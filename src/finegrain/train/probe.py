"""Layer-importance probe: which decoder layers carry what a classification task needs.

A frozen model's state after each layer — at the last real token and averaged over the real
tokens — is read for a sample of the training examples and scored by a linear classifier
(ridge regression on one-hot labels, closed form, on standardised states) against a sample of
the validation examples; where the validation split is small (`SMALL_VALIDATION`: 10 texts
of 100 labels split 90/10), by cross-validation over both samples together. Where the score
peaks is where adapting pays: `model.num_layers` can stop there (every layer above it costs time
and rarely helps a classifier), and LoRA on the few layers below the peak (`lora.layers`) lets
the frozen-prefix cache skip the rest. Minutes on a CPU instead of one training run per
candidate: the table in docs/PERFORMANCE.md was made this way, and `finegrain train`'s recipe
(finegrain.train.recipe) runs it to choose the cut, the pooling and the adapted layers.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from finegrain.checkpoint.load import load_model
from finegrain.config import RunConfig
from finegrain.data.load import Splits, sample
from finegrain.errors import FinegrainError
from finegrain.evaluate.metrics import classification_metrics
from finegrain.tasks import task_class
from finegrain.inference import sorted_batches
from finegrain.model.backbone import hidden_states

ADAPTED_LAYERS = 6  # what the proposal adapts below the peak, as the main job does
POOLINGS = ("last", "mean")
# A validation split of fewer examples than this is too small to choose by: ten validation texts (a
# 10% share of 100 labels) score a layer in steps of 0.1, many layers tie, and the lowest of them won
# (a Dutch set cut at layer 2). The probe then scores by cross-validation over its training and
# validation samples together (FOLDS folds), and the recipe averages the last epochs' weights
# instead of keeping the best-scoring checkpoint (finegrain.train.recipe).
SMALL_VALIDATION = 100
FOLDS = 5


def small_validation(count: int) -> bool:
    """Whether a validation split of `count` texts is one too small to choose on: some, but fewer
    than `SMALL_VALIDATION` (with none there is nothing to choose on at all)."""
    return 0 < count < SMALL_VALIDATION


def pooled_states(backbone, task, items: list, pad_id: int, batch_size: int = 32, progress: bool = True,
                  num_layers: int | None = None) -> torch.Tensor:
    """(2, L + 1, N, H): the embedding and the output of each of the first `num_layers` layers
    (default all), at each item's last real token ([0]) and averaged over its real tokens ([1])."""
    num_layers = len(backbone.layers) if num_layers is None else num_layers
    states = torch.empty(2, num_layers + 1, len(items), backbone.config.hidden_size)
    batches = sorted_batches([len(item.input_ids) for item in items], batch_size)
    with torch.no_grad():
        for batch in tqdm(batches, desc="probing layers", unit="batch", disable=not progress, leave=False):
            inputs = task.collate([items[i] for i in batch], pad_id)
            lengths = inputs["lengths"]
            last = lengths - 1  # right padding under a causal mask: the real tokens never see it
            real = (torch.arange(inputs["input_ids"].shape[1])[None, :] < lengths[:, None])[..., None]  # (B, T, 1)
            rows = torch.arange(len(batch))
            x = hidden_states(backbone, inputs, 0, 0)  # the embedding
            for layer in range(num_layers + 1):
                if layer:  # one layer at a time through the backbone contract, each output kept
                    x = hidden_states(backbone, {**inputs, "hidden": x}, layer - 1, layer)
                states[0, layer, batch] = x[rows, last]
                states[1, layer, batch] = (x * real).sum(1) / lengths[:, None]
    return states


def last_token_states(backbone, task, items: list, pad_id: int, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """(L + 1, N, H): the embedding and every layer's output at each item's last real token."""
    return pooled_states(backbone, task, items, pad_id, batch_size, progress)[0]


def ridge_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
                  ridge: float | None = None) -> torch.Tensor:
    """Class indices for `test_x` from ridge regression onto one-hot labels fitted on the training pair.

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
    return (b @ weights).argmax(1)


def folds(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """A fold index per example, stratified: each class's examples, shuffled with `seed`, dealt
    round-robin (the next class starting where the last one stopped)."""
    generator = torch.Generator().manual_seed(seed)
    assigned, start = torch.empty(len(labels), dtype=torch.long), 0
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        assigned[members] = (torch.arange(len(members)) + start) % count
        start = (start + len(members)) % count
    return assigned


def cross_validated(x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each example's class index from `ridge_predict` fitted on the other folds."""
    predicted = torch.empty_like(y)
    for k in fold.unique().tolist():
        held = fold == k
        predicted[held] = ridge_predict(x[~held], y[~held], x[held], num_classes)
    return predicted


def ridge_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, ridge: float | None = None) -> float:
    """Accuracy on (test_x, test_y) of `ridge_predict` fitted on the training pair."""
    return float((ridge_predict(train_x, train_y, test_x, num_classes, ridge) == test_y).double().mean())


def probe_layers(config: RunConfig, examples: int = 400, progress: bool = True, splits: Splits | None = None,
                 llama=None, tokenizer=None, max_layers: int | None = None) -> dict[str, Any]:
    """Per layer and pooling, the validation accuracy and macro-F1 of a linear probe on the frozen model.

    Args:
        examples: at most this many training and this many validation examples (stratified).
        splits, llama, tokenizer: already loaded data and model (the recipe passes them); loaded
            from `config` when None.
        max_layers: probe only the first this many layers (the top ones are rarely the best cut).

    Returns:
        `accuracy` and `macro_f1` (last-token pooling), `mean_accuracy` and `mean_macro_f1` (mean
        pooling), one per layer output (index 0 the embeddings); `best_layer` and `best_pooling`
        by macro-F1 (accuracy breaks ties, then the lower layer); the sample sizes, and `folds`
        where the scores are cross-validated over both samples (None where validation scored them);
        `seconds_per_layer_token` (how fast this machine ran the frozen layers); and `proposal`:
        the `model.num_layers` and `lora.layers` to try.
    """
    if config.task != "classification" or config.data.multi_label:
        raise FinegrainError(f"task: probe reads single-label classification data, not task {config.task}"
                             f"{' (multi-label)' if config.data.multi_label else ''}")
    splits = splits or task_class(config.task).load_splits(config.data)
    if not splits.validation:
        raise FinegrainError("data: the probe scores layers on validation examples; give data.validation or a split for it")
    if examples < len(splits.labels):
        raise FinegrainError(f"--examples: {examples} cannot hold each of the {len(splits.labels)} labels once; "
                             f"give at least {len(splits.labels)} (default 400)")
    if llama is None:
        llama, tokenizer = load_model(config.model.name, progress=progress)
    task = task_class(config.task).from_config(config, splits.labels)
    if task.texts.long_texts == "windows":
        task.texts.long_texts = "head_tail"  # one row per text (its beginning and end): the probe pools rows
    seed = config.data.split_seed
    parts = [sample(part, examples, seed) for part in (splits.train, splits.validation)]
    index = {label: i for i, label in enumerate(splits.labels)}
    num_layers = min(max_layers or len(llama.model.layers), len(llama.model.layers))
    x, y, tokens = [], [], 0
    started = time.perf_counter()
    for part in parts:
        items = task.encode(tokenizer, part, config.data.max_length)
        tokens += sum(len(item.input_ids) for item in items)
        x.append(pooled_states(llama.model, task, items, tokenizer.pad_token_id, config.train.eval_batch_size,
                               progress, num_layers))
        y.append(torch.tensor([index[e.label] for e in part]))
    seconds = time.perf_counter() - started
    pooled = len(splits.validation) < SMALL_VALIDATION  # too few to score on alone: cross-validate over both
    if pooled:
        x, y = [torch.cat(x, dim=2)], [torch.cat(y)]
        fold = folds(y[0], FOLDS, seed)
    gold = [splits.labels[i] for i in y[-1].tolist()]
    scores = {pooling: [] for pooling in POOLINGS}
    for p, pooling in enumerate(POOLINGS):
        for k in range(num_layers + 1):
            if pooled:
                predicted = cross_validated(x[0][p, k], y[0], fold, len(splits.labels))
            else:
                predicted = ridge_predict(x[0][p, k], y[0], x[1][p, k], len(splits.labels))
            m = classification_metrics(gold, [splits.labels[i] for i in predicted.tolist()], splits.labels)
            scores[pooling].append((round(m["accuracy"], 4), round(m["macro"]["f1"], 4)))
    best_pooling, best = max(
        ((pooling, k) for pooling in POOLINGS for k in range(1, num_layers + 1)),
        key=lambda pk: (scores[pk[0]][pk[1]][1], scores[pk[0]][pk[1]][0], -pk[1]),
    )
    adapted = min(ADAPTED_LAYERS, best)
    return {
        "accuracy": [a for a, _ in scores["last"]],
        "macro_f1": [f for _, f in scores["last"]],
        "mean_accuracy": [a for a, _ in scores["mean"]],
        "mean_macro_f1": [f for _, f in scores["mean"]],
        "best_layer": best,
        "best_pooling": best_pooling,
        "train_examples": len(parts[0]),
        "validation_examples": len(parts[1]),
        "folds": FOLDS if pooled else None,  # scored by cross-validation over both parts, not on validation
        "seconds_per_layer_token": seconds / max(tokens * max(num_layers, 1), 1),
        "proposal": {"model.num_layers": best, "lora.layers": list(range(-adapted, 0)), "head.pooling": best_pooling},
    }


def probe_sample(result: dict[str, Any]) -> str:
    """What the probe scored on: `N train, M validation examples`, or their cross-validation."""
    sample = f"{result['train_examples']} train, {result['validation_examples']} validation examples"
    if result.get("folds"):
        return f"{result['folds']}-fold cross-validation over {sample}"
    return sample


def probe_text(result: dict[str, Any]) -> str:
    """The probe's table and proposal, for the terminal."""
    lines = [f"linear probe of each layer's states ({probe_sample(result)})",
             "layer  last: accuracy macro-F1   mean: accuracy macro-F1"]
    for k in range(len(result["accuracy"])):
        best = "  <- best" if k == result["best_layer"] else ""
        lines.append(f"{'embed' if k == 0 else k:>5}        {result['accuracy'][k]:.3f}    {result['macro_f1'][k]:.3f}"
                     f"         {result['mean_accuracy'][k]:.3f}    {result['mean_macro_f1'][k]:.3f}{best}")
    proposal = result["proposal"]
    layers = ",".join(str(i) for i in proposal["lora.layers"])
    lines.append(f"try: --set model.num_layers={proposal['model.num_layers']} --set lora.layers=[{layers}] "
                 f"--set head.pooling={proposal['head.pooling']}")
    return "\n".join(lines)
