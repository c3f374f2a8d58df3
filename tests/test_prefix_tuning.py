"""peft.method: prefix (prefix tuning): learned keys and values in each adapted layer's attention,
checked against PEFT's PREFIX_TUNING on the tiny random model both ways (plain and through the
reparameterising MLP), through the backbone's shifts (padding, the rows shortcut, token-level
heads, a bidirectional decoder), the frozen-prefix cache for top layers only, and end to end: CLI
training for classification and NER, exact resume, `finegrain.load`, and serving beside a LoRA run."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import finegrain
from finegrain.errors import FinegrainError
from finegrain.model import ops
from finegrain.model.backbone import hidden_states
from finegrain.peft import METHODS, adapter_layers, inject, load_adapter, merge_adapters, read_adapter, save_adapter, set_adapter
from finegrain.peft.prefix import PrefixConfig, PrefixEncoder
from finegrain.tasks.classification import SequenceClassifier
from finegrain.train.prefix_cache import lowest_trainable_layer
from test_prompt_tuning import (
    BATCH, ENTITIES, FILLER, IDS, SENTENCES, SENTIMENT, TEXTS, hf_classifier, hf_tagger, ours_of, perturb,  # noqa: F401
)
from serve_helpers import train_ner_run, train_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
@pytest.mark.parametrize("head", ["classifier", "tagger"])
def test_saved_prefix_gives_peft_the_same_outputs(hf_classifier, hf_tagger, tmp_path, head, projection):
    hf = hf_classifier if head == "classifier" else hf_tagger
    model = ours_of(hf)
    config = PrefixConfig(num_virtual_tokens=5, prefix_projection=projection, encoder_hidden_size=16, modules_to_save=["score"])
    inject(model, config)
    perturb(model)
    ids = IDS.clone()
    ids[1, 5:] = 0  # PEFT passes input_ids with prefix tuning: the classifier finds the last real token
    batch = {"input_ids": ids, "lengths": torch.tensor([7, 5])}
    with torch.no_grad():
        ours = model(batch)
    save_adapter(model, config, tmp_path, "tiny", task_type="SEQ_CLS" if head == "classifier" else "TOKEN_CLS")
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (5, 2 * 2 * 32)  # P x (layers * (k, v) * nkv * head_dim)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (raw["peft_type"], raw["num_layers"], raw["token_dim"], raw["num_attention_heads"]) == ("PREFIX_TUNING", 2, 32, 2)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=(ids != 0).long()).logits
    if head == "tagger":
        ours, theirs = ours[:, :5], theirs[:, :5]  # finegrain's head gives 0 at padding
    assert_close(ours, theirs)
    again = ours_of(hf)
    load_adapter(again, tmp_path)  # the table alone, even for a prefix trained through the MLP
    with torch.no_grad():
        assert_close(again(batch)[:, :5] if head == "tagger" else again(batch), ours)


def test_a_peft_prefix_adapter_loads_and_answers_as_in_peft(hf_classifier, tmp_path):
    torch.manual_seed(3)
    config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8)
    peft_model = peft.get_peft_model(copy.deepcopy(hf_classifier), config)
    perturb(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf_classifier), tmp_path).eval()
    model = ours_of(hf_classifier)
    loaded = load_adapter(model, tmp_path)
    assert isinstance(loaded, PrefixConfig) and loaded.from_file and loaded.layers is None
    with torch.no_grad():
        assert_close(model(BATCH), reference(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits)


def test_padding_rows_and_a_bidirectional_decoder_see_each_row_as_alone(hf_classifier, hf_tagger):
    for hf, causal in ((hf_classifier, True), (hf_tagger, True), (hf_tagger, False)):
        model = ours_of(hf)
        model.model.config.causal = causal
        inject(model, PrefixConfig(num_virtual_tokens=3, modules_to_save=["score"]))
        perturb(model)
        ids = IDS.clone()
        ids[1, 4:] = 0
        with torch.no_grad():
            both = model({"input_ids": ids, "lengths": torch.tensor([7, 4])})
            alone = model({"input_ids": ids[1:, :4], "lengths": torch.tensor([4])})
        assert_close(both[1:, :4] if both.dim() == 3 else both[1:], alone)


def test_a_prefix_in_top_layers_lets_the_cache_run_the_layers_below_once(tiny_model):
    model = SequenceClassifier(tiny_model.model, 2).eval()
    config = PrefixConfig(num_virtual_tokens=4, layers=[1], modules_to_save=["score"])
    inject(model, config)
    perturb(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["model.prefix_encoder.embedding.weight", "score.weight"]
    assert lowest_trainable_layer(model, 2) == 1
    batch = {"input_ids": IDS, "lengths": torch.tensor([7, 5])}
    with torch.no_grad():
        cached = hidden_states(model.model, batch, end_layer=1)  # what train.prefix_cache keeps
        assert_close(model({**batch, "hidden": cached}, start_layer=1), model(batch))
    raw = config.to_peft()
    assert raw["layers_to_transform"] == [1] and raw["num_layers"] == 2  # PEFT reads all-layer prefixes only


def test_the_prefix_takes_the_pytorch_path_the_same_attention_as_explicit_keys():
    B, T, P, nh, nkv, hd = 2, 5, 3, 4, 2, 8
    q, k, v = torch.randn(B, T, nh * hd), torch.randn(B, T, nkv * hd), torch.randn(B, T, nkv * hd)
    angles = torch.arange(T)[:, None] * torch.rand(hd // 2)
    cos = torch.cat((angles.cos(), angles.cos()), -1)[None, None].expand(B, 1, T, hd)
    sin = torch.cat((-angles.sin(), angles.sin()), -1)[None, None].expand(B, 1, T, hd)
    prefix = (torch.randn(1, nkv, P, hd), torch.randn(1, nkv, P, hd))
    ours = ops.rope_attention(q, k, v, cos, sin, nh, nkv, prefix=prefix)
    qh = ops.apply_rope(q.view(B, T, nh, hd).transpose(1, 2), cos, sin)
    kh = ops.apply_rope(k.view(B, T, nkv, hd).transpose(1, 2), cos, sin)
    keys = torch.cat((prefix[0].expand(B, -1, -1, -1), kh), 2).repeat_interleave(nh // nkv, 1)
    values = torch.cat((prefix[1].expand(B, -1, -1, -1), v.view(B, T, nkv, hd).transpose(1, 2)), 2).repeat_interleave(nh // nkv, 1)
    scores = qh @ keys.transpose(-1, -2) / hd**0.5
    allowed = torch.ones(T, P + T, dtype=torch.bool).tril(P)
    expected = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values).transpose(1, 2).reshape(B, T, nh * hd)
    assert_close(ours, expected)


def test_named_prefixes_switch_and_merging_is_refused(tiny_model):
    decoder = tiny_model.model.eval()
    with torch.no_grad():
        bare = hidden_states(decoder, BATCH)
    inject(tiny_model.model, PrefixConfig(num_virtual_tokens=2), "a")
    inject(tiny_model.model, PrefixConfig(num_virtual_tokens=3, layers=[0]), "b")
    layers = list(adapter_layers(tiny_model.model).values())
    assert [type(layer) for layer in layers] == [PrefixEncoder]
    outputs = {}
    for name in ("a", "b", None, "b"):
        set_adapter(layers, name)
        with torch.no_grad():
            outputs.setdefault(name, []).append(hidden_states(decoder, BATCH))
    assert_close(outputs[None][0], bare)
    assert_close(outputs["b"][0], outputs["b"][1])
    assert not torch.allclose(outputs["a"][0], outputs["b"][0])
    assert METHODS["prefix"].mergeable is False
    with pytest.raises(FinegrainError, match="prefix: a prefix cannot be merged"):
        merge_adapters(tiny_model.model)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
def test_a_peft_prefix_generates_as_in_peft(tmp_path, projection):
    from test_prompt_tuning import generates_as_in_peft

    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=8)
    generates_as_in_peft(tmp_path, config)


def test_left_padded_generation_answers_each_prompt_as_alone(tiny_model_dir):
    from test_prompt_tuning import generation_is_batch_independent

    generation_is_batch_independent(tiny_model_dir, PrefixConfig(num_virtual_tokens=3))


def test_bad_prefix_files_and_options_are_one_line_errors(tiny_model, tmp_path):
    with pytest.raises(FinegrainError, match="peft.encoder_hidden_size: must be a positive integer"):
        PrefixConfig(encoder_hidden_size=0)
    with pytest.raises(FinegrainError, match=r"peft.layers: \[5\] not in the model"):
        inject(copy.deepcopy(tiny_model.model), PrefixConfig(layers=[5]))
    model, config = SequenceClassifier(tiny_model.model, 2), PrefixConfig(num_virtual_tokens=2, modules_to_save=["score"])
    inject(model, config)
    save_adapter(model, config, tmp_path, "tiny")
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "num_virtual_tokens": 3}))
    with pytest.raises(FinegrainError, match="'prompt_embeddings' has shape .* does not fit num_virtual_tokens=3"):
        read_adapter(tmp_path)


# ---------------------------------------------------------------------------------------------- end to end

PREFIX = {"peft": {"method": "prefix", "num_virtual_tokens": 4}, "train": {"lr": 1e-2}}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    import serve_helpers

    root = tmp_path_factory.mktemp("prefix_runs")
    original = serve_helpers.train_task_run

    def with_prefix(*args, sections=None, **kwargs):
        return original(*args, sections={**(sections or {}), "peft": {**PREFIX["peft"], "prefix_projection": True}}, **kwargs)

    serve_helpers.train_task_run = with_prefix
    try:
        ner = train_ner_run(tiny_model_dir, root / "ner", ENTITIES, FILLER)
    finally:
        serve_helpers.train_task_run = original
    return {
        "lora": train_run(tiny_model_dir, root / "lora", SENTIMENT),
        # a prefix in the top layer only: the cache runs layer 0 once
        "prefix": train_run(tiny_model_dir, root / "prefix", SENTIMENT, seed=1, sections={**PREFIX, "peft": {**PREFIX["peft"], "layers": [-1]}}),
        "ner": ner,
    }


def test_prefix_runs_train_save_and_predict(runs):
    metrics = json.loads((runs["prefix"] / "metrics.json").read_text())
    assert metrics["train"]["frozen_prefix_layers"] == 1  # only the top layer has a prefix
    assert json.loads((runs["prefix"] / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    predictions = finegrain.load(runs["prefix"]).predict(TEXTS)
    assert [p["label"] for p in predictions] == ["fresh", "rotten", "fresh", "rotten"]
    raw = json.loads((runs["ner"] / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "PREFIX_TUNING" and raw["prefix_projection"] is True
    tagged = finegrain.load(runs["ner"]).predict(SENTENCES)
    assert [len(t["tags"]) for t in tagged] == [len(s.split()) for s in SENTENCES]


def test_prefix_run_resumes_exactly(tiny_model_dir, tmp_path):
    from test_prompt_tuning import resumed_equals_straight

    resumed_equals_straight(tiny_model_dir, tmp_path, {**copy.deepcopy(PREFIX), "peft": {**PREFIX["peft"], "prefix_projection": True}})


def test_instruct_run_trains_and_the_server_generates_with_its_prefix(tiny_model_dir, tmp_path, runs):
    from test_prompt_tuning import generative_run_served

    generative_run_served(tiny_model_dir, tmp_path, runs["lora"], {**PREFIX["peft"], "prefix_projection": True})


def test_server_holds_a_lora_run_and_a_prefix_run_on_one_base(runs):
    from test_prompt_tuning import served_like_predictors

    served_like_predictors(runs)
