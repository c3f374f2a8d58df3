"""Token-level noise: extra training examples, and the perturbed test sets of `evaluate --robustness`.

Three perturbations of a text, each seeded and label-preserving on text tasks (classification,
regression): random word deletion, a swap of adjacent words, and character typos (a letter
dropped, doubled, replaced by a keyboard neighbour, or swapped with the next one). With
`augment: {deletion: 0.1, swap: 0.1, typos: 0.1}` a run's training split gains, per kind,
round(fraction × training examples) perturbed copies of training examples drawn at random
(`augment_examples`); validation and test never see them, and metrics.json counts them under
`train.augmented`. The same functions make the perturbed copies of a labelled file that
`finegrain evaluate RUN --data FILE --robustness` scores beside the clean one (with `--paraphrase`,
also the copies an instruct model rewrote: finegrain.paraphrase).

What each changes (`rate` is the share of words, or of letters, touched, at least one):
    deletion  words removed (never the last one)
    swap      pairs of adjacent words exchanged
    typos     letters of words of 2+ letters mistyped
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Callable
from typing import Any

from finegrain.config import AugmentConfig
from finegrain.errors import FinegrainError

KINDS = ("deletion", "swap", "typos")
RATE = 0.1  # share of the words (deletion, swap) or letters (typos) a perturbation touches

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Each letter's neighbouring keys on a QWERTY keyboard (its row and the rows above and below):
    the letter a finger hits by mistake."""
    neighbours = {}
    for r, row in enumerate(_ROWS):
        for i, letter in enumerate(row):
            near = [other[k] for other in _ROWS[max(0, r - 1): r + 2] for k in range(max(0, i - 1), min(len(other), i + 2))]
            neighbours[letter] = "".join(c for c in near if c != letter)
    return neighbours


_NEIGHBOURS = _keyboard_neighbours()


def _count(total: int, rate: float) -> int:
    return max(1, round(rate * total))


def word_deletion(text: str, rng: random.Random, rate: float = RATE) -> str:
    """The text without `rate` of its words (at least one; a one-word text is kept whole)."""
    words = text.split()
    if len(words) < 2:
        return text
    drop = set(rng.sample(range(len(words)), min(_count(len(words), rate), len(words) - 1)))
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def word_swap(text: str, rng: random.Random, rate: float = RATE) -> str:
    """The text with `rate` of its words (at least one pair) exchanged with the next word."""
    words = text.split()
    if len(words) < 2:
        return text
    for _ in range(_count(len(words), rate)):
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def char_typos(text: str, rng: random.Random, rate: float = RATE) -> str:
    """The text with `rate` of its letters (at least one) mistyped: dropped, doubled, replaced by a
    keyboard neighbour or swapped with the next letter. Words and the spaces between them stay."""
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    if not letters:
        return text
    chars = list(text)
    for i in sorted(rng.sample(letters, min(_count(len(letters), rate), len(letters))), reverse=True):
        c = chars[i]
        kind = rng.randrange(4)
        if kind == 0 and len(letters) > 1:
            del chars[i]
        elif kind == 1:
            chars.insert(i, c)
        elif kind == 2 and i + 1 < len(chars) and chars[i + 1].isalpha():
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        else:
            neighbours = _NEIGHBOURS.get(c.lower()) or string.ascii_lowercase
            typo = rng.choice(neighbours)
            chars[i] = typo.upper() if c.isupper() else typo
    return "".join(chars)


PERTURB = {"deletion": word_deletion, "swap": word_swap, "typos": char_typos}


def _require_texts(examples: list, what: str) -> None:
    if examples and not all(isinstance(getattr(e, "text", None), str) for e in examples):
        raise FinegrainError(f"{what}: token-level noise perturbs a text per example; it applies to classification "
                             "and regression data, not to this task's examples")


def perturbed(examples: list, kind: str, seed: int = 0, rate: float = RATE) -> list:
    """A perturbed copy of each example (same label), the same for the same seed."""
    _require_texts(examples, f"--robustness {kind}")
    rng = random.Random(f"{kind}:{seed}")
    return [dataclasses.replace(e, text=PERTURB[kind](e.text, rng, rate)) for e in examples]


def augment_examples(train: list, augment: AugmentConfig, seed: int) -> tuple[list, dict[str, int]]:
    """The training examples and, after them, the perturbed copies `augment` asks for.

    Per kind, round(fraction × len(train)) examples are drawn at random (with replacement past one
    copy each) and perturbed; the draw and the noise are seeded by `seed` and the kind, so a resumed
    run trains on the same examples. Returns the examples and the number added per kind.
    """
    fractions = {kind: getattr(augment, kind) for kind in KINDS if getattr(augment, kind)}
    if not fractions:
        return train, {}
    _require_texts(train, "augment")
    extra: list[Any] = []
    counts = {}
    for kind, fraction in fractions.items():
        rng = random.Random(f"augment:{kind}:{seed}")
        count = round(fraction * len(train))
        chosen = [train[i] for i in draw(len(train), count, rng)]
        extra += [dataclasses.replace(e, text=PERTURB[kind](e.text, rng), source=f"{e.source} ({kind})") for e in chosen]
        counts[kind] = count
    return train + extra, counts


def draw(total: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices below `total`: without replacement while they last, then again."""
    indices: list[int] = []
    while len(indices) < count:
        indices += rng.sample(range(total), min(total, count - len(indices)))
    return indices


def robustness(predictor: Any, examples: list, clean: dict[str, Any],
               paraphrase: Callable[[list], tuple[list, int]] | None = None) -> dict[str, Any]:
    """`evaluate --robustness`: the run's headline score on labelled `examples` (a file's, or the
    run's test split) and on their copies under each perturbation (seed 0), beside `clean` (the
    examples' metrics as they are).

    `predictor` is a `finegrain.load(...)` result (a run or an ensemble). With `paraphrase` (the
    examples -> their paraphrased copies and how many were rewritten: `--paraphrase`), also the
    score on those copies, and the count as `paraphrased`.
    """
    task = predictor.task
    metric = predictor.config.train.metric or task.headline_metric
    gold = task.gold(examples)
    scores = {"metric": metric, "rate": RATE, "clean": _score(clean, metric)}
    for kind in KINDS:
        scores[kind] = _score(task.metrics(predictor.predict_examples(perturbed(examples, kind)), gold), metric)
    if paraphrase is not None:
        _require_texts(examples, "--paraphrase")
        copies, scores["paraphrased"] = paraphrase(examples)
        scores["paraphrase"] = _score(task.metrics(predictor.predict_examples(copies), gold), metric)
    return scores


def _score(metrics: dict[str, Any], metric: str) -> float:
    """`accuracy`, or an average's score spelt `macro_f1` (as train.metric names them)."""
    if metric in metrics:
        return metrics[metric]
    average, _, name = metric.partition("_")
    try:
        return metrics[average][name]
    except (KeyError, TypeError):
        raise FinegrainError(f"train.metric: '{metric}' is not a metric of this task; --robustness reports the task's headline metric") from None


def robustness_line(scores: dict[str, Any]) -> str:
    """One line: the clean score, then each perturbation's and its change."""
    parts = [f"{scores['metric']} clean {scores['clean']:.4f}"]
    parts += [f"{kind} {scores[kind]:.4f} ({scores[kind] - scores['clean']:+.4f})" for kind in KINDS]
    if "paraphrase" in scores:
        parts.append(f"paraphrase {scores['paraphrase']:.4f} ({scores['paraphrase'] - scores['clean']:+.4f}; "
                     f"{scores['paraphrased']} texts rewritten)")
    return "robustness (" + f"{scores['rate']:.0%} of words or letters" + "): " + ", ".join(parts)
