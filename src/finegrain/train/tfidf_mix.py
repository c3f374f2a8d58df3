"""After training: fit the TF-IDF model, choose its mixing weight on validation, keep it with the run.

`head.tfidf_mix` (finegrain.tasks.lexical): `auto` picks the regularisation strength and the
weight (0 to 0.9) whose mixed validation predictions score best by `train.metric`; a number fixes
the weight (at the middle strength); 0 turns it off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finegrain import rundir
from finegrain.evaluate.baselines import is_spaceless
from finegrain.evaluate.metrics import higher_is_better
from finegrain.inference import predict_outputs
from finegrain.tasks.lexical import STRENGTHS, LexicalModel, choose_weight, ranking
from finegrain.train.trainer import flat_metrics


def mixes(config: Any) -> bool:
    """Whether the run mixes a TF-IDF model in: single-label classification with `head.tfidf_mix` on."""
    setting = config.head.tfidf_mix
    return config.task == "classification" and not config.data.multi_label and setting not in (0, 0.0, None, False)


def fit_tfidf_mix(
    config: Any, task: Any, model: torch.nn.Module, splits: Any, validation_items: list, pad_id: int, run_dir: Path,
    hidden: list[torch.Tensor] | None = None, start_layer: int = 0,
) -> dict[str, Any] | None:
    """Fit, weigh, attach to `task` (its `decode` then mixes) and save; the summary for metrics.json.

    Args:
        model: the trained model, with its best weights loaded.
        validation_items: the encoded validation split; `hidden`/`start_layer`: its cached
            frozen-prefix states, when the trainer kept them (saves the lower layers' pass).

    Returns:
        None when the run does not mix; else the weight, the features, and per weight tried its
        validation score and log-loss.
    """
    if not mixes(config) or not validation_items:
        return None
    train_texts = [e.text for e in splits.train]
    char_level = bool(config.data.char_level) or is_spaceless(train_texts)
    targets = [task.index[e.label] for e in splits.train]
    setting = config.head.tfidf_mix
    fixed = setting != "auto"
    # A fixed weight takes the middle strength; auto tries each strength with each weight.
    candidates = LexicalModel.fit(train_texts, targets, len(task.labels), char_level,
                                  STRENGTHS[1:2] if fixed else STRENGTHS)
    outputs = predict_outputs(model, task, validation_items, pad_id, config.train.eval_batch_size, hidden, start_layer)
    model_probs = task.probabilities(outputs)
    validation_texts = [e.text for e in splits.validation]
    gold_labels = task.gold(splits.validation)
    metric = config.train.metric or task.headline_metric

    def score(probs: torch.Tensor) -> float:
        value = float(flat_metrics(task.metrics(task.decode(probs), gold_labels))[metric])
        return value if higher_is_better(metric) else -value

    gold = torch.tensor([task.index[label] for label in gold_labels])
    if fixed:
        lexical, table = candidates[0], []
        lexical.weight = float(setting)
    else:
        table = []
        for candidate in candidates:
            candidate.weight, rows = choose_weight(model_probs, candidate.probabilities(validation_texts), gold, score)
            table += [{"strength": candidate.strength, **row} for row in rows]
        best = max(table, key=ranking)
        lexical = next(c for c in candidates if c.strength == best["strength"])
    summary: dict[str, Any] = {"weight": lexical.weight, "strength": lexical.strength,
                               "features": "character 1-3-grams" if char_level else "word 1-2-grams",
                               "metric": metric, "validation": table}
    if lexical.weight:
        task.lexical = lexical
        lexical.save(rundir.tfidf_dir(run_dir))
    return summary


def mix_line(summary: dict[str, Any]) -> str:
    """The terminal line for the mix `fit_tfidf_mix` chose."""
    if not summary["validation"]:
        return f"tfidf mix: weight {summary['weight']} (head.tfidf_mix)"
    alone = summary["validation"][0]["score"]  # weight 0: the model alone
    chosen = next(r for r in summary["validation"]
                  if (r["strength"], r["weight"]) == (summary["strength"], summary["weight"]))
    return (f"tfidf mix: weight {summary['weight']} (C {summary['strength']:g}, {summary['features']}): validation "
            f"{summary['metric']} {abs(chosen['score']):.4f}, the model alone {abs(alone):.4f}")


def test_metrics_mixed(
    task: Any, model: torch.nn.Module, items: list, examples: list, pad_id: int, batch_size: int, progress: str | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The test metrics of the mixed predictions, and the language model's alone (one forward pass).

    The second is what the report shows beside the baselines as "model alone", in their form
    (`accuracy`, `macro_f1`, `per_class` F1).
    """
    probs = task.probabilities(predict_outputs(model, task, items, pad_id, batch_size, progress=progress))
    gold = task.gold(examples)
    alone = task.metrics(task.decode(probs), gold)
    alone_scores = {"accuracy": alone["accuracy"], "macro_f1": alone["macro"]["f1"],
                    "per_class": {label: scores["f1"] for label, scores in alone["per_class"].items()}}
    return task.metrics(task.decode(probs, items), gold), alone_scores
