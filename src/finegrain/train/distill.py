"""Knowledge distillation: a student run learns from a finished teacher run's soft outputs.

`distill: {teacher: RUN_DIR, temperature: T, alpha: a}` trains the run's own model (the student:
fewer kept layers, another method) on

    a * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - a) * the task's hard-label loss

(Hinton et al., 2015: the T^2 keeps the soft term's gradients on the scale of the hard one's as T
changes), for classification and relation runs. Multi-label classification compares each label's
sigmoid(logit / T) as two-class distributions instead; regression has no distribution to soften,
and its soft term is the squared error to the teacher's value (in the student's standardised
units), with no temperature. The teacher runs once over the training examples before training
(`teacher_logits`), in evaluation mode and float32, and its logits are kept beside the items: no
epoch runs it again. A resumed run computes them again, to the same numbers (the teacher is
deterministic), so it goes on exactly as an uninterrupted one.

`check_teacher` refuses, before a run directory is created, a teacher that is not a finished run,
is of another task or label set, or keeps more layers of the same base than the student would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finegrain import rundir
from finegrain.checkpoint.load import DEFAULT_MODEL
from finegrain.config import RunConfig
from finegrain.errors import FinegrainError
from finegrain.inference import predict_outputs
from finegrain.tasks import task_class
from finegrain.train.batching import micro_batches
from finegrain.train.objectives import Forward, TaskObjective

TASKS = ("classification", "relation", "regression")  # one row of outputs (class logits, a value) per example


def check_teacher(config: RunConfig, labels: list[str] | None = None) -> RunConfig:
    """The teacher run's config, once `distill.teacher` is known to suit this run; else a one-line error.

    Args:
        config: the student's run config (`distill.teacher` set).
        labels: the student's labels in head order; None reads them as the run will (`data.labels`,
            or the training data's), which reads the data once more.
    """
    teacher = Path(config.distill.teacher)
    if not (teacher / rundir.CONFIG).is_file():
        raise FinegrainError(f"distill.teacher: {teacher} is not a run directory (no {rundir.CONFIG}); "
                             "name the output directory of a finished `finegrain train`")
    if not rundir.has_adapter(teacher):
        raise FinegrainError(f"distill.teacher: {teacher} is an unfinished run (no trained adapter yet); finish it "
                             f"with `finegrain train --resume {teacher}` or name a finished run")
    if config.task not in TASKS:
        raise FinegrainError(f"distill.teacher: distillation is for the tasks {', '.join(TASKS)} so far, "
                             f"not {config.task}; unset distill.teacher")
    teacher_config = rundir.read_config(teacher)
    if teacher_config.task != config.task:
        raise FinegrainError(f"distill.teacher: {teacher} is a {teacher_config.task} run and this is a {config.task} "
                             "run; name a teacher trained on the same task")
    if teacher_config.data.multi_label != config.data.multi_label:
        kinds = {True: "multi-label", False: "single-label"}
        raise FinegrainError(f"distill.teacher: {teacher} is {kinds[teacher_config.data.multi_label]} and this run is "
                             f"{kinds[config.data.multi_label]}; name a teacher of the same kind")
    if labels is None:
        labels = config.data.labels or task_class(config.task).load_splits(config.data).labels
    teacher_labels = rundir.read_labels(teacher)
    if config.task == "regression":  # labels.json: [label field, mean, std]; the scale is converted
        if teacher_labels[0] != labels[0]:
            raise FinegrainError(f"distill.teacher: {teacher} predicts '{teacher_labels[0]}' and this run "
                                 f"'{labels[0]}'; name a teacher trained on the same target")
    elif set(teacher_labels) != set(labels):
        missing, extra = sorted(set(labels) - set(teacher_labels)), sorted(set(teacher_labels) - set(labels))
        raise FinegrainError(
            f"distill.teacher: {teacher} has another label set (it lacks {missing or 'none'}, and has "
            f"{extra or 'none'} this run does not); name a teacher trained on the same labels"
        )
    same_base = _base(teacher_config.model.name) == _base(config.model.name)
    student, kept = config.model.num_layers, teacher_config.model.num_layers
    if same_base and kept is not None and student != "auto" and (student is None or student > kept):  # auto: checked once planned
        raise FinegrainError(f"distill.teacher: the student would keep {student or 'all'} layers of the base and its "
                             f"teacher {teacher} keeps {kept}; set model.num_layers to at most {kept}")
    return teacher_config


def _base(name: str | None) -> str:
    """A model name as a run stores it: a local path resolved (`run.open_run` does), else the name."""
    return str(Path(name).resolve()) if name and Path(name).exists() else (name or DEFAULT_MODEL)


def teacher_logits(
    model: torch.nn.Module, task: Any, tokenizer: Any, examples: list, max_length: int, labels: list[str],
    batch_size: int = 64, progress: bool = True,
) -> torch.Tensor:
    """(N, C) float32: the teacher's logits for each example, its columns in the order of `labels`
    (a regression teacher's (N, 1) values moved to the standardised units of the student's
    `labels`, [field, mean, std]).

    The teacher encodes the examples itself (its tokenizer and `max_length`), so a teacher of
    another base model serves too: an example is one row of logits whichever tokens it became.
    """
    items = task.encode(tokenizer, examples, max_length)
    if len(items) != len(examples):
        raise FinegrainError(f"distill.teacher: the teacher made {len(items)} rows of {len(examples)} examples; "
                             "distillation needs one row of outputs per example")
    with torch.no_grad():
        logits = predict_outputs(model, task, items, tokenizer.pad_token_id, batch_size,
                                 progress="teacher" if progress else None).float().cpu()  # (N, C)
    if task.name == "regression":
        mean, std = (float(labels[1]), float(labels[2])) if len(labels) > 2 else (0.0, 1.0)
        return (logits * task.std + task.mean - mean) / std
    return logits[:, [task.labels.index(label) for label in labels]]


def soft_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, multi_label: bool = False,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over the rows (R, C).

    Single-label: over the softmax of each row. Multi-label: each label a two-class distribution
    (sigmoid), the KL averaged over the labels.
    """
    student, teacher = student.float() / temperature, teacher.float() / temperature
    if multi_label:
        log_p_s = torch.stack((F.logsigmoid(student), F.logsigmoid(-student)), -1)  # (R, C, 2)
        log_p_t = torch.stack((F.logsigmoid(teacher), F.logsigmoid(-teacher)), -1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean(-1)  # (R,)
    else:
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


@dataclass
class DistillObjective(TaskObjective):
    """The task's loss mixed with the teacher's soft outputs: `alpha` * the soft term + (1 - `alpha`) * hard.

    The soft term is `soft_loss` for class logits, the squared error to the teacher's value for regression.

    Args (beyond `TaskObjective`'s):
        teacher: (N, C) the teacher's logits for `items`, row i for item i (`teacher_logits`).
        temperature: T of `soft_loss`.
        alpha: the KL term's share, in [0, 1].
    """

    teacher: torch.Tensor | None = None
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher is None or len(self.teacher) != len(self.items):
            raise ValueError(f"DistillObjective: teacher logits for each of the {len(self.items)} items are needed")

    def pieces(self, indices: list[int], pad_id: int, max_tokens: int | None) -> list[tuple[dict[str, Any], float]]:
        """`TaskObjective.pieces`, each batch carrying its rows of the teacher's logits (`teacher_logits`)."""
        pieces = []
        for piece in micro_batches(indices, self.lengths, max_tokens):
            hidden = [self.hidden[i] for i in piece] if self.hidden is not None else None
            batch = self.task.collate([self.items[i] for i in piece], pad_id, hidden)
            batch["teacher_logits"] = self.teacher[piece]  # (B, C)
            pieces.append((batch, self.task.loss_weight(batch)))
        return pieces

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        outputs = forward(batch)
        if self.task.name == "regression":  # a value, not a distribution: its squared error to the teacher's
            soft = F.mse_loss(outputs[:, 0].float(), batch["teacher_logits"][:, 0])
        else:
            multi_label = getattr(self.task, "multi_label", False)
            soft = soft_loss(outputs, batch["teacher_logits"], self.temperature, multi_label)
        if self.alpha == 1:
            return soft
        return self.alpha * soft + (1 - self.alpha) * self.task.loss(outputs, batch)
