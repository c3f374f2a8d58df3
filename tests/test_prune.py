"""`finegrain prune` and `model.num_layers: auto` on a tiny 4-layer LLaMA: the importance scores
(an identity layer, a silenced KV group and a silenced FFN channel score 0, the lowest), the
pruned shapes, the pruned model against the unpruned one with the same parts silenced, the
pruned backbone in transformers, the command end to end with a distilled recovery, and the
one-line errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import finegrain
from finegrain.checkpoint.load import load_model
from finegrain.checkpoint.save import save_pretrained
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.export import merged_model
from finegrain.inference import predict_outputs
from finegrain.model.config import LlamaConfig
from finegrain.model.llama import Llama
from finegrain.prune import group_scores, layer_scores, prune_run, removed, taylor_scores
from finegrain.rundir import read_config
from finegrain.tasks import task_class
from finegrain.train.distill import soft_loss
from finegrain.train.recipe import Recipe

from conftest import tiny_tokenizer

TEXTS = ["good film 3", "bad film 1 bad", "good", "the movie was bad and the story was good"]


def write_texts(path, n: int = 64):
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i % 5}", "label": "fresh" if i % 2 else "rotten"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random LLaMA of 4 layers (hidden 64, 4 heads in 2 KV groups, FFN 128) with the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
        num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("prune-model") / "tiny-4"
    save_pretrained(Llama(config).eval(), tokenizer, directory)
    return directory


def train(model_dir, data, output, *extra: str) -> Path:
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--set", "train.epochs=1",
                 "--batch-size", "8", "--set", "data.max_length=16", "--set", "train.threads=1", "--set", "train.lr=1e-2",
                 "--set", "lora.layers=null", "--set", "lora.targets=all-linear", "--set", "head.tfidf_mix=0",
                 "--set", "train.recipe=off", *extra]) == 0
    return Path(output)


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-run")
    return train(model_dir, write_texts(root / "data.jsonl"), root / "run")


def validation_items(run_dir):
    config = read_config(run_dir)
    model, tokenizer, task = merged_model(run_dir, config)
    splits = task_class(config.task).load_splits(config.data)
    examples = splits.validation + splits.test
    return model, task, task.encode(tokenizer, examples, 16), tokenizer.pad_token_id


def test_an_identity_layer_scores_zero_and_lowest(run):
    model, task, items, pad_id = validation_items(run)
    with torch.no_grad():  # layer 2's attention and FFN write nothing into the residual stream: an identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = layer_scores(model, task, items, pad_id, progress=False)
    assert len(scores) == 4
    assert scores[2] == pytest.approx(0, abs=1e-7)
    assert all(s > 1e-6 for i, s in enumerate(scores) if i != 2)
    # The same as running the model with the layer taken out of the list (the first and the top one here).
    layers = model.model.layers
    with torch.no_grad():
        reference = predict_outputs(model, task, items, pad_id)
        for i in (0, 3):
            model.model.layers = torch.nn.ModuleList(layer for j, layer in enumerate(layers) if j != i)
            kl = soft_loss(predict_outputs(model, task, items, pad_id), reference, 1.0)
            model.model.layers = layers
            assert scores[i] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)


def test_silenced_heads_and_channels_score_zero_and_lowest(run):
    model, task, items, pad_id = validation_items(run)
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    with torch.no_grad():  # KV group 1 (query heads 2 and 3) and FFN channel 5 of layer 1 reach nothing
        attention.o_proj.weight[:, 2 * 16:4 * 16] = 0
        mlp.down_proj.weight[:, 5] = 0
    grads_on = [p.requires_grad for p in model.parameters()]
    heads, channels = taylor_scores(model, task, items, pad_id, progress=False)
    assert heads.shape == (4, 4) and channels.shape == (4, 128)
    assert heads[1, 2:].abs().max() == 0 and heads[1, :2].min() > 0
    assert channels[1, 5] == 0 and channels[1].argmin() == 5 and (channels[1] > 0).sum() == 127
    groups = group_scores(heads, 2)
    assert torch.equal(groups[:, 0], heads[:, 0] + heads[:, 1]) and groups[1].argmin() == 1
    assert [p.requires_grad for p in model.parameters()] == grads_on  # the model is left as it was


def test_removed_rounds_and_keeps_one():
    assert [removed(f, 4) for f in (0, 0.1, 0.125, 0.5, 0.9, 0.99)] == [0, 0, 1, 2, 3, 3]


def silenced_reference(run_dir, report, texts):
    """The unpruned model with the pruned parts silenced: the dropped layers skipped, the removed KV
    groups' o_proj columns and the removed channels' down_proj columns zeroed."""
    config = read_config(run_dir)
    model, tokenizer, task = merged_model(run_dir, config)
    kept_layers = report["layers"]["kept"]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in kept_layers)
    with torch.no_grad():
        for layer, groups, channels in zip(model.model.layers, report["kv_groups"]["per_layer"],
                                           report["ffn_channels"]["per_layer"]):
            for g in {0, 1} - set(groups):
                layer.self_attn.o_proj.weight[:, g * 32:(g + 1) * 32] = 0  # its 2 query heads of 16
            for c in set(range(128)) - set(channels):
                layer.mlp.down_proj.weight[:, c] = 0
    items = task.encode(tokenizer, task.examples_from_inputs(texts, config.data), 16)
    with torch.no_grad():
        return model(task.collate(items, tokenizer.pad_token_id))


def test_pruned_run_is_the_unpruned_one_with_those_parts_silenced(run, tmp_path):
    out = tmp_path / "pruned"
    report = prune_run(run, out, layers=2, heads=0.5, ffn=0.5, recover_epochs=0, progress=False)
    hf = json.loads((out / "pruned" / "config.json").read_text())
    assert (hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"],
            hf["intermediate_size"], hf["hidden_size"]) == (2, 2, 1, 16, 64, 64)
    assert len(report["layers"]["kept"]) == 2 and report["kv_groups"]["kept"] == 1 and report["ffn_channels"]["kept"] == 64
    assert report["pruned"]["parameters"]["layers"] < report["before"]["parameters"]["layers"] / 3
    llama = load_model(str(out / "pruned"), progress=False)[0]
    attention, mlp = llama.model.layers[0].self_attn, llama.model.layers[0].mlp
    assert attention.q_proj.weight.shape == (32, 64) and attention.k_proj.weight.shape == (16, 64)
    assert attention.o_proj.weight.shape == (64, 32) and mlp.gate_proj.weight.shape == (64, 64)
    assert mlp.down_proj.weight.shape == (64, 64)
    # An ordinary finished run: finegrain.load predicts with the pruned weights.
    predictor = finegrain.load(out)
    items = predictor.task.encode(predictor.tokenizer, predictor.task.examples_from_inputs(TEXTS, predictor.config.data), 16)
    with torch.no_grad():
        ours = predictor.model(predictor.task.collate(items, predictor.tokenizer.pad_token_id))
    torch.testing.assert_close(ours, silenced_reference(run, report, TEXTS), atol=1e-5, rtol=1e-5)
    assert (out / "metrics.json").is_file() and "accuracy" in json.loads((out / "metrics.json").read_text())["test"]


def test_transformers_loads_the_pruned_backbone_with_the_same_hidden_states(run, tmp_path):
    import transformers

    out = tmp_path / "pruned"
    prune_run(run, out, layers=3, heads=0.5, ffn=0.25, recover_epochs=0, progress=False)
    ours, tokenizer = load_model(str(out / "pruned"), progress=False)
    hf = transformers.LlamaModel.from_pretrained(out / "pruned").eval()
    assert hf.config.num_attention_heads == 2 and hf.config.intermediate_size == 96 and hf.config.num_hidden_layers == 3
    ids = torch.tensor([tokenizer.encode("the movie was good and the story was bad")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).last_hidden_state, ours.model(ids), atol=1e-5, rtol=1e-5)
        causal = transformers.LlamaForCausalLM.from_pretrained(out / "model").eval()
        torch.testing.assert_close(causal(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    # `finegrain export` writes the pruned run as LlamaForSequenceClassification with the run's logits.
    exported = tmp_path / "hf"
    assert main(["export", str(out), "--format", "hf", "--output", str(exported)]) == 0
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(exported).eval()
    predictor = finegrain.load(out)
    for text in TEXTS:
        item = predictor.task.encode(predictor.tokenizer, predictor.task.examples_from_inputs([text], predictor.config.data), 16)[0]
        with torch.no_grad():
            run_logits = predictor.model(predictor.task.collate([item], predictor.tokenizer.pad_token_id))[0]
            torch.testing.assert_close(classifier(torch.tensor([item.input_ids])).logits[0], run_logits, atol=1e-5, rtol=1e-5)


def test_prune_command_end_to_end_with_a_distilled_recovery(run, tmp_path, capsys):
    out = tmp_path / "pruned"
    data = tmp_path / "eval.jsonl"
    write_texts(data, 12)
    assert main(["prune", str(run), "--layers", "auto", "--heads", "0.5", "--ffn", "0.25", "--recover-epochs", "1",
                 "--distill", "--set", "train.lr=1e-3", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KV groups per layer" in printed and "decoder parameters" in printed and "wrote" in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["peft"]["method"] == "full" and config["distill"]["teacher"] == str(run.resolve())
    assert config["model"]["name"] == str((out / "pruned").resolve()) and config["train"]["lr"] == 1e-3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] > 0 and "accuracy" in metrics["test"]
    report = json.loads((out / "pruning.json").read_text())
    assert 1 <= len(report["layers"]["kept"]) <= 4 and report["test"] == metrics["test"]
    assert main(["evaluate", str(out), "--data", str(data)]) == 0
    assert len(finegrain.load(out).predict(TEXTS)) == len(TEXTS)


@pytest.mark.parametrize("args, message", [
    (["--heads", "1.5"], "--heads: 1.5 is not a fraction in [0, 1)"),
    (["--ffn", "-0.1"], "--ffn: -0.1 is not a fraction in [0, 1)"),
    (["--layers", "9"], "--layers: 9 is more than the run's 4 layers"),
    (["--layers", "most"], "--layers: 'most' is neither a number"),
    ([], "nothing to prune"),
])
def test_prune_errors_are_one_line(run, tmp_path, capsys, args, message):
    assert main(["prune", str(run), *args, "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_prune_refuses_a_task_it_does_not_score(tmp_path, capsys):
    run_dir = tmp_path / "regression"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"task": "regression", "data": {"train": "x.jsonl"}}))
    assert main(["prune", str(run_dir), "--ffn", "0.5", "--output", str(tmp_path / "out")]) != 0
    assert "a regression run; finegrain prune scores and recovers classification runs" in capsys.readouterr().err


def test_num_layers_auto_writes_the_probes_cut_into_config_yaml(model_dir, tmp_path, capsys):
    data = write_texts(tmp_path / "data.jsonl")
    out = tmp_path / "auto"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--set", "train.epochs=1",
                 "--batch-size", "8", "--set", "data.max_length=16", "--set", "train.threads=1", "--set", "train.lr=1e-2",
                 "--set", "head.tfidf_mix=0", "--set", "train.recipe=off", "--set", "model.num_layers=auto"]) == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load((out / "config.yaml").read_text())
    cut = config["model"]["num_layers"]
    assert isinstance(cut, int) and 1 <= cut <= 4
    assert config["lora"]["layers"] == list(range(-min(cut, 6), 0))  # unset: chosen with the cut
    assert "model.num_layers = " in printed and "linear probe" in printed
    assert "# finegrain train chose these keys" in (out / "config.yaml").read_text()
    assert config["data"]["max_length"] == 16 and config["train"]["lr"] == 0.01  # recipe off: nothing else chosen
    assert read_config(out).model.num_layers == cut


def test_num_layers_auto_leaves_given_adapted_layers(model_dir, tmp_path):
    data = write_texts(tmp_path / "data.jsonl")
    config = load_config(None, [f"model.name={model_dir}", f"data.train={data}", "model.num_layers=auto",
                                "train.recipe=off", "lora.layers=[-1]"])
    from finegrain.train.recipe import probe_scope

    assert probe_scope(config) == {"model.num_layers"}
    config = load_config(None, [f"model.name={model_dir}", f"data.train={data}", "model.num_layers=auto", "train.recipe=off"])
    assert probe_scope(config) == {"model.num_layers", "lora.layers"}
    config = load_config(None, [f"model.name={model_dir}", f"data.train={data}", "model.num_layers=auto"])
    assert probe_scope(config) is None and Recipe(config, config.explicit).unset("model.num_layers")


@pytest.mark.parametrize("overrides, message", [
    (["task=ner", "data.dataset=wnut16", "model.num_layers=auto"], "'model.num_layers' must be a number for this task, not auto"),
    (["model.num_layers=most"], "'model.num_layers' must be a number of layers (at least 1), auto"),
    (["model.num_layers=0"], "'model.num_layers' must be a number of layers (at least 1), auto"),
    (["lora.layers=some"], "'lora.layers' must be a list of layer indices, auto"),
])
def test_num_layers_auto_errors(overrides, message):
    with pytest.raises(FinegrainError, match="^--set .*: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["data.train=x.jsonl", *overrides])
