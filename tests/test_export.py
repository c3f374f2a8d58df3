"""`finegrain export` on the tiny model: the merged model in transformers (sequence and token
classification, causal LM; on a tiny random BERT, BertForSequenceClassification,
BertForTokenClassification and BertForQuestionAnswering) with the run's logits, GGUF files that gguf's reader, transformers and
finegrain read back (f16 exactly up to float16, q8_0/q4_0 within their quantisation), the adapter
alone through PEFT, and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

import finegrain
from finegrain.checkpoint.gguf import load_gguf
from finegrain.checkpoint.load import load_model
from finegrain.cli import main
from finegrain.export import GGUF_NAME, export_run, merged_model
from finegrain.peft.lora import LoraConfig
from finegrain.rundir import read_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
TEXTS = ["good film 3", "bad film 1 bad", "good"]


def write_texts(path, n: int = 48):
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i % 5}", "label": "fresh" if i % 2 else "rotten"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(model_dir, data, output, *extra: str) -> Path:
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--set", "train.epochs=1",
                 "--batch-size", "8", "--set", "data.max_length=16", "--set", "train.threads=1", "--set", "train.lr=1e-2",
                 "--set", "lora.layers=null", "--set", "lora.targets=all-linear", "--set", "head.tfidf_mix=0",
                 "--set", "head.word_mix=0",
                 "--set", "head.pooling=last", *extra]) == 0  # transformers' classifiers read the last token
    return Path(output)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A LoRA and a full classification run, a LoRA NER run and a LoRA instruct run."""
    root = tmp_path_factory.mktemp("export-runs")
    data = write_texts(root / "data.jsonl")
    ner = root / "ner.jsonl"
    ner.write_text("".join(json.dumps({"tokens": [n, "went", "to", c], "tags": ["B-PER", "O", "O", "B-LOC"]}) + "\n"
                           for n, c in [("Anna", "Paris"), ("Tom", "Berlin")] * 20))
    return {
        "lora": train(tiny_model_dir, data, root / "lora"),
        "full": train(tiny_model_dir, data, root / "full", "--set", "peft.method=full", "--set", "train.lr=1e-3"),
        "ner": train(tiny_model_dir, ner, root / "ner", "--set", "task=ner"),
        "instruct": train(tiny_model_dir, EXAMPLES / "instruct" / "train.jsonl", root / "instruct", "--set", "task=instruct",
                          "--set", "instruct.max_new_tokens=2", "--set", "data.max_length=96"),
    }


def run_logits(run_dir, texts):
    """The run's task-model outputs for `texts`, one row of items at a time, as finegrain.load computes them."""
    predictor = finegrain.load(run_dir)
    items = predictor.task.encode(predictor.tokenizer, predictor.task.examples_from_inputs(texts, predictor.config.data), 16)
    with torch.no_grad():
        return [(item.input_ids, predictor.model(predictor.task.collate([item], predictor.tokenizer.pad_token_id))[0])
                for item in items]


@pytest.mark.parametrize("name", ["lora", "full"])
def test_hf_sequence_classification_gives_the_runs_logits(runs, tmp_path, name):
    import transformers

    out = tmp_path / "hf"
    assert main(["export", str(runs[name]), "--format", "hf", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 2
    assert config["id2label"] == {"0": "fresh", "1": "rotten"}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        for ids, ours in run_logits(runs[name], TEXTS):
            torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], ours, atol=1e-5, rtol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out)("good film").input_ids == finegrain.load(runs[name]).tokenizer.encode("good film")


@pytest.mark.parametrize("method", ["ia3", "dora", "bitfit", "adalora", "head"])
def test_hf_export_of_every_mergeable_method_gives_the_runs_logits(tiny_model_dir, tmp_path, method):
    """The other methods merge through the same unload: bitfit's added biases become attention_bias/mlp_bias."""
    import transformers

    run = train(tiny_model_dir, write_texts(tmp_path / "data.jsonl"), tmp_path / method, "--set", f"peft.method={method}",
                "--set", "train.recipe=false")
    export_run(run, "hf", tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        for ids, ours in run_logits(run, TEXTS):
            torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], ours, atol=1e-5, rtol=1e-5)
    if method == "bitfit":
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert config["attention_bias"] and config["mlp_bias"]


def test_a_run_on_a_quantised_base_merges_into_the_float_base(tiny_model_dir, tmp_path):
    """model.quantize: the adapter goes onto the base checkpoint's float weights; the run's own outputs
    (on int8 weights) differ from the export's by the quantisation error only."""
    import transformers

    run = train(tiny_model_dir, write_texts(tmp_path / "data.jsonl"), tmp_path / "int8", "--set", "model.quantize=int8",
                "--set", "train.recipe=false")
    export_run(run, "hf", tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    merged, _, _ = merged_model(run, read_config(run))
    with torch.no_grad():
        for ids, ours in run_logits(run, TEXTS):
            batch = {"input_ids": torch.tensor([ids]), "lengths": torch.tensor([len(ids)])}
            theirs = hf(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(theirs, merged(batch)[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(theirs, ours, atol=0.05 * ours.abs().max().item(), rtol=0)


def test_hf_token_classification_gives_the_runs_logits(runs, tmp_path):
    import transformers

    out = tmp_path / "hf-ner"
    export_run(runs["ner"], "hf", out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"]
    assert sorted(config["id2label"].values()) == sorted(finegrain.load(runs["ner"]).task.tags)
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    with torch.no_grad():
        for ids, ours in run_logits(runs["ner"], [["Anna", "went", "to", "Paris"], ["Tom", "saw", "Berlin"]]):
            torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], ours[: len(ids)], atol=1e-5, rtol=1e-5)


def test_an_hf_ner_export_says_how_the_run_read_its_sentences(runs, tmp_path, capsys):
    """The run tokenized a sentence word by word, cut it at data.max_length and read each word's tag at
    its first token: the note and finegrain_input say so, and following them with transformers' own
    tokenizer gives the run's ids and, at each word's first token, its logits."""
    import transformers

    out = tmp_path / "hf-ner"
    assert main(["export", str(runs["ner"]), "--format", "hf", "--output", str(out)]) == 0
    note = capsys.readouterr().out
    assert ("the run read at most 16 tokens of a sentence, its words joined by spaces (tokenize with truncation=True, "
            "max_length=16), and tagged each word at its first token, the sentence's tags chosen together to follow "
            "BIO's rules") in note
    assert json.loads((out / "config.json").read_text())["finegrain_input"] == {
        "max_length": 16, "subword": "first", "scheme": "BIO", "decoding": "viterbi"}
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    sentences = [["Anna", "went", "to", "Paris"], ["Tom", "went", "to", "Berlin", "and", "then", "to", "Paris"] * 3]
    predictor = finegrain.load(runs["ner"])
    items = predictor.task.encode(predictor.tokenizer, predictor.task.examples_from_inputs(sentences, predictor.config.data), 16)
    with torch.no_grad():
        for words, item, (_, ours) in zip(sentences, items, run_logits(runs["ner"], sentences)):
            encoding = tokenizer(" ".join(words), truncation=True, max_length=16)
            assert encoding.input_ids == item.input_ids
            word_ids = encoding.word_ids()
            firsts = [word_ids.index(w) if w in word_ids else -1 for w in range(len(words))]
            assert firsts == item.positions
            theirs = hf(torch.tensor([encoding.input_ids])).logits[0]
            kept = [p for p in firsts if p >= 0]
            torch.testing.assert_close(theirs[kept], ours[kept], atol=1e-5, rtol=1e-5)
    assert -1 in items[1].positions  # the long sentence was cut


def test_hf_question_answering_gives_the_runs_start_and_end_logits(tiny_model_dir, tmp_path, capsys):
    import transformers

    squad = EXAMPLES / "squad"
    run = train(tiny_model_dir, squad / "train.json", tmp_path / "qa", "--set", "task=qa", "--set", "data.max_length=128",
                "--set", f"data.validation={squad / 'dev.json'}", "--set", "qa.stride=16")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--output", str(tmp_path / "hf-qa")]) == 0
    assert ("the run read 'Question: {question}\\nContext:\\n{context}\\nAnswer:', its three parts tokenized apart, a "
            "context too long for 128 tokens in windows sharing 16 tokens") in capsys.readouterr().out
    config = json.loads((tmp_path / "hf-qa" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForQuestionAnswering"]
    assert config["finegrain_input"] == {"max_length": 128, "prompt": "Question: {question}\nContext:\n{context}\nAnswer:",
                                         "stride": 16, "max_answer_length": 30, "null_threshold": 0.0}
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "hf-qa").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf-qa")
    predictor = finegrain.load(run)
    examples = predictor.task.read_file(predictor.config.data, str(squad / "dev.json"))[:3]
    items = predictor.task.encode(predictor.tokenizer, examples, 128)
    question, context = (part.format(question=examples[0].question) for part in config["finegrain_input"]["prompt"].split("{context}"))
    parts = [tokenizer(text, add_special_tokens=False).input_ids for text in (question, examples[0].context, context)]
    room = 128 - len(parts[0]) - len(parts[2])  # the first window: as much of the context as fits
    assert items[0].input_ids == parts[0] + parts[1][:room] + parts[2]
    with torch.no_grad():
        for item in items:
            ours = predictor.model(predictor.task.collate([item], predictor.tokenizer.pad_token_id))[0]
            theirs = hf(torch.tensor([item.input_ids]))
            torch.testing.assert_close(theirs.start_logits[0], ours[: len(item.input_ids), 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(theirs.end_logits[0], ours[: len(item.input_ids), 1], atol=1e-5, rtol=1e-5)


def instruct_reference(run_dir):
    """The merged causal LM of the instruct run, its logits on a prompt, and the prompt's ids."""
    model, tokenizer, _ = merged_model(Path(run_dir), read_config(run_dir))
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. A gripping film")])
    with torch.no_grad():
        return model, ids, model.llama(ids)


def test_hf_causal_lm_gives_the_merged_models_logits(runs, tmp_path):
    import transformers

    model, ids, reference = instruct_reference(runs["instruct"])
    export_run(runs["instruct"], "hf", tmp_path / "hf-lm")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-lm").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, reference, atol=1e-4, rtol=1e-5)
    bare = load_model(read_config(runs["instruct"]).model.name, progress=False)[0]
    with torch.no_grad():
        assert not torch.allclose(bare(ids), reference, atol=1e-3)  # the adapter is in the export


@pytest.mark.parametrize("dtype, tolerance", [("f16", 1e-3), ("q8_0", 1e-2), ("q4_0", 0.1)])
def test_gguf_reads_back_in_gguf_transformers_and_finegrain(runs, tmp_path, dtype, tolerance):
    """Logits within `tolerance` times the largest logit: float16 rounding, or the quantisation's error."""
    import transformers

    model, ids, reference = instruct_reference(runs["instruct"])
    path = export_run(runs["instruct"], "gguf", tmp_path / f"m-{dtype}.gguf", dtype)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    scale = reference.abs().max().item()
    ours, tokenizer = load_model(path, progress=False)
    assert tokenizer.encode("The capital of France is Paris") == finegrain.load(runs["instruct"]).tokenizer.encode("The capital of France is Paris")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference, atol=tolerance * scale, rtol=0)
        torch.testing.assert_close(theirs(ids).logits, reference, atol=tolerance * scale, rtol=0)
    if dtype == "f16":  # the names and the q/k permutation round-trip exactly: only float16 rounding is left
        merged = {k: v for k, v in model.llama.state_dict().items() if "rotary" not in k}
        read = load_gguf(path, progress=False).state_dict
        for key, tensor in merged.items():
            expected = tensor.half().float() if tensor.dim() == 2 else tensor
            assert torch.equal(read[key], expected), key


def test_gguf_into_a_directory(runs, tmp_path):
    path = export_run(runs["instruct"], "gguf", tmp_path / "out")
    assert path == tmp_path / "out" / GGUF_NAME and path.is_file()


def test_peft_export_is_the_adapter_that_peft_loads(runs, tmp_path):
    import peft
    import transformers

    out = tmp_path / "adapter"
    assert main(["export", str(runs["lora"]), "--format", "peft", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(read_config(runs["lora"]).model.name, num_labels=2)
    base.config.pad_token_id = finegrain.load(runs["lora"]).tokenizer.pad_token_id
    tuned = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        for ids, ours in run_logits(runs["lora"], TEXTS):
            torch.testing.assert_close(tuned(torch.tensor([ids])).logits[0], ours, atol=1e-5, rtol=1e-5)


def test_a_calibrated_run_exports_its_temperature_in_the_hf_head(runs, tmp_path, capsys):
    """transformers' softmax of the exported logits gives the probabilities `finegrain predict` gives the
    calibrated run; the adapter alone says it is before calibration."""
    import transformers

    run = tmp_path / "calibrated"
    shutil.copytree(runs["lora"], run)
    assert main(["calibrate", str(run)]) == 0
    temperature = json.loads((run / "temperature.json").read_text())["temperature"]
    assert abs(temperature - 1) > 0.01
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    assert f"calibration temperature {temperature:.4f}" in capsys.readouterr().out
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    predictor = finegrain.load(run)
    with torch.no_grad():
        for (ids, _), prediction in zip(run_logits(run, TEXTS), predictor.predict(TEXTS)):
            probabilities = hf(torch.tensor([ids])).logits[0].softmax(-1)
            expected = torch.tensor([prediction["probabilities"][label] for label in ("fresh", "rotten")])
            torch.testing.assert_close(probabilities, expected, atol=2e-6, rtol=0)
    assert main(["export", str(run), "--format", "peft", "--output", str(tmp_path / "adapter")]) == 0
    assert f"before calibration: divide them by the run's temperature {temperature:.4f}" in capsys.readouterr().out


def test_a_run_that_mixes_in_tfidf_exports_only_as_the_model_alone(tiny_model_dir, tmp_path, capsys):
    """No transformers or PEFT model holds the TF-IDF mix: export refuses in one line with both test
    scores, and --model-alone writes the model's own logits and says what it leaves out."""
    import transformers

    run = train(tiny_model_dir, write_texts(tmp_path / "data.jsonl"), tmp_path / "mixed", "--set", "head.tfidf_mix=0.5")
    capsys.readouterr()
    for fmt in ("hf", "peft"):
        assert main(["export", str(run), "--format", fmt, "--output", str(tmp_path / fmt)]) == 1
        one_line_error(capsys, "mix in a TF-IDF model at weight 0.5", "test macro_f1", "without", f"no {fmt} model holds",
                       "--model-alone")
        assert not (tmp_path / fmt).exists()
    assert main(["export", str(run), "--format", "hf", "--output", str(tmp_path / "hf"), "--model-alone"]) == 0
    assert "the model alone: without a TF-IDF model at weight 0.5" in capsys.readouterr().out
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        for ids, ours in run_logits(run, TEXTS):
            torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], ours, atol=1e-5, rtol=1e-5)


def test_a_tagger_that_mixes_in_its_word_model_exports_only_as_the_model_alone(runs, tiny_model_dir, tmp_path, capsys):
    """A tagger's word-feature model (head.word_mix) is no more in a transformers model than a TF-IDF
    model: export refuses in one line with both test F1s; --model-alone gives the model's own logits."""
    import transformers

    data = tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps({"tokens": [n, "went", "to", c], "tags": ["B-PER", "O", "O", "B-LOC"]}) + "\n"
                            for n, c in [("Anna", "Paris"), ("Tom", "Berlin")] * 20))
    run = train(tiny_model_dir, data, tmp_path / "mixed", "--set", "task=ner", "--set", "head.word_mix=0.5")
    assert json.loads((run / "word_model" / "config.json").read_text())["weight"] == 0.5
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--output", str(tmp_path / "hf")]) == 1
    one_line_error(capsys, "mix in a word-feature model at weight 0.5 (head.word_mix; test f1", "without",
                   "no hf model holds", "--model-alone")
    assert main(["export", str(run), "--format", "hf", "--output", str(tmp_path / "hf"), "--model-alone"]) == 0
    assert "the model alone: without a word-feature model at weight 0.5" in capsys.readouterr().out
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        for ids, ours in run_logits(run, [["Anna", "went", "to", "Paris"]]):
            torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], ours[: len(ids)], atol=1e-5, rtol=1e-5)


def test_an_hf_export_says_how_the_run_read_its_texts(runs, tiny_model_dir, tmp_path, capsys):
    """transformers reads a text as given; the run cut it at data.max_length (and wrapped it in
    data.template): the note and config.json's finegrain_input say so, and following them gives the
    run's logits."""
    import transformers

    out = tmp_path / "hf"
    assert main(["export", str(runs["lora"]), "--format", "hf", "--output", str(out)]) == 0
    assert "tokenize with truncation=True, max_length=16 to predict as it does" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["finegrain_input"] == {"max_length": 16, "template": None,
                                                                                "long_texts": "truncate"}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    long_text = "good film " * 30
    predictor = finegrain.load(runs["lora"])
    with torch.no_grad():
        logits = hf(**tokenizer(long_text, return_tensors="pt", truncation=True, max_length=16)).logits[0]
    expected = predictor.predict([long_text])[0]["probabilities"]
    torch.testing.assert_close(logits.softmax(-1), torch.tensor([expected["fresh"], expected["rotten"]]), atol=2e-6, rtol=0)

    template = "Review: {text} Verdict:"
    run = train(tiny_model_dir, write_texts(tmp_path / "data.jsonl"), tmp_path / "templated", "--set", f'data.template="{template}"')
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--output", str(tmp_path / "hf2")]) == 0
    assert ("the run read each text between 'Review: ' and ' Verdict:', the three tokenized apart and their ids joined "
            "(the text cut to fit 16 tokens)") in capsys.readouterr().out
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        for text, (_, ours) in zip(TEXTS, run_logits(run, TEXTS)):
            before, middle, after = (tokenizer(part, add_special_tokens=False).input_ids for part in ("Review: ", text, " Verdict:"))
            ids = before + middle[: 16 - len(before) - len(after)] + after
            torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], ours, atol=1e-5, rtol=1e-5)


def one_line_error(capsys, *fragments):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "internal error" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_user_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "x")
    assert main(["export", str(tmp_path), "--format", "hf", "--output", out]) == 1
    one_line_error(capsys, "not a finegrain run directory")
    assert main(["export", str(runs["lora"]), "--format", "hf", "--output", str(runs["lora"])]) == 1
    one_line_error(capsys, "already exists", "another --output")
    assert main(["export", str(runs["lora"]), "--format", "gguf", "--output", out]) == 1
    one_line_error(capsys, "task classification", "--format hf")
    assert main(["export", str(runs["lora"]), "--format", "hf", "--dtype", "q4_0", "--output", out]) == 1
    one_line_error(capsys, "--dtype: 'q4_0' does not apply to --format hf", "f32, f16")
    assert main(["export", str(runs["full"]), "--format", "peft", "--output", out]) == 1
    one_line_error(capsys, "full fine-tune has no adapter", "--format hf")
    encoder = train("minilm-l6", write_texts(tmp_path / "data.jsonl"), tmp_path / "encoder", "--set", "train.recipe=false",
                    "--set", "lora.targets=[query,value]", "--set", "head.pooling=mean")
    capsys.readouterr()  # training's progress
    assert main(["export", str(encoder), "--format", "hf", "--output", out]) == 1
    one_line_error(capsys, "head.pooling mean: BertForSequenceClassification reads the [CLS] token", "head.pooling=first", "--format peft")
    monkeypatch.setattr(LoraConfig, "mergeable", False, raising=False)  # as prompt and prefix tuning say
    assert main(["export", str(runs["lora"]), "--format", "hf", "--output", out]) == 1
    one_line_error(capsys, "peft.method lora cannot be merged", "--format peft")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["export", str(runs["lora"]), "--format", "onnx", "--output", out])
    one_line_error(capsys, "invalid choice: 'onnx'")


def test_help():
    result = subprocess.run([sys.executable, "-m", "finegrain.cli", "export", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--format" in result.stdout and "gguf" in result.stdout


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random transformers BertModel with its WordPiece tokenizer (tests/test_bert.py's)."""
    from test_bert import random_reference, tiny_hf_config, write_tokenizer

    directory = tmp_path_factory.mktemp("export-bert") / "tiny-bert"
    random_reference(tiny_hf_config()).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


@pytest.mark.parametrize("task, method", [("classification", "lora"), ("classification", "full"), ("regression", "lora"),
                                          ("ner", "full"), ("ner", "lora")])
def test_hf_export_of_an_encoder_run_gives_the_runs_logits(bert_dir, tmp_path, task, method):
    """BertForSequenceClassification (through its near-linear pooler) and BertForTokenClassification
    load the exported directory and give the run's logits; the tokenizer gives the run's ids."""
    import transformers

    if task == "ner":
        data = tmp_path / "ner.jsonl"
        data.write_text("".join(json.dumps({"tokens": [n, "went", "to", c], "tags": ["B-PER", "O", "O", "B-LOC"]}) + "\n"
                                for n, c in [("Anna", "Paris"), ("Tom", "Berlin")] * 20))
        texts = [["Anna", "went", "to", "Paris"], ["Tom", "saw", "Berlin", "film"]]
    elif task == "regression":
        data = tmp_path / "scores.jsonl"
        data.write_text("".join(json.dumps({"text": f"the film was {'good' if i % 2 else 'bad'}", "label": float(i % 2)}) + "\n"
                                for i in range(40)))
        texts = ["the film was good great", "bad dull story"]
    else:
        data, texts = write_texts(tmp_path / "data.jsonl"), ["the film was good", "bad dull story !", "great"]
    run = train(bert_dir, data, tmp_path / "run", "--set", f"task={task}", "--set", f"peft.method={method}",
                "--set", "head.pooling=first", "--set", "train.recipe=off", "--set", "train.lr=1e-3")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    cls = transformers.BertForTokenClassification if task == "ner" else transformers.BertForSequenceClassification
    assert config["architectures"] == [cls.__name__] and config["model_type"] == "bert"
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out) if task == "ner" else \
        transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(hf) is cls
    hf.eval()
    with torch.no_grad():
        for ids, ours in run_logits(run, texts):
            theirs = hf(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
            torch.testing.assert_close(theirs, ours[: len(ids)] if task == "ner" else ours, atol=1e-5, rtol=1e-5)
    if task == "regression":
        assert config["problem_type"] == "regression" and config["num_labels"] == 1
    else:
        names = finegrain.load(run).task.tags if task == "ner" else ["fresh", "rotten"]
        assert list(config["id2label"].values()) == list(names)
    text = "the film was good"
    assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == finegrain.load(run).tokenizer.encode(text)


def test_hf_export_of_an_encoder_qa_run_gives_its_start_and_end_logits(bert_dir, tmp_path):
    import transformers

    squad = EXAMPLES / "squad"
    run = train(bert_dir, squad / "train.json", tmp_path / "qa", "--set", "task=qa", "--set", "data.max_length=64",
                "--set", f"data.validation={squad / 'dev.json'}", "--set", "qa.stride=16", "--set", "train.recipe=off")
    export_run(run, "hf", tmp_path / "hf-qa")
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "hf-qa").eval()
    assert type(hf) is transformers.BertForQuestionAnswering
    predictor = finegrain.load(run)
    examples = predictor.task.read_file(predictor.config.data, str(squad / "dev.json"))[:2]
    items = predictor.task.encode(predictor.tokenizer, examples, 64)
    with torch.no_grad():
        for item in items[:4]:
            ours = predictor.model(predictor.task.collate([item], predictor.tokenizer.pad_token_id))[0][: len(item.input_ids)]
            out = hf(torch.tensor([item.input_ids]))
            torch.testing.assert_close(torch.stack([out.start_logits[0], out.end_logits[0]], -1), ours, atol=1e-5, rtol=1e-5)
