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

NER (`task: ner`) distils word by word: the teacher's tag logits at each word's labelled token
(`head.subword`) against the student's at its own, so a teacher of another tokenizer serves
too; the soft term is the T^2-scaled KL averaged over the words both models kept (a word cut by
either's `data.max_length` is left out), and teacher and student must predict one tag scheme.

`distill.hidden: true` adds hidden-state matching (`HiddenMatch`): at up to `HIDDEN_LAYERS`
student layers that train, spread up to its top, the student's state is brought to the teacher's
at the layer of the same relative depth (student layer s of S matches teacher layer
round((s + 1) * T / S) - 1 of T) by the mean squared error, times `distill.hidden_weight`. What
is matched is one vector per example and layer: each token's state scaled to unit RMS (as the
layer after it reads it; LLaMA's residual stream has a few huge dimensions that would swamp an
unscaled error), averaged over the example's real tokens; at a layer that computes only the
position the head reads (a classifier's top layer: its last token) that position's. The teacher's
vectors are computed in the same single pass as its logits and kept beside them ((N, K, H_t)
floats: 8,000 examples x 4 layers x 576 floats is 74 MB). Where the widths differ (a student of
another base), a learned linear map (H_s -> H_t, no bias), one per matched layer, projects the
student's vector first; it trains with the adapter, is saved in every checkpoint and is not part
of the adapter. Only layers that train are matched: a frozen layer's state cannot move (and below
the frozen-prefix cache it never runs in a training step).

`distill.unlabelled: FILE` reads texts without labels (the training data's format, the label
field not needed): the teacher labels them in the same pass, and they join training as a second
objective (`soft_objective`) whose loss is the soft term alone (weight 1 each batch, and the
hidden term with `distill.hidden`), their batches interleaved with the labelled ones
(`Interleaved`, seeded by the epoch, so resume sees the same order). They never reach validation
or test; metrics.json counts them (`train.unlabelled`). With `augment`, they gain perturbed copies
in the same fractions as the labelled set (counted among them), and the teacher labels those too:
the noisy texts a student meets beside the clean ones carry the teacher's reading of the noise
(the data augmentation of TinyBERT, Jiao et al., 2020, with finegrain's token-level noise).

An ensemble directory (`finegrain ensemble`, single-label classification) teaches as one model
(Hinton et al. distilled an ensemble into one net): each member runs its pass in turn, and the
student learns the log of their mean probabilities (`averaged_outputs`), the distribution the
ensemble predicts before any member's TF-IDF mix or calibration temperature. Those two are left out
for a single teacher as well: the TF-IDF model was fitted to the very training texts the teacher
labels, so there it mostly repeats the gold label, and the distillation temperature sets softness. Hidden states are one model's, so
`distill.hidden` needs a single run.

`check_teacher` refuses, before a run directory is created, a teacher that is not a finished run
(or an ensemble of them), is of another task or label set, or keeps more layers of the same base
than the student would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from finegrain import rundir
from finegrain.checkpoint.load import DEFAULT_MODEL
from finegrain.config import RunConfig
from finegrain.data.augment import augment_examples
from finegrain.data.readers import without_labels
from finegrain.errors import FinegrainError
from finegrain.inference import item_rows, sorted_batches
from finegrain.model.backbone import padding_mask
from finegrain.tags import PLAIN, tag_set
from finegrain.tasks import task_class
from finegrain.tasks.tokens import predicted_scheme
from finegrain.train.batching import micro_batches
from finegrain.train.objectives import Forward, Objective, TaskObjective
from finegrain.train.sampler import Draw, LengthBuckets, Sampler

TASKS = ("classification", "relation", "regression", "ner")  # one row of outputs per example, or per word (ner)
HIDDEN_LAYERS = 4  # the most student layers `distill.hidden` matches


def check_teacher(config: RunConfig, labels: list[str] | None = None) -> list[tuple[Path, RunConfig]]:
    """The teacher runs and their configs, once `distill.teacher` is known to suit this run; else a
    one-line error. A run teaches alone; an ensemble (`finegrain ensemble`) by its members, each
    checked as a teacher of its own.

    Args:
        config: the student's run config (`distill.teacher` set).
        labels: the student's labels in head order; None reads them as the run will (`data.labels`,
            or the training data's), which reads the data once more.
    """
    teacher = Path(config.distill.teacher)
    if config.task not in TASKS:
        raise FinegrainError(f"distill.teacher: distillation is for the tasks {', '.join(TASKS)} so far, "
                             f"not {config.task}; unset distill.teacher")
    if labels is None:
        labels = config.data.labels or task_class(config.task).load_splits(config.data).labels
    if not rundir.is_ensemble(teacher):
        return [(teacher, _check_teacher_run(config, teacher, labels))]
    if config.distill.hidden:
        raise FinegrainError(f"distill.hidden: {teacher} is an ensemble, whose members' hidden states differ; "
                             "unset distill.hidden or name one of its runs as distill.teacher")
    members = [Path(member) for member in rundir.read_ensemble(teacher)["members"]]
    return [(member, _check_teacher_run(config, member, labels)) for member in members]


def _check_teacher_run(config: RunConfig, teacher: Path, labels: list[str]) -> RunConfig:
    """The config of the run `teacher`, once it is known to suit the student `config`; else a one-line error."""
    if not (teacher / rundir.CONFIG).is_file():
        raise FinegrainError(f"distill.teacher: {teacher} is not a run directory (no {rundir.CONFIG}); "
                             "name the output directory of a finished `finegrain train`")
    if not rundir.has_adapter(teacher):
        raise FinegrainError(f"distill.teacher: {teacher} is an unfinished run (no trained adapter yet); finish it "
                             f"with `finegrain train --resume {teacher}` or name a finished run")
    teacher_config = rundir.read_config(teacher)
    if teacher_config.task != config.task:
        raise FinegrainError(f"distill.teacher: {teacher} is a {teacher_config.task} run and this is a {config.task} "
                             "run; name a teacher trained on the same task")
    if teacher_config.data.multi_label != config.data.multi_label:
        kinds = {True: "multi-label", False: "single-label"}
        raise FinegrainError(f"distill.teacher: {teacher} is {kinds[teacher_config.data.multi_label]} and this run is "
                             f"{kinds[config.data.multi_label]}; name a teacher of the same kind")
    teacher_labels = rundir.read_labels(teacher)
    if config.task == "regression":  # labels.json: [label field, mean, std]; the scale is converted
        if teacher_labels[0] != labels[0]:
            raise FinegrainError(f"distill.teacher: {teacher} predicts '{teacher_labels[0]}' and this run "
                                 f"'{labels[0]}'; name a teacher trained on the same target")
    elif config.task == "ner" and predicted_scheme(teacher_config) != predicted_scheme(config):
        theirs = predicted_scheme(teacher_config)
        fix = "data.scheme: plain" if theirs == PLAIN else f"head.scheme: {theirs}"
        raise FinegrainError(f"distill.teacher: {teacher} predicts {theirs} tags and this run "
                             f"{predicted_scheme(config)}; set {fix}")
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


@dataclass
class TeacherOutputs:
    """What the teacher's one pass over the training examples leaves for the student.

    Attributes:
        logits: (N, C) per example; for NER (N, W, C), the tag logits at each of W words.
        words: NER only: (N, W) True at the words the teacher kept (not cut by its max_length).
        states: `distill.hidden` only: (N, K, H_t) the teacher's pooled states at the K matched layers.
    """

    logits: torch.Tensor
    words: torch.Tensor | None = None
    states: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.logits)

    def split(self, count: int) -> tuple[TeacherOutputs, TeacherOutputs]:
        """The outputs of the first `count` examples and of the rest."""
        def part(rows: slice) -> TeacherOutputs:
            return TeacherOutputs(*(None if t is None else t[rows] for t in (self.logits, self.words, self.states)))
        return part(slice(None, count)), part(slice(count, None))


def teacher_pass(
    model: nn.Module, task: Any, tokenizer: Any, examples: list, max_length: int, labels: list[str],
    batch_size: int = 64, progress: bool = True, layers: Sequence[int] = (),
) -> TeacherOutputs:
    """The teacher's outputs for each example, in float32 on the CPU, from one pass in evaluation mode.

    Its columns follow the student's `labels` (NER: the student's tags, of the same scheme); a
    regression teacher's values are moved to the standardised units of the student's `labels`,
    [field, mean, std]. The teacher encodes the examples itself (its tokenizer and `max_length`),
    so a teacher of another base model serves too: an example is one row of logits (NER: one per
    word) whichever tokens it became. `layers`: the teacher's decoder layers whose pooled states
    (`pooled_states`) are kept too.
    """
    items = task.encode(tokenizer, without_labels(examples), max_length)  # labelled and unlabelled ones batch together
    if len(items) != len(examples):
        raise FinegrainError(f"distill.teacher: the teacher made {len(items)} rows of {len(examples)} examples; "
                             "distillation needs one row of outputs per example")
    blocks = [model.model.layers[i] for i in layers]
    rows: list[torch.Tensor | None] = [None] * len(items)
    states: list[torch.Tensor | None] = [None] * len(items)
    was_training = model.training
    model.eval()
    batches = sorted_batches([len(item.input_ids) for item in items], batch_size, [len(item_rows(i)) for i in items])
    with torch.no_grad():
        for indices in tqdm(batches, desc="teacher", unit="batch", disable=not progress, leave=False):
            batch = task.collate([items[i] for i in indices], tokenizer.pad_token_id)
            with captured(blocks) as outputs:
                logits = model(batch).float().cpu()
            pooled = torch.stack([pooled_states(x, batch) for x in outputs], 1).cpu() if blocks else None  # (B, K, H)
            for j, i in enumerate(indices):
                rows[i] = logits[j]
                states[i] = pooled[j] if pooled is not None else None
    model.train(was_training)
    logits = torch.stack(rows)  # type: ignore[arg-type]
    outputs = TeacherOutputs(logits, states=torch.stack(states) if blocks else None)  # type: ignore[arg-type]
    if task.name == "regression":
        mean, std = (float(labels[1]), float(labels[2])) if len(labels) > 2 else (0.0, 1.0)
        outputs.logits = (logits * task.std + task.mean - mean) / std
    elif task.name == "ner":
        outputs.logits, outputs.words = word_logits(logits, items)
        outputs.logits = outputs.logits[..., [task.index[tag] for tag in tag_set(labels, task.scheme)]]
    else:
        outputs.logits = logits[:, [task.labels.index(label) for label in labels]]
    return outputs


def teacher_logits(
    model: nn.Module, task: Any, tokenizer: Any, examples: list, max_length: int, labels: list[str],
    batch_size: int = 64, progress: bool = True,
) -> torch.Tensor:
    """`teacher_pass(...).logits`: (N, C) float32, the teacher's logits for each example."""
    return teacher_pass(model, task, tokenizer, examples, max_length, labels, batch_size, progress).logits


def averaged_outputs(passes: list[TeacherOutputs]) -> TeacherOutputs:
    """One teacher's outputs from the passes of an ensemble's members: each example's logits are
    the log of the members' mean probabilities (what `finegrain ensemble` predicts; softmax gives
    them back); a single pass is returned as it is."""
    if len(passes) == 1:
        return passes[0]
    log_probs = torch.stack([p.logits.log_softmax(-1) for p in passes])  # (M, N, C)
    return TeacherOutputs(torch.logsumexp(log_probs, 0) - math.log(len(passes)))


def word_logits(logits: torch.Tensor, items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """An NER model's token logits (N, T, C) at each sentence's word positions: (N, W, C) and the
    mask (N, W) of the words it kept (W the most words of a sentence; a cut word's row is 0)."""
    width = max(len(item.positions) for item in items)
    words = torch.zeros(len(items), width, logits.shape[-1])
    kept = torch.zeros(len(items), width, dtype=torch.bool)
    for n, item in enumerate(items):
        positions = torch.tensor(item.positions, dtype=torch.long)
        keep = positions >= 0
        words[n, : len(positions)][keep] = logits[n, positions[keep]]
        kept[n, : len(positions)] = keep
    return words, kept


def word_positions(items: list, width: int) -> torch.Tensor:
    """(B, W): the token carrying each word's label in each student item, -1 where there is none."""
    positions = torch.full((len(items), width), -1, dtype=torch.long)
    for row, item in enumerate(items):
        positions[row, : len(item.positions)] = torch.tensor(item.positions, dtype=torch.long)
    return positions


# -- hidden states (distill.hidden) --------------------------------------------------------------


def matched_layers(student_layers: int, teacher_layers: int, lowest_trained: int,
                   most: int = HIDDEN_LAYERS) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: up to `most` student layers among those that train
    (`lowest_trained` up), spread evenly and always the top one, each with the teacher layer at the
    same relative depth, round((s + 1) * T / S) - 1."""
    trained = list(range(lowest_trained, student_layers))
    if not trained:
        raise FinegrainError("distill.hidden: no decoder layer of the student trains (only its head), so no hidden "
                             "state can move towards the teacher's; adapt some layers or unset distill.hidden")
    picks = trained if len(trained) <= most else [trained[round(k * (len(trained) - 1) / (most - 1))] for k in range(most)]
    return [(s, min(teacher_layers - 1, max(0, round((s + 1) * teacher_layers / student_layers) - 1))) for s in picks]


def pooled_states(x: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """(B, H) float32: a decoder layer's output (R, T', H) as one vector per example.

    Each token's vector is scaled to unit RMS, then averaged over the row's real tokens (the last
    T of T' positions: prompt tuning's virtual tokens come first); a layer that computed one
    position per row (T' = 1, the head's) gives that one. Windows of one text (`documents`) are averaged.
    """
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    lengths = batch["lengths"].to(x.device)
    if x.shape[1] == 1:
        pooled = x[:, 0]  # (R, H)
    else:
        width = batch["hidden"].shape[1] if "hidden" in batch else batch["input_ids"].shape[1]
        x = x[:, x.shape[1] - width :]  # (R, T, H)
        real = padding_mask(lengths, width)  # (R, T)
        pooled = (x * real[..., None]).sum(1) / lengths[:, None]
    documents = batch.get("documents")
    if documents is None:
        return pooled
    documents = documents.to(x.device)
    count = int(documents.max()) + 1
    sums = pooled.new_zeros(count, pooled.shape[1]).index_add_(0, documents, pooled)
    return sums / torch.bincount(documents, minlength=count)[:, None]


@contextmanager
def captured(layers: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """While open, each forward of `layers` appends its output to the list yielded (in call order:
    the layers run bottom up, once each per forward)."""
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class HiddenMatch:
    """The student's side of `distill.hidden`: which of its layers are matched, and the learned maps
    from its width to the teacher's (None where they are equal).

    Args:
        layers: the student's matched decoder layers, bottom up.
        projections: one `nn.Linear(H_s, H_t, bias=False)` per layer, or None when H_s == H_t;
            registered on the student model (`attach_hidden_match`), so that they train and are checkpointed.
        weight: `distill.hidden_weight`.
    """

    def __init__(self, layers: Sequence[nn.Module], projections: nn.ModuleList | None, weight: float):
        self.layers, self.projections, self.weight = list(layers), projections, weight

    def loss(self, outputs: list[torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Mean over the matched layers of the MSE between the student's pooled states (projected)
        and the teacher's cached ones (`batch["teacher_states"]` (B, K, H_t))."""
        if len(outputs) != len(self.layers):
            raise FinegrainError(f"distill.hidden: {len(outputs)} of the {len(self.layers)} matched student layers ran in "
                                 "a training step; unset distill.hidden")
        targets = batch["teacher_states"]
        errors = []
        for k, x in enumerate(outputs):
            student = pooled_states(x, batch)  # (B, H_s)
            if self.projections is not None:
                student = self.projections[k](student)  # (B, H_t)
            errors.append(F.mse_loss(student, targets[:, k].to(student.device)))
        return torch.stack(errors).mean()


PROJECTION = "distill_projection"  # the student model's child holding HiddenMatch's projections


def attach_hidden_match(model: nn.Module, pairs: list[tuple[int, int]], teacher_width: int,
                        weight: float) -> HiddenMatch:
    """The `HiddenMatch` of the student `model` for (student, teacher) layer `pairs`; where the
    widths differ its projections become the model's `distill_projection` child (on the model's
    device), trained with the adapter and kept out of the saved adapter."""
    backbone = model.model
    width = backbone.config.hidden_size
    projections = None
    if width != teacher_width:
        device = next(model.parameters()).device
        projections = nn.ModuleList(nn.Linear(width, teacher_width, bias=False) for _ in pairs).to(device)
        model.add_module(PROJECTION, projections)
    return HiddenMatch([backbone.layers[s] for s, _ in pairs], projections, weight)


# -- the losses ----------------------------------------------------------------------------------


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


def word_soft_loss(outputs: torch.Tensor, batch: dict[str, Any], temperature: float) -> torch.Tensor:
    """NER's soft term: `soft_loss` over the words both teacher and student kept, the student's
    tag logits (B, T, C) read at its own word positions (`batch["word_positions"]` (B, W))."""
    positions = batch["word_positions"].to(outputs.device)
    kept = (positions >= 0) & batch["teacher_words"].to(outputs.device)  # (B, W)
    if not kept.any():
        return outputs.sum() * 0.0  # every word cut off: nothing to learn, but a graph to backprop
    index = positions.clamp_min(0)[..., None].expand(-1, -1, outputs.shape[-1])  # (B, W, C)
    student = outputs.gather(1, index)  # (B, W, C)
    return soft_loss(student[kept], batch["teacher_logits"].to(outputs.device)[kept], temperature)


@dataclass
class DistillObjective(TaskObjective):
    """The task's loss mixed with the teacher's soft outputs: `alpha` * the soft term + (1 - `alpha`) * hard,
    plus `match.weight` * the hidden-state term with `distill.hidden`.

    The soft term is `soft_loss` for class logits (`word_soft_loss` for NER), the squared error to
    the teacher's value for regression.

    Args (beyond `TaskObjective`'s):
        teacher: the teacher's outputs for `items`, row i for item i (`teacher_pass`; a bare
            (N, C) tensor of logits is taken too).
        temperature: T of `soft_loss`.
        alpha: the KL term's share, in [0, 1].
        match: the student's side of hidden-state matching (`distill.hidden`), or None.
        soft_only: items without labels (`distill.unlabelled`): the loss is the soft term alone,
            each micro-batch weighed by its examples (NER: its words both models kept).
    """

    teacher: TeacherOutputs | torch.Tensor | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    match: HiddenMatch | None = None
    soft_only: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if torch.is_tensor(self.teacher):
            self.teacher = TeacherOutputs(self.teacher)
        if self.teacher is None or len(self.teacher) != len(self.items):
            raise ValueError(f"DistillObjective: teacher logits for each of the {len(self.items)} items are needed")
        if self.match is not None and self.teacher.states is None:
            raise ValueError("DistillObjective: hidden-state matching needs the teacher's states")

    def pieces(self, indices: list[int], pad_id: int, max_tokens: int | None) -> list[tuple[dict[str, Any], float]]:
        """`TaskObjective.pieces`, each batch carrying its rows of the teacher's outputs (`teacher_pass`)."""
        pieces = []
        teacher = self.teacher
        for piece in micro_batches(indices, self.lengths, max_tokens):
            hidden = [self.hidden[i] for i in piece] if self.hidden is not None else None
            items = [self.items[i] for i in piece]
            batch = self.task.collate(items, pad_id, hidden)
            batch["teacher_logits"] = teacher.logits[piece]  # (B, C), or (B, W, C) for ner
            if teacher.words is not None:
                batch["teacher_words"] = teacher.words[piece]  # (B, W)
                batch["word_positions"] = word_positions(items, teacher.words.shape[1])  # (B, W)
            if self.match is not None:
                batch["teacher_states"] = teacher.states[piece]  # (B, K, H_t)
            pieces.append((batch, self._weight(batch) if self.soft_only else self.task.loss_weight(batch)))
        return pieces

    def _weight(self, batch: dict[str, Any]) -> float:
        """A soft-only micro-batch's share: its examples, or for NER its words both models kept."""
        if "teacher_words" in batch:
            return float(((batch["word_positions"] >= 0) & batch["teacher_words"]).sum())
        return float(len(batch["teacher_logits"]))

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        with captured(self.match.layers if self.match is not None else ()) as states:
            outputs = forward(batch)
        if self.task.name == "regression":  # a value, not a distribution: its squared error to the teacher's
            soft = F.mse_loss(outputs[:, 0].float(), batch["teacher_logits"][:, 0].to(outputs.device))
        elif "teacher_words" in batch:
            soft = word_soft_loss(outputs, batch, self.temperature)
        else:
            multi_label = getattr(self.task, "multi_label", False)
            soft = soft_loss(outputs, batch["teacher_logits"].to(outputs.device), self.temperature, multi_label)
        loss = soft if self.alpha == 1 or self.soft_only else self.alpha * soft + (1 - self.alpha) * self.task.loss(outputs, batch)
        if self.match is not None:
            loss = loss + self.match.weight * self.match.loss(states, batch)
        return loss


@dataclass(frozen=True)
class Interleaved:
    """The batches of several samplers (each naming its own objective) in one epoch, their order
    shuffled by the seed and the epoch: the same batches for the same epoch (exact resume).

    `distill.unlabelled`: the labelled training set's length buckets (objective 0) and the unlabelled
    texts' (objective 1).
    """

    samplers: tuple[Sampler, ...]
    seed: int

    def __len__(self) -> int:
        return sum(len(sampler) for sampler in self.samplers)

    def epoch(self, epoch: int) -> list[Draw]:
        draws = [draw for sampler in self.samplers for draw in sampler.epoch(epoch)]
        random.Random(self.seed * 1_000_003 + epoch).shuffle(draws)
        return draws


def unlabelled_examples(task: Any, config: RunConfig) -> list:
    """The texts of `distill.unlabelled`, read as the training data is (labels not needed, and ignored),
    and after them the perturbed copies `augment` asks for, in the same fractions as the labelled set's."""
    path = Path(config.distill.unlabelled)
    if not path.is_file():
        raise FinegrainError(f"distill.unlabelled: {path} is not a file; name a file of texts in the training data's "
                             "format (the label field may be left out)")
    # A label the file happens to carry is not used: the teacher's outputs stand for it.
    texts = without_labels(task.read_file(config.data, str(path), require_label=False))
    return augment_examples(texts, config.augment, config.train.seed)[0]


def soft_objective(task: Any, items: list, teacher: TeacherOutputs, temperature: float,
                   match: HiddenMatch | None) -> Objective:
    """The objective of `distill.unlabelled`'s items: the teacher's soft outputs alone."""
    return DistillObjective(task, items, teacher=teacher, temperature=temperature, alpha=1.0, match=match,
                            soft_only=True)


def with_unlabelled(items: list, extra: Sequence[Objective], batch_size: int, seed: int) -> Sampler | None:
    """The sampler of a run whose `extra` objectives hold `distill.unlabelled`'s items: the labelled
    `items`' length buckets and each extra objective's, interleaved (`Interleaved`); None without any."""
    if not extra:
        return None
    buckets = [LengthBuckets([len(item.input_ids) for item in items], batch_size, seed)]
    buckets += [LengthBuckets(objective.lengths, batch_size, seed, objective=k + 1) for k, objective in enumerate(extra)]
    return Interleaved(tuple(buckets), seed)
