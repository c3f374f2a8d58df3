"""The test predictions a span task keeps for a person to read: each test example of an NER,
relation or QA run with its gold and predicted spans, one JSON object per line in the run's
`test_predictions.jsonl` (`rundir.TEST_PREDICTIONS`), which the dashboard shows with the errors
highlighted. Character offsets are into the record's own text, `end` exclusive.

- ner: `text`, `gold` and `predicted` entities (`type`, `start`, `end`, `text`; a predicted one
  also its `score`), `correct` (the two sets are the same).
- ner with plain tags (`data.scheme: plain`): `text`, `words`, their `gold` and `predicted` tags,
  `wrong_words` (the indices of words tagged wrong), `correct` (none is).
- relation: `text`, the `head` and `tail` mentions (`start`, `end`, `text`), the `gold` and
  `predicted` relation, the predicted one's `probability`, `correct`.
- qa: `id`, `question`, `context`, `gold` answers (`text`, `start`, `end`), the `predicted` answer
  (`answer`, `start`, `end`, `score`; no answer: "" and None), its SQuAD `exact_match` and `f1`
  against the best gold answer, `correct` (exact match).

Every record also has `source` (`file:line` of the example) and `index` (its place in the test split).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finegrain.atomic import atomic_write_text
from finegrain.evaluate.squad import best_scores
from finegrain.tags import default_entities

SPAN_TASKS = ("ner", "relation", "qa")


def prediction_records(task: str, examples: Sequence[Any], predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per labelled test example of a span task (see the module docstring); [] for any other task.

    Args:
        task: the run's `task:` name.
        examples: the test split (`TokenExample`, `RelationExample` or `QAExample`), in order.
        predictions: the task's decoded predictions of `examples`, in the same order.
    """
    record = {"ner": _ner_record, "tags": _tag_record, "relation": _relation_record, "qa": _qa_record}.get(task)
    if record is None:
        return []
    rows = []
    for index, (example, predicted) in enumerate(zip(examples, predictions, strict=True)):
        if example.label is None:  # an unlabelled example has no error to show
            continue
        rows.append({"index": index, "source": example.source, **record(example, predicted)})
    return rows


def write_test_predictions(path: str | Path, task: str, examples: Sequence[Any],
                           predictions: Sequence[dict[str, Any]]) -> bool:
    """Write `prediction_records` as JSON lines to `path` (atomically); False, writing nothing, when there are none."""
    rows = prediction_records(task, examples, predictions)
    if not rows:
        return False
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return True


def _ner_record(example, predicted: dict[str, Any]) -> dict[str, Any]:
    gold = []
    for type_, first, end in default_entities(example.tags):
        start, stop = example.offsets[first][0], example.offsets[end - 1][1]
        gold.append({"type": type_, "start": start, "end": stop, "text": example.text[start:stop]})
    found = [{key: e[key] for key in ("type", "start", "end", "text", "score")} for e in predicted["entities"]]
    return {"text": example.text, "gold": gold, "predicted": found, "correct": _spans(gold) == _spans(found)}


def _tag_record(example, predicted: dict[str, Any]) -> dict[str, Any]:
    # Plain tags (parts of speech, chunks): no entities, so the words whose tag is wrong.
    wrong = [i for i, (g, p) in enumerate(zip(example.tags, predicted["tags"])) if g != p]
    return {"text": example.text, "words": example.words, "gold": example.tags, "predicted": predicted["tags"],
            "wrong_words": wrong, "correct": not wrong}


def _spans(entities: list[dict[str, Any]]) -> set[tuple[str, int, int]]:
    return {(e["type"], e["start"], e["end"]) for e in entities}


def _relation_record(example, predicted: dict[str, Any]) -> dict[str, Any]:
    label = predicted["label"]
    return {
        "text": example.text, "head": example.span("head"), "tail": example.span("tail"), "gold": example.label,
        "predicted": label, "probability": predicted["probabilities"][label], "correct": label == example.label,
    }


def _qa_record(example, predicted: dict[str, Any]) -> dict[str, Any]:
    answers = [{"text": a.text, "start": a.start, "end": a.start + len(a.text)} for a in example.answers]
    exact, f1 = best_scores(predicted["answer"], [a.text for a in example.answers])
    return {
        "id": example.id, "question": example.question, "context": example.context, "gold": answers,
        "predicted": {key: predicted[key] for key in ("answer", "start", "end", "score")},
        "exact_match": exact, "f1": round(f1, 6), "correct": bool(exact),
    }
