"""After training: fit the lexical model, choose its mixing weight on validation, keep it with the run.

`head.tfidf_mix` (a classifier's TF-IDF model, finegrain.tasks.lexical): `auto` picks the
regularisation strength and the weight (0 to 0.9) whose mixed validation probabilities have the
lowest log-loss; a number fixes the weight (at the middle strength); 0 turns it off. `head.word_mix`
(a tagger's word-feature model) picks the weight whose decoded validation tags score best by
`train.metric`, or takes a fixed one.

Where the validation split is too small to choose on (under `SMALL_VALIDATION` texts: 10 of 100
labels), `auto` scores each pair on the training texts as well, as stacking does: each text's
probabilities come from models that never saw it. For the validation texts, the fine-tuned model's
and the TF-IDF models' (fitted on the training split); for up to `CROSS_VALIDATED_TRAIN` training
texts, out of fold (`out_of_fold`: 5 folds over them and the validation texts), a softmax
regression on the untrained model's pooled states (the head LP-FT fits, finegrain.train.linear_probe)
standing in for the fine-tuned model, which cannot be cross-validated without training it once
per fold. On 10 validation texts the fine-tuned model rarely errs, and the log-loss kept it nearly
alone where TF-IDF was the stronger (Dutch reviews: weight 0.3, test macro-F1 0.798; docs/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain import rundir
from finegrain.data.load import sample
from finegrain.evaluate.baselines import WORD_FEATURES, comparable_scores, is_spaceless
from finegrain.evaluate.metrics import higher_is_better
from finegrain.inference import predict_outputs
from finegrain.tags import convert_tags
from finegrain.tasks.lexical import STRENGTHS, LexicalModel, WordModel, by_log_loss, choose_weight, fill
from finegrain.tasks.tokens import labelled_words
from finegrain.train.linear_probe import HeadInputs, fit_softmax
from finegrain.train.probe import FOLDS, folds, small_validation
from finegrain.train.trainer import flat_metrics

CROSS_VALIDATED_TRAIN = 400  # training texts (a stratified sample) the cross-validated choice reads beside validation's


def mixes(config: Any) -> bool:
    """Whether the run mixes a TF-IDF model in: single-label classification with `head.tfidf_mix` on."""
    setting = config.head.tfidf_mix
    return config.task == "classification" and not config.data.multi_label and setting not in (0, 0.0, None, False)


def frozen_sample(config: Any, task: Any, model: torch.nn.Module, tokenizer: Any, splits: Any,
                  pad_id: int) -> tuple[list, torch.Tensor] | None:
    """What `auto` scores beside a small validation split, read before training: at most
    `CROSS_VALIDATED_TRAIN` training examples (stratified) and every validation example, and the
    pooled states the head reads for each from the untrained model (LP-FT's features: the adapters
    start as the identity).

    None where `auto` chooses on validation alone or does not run: not `auto`, a validation split
    of none or of `SMALL_VALIDATION` texts or more, or texts read as several windows (one state each).
    """
    if not (mixes(config) and config.head.tfidf_mix == "auto" and small_validation(len(splits.validation))):
        return None
    examples = sample(splits.train, CROSS_VALIDATED_TRAIN, config.train.seed) + list(splits.validation)
    items = task.encode(tokenizer, examples, config.data.max_length)
    if len(items) != len(examples):
        return None
    with HeadInputs(model, task.head_modules[0]):
        states = predict_outputs(model, task, items, pad_id, config.train.eval_batch_size)
    return examples, states


def out_of_fold(
    states: torch.Tensor, targets: torch.Tensor, texts: list[str], num_labels: int, char_level: bool, seed: int,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """Each example's (N, C) probabilities from models fitted on the other of `FOLDS` stratified
    folds: a softmax regression on `states` (the frozen model's, standing in for the fine-tuned
    one), and per strength of `STRENGTHS` a TF-IDF model of `texts`."""
    fold = folds(targets, FOLDS, seed)
    frozen = torch.zeros(len(targets), num_labels)
    lexical = {strength: torch.zeros(len(targets), num_labels) for strength in STRENGTHS}
    for k in range(FOLDS):
        held, rest = (fold == k).nonzero().flatten().tolist(), (fold != k).nonzero().flatten().tolist()
        weights = fit_softmax(states[rest], targets[rest], num_labels, class_weights)
        frozen[held] = (states[held].double() @ weights.T).softmax(-1).float()
        for model in LexicalModel.fit([texts[i] for i in rest], targets[rest].tolist(), num_labels, char_level):
            lexical[model.strength][held] = model.probabilities([texts[i] for i in held])
    return frozen, lexical


def fit_tfidf_mix(
    config: Any, task: Any, model: torch.nn.Module, splits: Any, validation_items: list, pad_id: int, run_dir: Path,
    hidden: list[torch.Tensor] | None = None, start_layer: int = 0, frozen: tuple[list, torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """Fit, weigh, attach to `task` (its `decode` then mixes) and save; the summary for metrics.json.

    Args:
        model: the trained model, with its best weights loaded.
        validation_items: the encoded validation split; `hidden`/`start_layer`: its cached
            frozen-prefix states, when the trainer kept them (saves the lower layers' pass).
        frozen: `frozen_sample`'s examples and states, where `auto` scores the training texts too.

    Returns:
        None when the run does not mix; else the weight, the features, per weight tried its
        validation score and log-loss, and with `frozen` (`cross_validated`) the table over the
        validation and the training texts that it chose from.
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

    def scorer(expected: list) -> Callable[[torch.Tensor], float]:
        def score(probs: torch.Tensor) -> float:
            value = float(flat_metrics(task.metrics(task.decode(probs), expected))[metric])
            return value if higher_is_better(metric) else -value
        return score

    gold = torch.tensor([task.index[label] for label in gold_labels])
    crossed: dict[str, Any] = {}
    if fixed:
        lexical, table = candidates[0], []
        lexical.weight = float(setting)
    else:
        lexical_probs = {c.strength: c.probabilities(validation_texts) for c in candidates}
        table = [{"strength": strength, **row} for strength, probs in lexical_probs.items()
                 for row in choose_weight(model_probs, probs, gold, scorer(gold_labels))[1]]
        ranked = table
        if frozen is not None:  # too few validation texts: every text the sample holds, each by models that never saw it
            examples, states = frozen
            trained = len(examples) - len(validation_texts)  # the training texts come first, then validation's
            sampled = torch.tensor([task.index[e.label] for e in examples])
            class_weights = getattr(task, "class_weights", None)
            regression, folded = out_of_fold(states, sampled, [e.text for e in examples], len(task.labels), char_level,
                                             config.train.seed, None if class_weights is None else class_weights.cpu())
            model_side = torch.cat([regression[:trained], model_probs.float()])
            ranked = [{"strength": strength, **row} for strength, probs in lexical_probs.items()
                      for row in choose_weight(model_side, torch.cat([folded[strength][:trained], probs]), sampled,
                                               scorer(task.gold(examples)))[1]]
            crossed = {"cross_validated": {"folds": FOLDS, "training_examples": trained, "table": ranked}}
        best = max(ranked, key=by_log_loss)
        lexical = next(c for c in candidates if c.strength == best["strength"])
        lexical.weight = best["weight"]
    summary: dict[str, Any] = {"weight": lexical.weight, "strength": lexical.strength,
                               "features": "character 1-3-grams" if char_level else "word 1-2-grams",
                               "metric": metric, "validation": table, **crossed}
    if lexical.weight:
        task.lexical = lexical
        lexical.save(rundir.tfidf_dir(run_dir))
    return summary


def word_mixes(config: Any) -> bool:
    """Whether the run mixes a word-feature model in: a tagger (task: ner) with `head.word_mix` on."""
    return config.task == "ner" and config.head.word_mix not in (0, 0.0, None, False)


def fit_word_mix(
    config: Any, task: Any, model: torch.nn.Module, splits: Any, validation_items: list, pad_id: int, run_dir: Path,
    hidden: list[torch.Tensor] | None = None, start_layer: int = 0,
) -> dict[str, Any] | None:
    """A tagger's `fit_tfidf_mix`: the word-feature model fitted on the training sentences in the
    head's tags, its weight chosen on validation (or fixed), attached to `task` and saved.

    Returns:
        None when the run does not mix (or its training sentences hold one tag); else the weight,
        the features, and per weight tried its validation score (the words past max_length tagged by
        the word model alone, as predictions tag them) and log-loss (of the words within max_length).
    """
    if not word_mixes(config) or not validation_items:
        return None
    targets = [[task.index[tag] for tag in convert_tags(e.tags, task.scheme)] for e in splits.train]
    if len({t for tags in targets for t in tags}) < 2:
        return None
    lexical = WordModel.fit([e.words for e in splits.train], targets, len(task.tags))
    metric = config.train.metric or task.headline_metric
    table: list[dict[str, float]] = []
    if config.head.word_mix == "auto":
        outputs = predict_outputs(model, task, validation_items, pad_id, config.train.eval_batch_size, hidden, start_layer)
        model_probs = task.word_probabilities(task.probabilities(outputs), validation_items)
        kept = [labelled_words(item) for item in validation_items]
        every = lexical.probabilities([item.example.words for item in validation_items])  # the cut words' tags
        lexical_probs = [probs[indices] for probs, indices in zip(every, kept)]
        gold_tags, sizes = task.gold(splits.validation), [len(probs) for probs in model_probs]

        def score(probs: torch.Tensor) -> float:  # as `task.decode` predicts with the model mixed in at a weight
            predictions = [task.decode_words(fill(whole, part.numpy(), indices), item, range(len(whole)))
                           for part, whole, indices, item in zip(probs.split(sizes), every, kept, validation_items)]
            value = float(flat_metrics(task.metrics(predictions, gold_tags))[metric])
            return value if higher_is_better(metric) else -value

        gold = torch.tensor([max(item.targets[item.positions[i]], -1) for item, indices in zip(validation_items, kept)
                             for i in indices], dtype=torch.long)  # -1: a tag the head lacks
        lexical.weight, table = choose_weight(torch.from_numpy(np.concatenate(model_probs)),
                                              torch.from_numpy(np.concatenate(lexical_probs)), gold, score)
    else:
        lexical.weight = float(config.head.word_mix)
    summary: dict[str, Any] = {"weight": lexical.weight, "features": WORD_FEATURES, "metric": metric,
                               "validation": table}
    if lexical.weight:
        task.lexical = lexical
        lexical.save(rundir.word_model_dir(run_dir))
    return summary


def mix_line(summary: dict[str, Any]) -> str:
    """The terminal line for the mix `fit_tfidf_mix` or `fit_word_mix` chose."""
    tfidf = "strength" in summary  # a classifier's TF-IDF mix, chosen by log-loss; else a tagger's word mix
    name, key = ("tfidf mix", "head.tfidf_mix") if tfidf else ("word mix", "head.word_mix")
    if not summary["validation"]:
        return f"{name}: weight {summary['weight']} ({key})"
    alone = summary["validation"][0]  # weight 0: the model alone
    chosen = next(r for r in summary["validation"]
                  if (r.get("strength"), r["weight"]) == (summary.get("strength"), summary["weight"]))
    strength = f"C {summary['strength']:g}, " if tfidf else ""
    by_loss = ""
    if "cross_validated" in summary:
        crossed = summary["cross_validated"]
        row = next(r for r in crossed["table"] if (r["strength"], r["weight"]) == (summary["strength"], summary["weight"]))
        by_loss = (f", chosen by log-loss {row['log_loss']:.4f} over the validation texts and {crossed['training_examples']} "
                   f"training texts cross-validated in {crossed['folds']} folds (the model alone "
                   f"{crossed['table'][0]['log_loss']:.4f})")
    elif tfidf:
        by_loss = f", chosen by validation log-loss {chosen['log_loss']:.4f} (the model alone {alone['log_loss']:.4f})"
    return (f"{name}: weight {summary['weight']} ({strength}{summary['features']}){by_loss}: validation "
            f"{summary['metric']} {abs(chosen['score']):.4f}, the model alone {abs(alone['score']):.4f}")


def test_metrics_mixed(
    task: Any, model: torch.nn.Module, items: list, examples: list, pad_id: int, batch_size: int, progress: str | None,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The test metrics of the mixed predictions, the language model's alone (one forward pass),
    and the mixed predictions.

    The second is what the report shows beside the baselines as "model alone", in their form
    (`comparable_scores`: `accuracy`, `macro_f1`, `per_class` F1, a tagger's entity `f1`).
    """
    probs = task.probabilities(predict_outputs(model, task, items, pad_id, batch_size, progress=progress))
    gold = task.gold(examples)
    alone = comparable_scores(task.metrics(task.decode(probs, items, mixed=False), gold))
    predictions = task.decode(probs, items)
    return task.metrics(predictions, gold), alone, predictions
