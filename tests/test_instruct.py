"""task: instruct — chat data, assistant-only loss, packing without leakage, generation metrics, chat CLI."""

import copy
import gzip
import io
import json
import re

import pytest
import torch
import yaml

from conftest import tiny_tokenizer
from finegrain.checkpoint.load import load_model
from finegrain.cli import main
from finegrain.data.chat import ChatExample, read_chat_examples
from finegrain.errors import FinegrainError
from finegrain.evaluate.generation import generation_metrics, label_set, lcs_length, map_to_label, rouge_l
from finegrain.peft import LoraConfig, apply_lora
from finegrain.tasks.instruct import IGNORE_INDEX, LOSS_CHUNK, InstructTask, encode_conversation, token_losses


def chat(*turns, system=None):
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": r, "content": c} for r, c in zip(roles, turns)]


CONVERSATIONS = [
    chat("The capital of France?", "Paris."),
    chat("Was the movie good?", "the movie was good", system="Be brief."),
    chat("Two hours?", "dull, slow", "And the cast?", "badly acted"),
    chat("the story", "was bad and the actors were fine"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- metrics -------------------------------------------------------------------------------


def test_exact_match_and_token_f1_are_squads():
    m = generation_metrics(["The Pacific Ocean.", "the cat sat", ""], ["pacific ocean", "a cat sat down", "cat"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    # [cat, sat] against [cat, sat, down]: P 1, R 2/3; an empty generation scores 0.
    assert m["token_f1"] == pytest.approx((1 + 2 * 1 * (2 / 3) / (1 + 2 / 3) + 0) / 3)


def test_rouge_l_is_the_lcs_f_measure_on_rouge_score_tokens():
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    # Reference "police killed the gunman" (4 tokens) and prediction "police kill the gunman" (4):
    # LCS police-the-gunman = 3, P = R = 3/4, F = 0.75 (the rouge-score README's example).
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    # "The gunman was shot down by police." (7 tokens) vs "police killed the gunman" (4): the LCS is
    # "the gunman" (2), P = 2/7, R = 2/4, F = 2PR / (P + R) = 0.3636...
    assert rouge_l("The gunman was shot down by police.", "police killed the gunman") == pytest.approx(
        2 * (2 / 7) * (2 / 4) / (2 / 7 + 2 / 4)
    )
    # Lower case, and punctuation splits tokens: "Leonardo da-Vinci!" is leonardo, da, vinci.
    assert rouge_l("Leonardo da-Vinci!", "leonardo da vinci") == 1.0
    assert rouge_l("", "cat") == 0.0 and rouge_l("...", "...") == 0.0


def test_label_set_and_mapping_rule():
    references = ["positive"] * 3 + ["negative"] * 4 + ["Paris"] * 2 + ["a long free-form answer here"] * 5
    assert label_set(references) == ["negative", "positive"]
    assert label_set(["positive"] * 5 + ["Paris"]) == []  # one label is no classification
    labels = ["negative", "positive", "very positive"]
    assert map_to_label("Positive.", labels) == "positive"
    assert map_to_label("very positive, clearly", labels) == "very positive"  # the longest start wins
    assert map_to_label("The sentiment is negative.", labels) == "negative"  # contained once
    assert map_to_label("positive or negative", labels) == "positive"  # starts with
    assert map_to_label("it is positive or negative", labels) is None  # contains two
    assert map_to_label("unclear", labels) is None


def test_generation_metrics_score_labels_and_free_text():
    generated = ["positive", "Negative!", "I think it is good", "Paris", "Rome"]
    references = ["positive", "positive", "negative", "Paris", "the city of Rome"]
    m = generation_metrics(generated, references, ["negative", "positive"])
    assert m["num_examples"] == 5 and m["label_examples"] == 3
    assert m["generative_accuracy"] == pytest.approx(1 / 3)
    assert m["unmappable"] == pytest.approx(1 / 3)
    assert m["per_label"] == {"negative": {"support": 1, "accuracy": 0.0}, "positive": {"support": 2, "accuracy": 0.5}}
    assert m["exact_match"] == pytest.approx(2 / 5)
    assert m["rougeL"] == pytest.approx((1 + 0 + 0 + 1 + rouge_l("Rome", "the city of Rome")) / 5)
    assert "generative_accuracy" not in generation_metrics(["x"], ["y"], [])


# -- data ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "hi"}, "no 'messages' (chat format) nor 'instruction'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "message 1 has no 'content'"),
        ({"messages": [{"content": "hi"}]}, "message 1 has no 'role'"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
        ({"messages": chat("hi")[:1]}, "no assistant turn"),
        ({"messages": chat("hi", "hello", "and?")}, "the last turn is 'user'"),
        ({"instruction": "Say hi"}, "without 'output'"),
        ({"instruction": "Say hi", "output": 3}, "'output' must be a string"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS[0]}, row])
    with pytest.raises(FinegrainError, match=r"bad\.jsonl:2: .*" + re.escape(message)):
        read_chat_examples(path)
    assert read_chat_examples(path, skip_bad_rows=True).skipped[0].startswith(f"{path}:2: ")


def test_unlabelled_conversations_may_end_with_a_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": chat("hi", "hello", "and?")}, {"instruction": "Say hi", "input": "x"}])
    examples = read_chat_examples(path, require_reference=False).examples
    assert [e.label for e in examples] == [None, None]
    assert examples[1].messages == [{"role": "user", "content": "Say hi\n\nx"}]
    assert examples[0].prompt_messages == examples[0].messages and examples[0].text == "and?"


def test_instruction_rows_become_conversations(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact."}])
    (example,) = read_chat_examples(path).examples
    assert example.messages == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert example.label == "5" and example.source == f"{path}:1"


def test_chat_files_read_as_every_reader_does(tmp_path):
    # Compressed files open as their content; bad rows and bad bytes end in the shared one-line errors.
    plain = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CONVERSATIONS])
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert [e.messages for e in read_chat_examples(packed).examples] == [e.messages for e in read_chat_examples(plain).examples]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS[0]}, {"text": "hi"}])
    with pytest.raises(FinegrainError, match=r"bad\.jsonl:2: .*; fix the row or skip bad rows \(--skip-bad-rows, or data\.skip_bad_rows: true\)$"):
        read_chat_examples(bad)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"instruction": "caf\u00e9", "output": "x"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(FinegrainError, match=r"latin\.jsonl: not UTF-8"):
        read_chat_examples(latin)


# -- tokens and loss -----------------------------------------------------------------------


def test_only_assistant_replies_carry_loss():
    tokenizer = tiny_tokenizer()
    messages = CONVERSATIONS[2]
    ids, targets = encode_conversation(tokenizer, messages, "x")
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    learnt = [t for t in targets if t != IGNORE_INDEX]
    # Each reply and its end-of-turn token, nothing of the user turns or the headers.
    assert tokenizer.decode(learnt) == "dull, slow<|im_end|>badly acted<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
    first = targets.index(learnt[0])
    assert tokenizer.decode(ids[: first + 1]) == prompt  # the first learnt token follows the generation prompt


def tiny_instruct(tiny_model_dir, packing=True, max_new_tokens=4):
    llama, tokenizer = load_model(tiny_model_dir, progress=False)
    task = InstructTask([], packing, max_new_tokens)
    return task, task.build_model(llama, tokenizer), tokenizer


def test_packing_leaks_nothing_across_conversations(tiny_model_dir):
    task, model, tokenizer = tiny_instruct(tiny_model_dir)
    apply_lora(model, LoraConfig(targets="all-linear"))
    with torch.no_grad():  # a non-zero adapter, so that the LoRA path counts too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    examples = [ChatExample(m, f"x:{i}") for i, m in enumerate(CONVERSATIONS)]
    packed = task.encode(tokenizer, examples, max_length=256)
    assert len(packed) == 1 and packed[0].lengths == sorted(packed[0].lengths, reverse=True)  # all in one row
    batch = task.collate(packed, tokenizer.pad_token_id)
    assert batch["attention_mask"].shape == (1, 1, len(packed[0].input_ids), len(packed[0].input_ids))
    together = model(batch)

    task.packing = False
    alone = {}
    for item in task.encode(tokenizer, examples, max_length=256):
        alone[item.prompts[0].index] = model(task.collate([item], tokenizer.pad_token_id))
    expected = torch.cat([alone[p.index] for p in packed[0].prompts])  # in the packed row's order
    torch.testing.assert_close(together, expected, rtol=1e-5, atol=1e-5)
    # Padding rows in a batch with a packed row changes nothing either.
    items = task.encode(tokenizer, examples[:1], 256) + packed
    torch.testing.assert_close(model(task.collate(items, tokenizer.pad_token_id))[len(alone[0]) :], together)


def test_frozen_prefix_cache_of_packed_rows_is_exact(tiny_model_dir):
    from finegrain.train.prefix_cache import compute_prefix

    task, model, tokenizer = tiny_instruct(tiny_model_dir)
    examples = [ChatExample(m, f"x:{i}") for i, m in enumerate(CONVERSATIONS)]
    items = task.encode(tokenizer, examples, max_length=100)  # rows 63+36 and 62+34 tokens
    assert [len(item.lengths) for item in items] == [2, 2]
    hidden = compute_prefix(model.model, task, items, 1, tokenizer.pad_token_id, progress=False)
    cached = model(task.collate(items, tokenizer.pad_token_id, hidden), start_layer=1)
    torch.testing.assert_close(cached, model(task.collate(items, tokenizer.pad_token_id)), rtol=1e-5, atol=1e-5)


def test_the_vocabulary_projection_sees_only_target_positions(tiny_model_dir):
    task, model, tokenizer = tiny_instruct(tiny_model_dir)
    items = task.encode(tokenizer, [ChatExample(m, "x") for m in CONVERSATIONS], max_length=100)
    batch = task.collate(items, tokenizer.pad_token_id)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape))
    losses = model(batch)
    targets = (batch["targets"] != IGNORE_INDEX).sum().item()
    assert rows == [(targets, model.model.config.hidden_size)] and losses.shape == (targets,)


def test_chunked_loss_matches_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2 * LOSS_CHUNK + 3, 8, requires_grad=True)
    targets = torch.randint(0, 50, (len(hidden),))
    losses = token_losses(lm_head, hidden, targets)
    expected = torch.nn.functional.cross_entropy(lm_head(hidden), targets, reduction="none")
    torch.testing.assert_close(losses, expected)
    losses.mean().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    expected.mean().backward()
    torch.testing.assert_close(grad, hidden.grad)


def test_truncated_conversations_keep_targets_inside_the_row(tiny_model_dir):
    task, model, tokenizer = tiny_instruct(tiny_model_dir, packing=False)
    (item,) = task.encode(tokenizer, [ChatExample(CONVERSATIONS[2], "x")], max_length=30)
    assert len(item.input_ids) == len(item.targets) == 30 and item.targets[-1] == IGNORE_INDEX
    (cut,) = task.encode(tokenizer, [ChatExample(CONVERSATIONS[2], "x")], max_length=5)
    batch = task.collate([cut], tokenizer.pad_token_id)
    loss = task.loss(model(batch), batch)  # no reply token left: a zero loss, not NaN
    assert loss.item() == 0.0


# -- the run -------------------------------------------------------------------------------


def instruct_files(tmp_path):
    reviews = [("A gripping, funny film.", "positive"), ("Dull, slow and badly acted.", "negative")] * 3
    rows = [{"messages": chat(f"Sentiment? {text}", label)} for text, label in reviews]
    rows += [{"messages": m} for m in CONVERSATIONS]
    rows.append({"instruction": "Name the capital of France.", "output": "Paris"})
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[:3] + rows[-2:])
    return train, test


def test_train_evaluate_predict_and_peft_parity(tiny_model_dir, tmp_path, monkeypatch, capsys):
    train, test = instruct_files(tmp_path)
    config = tmp_path / "instruct.yaml"
    config.write_text(yaml.safe_dump({
        "task": "instruct", "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(train), "validation": str(test), "test": str(test), "max_length": 96},
        "instruct": {"max_new_tokens": 3}, "lora": {"targets": "all-linear"},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-2, "prefix_cache": False, "metric": "rougeL"},
    }))  # a metric named: checked on four generated answers before training
    run = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "labels.json").read_text()) == ["negative", "positive"]
    test_metrics = metrics["test"]
    assert test_metrics["num_examples"] == 5 and test_metrics["label_examples"] == 3
    for key in ("rougeL", "token_f1", "exact_match", "generative_accuracy", "unmappable"):
        assert 0.0 <= test_metrics[key] <= 1.0
    assert metrics["train"]["examples"] == len(train.read_text().splitlines()) > metrics["train"]["rows"]  # packed
    report = (run / "report.md").read_text()
    assert "| prompt | reference | generated |" in report and "Sentiment? A gripping, funny film." in report
    assert (run / "report.html").exists()
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["modules_to_save"] is None
    assert not any("lm_head" in t for t in adapter["target_modules"])

    import finegrain

    predictor = finegrain.load(run)
    predictions = predictor.predict(["Sentiment? A gripping, funny film.", chat("hi", "hello", "and?")])
    assert [p["prompt"] for p in predictions] == ["Sentiment? A gripping, funny film.", "and?"]
    assert all(isinstance(p["generated"], str) for p in predictions)
    # The generation uses the adapter: the same greedy continuation as PEFT on transformers.
    from finegrain.generation import generate

    llama = predictor.model.llama
    prompt = predictor.tokenizer.apply_chat_template(chat("Sentiment? A gripping, funny film."))
    assert predictions[0]["generated"] == generate(llama, predictor.tokenizer, prompt, max_new_tokens=3)
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = torch.tensor([predictor.tokenizer.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, llama(ids), rtol=1e-4, atol=1e-4)

    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(test), "--output", str(tmp_path / "m.json")]) == 0
    assert "rougeL" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["rougeL"] == pytest.approx(test_metrics["rougeL"])
    assert main(["predict", str(run), "--input", str(test), "--output", str(tmp_path / "p.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and set(lines[0]) == {"messages", "prompt", "generated"}

    # finegrain chat: history kept, /reset, unknown commands, /exit; the reply streams.
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/oops\nand?\n/reset\nagain\n/exit\nnever read\n"))
    assert main(["chat", str(run), "--temperature", "0", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 6 and "conversation cleared" in out and "unknown command '/oops'" in out


def test_chat_keeps_history_and_resets(tiny_model_dir, monkeypatch, capsys):
    """The prompt of each turn holds the conversation so far; /reset leaves only the system turn."""
    import finegrain.generation as generation

    seen = []
    real = generation.generate

    def recording(model, tokenizer, prompts, **kwargs):
        seen.append(prompts)
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/reset\nthird\n"))  # ends with Ctrl-D (EOF)
    assert main(["chat", "--model", str(tiny_model_dir), "--system", "Be brief.", "--temperature", "0",
                 "--max-new-tokens", "2"]) == 0
    assert len(seen) == 3
    assert seen[0].count("<|im_start|>user") == 1 and "Be brief." in seen[0]
    assert seen[1].count("<|im_start|>user") == 2 and "first" in seen[1] and "second" in seen[1]
    assert seen[2].count("<|im_start|>user") == 1 and "first" not in seen[2] and "Be brief." in seen[2]


def test_chat_refuses_a_run_of_another_task(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "classification", "data": {"dataset": "sms_spam"}}))
    assert main(["chat", str(run)]) == 1
    assert "task classification" in capsys.readouterr().err


def test_config_errors_name_the_key(tiny_model_dir):
    from finegrain.config import RunConfig

    config = RunConfig(task="instruct")
    config.instruct.max_new_tokens = 0
    with pytest.raises(FinegrainError, match="instruct.max_new_tokens"):
        InstructTask.from_config(config, [])
    config = RunConfig(task="instruct")
    config.model.bidirectional = True
    with pytest.raises(FinegrainError, match="model.bidirectional"):
        InstructTask.from_config(config, [])
    data = copy.deepcopy(config.data)
    data.dataset = "sms_spam"
    with pytest.raises(FinegrainError, match="data.dataset"):
        InstructTask.load_splits(data)


def test_splits_come_out_of_train_when_not_given(tmp_path):
    from finegrain.config import DataConfig

    rows = [{"messages": chat(f"q{i}", "positive" if i % 2 else "negative")} for i in range(20)]
    data = DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), split=[0.6, 0.2, 0.2])
    splits = InstructTask.load_splits(data)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (12, 4, 4)
    assert splits.labels == ["negative", "positive"]
    assert sorted(e.label for e in splits.test) == ["negative", "negative", "positive", "positive"]


@pytest.mark.real_model
def test_chat_template_of_the_default_model_gives_assistant_targets():
    _, tokenizer = load_model(None, progress=False)
    ids, targets = encode_conversation(tokenizer, chat("What is the capital of France?", "Paris"), "x")
    learnt = [t for t in targets if t != IGNORE_INDEX]
    assert tokenizer.decode(learnt) == "Paris<|im_end|>"
    # The template's default system turn is in the prompt, and the prompt encodes the same alone.
    prompt = tokenizer.apply_chat_template(chat("What is the capital of France?"))
    assert "SmolLM" in prompt
    assert ids[: len(tokenizer.encode(prompt))] == tokenizer.encode(prompt)
