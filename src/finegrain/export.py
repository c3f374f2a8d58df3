"""`finegrain export`: a finished run as a merged Hugging Face model, a GGUF file, or its adapter alone.

- `hf`: the run's adapter folded into the base weights (`peft.base.unload_adapters`, or a full run's
  own weights), written as the `transformers` class of the task: `LlamaForSequenceClassification`
  (classification, regression: `score.weight`), `LlamaForTokenClassification` (ner: `score.weight`,
  `score.bias`), `LlamaForQuestionAnswering` (qa: `qa_outputs`, the decoder under `transformer.`),
  `LlamaForCausalLM` (instruct), with the labels in config.json's
  `id2label`/`label2id`. `transformers` loads the directory and gives the run's logits.
  A run on a BERT-family encoder (`minilm-l6`) is written the same way as `BertForSequenceClassification`
  (classification, regression), `BertForTokenClassification` (ner) or `BertForQuestionAnswering` (qa),
  the encoder under `bert.` (see `bert_state_dict` for the [CLS] pooler a sequence classifier needs).
- `gguf`: the merged causal language model of a generation run (task: instruct) as one llama.cpp
  file (`f16`, `q8_0` or `q4_0` matrices; norms stay F32), under llama.cpp's tensor names with the
  q/k row permutation its converter applies (`checkpoint.gguf.permute_rope`), and the tokenizer
  (copied from a GGUF base, else described from `tokenizer.json`). `gguf`'s reader, `transformers`
  (`gguf_file=`) and `finegrain.load_model` read it.
- `peft`: a copy of the run's adapter directory, which `peft.PeftModel.from_pretrained` loads.

A run's predictions may hold more than its model: a TF-IDF model mixed into a classifier's
probabilities (`head.tfidf_mix`) or a word-feature model into a tagger's (`head.word_mix`), and a
temperature (`finegrain calibrate`). No transformers class
holds the mix, so `hf` and `peft` refuse such a run unless asked for the model alone
(`model_alone`): an export that scored below the run's report without a word would be the worst
outcome. A temperature without a mix is divided into the `hf` head, so softmax of its logits gives
the run's probabilities; a `peft` adapter gives the logits before it (`export_note` says so).
Nor does a transformers model know how the run read a text (`data.max_length`, `data.template`,
`data.long_texts`; for NER, which token of a word carries its tag and how the tags were chosen; for QA,
its prompt and windows): an `hf` export of a classification, regression, NER or QA run keeps them in
config.json (`finegrain_input`), and `export_note` says what to give transformers for the run's
predictions.

A method whose config class says `mergeable = False` (prompt and prefix tuning: their virtual
tokens are inputs, not a change of any weight) has no merged form: `hf` and `gguf` refuse it in
one line. Every output appears whole or not at all (`finegrain.atomic`).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from finegrain import rundir
from finegrain.atomic import atomic_dir, atomic_path
from finegrain.checkpoint.gguf import permute_rope, read_gguf_metadata
from finegrain.checkpoint.load import is_encoder, resolve_model
from finegrain.config import RunConfig
from finegrain.errors import FinegrainError
from finegrain.model.bert import BertConfig
from finegrain.model.bert import hf_state_dict as bert_encoder_state_dict
from finegrain.model.config import LlamaConfig
from finegrain.peft import method_options, unload_adapters
from finegrain.peft.full_files import decoder_state_dict
from finegrain.run import build_trained
from finegrain.tasks.lexical import CONFIG_FILE as LEXICAL_CONFIG
from finegrain.tasks.lexical import MIXES, mixed_in
from finegrain.tasks.qa import ANSWER_CUE, QUESTION
from finegrain.tokenizer import PRE_TOKENIZER_SPLITS, Tokenizer
from finegrain.train.trainer import flat_metrics

FORMATS = ("hf", "peft", "gguf")
HF_DTYPES = ("f32", "f16")
GGUF_DTYPES = ("f16", "q8_0", "q4_0")
GGUF_NAME = "model.gguf"  # the file inside an --output directory

# The transformers class of each task's head, and its head modules' tensors in that class.
HF_HEADS = {
    "classification": "LlamaForSequenceClassification",
    "regression": "LlamaForSequenceClassification",
    "ner": "LlamaForTokenClassification",
    "qa": "LlamaForQuestionAnswering",
    "instruct": "LlamaForCausalLM",
}
# The same for a run on a BERT-family encoder.
BERT_HEADS = {
    "classification": "BertForSequenceClassification",
    "regression": "BertForSequenceClassification",
    "ner": "BertForTokenClassification",
    "qa": "BertForQuestionAnswering",
}
# The pooler of an exported BertForSequenceClassification computes tanh(POOLER_SCALE * h) for the [CLS]
# state h: linear to a relative (POOLER_SCALE * |h|)^2 / 3, below float32's resolution (6e-8) while
# |h| < 400, so the classifier, scaled by 1 / POOLER_SCALE, gives the run's logits (`bert_state_dict`).
POOLER_SCALE = 1e-6
# Hugging Face module path inside a decoder layer -> llama.cpp's name (`checkpoint.gguf` reads them back).
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GGUF_NORMAL, _GGUF_CONTROL, _GGUF_USER_DEFINED = 1, 3, 4  # llama.cpp's token types


def export_run(run_dir: str | Path, fmt: str, output: str | Path, dtype: str | None = None,
               model_alone: bool = False) -> Path:
    """Write run `run_dir` in format `fmt` to `output`; returns the path written.

    Args:
        run_dir: a finished run directory.
        fmt: "hf", "peft" or "gguf".
        output: a directory that does not exist yet; for gguf also a `.gguf` file path.
        dtype: hf: "f32" (default) or "f16"; gguf: "f16" (default), "q8_0" or "q4_0".
        model_alone: export a run that mixes a TF-IDF or word model into its predictions without it
            (and without a temperature fitted to the mixed probabilities).

    Raises:
        FinegrainError: not a finished run, an unknown format or dtype, an output that exists,
            a method that cannot merge, a task the format cannot hold, a mix without
            `model_alone`.
    """
    run_dir, output = Path(run_dir), Path(output)
    if fmt not in FORMATS:
        raise FinegrainError(f"--format: '{fmt}' is unknown; use one of {', '.join(FORMATS)}")
    dtype = _check_dtype(fmt, dtype)
    config = rundir.read_config(run_dir)
    rundir.require_adapter(run_dir)
    if output.exists():
        raise FinegrainError(f"{output}: already exists; choose another --output (export never overwrites)")
    if fmt != "peft":
        rundir.require_base_model(run_dir, config)  # merged into what is written
        require_mergeable(config, run_dir, fmt)
    if mix_weight(run_dir) and not model_alone:
        raise FinegrainError(f"{run_dir}: its predictions mix in {_mix_words(run_dir)}, which no {fmt} model holds: serve the run with "
                             "`finegrain serve` or `finegrain.load`, or export the model alone with --model-alone")
    if fmt == "peft":
        return _export_peft(run_dir, output)
    if fmt == "hf":
        return _export_hf(run_dir, config, output, dtype, exported_temperature(run_dir, fmt))
    return _export_gguf(run_dir, config, output, dtype)


def mix_weight(run_dir: Path) -> float:
    """The weight of the lexical model (TF-IDF, word features) the run mixes into its probabilities; 0 without one."""
    found = mixed_in(run_dir)
    if found is None:
        return 0.0
    path = found[1] / LEXICAL_CONFIG
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["weight"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FinegrainError(f"{path}: the run's {MIXES[found[0]][1]} cannot be read ({exc}); train the run again") from None


def _mix_words(run_dir: Path) -> str:
    """'a TF-IDF model at weight W (head.tfidf_mix; test M X with it, Y without)', or a word-feature model's."""
    key = mixed_in(run_dir)[0]
    metrics = rundir.read_metrics(run_dir) or {}
    mix = metrics.get(key) or {}
    metric = mix.get("metric")
    with_mix, alone = flat_metrics(metrics.get("test") or {}).get(metric), (mix.get("test_model_alone") or {}).get(metric)
    scores = f"; test {metric} {with_mix:.4f} with it, {alone:.4f} without" if None not in (with_mix, alone) else ""
    return f"a {MIXES[key][1]} at weight {mix_weight(run_dir):g} (head.{key}{scores})"


def exported_temperature(run_dir: Path, fmt: str) -> float | None:
    """The calibration temperature an `hf` export divides into its head: the run's, unless it mixes
    in a lexical model (TF-IDF or word features: the temperature was fitted to the mixed probabilities)."""
    return rundir.read_temperature(run_dir) if fmt == "hf" and not mix_weight(run_dir) else None


def export_note(run_dir: str | Path, fmt: str, model_alone: bool = False) -> str | None:
    """What a user of the export should know that its files do not say: the mix or the temperature
    it leaves out, or the temperature in its head, and how the run read its texts; None when a
    transformers user predicts as the run does without being told."""
    run_dir = Path(run_dir)
    notes = [_scores_note(run_dir, fmt, model_alone), _input_note(rundir.read_config(run_dir), fmt)]
    return "; ".join(note for note in notes if note) or None


def _scores_note(run_dir: Path, fmt: str, model_alone: bool) -> str | None:
    temperature = rundir.read_temperature(run_dir)
    if model_alone and mix_weight(run_dir):
        left = " and its calibration temperature (fitted to the mixed probabilities)" if temperature else ""
        return f"the model alone: without {_mix_words(run_dir)}{left}"
    if temperature is None or fmt == "gguf":
        return None
    if exported_temperature(run_dir, fmt):
        return (f"its head divides the logits by the run's calibration temperature {temperature:.4f} ({rundir.TEMPERATURE}): "
                "their softmax is the run's probabilities")
    return (f"the adapter gives the logits before calibration: divide them by the run's temperature {temperature:.4f} "
            f"({rundir.TEMPERATURE}) for its probabilities")


def input_recipe(config: RunConfig) -> dict[str, Any] | None:
    """How a run turned each input into tokens and outputs, which a transformers model does not do
    itself (config.json's `finegrain_input`): for classification and regression `max_length`,
    `template` and `long_texts`; for NER `max_length` and the word's token that carries its tag
    (`subword`), with the tag `scheme` and how the tags were chosen (`decoding`); for QA the prompt, its
    windows and the span rules."""
    data, head = config.data, config.head
    if config.task == "qa":
        return {"max_length": data.max_length, "prompt": QUESTION + "{context}" + ANSWER_CUE, "stride": config.qa.stride,
                "max_answer_length": config.qa.max_answer_length, "null_threshold": config.qa.null_threshold}
    if config.task == "ner":
        return {"max_length": data.max_length, "subword": head.subword, "scheme": head.scheme, "decoding": head.decoding}
    if config.task not in ("classification", "regression"):
        return None
    return {"max_length": data.max_length, "template": data.template, "long_texts": data.long_texts}


def _input_note(config: RunConfig, fmt: str) -> str | None:
    recipe = input_recipe(config)
    if recipe is None or fmt == "gguf":
        return None
    length = recipe["max_length"]
    if config.task == "qa":
        return (f"the run read {recipe['prompt']!r}, its three parts tokenized apart, a context too long for {length} "
                f"tokens in windows sharing {recipe['stride']} tokens, each with the whole question, and took the best span "
                f"of at most {recipe['max_answer_length']} context tokens unless the prompt's last token scored 'no answer' "
                "higher; transformers' question-answering pipeline reads a (question, context) pair instead: feed the "
                "model as the run did" + (" (finegrain_input in config.json)" if fmt == "hf" else ""))
    if config.task == "ner":
        words = (f"the run read at most {length} tokens of a sentence, its words joined by spaces (tokenize with "
                 f"truncation=True, max_length={length}), and tagged each word at its {recipe['subword']} token")
        if recipe["decoding"] == "viterbi" and recipe["scheme"].upper() != "IO":
            words += (f", the sentence's tags chosen together to follow {recipe['scheme']}'s rules, which an argmax "
                      "per token does not (an I- tag may follow O)")
        return words + (" (finegrain_input in config.json)" if fmt == "hf" else "")
    template, long_texts = recipe["template"], recipe["long_texts"]
    if template is None and long_texts == "truncate":
        return f"the run read at most {length} tokens of a text: tokenize with truncation=True, max_length={length} to predict as it does"
    if template:
        before, after = template.split("{text}")
        words = (f"the run read each text between {before!r} and {after!r}, the three tokenized apart and their ids joined "
                 f"(the text cut to fit {length} tokens)")
    else:
        words = f"the run read at most {length} tokens of a text"
    if long_texts != "truncate":
        words += (", a longer text's first and last tokens" if long_texts == "head_tail"
                  else ", a longer text as the mean of overlapping windows")
    return words + (" (finegrain_input in config.json)" if fmt == "hf" else "") + "; give transformers the same"


def _check_dtype(fmt: str, dtype: str | None) -> str | None:
    allowed = {"hf": HF_DTYPES, "gguf": GGUF_DTYPES, "peft": ()}[fmt]
    if dtype is None:
        return allowed[0] if allowed else None
    if dtype not in allowed:
        what = f"use one of {', '.join(allowed)}" if allowed else "the adapter is copied as it is; drop --dtype"
        raise FinegrainError(f"--dtype: '{dtype}' does not apply to --format {fmt}; {what}")
    return dtype


def require_mergeable(config: RunConfig, run_dir: Path, what: str,
                      fix: str = "export its adapter with --format peft") -> None:
    """Refuse a run whose method has no merged form (its config class says `mergeable = False`):
    `what` is the form asked for, `fix` what the user can do instead."""
    method, _ = method_options(config)
    if not getattr(method, "mergeable", True):
        raise FinegrainError(
            f"{run_dir}: peft.method {method.name} cannot be merged into the model's weights, so it has no {what} form; {fix}"
        )


def merged_model(run_dir: Path, config: RunConfig) -> tuple[nn.Module, Tokenizer, Any]:
    """The run's task model in float32 with its adapter folded into plain linear layers, its tokenizer and task.

    A run trained on a quantised base (`model.quantize`) is merged into the float weights of its
    base checkpoint: the adapter learned the change on top of the quantised ones, so the result
    differs from the run's own outputs by the base's quantisation error."""
    config = copy.deepcopy(config)
    config.model.dtype, config.model.quantize = "float32", None
    model, tokenizer, task = build_trained(config, run_dir)
    unload_adapters(model, merge=True)
    return model.eval(), tokenizer, task


# ---------------------------------------------------------------------------------------------- peft


def _export_peft(run_dir: Path, output: Path) -> Path:
    if rundir.has_model(run_dir):
        raise FinegrainError(f"{run_dir}: a full fine-tune has no adapter (its weights are {rundir.MODEL}/); export it with --format hf")
    with atomic_dir(output) as tmp:
        for path in sorted(rundir.adapter_dir(run_dir).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, Path(tmp) / path.name)
    return output


# ---------------------------------------------------------------------------------------------- hf


def _export_hf(run_dir: Path, config: RunConfig, output: Path, dtype: str, temperature: float | None) -> Path:
    encoder = is_encoder(config.model.name)
    architecture = (BERT_HEADS if encoder else HF_HEADS).get(config.task)
    if architecture is None:
        raise FinegrainError(
            f"{run_dir}: a task {config.task} head has no transformers class; export its adapter and head with --format peft"
        )
    if encoder:
        return _export_bert(run_dir, config, output, dtype, architecture, temperature)
    if config.model.bidirectional:
        raise FinegrainError(f"{run_dir}: model.bidirectional runs have no transformers class (transformers' LLaMA is causal)")
    if architecture == "LlamaForSequenceClassification" and config.head.pooling != "last":
        raise FinegrainError(
            f"{run_dir}: head.pooling {config.head.pooling}: LlamaForSequenceClassification reads the last token only; "
            "export its adapter and head with --format peft"
        )
    model, tokenizer, task = merged_model(run_dir, config)
    require_llama(model, run_dir)
    state, hf_config = hf_state_dict(model, task, tokenizer, architecture)
    generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    return _write_hf(output, state, hf_config, tokenizer, dtype, config, temperature, generation)


def _divide_head(state: dict[str, torch.Tensor], temperature: float | None) -> dict[str, torch.Tensor]:
    """A sequence classifier's tensors with its head's logits divided by the run's calibration temperature."""
    if temperature is None:
        return state
    head = ("score.weight", "score.bias", "classifier.weight", "classifier.bias")
    return {k: v / temperature if k in head else v for k, v in state.items()}


def _export_bert(run_dir: Path, config: RunConfig, output: Path, dtype: str, architecture: str,
                 temperature: float | None) -> Path:
    """`_export_hf` for a run on a BERT-family encoder: the merged encoder and head as `architecture`."""
    if architecture == "BertForSequenceClassification" and config.head.pooling != "first":
        raise FinegrainError(
            f"{run_dir}: head.pooling {config.head.pooling}: BertForSequenceClassification reads the [CLS] token only; "
            "train with head.pooling=first to export to transformers, or export the adapter with --format peft"
        )
    model, tokenizer, task = merged_model(run_dir, config)
    state, hf_config = bert_state_dict(model, task, architecture)
    return _write_hf(output, state, hf_config, tokenizer, dtype, config, temperature)


def _write_hf(output: Path, state: dict, hf_config: dict, tokenizer: Any, dtype: str, config: RunConfig,
              temperature: float | None, generation: dict | None = None) -> Path:
    """A transformers checkpoint directory, written whole or not at all: config.json (and
    generation_config.json), model.safetensors in `dtype` (f32 or f16), and the tokenizer. The run's
    calibration `temperature` is divided into the head, and how it read its texts (`input_recipe`)
    goes into config.json."""
    if recipe := input_recipe(config):
        hf_config["finegrain_input"] = recipe
    state = _divide_head(state, temperature)
    if dtype == "f16":
        state = {k: v.half() for k, v in state.items()}
        hf_config["torch_dtype"] = "float16"
    with atomic_dir(output) as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
    return output


def bert_state_dict(model: nn.Module, task: Any, architecture: str) -> tuple[dict, dict]:
    """The merged task model on an encoder under `architecture`'s names (`bert.` + `BertModel`'s), and its config.json.

    finegrain's sequence head reads the [CLS] state h itself (`score(h)`, no bias), where
    `BertForSequenceClassification` reads `classifier(tanh(pooler.dense(h)))`. The pooler is written
    as `POOLER_SCALE` times the identity (no bias), where tanh is linear to far below float32's
    resolution, and the classifier as `score / POOLER_SCALE` with a zero bias: the logits are the
    run's. Token classification and QA heads read each token's state: `classifier` and `qa_outputs`
    are `score` as it is.
    """
    encoder = model.get_submodule("model")
    config: BertConfig = encoder.config
    state = {f"bert.{k}": v.detach().to("cpu").float().contiguous().clone() for k, v in bert_encoder_state_dict(encoder).items()}
    hf_config = config.to_hf()
    hf_config.update(architectures=[architecture], num_hidden_layers=len(encoder.layers), torch_dtype="float32")
    head = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in model.score.state_dict().items()}
    if architecture == "BertForQuestionAnswering":
        state.update({f"qa_outputs.{k}": v for k, v in head.items()})
        return state, hf_config
    weight = head["weight"]
    bias = head.get("bias", torch.zeros(weight.shape[0]))
    if architecture == "BertForSequenceClassification":
        hidden = config.hidden_size
        state["bert.pooler.dense.weight"] = torch.eye(hidden) * POOLER_SCALE
        state["bert.pooler.dense.bias"] = torch.zeros(hidden)
        weight = weight / POOLER_SCALE
    state.update({"classifier.weight": weight.contiguous(), "classifier.bias": bias.contiguous()})
    _label_config(hf_config, task, weight.shape[0])
    return state, hf_config


def _label_config(hf_config: dict[str, Any], task: Any, num_labels: int) -> None:
    """`num_labels`, the label names (`id2label`, `label2id`) and `problem_type` of a classifier's config.json."""
    hf_config["num_labels"] = num_labels
    names = task_labels(task)
    if names:
        hf_config["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf_config["label2id"] = {name: i for i, name in enumerate(names)}
    if task.name == "regression":
        hf_config["problem_type"] = "regression"
    elif getattr(task, "multi_label", False):
        hf_config["problem_type"] = "multi_label_classification"


def require_llama(model: nn.Module, run_dir: Path) -> None:
    """Refuse a run on an encoder base (`minilm-l6`): its layers have no LLaMA names to write."""
    config = model.get_submodule("model").config
    if not isinstance(config, LlamaConfig):
        raise FinegrainError(
            f"{run_dir}: its base is a {config.model_type} encoder, which this format does not hold (LLaMA-family "
            "decoders only); export it with --format hf, or its adapter with --format peft"
        )


def hf_state_dict(model: nn.Module, task: Any, tokenizer: Tokenizer, architecture: str) -> tuple[dict, dict]:
    """The merged task model's tensors under `architecture`'s names, and its config.json."""
    decoder = model.get_submodule("model")
    state = decoder_state_dict(model)
    hf_config = decoder.config.to_hf()
    if hf_config["model_type"] == "qwen2":
        architecture = architecture.replace("Llama", "Qwen2")
    hf_config.update(architectures=[architecture], num_hidden_layers=len(decoder.layers), torch_dtype="float32")
    _declare_biases(state, hf_config, len(decoder.layers))
    if hf_config.get("pad_token_id") is None:
        hf_config["pad_token_id"] = tokenizer.pad_token_id  # sequence classification finds each row's last token by it
    if architecture == "LlamaForCausalLM":
        return state, hf_config
    state.pop("lm_head.weight", None)
    head = model.score.state_dict()
    if architecture == "LlamaForQuestionAnswering":  # start and end logits are its two outputs, as in finegrain
        state = {"transformer." + k.removeprefix("model."): v for k, v in state.items()}
        state.update({f"qa_outputs.{k}": v.detach().clone().contiguous() for k, v in head.items()})
        return state, hf_config
    state.update({f"score.{k}": v.detach().clone().contiguous() for k, v in head.items()})
    _label_config(hf_config, task, state["score.weight"].shape[0])
    return state, hf_config


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _declare_biases(state: dict[str, torch.Tensor], hf_config: dict[str, Any], num_layers: int) -> None:
    """Biases a method added to linear layers (bitfit) as LLaMA's `attention_bias` / `mlp_bias`: each
    covers every projection of its kind, so a layer without one gets zeros (the same outputs)."""
    qwen2 = hf_config["model_type"] == "qwen2"
    for kind, modules, key in (("self_attn", _ATTENTION, "attention_bias"), ("mlp", _MLP, "mlp_bias")):
        names = [f"model.layers.{i}.{kind}.{m}" for i in range(num_layers) for m in modules]
        added = [name for name in names if f"{name}.bias" in state and not (qwen2 and name.endswith(("q_proj", "k_proj", "v_proj")))]
        if not added:
            continue
        if qwen2:
            raise FinegrainError(f"{added[0]}: a bias there has no place in transformers' Qwen2; export with --format peft")
        for name in names:
            weight = state[f"{name}.weight"]
            state.setdefault(f"{name}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
        hf_config[key] = True


def task_labels(task: Any) -> list[str] | None:
    """The names of the head's outputs, in order: classes, or NER's tags; None for regression."""
    if task.name == "regression":
        return None
    names = getattr(task, "tags", None) if task.name == "ner" else getattr(task, "labels", None)
    return [str(name) for name in names] if names is not None else None


# ---------------------------------------------------------------------------------------------- gguf


def _export_gguf(run_dir: Path, config: RunConfig, output: Path, dtype: str) -> Path:
    if config.task != "instruct":
        raise FinegrainError(
            f"{run_dir}: a task {config.task} run has a head a GGUF file cannot hold (GGUF holds a causal language model, "
            "for task: instruct runs); export it with --format hf"
        )
    model, tokenizer, _ = merged_model(run_dir, config)
    require_llama(model, run_dir)
    llama_config = model.get_submodule("model").config
    native = ("q_proj", "k_proj", "v_proj") if llama_config.attention_bias else ()
    native += ("o_proj",) if llama_config.attention_out_bias else ()
    added = [k for k in decoder_state_dict(model) if k.endswith("_proj.bias") and not k.endswith(tuple(f"{m}.bias" for m in native))]
    if added:
        raise FinegrainError(
            f"{run_dir}: the merged model has biases the base has no place for ({added[0]}: peft.method bitfit), which "
            "GGUF readers ignore; export with --format hf"
        )
    if llama_config.rope_scaling:
        raise FinegrainError(f"{run_dir}: rope_scaling {llama_config.rope_scaling} is not written to GGUF yet; export with --format hf")
    fields = tokenizer_fields(tokenizer, config.model.name)
    if output.suffix == ".gguf":
        with atomic_path(output) as tmp:
            write_gguf(tmp, model, fields, dtype, name=run_dir.name)
        return output
    with atomic_dir(output) as tmp:
        write_gguf(Path(tmp) / GGUF_NAME, model, fields, dtype, name=run_dir.name)
    return output / GGUF_NAME


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged causal LM under llama.cpp's names, q and k rows permuted as llama.cpp's converter does."""
    config = model.get_submodule("model").config
    permute = not (config.attention_bias and not config.attention_out_bias)  # Qwen2 is stored unpermuted
    out = {}
    for key, tensor in decoder_state_dict(model).items():
        stem, kind = key.rsplit(".", 1)
        if stem in _GGUF_TOP_NAMES:
            name = f"{_GGUF_TOP_NAMES[stem]}.{kind}"
        else:
            _, _, index, module = stem.split(".", 3)  # model.layers.N.self_attn.q_proj
            name = f"blk.{index}.{_GGUF_LAYER_NAMES[module]}.{kind}"
        if permute and module_is(name, "attn_q"):
            tensor = permute_rope(tensor, config.num_heads)
        elif permute and module_is(name, "attn_k"):
            tensor = permute_rope(tensor, config.num_kv_heads)
        out[name] = tensor.float()
    return out


def module_is(gguf_name: str, part: str) -> bool:
    return gguf_name.startswith("blk.") and gguf_name.split(".")[2] == part


def write_gguf(path: Path, model: nn.Module, tokenizer: dict[str, Any], dtype: str, name: str) -> None:
    """One GGUF file: the model's architecture keys, the tokenizer's fields, the tensors in `dtype`."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    config = model.get_submodule("model").config
    arch = "qwen2" if config.attention_bias and not config.attention_out_bias else "llama"
    kind = {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[dtype]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(model.get_submodule("model").layers))
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokenizer)
    block = quants.GGML_QUANT_SIZES[kind][0]
    for tensor_name, tensor in gguf_tensors(model).items():
        array = tensor.numpy()
        if array.ndim == 1:  # norms and biases stay F32, as llama.cpp keeps them
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float32))
        elif kind == GGMLQuantizationType.F16 or array.shape[-1] % block:  # a row that is not whole blocks: F16
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float16))
        else:
            writer.add_tensor(tensor_name, quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tokenizer_fields(tokenizer: Tokenizer, base: str | None) -> dict[str, Any]:
    """The GGUF `tokenizer.*` fields: a GGUF base's own, or a description of the byte-level BPE in
    `tokenizer.json` (llama.cpp's "gpt2" model) with the pre-tokenizer named as llama.cpp names it."""
    source = resolve_model(base)
    if source.suffix == ".gguf":
        metadata = read_gguf_metadata(source)
        return {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    described = json.loads(tokenizer.backend.to_str())
    model, decoder = described.get("model") or {}, described.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise FinegrainError(
            f"{source}: its tokenizer is not a byte-level BPE, the one kind finegrain describes in GGUF; "
            "export with --format hf and convert that with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        if index >= len(tokens):
            raise FinegrainError(f"{source}: token ids are not contiguous (id {index} of {len(vocab)} tokens); export with --format hf")
        tokens[index] = token
    types = [_GGUF_NORMAL] * len(tokens)
    for index, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[index] = _GGUF_CONTROL if added.special else _GGUF_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _gguf_pre(described.get("pre_tokenizer"), source),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": tokenizer.add_bos,
        "tokenizer.ggml.add_eos_token": tokenizer.add_eos,
    }
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("padding", tokenizer.pad_token_id), ("unknown", tokenizer.unk_token_id)):
        if token_id is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = int(token_id)
    if tokenizer.chat_template:
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields


def _gguf_pre(pre: dict | None, source: Path) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a `tokenizer.json` pre-tokenizer, from `PRE_TOKENIZER_SPLITS`."""
    pre = pre or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in PRE_TOKENIZER_SPLITS.items():
            if split == pattern:
                return name
    raise FinegrainError(
        f"{source}: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp name finegrain knows; "
        "export with --format hf and convert that with llama.cpp's convert_hf_to_gguf.py"
    )


def _add_tokenizer(writer, fields: dict[str, Any]) -> None:
    """Write the tokenizer fields with the value types llama.cpp reads them as."""
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):  # strings, int32 token types, float32 scores
            writer.add_array(key, value)
