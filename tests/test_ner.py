"""Token classification on the tiny model: word/subword alignment, training through the Trainer,
bidirectional attention with padding, decoding, metrics, and PEFT TOKEN_CLS adapters that load in transformers."""

from __future__ import annotations

import copy
import json
import random
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from finegrain.checkpoint.load import load_model
from finegrain.config import DataConfig, HeadConfig, TrainConfig
from finegrain.data.conll import TokenExample
from finegrain.errors import FinegrainError
from finegrain.evaluate.entities import entity_metrics
from finegrain.peft import LoraConfig, apply_lora, lora_layers, save_adapter
from finegrain.tasks.tokens import IGNORE_INDEX, TokenClassificationTask, TokenClassifier
from finegrain.train.batching import AUTO_PIECE_BUDGET, micro_batches, piece_tokens
from finegrain.train.sampler import Draw
from finegrain.train.trainer import Trainer, predict_outputs

CITIES = ["Paris", "London", "Rome"]
PEOPLE = ["Anna Smith", "John", "the actors"]
FILLER = ["the", "film", "was", "good", "in", "and", "story", "."]


def sentences(n: int, seed: int = 0) -> list[TokenExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words, tags = [], []
        for _ in range(rng.randint(2, 7)):
            r = rng.random()
            kind = "LOC" if r < 0.2 else "PER" if r < 0.4 else None
            chunk = rng.choice(CITIES if kind == "LOC" else PEOPLE).split() if kind else [rng.choice(FILLER)]
            words += chunk
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(chunk) - 1) if kind else ["O"]
        out.append(TokenExample.from_words(words, tags, f"toy:{i + 1}"))
    return out


@pytest.fixture
def backbone_and_tokenizer(tiny_model_dir):
    llama, tokenizer = load_model(str(tiny_model_dir), progress=False)
    return llama.model, tokenizer


# --- encoding -------------------------------------------------------------------------------


def test_word_by_word_ids_are_the_ids_of_the_text(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    task = TokenClassificationTask(["LOC", "PER"])
    example = TokenExample.from_words(
        ["The", "capital", "of", "France", "is", "Paris", "."], ["O"] * 5 + ["B-LOC", "O"], "x:1"
    )
    item = task.encode(tokenizer, [example], 64)[0]
    assert item.input_ids == tokenizer.encode(example.text, add_special_tokens=False)
    # The first token of each word carries its label, the others are left out of the loss.
    labelled = [i for i, t in enumerate(item.targets) if t != IGNORE_INDEX]
    assert labelled == item.positions and len(labelled) == 7
    assert [task.tags[item.targets[p]] for p in item.positions] == example.tags
    paris = item.positions[5]
    assert tokenizer.decode(item.input_ids[paris : item.positions[6]]) == " Paris"

    last = TokenClassificationTask(["LOC", "PER"], subword="last").encode(tokenizer, [example], 64)[0]
    assert last.positions[5] == item.positions[6] - 1 and last.positions[-1] == len(last.input_ids) - 1


def test_text_without_spaces_and_truncation(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    task = TokenClassificationTask(["LOC"], scheme="BIOES")
    chinese = TokenExample.from_words(list("在北京"), ["O", "B-LOC", "I-LOC"], "x:1", char_level=True)
    item = task.encode(tokenizer, [chinese], 64)[0]
    assert item.input_ids == tokenizer.encode("在北京", add_special_tokens=False)  # no spaces put in
    assert [task.tags[item.targets[p]] for p in item.positions] == ["O", "B-LOC", "E-LOC"]  # converted to BIOES

    long = TokenExample.from_words(["good"] * 30 + ["Paris"], ["O"] * 30 + ["B-LOC"], "x:2")
    item = task.encode(tokenizer, [long], 16)[0]
    assert len(item.input_ids) == 16 and item.truncated_words > 0 and item.positions[-1] == -1
    probs = torch.full((1, 16, len(task.tags)), 1.0 / len(task.tags))
    prediction = task.decode(probs, [item])[0]
    assert prediction["tags"][-item.truncated_words :] == ["O"] * item.truncated_words
    assert prediction["truncated_words"] == item.truncated_words


def test_collate_pads_and_outputs_stack_across_batches(backbone_and_tokenizer):
    backbone, tokenizer = backbone_and_tokenizer
    task = TokenClassificationTask(["LOC", "PER"])
    examples = sentences(10)
    items = task.encode(tokenizer, examples, 48)
    batch = task.collate(items[:3], tokenizer.pad_token_id)
    T = max(len(i.input_ids) for i in items[:3])
    assert batch["input_ids"].shape == batch["targets"].shape == (3, T)
    assert (batch["targets"][0, len(items[0].input_ids) :] == IGNORE_INDEX).all()
    model = task.build_model(SimpleNamespace(model=backbone)).eval()
    # Batches of 4 have different lengths; the rows come back padded to one width and stacked.
    outputs = predict_outputs(model, task, items, tokenizer.pad_token_id, batch_size=4)
    assert outputs.shape == (10, 48, len(task.tags))
    alone = predict_outputs(model, task, items[:1], tokenizer.pad_token_id)
    assert_close(outputs[0], alone[0], atol=1e-5, rtol=1e-5)  # zeros beyond the example, whatever the batch


# --- training ------------------------------------------------------------------------------


def train_run(backbone, tokenizer, tmp_path, bidirectional: bool, layers=None, epochs: float = 3):
    backbone.config.causal = not bidirectional
    task = TokenClassificationTask(["LOC", "PER"])
    model = task.build_model(SimpleNamespace(model=backbone))
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", layers=layers, modules_to_save=["score"]))
    train, validation = sentences(96, seed=1), sentences(24, seed=2)
    train_items, val_items = task.encode(tokenizer, train, 32), task.encode(tokenizer, validation, 32)

    def score(predictions):
        return task.metrics(predictions, [e.tags for e in validation])

    config = TrainConfig(epochs=epochs, lr=1e-2, batch_size=16, threads=1, metric="f1", checkpoint_every=1000)
    trainer = Trainer(
        model, task, train_items, config, tmp_path, tokenizer.pad_token_id, val_items, score, progress=False
    )
    state = trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return task, model, trainer, state, log, val_items, validation


def test_training_through_the_trainer_learns_entities(backbone_and_tokenizer, tmp_path):
    backbone, tokenizer = backbone_and_tokenizer
    task, model, _, state, log, val_items, validation = train_run(backbone, tokenizer, tmp_path, bidirectional=False)
    losses = [r["train_loss"] for r in log if "train_loss" in r]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert state.best_validation["f1"] > 0.5  # a broken alignment or loss stays near 0

    predictions = task.decode(
        task.probabilities(predict_outputs(model, task, val_items, tokenizer.pad_token_id)), val_items
    )
    for example, prediction in zip(validation, predictions):
        assert len(prediction["tags"]) == len(example.words)
        for entity in prediction["entities"]:
            assert example.text[entity["start"] : entity["end"]] == entity["text"]
            first, end = entity["words"]
            assert entity["text"] == " ".join(example.words[first:end]) and 0 < entity["score"] <= 1
    metrics = task.metrics(predictions, [e.tags for e in validation])
    assert metrics["f1"] == entity_metrics([e.tags for e in validation], [p["tags"] for p in predictions])["f1"]
    assert set(metrics["errors"]) >= {"correct", "missed", "spurious"} and "strict" in metrics
    assert metrics["f1"] == metrics["strict"]["f1"]  # Viterbi decoding only writes valid sequences


def test_bidirectional_attention_masks_padding_and_sees_the_right_context(backbone_and_tokenizer, tmp_path):
    backbone, tokenizer = backbone_and_tokenizer
    task = TokenClassificationTask(["LOC", "PER"])
    model = task.build_model(SimpleNamespace(model=backbone)).eval()
    short = task.encode(tokenizer, [TokenExample.from_words(["good", "Paris"], None, "x:1")], 32)[0]
    longer = task.encode(tokenizer, sentences(1, seed=5), 32)[0]
    changed = task.encode(tokenizer, [TokenExample.from_words(["good", "Rome"], None, "x:1")], 32)[0]
    for causal in (True, False):
        backbone.config.causal = causal
        with torch.no_grad():
            alone = model(task.collate([short], tokenizer.pad_token_id))[0]
            padded = model(task.collate([short, longer], tokenizer.pad_token_id))[0]
            other = model(task.collate([changed], tokenizer.pad_token_id))[0]
        n = len(short.input_ids)
        assert_close(padded[:n], alone[:n], atol=1e-5, rtol=1e-5)  # padding never reaches real tokens
        assert (padded[n:] == 0).all()
        first_word_moves = not torch.allclose(alone[0], other[0], atol=1e-6)
        assert first_word_moves == (not causal)  # only without the causal mask does "good" see "Rome"


def test_bidirectional_training_with_the_frozen_prefix_cache(backbone_and_tokenizer, tmp_path):
    backbone, tokenizer = backbone_and_tokenizer
    task, model, trainer, state, log, val_items, _ = train_run(
        backbone, tokenizer, tmp_path, bidirectional=True, layers=[1], epochs=2
    )
    assert trainer.start_layer == 1 and state.best_validation["f1"] > 0.3
    # The cached lower-layer states (computed with the padding mask) give the outputs of a full pass.
    full = predict_outputs(model, task, val_items, tokenizer.pad_token_id, batch_size=8)
    cached = predict_outputs(model, task, val_items, tokenizer.pad_token_id, 8, trainer.validation_hidden, 1)
    assert_close(cached, full, atol=1e-5, rtol=1e-5)


# --- decoding, options, errors --------------------------------------------------------------


def test_viterbi_repairs_what_argmax_breaks(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    example = TokenExample.from_words(["good", "Anna", "Smith"], None, "x:1")
    results = {}
    for decoding in ("argmax", "viterbi"):
        task = TokenClassificationTask(["PER"], decoding=decoding)  # tags: O, B-PER, I-PER
        item = task.encode(tokenizer, [example], 32)[0]
        probs = torch.zeros(1, 32, 3)
        for position, row in zip(item.positions, ([0.9, 0.05, 0.05], [0.4, 0.2, 0.4], [0.1, 0.1, 0.8])):
            probs[0, position] = torch.tensor(row)
        results[decoding] = task.decode(probs, [item])[0]
    assert results["argmax"]["tags"] == ["O", "O", "I-PER"]  # an I after O: read leniently as an entity
    assert results["viterbi"]["tags"] == ["O", "B-PER", "I-PER"]
    assert [e["text"] for e in results["viterbi"]["entities"]] == ["Anna Smith"]
    assert results["viterbi"]["entities"][0]["start"] == 5 and results["viterbi"]["entities"][0]["end"] == 15


def test_options_and_errors(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    for kwargs, key in (
        ({"scheme": "IOB1"}, "head.scheme"),
        ({"scheme": "X"}, "head.scheme"),
        ({"subword": "middle"}, "head.subword"),
        ({"decoding": "beam"}, "head.decoding"),
    ):
        with pytest.raises(FinegrainError, match=key):
            TokenClassificationTask(["PER"], **kwargs)
    task = TokenClassificationTask(["LOC", "PER"], head=HeadConfig(class_weights="balanced", label_smoothing=0.1))
    items = task.encode(tokenizer, sentences(20), 32)
    task.set_class_weights(items)
    assert task.class_weights.shape == (5,) and task.class_weights[0] < task.class_weights[1]
    batch = task.collate(items[:4], tokenizer.pad_token_id)
    assert torch.isfinite(task.loss(torch.randn(4, 32, 5), batch))
    inputs = task.examples_from_inputs(["Anna met John, in Rome.", ["Anna", "Smith"]], DataConfig())
    assert inputs[0].words == ["Anna", "met", "John", ",", "in", "Rome", "."] and inputs[1].text == "Anna Smith"
    with pytest.raises(FinegrainError, match="input:1: empty text"):
        task.examples_from_inputs(["   "], DataConfig())
    with pytest.raises(FinegrainError, match="x:9: 2 words but 1 tags"):
        task.encode(tokenizer, [TokenExample(["a", "b"], ["O"], "x:9")], 8)


def test_the_loss_ignores_unlabelled_tokens(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    task = TokenClassificationTask(["LOC", "PER"])
    items = task.encode(tokenizer, sentences(4), 32)
    batch = task.collate(items, tokenizer.pad_token_id)
    logits = torch.randn(4, batch["input_ids"].shape[1], 5, requires_grad=True)
    task.loss(logits, batch).backward()
    ignored = batch["targets"] == IGNORE_INDEX
    assert logits.grad[ignored].abs().sum() == 0 and logits.grad[~ignored].abs().sum() > 0
    nothing = {"targets": torch.full((1, 3), IGNORE_INDEX)}
    assert task.loss(torch.randn(1, 3, 5, requires_grad=True), nothing).item() == 0.0


# --- PEFT TOKEN_CLS ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_transformers_and_peft_load_our_token_classification_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from finegrain.model.config import LlamaConfig
    from finegrain.model.llama import Llama

    hf_config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=5,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForTokenClassification(hf_config).eval()
    backbone = Llama(LlamaConfig.from_hf(hf_config.to_dict())).model
    backbone.load_state_dict(
        {k.removeprefix("model."): v for k, v in reference.state_dict().items() if k.startswith("model.")}
    )
    ours = TokenClassifier(backbone, 5).eval()
    assert set(ours.state_dict()) == set(reference.state_dict())  # the same layout, name for name
    apply_lora(ours, LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), modules_to_save=["score"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)
        ours.score.weight.copy_(torch.randn(5, 64, generator=generator))
        ours.score.bias.copy_(torch.randn(5, generator=generator))
    config = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), modules_to_save=["score"])
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny-llama", task_type="TOKEN_CLS")

    fresh = transformers.AutoModelForTokenClassification.from_config(hf_config)
    fresh.load_state_dict({**reference.state_dict(), "score.weight": torch.zeros(5, 64), "score.bias": torch.zeros(5)})
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours({"input_ids": ids, "lengths": mask.sum(1)})
    real = mask.bool()
    assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_head_dropout_drops_hidden_states_in_training_only(backbone_and_tokenizer, tmp_path):
    from finegrain.config import RunConfig, load_config

    backbone, tokenizer = backbone_and_tokenizer
    config = RunConfig(task="ner")
    config.head.dropout = 0.5
    task = TokenClassificationTask.from_config(config, ["LOC", "PER"])
    model = task.build_model(SimpleNamespace(model=backbone))
    plain = TokenClassificationTask.from_config(RunConfig(task="ner"), ["LOC", "PER"]).build_model(
        SimpleNamespace(model=backbone)
    )
    plain.load_state_dict(model.state_dict())
    batch = task.collate(task.encode(tokenizer, sentences(4, seed=5), 32), tokenizer.pad_token_id)
    with torch.no_grad():
        expected = plain.eval()(batch)
        assert_close(model.eval()(batch), expected)  # evaluation and prediction: no dropout
        torch.manual_seed(0)
        trained = model.train()(batch)
        assert_close(plain.train()(batch), expected)  # the default (0.0) changes nothing
    real = torch.arange(trained.shape[1])[None, :] < batch["lengths"][:, None]
    dropped = (trained[real] - expected[real]).abs().amax(-1) > 1e-4
    assert dropped.all()  # half of each of 64 features dropped: every labelled row changes

    path = tmp_path / "run.yaml"
    path.write_text("task: ner\ndata: {dataset: wnut16}\nhead: {dropout: 1.0}\n")
    with pytest.raises(FinegrainError, match="'head.dropout' must be in \\[0, 1\\)"):
        load_config(path)


# --- end to end through the CLI ----------------------------------------------------------------


def test_cli_train_evaluate_predict_ner(tiny_model_dir, tmp_path, capsys):
    import yaml

    from finegrain.cli import main
    from finegrain.data.conll import write_token_examples

    data = tmp_path / "train.jsonl"
    write_token_examples(data, sentences(120, seed=3))
    test = tmp_path / "test.conll"
    test.write_text("".join("".join(f"{w}\t{t}\n" for w, t in zip(e.words, e.tags)) + "\n" for e in sentences(20, 4)))
    config = {
        "task": "ner",
        "model": {"name": str(tiny_model_dir), "bidirectional": True},
        "data": {"train": str(data), "test": str(test), "max_length": 32, "split": [0.8, 0.2, 0.0]},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [1]},
        "train": {"epochs": 3, "lr": 1e-2, "batch_size": 16, "threads": 1, "checkpoint_every": 1000, "metric": "f1"},
    }  # a metric named: checked on four validation sentences before training
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["train", str(tmp_path / "run.yaml"), "--output", str(run_dir)]) == 0
    assert "micro avg" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["num_examples"] == 20 and metrics["test"]["f1"] > 0.3
    assert json.loads((run_dir / "labels.json").read_text()) == ["LOC", "PER"]
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "TOKEN_CLS" and adapter["modules_to_save"] == ["score"]

    assert main(["evaluate", str(run_dir), "--data", str(test)]) == 0
    assert "micro avg" in capsys.readouterr().out

    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "Anna Smith was in Paris."}) + "\n")
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(run_dir), "--input", str(texts), "--output", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["words"] == ["Anna", "Smith", "was", "in", "Paris", "."] and len(row["tags"]) == 6
    for entity in row["entities"]:
        assert row["text"][entity["start"] : entity["end"]] == entity["text"]

    import finegrain

    predictions = finegrain.load(run_dir).predict(["John was in Rome", ["Anna", "Smith"]])
    assert [len(p["tags"]) for p in predictions] == [4, 2]


def test_micro_batches_are_the_fewest_equal_pieces_within_the_budget():
    assert micro_batches(list(range(16)), [26] * 16, None) == [list(range(16))]
    assert micro_batches(list(range(16)), [10] * 16, 320) == [list(range(16))]
    assert micro_batches(list(range(16)), [26] * 16, 320) == [list(range(8)), list(range(8, 16))]  # not 12 + 4
    assert [len(p) for p in micro_batches(list(range(16)), [64] * 16, 320)] == [4, 4, 4, 4]
    assert micro_batches([0, 1, 2, 3, 4], [1, 2, 3, 4, 100], 250) == [[0, 1, 2], [3, 4]]
    assert micro_batches([0, 1], [500, 500], 320) == [[0], [1]]  # a row longer than the budget runs alone


def test_auto_pieces_hold_a_batch_of_16_by_64_tokens_through_20_layers_of_the_default_model():
    assert piece_tokens("auto", 576, 1536, 20) == 1024  # examples/rotten_tomatoes_robust.yaml: its batches whole
    assert piece_tokens("auto", 576, 1536, 30) == 682  # the default model, every layer trained
    assert piece_tokens("auto", 576, 1536, 6) == 3413  # the main job: the top 6 of 20 layers
    assert piece_tokens("auto", 2048, 5632, 22) == 256  # TinyLlama-1.1B's shape, every layer trained
    assert piece_tokens("auto", 4096, 11008, 32) == 89  # LLaMA-7B
    assert piece_tokens("auto", 576, 1536, 0) is None  # the head alone: whole batches
    assert piece_tokens(320, 576, 1536, 30) == 320 and piece_tokens(None, 576, 1536, 30) is None


def test_the_trainer_sizes_auto_pieces_by_the_layers_that_train(backbone_and_tokenizer, tmp_path):
    backbone, tokenizer = backbone_and_tokenizer
    task = TokenClassificationTask(["LOC", "PER"])
    items = task.encode(tokenizer, sentences(4, seed=3), 32)
    shape = backbone.config
    width = shape.hidden_size + shape.intermediate_size
    for layers, trained in ((None, shape.num_layers), ([shape.num_layers - 1], 1)):
        model = task.build_model(SimpleNamespace(model=copy.deepcopy(backbone)))
        apply_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", layers=layers))
        trainer = Trainer(model, task, items, TrainConfig(threads=1), tmp_path / str(trained), tokenizer.pad_token_id,
                          progress=False)
        assert trainer.piece_tokens == AUTO_PIECE_BUDGET // (trained * width)
        explicit = Trainer(model, task, items, TrainConfig(threads=1, micro_batch_tokens=40), tmp_path / "explicit",
                           tokenizer.pad_token_id, progress=False)
        assert explicit.piece_tokens == 40


def test_micro_batches_give_the_gradient_of_the_whole_batch(backbone_and_tokenizer, tmp_path):
    # A token-level mean with class weights: each piece's mean must be weighted by its labelled
    # tokens' weights, not by its examples, for the pieces to add up to the batch's gradient.
    backbone, tokenizer = backbone_and_tokenizer
    task = TokenClassificationTask(["LOC", "PER"])
    task.class_weights = torch.linspace(0.5, 2.0, len(task.tags))
    model = task.build_model(SimpleNamespace(model=backbone)).eval()  # eval: no dropout
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", modules_to_save=["score"]))
    items = task.encode(tokenizer, sentences(12, seed=3), 32)
    batch = sorted(range(12), key=lambda i: len(items[i].input_ids))
    assert len(micro_batches(batch, [len(i.input_ids) for i in items], 40)) >= 3
    grads = {}
    for budget in (None, 40):
        config = TrainConfig(batch_size=12, micro_batch_tokens=budget, threads=1)
        trainer = Trainer(model, task, items, config, tmp_path / str(budget), tokenizer.pad_token_id, progress=False)
        trainer.optimizer.step = lambda: grads.setdefault(budget, {n: p.grad.clone() for n, p in trainer.trainable.items()})
        trainer._step([Draw(0, batch)])
    for name, grad in grads[None].items():
        assert_close(grads[40][name], grad, atol=1e-6, rtol=1e-4, msg=name)
