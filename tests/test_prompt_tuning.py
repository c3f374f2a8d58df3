"""peft.method: prompt (prompt tuning): virtual tokens before the input, checked against PEFT's
PROMPT_TUNING on the tiny random model both ways (task heads, and a causal LM's logits and greedy
generation through the KV cache), through the backbone's shifts (padding, the rows shortcut,
token-level heads, packed rows), and end to end: CLI training for classification, NER and
instruct, exact resume, `finegrain.load`, and a server holding a LoRA run and prompt runs on one base."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close

import finegrain
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.model.backbone import hidden_states
from finegrain.model.config import LlamaConfig
from finegrain.model.llama import Llama
from finegrain.peft import METHODS, adapter_layers, inject, load_adapter, merge_adapters, method_config, save_adapter, set_adapter
from finegrain.peft.prompt import PromptConfig, PromptEncoder
from finegrain.tasks.classification import SequenceClassifier
from finegrain.tasks.tokens import TokenClassifier
from finegrain.train.prefix_cache import lowest_trainable_layer
from serve_helpers import train_ner_run, train_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

HF_CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3,
)


@pytest.fixture(scope="module")
def hf_classifier() -> transformers.LlamaForSequenceClassification:
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**HF_CONFIG)).eval()


@pytest.fixture(scope="module")
def hf_tagger() -> transformers.LlamaForTokenClassification:
    torch.manual_seed(0)
    return transformers.LlamaForTokenClassification(transformers.LlamaConfig(**HF_CONFIG)).eval()


def ours_of(hf_model: transformers.PreTrainedModel) -> torch.nn.Module:
    """Our task model (the same head type) with the HF model's weights."""
    llama = Llama(LlamaConfig.from_hf(hf_model.config.to_dict()))
    llama.model.load_state_dict({k.removeprefix("model."): v for k, v in hf_model.state_dict().items() if k.startswith("model.")})
    if isinstance(hf_model, transformers.LlamaForSequenceClassification):
        model = SequenceClassifier(llama.model, 3)
    else:
        model = TokenClassifier(llama.model, 3)
    model.score.load_state_dict(hf_model.score.state_dict())
    return model.eval()


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every trainable tensor (the prompts and the head), so that each one shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
BATCH = {"input_ids": IDS, "lengths": torch.tensor([7, 7])}


@pytest.mark.parametrize("head", ["classifier", "tagger"])
def test_saved_prompt_gives_peft_the_same_outputs(hf_classifier, hf_tagger, tmp_path, head):
    hf = hf_classifier if head == "classifier" else hf_tagger
    model = ours_of(hf)
    config = PromptConfig(num_virtual_tokens=5, modules_to_save=["score"])
    inject(model, config)
    perturb(model)
    with torch.no_grad():
        ours = model(BATCH)
    save_adapter(model, config, tmp_path, "tiny", task_type="SEQ_CLS" if head == "classifier" else "TOKEN_CLS")
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == [*(["base_model.score.bias"] if head == "tagger" else []), "base_model.score.weight", "prompt_embeddings"]
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "PROMPT_TUNING" and raw["num_virtual_tokens"] == 5 and "target_modules" not in raw
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    with torch.no_grad():
        theirs = reference(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    # PEFT's token classifier returns the virtual positions too; finegrain's head sees the input's only.
    assert_close(ours, theirs if head == "classifier" else theirs[:, 5:])


def test_a_peft_prompt_adapter_loads_and_answers_as_in_peft(hf_classifier, tmp_path):
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(copy.deepcopy(hf_classifier), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    perturb(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf_classifier), tmp_path).eval()
    model = ours_of(hf_classifier)
    config = load_adapter(model, tmp_path)
    assert isinstance(config, PromptConfig) and config.num_virtual_tokens == 4
    with torch.no_grad():
        assert_close(model(BATCH), reference(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits)


def test_padding_and_the_rows_shortcut_see_each_row_as_alone(hf_classifier, hf_tagger):
    for hf in (hf_classifier, hf_tagger):
        model = ours_of(hf)
        inject(model, PromptConfig(num_virtual_tokens=3, modules_to_save=["score"]))
        perturb(model)
        ids = IDS.clone()
        ids[1, 4:] = 0
        with torch.no_grad():
            both = model({"input_ids": ids, "lengths": torch.tensor([7, 4])})
            alone = model({"input_ids": ids[1:, :4], "lengths": torch.tensor([4])})
        if both.dim() == 3:  # a tagger: one row of logits per input token, zero at padding
            assert both.shape[1] == 7 and bool((both[1, 4:] == 0).all())
            both = both[:, :4]
        assert_close(both[1:], alone)


def test_packed_rows_see_the_virtual_tokens_and_their_own_example_only(tiny_model):
    decoder = tiny_model.model.eval()
    inject(tiny_model.model, PromptConfig(num_virtual_tokens=3))
    a, b = torch.randint(1, 100, (1, 4)), torch.randint(1, 100, (1, 3))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    causal[4:, :4] = False  # the second example does not see the first
    packed = {"input_ids": torch.cat((a, b), 1), "lengths": torch.tensor([7]), "attention_mask": causal[None, None],
              "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2]])}
    with torch.no_grad():
        together = hidden_states(decoder, packed)
        alone = [hidden_states(decoder, {"input_ids": x, "lengths": torch.tensor([x.shape[1]])}) for x in (a, b)]
    assert together.shape == (1, 7, decoder.config.hidden_size)
    assert_close(together, torch.cat(alone, 1))


def prompt_outputs(model: torch.nn.Module, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`run(model)`'s output and, after backward of a loss over it, every trainable tensor's gradient."""
    model.zero_grad()
    out = run(model)
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head", ["classifier", "tagger", "packed"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_virtual_tokens_run_once_as_a_prefix_with_every_rows_logits_and_gradients(tiny_model, monkeypatch, head, checkpointing):
    from finegrain.model import backbone

    if head == "packed":
        model = tiny_model.model
        causal = torch.ones(7, 7, dtype=torch.bool).tril()
        causal[4:, :4] = False
        batch = {"input_ids": torch.cat((IDS, IDS.flip(0)), 1)[:, :7], "lengths": torch.tensor([7, 7]),
                 "attention_mask": causal[None, None].expand(2, 1, 7, 7), "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2]] * 2)}
        run = lambda m: hidden_states(m, batch)  # noqa: E731
    else:
        model = (SequenceClassifier if head == "classifier" else TokenClassifier)(tiny_model.model, 3)
        ids = IDS.clone()
        ids[1, 4:] = 0  # right padding
        run = lambda m: m({"input_ids": ids, "lengths": torch.tensor([7, 4])})  # noqa: E731
    inject(model, PromptConfig(num_virtual_tokens=3, modules_to_save=["score"] * (head != "packed")))
    perturb(model)
    model.train()
    tiny_model.model.gradient_checkpointing = checkpointing
    decoder = tiny_model.model
    calls = []
    monkeypatch.setattr(decoder, "prefix_keys_values", lambda x: calls.append(x.shape) or type(decoder).prefix_keys_values(decoder, x))
    once, once_grads = prompt_outputs(model, run)
    assert calls == [(1, 3, decoder.config.hidden_size)]  # one batch-1 run of the 3 virtual tokens
    monkeypatch.setattr(backbone, "virtual_tokens_once", lambda *args: False)  # the reference: them before every row
    every_row, every_row_grads = prompt_outputs(model, run)
    assert len(calls) == 1
    assert_close(once, every_row)
    assert sorted(once_grads) == sorted(every_row_grads) and any(n.endswith("prompt_encoder.embedding.weight") for n in once_grads)
    for name, grad in once_grads.items():
        assert grad.abs().sum() > 0
        # float32 rounding of sums over the batch, in another order: relative to the gradient's scale
        # (in float64 the two ways agree to 1e-7, where the norms' float32 arithmetic stops them).
        assert_close(grad, every_row_grads[name], atol=1e-5 * float(grad.abs().max()), rtol=1e-5)


TASK_INPUTS = {
    "classification": (["a", "b"], ["great fun film and good cast", "dull"]),
    "regression": (["score", 0.0, 1.0], ["great fun film and good cast", "dull"]),
    "ner": (["PER"], ["Anna Smith was in Paris .", "John and the actors"]),
    "relation": (["Other", "Cause-Effect(e1,e2)"], ["The <e1>fire</e1> caused the <e2>smoke</e2> .", "<e1>rain</e1> and <e2>wind</e2>"]),
    "qa": ([], [{"question": "who was in Paris?", "context": "Anna Smith was in Paris ."}, {"question": "who?", "context": "John"}]),
    "instruct": ([], ["What is the plural of child?", "Name a film."]),
}


@pytest.mark.parametrize("name", list(TASK_INPUTS))
def test_every_task_sees_the_virtual_tokens_once_as_in_every_row(tiny_model_dir, monkeypatch, name):
    """Each task's model, on a batch its own `encode` and `collate` make (padded rows, the rows
    shortcut, spans, markers, packed chat rows), gives the logits and gradients of the in-row route."""
    from finegrain.config import RunConfig
    from finegrain.model import backbone
    from finegrain.tasks import TASKS

    llama, tokenizer = finegrain.load_model(str(tiny_model_dir), progress=False)
    config = RunConfig(task=name)
    config.data.max_length = 256
    labels, inputs = TASK_INPUTS[name]
    task = TASKS[name].from_config(config, labels)
    model = task.build_model(llama, tokenizer)
    inject(model, PromptConfig(num_virtual_tokens=3, modules_to_save=[n for n, _ in model.named_children() if n != "model"]))
    perturb(model)
    items = task.encode(tokenizer, task.examples_from_inputs(inputs, config.data), config.data.max_length)
    batch = task.collate(items, tokenizer.pad_token_id or 0)
    decoder, calls = llama.model, []
    monkeypatch.setattr(decoder, "prefix_keys_values", lambda x: calls.append(x.shape) or type(decoder).prefix_keys_values(decoder, x))
    once, once_grads = prompt_outputs(model.train(), lambda m: m(batch))
    assert calls == [(1, 3, decoder.config.hidden_size)]
    monkeypatch.setattr(backbone, "virtual_tokens_once", lambda *args: False)
    every_row, every_row_grads = prompt_outputs(model, lambda m: m(batch))
    assert_close(once, every_row)
    assert any(n.endswith("prompt_encoder.embedding.weight") for n in once_grads)
    for key, grad in once_grads.items():
        assert_close(grad, every_row_grads[key], atol=1e-5 * float(grad.abs().max()), rtol=1e-5)


def test_virtual_tokens_run_in_every_row_where_they_see_the_rows(tiny_model):
    from finegrain.model.backbone import virtual_tokens_once

    decoder = tiny_model.model
    assert virtual_tokens_once(decoder, None, None)
    assert virtual_tokens_once(decoder, torch.ones(2, 1, 4, 4, dtype=torch.bool), None)
    assert not virtual_tokens_once(decoder, torch.ones(2, 4), None)  # a key mask (left padding): positions count it
    assert not virtual_tokens_once(decoder, None, {0: (torch.zeros(1, 2, 3, 16),) * 2})  # prefix tuning's come first
    decoder.config.causal = False  # bidirectional: the virtual tokens see every row's tokens
    try:
        assert not virtual_tokens_once(decoder, None, None)
    finally:
        decoder.config.causal = True


class WordTokenizer:
    """Token ids of words in a fixed list, BOS (1) first, as a LLaMA tokenizer's `encode` gives."""

    def encode(self, text: str) -> list[int]:
        return [1, *(["a", "film", "story"].index(word) + 10 for word in text.split())]


def test_init_text_starts_from_its_token_embeddings(tiny_model):
    tokenizer = WordTokenizer()
    config = PromptConfig(num_virtual_tokens=7, init_text="a film")
    with pytest.raises(FinegrainError, match="init_text: needs the run's tokenizer"):
        inject(copy.deepcopy(tiny_model.model), config)
    config.tokenize(tokenizer, "tiny")
    ids = tokenizer.encode("a film")  # special tokens included, as PEFT's tokenizer(text) gives
    inject(tiny_model.model, config)
    expected = tiny_model.model.embed_tokens.weight[(ids * 7)[:7]]
    assert_close(tiny_model.model.prompt_encoder().detach(), expected)


def test_named_prompts_switch_and_none_runs_the_bare_base(tiny_model):
    decoder = tiny_model.model.eval()
    with torch.no_grad():
        bare = hidden_states(decoder, BATCH)
    inject(tiny_model.model, PromptConfig(num_virtual_tokens=2), "a")
    inject(tiny_model.model, PromptConfig(num_virtual_tokens=5), "b")
    layers = list(adapter_layers(tiny_model.model).values())
    assert [type(layer) for layer in layers] == [PromptEncoder]
    outputs = {}
    for name in ("a", "b", None, "a"):
        set_adapter(layers, name)
        with torch.no_grad():
            outputs.setdefault(name, []).append(hidden_states(decoder, BATCH))
    assert_close(outputs[None][0], bare)
    assert_close(outputs["a"][0], outputs["a"][1])
    assert not torch.allclose(outputs["a"][0], outputs["b"][0])
    assert tiny_model.model.prompt_encoder().shape[0] == 2


def test_prompt_trains_only_its_tokens_cannot_use_the_cache_nor_merge(tiny_model):
    model = SequenceClassifier(tiny_model.model, 2)
    inject(model, PromptConfig(num_virtual_tokens=4, modules_to_save=["score"]))
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == ["model.prompt_encoder.embedding.weight", "score.weight"]
    assert lowest_trainable_layer(model, len(model.model.layers)) == 0
    with pytest.raises(ValueError, match="virtual tokens enter below layer 0"):
        hidden_states(model.model, BATCH, end_layer=1)
    assert METHODS["prompt"].mergeable is False
    with pytest.raises(FinegrainError, match="prompt: virtual tokens cannot be merged"):
        merge_adapters(model)


def test_a_peft_prompt_generates_as_in_peft(tmp_path):
    generates_as_in_peft(tmp_path, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def generates_as_in_peft(tmp_path: Path, peft_config) -> None:
    """A PEFT causal-LM adapter loaded into a `Llama`: the same logits (of the input's positions) and
    the same greedy continuation through finegrain's KV cache as PEFT's `generate`."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_CONFIG, "num_labels": 2})).eval()
    torch.manual_seed(5)
    peft.get_peft_model(copy.deepcopy(hf), peft_config).save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    model = Llama(LlamaConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=False)
    load_adapter(model.eval(), tmp_path)
    virtual = peft_config.num_virtual_tokens if isinstance(peft_config, peft.PromptTuningConfig) else 0
    with torch.no_grad():
        assert_close(model(IDS), reference(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits[:, virtual:])
        theirs = reference.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False)
        model.setup_cache(2, 13)
        logits, ours = model(IDS, input_pos=torch.arange(7), last_only=True), []
        for step in range(6):
            ours.append(logits[:, -1].argmax(-1))
            logits = model(ours[-1][:, None], input_pos=torch.tensor([7 + step]))
    assert torch.equal(theirs[:, -6:], torch.stack(ours, 1))


def test_left_padded_generation_answers_each_prompt_as_alone(tiny_model_dir):
    generation_is_batch_independent(tiny_model_dir, PromptConfig(num_virtual_tokens=3))


def generation_is_batch_independent(model_dir: Path, config) -> None:
    """`generate` on a left-padded batch gives each prompt what it gives that prompt alone."""
    from finegrain.generation import generate

    llama, tokenizer = finegrain.load_model(str(model_dir), progress=False)
    inject(llama, config)
    perturb(llama, seed=2)
    prompts = ["the film was good and the story", "dull"]
    together = generate(llama, tokenizer, prompts, max_new_tokens=5, ignore_eos=True)
    assert together == [generate(llama, tokenizer, p, max_new_tokens=5, ignore_eos=True) for p in prompts]
    ids = torch.tensor([tokenizer.encode(prompts[0])])
    with torch.no_grad():
        adapted = llama(ids)
        set_adapter(adapter_layers(llama).values(), None)
        assert not torch.allclose(llama(ids), adapted)  # the adapter is what generated


def test_bad_options_are_one_line_errors(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"data": {"train": "t.jsonl"}, "peft": {"method": "prompt", "num_virtual_tokens": 0}}))
    with pytest.raises(FinegrainError, match="peft.num_virtual_tokens: must be a positive integer"):
        method_config(load_config(config_file), 2, ["score"])
    config_file.write_text(yaml.safe_dump({"data": {"train": "t.jsonl"}, "peft": {"method": "prompt", "r": 8}}))
    with pytest.raises(FinegrainError, match="peft.r"):
        method_config(load_config(config_file), 2, ["score"])
    with pytest.raises(FinegrainError, match="peft.init_text: must be a non-empty text"):
        PromptConfig(init_text=" ")


# ---------------------------------------------------------------------------------------------- end to end

PROMPT = {"peft": {"method": "prompt", "num_virtual_tokens": 4}, "train": {"lr": 3e-2}}
SENTIMENT = {"fresh": ["great fun film", "a gripping story", "good cast"], "rotten": ["dull and slow", "badly acted", "a bad story"]}
TEXTS = ["great fun film and good cast", "dull and slow", "a gripping story", "badly acted and a bad story"]
ENTITIES = {"LOC": ["Paris", "London", "New York"], "PER": ["Anna Smith", "John", "the actors"]}
FILLER = ["the", "film", "was", "good", "in", "and", "story", "."]
SENTENCES = ["Anna Smith was in Paris .", "the film was good in London", "John and the actors"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_runs")
    return {
        "lora": train_run(tiny_model_dir, root / "lora", SENTIMENT),
        "prompt": train_run(tiny_model_dir, root / "prompt", SENTIMENT, seed=1, sections=PROMPT),
        "ner": train_ner_run_with(tiny_model_dir, root / "ner"),
    }


def train_ner_run_with(model_dir: Path, directory: Path) -> Path:
    """serve_helpers' NER run, with prompt tuning (its sections are fixed there: patch the written config)."""
    import serve_helpers

    original = serve_helpers.train_task_run

    def with_prompt(*args, sections=None, **kwargs):
        merged = {**(sections or {}), "peft": PROMPT["peft"]}
        return original(*args, sections=merged, **kwargs)

    serve_helpers.train_task_run = with_prompt
    try:
        return train_ner_run(model_dir, directory, ENTITIES, FILLER)
    finally:
        serve_helpers.train_task_run = original


def test_prompt_runs_train_save_for_peft_and_predict(runs):
    for name in ("prompt", "ner"):
        config = yaml.safe_load((runs[name] / "config.yaml").read_text())
        assert config["peft"]["method"] == "prompt"
        raw = json.loads((runs[name] / "adapter" / "adapter_config.json").read_text())
        assert raw["peft_type"] == "PROMPT_TUNING"
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        assert metrics["train"]["frozen_prefix_layers"] == 0  # virtual tokens change every layer
    predictions = finegrain.load(runs["prompt"]).predict(TEXTS)
    assert [p["label"] for p in predictions] == ["fresh", "rotten", "fresh", "rotten"]
    tagged = finegrain.load(runs["ner"]).predict(SENTENCES)
    assert [len(t["tags"]) for t in tagged] == [len(s.split()) for s in SENTENCES]


def test_prompt_run_resumes_exactly(tiny_model_dir, tmp_path):
    resumed_equals_straight(tiny_model_dir, tmp_path, copy.deepcopy(PROMPT))


def resumed_equals_straight(model_dir: Path, tmp_path: Path, sections: dict) -> None:
    """A run killed mid-training (a real SIGKILL) and resumed saves the adapter an uninterrupted run saves."""
    import serve_helpers

    rows = [{"text": texts[i % 3], "label": label} for i in range(40) for label, texts in SENTIMENT.items()]
    config = {
        "model": {"name": str(model_dir)}, "data": {"train": str(serve_helpers.write_jsonl(tmp_path / "data", rows)), "max_length": 16},
        "train": {"epochs": 2, "batch_size": 8, "threads": 1, "eval_every": 4, "checkpoint_every": 2},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", str(config_file), "--output", str(tmp_path / "straight")]) == 0
    env = {**os.environ, "FINEGRAIN_FAULT": "train_step:7", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "finegrain.cli", "train", str(config_file), "--output", str(tmp_path / "killed")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "metrics.json").exists()
    assert (tmp_path / "killed" / "checkpoint").is_dir()
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_instruct_run_trains_and_the_server_generates_with_its_prompt(tiny_model_dir, tmp_path, runs):
    generative_run_served(tiny_model_dir, tmp_path, runs["lora"], PROMPT["peft"])


def generative_run_served(model_dir: Path, tmp_path: Path, lora_run: Path, peft_section: dict) -> None:
    """An instruct run of the method trains (packed rows), predicts, and on a server beside a LoRA
    run generates as its predictor does, while the base answers bare."""
    import serve_helpers
    from finegrain.generation import generate
    from finegrain.serve.batching import Job
    from finegrain.serve.engine import Engine, GenerationWork
    from finegrain.serve.metrics import Metrics
    from finegrain.serve.models import ModelRegistry, base_id

    original = serve_helpers.train_task_run

    def with_method(*args, sections=None, **kwargs):
        return original(*args, sections={**(sections or {}), "peft": peft_section}, **kwargs)

    serve_helpers.train_task_run = with_method
    try:
        run = serve_helpers.train_instruct_run(model_dir, tmp_path / "chat")
    finally:
        serve_helpers.train_task_run = original
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    predictor = finegrain.load(run)
    question = "What is the plural of child?"
    assert predictor.predict([question])[0]["generated"] is not None
    registry = ModelRegistry([("lora", lora_run), ("chat", run)])
    registry.load()
    engine = Engine(registry, Metrics())
    base = base_id(str(model_dir))
    bare_model, tokenizer = finegrain.load_model(str(model_dir), progress=False)
    for name in ("chat", base, "chat"):
        served = engine.run(("generate", name), [Job(("generate", name), GenerationWork(question, name, 8))])[0]
        expected = generate(predictor.model.llama if name == "chat" else bare_model, tokenizer, question, max_new_tokens=8)
        assert served == expected


def test_server_holds_a_lora_run_and_a_prompt_run_on_one_base(runs):
    served_like_predictors(runs)


def served_like_predictors(runs: dict[str, Path]) -> None:
    """The server's engine, switching runs on one shared base, answers each run as `finegrain.load` does."""
    from finegrain.serve.batching import Job
    from finegrain.serve.engine import Engine
    from finegrain.serve.metrics import Metrics
    from finegrain.serve.models import ModelRegistry

    registry = ModelRegistry([(name, run_dir) for name, run_dir in runs.items()])
    registry.load()
    assert len(registry.bases) == 1
    engine = Engine(registry, Metrics())
    expected = {name: finegrain.load(run_dir).predict(TEXTS if name != "ner" else SENTENCES) for name, run_dir in runs.items()}
    for name in [*runs, *reversed(list(runs))]:  # switching back and forth on the shared base
        run = registry.runs[name]
        inputs = TEXTS if name != "ner" else SENTENCES
        items = run.task.encode(run.tokenizer, run.task.examples_from_inputs(inputs, run.config.data), run.config.data.max_length)
        served = engine.run(("task", name), [Job(("task", name), items[:2]), Job(("task", name), items[2:])])
        served = [p for job in served for p in job]
        for a, b in zip(served, expected[name], strict=True):
            if name == "ner":
                assert a["tags"] == b["tags"]
            else:
                assert a["label"] == b["label"]
                for label in a["probabilities"]:
                    assert abs(a["probabilities"][label] - b["probabilities"][label]) < 1e-5
