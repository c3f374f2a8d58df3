"""A training recipe from the data: what a config leaves unset, chosen by looking at the data.

The demo recipe (examples/rotten_tomatoes.yaml) was tuned on short, balanced, binary snippets.
On other data — long documents, many classes, rare classes — the same numbers lose to a
one-second TF-IDF baseline. So `finegrain train` fills every key of this list that the config
(or `--set`) left unset from rules on the training split, and says why for each:

- `data.max_length`: the 95th percentile of the texts' token lengths, 32 to 512 (where over 5%
  of the texts are longer, they keep their head and tail: `data.long_texts: head_tail`);
- `head.class_weights`: square-root inverse frequency where the largest class outnumbers the
  smallest 1.5 to 1 or more;
- `head.init: probe` (LP-FT): the head fitted on the frozen states before fine-tuning, where the
  rarest class has at least 10 training examples to fit its row from;
- `train.metric`, `train.patience`, `train.eval_every`: select and stop early on validation
  macro-F1, evaluated twice per epoch for short runs; where the validation split is too small to
  choose by (`SMALL_VALIDATION`), no early stopping and the weights averaged over the last
  `AVERAGED` evaluations instead (`train.average_last`);
- `train.epochs`: enough passes that ~2,000 examples and ~40 of the rarest class go by;
- `train.lr`, `train.warmup_ratio`;
- `lora.targets: all-linear` (LoRA; another method keeps its own targets);
- `head.tfidf_mix: auto`: after training, mix in a TF-IDF + logistic regression's probabilities at
  the weight (0 to 0.9) with the lowest validation log-loss (finegrain.tasks.lexical), the training
  texts scored out of fold beside them where validation is small (finegrain.train.tfidf_mix);
- `model.num_layers`, `head.pooling`, `lora.layers` (`peft.layers` for another method): from the layer probe
  (finegrain.train.probe) — cut at the highest layer, at most 6 above the best one, whose
  frozen states classify within 0.01 macro-F1 of the best, pool by the mean where the probe's mean-pooled states beat the last
  token's by 0.03 or more (long documents: 0.91 against 0.68 on BBC News; on Rotten Tomatoes
  snippets the last token fine-tuned better, 0.818 against 0.798), adapt the top layers below it;
- and, when the estimated time exceeds `train.time_budget` minutes, fewer adapted layers (the
  cut coming down the probe's plateau with them: at most that many above the best layer), fewer
  epochs, a lower cut (within 0.03 of the best), fine-tuning on a stratified sample of the
  training set (`train.fine_tune_examples`, at least ~2,000 examples), then shorter texts.

Every choice is a value in the run's `config.yaml` (with its reason as a comment above it), so
a rerun with the same config reproduces it and any key can be overridden.

A key set to `auto` (`model.num_layers`, `lora.layers`, `peft.layers`) counts as unset. With
`train.recipe: off`, `model.num_layers: auto` still runs the probe's rules above (the cut, and the
adapted layers unless the config gives them), and nothing else (`probe_scope`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from finegrain.config import RunConfig
from finegrain.errors import FinegrainError
from finegrain.peft import METHODS
from finegrain.tasks.classification import encode_texts
from finegrain.train.probe import probe_layers, probe_sample, small_validation
from finegrain.train.trainer import evaluation_count

RECIPE_TASKS = ("classification",)
MIN_LENGTH, MAX_LENGTH = 32, 512
EXAMPLES_SEEN = 2000  # examples a run should see at least (the main job's 3,163 in one epoch reached 0.84)
RARE_SEEN = 40  # times the rarest class should go by
MAX_EPOCHS = 10
IMBALANCE = 1.5  # largest / smallest class count from which the loss weighs classes
PROBE_MIN_CLASS = 10  # training examples of the rarest class from which the head is fitted first (LP-FT)
ADAPTED_LAYERS = (6, 4, 3, 2)  # tried in this order until the estimate fits the time budget
PROBE_TOKENS = 40_000  # per split: bounds the probe's cost on long documents
MEAN_MARGIN = 0.03  # macro-F1 by which the probe's mean pooling must beat the last token to be chosen
CUT_TOLERANCE = 0.01  # macro-F1 a lower cut may lose against the probe's best layer (about its noise)
LOW_CUT_TOLERANCE = 0.03  # and when the time budget asks for it
TRAIN_COST = 3.0  # a training step's forward + backward costs ~3 forward passes
AVERAGED = 3  # evaluations whose weights a run on a small validation split averages (train.average_last)
AUTO = "auto"  # a key set to this is chosen as if unset (model.num_layers, lora.layers, peft.layers)


@dataclass
class Choice:
    """One key the recipe set: its value and why."""

    key: str
    value: Any
    reason: str


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Recipe:
    """Fills the unset keys of `config` from the training split; `choices` lists what it set."""

    def __init__(self, config: RunConfig, explicit: set[str], only: set[str] | None = None):
        self.config, self.explicit, self.only = config, explicit, only  # only: the keys it may set (None: all)
        self.choices: list[Choice] = []
        self.scores: list[float] | None = None  # the probe's macro-F1 by layer, once it ran

    def unset(self, key: str) -> bool:
        """Whether the recipe chooses `key`: one the config left unset or set to auto (within `only`)."""
        if self.only is not None and key not in self.only:
            return False
        return key not in self.explicit or self.value(key) == AUTO

    def value(self, key: str) -> Any:
        """The config's value of a dotted key (a method's `peft:` option from its options)."""
        section, name = key.split(".")
        if section == "peft" and name != "method":
            return self.config.peft.options.get(name)
        return getattr(getattr(self.config, section), name, None)

    @property
    def layers_key(self) -> str | None:
        """Where the adapted layers go: LoRA's `lora:` section, another method's `peft:` keys; None
        for a method without layers to choose (head, prompt)."""
        method = METHODS.get(self.config.peft.method)
        if method is None or "layers" not in {f.name for f in dataclasses.fields(method.options)}:
            return None
        return "lora.layers" if method.name == "lora" else "peft.layers"

    def set(self, key: str, value: Any, reason: str) -> None:
        """Set `key`; a key set again keeps one entry, its (different) reasons joined."""
        section, name = key.split(".")
        target = getattr(self.config, section)
        if section == "peft" and name != "method":
            target.options[name] = value  # the method's own options (finegrain.peft.method_options)
        else:
            setattr(target, name, value)
        earlier = next((c for c in self.choices if c.key == key), None)
        if earlier is None:
            self.choices.append(Choice(key, value, reason))
        else:
            earlier.value = value
            if not earlier.reason.endswith(reason):  # halved twice: said once
                earlier.reason = f"{earlier.reason}; then {reason}"

    # -- the rules ---------------------------------------------------------------------------

    def plan(self, splits, tokenizer, llama, progress: bool = True) -> list[Choice]:
        """Choose every unset key; `llama` is the whole frozen base model (the probe reads it)."""
        config = self.config
        texts = [e.text for e in splits.train]
        lengths = [len(ids) for ids in encode_texts(tokenizer, texts, 10**9, config.data.template)]
        self.lengths = lengths
        self._length(lengths)
        counts = Counter(e.label for e in splits.train)
        self._imbalance(counts)
        self._head_init(counts)
        self._metric(counts)
        self._epochs(len(splits.train), counts)
        self._lr()
        self._targets()
        self._tfidf_mix(len(splits.validation))
        probe = None
        if not splits.validation and (autos := auto_keys(config)):
            raise FinegrainError(f"{sorted(autos)[0]}: auto asks the layer probe, which scores the layers on validation examples, and "
                                 "this data has none; give data.validation (or a split with a validation share) or a number")
        if splits.validation and (self.unset("model.num_layers") or self.unset("head.pooling")
                                  or (self.layers_key and self.unset(self.layers_key))):
            probe = self._probe(splits, tokenizer, llama, progress)  # without validation nothing scores the layers
        self._budget(len(splits.train), min(counts.values()), probe, len(llama.model.layers), splits)
        self._evaluation(self.fine_tuned(len(splits.train)), len(splits.validation))
        return self.choices

    def _length(self, lengths: list[int]) -> None:
        if not self.unset("data.max_length"):
            return
        p95, median = percentile(lengths, 0.95), percentile(lengths, 0.5)
        value = min(MAX_LENGTH, max(MIN_LENGTH, 16 * math.ceil(p95 / 16)))
        longer = sum(n > value for n in lengths)
        self.set("data.max_length", value, f"95% of the {len(lengths):,} training texts fit in {p95} tokens "
                 f"(median {median}); {longer:,} longer texts are cut")
        if longer / len(lengths) > 0.05 and self.unset("data.long_texts"):
            self.set("data.long_texts", "head_tail", f"{longer / len(lengths):.0%} of the texts exceed {value} tokens: "
                     "keep their beginning and end rather than the beginning alone")

    def _imbalance(self, counts: Counter) -> None:
        if not self.unset("head.class_weights") or self.config.data.multi_label:
            return
        ratio = max(counts.values()) / min(counts.values())
        if ratio < IMBALANCE:
            return
        total, classes = sum(counts.values()), len(counts)
        weights = {str(label): round(math.sqrt(total / (classes * n)), 4) for label, n in sorted(counts.items())}
        self.set("head.class_weights", weights, f"classes are imbalanced ({ratio:.1f} to 1): weigh each by the "
                 "square root of its inverse frequency (rare classes count more, common ones still more often right)")

    def _head_init(self, counts: Counter) -> None:
        if not self.unset("head.init") or self.config.data.multi_label:
            return
        rarest = min(counts.values())
        if rarest >= PROBE_MIN_CLASS:
            # Measured on GPU with each dataset's plan fixed (docs/RESULTS.md): the model alone gained
            # 0.2-6 points of test accuracy on seven sets (BBC News 0.929 -> 0.975, the Chinese reviews
            # 0.735 -> 0.797) and lost 2.5 on TREC's 50 fine classes, whose rarest has one example.
            self.set("head.init", "probe", "fit the head on the frozen model's states first (LP-FT, its L2 chosen on "
                     "validation) and validate it: fine-tuning starts from a head that already separates the classes, "
                     "and a run that fine-tunes worse on validation keeps the fitted head")
        else:
            self.set("head.init", "random", f"the rarest class has {rarest} training example(s), under "
                     f"{PROBE_MIN_CLASS}: too few to fit its row of the head before fine-tuning")

    def _metric(self, counts: Counter) -> None:
        if self.unset("train.metric") and not self.config.data.multi_label:
            self.set("train.metric", "macro_f1", "select the checkpoint by validation macro-F1, which every class "
                     f"counts in equally ({len(counts)} classes)")

    def _epochs(self, examples: int, counts: Counter) -> None:
        if not self.unset("train.epochs"):
            return
        rarest = min(counts.values())
        epochs = min(MAX_EPOCHS, max(1, math.ceil(EXAMPLES_SEEN / examples), math.ceil(RARE_SEEN / rarest)))
        self.set("train.epochs", epochs, f"{examples:,} training examples, the rarest class {rarest:,}: "
                 f"{epochs} epoch(s) show at least {EXAMPLES_SEEN:,} examples and {RARE_SEEN} of the rarest class")

    def _targets(self) -> None:
        if self.config.peft.method == "lora" and self.unset("lora.targets"):
            self.set("lora.targets", "all-linear", "adapt every linear layer of the adapted blocks (attention and "
                     "MLP), as the main job does: with few adapted layers, each must carry more")

    def _tfidf_mix(self, validation: int) -> None:
        if self.unset("head.tfidf_mix"):
            lowest = (f"lowest log-loss over the validation texts and, out of fold, the training texts ({validation} "
                      "validation texts are too few to choose on)" if small_validation(validation)
                      else "lowest validation log-loss")
            self.set("head.tfidf_mix", "auto", "mix a TF-IDF + logistic regression's probabilities into the model's, "
                     f"at the weight (0 to 0.9) with the {lowest}: the words alone are strong on topics and "
                     "on scripts the model's pretraining rarely saw, and the two err on different texts")

    def _lr(self) -> None:
        if self.unset("train.lr"):
            self.set("train.lr", 1e-3, "LoRA at rank 8 with batches of 16 learns fastest at 1e-3 here "
                     "(the main job's rate; 3e-4 needed three times the steps)")
        if self.unset("train.warmup_ratio"):
            self.set("train.warmup_ratio", 0.06, "warm up over the first 6% of the steps")

    def _probe(self, splits, tokenizer, llama, progress: bool) -> dict[str, Any]:
        config = self.config
        examples = int(min(400, max(64, PROBE_TOKENS // max(self.mean_tokens(), 1))))
        max_layers = max(1, math.ceil(0.8 * len(llama.model.layers)))
        result = probe_layers(config, examples, progress, splits, llama, tokenizer, max_layers)
        best, pooling = result["best_layer"], config.head.pooling
        if self.unset("head.pooling"):
            last, mean = result["macro_f1"][best], result["mean_macro_f1"][best]
            if mean - last >= MEAN_MARGIN:
                pooling = "mean"
                reason = f"the probe's mean-pooled states scored {mean:.3f} macro-F1 at layer {best}, last-token {last:.3f}"
            else:  # the last token learns to summarise in fine-tuning: on Rotten Tomatoes it beat mean pooling
                pooling = "last"
                than = "beat the last token's" if mean > last else "scored no more than the last token's"
                reason = (f"at layer {best} the probe's mean-pooled states ({mean:.3f} macro-F1) {than} ({last:.3f})"
                          f"{f' by less than {MEAN_MARGIN}' if mean > last else ''}: keep the last token, which "
                          "fine-tuning teaches to summarise")
            self.set("head.pooling", pooling, reason)
        self.scores = scores = result["mean_macro_f1" if pooling == "mean" else "macro_f1"]
        best = self.best_layer
        if self.unset("model.num_layers"):
            cut = self.plateau_cut(ADAPTED_LAYERS[0])
            self.set("model.num_layers", cut, f"a linear probe of the frozen layers 1-{max_layers} "
                     f"({probe_sample(result)}, "
                     f"{pooling}-pooled) scored best at layer {best} (macro-F1 {scores[best]:.3f}); layer {cut} is the "
                     f"highest of layers {best}-{min(len(scores) - 1, best + ADAPTED_LAYERS[0])} within {CUT_TOLERANCE} "
                     f"of it ({scores[cut]:.3f}), so the adapted layers start near the best frozen states; the layers "
                     "above it are dropped")
        return result

    @property
    def best_layer(self) -> int:
        """The probed layer with the highest macro-F1 (the lowest of equals)."""
        return max(range(1, len(self.scores)), key=lambda k: (self.scores[k], -k))

    def plateau_cut(self, adapted: int) -> int:
        """The highest layer at most `adapted` above the probe's best whose macro-F1 is within
        CUT_TOLERANCE of the best's: the top of the probe's plateau, so that `adapted` layers under it
        start from states near the best frozen ones (Rotten Tomatoes, last token: a cut at 14 reached
        0.758 test accuracy, the main job's 20 0.818; the probe's plateau is 14-20)."""
        scores, best = self.scores, self.best_layer
        top = min(len(scores) - 1, best + adapted)
        return max(k for k in range(best, top + 1) if scores[k] >= scores[best] - CUT_TOLERANCE)

    def lowest_within(self, tolerance: float) -> int:
        """The lowest probed layer whose macro-F1 is within `tolerance` of the best layer's."""
        best = self.scores[self.best_layer]
        return next(k for k in range(1, len(self.scores)) if self.scores[k] >= best - tolerance)

    def _budget(self, examples: int, rarest: int, probe: dict[str, Any] | None, total_layers: int, splits) -> None:
        """Fewer adapted layers, then epochs, then a lower cut, then fine-tuning on a sample, then
        shorter texts, until the estimated layer passes fit `train.time_budget` (timed by the probe
        on this machine)."""
        config = self.config
        budget = 60 * (config.train.time_budget or 0)
        per_token = probe["seconds_per_layer_token"] if probe else None
        held_out = len(splits.validation) + len(splits.test)

        def estimate(adapted: int, trained: int | None = None) -> float:
            cut, tokens = config.model.num_layers or total_layers, self.mean_tokens()
            trained = self.fine_tuned(examples) if trained is None else trained
            # The frozen prefix once, the adapted layers each epoch (and once to fit the head), the held-out sets.
            train = trained * tokens * ((cut - adapted) + (TRAIN_COST * config.train.epochs + 1) * adapted)
            return per_token * (train + held_out * tokens * cut)

        # A sample keeps EXAMPLES_SEEN examples and RARE_SEEN of the rarest class at least (stratified).
        floor = max(EXAMPLES_SEEN, math.ceil(RARE_SEEN * examples / rarest))

        if self.layers_key is None or not self.unset(self.layers_key):
            return
        cut = config.model.num_layers or total_layers
        candidates = [k for k in ADAPTED_LAYERS if k <= cut] or [cut]
        timed = bool(per_token and budget)
        adapted = candidates[0]
        if timed:
            # With fewer adapted layers the cut comes down the probe's plateau with them, so that the
            # frozen layers above the best one are not paid for by the epochs (long documents: the prefix
            # pass of every layer under the adapted ones costs as much as the training).
            follow = self.unset("model.num_layers") and self.scores is not None
            for adapted in candidates:
                if follow:
                    config.model.num_layers = min(cut, max(adapted, self.plateau_cut(adapted)))
                if estimate(adapted) <= budget:
                    break
            if config.model.num_layers != cut:
                self.set("model.num_layers", config.model.num_layers, f"with {adapted} adapted layers to fit "
                         f"train.time_budget, the highest layer at most {adapted} above the probe's best within "
                         f"{CUT_TOLERANCE} of it: frozen layers above the best that the probe does not prefer cost passes "
                         "that the epochs need more")
        while timed and estimate(adapted) > budget:
            if self.unset("train.epochs") and config.train.epochs > 1:
                self.set("train.epochs", config.train.epochs - 1, "one epoch fewer to fit train.time_budget")
            elif self.unset("model.num_layers") and self.lowest_within(LOW_CUT_TOLERANCE) < config.model.num_layers:
                low = self.lowest_within(LOW_CUT_TOLERANCE)
                self.set("model.num_layers", low, f"to fit train.time_budget, the lowest layer within "
                         f"{LOW_CUT_TOLERANCE} of the probe's best ({self.scores[low]:.3f})")
                adapted = min(adapted, low)
            elif self.unset("train.fine_tune_examples") and self.fine_tuned(examples) > floor:
                trained = self.fine_tuned(examples)
                fixed = estimate(adapted, 0)  # the held-out sets alone
                per_example = (estimate(adapted, trained) - fixed) / trained
                size = max(floor, min(trained - 1, int((budget - fixed) / per_example)))
                self.set("train.fine_tune_examples", size, f"to fit train.time_budget with the texts' length kept, "
                         f"fine-tune on a stratified sample of {size:,} of the {examples:,} training examples (at least "
                         f"{EXAMPLES_SEEN:,}, and {RARE_SEEN} of the rarest class); the TF-IDF mix and the baselines "
                         "read all of them")
            elif self.unset("data.max_length") and config.data.max_length > 128:
                self.set("data.max_length", max(128, config.data.max_length // 2), "shorter texts to fit train.time_budget")
            else:
                break
        cut = config.model.num_layers or total_layers
        reason = f"adapt the top {adapted} of the {cut} kept layers; the {cut - adapted} below run once per example"
        if timed:
            reason += f" (estimated {estimate(adapted) / 60:.1f} min of layer passes against a {budget / 60:.0f}-min budget)"
        self.set(self.layers_key, list(range(-adapted, 0)), reason)

    def fine_tuned(self, examples: int) -> int:
        """How many of the `examples` training examples fine-tuning reads (`train.fine_tune_examples`, at most all)."""
        return min(self.config.train.fine_tune_examples or examples, examples)

    def mean_tokens(self) -> float:
        """Mean tokens per training text at the current `data.max_length`."""
        return sum(min(n, self.config.data.max_length) for n in self.lengths) / len(self.lengths)

    def _evaluation(self, examples: int, validation: int) -> None:
        config = self.config
        steps_per_epoch = math.ceil(examples / (config.train.batch_size * config.train.grad_accum))
        if self.unset("train.eval_every") and config.train.epochs <= 2 and steps_per_epoch >= 20:
            self.set("train.eval_every", math.ceil(steps_per_epoch / 2), "validate twice per epoch: a short run "
                     "keeps its best half-epoch")
        evaluations = evaluation_count(config.train, config.train.epochs * steps_per_epoch, steps_per_epoch)
        if small_validation(validation) and evaluations >= AVERAGED and self.unset("train.average_last"):
            # On 100 labels split 90/10 (five held-out sets, docs/RESULTS.md) the best of ten epochs on ten
            # validation texts was often the fitted head before any step, and stopping early ended the run there.
            small = f"{validation} validation examples are too few to choose a checkpoint by"
            if self.unset("train.patience"):
                self.set("train.patience", None, f"{small}: train every planned epoch")
            self.set("train.average_last", AVERAGED, f"{small}: the run's weights are the mean of its last "
                     f"{AVERAGED} evaluations' (stochastic weight averaging), not the best-scoring one's")
        elif self.unset("train.patience"):
            self.set("train.patience", 2, "stop after two validations without a better macro-F1 (or train.metric), "
                     "keeping the best checkpoint")


def applies(config: RunConfig) -> bool:
    """Whether `finegrain train` fills this config's unset keys from the data."""
    return config.train.recipe in ("auto", True) and config.task in RECIPE_TASKS and not config.data.multi_label


def auto_keys(config: RunConfig) -> set[str]:
    """The keys `config` sets to auto, which the layer probe chooses during `train`."""
    values = {"model.num_layers": config.model.num_layers, "lora.layers": config.lora.layers,
              "peft.layers": config.peft.options.get("layers")}
    return {key for key, value in values.items() if value == AUTO}


def probe_scope(config: RunConfig) -> set[str] | None:
    """The keys `train`'s plan may set: None (every unset key) under `train.recipe: auto`; else the
    auto keys, with the adapted layers beside `model.num_layers: auto` unless the config gives them
    (empty: no plan)."""
    if applies(config) and hasattr(config, "explicit"):  # a config read from a file: its set keys are known
        return None
    keys = auto_keys(config)
    if "model.num_layers" in keys:
        layers_key = Recipe(config, set()).layers_key
        if layers_key and layers_key not in getattr(config, "explicit", set()):
            keys.add(layers_key)
    return keys


def recipe_text(choices: list[Choice]) -> str:
    """The chosen recipe for the terminal: one line per key."""
    lines = ["recipe chosen from the data (each key stays overridable with --set):"]
    lines += [f"  {c.key} = {c.value}  # {c.reason}" for c in choices]
    return "\n".join(lines)


def recipe_comments(choices: list[Choice]) -> str:
    """The same, as YAML comments above the effective config."""
    lines = ["# finegrain train chose these keys from the data (set them to override):"]
    lines += [f"#   {c.key}: {c.reason}" for c in choices]
    return "\n".join(lines) + "\n"
