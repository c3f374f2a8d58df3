"""The `finegrain` command: generate/info/convert, and one-line errors with a non-zero exit."""

import io
import json
import shutil
import os
import subprocess
import sys

import pytest

from finegrain.cli import main


def finegrain(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finegrain.cli", *args], capture_output=True, text=True, timeout=600, input=input,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_on_every_command():
    for command in ("generate", "info", "convert", "train", "evaluate", "predict"):
        result = finegrain(command, "--help")
        assert result.returncode == 0 and "usage: finegrain " + command in result.stdout


def test_bad_flag():
    assert_one_line_error(finegrain("generate", "--prompt", "x", "--temprature", "1"), "--temprature",
                          "see `finegrain generate --help`")  # the command's help, which lists its flags


def test_missing_model_file(tmp_path):
    assert_one_line_error(finegrain("info", "--model", str(tmp_path / "missing.gguf")), "missing.gguf", "no such file")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + os.urandom(64))
    assert_one_line_error(finegrain("info", "--model", str(bad)), "bad.gguf")


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:500])
    assert_one_line_error(finegrain("info", "--model", str(tmp_path)), "model.safetensors", "download it again")


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    assert_one_line_error(finegrain("info", "--model", str(tmp_path)), "config.json", "falcon")


def test_debug_shows_the_traceback(tmp_path):
    result = finegrain("--debug", "info", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_native_crash_prints_the_python_stack():
    """A segfault in native code (a rank of a torchrun job died of one in CI) ends the process with the
    Python stack that led to it on stderr, not with the signal alone."""
    crash = """
import ctypes
from finegrain import cli

def tagging_step(args):
    ctypes.string_at(0)

def build_parser(real=cli.build_parser):
    parser = real()
    parser.commands["info"].set_defaults(func=tagging_step)
    return parser

cli.build_parser = build_parser
cli.main(["info"])
"""
    result = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"})
    assert result.returncode == -11, result.stderr[-2000:]
    assert "Segmentation fault" in result.stderr and "tagging_step" in result.stderr


def test_info_and_convert_tiny(tiny_model_dir, tmp_path, capsys):
    assert main(["info", "--model", str(tiny_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["layers"] == 2 and info["format"] == "huggingface"
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").exists()


def test_convert_never_replaces_what_is_there(tiny_model_dir, tmp_path, capsys):
    """It used to rename a non-empty --output aside and delete it: a user's directory, gone."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["convert", str(tiny_model_dir), str(mine)]) == 1
    assert "already exists; choose another output directory" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "file" / "out")]) == 1
    assert "file: exists and is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # an empty directory is no loss
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "config.json").exists()


@pytest.mark.real_model
def test_generate_paris_with_the_default_model():
    result = finegrain("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--greedy")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout


@pytest.mark.real_model
def test_info_on_the_default_model(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["layers"] == 30 and info["source tensor types"]["Q4_1"] == 210
    assert info["tokenizer"]["chat template"] is True


# -- train, predict and evaluate: errors a user can cause, and the run directory they leave ----------------------


def write_texts(path, n: int = 48):
    """A tiny two-class JSONL file: 'good ...' is fresh, 'bad ...' is rotten."""
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i % 5}", "label": "fresh" if i % 2 else "rotten"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_train_args(model_dir, data, output) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--set", "train.epochs=1",
            "--batch-size", "8", "--set", "data.max_length=12", "--set", "train.threads=1", "--set", "lora.layers=[-1]"]


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "internal error" not in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """One finished run on the tiny model, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("tiny-run")
    assert main(tiny_train_args(tiny_model_dir, write_texts(root / "data.jsonl"), root / "run")) == 0
    return root / "run"


@pytest.mark.parametrize(
    "override, key",
    [("data.split=[a,b,c]", "data.split[0]"), ("lora.layers=[x]", "lora.layers[0]"),
     ("train.epochs=.inf", "train.epochs"), ("head.class_weights={fresh: abc}", "head.class_weights.fresh")],
)
def test_bad_values_are_one_line_and_leave_no_run_dir(tiny_model_dir, tmp_path, capsys, override, key):
    output = tmp_path / "run"
    args = tiny_train_args(tiny_model_dir, write_texts(tmp_path / "data.jsonl"), output)
    assert main([*args, "--set", override]) == 1
    one_line_error(capsys, f"'{key}'", f"--set {override}")
    assert not output.exists()


@pytest.mark.parametrize("override, fragments", [
    ("model.num_layers=5", ("model.num_layers: 5 is not between 1 and 2, the layers of", "leave it out")),
    ("lora.layers=[-3]", ("lora.layers: [-3] is outside the model's 2 layers", "from -2 to -1")),
])
def test_layers_the_model_lacks_are_one_line_and_leave_no_run_dir(tiny_model_dir, tmp_path, capsys, override, fragments):
    """A config written for the default model (30 layers) and run on a smaller one says the range."""
    output = tmp_path / "run"
    args = tiny_train_args(tiny_model_dir, write_texts(tmp_path / "data.jsonl"), output)
    assert main([*args, "--set", override]) == 1
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # lora.layers: after the probe's bar
    assert last.startswith("finegrain train: error: ") and all(f in last for f in fragments), last
    assert not output.exists()


def test_a_label_written_two_ways_is_said_before_training(tiny_model_dir, tmp_path, capsys):
    data = write_texts(tmp_path / "data.jsonl")
    data.write_text(data.read_text().replace('"fresh"', '"Fresh"', 3))
    assert main(tiny_train_args(tiny_model_dir, data, tmp_path / "run")) == 0
    assert "labels: 'Fresh' and 'fresh' differ only in case, spaces or punctuation" in capsys.readouterr().out


def test_labels_joining_other_labels_are_said_before_training(tiny_model_dir, tmp_path, capsys):
    data = write_texts(tmp_path / "data.jsonl")
    data.write_text(data.read_text().replace('"fresh"', '"fresh|rotten"', 3))
    assert main(tiny_train_args(tiny_model_dir, data, tmp_path / "run")) == 0
    assert "labels: 'fresh|rotten' join labels that also stand alone: if a text can carry several labels, set " \
           "data.multi_label: true" in capsys.readouterr().out
    data.write_text(write_texts(tmp_path / "ids.jsonl").read_text().replace('"fresh"', "1").replace('"rotten"', "0"))
    assert main(tiny_train_args(tiny_model_dir, data, tmp_path / "ids")) == 0
    assert "labels: 0, 1 read as ids" in capsys.readouterr().out
    assert main([*tiny_train_args(tiny_model_dir, data, tmp_path / "named"), "--set", "data.label_names=[rotten, fresh]"]) == 0
    assert "read as ids" not in capsys.readouterr().out
    assert json.loads((tmp_path / "named" / "labels.json").read_text()) == ["fresh", "rotten"]


def test_evaluation_texts_that_are_training_texts_are_said_and_counted(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"  # every text once (write_texts repeats each)
    data.write_text("".join(json.dumps({"text": f"{'good' if i % 2 else 'bad'} film {i}", "label": "fresh" if i % 2 else "rotten"})
                            + "\n" for i in range(48)))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(data.read_text().splitlines(keepends=True)[:4]) + '{"text": "a new one", "label": "fresh"}\n')
    assert main([*tiny_train_args(tiny_model_dir, data, tmp_path / "run"), "--set", f"data.test={test}"]) == 0
    assert f"note: 4 of 5 test texts are also training texts, case and spacing aside (the first: {test}:1 is" in capsys.readouterr().out
    shared = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]["shared_with_training"]
    assert list(shared) == ["test"] and shared["test"]["examples"] == 4 and shared["test"]["of"] == 5
    for report in ("report.md", "report.html"):  # the warning stands above the scores a person reads
        assert "4 of 5 test texts are also training texts" in (tmp_path / "run" / report).read_text()
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(test), "--output", str(tmp_path / "scores.json")]) == 0
    assert f"note: 4 of 5 texts of {test} are also training texts of the run" in capsys.readouterr().err
    assert json.loads((tmp_path / "scores.json").read_text())["shared_with_training"] == shared["test"]
    assert main(["evaluate", str(tmp_path / "run")]) == 0  # its own test split: train said it already
    assert "note:" not in capsys.readouterr().err


def test_class_weights_in_yaml_name_the_line(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train: {tmp_path / 'd.jsonl'}\nhead:\n  class_weights: {{ham: abc}}\n")
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 1
    assert "--set" not in one_line_error(capsys, "c.yaml:4", "'head.class_weights.ham' must be float")
    assert not (tmp_path / "run").exists()


def test_output_at_a_file_or_at_another_programs_reports_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_texts(tmp_path / "data.jsonl")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(tiny_train_args(tiny_model_dir, data, a_file)) == 1
    one_line_error(capsys, "notes.txt", "is a file", "another --output")
    assert a_file.read_text() == "mine"
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "report.md").write_text("# last quarter")
    (reports / "metrics.json").write_text("{}")
    assert main(tiny_train_args(tiny_model_dir, data, reports)) == 1
    one_line_error(capsys, "reports", "not a finegrain run", "another --output")
    assert (reports / "report.md").read_text() == "# last quarter" and sorted(p.name for p in reports.iterdir()) == ["metrics.json", "report.md"]


@pytest.mark.parametrize("command, flags, message", [
    ("generate", ["--max-new-tokens", "-3"], "--max-new-tokens -3: must be at least 1"),
    ("generate", ["--temperature", "nan"], "--temperature nan: must be 0 (greedy) or more"),
    ("generate", ["--top-k", "0"], "--top-k 0: must be at least 1"),
    ("generate", ["--top-p", "1.5"], "--top-p 1.5: must be above 0 and at most 1"),
    ("generate", ["--repetition-penalty", "0"], "--repetition-penalty 0.0: must be above 0"),
    ("chat", ["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more"),
])
def test_sampling_flags_are_checked_before_the_model_loads(tmp_path, capsys, command, flags, message):
    missing = str(tmp_path / "no-model.gguf")  # never opened: the flags are refused first
    first = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, *first, "--model", missing, *flags]) == 1
    one_line_error(capsys, message)


def test_an_empty_prompt_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """It was an IndexError from the decoding loop, after the model had loaded."""
    missing = str(tmp_path / "no-model.gguf")  # never opened
    assert main(["generate", "--prompt", "", "--model", missing]) == 1
    one_line_error(capsys, "--prompt: an empty prompt leaves nothing to continue", "--chat")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["generate", "--prompt", "-", "--model", missing]) == 1
    one_line_error(capsys, "standard input: an empty prompt")


def test_an_output_the_system_refuses_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    data = write_texts(tmp_path / "data.jsonl")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(tiny_train_args(tiny_model_dir, data, a_file / "run")) == 1  # under a file: no directory can be made
    one_line_error(capsys, "notes.txt/run: Not a directory", "check the path")
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("command", [
    ["sweep", "--seeds", "2"], ["compare", "--models", "smollm2-135m"], ["tune", "--space", "train.lr=log(1e-5,1e-2)"],
])
def test_other_commands_refuse_an_output_at_a_file(tmp_path, capsys, command):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  dataset: rotten_tomatoes\n")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main([command[0], str(config), *command[1:], "--output", str(a_file)]) == 1
    one_line_error(capsys, "notes.txt: exists and is a file; choose another --output directory")
    assert a_file.read_text() == "mine"


def test_a_failed_start_can_be_started_again_or_resumed(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()  # made beforehand, so the failed start leaves its config.yaml there
    data = tmp_path / "data.jsonl"
    assert main(tiny_train_args(tiny_model_dir, data, output)) == 1  # the data file is missing
    one_line_error(capsys, "data.jsonl")
    assert (output / "config.yaml").exists() and not (output / "checkpoint").exists()
    write_texts(data)
    assert main(["train", "--resume", str(output)]) == 0  # no checkpoint: from the beginning, with config.yaml
    first = (output / "adapter" / "adapter_model.safetensors").read_bytes()
    (output / "adapter" / "adapter_config.json").unlink()  # back to "not started": no checkpoint, no adapter
    (output / "metrics.json").unlink()
    import shutil

    shutil.rmtree(output / "checkpoint")
    assert main(tiny_train_args(tiny_model_dir, data, output)) == 0  # --output again starts it over
    assert (output / "adapter" / "adapter_model.safetensors").read_bytes() == first
    capsys.readouterr()
    assert main(tiny_train_args(tiny_model_dir, data, output)) == 1  # now it holds a run: never overwritten
    one_line_error(capsys, "already holds a run", "--resume")


def test_a_finished_run_is_not_started_over(tiny_run, tiny_model_dir, tmp_path, capsys):
    before = {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()}
    assert main(tiny_train_args(tiny_model_dir, tmp_path / "other.jsonl", tiny_run)) == 1
    one_line_error(capsys, "already holds a run")
    assert {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()} == before


def test_a_second_train_on_a_locked_run_dir_exits_at_once(tiny_run, capsys):
    from finegrain.atomic import exclusive_lock

    with exclusive_lock(tiny_run, "finegrain train"):  # as another `train --resume` holds it
        assert main(["train", "--resume", str(tiny_run)]) == 1
    one_line_error(capsys, str(tiny_run), "in use by finegrain train (pid")


def test_a_misspelt_metric_is_refused_before_training(tiny_model_dir, tmp_path, capsys):
    """A `train.metric` the task does not report is said before the first step (the task's metrics
    of four validation examples name what it reports), not at the first validation after
    checkpoints; nothing is written. On resume the run is left as it was."""
    run = tmp_path / "run"
    args = tiny_train_args(tiny_model_dir, write_texts(tmp_path / "data.jsonl"), run)
    assert main([*args, "--set", "train.metric=acuracy", "--set", "train.recipe=off"]) == 1
    line = one_line_error(capsys, "train.metric: 'acuracy' is not a validation metric; choose one of accuracy, macro_precision,")
    assert "num_examples" not in line and "training" not in line and not run.exists()
    assert main([*args, "--set", "train.metric=macro_f1", "--set", "train.recipe=off"]) == 0
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("metric: macro_f1", "metric: macro-f1"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 1
    one_line_error(capsys, "train.metric: 'macro-f1' is not a validation metric")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before and set(after) - set(before) == {run / "error.txt"}


def test_evaluate_without_data_scores_the_runs_own_test_split(tiny_run, tmp_path, capsys):
    """The split metrics.json was scored on, also for data the user has no file of (a bundled set)."""
    out = tmp_path / "m.json"
    assert main(["evaluate", str(tiny_run), "--robustness", "--output", str(out)]) == 0
    metrics, trained = json.loads(out.read_text()), json.loads((tiny_run / "metrics.json").read_text())["test"]
    assert metrics["source"] == trained["source"] and metrics["num_examples"] == trained["num_examples"] > 0
    assert metrics["accuracy"] == trained["accuracy"] and set(metrics["robustness"]) >= {"clean", "typos", "swap"}
    config = tiny_run / "config.yaml"
    text = config.read_text()
    try:  # the same run, told its data had no test part
        config.write_text(text.replace("- 0.1\n  - 0.1\n", "- 0.2\n  - 0.0\n"))
        capsys.readouterr()
        assert main(["evaluate", str(tiny_run)]) == 1
        one_line_error(capsys, "the run's data has no test split", "--data FILE")
    finally:
        config.write_text(text)


def test_a_run_whose_base_model_moved_says_where_to_set_it(tiny_model_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    run = tmp_path / "run"
    data = write_texts(tmp_path / "data.jsonl")
    assert main(tiny_train_args(base, data, run)) == 0
    base.rename(tmp_path / "moved")
    capsys.readouterr()
    for command in (["predict", str(run), "--input", str(data)], ["evaluate", str(run)], ["serve", str(run)],
                    ["export", str(run), "--format", "hf", "--output", str(tmp_path / "hf")], ["train", "--resume", str(run)]):
        assert main(command) == 1
        one_line_error(capsys, f"{run}: its base model {base} (model.name in its config.yaml) is not there any more; "
                               f"put it back, or set model.name in {run / 'config.yaml'} to where it is now")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(f"name: {base}\n", f"name: {tmp_path / 'moved'}\n"))
    assert main(["evaluate", str(run)]) == 0  # the fix the line gives


def test_a_run_trained_on_relative_paths_works_from_any_directory(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Its config.yaml kept data.train and data.test as given, relative to where it was trained, so
    `evaluate RUN` (its own test split) from another directory said "data.jsonl: file not found"."""
    from finegrain.rundir import kept_keys, read_config, refuse_other_settings

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_texts(work / "data.jsonl")
    write_texts(work / "test.jsonl", 10)
    assert main([*tiny_train_args(tiny_model_dir, "data.jsonl", "run"), "--set", "data.test=test.jsonl"]) == 0
    config = read_config(work / "run")
    assert (config.data.train, config.data.test) == (str(work / "data.jsonl"), str(work / "test.jsonl"))
    again = read_config(work / "run")  # the command run again in the same directory: its paths as given
    again.data.train, again.data.test, again.explicit = "data.jsonl", "test.jsonl", kept_keys(work / "run")
    refuse_other_settings(work / "run", again)  # the same files: no refusal
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(work / "run")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_the_data_of_tasks_and_stages_is_kept_absolute(tmp_path, monkeypatch):
    """A multi-task run's tasks.NAME.data and a sequence's continual.tasks name data files too."""
    from finegrain.config import load_config
    from finegrain.rundir import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"text": "x", "label": "y"}\n')
    config = load_config(None, ["data.train=a.jsonl", "tasks={one: {data: {train: a.jsonl}}, two: {data: {dataset: trec}}}",
                                "continual.tasks=[{train: a.jsonl}, {train: b.jsonl, test: missing.jsonl}]"])
    with_absolute_paths(config)
    assert config.data.train == str(tmp_path / "a.jsonl")
    assert config.tasks == {"one": {"data": {"train": str(tmp_path / "a.jsonl")}}, "two": {"data": {"dataset": "trec"}}}
    assert config.continual.tasks == [{"train": str(tmp_path / "a.jsonl")}, {"train": str(tmp_path / "b.jsonl"), "test": "missing.jsonl"}]


def test_predict_with_empty_stdin(tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    assert main(["predict", str(tiny_run), "--input", "-"]) == 1
    one_line_error(capsys, "standard input", "no text")


def test_predict_reads_no_label(tiny_run, tmp_path, capsys):
    """A file with a label column (here one the run does not know) is labelled anew, not checked:
    it was a KeyError."""
    texts = tmp_path / "labelled.jsonl"
    texts.write_text('{"text": "good film", "label": "positive"}\n{"text": "bad film", "label": "fresh"}\n')
    assert main(["predict", str(tiny_run), "--input", str(texts)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["good film", "bad film"]
    assert all(r["label"] in ("fresh", "rotten") and set(r["probabilities"]) == {"fresh", "rotten"} for r in rows)


def test_predict_and_evaluate_show_a_progress_bar_over_their_batches(tiny_run, tmp_path, capsys, monkeypatch):
    """A large file takes minutes on the real model: predict and evaluate show a bar over the batches
    (once they run past a second), which they did not; the library's predict shows none."""
    import finegrain.inference
    from finegrain import load

    bars = []
    real_tqdm = finegrain.inference.tqdm
    monkeypatch.setattr(finegrain.inference, "tqdm", lambda batches, **kw: bars.append(kw) or real_tqdm(batches, **kw))
    data = write_texts(tmp_path / "more.jsonl", 200)
    assert main(["predict", str(tiny_run), "--input", str(data), "--output", str(tmp_path / "p.jsonl")]) == 0
    assert main(["evaluate", str(tiny_run), "--data", str(data)]) == 0
    assert [(bar["desc"], bar["disable"], bar["delay"]) for bar in bars] == [("predicting", False, 1.0)] * 2
    bars.clear()
    load(tiny_run).predict(["good film"])
    assert [bar["disable"] for bar in bars] == [True]


def test_evaluate_and_predict_skip_bad_rows_when_asked(tiny_run, tmp_path, capsys):
    """Without --skip-bad-rows a bad row stops both, naming the flag; with it, they go on without
    the row and say how many they left out. The run's config.yaml is not changed."""
    rows = tmp_path / "mixed.jsonl"
    rows.write_text('{"text": "good film", "label": "fresh"}\nnot json\n{"text": "odd", "label": "meh"}\n'
                    '{"text": "bad film", "label": "rotten"}\n')
    config = (tiny_run / "config.yaml").read_bytes()
    assert main(["evaluate", str(tiny_run), "--data", str(rows)]) == 1
    one_line_error(capsys, "mixed.jsonl:2: invalid JSON", "--skip-bad-rows")
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(tiny_run), "--data", str(rows), "--skip-bad-rows", "--output", str(out)]) == 0
    assert "skipped 2 bad rows of" in capsys.readouterr().err  # the broken line and the unknown label
    metrics = json.loads(out.read_text())
    assert metrics["num_examples"] == 2 and metrics["skipped_rows"] == 2 and ":2: invalid JSON" in metrics["skipped_example"]
    assert main(["predict", str(tiny_run), "--input", str(rows)]) == 1
    one_line_error(capsys, "mixed.jsonl:2: invalid JSON", "--skip-bad-rows")
    assert main(["predict", str(tiny_run), "--input", str(rows), "--skip-bad-rows"]) == 0
    printed = capsys.readouterr()
    assert [json.loads(line)["text"] for line in printed.out.splitlines()] == ["good film", "odd", "bad film"]
    assert "skipped 1 bad row of" in printed.err  # a label is not read: "meh" is no bad row here
    assert (tiny_run / "config.yaml").read_bytes() == config


def test_predict_echoes_each_rows_other_fields(tiny_run, tmp_path, capsys):
    """An id column comes back beside each prediction, so rows join back by it, also when a bad row
    was skipped; a label column is neither read nor echoed (the prediction's label is the only one)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 7, "text": "good film", "source": "web"}\nnot json\n{"id": 9, "text": "bad film", "label": "x"}\n')
    assert main(["predict", str(tiny_run), "--input", str(rows), "--skip-bad-rows"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(r) for r in out] == [["id", "source", "text", "label", "probabilities"], ["id", "text", "label", "probabilities"]]
    assert [(r["id"], r["text"]) for r in out] == [(7, "good film"), (9, "bad film")] and out[1]["label"] in ("fresh", "rotten")
    table = tmp_path / "rows.csv"
    table.write_text("id,text\na1,good film\n")
    assert main(["predict", str(tiny_run), "--input", str(table)]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "a1"


def test_output_onto_the_input_is_refused(tiny_run, tmp_path, capsys):
    """predict --output or evaluate --output naming the file they read (or a link to it) would
    replace the user's labelled data with predictions or metrics: refused, the file untouched."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "good film", "label": "fresh"}\n')
    (tmp_path / "link.jsonl").symlink_to(rows)
    for argv, flag in ((["predict", str(tiny_run), "--input", str(rows)], "--input"),
                       (["evaluate", str(tiny_run), "--data", str(rows)], "--data")):
        for output in (rows, tmp_path / "link.jsonl"):
            assert main([*argv, "--output", str(output)]) == 1
            one_line_error(capsys, f"--output {output}: is the {flag} file", "write to another file")
    assert rows.read_text() == '{"text": "good film", "label": "fresh"}\n'
    assert main(["predict", str(tiny_run), "--input", str(rows), "--output", str(tmp_path / "out.jsonl")]) == 0


def test_predict_never_writes_nan(tiny_run, tmp_path, capsys, monkeypatch):
    from finegrain.run import Predictor

    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "good film"}\n')

    def nan_predictions(self, examples, batch_size=64):
        return [{"label": "fresh", "probabilities": {"fresh": float("nan"), "rotten": float("nan")}} for _ in examples]

    monkeypatch.setattr(Predictor, "predict_examples", nan_predictions)
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(tiny_run), "--input", str(texts), "--output", str(out)]) == 1
    one_line_error(capsys, "input 1", "not a finite number", "--resume")
    assert not out.exists()
