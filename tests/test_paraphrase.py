"""Paraphrase augmentation (finegrain.paraphrase): a reply cleaned to its rewrite, rewrites kept where
the judge gives the original's label, a run that trains on them, writes them down and reads them
back on resume, `evaluate --robustness --paraphrase`, and one-line errors. The instruct model is the
tiny random one (its rewrites are noise) or a stand-in; one marked test asks the real default model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import finegrain.paraphrase as paraphrase
import finegrain.run
from finegrain import load, rundir
from finegrain.cli import main
from finegrain.config import AugmentConfig, load_config
from finegrain.data.readers import Example
from finegrain.errors import FinegrainError
from finegrain.run import judge_run, paraphrase_training, train
from finegrain.tasks import task_class
from finegrain.tasks.classification import ClassificationTask
from finegrain.train.agreement import AgreeingObjective, Agreement
from finegrain.train.objectives import TaskObjective

from test_train import assert_same_adapter, train_cli, write_config, write_data

EXAMPLES = [Example(f"text number {i} is {'good' if i % 2 else 'bad'}", "fresh" if i % 2 else "rotten", f"f:{i + 1}")
            for i in range(10)]


def stand_in(texts):
    """A paraphraser stand-in: "indeed" added to each text, none for the texts of number 3 or 6."""
    return [None if ("number 3 " in t or "number 6 " in t) else t + " indeed" for t in texts]


@pytest.mark.parametrize("reply, rewrite", [
    ("Paraphrased sentence: The film is a delight.", "The film is a delight."),
    ('Here is the revised sentence: "A dull plot."\nI hope this helps.', "A dull plot."),
    ("\n  'Quietly moving.'  ", "Quietly moving."),
    ("the film, is GOOD!", None),  # the original's words again
    ("Here's a revised version of the sentence:", None),  # announces one, gives none
    (" ".join(["word"] * 14), None),  # more than twice the original's words and five more
    ("   ", None),
])
def test_a_reply_is_cleaned_to_its_rewrite(reply, rewrite):
    assert paraphrase.clean("The film is good.", reply) == rewrite


def test_rewrites_are_kept_where_the_judge_gives_the_originals_label():
    judge = lambda texts: ["fresh"] * len(texts)  # noqa: E731 - says fresh of everything
    kept, records = paraphrase.paraphrase_examples(EXAMPLES, 0.8, seed=1, write=stand_in, judge=judge)
    assert len(records) == 8 and len({r["index"] for r in records}) == 8  # round(0.8 * 10), drawn without repeats
    for r in records:
        assert r["text"] == EXAMPLES[r["index"]].text and r["label"] == EXAMPLES[r["index"]].label
        written = r["index"] not in (3, 6)
        assert r["paraphrase"] == (EXAMPLES[r["index"]].text + " indeed" if written else None)
        assert r["judged"] == ("fresh" if written else None)
        assert r["kept"] == (written and r["label"] == "fresh")
    assert [(e.text, e.label, e.source) for e in kept] == [
        (r["paraphrase"], r["label"], f"{r['source']} (paraphrase)") for r in records if r["kept"]]
    again, _ = paraphrase.paraphrase_examples(EXAMPLES, 0.8, seed=1, write=stand_in, judge=judge)
    other, _ = paraphrase.paraphrase_examples(EXAMPLES, 0.8, seed=2, write=stand_in, judge=judge)
    assert again == kept and [e.source for e in other] != [e.source for e in kept]
    assert all(paraphrase.is_paraphrase(e) for e in kept) and not any(paraphrase.is_paraphrase(e) for e in EXAMPLES)
    unjudged, records = paraphrase.paraphrase_examples(EXAMPLES, 0.8, seed=1, write=stand_in, judge=None)
    assert [r["kept"] for r in records] == [r["index"] not in (3, 6) for r in records]  # every usable rewrite
    assert all(r["judged"] is None for r in records) and len(unjudged) == 6


def test_the_tfidf_judge_learns_the_training_split():
    judge = paraphrase.tfidf_judge(EXAMPLES * 3, ["fresh", "rotten"])
    assert judge(["it is good", "it is bad"]) == ["fresh", "rotten"] and judge([]) == []


def test_the_tiny_model_rewrites_the_same_for_the_same_seed(tiny_model_dir):
    from finegrain.checkpoint.load import load_model

    tiny_model, tiny_tokenizer = load_model(str(tiny_model_dir), progress=False)
    texts = ["a good film", "a bad and dull film with a plot", "fine"]
    first = paraphrase.rewrite(tiny_model, tiny_tokenizer, texts, seed=0, batch_size=2)
    assert len(first) == 3 and all(t is None or isinstance(t, str) for t in first)
    assert paraphrase.rewrite(tiny_model, tiny_tokenizer, texts, seed=0, batch_size=2) == first
    tiny_tokenizer.chat_template = None
    with pytest.raises(FinegrainError, match="augment.paraphraser: the model has no chat template"):
        paraphrase.rewrite(tiny_model, tiny_tokenizer, texts, seed=0)


def test_a_run_trains_on_the_kept_paraphrases_and_reads_them_back_on_resume(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "data.jsonl", 60)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    turns = {"great fun film": "badly acted", "dull and slow": "a gripping story"}  # rewrites of the other label

    def stand_in_run(llama, tokenizer, texts, *args, **kwargs):
        return [next((t.replace(a, b) for a, b in turns.items() if a in t), t + " indeed") for t in texts]

    monkeypatch.setattr(paraphrase, "rewrite", stand_in_run)
    run_dir = tmp_path / "run"
    overrides = [f"output={run_dir}", "augment.paraphrase=0.5", f"augment.paraphraser={tiny_model_dir}"]
    plain = train(load_config(str(config), [f"output={tmp_path / 'plain'}"]), progress=False)
    results = train(load_config(str(config), overrides), progress=False)
    records = [json.loads(line) for line in (run_dir / "paraphrases.jsonl").read_text().splitlines()]
    kept = sum(r["kept"] for r in records)
    assert len(records) == results["train"]["paraphrases"] == round(0.5 * plain["train"]["examples"])
    assert 0 < kept < len(records)  # the TF-IDF judge keeps some rewrites, not those turned to the other label
    assert results["train"]["augmented"] == {"paraphrase": kept}
    assert results["train"]["examples"] == plain["train"]["examples"] + kept

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run generates again")

    monkeypatch.setattr(paraphrase, "rewrite", refuse)
    monkeypatch.setattr(finegrain.run, "load_paraphraser", refuse)
    run_config = load_config(str(config), overrides)
    splits = task_class("classification").load_splits(run_config.data)
    again, tried = paraphrase_training(run_config, splits, run_dir, resume=True, writes=False, progress=False)
    assert tried == len(records) and [e.text for e in again] == [r["paraphrase"] for r in records if r["kept"]]
    lines = (run_dir / "paraphrases.jsonl").read_text().splitlines()
    damaged = json.loads(lines[1])
    damaged["text"] = "not a training text"
    (run_dir / "paraphrases.jsonl").write_text("\n".join([lines[0], json.dumps(damaged), *lines[2:]]) + "\n")
    with pytest.raises(FinegrainError, match=r"paraphrases.jsonl:2: rewrites a text the training split does not hold"):
        paraphrase_training(run_config, splits, run_dir, resume=True, writes=False, progress=False)


def test_judge_self_trains_the_config_without_augmentation_first(tiny_model_dir, tmp_path, monkeypatch):
    """`augment.judge: self` trains RUN/judge and judges with it: the same verdicts and the same run as
    naming a finished run of the config, trained beforehand, as the judge."""
    data = write_data(tmp_path / "data.jsonl", 60)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    monkeypatch.setattr(paraphrase, "rewrite", lambda llama, tokenizer, texts, *args, **kwargs: [t + " indeed" for t in texts])
    common = ["augment.paraphrase=0.5", f"augment.paraphraser={tiny_model_dir}"]
    run_dir, plain, named = tmp_path / "run", tmp_path / "plain", tmp_path / "named"
    (run_dir / "judge").mkdir(parents=True)
    (run_dir / "judge" / "stray.txt").write_text("left by an earlier start")
    results = train(load_config(str(config), [f"output={run_dir}", *common, "augment.judge=self"]), progress=False)
    judge_config = rundir.read_config(run_dir / "judge")
    assert judge_config.augment == AugmentConfig() and rundir.is_finished(run_dir / "judge")
    assert not (run_dir / "judge" / "stray.txt").exists()
    assert rundir.read_config(run_dir).augment.judge == "self"
    train(load_config(str(config), [f"output={plain}"]), progress=False)
    by_name = train(load_config(str(config), [f"output={named}", *common, f"augment.judge={plain}"]), progress=False)
    verdicts = [json.loads(line) for line in (run_dir / "paraphrases.jsonl").read_text().splitlines()]
    assert verdicts == [json.loads(line) for line in (named / "paraphrases.jsonl").read_text().splitlines()]
    assert verdicts and all(v["judged"] in ("fresh", "rotten") and v["kept"] == (v["judged"] == v["label"]) for v in verdicts)
    assert results["train"]["augmented"] == by_name["train"]["augmented"]
    assert results["test"] == by_name["test"]  # the run's own random streams are untouched by the judge's training


def test_a_judge_run_labels_the_rewrites_and_an_unsuitable_one_is_one_line(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 40)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    judge_dir = tmp_path / "judge"
    train(load_config(str(config), [f"output={judge_dir}"]), progress=False)
    texts = ["great and good", "bad and awful"]
    assert judge_run(str(judge_dir), ["fresh", "rotten"])(texts) == [p["label"] for p in load(judge_dir).predict(texts)]
    with pytest.raises(FinegrainError, match=r"augment.judge: .* is not a single-label classification run of this run's labels \[.*\]; "
                       "name one, set augment.judge: self"):
        judge_run(str(judge_dir), ["fresh", "sour"])
    with pytest.raises(FinegrainError, match="not a finegrain run directory"):
        judge_run(str(tmp_path / "nowhere"), ["fresh", "rotten"])


@pytest.mark.parametrize("key, value, message", [
    ("judge", "nowhere", r"augment.judge: .*nowhere: not a finegrain run directory"),
    ("paraphraser", "no-model.gguf", r"augment.paraphraser: .*no-model.gguf: no such file or directory"),
])
def test_a_missing_judge_or_paraphraser_is_refused_before_the_run_directory(tiny_model_dir, tmp_path, key, value, message):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 20))
    overrides = [f"output={tmp_path / 'run'}", "augment.paraphrase=0.5", f"augment.{key}={tmp_path / value}"]
    with pytest.raises(FinegrainError, match=message):
        train(load_config(str(config), overrides), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("keyword", ["self", "current"])
def test_a_judge_keyword_that_is_also_a_run_here_is_one_line(tiny_model_dir, tmp_path, monkeypatch, keyword):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 20))
    (tmp_path / keyword).mkdir()
    (tmp_path / keyword / "config.yaml").write_text("task: classification\n")
    monkeypatch.chdir(tmp_path)
    overrides = [f"output={tmp_path / 'run'}", "augment.paraphrase=0.5", f"augment.judge={keyword}"]
    with pytest.raises(FinegrainError, match=rf"^augment.judge: {keyword} is a keyword, and ./{keyword} is also a run "
                       rf"here; write ./{keyword} to judge with that run"):
        train(load_config(str(config), overrides), progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / keyword / "config.yaml").unlink()  # a directory of that name that holds no run is no run
    with pytest.raises(FinegrainError, match="augment.paraphraser: "):  # past the judge, to the paraphraser
        train(load_config(str(config), [*overrides, f"augment.paraphraser={tmp_path / 'none.gguf'}"]), progress=False)


def test_a_paraphraser_run_of_another_task_is_one_line(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 40)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    run_dir = tmp_path / "classifier"
    train(load_config(str(config), [f"output={run_dir}"]), progress=False)
    with pytest.raises(FinegrainError, match="augment.paraphraser: .* is a classification run; name a run of task instruct"):
        finegrain.run.load_paraphraser(str(run_dir), progress=False)
    with pytest.raises(FinegrainError, match="^augment.paraphraser: "):
        finegrain.run.load_paraphraser(str(tmp_path / "no-such-model"), progress=False)


def test_evaluate_robustness_scores_the_paraphrased_copies(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "data.jsonl", 40)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    run_dir = tmp_path / "run"
    train(load_config(str(config), [f"output={run_dir}", f"augment.paraphraser={tiny_model_dir}"]), progress=False)
    test = write_data(tmp_path / "test.jsonl", 12, seed=5)
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(run_dir), "--data", str(test), "--robustness", "--paraphrase", "--output", str(out)]) == 0
    scores = json.loads(out.read_text())["robustness"]
    assert 0 <= scores["paraphrase"] <= 1 and 0 <= scores["paraphrased"] <= 12
    assert f"{scores['paraphrased']} texts rewritten" in capsys.readouterr().out
    prompt = ["--paraphrase-prompt", "Say it again: {text}"]
    assert main(["evaluate", str(run_dir), "--data", str(test), "--robustness", "--paraphrase", *prompt, "--output", str(out)]) == 0
    assert json.loads(out.read_text())["robustness"]["paraphrase"] >= 0
    assert main(["evaluate", str(run_dir), "--data", str(test), "--paraphrase"]) == 1
    assert "--paraphrase adds the paraphrased copies to --robustness; add --robustness" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--data", str(test), "--robustness", "--paraphrase", "--paraphrase-prompt", "Again."]) == 1
    assert "--paraphrase-prompt: holds {text} once" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["augment.paraphrase=1.5"], "'augment.paraphrase' must be a fraction of the training set in"),
    (["augment.paraphrase_prompt=Paraphrase it."], "'augment.paraphrase_prompt' must be a prompt holding {text} once"),
    (["task=regression", "augment.paraphrase=0.2"], "'augment.paraphrase' must be 0 unless the task is single-label classification"),
    (["data.multi_label=true", "augment.paraphrase=0.2"], "'augment.paraphrase' must be 0 unless the task is single-label"),
    (["augment.paraphrase=0.2", "augment.judge=current", "augment.mixup=0.5"],
     "'augment.judge' must be a run, self or null beside distill.teacher or augment.mixup"),
])
def test_bad_paraphrase_options_are_one_line(tiny_model_dir, tmp_path, overrides, message):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 10))
    with pytest.raises(FinegrainError, match=message):
        load_config(str(config), overrides)


def test_the_current_judge_counts_a_rewrite_only_where_the_model_gives_its_label():
    """Rows 1 and 2 are rewrites: the model gives row 1 its label (it counts) and row 2 another (its
    term drops out, its place in the mean stays); rows 0 and 3 are originals and count right or wrong."""
    task = ClassificationTask(["a", "b", "c"])
    agreement = Agreement()
    objective = AgreeingObjective(TaskObjective(task, []), {1, 2}, agreement)
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]], requires_grad=True)
    targets = torch.tensor([1, 1, 0, 0])
    batch = {"targets": targets, "judged": torch.tensor([False, True, True, False])}
    loss = objective.loss(lambda b: logits, batch)
    counted = [0, 1, 3]
    assert loss.item() == pytest.approx(F.cross_entropy(logits[counted], targets[counted], reduction="sum").item() / 4)
    loss.backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    agreement.after_step(torch.nn.Linear(1, 1), 1, 1)
    assert (agreement.seen, agreement.agreed) == (2, 1)
    every = torch.ones(4, dtype=torch.bool)  # all rewrites, all given another label: nothing counts
    nothing = objective.loss(lambda b: logits, {"targets": torch.tensor([1, 0, 0, 1]), "judged": every})
    assert nothing.item() == 0
    nothing.backward()  # a step of such pieces still runs
    agreement.after_step(torch.nn.Linear(1, 1), 2, 2)
    assert agreement.state_dict() == {"seen": 6, "agreed": 1}
    repeat = objective.loss(lambda b: logits, {**batch, "filler": True})  # FSDP's weight-0 repeat of a piece
    assert repeat.item() == pytest.approx(loss.item())
    agreement.after_step(torch.nn.Linear(1, 1), 3, 3)
    assert agreement.state_dict() == {"seen": 6, "agreed": 1}  # not seen twice


def test_a_run_judged_by_its_own_model_keeps_every_rewrite_and_resumes_exactly(tiny_model_dir, tmp_path):
    """`augment.judge: current`: every usable rewrite joins the training set; the counts of rows the model
    agreed with are in metrics.json, and a run killed mid-epoch 2 ends as the uninterrupted one did."""
    data = write_data(tmp_path / "data.jsonl", 60)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=2, eval_every=0, checkpoint_every=2)
    spec = yaml.safe_load(config.read_text())
    spec["augment"] = {"paraphrase": 1.0, "judge": "current", "paraphraser": str(tiny_model_dir)}
    config.write_text(yaml.safe_dump(spec))

    def train_with_stand_in(run_dir, **env):  # a fresh process whose paraphraser is `stand_in`
        script = ("import sys, finegrain.paraphrase as p, test_paraphrase as t; from finegrain.cli import main; "
                  "p.rewrite = lambda llama, tokenizer, texts, *a, **k: t.stand_in(texts); sys.exit(main(sys.argv[1:]))")
        return subprocess.run([sys.executable, "-c", script, "train", str(config), "--output", str(run_dir)],
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    straight = train_with_stand_in(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "straight" / "paraphrases.jsonl").read_text().splitlines()]
    written = sum(r["paraphrase"] is not None for r in records)
    assert written and all(r["judged"] is None and r["kept"] == (r["paraphrase"] is not None) for r in records)
    killed = train_with_stand_in(tmp_path / "killed", FINEGRAIN_FAULT="train_step:9")  # mid-epoch 2
    assert killed.returncode != 0 and not (tmp_path / "killed" / "metrics.json").exists()
    resumed = train_cli("--resume", str(tmp_path / "killed"))  # the paraphrases read back from the run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_adapter(tmp_path / "straight", tmp_path / "killed")
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("straight", "killed")]
    assert metrics[0]["train"]["augmented"] == {"paraphrase": written}
    agreement = metrics[0]["train"]["paraphrase_agreement"]
    assert agreement["seen"] == 2 * written and 0 <= agreement["agreed"] <= agreement["seen"]
    assert metrics[1]["train"]["paraphrase_agreement"] == agreement  # the counts are in every checkpoint
    assert (f"{written} of {len(records)} paraphrases kept; as it trained, the model agreed with "
            f"{agreement['agreed']} of {agreement['seen']} paraphrase rows") in (tmp_path / "killed" / "report.md").read_text()
    assert metrics[1]["test"] == metrics[0]["test"]


@pytest.mark.real_model
def test_the_default_model_paraphrases_film_review_sentences():
    from finegrain.checkpoint.load import load_model

    llama, tokenizer = load_model("smollm2-135m", progress=False)
    texts = ["A remarkable 179-minute meditation on the nature of revolution.",
             "IHOPs don't pile on this much syrup.",
             "This one is certainly well-meaning, but it's also simple-minded and contrived.",
             "It has its faults, but it is a kind, unapologetic, sweetheart of a movie."]
    prompt = ("Paraphrase this sentence from a film review. Keep its meaning and its opinion of the film. "
              "Answer with the paraphrased sentence only.\n\nSentence: {text}")
    rewrites = paraphrase.rewrite(llama, tokenizer, texts, seed=0, prompt=prompt)
    written = [(t, r) for t, r in zip(texts, rewrites) if r is not None]
    assert len(written) >= 2  # the model answers most with a sentence of its own
    for text, rewrite in written:  # new words, the same length give or take
        assert rewrite != text and len(rewrite.split()) <= 2 * len(text.split()) + 5
