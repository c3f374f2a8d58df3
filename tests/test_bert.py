"""The BERT encoder against transformers' BertModel (a tiny random config saved by transformers),
its checkpoint and tokenizer loading, and the tasks and methods on it."""

import json
import pickle

import pytest
import torch
import transformers
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

import finegrain
import finegrain.run
from finegrain.checkpoint.hf import load_hf_dir
from finegrain.checkpoint.load import build_model, is_encoder, load_model
from finegrain.cli import main
from finegrain.config import RunConfig, from_dict
from finegrain.errors import FinegrainError
from finegrain.model.backbone import hidden_states
from finegrain.model.bert import Bert, BertConfig, hf_state_dict, state_dict_from_hf
from finegrain.peft import inject, method_config
from finegrain.tasks.classification import SequenceClassifier
from finegrain.tasks.tokens import TokenClassificationTask

WORDS = ["the", "film", "was", "good", "bad", "great", "dull", "paris", "anna", "went", "to", "saw", "berlin", "tom",
         "un", "##believ", "##able", "a", ".", ",", "!", "cast", "story", "fine"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_hf_config(**overrides) -> transformers.BertConfig:
    values = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    return transformers.BertConfig(**{**values, **overrides})


def random_reference(config: transformers.BertConfig, cls=transformers.BertModel) -> torch.nn.Module:
    """A transformers BERT in eval mode whose matrices, biases and norms are far from their init (seed 0)."""
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model


def write_tokenizer(directory) -> None:
    """A WordPiece tokenizer.json and tokenizer_config.json as a BERT model directory holds them."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    backend.decoder = decoders.WordPiece()
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
              "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": 64}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random transformers BertModel saved with its WordPiece tokenizer, as `--model` takes it."""
    directory = tmp_path_factory.mktemp("bert") / "tiny-bert"
    random_reference(tiny_hf_config()).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def padded_batch():
    ids = torch.tensor([[2, 5, 6, 7, 8, 19, 3], [2, 9, 10, 3, 0, 0, 0], [2, 18, 19, 20, 21, 7, 3]])
    lengths = torch.tensor([7, 4, 7])
    return ids, lengths, (torch.arange(7)[None, :] < lengths[:, None]).long()


def test_hidden_states_equal_transformers(bert_dir):
    reference = transformers.BertModel.from_pretrained(bert_dir).eval()
    model, _ = load_model(bert_dir, progress=False)
    assert isinstance(model, Bert) and model.config.causal is False
    ids, lengths, mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = hidden_states(model.model, {"input_ids": ids, "lengths": lengths})  # the backbone contract
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_activations_equal_transformers(tmp_path, act):
    reference = random_reference(tiny_hf_config(hidden_act=act))
    model = build_model(BertConfig.from_hf(reference.config.to_dict()), reference.state_dict())
    ids, _, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids, mask)[mask.bool()],
                                   reference(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()],
                                   atol=1e-5, rtol=0)


def test_a_bert_for_sequence_classification_checkpoint_loads_without_its_heads(tmp_path):
    """`bert.`-prefixed names (BertFor*), the pooler and classifier dropped; hf_state_dict gives BertModel's names back."""
    reference = random_reference(tiny_hf_config(num_labels=3), transformers.BertForSequenceClassification)
    reference.save_pretrained(tmp_path)
    checkpoint = load_hf_dir(tmp_path, progress=False)
    model = build_model(checkpoint.config, checkpoint.state_dict)
    ids, _, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids, mask), reference.bert(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   atol=1e-5, rtol=0)
    names = set(hf_state_dict(model.model))
    assert names == {k for k in reference.bert.state_dict() if not k.startswith("pooler.") and "position_ids" not in k
                     and "token_type_ids" not in k}
    assert state_dict_from_hf({f"model.{k}": v for k, v in model.model.state_dict().items()}).keys() == model.model.state_dict().keys()


def test_pytorch_bin_weights_load_and_a_pickle_that_runs_code_is_refused(tmp_path, bert_dir):
    reference = transformers.BertModel.from_pretrained(bert_dir).eval()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((bert_dir / "config.json").read_text())
    torch.save(reference.state_dict(), bin_dir / "pytorch_model.bin")  # as older transformers saved weights
    model = build_model(*_config_and_state(bin_dir))
    ids, _, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids, mask), reference(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   atol=1e-5, rtol=0)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((bin_dir / "config.json").read_text())
    torch.save({"embeddings.word_embeddings.weight": _RunsCode(str(marker))}, evil / "pytorch_model.bin")
    with pytest.raises(FinegrainError, match=r"pytorch_model.bin: not a plain PyTorch weights file.*never pickled code"):
        load_hf_dir(evil, progress=False)
    assert not marker.exists()


class _RunsCode:
    """Unpickling this creates a file: what `weights_only=True` must refuse to do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _config_and_state(directory):
    checkpoint = load_hf_dir(directory, progress=False)
    return checkpoint.config, checkpoint.state_dict


def test_an_unsupported_architecture_names_what_it_found_and_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(FinegrainError) as error:
        load_hf_dir(tmp_path, progress=False)
    message = str(error.value)
    assert "config.json: model_type 'gpt2' is not supported" in message and "llama" in message and "bert" in message
    assert "\n" not in message


def test_wordpiece_tokenizer_gives_transformers_ids_and_frames_texts_with_cls_sep(bert_dir):
    _, tokenizer = load_model(bert_dir, progress=False)
    reference = transformers.AutoTokenizer.from_pretrained(bert_dir)
    texts = ["The film was unbelievable!", "Anna went to Paris, Tom saw Berlin."]
    assert tokenizer.encode_batch(texts) == reference(texts)["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token_id) == ("[CLS]", "[SEP]", 0)
    assert tokenizer.add_bos and tokenizer.add_eos


def test_rows_and_cached_layers_give_the_full_forward(bert_dir):
    """The rows shortcut (a [CLS] head) and the frozen-prefix cache (layer 0's output, then layer 1) match one pass."""
    model, _ = load_model(bert_dir, progress=False)
    ids, lengths, _ = padded_batch()
    batch = {"input_ids": ids, "lengths": lengths}
    with torch.no_grad():
        full = hidden_states(model.model, batch)
        first = hidden_states(model.model, batch, rows=torch.zeros_like(lengths))
        cached = hidden_states(model.model, batch, end_layer=1)
        upper = hidden_states(model.model, {**batch, "hidden": cached}, start_layer=1)
    torch.testing.assert_close(first[:, 0], full[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(upper, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_classifier_pools_the_cls_state_or_the_mean(bert_dir, pooling):
    model, _ = load_model(bert_dir, progress=False)
    classifier = SequenceClassifier(model.model, 2, pooling).eval()
    ids, lengths, mask = padded_batch()
    with torch.no_grad():
        states = model.model(ids, mask)  # (B, T, H)
        pooled = states[:, 0] if pooling == "first" else (states * mask[..., None]).sum(1) / lengths[:, None]
        torch.testing.assert_close(classifier({"input_ids": ids, "lengths": lengths}), classifier.score(pooled),
                                   atol=1e-5, rtol=0)


def test_lora_targets_bert_names_and_all_linear(bert_dir):
    model, _ = load_model(bert_dir, progress=False)
    config = from_dict(RunConfig, {"lora": {"targets": "all-linear"}}, "test")
    task_model = SequenceClassifier(model.model, 2, "first")
    inject(task_model, method_config(config, 2, ["score"]))
    adapted = {name for name, module in task_model.named_modules() if hasattr(module, "adapters")}
    per_layer = {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"}
    assert adapted == {f"model.layers.{i}.{name}" for i in range(2) for name in per_layer}

    model, _ = load_model(bert_dir, progress=False)
    config = from_dict(RunConfig, {"lora": {"targets": ["query", "value"], "layers": [-1]}}, "test")
    task_model = SequenceClassifier(model.model, 2, "first")
    inject(task_model, method_config(config, 2, ["score"]))
    adapted = {name for name, module in task_model.named_modules() if hasattr(module, "adapters")}
    assert adapted == {"model.layers.1.attention.self.query", "model.layers.1.attention.self.value"}


def test_lora_equals_peft_on_transformers_bert(bert_dir):
    """Our LoRA on q/v of the encoder gives PEFT's hidden states once both hold the same A and B."""
    import peft

    reference = peft.get_peft_model(
        transformers.BertModel.from_pretrained(bert_dir).eval(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0),
    ).eval()
    model, _ = load_model(bert_dir, progress=False)
    config = from_dict(RunConfig, {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"]}}, "test")
    task_model = SequenceClassifier(model.model, 2, "first").eval()
    inject(task_model, method_config(config, 2, ["score"]))
    theirs = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    ours = dict(task_model.named_parameters())
    torch.manual_seed(1)
    with torch.no_grad():
        for key, tensor in theirs.items():
            name = key.replace("base_model.model.encoder.layer.", "model.layers.").replace(".default", "")
            tensor.copy_(torch.randn_like(tensor) * 0.3)
            ours[name].copy_(tensor)
    ids, lengths, mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = hidden_states(task_model.model, {"input_ids": ids, "lengths": lengths})
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


def test_ner_labels_the_first_subtoken_between_cls_and_sep(bert_dir):
    from finegrain.data.conll import TokenExample

    _, tokenizer = load_model(bert_dir, progress=False)
    task = TokenClassificationTask(["PER", "LOC"])
    words = ["Anna", "unbelievable", "Paris"]
    example = TokenExample(words=words, tags=["B-PER", "O", "B-LOC"], text="Anna unbelievable Paris",
                           offsets=[(0, 4), (5, 17), (18, 23)], source="test:1")
    item = task.encode(tokenizer, [example], 16)[0]
    cls, sep = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokenizer.decode(item.input_ids) == "[CLS] anna unbelievable paris [SEP]"
    assert item.input_ids[0] == cls and item.input_ids[-1] == sep and len(item.input_ids) == 7  # un ##believ ##able
    assert item.positions == [1, 2, 5]
    assert [t for t in item.targets if t != -100] == [task.index["B-PER"], task.index["O"], task.index["B-LOC"]]
    cut = task.encode(tokenizer, [example], 5)[0]  # [CLS] anna un ##believ [SEP]: paris is cut
    assert cut.input_ids[-1] == sep and len(cut.input_ids) == 5 and cut.positions == [1, 2, -1]


def write_texts(path, n: int = 48):
    rows = [{"text": f"the film was {'good great' if i % 2 else 'bad dull'} {WORDS[i % 7]}", "label": "fresh" if i % 2 else "rotten"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_classification_run_on_the_encoder_trains_and_loads(bert_dir, tmp_path, method):
    run = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--data", str(write_texts(tmp_path / "data.jsonl")), "--output", str(run),
                 "--set", "train.epochs=3", "--batch-size", "8", "--set", "data.max_length=16", "--set", "train.threads=1",
                 "--set", "train.lr=3e-3", "--set", f"peft.method={method}", "--set", "head.pooling=first",
                 "--set", "head.tfidf_mix=0", "--set", "train.recipe=off",
                 *(["--set", "lora.targets=all-linear"] if method == "lora" else [])]) == 0
    results = json.loads((run / "metrics.json").read_text())
    assert results["validation"]["accuracy"] == 1.0  # the label is in the words: any working model learns it
    predicted = finegrain.load(run).predict(["the film was good great", "the film was bad dull"])
    assert [p["label"] for p in predicted] == ["fresh", "rotten"]


def test_an_encoder_student_learns_from_a_decoder_teacher(bert_dir, tiny_model_dir, tmp_path, monkeypatch):
    """A BERT student of a LLaMA teacher: the teacher reads every text, unlabelled ones too, with its
    own tokenizer; the hidden term reads the encoder's layers; the student is an ordinary run."""
    data = write_texts(tmp_path / "data.jsonl")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({"text": f"the film was {w} {WORDS[i]}"}) + "\n"
                                  for i, w in enumerate(["good", "bad", "great", "dull"] * 4)))
    common = ["--data", str(data), "--batch-size", "8", "--set", "data.max_length=16", "--set", "train.threads=1",
              "--set", "head.tfidf_mix=0", "--set", "train.recipe=off", "--set", "lora.targets=all-linear"]
    teacher = tmp_path / "teacher"
    assert main(["train", "--model", str(tiny_model_dir), "--output", str(teacher), "--set", "train.epochs=4",
                 "--set", "train.lr=5e-3", *common]) == 0
    seen = []
    real = finegrain.run.teacher_pass

    def recorded(model, task, tokenizer, examples, *args, **kwargs):
        seen.append((tokenizer.vocab_size, len(examples)))
        return real(model, task, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(finegrain.run, "teacher_pass", recorded)
    student = tmp_path / "student"
    assert main(["train", "--model", str(bert_dir), "--output", str(student), "--set", "train.epochs=3",
                 "--set", "train.lr=3e-3", "--set", "head.pooling=mean", "--set", f"distill.teacher={teacher}",
                 "--set", f"distill.unlabelled={unlabelled}", "--set", "distill.hidden=true", *common]) == 0
    results = json.loads((student / "metrics.json").read_text())
    teacher_vocab = finegrain.load(teacher).tokenizer.vocab_size
    assert teacher_vocab != len(SPECIALS) + len(WORDS)
    assert seen == [(teacher_vocab, results["train"]["examples"] + 16)]  # one pass, the teacher's tokenizer, both kinds
    assert results["train"]["unlabelled"] == 16
    assert results["validation"]["accuracy"] == 1.0  # the label is in the words
    predicted = finegrain.load(student).predict(["the film was good great", "the film was bad dull"])
    assert [p["label"] for p in predicted] == ["fresh", "rotten"]


def test_instruct_on_an_encoder_is_refused_before_anything_loads(bert_dir, tmp_path, monkeypatch, capsys):
    import finegrain.run

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finegrain.run, "load_model", no_load)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    code = main(["train", "--model", str(bert_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--set", "task=instruct"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "task 'instruct' generates text" in err and "BERT encoder" in err
    assert not (tmp_path / "run").exists()
    assert is_encoder(bert_dir) and not is_encoder(bert_dir / "tokenizer.json")


def test_max_length_beyond_the_encoders_positions_is_refused(bert_dir, tmp_path):
    with pytest.raises(FinegrainError, match=r"data.max_length: 100 tokens is beyond the encoder's 64 positions"):
        finegrain.run.build(from_dict(RunConfig, {"model": {"name": str(bert_dir)}, "data": {"max_length": 100}}, "test"),
                            ["a", "b"], progress=False)


def test_a_pickle_free_config_round_trip():
    config = BertConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2)
    assert BertConfig.from_hf(config.to_hf()) == config
    assert config.replace(causal=True).causal is False  # an encoder stays bidirectional
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.real_model
def test_minilm_l6_equals_transformers():
    from finegrain.checkpoint.load import resolve_model

    try:
        directory = resolve_model("minilm-l6")
    except FinegrainError as exc:
        pytest.skip(str(exc))
    model, tokenizer = load_model("minilm-l6", progress=False)
    reference = transformers.BertModel.from_pretrained(directory).eval()
    texts = ["A gripping, funny film with a great cast.", "Dull."]
    encoded = transformers.AutoTokenizer.from_pretrained(directory)(texts, padding=True, return_tensors="pt")
    assert tokenizer.encode_batch(texts) == [row[row != 0].tolist() for row in encoded["input_ids"]]
    with torch.no_grad():
        ours = model.model(encoded["input_ids"], encoded["attention_mask"])
        expected = reference(**encoded).last_hidden_state
    real = encoded["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=0)


def test_lora_on_the_top_layer_trains_over_the_cached_lower_one(bert_dir, tmp_path):
    """The frozen-prefix cache on the encoder: layer 0 (with the embeddings) runs once, only layer 1 trains."""
    run = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--data", str(write_texts(tmp_path / "data.jsonl")), "--output", str(run),
                 "--set", "train.epochs=8", "--batch-size", "8", "--set", "data.max_length=16", "--set", "train.threads=1",
                 "--set", "train.lr=1e-2", "--set", "head.pooling=mean", "--set", "head.tfidf_mix=0",
                 "--set", "train.recipe=off", "--set", "lora.layers=[-1]"]) == 0
    results = json.loads((run / "metrics.json").read_text())
    assert results["train"]["frozen_prefix_layers"] == 1
    assert results["validation"]["accuracy"] == 1.0
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["query", "value"]  # the default q_proj, v_proj by BERT's names


def test_ner_on_the_encoder_trains_and_predicts_words(bert_dir, tmp_path):
    rows = [{"tokens": [["Anna", "Tom"][i % 2], "went", "to", ["Paris", "Berlin"][i % 2]], "tags": ["B-PER", "O", "O", "B-LOC"]}
            for i in range(40)]
    data = tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "ner"
    assert main(["train", "--model", str(bert_dir), "--data", str(data), "--output", str(run), "--set", "task=ner",
                 "--set", "train.epochs=8", "--batch-size", "8", "--set", "train.threads=1", "--set", "train.lr=3e-3",
                 "--set", "peft.method=full"]) == 0
    assert json.loads((run / "metrics.json").read_text())["validation"]["f1"] == 1.0
    predicted = finegrain.load(run).predict([["Tom", "went", "to", "Paris"]])[0]
    assert predicted["tags"] == ["B-PER", "O", "O", "B-LOC"]


def test_the_server_answers_an_encoder_run_as_finegrain_load_does(bert_dir, tmp_path):
    from finegrain.serve.engine import Engine  # noqa: F401  (the server's modules import)
    from finegrain.serve.models import ModelRegistry

    run = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--data", str(write_texts(tmp_path / "data.jsonl")), "--output", str(run),
                 "--set", "train.epochs=1", "--batch-size", "8", "--set", "data.max_length=16", "--set", "train.threads=1",
                 "--set", "head.pooling=first", "--set", "head.tfidf_mix=0", "--set", "train.recipe=off"]) == 0
    registry = ModelRegistry([("enc", run)])
    registry.load()
    served = registry.runs["enc"]
    assert served.model.model.config.causal is False  # model.bidirectional false in the config: still an encoder
    texts = ["the film was good great", "bad dull film"]
    items = served.task.encode(served.tokenizer, served.task.examples_from_inputs(texts, served.config.data), 16)
    with served.base.use("enc"), torch.inference_mode():
        predicted = served.task.predict(served.model, items, served.tokenizer.pad_token_id, 8)
    assert predicted == finegrain.load(run).predict(texts)


@pytest.mark.parametrize("task, data", [
    ("relation", ["--set", "data.train=examples/data/semeval/train.txt", "--set", "data.test=examples/data/semeval/test.txt"]),
    ("qa", ["--set", "data.train=examples/data/squad/train.json", "--set", "data.test=examples/data/squad/test.json",
            "--set", "qa.stride=16", "--set", "qa.max_answer_length=8"]),
])
def test_relation_and_qa_heads_run_on_the_encoder(bert_dir, tmp_path, task, data):
    """The other heads read the encoder through the same contract: a run trains, tests and predicts."""
    run = tmp_path / task
    assert main(["train", "--model", str(bert_dir), "--output", str(run), "--set", f"task={task}", *data,
                 "--set", "data.max_length=64", "--set", "train.epochs=1", "--batch-size", "8",
                 "--set", "train.threads=1", "--set", "data.split=[0.8,0.2,0.0]"]) == 0
    results = json.loads((run / "metrics.json").read_text())
    assert results["train"]["steps"] > 0 and "test" in results
    predictor = finegrain.load(run)
    examples = predictor.task.read_file(predictor.config.data, data[3].split("=", 1)[1])  # the test file
    assert len(predictor.predict_examples(examples)) == len(examples) > 0
