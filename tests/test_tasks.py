"""The task table and the task contract: every task in `TASKS` implements `Task`, every task with
an endpoint `ServedTask`, and a wrong `task:` name is refused with the nearest one."""

from __future__ import annotations

import pytest

from finegrain.config import RunConfig
from finegrain.errors import FinegrainError
from finegrain.tasks import TASKS, ServedTask, Task, task_class

LABELS = {"relation": ["Other", "Cause-Effect(e1,e2)"], "regression": ["score", 0.0, 1.0], "ner": ["PER"], "qa": []}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_implements_the_contract(name):
    cls = TASKS[name]
    config = RunConfig(task=name)
    config.data.max_length = 256  # room for qa's windows (qa.stride 128)
    task = cls.from_config(config, LABELS.get(name, ["a", "b"]))
    assert cls.name == name
    assert isinstance(task, Task)
    assert isinstance(task, ServedTask) == (cls.endpoint is not None)


def test_endpoints_are_distinct():
    endpoints = [cls.endpoint.path for cls in TASKS.values() if cls.endpoint is not None]
    assert len(endpoints) == len(set(endpoints))


def test_an_unknown_task_names_the_nearest():
    with pytest.raises(FinegrainError, match=r"task: 'clasification' is not a task; did you mean 'classification'\?"):
        task_class("clasification")
    assert task_class("ner") is TASKS["ner"]


def test_train_names_the_line_of_an_unknown_task_and_creates_nothing(tmp_path, capsys):
    from finegrain.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("data:\n  dataset: rotten_tomatoes\ntask: clasification\n")
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) != 0
    assert f"{config}:3: task: 'clasification' is not a task" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
