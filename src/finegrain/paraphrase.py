"""Label-preserving paraphrases by an instruct model: extra training examples (`augment.paraphrase`)
and the paraphrased copies that `finegrain evaluate RUN --robustness` scores.

With `augment: {paraphrase: F}` a single-label classification run draws round(F × N) of its N
training examples (seeded), and an instruct model rewrites each: `augment.paraphraser`, a model as
`model.name` takes it or a run of task instruct; by default the default model (SmolLM2-135M-Instruct).
It is asked in its chat template by `augment.paraphrase_prompt` ({text} stands for the text; the
default asks to keep the sentence's meaning and opinion, and a prompt that names the kind of text,
"a sentence from a film review", does better with a small model), and it samples at temperature
0.7 (top-p 0.9). A rewrite that is empty, the text again, or far longer than it is dropped
(`clean`). The rest go to a judge, and only the rewrites it gives the original's label stay (the
filter of LAMBADA, Anaby-Tavor et al., 2020): by default TF-IDF + logistic regression fitted on
the training split, a finished run of the same task and labels (`augment.judge`: say, the run
without augmentation), or `self`: the run's config without augmentation, trained first into
RUN/judge (`finegrain.run.train_own_judge`), or `current`: the model as it trains keeps every usable
rewrite in the training set and counts it in a step only where it gives the original's label there
(finegrain.train.agreement). The run writes every rewrite with the judge's verdict to
paraphrases.jsonl (`write_rewrites`); metrics.json counts the rewrites kept
(`train.augmented.paraphrase`) and tried (`train.paraphrases`). A resumed run reads the file back
instead of generating again.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from finegrain.atomic import atomic_write_text
from finegrain.config import DEFAULT_PROMPT
from finegrain.data.augment import draw
from finegrain.errors import FinegrainError

TEMPERATURE, TOP_P = 0.7, 0.9

# A reply that names what it is before giving it: "Paraphrase: ...", "Here is the revised sentence: ...".
_PREAMBLE = re.compile(r"^(here is|here's|(the )?(paraphrased?|rewritten|revised|new|original)\b|sentence\b)[^:\n]{0,40}:\s*",
                       re.IGNORECASE)
_QUOTES = "\"'“”‘’"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def clean(original: str, reply: str) -> str | None:
    """The rewrite in a model's `reply`: its first non-empty line without a preamble or quotes; None
    when nothing is left, when it is the original's words again, when it has more than twice the
    original's words and five more (a rewrite that wandered off), or when it only announces one
    (it ends with a colon)."""
    line = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    line = _PREAMBLE.sub("", line).strip().strip(_QUOTES).strip()
    words, before = _words(line), _words(original)
    if not words or words == before or len(words) > 2 * len(before) + 5 or line.endswith(":"):
        return None
    return line


def rewrite(llama: Any, tokenizer: Any, texts: Sequence[str], seed: int, prompt: str = DEFAULT_PROMPT,
            batch_size: int = 16, progress: bool = False) -> list[str | None]:
    """A rewrite of each text (`clean`ed; None where none was usable), in the texts' order. Texts of
    similar length share a batch; each batch samples from its own seed, so the rewrites are the
    same for the same seed and texts."""
    from finegrain.generation import generate

    if tokenizer.chat_template is None:
        raise FinegrainError("augment.paraphraser: the model has no chat template to ask it with; "
                             "name an instruct model (the default one has) or a run of task instruct")
    lengths = [len(ids) for ids in tokenizer.encode_batch(list(texts))] if texts else []
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    rewrites: list[str | None] = [None] * len(texts)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = llama.training
    llama.eval()
    for b, indices in enumerate(tqdm(batches, desc="paraphrasing", unit="batch", disable=not progress, leave=False)):
        replies = generate(llama, tokenizer, [prompt.replace("{text}", texts[i]) for i in indices], chat=True,
                           max_new_tokens=min(160, 2 * max(lengths[i] for i in indices) + 16),
                           temperature=TEMPERATURE, top_p=TOP_P, seed=seed * 100_003 + b, stop=["\n\n"])
        for i, reply in zip(indices, replies):
            rewrites[i] = clean(texts[i], reply)
    llama.train(was_training)
    return rewrites


def tfidf_judge(train: Sequence[Any], labels: list[str]) -> Callable[[list[str]], list[str]]:
    """The default judge: TF-IDF + logistic regression (C = 1) fitted on the training examples."""
    from finegrain.evaluate.baselines import is_spaceless
    from finegrain.tasks.lexical import LexicalModel

    texts = [e.text for e in train]
    index = {label: i for i, label in enumerate(labels)}
    model = LexicalModel.fit(texts, [index[e.label] for e in train], len(labels), is_spaceless(texts), strengths=[1.0])[0]
    return lambda batch: [labels[int(i)] for i in model.probabilities(batch).argmax(-1)] if batch else []


def paraphrase_examples(train: list, fraction: float, seed: int, write: Callable[[list[str]], list[str | None]],
                        judge: Callable[[list[str]], list[str]] | None) -> tuple[list, list[dict[str, Any]]]:
    """round(`fraction` × len(train)) examples drawn at random (seeded; again past one each), each
    rewritten by `write`, and the rewrites `judge` gives the example's label (every rewrite, unjudged,
    with no judge), as examples of that label; with them, a record per rewrite tried (the lines of
    `rundir.PARAPHRASES`)."""
    indices = draw(len(train), round(fraction * len(train)), random.Random(f"augment:paraphrase:{seed}"))
    rewrites = write([train[i].text for i in indices])
    written = [k for k, text in enumerate(rewrites) if text is not None]
    verdicts = dict(zip(written, judge([rewrites[k] for k in written]))) if judge else {}
    records = [{"index": i, "source": train[i].source, "label": train[i].label, "text": train[i].text,
                "paraphrase": rewrites[k], "judged": verdicts.get(k),
                "kept": verdicts.get(k) == train[i].label if judge else rewrites[k] is not None}
               for k, i in enumerate(indices)]
    return examples_of(train, records), records


_MARK = " (paraphrase)"  # ends a rewrite's source


def examples_of(train: list, records: list[dict[str, Any]]) -> list:
    """The kept rewrites as examples: each a copy of the training example it rewrites, with the new text."""
    return [dataclasses.replace(train[r["index"]], text=r["paraphrase"], source=r["source"] + _MARK)
            for r in records if r["kept"]]


def is_paraphrase(example: Any) -> bool:
    """Whether a training example is a rewrite (`examples_of`): a file's row has a source FILE:LINE."""
    return example.source.endswith(_MARK)


def write_rewrites(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_rewrites(path: Path, train: list) -> tuple[list, list[dict[str, Any]]] | None:
    """A resumed run's paraphrases, from its `rundir.PARAPHRASES`: the examples kept and the records;
    None when there is no file. A record that no longer matches the training split is a one-line error."""
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for n, record in enumerate(records, 1):
        if not (0 <= record.get("index", -1) < len(train) and train[record["index"]].text == record.get("text")):
            raise FinegrainError(f"{path}:{n}: rewrites a text the training split does not hold there; "
                                 "delete the file to write the paraphrases again")
    return examples_of(train, records), records


def paraphrased(examples: list, llama: Any, tokenizer: Any, prompt: str = DEFAULT_PROMPT, seed: int = 0,
                progress: bool = False) -> tuple[list, int]:
    """`evaluate --robustness`: a copy of each example with its rewrite as the text (the text itself
    where no usable rewrite came), unjudged, and how many were rewritten."""
    rewrites = rewrite(llama, tokenizer, [e.text for e in examples], seed, prompt, progress=progress)
    copies = [dataclasses.replace(e, text=text) if text is not None else e for e, text in zip(examples, rewrites)]
    return copies, sum(text is not None for text in rewrites)
