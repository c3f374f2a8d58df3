"""Run configuration: dataclasses loaded from YAML, with `--set section.key=value` overrides.

Unknown keys are an error that names the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from finegrain.errors import FinegrainError


@dataclass
class ModelConfig:
    name: str | None = None  # smollm2-135m (default), minilm-l6 (an encoder), a .gguf file or a Hugging Face directory
    dtype: str = "float32"
    # keep only the first N decoder layers (the rest are dropped); auto: the layer probe chooses N during `train`
    # (finegrain.train.recipe), and the adapted layers when lora.layers / peft.layers is unset or auto
    num_layers: int | str | None = None
    bidirectional: bool = False  # remove the causal mask (token-level tasks)
    quantize: str | None = None  # null | int8 | q4: the decoder's linear weights stay quantised (model/qlinear.py)


@dataclass
class DataConfig:
    dataset: str | None = None  # a bundled demo set: rotten_tomatoes, sms_spam, trec
    dataset_options: dict[str, Any] = field(default_factory=dict)  # e.g. {fine: true} for trec
    train: str | None = None  # JSONL, CSV or TSV file
    validation: str | None = None
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | None = None  # classification: the label set in head order (default: the training labels)
    label_names: list[str] | None = None  # classification, relation: files whose labels are ids (Hugging Face's ClassLabel): the name of each id, in id order
    multi_label: bool = False
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # when only `train` (or `dataset`) is given
    split_seed: int = 0
    max_length: int = 64  # tokens per text; longer texts follow data.long_texts (the run reports how many)
    long_texts: str = "truncate"  # classification: truncate (keep the start) | head_tail | windows
    window_stride: int | None = None  # long_texts: windows: text tokens between window starts; null: half a window
    max_windows: int = 8  # long_texts: windows: at most this many windows per text (the rest is cut)
    template: str | None = None  # wraps each text, e.g. "Review: {text}\nSentiment:"; the text is what gets cut
    max_train_examples: int | None = None
    max_eval_examples: int | None = None  # cap validation and test each: a sample drawn like the splits
    shots: int | None = None  # keep k training examples per class (drawn with split_seed): few-shot runs
    folds: int | None = None  # k-fold cross-validation of the training pool: fold `data.fold` is the test split
    fold: int = 0  # which fold (0 .. folds-1) is held out for testing
    skip_bad_rows: bool = False
    # classification: also fit the majority class and TF-IDF + linear SVM on the same splits,
    # shown beside finegrain's scores in metrics.json and the report (~40 s for 10k documents of
    # ~300 words on a loaded 2-core machine, mostly tokenizing; under a second for 1k short texts);
    # ner: each word's most frequent tag and a logistic regression on word features (3-5 s for 3k sentences)
    baselines: bool = True
    # task: ner
    scheme: str = "BIO"  # tagging scheme of the files: BIO (IOB2), IOB1, BIOES (IOBES), IO, or plain (no entities)
    tag_column: int = -1  # CoNLL files: the column holding the tag (0-based; -1 the last)
    tag_names: list[str] | None = None  # JSONL tags given as ids (Hugging Face's ner_tags): the tag of each id, in id order
    repair_tags: bool = False  # read tags that break data.scheme as conlleval does (O I-PER -> O B-PER)
    char_level: bool = False  # text without spaces between words (Chinese): words are characters


@dataclass
class PeftSection:
    """The adapter method and its options: `peft: {method: ia3, layers: [-2, -1]}`.

    `method` is a name of `finegrain.peft.METHODS`; every other key of the section is one of that
    method's options, kept in `options` and checked by the method's options class (the peft layer
    reads METHODS; this one cannot). LoRA's options may also sit in the `lora:` section below, as
    in configs from before `peft:`; keys under `peft:` go there when the method is lora.
    """

    rest: ClassVar[str] = "options"  # from_dict puts keys this class does not name here
    method: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)
    share: bool = True  # a multi-task run (`tasks:`): one adapter for every task (true) or one adapter per task


@dataclass
class LoraSection:
    """peft.method: lora (the default): LoRA's options."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False
    layers: list[int] | str | None = None  # adapt only these decoder layers; negative counts from the top; auto: the probe's
    lr_ratio: float | None = None  # LoRA+: lora_B's learning rate is train.lr times this (16 in the paper)
    init: str = "default"  # default | gaussian | pissa (A, B from the base weight's top singular vectors)


@dataclass
class HeadConfig:
    pooling: str = "last"  # last | mean | first (an encoder's [CLS])
    class_weights: str | dict[str, float] | None = None  # None, "balanced" or {label: weight}
    label_smoothing: float = 0.0
    threshold: float = 0.5  # multi-label decision threshold
    scheme: str = "BIO"  # ner: the tags the head predicts: BIO, BIOES or IO
    subword: str = "first"  # ner: the subtoken of each word that carries its label: first | last
    decoding: str = "viterbi"  # ner: viterbi (valid tag sequences only) | argmax
    dropout: float = 0.0  # ner: dropout on the hidden states before the tag head, in training only
    init: str = "random"  # classification: random | probe (fit the head on the frozen model first: LP-FT)
    # classification: the weight of a TF-IDF + logistic regression's probabilities mixed into the
    # model's (finegrain.tasks.lexical): 0 (off), a number below 1, or auto (chosen by validation log-loss)
    tfidf_mix: float | str = 0.0
    # ner: the weight of a logistic regression on word features (the tagging baseline's) mixed into
    # the tag probabilities (finegrain.tasks.lexical.WordModel): auto (chosen on validation), a number below 1, or 0 (off)
    word_mix: float | str = "auto"
    # a model directory whose head/head.safetensors starts the head in place of head.init (`finegrain prune`'s pruned/)
    weights: str | None = None


@dataclass
class RelationConfig:
    """task: relation: a text with two marked entity spans -> the relation between them."""

    # The label that means "no relation", left out of the averaged (headline) scores; null when
    # every example has a relation.
    no_relation: str | None = "Other"


@dataclass
class QAConfig:
    """task: qa: question + context -> an answer span of the context (or none)."""

    stride: int = 128  # tokens that consecutive windows of a long context share
    max_answer_length: int = 30  # tokens
    no_answer: bool = True  # may answer "no answer" (SQuAD v2); false: always the best span (v1.1)
    null_threshold: float = 0.0  # no answer when log P(no answer) - log P(best span) is above this


@dataclass
class InstructConfig:
    """task: instruct: chat or instruction/input/output examples; loss on assistant tokens."""

    packing: bool = True  # pack short examples into one row (no attention across examples)
    max_new_tokens: int = 64  # generated per example at evaluation


@dataclass
class TrainConfig:
    epochs: float = 1.0
    lr: float = 3e-4
    head_lr: float | None = None  # defaults to lr
    batch_size: int = 16
    grad_accum: int = 1
    # A batch runs in pieces of at most this many padded tokens: less memory, same gradient. auto: as
    # many as the model's width and trained layers allow within a 1.1B LLaMA's 320 (train.batching).
    micro_batch_tokens: int | str | None = "auto"
    schedule: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    metric: str | None = None  # validation metric to select by; default accuracy (micro_f1 for multi-label)
    patience: int | None = None  # evaluations without improvement before stopping
    eval_every: int = 0  # optimizer steps between validations; 0: once per epoch
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    eval_batch_size: int = 64
    seed: int = 0
    threads: int | None = None
    prefix_cache: bool = True  # run frozen layers below the lowest adapted layer once, not every epoch
    prefix_cache_dtype: str = "float32"  # float32 (exact) | bfloat16 (half the memory, an approximation)
    prefix_cache_ram_mb: int = 4096  # a larger cache lives in a memory-mapped file in the run directory
    activation_checkpointing: bool = False  # recompute each layer's activations in backward: less memory, ~30% slower
    bf16: bool = False  # bf16 autocast for training where the CPU computes bf16 natively (an approximation)
    device: str = "auto"  # auto (CUDA where torch sees one, else the CPU) | cpu | cuda | mps (finegrain.device)
    fsdp: bool = False  # under torchrun: shard the model across the processes (FSDP2, finegrain.train.fsdp); peft.method full always is
    # auto: `finegrain train` chooses every recipe key this config leaves unset from the data
    # (finegrain.train.recipe: lengths, class weights, epochs, early stopping, layer cut); off: defaults
    recipe: str | bool = "auto"  # YAML reads a bare off as false: both spellings work
    time_budget: float | None = 15.0  # minutes the recipe plans a run for (estimated layer passes); null: no limit
    # classification: fine-tune (and fit the LP-FT head) on a stratified sample of this many training
    # examples; the TF-IDF mix and the baselines still read all of them. null: every example
    fine_tune_examples: int | None = None
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, mlflow (finegrain.train.tracking)
    # the run's weights are the mean of the trainable weights at its last K evaluations (finegrain.train.averaging),
    # in place of the best evaluation's; null: off
    average_last: int | None = None


# What `augment.paraphrase`'s instruct model is asked (finegrain.paraphrase).
DEFAULT_PROMPT = ("Paraphrase this sentence. Keep its meaning and its opinion. Answer with the paraphrased sentence only."
                  "\n\nSentence: {text}")


SELF_JUDGE = "self"  # augment.judge: this config without augmentation judges the paraphrases (run.train_own_judge)
CURRENT_JUDGE = "current"  # augment.judge: the model judges them as it trains (finegrain.train.agreement)


@dataclass
class AugmentConfig:
    """Extra training examples: per kind, a fraction of the training set's size (of each batch's, for
    mixup); 0 (the default): none. Never applied to validation or test. Token-level noise
    (finegrain.data.augment), paraphrases by an instruct model (finegrain.paraphrase) and embedding
    mixup for classification (finegrain.train.mixup)."""

    deletion: float = 0.0  # random word deletion
    swap: float = 0.0  # adjacent words swapped
    typos: float = 0.0  # character typos (dropped, doubled, swapped letters, keyboard neighbours)
    paraphrase: float = 0.0  # classification: paraphrases written by `paraphraser`, kept where `judge` agrees with the label
    paraphraser: str | None = None  # an instruct model (name, path, GGUF) or a run of task instruct; null: the default model
    # A finished run of this task and labels; self: this config without augmentation, trained first into
    # RUN/judge; current: the model as it trains (a rewrite counts in a step where it gives the label);
    # null: TF-IDF + logistic regression on the training split.
    judge: str | None = None
    paraphrase_prompt: str = DEFAULT_PROMPT  # what the paraphraser is asked; {text} stands for the text
    mixup: float = 0.0  # classification: mixed pairs of pooled states, per text of a batch
    mixup_alpha: float = 0.4  # mixing weights ~ Beta(alpha, alpha)


@dataclass
class ContinualConfig:
    """A sequence of stages trained one after the other (finegrain.continual); unset: one ordinary run."""

    strategy: str = "sequential"  # sequential | replay | joint | adapters | ewc | lwf
    classes: list[list[str]] | None = None  # class-incremental: groups of the data's labels, one per stage
    tasks: list[dict[str, Any]] | None = None  # task-incremental: each stage's `data:` keys (its own labels and head)
    buffer: str = "balanced"  # replay: balanced (as many of each earlier class as fit) | reservoir (uniform)
    buffer_size: int = 200  # replay: earlier training examples kept
    replay_ratio: float | None = None  # replay: earlier examples per new one in a stage; null: the whole buffer
    ewc_lambda: float = 1000.0  # ewc: strength of the pull to the earlier run's weights, each weighted by its Fisher information
    lwf_temperature: float = 2.0  # lwf: softens the earlier and the current model's old outputs alike
    lwf_alpha: float = 0.5  # lwf: the earlier outputs' share: alpha * KL + (1 - alpha) * the task's loss
    lwf_heads: list[str] | None = None  # lwf: runs whose heads are kept (a task-incremental sequence: its earlier stages); null: init_from's
    fwt: bool = True  # a sequence also trains each later stage alone from the base: forward transfer (continual.fwt)


@dataclass
class DistillConfig:
    """Knowledge distillation from a finished run of the same task (finegrain.train.distill); no teacher: off."""

    teacher: str | None = None  # the teacher's run or ensemble directory; its outputs on the training set are computed once
    temperature: float = 2.0  # softens teacher and student alike; the KL term is scaled by its square
    alpha: float = 0.5  # the teacher's share: alpha * KL(teacher || student) + (1 - alpha) * the hard-label loss
    hidden: bool = False  # also match the teacher's hidden states (pooled, a few mapped layers; a learned projection where widths differ)
    hidden_weight: float = 1.0  # the hidden-state term's weight beside the output term
    unlabelled: str | None = None  # texts without labels the teacher labels (and `augment`'s copies of them) for the soft loss


@dataclass
class AdversarialConfig:
    """Adversarial training on what the first trained layer reads (finegrain.train.adversarial); no method: off."""

    method: str | None = None  # null | fgm (one normalised gradient step) | pgd (`steps` projected steps) | freelb (mean loss over `steps` ascent steps)
    epsilon: float = 1.0  # the largest L2 norm of the perturbation of each token's vector
    steps: int = 3  # pgd, freelb: ascent steps of 2 * epsilon / steps each, projected back onto the epsilon ball


@dataclass
class MultitaskConfig:
    """How the tasks of a multi-task run (`tasks:`) share its training steps (finegrain.multitask)."""

    sampling: str = "proportional"  # proportional (every batch of every task once an epoch) | temperature | round_robin
    temperature: float = 2.0  # sampling: temperature: task i gets a share of the batches proportional to n_i ** (1 / T)
    select: str | None = None  # the task whose validation metric picks the best checkpoint; null: the mean of all


@dataclass
class RunConfig:
    task: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    lora: LoraSection = field(default_factory=LoraSection)
    head: HeadConfig = field(default_factory=HeadConfig)
    relation: RelationConfig = field(default_factory=RelationConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    output: str | None = None  # the run directory
    # a finished run to start from: its adapter and its head, row by row for the labels both runs
    # have (finegrain.warm_start); init_labels renames the earlier run's labels first ({old: new})
    init_from: str | None = None
    init_labels: dict[str, str] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # several tasks on one backbone (finegrain.multitask): name -> {task, data, head, relation, qa, metric, loss_weight}
    tasks: dict[str, dict[str, Any]] | None = None
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)


def from_dict(cls: type, values: dict[str, Any], where: str, prefix: str = "", sources: dict[str, str] | None = None) -> Any:
    """Build dataclass `cls` from `values`, rejecting unknown keys with the nearest valid one.

    `sources` maps a dotted key to where it was set (`c.yaml:12`, `--set train.lr=...`), so an
    error names that place rather than the whole file."""
    if not isinstance(values, dict):
        raise FinegrainError(f"{where}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys to values")
    sources = sources or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    rest = getattr(cls, "rest", None)  # the field that keeps the keys `cls` does not name
    for key, value in values.items():
        at = sources.get(f"{prefix}{key}", where)
        if rest is not None and key not in fields:
            kwargs.setdefault(rest, {})[key] = value
            continue
        if key not in fields:
            nearest = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{nearest[0]}'?" if nearest else f"; valid keys: {', '.join(fields)}"
            raise FinegrainError(f"{at}: unknown key '{prefix}{key}'{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, at, f"{prefix}{key}.", sources)
        else:
            kwargs[key] = _check_type(value, hint, at, f"{prefix}{key}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str, key: str) -> Any:
    """Accept `value` if it fits `hint` (ints count as floats; list and dict items are checked
    too, so a wrong item is named here rather than failing as a TypeError later); else a one-line error."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)  # YAML 1.1 reads 3e-4 as a string
            except ValueError:
                continue
            if not math.isfinite(number):  # .inf / .nan: epochs=.inf would overflow far from here
                raise FinegrainError(f"{where}: '{key}' must be a finite number, not {value!r}")
            return number
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and isinstance(value, origin):
            return value
        if origin in (list, dict) and isinstance(value, origin):
            return _check_items(value, typing.get_args(option), where, key)
    expected = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options)
    text_meant = str in options and isinstance(value, (dict, list))  # `a: {b}` or `[x]` in a text read as YAML structure
    hint = "; a text holding ': ', '{' or '[' goes in quotes, e.g. \"Review: {text}\"" if text_meant else ""
    raise FinegrainError(f"{where}: '{key}' must be {expected}, not {value!r}{hint}")


def _check_items(value: list | dict, args: tuple, where: str, key: str) -> list | dict:
    """The items of a `list[X]` or the values of a `dict[str, X]`, each checked against X."""
    item = args[-1] if args else Any
    if item is Any:
        return value
    if isinstance(value, list):
        return [_check_type(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
    return {k: _check_type(v, item, where, f"{key}.{k}") for k, v in value.items()}


def _key_lines(node: yaml.Node | None, path: Path, prefix: str = "") -> dict[str, str]:
    """`path:LINE` of every key in a composed YAML mapping, by dotted key, for error messages.

    A key set twice in one mapping is an error: YAML loaders keep the last one in silence.
    """
    lines: dict[str, str] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        if key in lines:
            raise FinegrainError(
                f"{path}:{key_node.start_mark.line + 1}: '{key}' is set twice (also at {lines[key]}); keep one"
            )
        lines[key] = f"{path}:{key_node.start_mark.line + 1}"
        lines.update(_key_lines(value_node, path, f"{key}."))
    return lines


def explicit_keys(values: dict[str, Any], prefix: str = "") -> set[str]:
    """Every dotted key a config mapping sets (a section counts only through its keys)."""
    keys = set()
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("dataset_options", "class_weights"):
            keys |= explicit_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def dotted(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (`train.lr`); lists and scalars are the values."""
    if not isinstance(value, dict):
        return {prefix.rstrip("."): value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(dotted(item, f"{prefix}{key}."))
    return flat


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A config file's mapping and the `path:LINE` of each dotted key; one-line errors for bad YAML,
    a key set twice, or a file that is not a mapping of sections."""
    try:
        text = path.read_text(encoding="utf-8")
        values = yaml.safe_load(text) or {}
        sources = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), path)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f":{line + 1}" if line is not None else ""
        raise FinegrainError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax "
                             "(a text holding ': ', '{' or '[' goes in quotes)") from e
    if not isinstance(values, dict):
        raise FinegrainError(
            f"{path}: a run config is a mapping of sections (task:, model:, data:, ...), not a "
            f"{type(values).__name__}; see examples/rotten_tomatoes.yaml"
        )
    return values, sources


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or start from defaults) and apply `section.key=value` overrides."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dotted key -> the file line or the --set that gave it
    where = str(path) if path else "config"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FinegrainError(f"{path}: config file not found; pass a YAML file such as examples/rotten_tomatoes.yaml")
        values, sources = read_yaml(path)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise FinegrainError(f"--set {override}: expected key=value, e.g. --set train.lr=1e-4")
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FinegrainError(f"--set {override}: '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise FinegrainError(f"--set {override}: the value is not valid YAML ({getattr(e, 'problem', e)}); a text "
                                 f"holding ': ', '{{' or '[' goes in quotes: --set '{key.strip()}=\"...\"'") from None
        sources = {k: v for k, v in sources.items() if not k.startswith(f"{key.strip()}.")}
        sources[key.strip()] = f"--set {override}"
    _lora_options_to_their_section(values, sources)
    config = from_dict(RunConfig, values, where, sources=sources)
    validate(config, where, sources)
    config.explicit = explicit_keys(values)  # what the recipe must leave alone (finegrain.train.recipe)
    config.sources = sources  # where each key was set, for errors found above this layer (the task name)
    return config


def _lora_options_to_their_section(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Move LoRA's options given under `peft:` into the `lora:` section, where they have always been
    read (a key in both: the one under `peft:` wins); `sources` follows them."""
    peft = values.get("peft")
    if not isinstance(peft, dict) or peft.get("method", "lora") != "lora":
        return
    options = {key: value for key, value in peft.items() if key not in ("method", "share")}
    if options:
        lora = values.get("lora") if isinstance(values.get("lora"), dict) else {}
        values["lora"] = {**lora, **options}
        values["peft"] = {key: value for key, value in peft.items() if key in ("method", "share")}
        for key in options:
            sources[f"lora.{key}"] = sources.get(f"peft.{key}", sources.get("peft", "config"))


def _stages_of_classes(groups: list[list[str]]) -> bool:
    labels = [label for group in groups for label in group]
    return len(groups) >= 2 and len(groups[0]) >= 2 and all(groups) and len(set(labels)) == len(labels)


def _each_once(values: list | None) -> bool:
    """A list of names (`data.labels`, `data.tag_names`, `data.label_names`): null, or not empty and
    no name twice (the YAML `[1, "1"]` is one name twice)."""
    return values is None or 0 < len(values) == len({str(value) for value in values})


def validate(config: RunConfig, where: str, sources: dict[str, str] | None = None) -> None:
    checks = [
        (config.head.pooling in ("last", "mean", "first"), "head.pooling", "last, mean or first"),
        (config.data.scheme.upper() in ("BIO", "IOB2", "IOB1", "BIOES", "IOBES", "IO", "PLAIN"), "data.scheme",
         "BIO, IOB1, BIOES or IO, or plain (a tag per word as it is: parts of speech, chunks)"),
        (config.head.scheme.upper() in ("BIO", "IOB2", "BIOES", "IOBES", "IO"), "head.scheme", "BIO, BIOES or IO"),
        (config.data.scheme.upper() != "PLAIN" or config.head.scheme.upper() in ("BIO", "IOB2"), "head.scheme",
         "left unset with data.scheme: plain (plain tags are predicted as they are)"),
        (config.head.subword in ("first", "last"), "head.subword", "first or last"),
        (config.head.decoding in ("viterbi", "argmax"), "head.decoding", "viterbi or argmax"),
        (config.head.init in ("random", "probe"), "head.init", "random or probe"),
        (config.model.num_layers is None or config.model.num_layers == "auto"
         or (isinstance(config.model.num_layers, int) and config.model.num_layers >= 1), "model.num_layers",
         "a number of layers (at least 1), auto (the layer probe chooses) or null (all)"),
        (not isinstance(config.lora.layers, str) or config.lora.layers == "auto", "lora.layers",
         "a list of layer indices, auto (the layer probe chooses) or null (all)"),
        *((config.task == "classification" and not config.data.multi_label, key,
           "a number for this task, not auto: the layer probe reads single-label classification data")
          for key, value in (("model.num_layers", config.model.num_layers), ("lora.layers", config.lora.layers),
                             ("peft.layers", config.peft.options.get("layers"))) if value == "auto"),
        *((value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1),
           f"head.{key}", "auto or a weight in [0, 1) (0: off)")
          for key, value in (("tfidf_mix", config.head.tfidf_mix), ("word_mix", config.head.word_mix))),
        (config.head.init == "random" or (config.task == "classification" and not config.data.multi_label), "head.init",
         "random for this task (probe fits a softmax head: single-label classification)"),
        (config.train.schedule in ("linear", "cosine", "constant"), "train.schedule", "linear, cosine or constant"),
        (config.model.dtype in ("float32", "bfloat16"), "model.dtype", "float32 or bfloat16"),
        (config.model.quantize in (None, "int8", "q4"), "model.quantize", "null, int8 or q4"),
        (config.train.prefix_cache_dtype in ("float32", "bfloat16"), "train.prefix_cache_dtype", "float32 or bfloat16"),
        (config.train.device in ("auto", "cpu", "cuda", "mps"), "train.device", "auto, cpu, cuda or mps"),
        (config.train.epochs > 0, "train.epochs", "above 0"),
        *((0 <= getattr(config.augment, kind) <= 1, f"augment.{kind}", "a fraction of the training set in [0, 1]")
          for kind in ("deletion", "swap", "typos", "paraphrase")),
        (0 <= config.augment.mixup <= 1, "augment.mixup", "a fraction of each batch in [0, 1]"),
        (config.augment.mixup_alpha > 0, "augment.mixup_alpha", "above 0"),
        (config.augment.paraphrase_prompt.count("{text}") == 1, "augment.paraphrase_prompt",
         "a prompt holding {text} once, where the text goes"),
        (not config.augment.mixup or config.task == "classification", "augment.mixup",
         "0 unless the task is classification (it mixes what a classification head reads)"),
        (not config.augment.paraphrase or (config.task == "classification" and not config.data.multi_label),
         "augment.paraphrase", "0 unless the task is single-label classification (the judge checks one label a paraphrase)"),
        (config.augment.judge != CURRENT_JUDGE or not (config.distill.teacher or config.augment.mixup), "augment.judge",
         "a run, self or null beside distill.teacher or augment.mixup (current judges in the task's own loss; "
         "the teacher can judge: name its run)"),
        (config.train.lr > 0, "train.lr", "above 0"),
        (config.train.recipe in ("auto", "off", True, False), "train.recipe", "auto or off"),
        (config.train.time_budget is None or config.train.time_budget > 0, "train.time_budget", "above 0 (minutes), or null"),
        (config.train.fine_tune_examples is None or (config.train.fine_tune_examples >= 1 and config.task == "classification"),
         "train.fine_tune_examples", "a number of training examples of at least 1, for a classification task; or null"),
        (all(t in ("tensorboard", "mlflow") for t in config.train.report_to), "train.report_to",
         "a list of tensorboard and/or mlflow, e.g. [tensorboard, mlflow]"),
        (config.train.batch_size >= 1, "train.batch_size", "at least 1"),
        (config.train.eval_batch_size >= 1, "train.eval_batch_size", "at least 1"),
        (config.train.head_lr is None or config.train.head_lr > 0, "train.head_lr", "above 0, or null for train.lr"),
        (0 <= config.train.warmup_ratio <= 1, "train.warmup_ratio", "a fraction of the steps in [0, 1]"),
        (config.train.weight_decay >= 0, "train.weight_decay", "at least 0"),
        (config.train.max_grad_norm is None or config.train.max_grad_norm > 0, "train.max_grad_norm",
         "above 0, or null for no clipping"),
        (config.train.patience is None or config.train.patience >= 1, "train.patience",
         "at least 1 validation without improvement, or null for no early stopping"),
        (config.train.eval_every >= 0, "train.eval_every", "a number of steps (at least 0; 0: at each epoch's end)"),
        (config.train.checkpoint_every >= 1, "train.checkpoint_every", "a number of steps (at least 1)"),
        (0 <= config.train.seed < 2**32, "train.seed", "in [0, 2**32 - 1]"),
        (config.train.threads is None or config.train.threads >= 1, "train.threads", "at least 1, or null for the machine's cores"),
        (config.train.prefix_cache_ram_mb >= 0, "train.prefix_cache_ram_mb", "at least 0 (0: the cache is always a file)"),
        (config.train.grad_accum >= 1, "train.grad_accum", "at least 1"),
        (config.train.micro_batch_tokens in (None, "auto")
         or (isinstance(config.train.micro_batch_tokens, int) and config.train.micro_batch_tokens >= 1),
         "train.micro_batch_tokens", "auto (sized to the model), a number of tokens (at least 1), or null for whole batches"),
        (config.lora.r >= 1, "lora.r", "at least 1"),
        (config.data.max_length >= 2, "data.max_length", "at least 2"),
        (_each_once(config.data.labels), "data.labels",
         "a list of labels, each once (the head's outputs in order; a label holding a comma goes in quotes), or null "
         "for the training data's"),
        (_each_once(config.data.tag_names), "data.tag_names",
         "a list of tags, each once, in id order (e.g. [O, B-PER, I-PER]), or null"),
        (_each_once(config.data.label_names), "data.label_names",
         "a list of names, each once, in id order (e.g. [negative, positive]; a name holding a comma goes in quotes: "
         "\"Cause-Effect(e1,e2)\"), or null"),
        (config.data.label_names is None or config.task in ("classification", "relation"), "data.label_names",
         "null for this task: it names the label ids of classification and relation files (task: ner has data.tag_names)"),
        (config.task not in ("classification", "regression") or config.data.text_field != config.data.label_field,
         "data.text_field", f"a column other than data.label_field ('{config.data.label_field}'): the model would read the label it is to predict"),
        (config.data.long_texts in ("truncate", "head_tail", "windows"), "data.long_texts", "truncate, head_tail or windows"),
        (config.data.window_stride is None or config.data.window_stride >= 1, "data.window_stride",
         "at least 1 token, or null for half a window"),
        (config.data.max_windows >= 1, "data.max_windows", "at least 1"),
        (config.data.max_train_examples is None or config.data.max_train_examples >= 1, "data.max_train_examples",
         "at least 1, or null for all"),
        (config.data.max_eval_examples is None or config.data.max_eval_examples >= 1, "data.max_eval_examples",
         "at least 1, or null for all"),
        (config.continual.strategy in ("sequential", "replay", "joint", "adapters", "ewc", "lwf"), "continual.strategy",
         "sequential, replay, joint, adapters, ewc or lwf"),
        (config.continual.strategy not in ("ewc", "lwf") or config.init_from or config.continual.classes
         or config.continual.tasks, "continual.strategy",
         "ewc or lwf in a sequence (continual.classes or continual.tasks) or with init_from (the earlier run they hold to)"),
        (config.continual.ewc_lambda >= 0, "continual.ewc_lambda", "at least 0"),
        (config.continual.lwf_temperature > 0, "continual.lwf_temperature", "above 0"),
        (0 <= config.continual.lwf_alpha <= 1, "continual.lwf_alpha", "in [0, 1] (the earlier outputs' share of the loss)"),
        (config.continual.classes is None or _stages_of_classes(config.continual.classes), "continual.classes",
         "two or more groups of the data's labels, one per stage, each label in one group, the first of two or more "
         "(its classifier needs two), or null"),
        (config.continual.tasks is None or len(config.continual.tasks) >= 2, "continual.tasks",
         "two or more stages' data: keys, or null"),
        (not (config.continual.classes and config.continual.tasks), "continual.classes",
         "unset when continual.tasks is set (a sequence is class- or task-incremental)"),
        (config.continual.buffer in ("balanced", "reservoir"), "continual.buffer", "balanced or reservoir"),
        (config.continual.buffer_size >= 1, "continual.buffer_size", "at least 1"),
        (config.continual.replay_ratio is None or config.continual.replay_ratio > 0, "continual.replay_ratio",
         "above 0, or null"),
        (config.data.shots is None or config.data.shots >= 1, "data.shots", "at least 1 example per class, or null"),
        (config.data.folds is None or config.data.folds >= 2, "data.folds", "at least 2, or null"),
        (config.data.folds is None or 0 <= config.data.fold < config.data.folds, "data.fold",
         "between 0 and data.folds - 1"),
        (config.data.folds is None or not config.data.test, "data.folds",
         "null when data.test names a file (cross-validation holds out its own test fold)"),
        (config.data.template is None or config.data.template.count("{text}") == 1, "data.template", "a string with {text} once"),
        (len(config.data.split) == 3 and abs(sum(config.data.split) - 1) < 1e-6, "data.split", "three fractions summing to 1"),
        (0 <= config.head.label_smoothing < 1, "head.label_smoothing", "in [0, 1)"),
        (0 <= config.head.dropout < 1, "head.dropout", "in [0, 1)"),
        (0 < config.head.threshold < 1, "head.threshold", "a probability in (0, 1) (multi-label: a label is on above it)"),
        (config.distill.temperature > 0, "distill.temperature", "above 0"),
        (0 <= config.distill.alpha <= 1, "distill.alpha", "in [0, 1] (the teacher's share of the loss)"),
        (config.adversarial.method in (None, "fgm", "pgd", "freelb"), "adversarial.method", "null, fgm, pgd or freelb"),
        (config.distill.hidden_weight >= 0, "distill.hidden_weight", "at least 0"),
        (not (config.distill.hidden or config.distill.unlabelled) or config.distill.teacher, "distill.teacher",
         "set (a finished run) when distill.hidden or distill.unlabelled is"),
        (config.train.average_last is None or config.train.average_last >= 2, "train.average_last",
         "at least 2 (evaluations whose weights are averaged), or null"),
        (config.adversarial.epsilon > 0, "adversarial.epsilon", "above 0"),
        (config.adversarial.steps >= 1, "adversarial.steps", "at least 1"),
        (config.multitask.sampling in ("proportional", "temperature", "round_robin"), "multitask.sampling",
         "proportional, temperature or round_robin"),
        (config.multitask.temperature > 0, "multitask.temperature", "above 0"),
        (config.tasks is None or len(config.tasks) >= 2, "tasks", "at least two tasks (one task is an ordinary run: task: and data:)"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise FinegrainError(f"{(sources or {}).get(key, where)}: '{key}' must be {expected}")
    if not (config.data.dataset or config.data.train or config.continual.tasks or config.tasks):  # stages, tasks name theirs
        raise FinegrainError(f"{where}: no training data; set data.dataset (e.g. rotten_tomatoes) or data.train (a file)")


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain data, as a YAML config writes it (`peft:`'s options beside its method)."""
    values = dataclasses.asdict(config)
    values["peft"] = {"method": config.peft.method, **config.peft.options, **({} if config.peft.share else {"share": False})}
    return values


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
