"""Extractive QA: SQuAD metrics against the official v2.0 rules (hand-computed), the SQuAD reader and
its errors, token offsets, context windows, span decoding across windows, training, and the CLI."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from finegrain.checkpoint.load import load_model
from finegrain.config import TrainConfig, load_config
from finegrain.data.squad import Answer, QAExample, read_squad, split_qa_examples
from finegrain.errors import FinegrainError
from finegrain.evaluate.squad import best_scores, exact_match, f1_score, normalize_answer, squad_metrics
from finegrain.peft import LoraConfig, apply_lora
from finegrain.tasks.qa import QATask, window_starts
from finegrain.train.trainer import Trainer, predict_outputs

FIXTURE = "examples/data/squad"


@pytest.fixture
def backbone_and_tokenizer(tiny_model_dir):
    llama, tokenizer = load_model(str(tiny_model_dir), progress=False)
    return llama.model, tokenizer


def example(context: str, answer: str | None, question: str = "Where is the film?", occurrence: int = 0, source="t:1"):
    """A QA example whose answer is the `occurrence`-th appearance of `answer` in `context`."""
    if answer is None:
        return QAExample(question, context, [], source, source)
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return QAExample(question, context, [Answer(answer, start)], source, source)


# --- metrics: the official SQuAD v2.0 rules, expected values worked out by hand ---------------


def test_normalize_answer_follows_the_official_rules():
    # lower case -> remove punctuation -> remove the articles a/an/the -> collapse whitespace
    assert normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert normalize_answer("An apple a DAY") == "apple day"
    assert normalize_answer("theatre Anna") == "theatre anna"  # articles only as whole words
    assert normalize_answer("  U.S.A.\n") == "usa"
    assert normalize_answer("the") == "" and normalize_answer("") == ""


def test_exact_match_and_f1_on_token_bags():
    assert exact_match("Robert Stevenson.", "robert stevenson") == 1
    assert exact_match("Robert", "Robert Stevenson") == 0
    # "cat sat on mat" vs "cat on mat": 3 shared, P = 3/4, R = 3/3, F1 = 2PR/(P+R) = 6/7
    assert f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # bags, not sets: "paris paris" vs "paris" shares 1: P = 1/2, R = 1, F1 = 2/3
    assert f1_score("Paris Paris", "Paris") == pytest.approx(2 / 3)
    assert f1_score("London", "Paris") == 0.0
    # an empty side (no answer) scores 1 only against another empty side
    assert f1_score("", "") == 1.0 and f1_score("Paris", "") == 0.0 and f1_score("", "Paris") == 0.0


def test_best_scores_take_the_maximum_over_gold_answers_and_handle_no_answer():
    # "river limmat" vs "limmat": P = 1/2, R = 1 -> 2/3; vs "river limmat flows": P = 1, R = 2/3 -> 4/5
    assert best_scores("the river Limmat", ["Limmat", "river Limmat flows"]) == (0, pytest.approx(0.8))
    assert best_scores("Limmat", ["Limmat", "river Limmat flows"]) == (1, 1.0)
    assert best_scores("", []) == (1, 1.0)  # unanswerable: the gold answer is ""
    assert best_scores("Paris", []) == (0, 0.0)
    # gold answers that normalise to nothing are dropped, leaving ""
    assert best_scores("", ["The", "a"]) == (1, 1.0) and best_scores("an", ["The"]) == (1, 1.0)


def test_squad_metrics_overall_and_by_answerability():
    predictions = ["Robert Stevenson", "the cat sat on the mat", "", "Paris"]
    answers = [["Robert Stevenson"], ["a cat on a mat"], [], []]
    metrics = squad_metrics(predictions, answers, context_words=[40, 120, 40, 500])
    # exact: 1, 0, 1, 0; F1: 1, 6/7, 1, 0
    assert metrics["num_examples"] == 4
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert metrics["f1"] == pytest.approx((1 + 6 / 7 + 1 + 0) / 4, abs=1e-6)
    assert metrics["has_answer_count"] == 2 and metrics["no_answer_count"] == 2
    assert metrics["has_answer_exact_match"] == pytest.approx(0.5)
    assert metrics["has_answer_f1"] == pytest.approx((1 + 6 / 7) / 2, abs=1e-6)
    assert metrics["no_answer_exact_match"] == metrics["no_answer_f1"] == pytest.approx(0.5)
    by_answer = {row["bucket"]: row for row in metrics["by_answer_length"]}
    assert by_answer["no answer"]["count"] == 2 and by_answer["2"]["f1"] == 1.0 and by_answer["5-8"]["count"] == 1
    by_context = {row["bucket"]: row["count"] for row in metrics["by_context_length"]}
    assert by_context == {"1-50": 2, "101-200": 1, ">400": 1}
    only_answerable = squad_metrics(["x"], [["x"]])
    assert "no_answer_f1" not in only_answerable and only_answerable["no_answer_count"] == 0


# --- reading SQuAD files -------------------------------------------------------------------


def test_reads_the_bundled_fixture_with_exact_answer_offsets():
    sizes = {}
    for name in ("train", "dev", "test"):
        examples = read_squad(f"{FIXTURE}/{name}.json").examples
        sizes[name] = len(examples)
        for ex in examples:
            for text, start in ex.answers:
                assert ex.context[start : start + len(text)] == text
        assert sum(ex.answers == [] for ex in examples) >= 2  # unanswerable questions in every split
    assert sizes == {"train": 43, "dev": 10, "test": 20}
    first = read_squad(f"{FIXTURE}/train.json").examples[0]
    assert first.id == "train-001" and first.title == "Bell Rock Lighthouse"
    line = first.source.rsplit(":", 1)[1]
    assert '"id": "train-001"' in open(f"{FIXTURE}/train.json").read().splitlines()[int(line)]


def squad_file(tmp_path, qas, context="Paris is the capital of France.", version="v2.0", name="s.json"):
    document = {"version": version, "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}
    path = tmp_path / name
    path.write_text(json.dumps(document, indent=1))
    return path


def test_reads_v1_v2_and_jsonl_layouts(tmp_path):
    v1 = squad_file(tmp_path, [{"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]}],
                    version="1.1")
    assert read_squad(v1).examples[0].answers == [Answer("Paris", 0)]
    v2 = squad_file(tmp_path, [{"id": "q1", "question": "Who?", "answers": [], "is_impossible": True,
                                "plausible_answers": [{"text": "Paris", "answer_start": 0}]}])
    assert read_squad(v2).examples[0].answers == []
    rows = [
        {"id": "a", "question": "Capital?", "context": "Paris is nice.", "answers": {"text": ["Paris"], "answer_start": [0]}},
        {"id": "b", "question": "Who?", "context": "Paris is nice.", "answers": {"text": [], "answer_start": []}},
        {"id": "c", "question": "Nice?", "context": "Paris is nice.", "answers": [{"text": "nice", "answer_start": 9}]},
    ]
    for suffix in ("jsonl", "json"):  # `datasets` writes JSON lines, whatever the extension
        path = tmp_path / f"rows.{suffix}"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        examples = read_squad(path).examples
        assert [e.label for e in examples] == [["Paris"], [], ["nice"]]
        assert [e.source for e in examples] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    unlabelled = tmp_path / "questions.jsonl"
    unlabelled.write_text(json.dumps({"question": "Capital?", "context": "Paris."}) + "\n")
    with pytest.raises(FinegrainError, match=r"questions.jsonl:1: no 'answers'"):
        read_squad(unlabelled)
    assert read_squad(unlabelled, require_answers=False).examples[0].answers is None


@pytest.mark.parametrize(
    "qa, message",
    [
        ({"id": "q", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 3}]},
         r"s.json:10: answer 'Paris' is not at answer_start 3 \(found 'is is'\); the text occurs at 0"),
        ({"id": "q", "question": "Capital?", "answers": [{"text": "Lyon", "answer_start": 0}]},
         r"s.json:10: answer 'Lyon' .*the text does not occur in the context"),
        ({"id": "q", "question": "Capital?", "answers": [{"text": "France.", "answer_start": 40}]},
         r"s.json:10: answer_start 40 of 'France.' runs outside the context \(31 characters\)"),
        ({"id": "q", "question": " ", "answers": [{"text": "Paris", "answer_start": 0}]},
         r"s.json:10: missing or empty 'question'"),
        ({"id": "q", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": True},
         r"s.json:10: 'is_impossible' is true but there are answers"),
        ({"id": "q", "question": "Capital?", "answers": [], "is_impossible": False},
         r"s.json:10: no 'answers'; give at least one or set \"is_impossible\": true"),
        ({"id": "q", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": "0"}]},
         r"s.json:10: answer 'Paris' needs an integer 'answer_start'"),
    ],
)
def test_bad_questions_name_file_and_line(tmp_path, qa, message):
    path = squad_file(tmp_path, [qa])
    with pytest.raises(FinegrainError, match=message) as error:
        read_squad(path)
    assert "\n" not in str(error.value) and "data.skip_bad_rows" in str(error.value)


def test_missing_context_duplicate_ids_broken_json_and_skipping(tmp_path):
    path = squad_file(tmp_path, [{"id": "q", "question": "Capital?", "answers": []}], context="")
    with pytest.raises(FinegrainError, match=r"s.json:7: missing or empty 'context'"):  # the paragraph's line
        read_squad(path)
    good = {"id": "q", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]}
    bad = {"id": "r", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 1}]}
    path = squad_file(tmp_path, [good, dict(good)])
    with pytest.raises(FinegrainError, match=r"id 'q' is already used at line 10"):
        read_squad(path)
    path = squad_file(tmp_path, [good, bad])
    result = read_squad(path, skip_bad_rows=True)
    assert [e.id for e in result.examples] == ["q"] and len(result.skipped) == 1
    assert result.skipped[0].startswith(f"{path}:20: answer 'Paris' is not at answer_start 1")
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "v2.0",\n "data": [\n  {"title": "x",}\n ]}\n')
    with pytest.raises(FinegrainError, match=r"broken.json:3: invalid JSON"):
        read_squad(broken)
    with pytest.raises(FinegrainError, match="file not found"):
        read_squad(tmp_path / "missing.json")


def test_splitting_keeps_each_context_whole():
    examples = read_squad(f"{FIXTURE}/train.json").examples
    parts = split_qa_examples(examples, (0.6, 0.2, 0.2), seed=1)
    assert sorted(e.id for part in parts for e in part) == sorted(e.id for e in examples)
    contexts = [{e.context for e in part} for part in parts]
    assert not (contexts[0] & contexts[1]) and not (contexts[0] & contexts[2]) and not (contexts[1] & contexts[2])
    assert parts == split_qa_examples(examples, (0.6, 0.2, 0.2), seed=1)


# --- tokens, windows, decoding ---------------------------------------------------------------

UNICODE_CONTEXT = "The Café Odeon in Zürich — opened  1911 😀 at Limmatquai 2.\tIt serves 東京 tea  and coffee."


def covered_text(text: str, offsets) -> str:
    """The text the token spans cover, left to right. Tokens holding part of a character's bytes
    span the whole character, so neighbours may overlap there; nothing may be missed or reordered."""
    out, end = [], 0
    for s, e in offsets:
        assert s <= max(end, s) <= e and s <= end  # no gap, no going back
        out.append(text[max(s, end) : e])
        end = max(end, e)
    return "".join(out)


def test_encode_with_offsets_gives_the_ids_of_encode_and_exact_character_spans(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    texts = [UNICODE_CONTEXT, " leading and trailing  ", "plain"]
    for text, (ids, offsets) in zip(texts, tokenizer.encode_with_offsets(texts)):
        assert ids == tokenizer.encode(text, add_special_tokens=False) and len(offsets) == len(ids)
        assert covered_text(text, offsets) == text
    ids, offsets = tokenizer.encode_with_offsets(["Zürich"])[0]
    assert [o for o, token in zip(offsets, ids) if tokenizer.decode([token]) == "Z"] == [(0, 1)]


@pytest.mark.real_model
def test_encode_with_offsets_on_the_default_model_tokenizer():
    from finegrain.checkpoint.gguf import read_gguf_metadata
    from finegrain.checkpoint.load import resolve_model
    from finegrain.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(read_gguf_metadata(resolve_model("smollm2-135m")))
    ids, offsets = tokenizer.encode_with_offsets([UNICODE_CONTEXT])[0]
    assert ids == tokenizer.encode(UNICODE_CONTEXT, add_special_tokens=False)
    assert covered_text(UNICODE_CONTEXT, offsets) == UNICODE_CONTEXT


def test_window_starts_overlap_by_the_stride():
    assert window_starts(10, 10, 3) == [0]
    assert window_starts(25, 10, 3) == [0, 7, 14, 21]
    assert window_starts(24, 10, 3) == [0, 7, 14]  # 14 + 10 covers all 24 tokens
    assert window_starts(11, 10, 0) == [0, 10]


def long_context(n_sentences: int = 30, city_at: int = 25) -> tuple[str, str]:
    fillers = ["the film was good", "the story was bad", "the actors were fine", "the cast was great"]
    sentences = [f"{fillers[i % 4].capitalize()} in part {i}." for i in range(n_sentences)]
    sentences[city_at] = "The film is in Paris."
    return " ".join(sentences), "Paris"


def test_long_contexts_are_windowed_with_the_stride_and_the_answer_lands_in_its_windows(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    context, answer = long_context()
    ex = example(context, answer)
    task = QATask(stride=8, max_answer_length=10)
    items = task.encode(tokenizer, [ex], max_length=64)
    ids, offsets = tokenizer.encode_with_offsets([context])[0]
    prefix = items[0].input_ids[: items[0].context_start]
    assert len(items) > 3 and all(len(item.input_ids) <= 64 for item in items)
    assert all(item.input_ids[: item.context_start] == prefix for item in items)  # the whole question every time
    assert tokenizer.decode(prefix).startswith("Question: Where is the film?")
    # Windows tile the context, neighbours sharing exactly `stride` tokens.
    spans = [item.offsets for item in items]
    for before, after in zip(spans, spans[1:]):
        assert before[-8:] == after[:8]
    assert [o for o in spans[0]] + [o for span in spans[1:] for o in span[8:]] == offsets
    start = context.index(answer)
    for item in items:
        null = len(item.input_ids) - 1
        holds = item.offsets[0][0] <= start and start + len(answer) <= item.offsets[-1][1]
        assert (item.target != (null, null)) == holds  # the windows that hold the answer whole; the rest: no answer
        if holds:
            s, e = (p - item.context_start for p in item.target)
            assert context[item.offsets[s][0] : item.offsets[e][1]].strip() == answer
    assert 1 <= sum(item.target[0] != len(item.input_ids) - 1 for item in items) <= 2


def test_a_question_that_leaves_no_room_for_the_context_is_a_one_line_error(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    ex = example("Paris is nice.", "Paris", question="Where " * 40, source="q.json:7")
    with pytest.raises(FinegrainError, match=r"q.json:7: the question and prompt take .* qa.stride=8"):
        QATask(stride=8).encode(tokenizer, [ex], max_length=32)


def logits_for(items, spans: dict[int, tuple[int, int, float]], width: int) -> torch.Tensor:
    """Start/end logits (N, width, 2): 0 everywhere, `value` at the start and end of each window's chosen span
    (context token indices), and -5 on every null position."""
    logits = torch.zeros(len(items), width, 2)
    for row, item in enumerate(items):
        logits[row, len(item.input_ids) - 1] = -5.0
        if row in spans:
            i, j, value = spans[row]
            logits[row, item.context_start + i, 0] = value
            logits[row, item.context_start + j, 1] = value
    return logits


def token_span(item, context: str, answer: str, occurrence: int = 0) -> tuple[int, int]:
    """Context token indices of the window holding `answer`."""
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    end = start + len(answer)
    first = next(k for k, (_, e) in enumerate(item.offsets) if e > start)
    last = max(k for k, (s, _) in enumerate(item.offsets) if s < end)
    return first, last


@pytest.mark.parametrize("answer", ["Café Odeon", "Zürich", "1911 😀", "東京 tea", "Limmatquai 2.", "coffee."])
def test_answers_map_back_to_exact_character_offsets(backbone_and_tokenizer, answer):
    _, tokenizer = backbone_and_tokenizer
    task = QATask(stride=4, max_answer_length=12)
    items = task.encode(tokenizer, [example(UNICODE_CONTEXT, answer)], 160)
    assert len(items) == 1
    i, j = token_span(items[0], UNICODE_CONTEXT, answer)
    [prediction] = task.decode(logits_for(items, {0: (i, j, 8.0)}, 160), items)
    assert prediction["answer"] == answer
    assert UNICODE_CONTEXT[prediction["start"] : prediction["end"]] == answer
    assert 0 < prediction["score"] <= 1


def test_the_best_span_is_chosen_across_windows(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    context, _ = long_context(city_at=25)
    context = context.replace("part 3.", "Rome.", 1)
    task = QATask(stride=8, max_answer_length=10)
    [ex] = [example(context, "Paris")]
    items = task.encode(tokenizer, [ex], 48)
    rome = next(k for k, item in enumerate(items) if "Rome" in context[item.offsets[0][0] : item.offsets[-1][1]])
    paris = max(k for k, item in enumerate(items) if "Paris" in context[item.offsets[0][0] : item.offsets[-1][1]])
    assert rome != paris
    spans = {rome: (*token_span(items[rome], context, "Rome"), 5.0), paris: (*token_span(items[paris], context, "Paris"), 9.0)}
    [prediction] = task.decode(logits_for(items, spans, 48), items)
    assert prediction["answer"] == "Paris" and context[prediction["start"] : prediction["end"]] == "Paris"
    assert prediction["start"] == context.index("Paris")  # offsets in the whole context, not the window
    spans[rome] = (*spans[rome][:2], 12.0)
    assert task.decode(logits_for(items, spans, 48), items)[0]["answer"] == "Rome"


def test_max_answer_length_bounds_the_span(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    context = "The film was good and the story was bad in Paris."
    items = QATask(stride=4).encode(tokenizer, [example(context, "good and the story was bad")], 64)
    i, j = token_span(items[0], context, "good and the story was bad")
    logits = logits_for(items, {0: (i, j, 8.0)}, 64)
    assert QATask(max_answer_length=j - i + 1).decode(logits, items)[0]["answer"] == "good and the story was bad"
    shorter = QATask(max_answer_length=2).decode(logits, items)[0]
    assert len(tokenizer.encode(shorter["answer"], add_special_tokens=False)) <= 3  # ≤ 2 tokens (+ a space merge)
    assert shorter["answer"] != "good and the story was bad" and shorter["answer"] in context


def test_no_answer_when_the_null_span_wins(backbone_and_tokenizer):
    _, tokenizer = backbone_and_tokenizer
    context = "The film was good in Paris."
    items = QATask(stride=4).encode(tokenizer, [example(context, None)], 64)
    i, j = token_span(items[0], context, "Paris")
    logits = logits_for(items, {0: (i, j, 3.0)}, 64)
    logits[0, len(items[0].input_ids) - 1] = 6.0  # the null token
    no_answer = QATask().decode(logits, items)[0]
    assert no_answer == {"answer": "", "start": None, "end": None, "score": no_answer["score"]} and no_answer["score"] > 0.5
    assert QATask(no_answer=False).decode(logits, items)[0]["answer"] == "Paris"
    assert QATask(null_threshold=10.0).decode(logits, items)[0]["answer"] == "Paris"
    # Whitespace-only tokens never start or end an answer.
    spaced = "Paris  \t  is nice."
    items = QATask(stride=4).encode(tokenizer, [example(spaced, None)], 64)
    blank = [k for k, (s, e) in enumerate(items[0].offsets) if not spaced[s:e].strip()]
    assert blank
    [prediction] = QATask(no_answer=False).decode(logits_for(items, {0: (blank[0], blank[-1], 9.0)}, 64), items)
    assert prediction["answer"] and prediction["answer"] == prediction["answer"].strip()


# --- model, training ----------------------------------------------------------------------------


def city_questions(n: int, seed: int) -> list[QAExample]:
    """Where is the film? In a city of the context, or nowhere (no answer) for a third of them."""
    rng = random.Random(seed)
    fillers = ["the story was bad", "the actors were fine", "the cast was great", "the movie was good"]
    out = []
    for k in range(n):
        parts = [rng.choice(fillers) for _ in range(rng.randint(1, 3))]
        city = rng.choice(["Paris", "London", "Rome"]) if k % 3 else None
        if city:
            parts.insert(rng.randint(0, len(parts)), f"the film is in {city}")
        context = ", ".join(parts) + "."
        out.append(example(context, city, source=f"toy:{k + 1}"))
    return out


def test_collate_loss_and_outputs_that_stack_across_batches(backbone_and_tokenizer):
    backbone, tokenizer = backbone_and_tokenizer
    task = QATask(stride=4)
    items = task.encode(tokenizer, city_questions(9, seed=0), 48)
    batch = task.collate(items[:3], tokenizer.pad_token_id)
    T = batch["input_ids"].shape[1]
    assert batch["span_mask"].shape == (3, T) and batch["starts"].shape == batch["ends"].shape == (3,)
    for row, item in enumerate(items[:3]):
        assert batch["span_mask"][row, len(item.input_ids) - 1]  # the null token
        assert int(batch["span_mask"][row].sum()) == len(item.offsets) + 1
    model = task.build_model(SimpleNamespace(model=backbone)).eval()
    loss = task.loss(model(batch), batch)
    assert torch.isfinite(loss) and loss > 0
    outputs = predict_outputs(model, task, items, tokenizer.pad_token_id, batch_size=4)
    assert len(items) > 9 and outputs.shape == (len(items), 48, 2)  # several windows per question
    alone = predict_outputs(model, task, items[:1], tokenizer.pad_token_id)
    assert_close(outputs[0], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [None, [1]])
def test_training_through_the_trainer_learns_to_answer(backbone_and_tokenizer, tmp_path, layers):
    backbone, tokenizer = backbone_and_tokenizer
    backbone.config.causal = False
    task = QATask(stride=4, max_answer_length=6)
    model = task.build_model(SimpleNamespace(model=backbone))
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", layers=layers, modules_to_save=["score"]))
    train, validation = city_questions(150, seed=1), city_questions(30, seed=2)
    train_items, val_items = task.encode(tokenizer, train, 96), task.encode(tokenizer, validation, 96)

    def score(predictions):
        return task.metrics(predictions, task.gold(validation))

    config = TrainConfig(epochs=4, lr=1e-2, batch_size=16, threads=1, checkpoint_every=1000)
    trainer = Trainer(model, task, train_items, config, tmp_path, tokenizer.pad_token_id, val_items, score, progress=False)
    state = trainer.fit()
    assert trainer.start_layer == (1 if layers else 0)
    best = state.best_validation
    assert best["f1"] > 0.6 and best["has_answer_f1"] > 0.3 and best["no_answer_f1"] > 0.3  # untrained: ~0
    predictions = task.predict(model, val_items, tokenizer.pad_token_id, 8, trainer.validation_hidden, trainer.start_layer)
    assert len(predictions) == len(validation)
    for ex, prediction in zip(validation, predictions):
        if prediction["start"] is not None:
            assert ex.context[prediction["start"] : prediction["end"]] == prediction["answer"]
    if layers:  # the cached lower-layer states give the outputs of a full pass
        full = predict_outputs(model, task, val_items, tokenizer.pad_token_id, batch_size=8)
        cached = predict_outputs(model, task, val_items, tokenizer.pad_token_id, 8, trainer.validation_hidden, 1)
        assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_config_errors_name_the_key(tmp_path):
    base = tmp_path / "qa.yaml"
    base.write_text("task: qa\ndata: {train: x.json, max_length: 64}\nqa: {stride: 16}\n")
    for override, key in (
        ("qa.stride=64", "qa.stride"), ("qa.stride=-1", "qa.stride"), ("qa.max_answer_length=0", "qa.max_answer_length"),
        ("head.class_weights=balanced", "head.class_weights"), ("data.template='Q: {text}'", "data.template"),
    ):
        with pytest.raises(FinegrainError, match=key.replace(".", r"\.")):
            QATask.from_config(load_config(base, [override]), [])
    with pytest.raises(FinegrainError, match=r"qa\.strid.*did you mean 'qa\.stride'"):
        load_config(base, ["qa.strid=3"])
    task = QATask.from_config(load_config(base, ["qa.no_answer=false", "qa.stride=16"]), [])
    assert task.stride == 16 and task.no_answer is False


def test_examples_from_inputs():
    task = QATask()
    examples = task.examples_from_inputs(
        [{"question": "Where?", "context": "In Paris.", "id": "x"}, '{"question": "Who?", "context": "Anna."}'], None
    )
    assert [(e.id, e.question, e.answers) for e in examples] == [("x", "Where?", None), ("input:2", "Who?", None)]
    with pytest.raises(FinegrainError, match=r"input:1: 'context' must be a non-empty text"):
        task.examples_from_inputs([{"question": "Where?"}], None)
    with pytest.raises(FinegrainError, match=r"input:1: expected \{\"question\""):
        task.examples_from_inputs(["just a text"], None)


# --- end to end through the CLI -------------------------------------------------------------


def test_cli_train_evaluate_predict_qa(tiny_model_dir, tmp_path, capsys):
    import yaml

    import finegrain
    from finegrain.cli import main

    config = {
        "task": "qa",
        "model": {"name": str(tiny_model_dir), "bidirectional": True},
        "data": {"train": f"{FIXTURE}/train.json", "validation": f"{FIXTURE}/dev.json", "test": f"{FIXTURE}/test.json",
                 "max_length": 160},
        "qa": {"stride": 16, "max_answer_length": 12},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [1]},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 16, "threads": 1, "checkpoint_every": 1000},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["train", str(tmp_path / "run.yaml"), "--output", str(run_dir)]) == 0
    assert "has answer" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics["test"]
    assert test["num_examples"] == 20 and 0 <= test["f1"] <= 1 and test["no_answer_count"] == 3
    assert metrics["validation"]["num_examples"] == 10 and json.loads((run_dir / "labels.json").read_text()) == []
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "QUESTION_ANS" and adapter["modules_to_save"] == ["score"]
    report = (run_dir / "report.md").read_text()
    assert "has answer" in report and "no answer" in report and "f1_by_length.png" in report
    assert (run_dir / "f1_by_length.png").stat().st_size > 1000 and "data:image/png;base64" in (run_dir / "report.html").read_text()

    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(run_dir), "--data", f"{FIXTURE}/test.json", "--output", str(out)]) == 0
    assert "all questions" in capsys.readouterr().out
    assert json.loads(out.read_text())["f1"] == pytest.approx(test["f1"], abs=1e-6)

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "Where is the film?", "context": UNICODE_CONTEXT}) + "\n")
    predictions = tmp_path / "predictions.jsonl"
    assert main(["predict", str(run_dir), "--input", str(questions), "--output", str(predictions)]) == 0
    row = json.loads(predictions.read_text())
    assert row["id"] == "q1" and set(row) == {"id", "question", "answer", "start", "end", "score"}
    if row["start"] is not None:
        assert UNICODE_CONTEXT[row["start"] : row["end"]] == row["answer"]

    [python] = finegrain.load(run_dir).predict([{"question": "Where is the film?", "context": UNICODE_CONTEXT}])
    assert python == {k: row[k] for k in ("answer", "start", "end", "score")}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"question": "Capital?", "context": "Paris.", "answers": {"text": ["Lyon"], "answer_start": [0]}}))
    assert main(["evaluate", str(run_dir), "--data", str(bad)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"finegrain evaluate: error: {bad}:1: answer 'Lyon' is not at answer_start 0") and "\n" not in error
