"""Tasks: each gives a head, a collate function, a loss, decoding and metrics to the one training loop.

`TASKS` is the one list of tasks: a run config's `task:` name → its class. The config, the
trainer's build (`finegrain.run`), the server's routes and the probe all look tasks up here;
adding a task is a file of its own (implementing `Task`, see `finegrain.tasks.base`) and a line here.
"""

from __future__ import annotations

import difflib

from finegrain.errors import FinegrainError
from finegrain.inference import item_rows
from finegrain.tasks.base import (
    IGNORE_INDEX, ServedTask, Task, class_weights, document_mean, long_text_line, long_text_summary, pad_inputs,
    score_file,
)
from finegrain.tasks.classification import ClassificationTask
from finegrain.tasks.instruct import InstructTask
from finegrain.tasks.lm import LanguageModelTask
from finegrain.tasks.qa import QATask
from finegrain.tasks.regression import RegressionTask
from finegrain.tasks.relation import RelationTask
from finegrain.tasks.tokens import TokenClassificationTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "ner": TokenClassificationTask,
    "relation": RelationTask,
    "qa": QATask,
    "instruct": InstructTask,
    "lm": LanguageModelTask,
}

__all__ = [
    "IGNORE_INDEX", "TASKS", "ServedTask", "Task", "class_weights", "document_mean", "item_rows", "long_text_line",
    "long_text_summary", "pad_inputs", "score_file", "task_class",
]


def task_class(name: str) -> type[Task]:
    """The task class of `task: name`.

    Raises:
        FinegrainError: `name` is not in `TASKS`; the message names the nearest task.
    """
    if name not in TASKS:
        nearest = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f"did you mean '{nearest[0]}'? " if nearest else ""
        raise FinegrainError(f"task: '{name}' is not a task; {hint}set one of {', '.join(TASKS)}")
    return TASKS[name]
