"""`finegrain tune`: Optuna over real trials, a trial pruned on validation, a killed search continuing."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from finegrain.cli import main
from finegrain.config import load_config
from finegrain.errors import FinegrainError, Interrupted
from finegrain.rundir import is_running
from finegrain.tune import STUDY_DB, parse_space, tune
from test_train import write_config, write_data

optuna = pytest.importorskip("optuna")


def test_spaces_parse_and_bad_ones_are_one_line_errors():
    assert parse_space("train.lr=log(1e-5, 1e-2)").__dict__ == {"key": "train.lr", "kind": "log", "low": 1e-5,
                                                               "high": 1e-2, "choices": ()}
    assert parse_space("lora.r=4|8|16").choices == (4, 8, 16)
    assert parse_space("head.pooling=last|mean").choices == ("last", "mean")
    assert parse_space("train.epochs=int(1,3)").kind == "int"
    for text, message in (("lr=log(1e-5,1e-2)", "expected SECTION.KEY=RANGE"), ("train.lr=log(0,1)", "LOW > 0"),
                          ("train.lr=float(2,1)", "LOW < HIGH"), ("lora.r=4", "two or more choices"),
                          ("train.lr=log(a,1)", "must be numbers"), ("lora.r=4|'x", "a choice is not valid YAML")):
        with pytest.raises(FinegrainError, match=message):
            parse_space(text)


def config_path(tiny_model_dir, tmp_path, **train):
    return str(write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 48),
                            epochs=2, eval_every=3, recipe="off", **train))


def test_a_poor_trial_is_pruned_and_a_killed_search_continues(tiny_model_dir, tmp_path):
    config = config_path(tiny_model_dir, tmp_path)
    output = tmp_path / "tune"
    output.mkdir()
    study = optuna.create_study(study_name="finegrain", storage=f"sqlite:///{output / STUDY_DB}", direction="maximize")
    study.enqueue_trial({"train.lr": 3e-2})  # learns the toy data
    study.enqueue_trial({"train.lr": 1e-9})  # learns nothing: behind the first at its first validation
    summary = tune(config, [], ["train.lr=log(1e-9,1e-1)"], trials=2, output=output, progress=False)
    states = [t["state"] for t in summary["trials"]]
    assert states == ["complete", "pruned"], summary["trials"]
    good = json.loads((output / "trial-0" / "metrics.json").read_text())
    assert summary["best"]["value"] == pytest.approx(good["validation"]["accuracy"])
    assert not (output / "trial-1" / "metrics.json").exists()  # stopped before it finished
    best = load_config(output / "best.yaml")
    assert best.train.lr == pytest.approx(3e-2) and best.output is None
    assert "(best)" in (output / "trials.md").read_text() and (output / "trials.png").stat().st_size > 1000

    # A search killed while a trial ran: that trial is run again from its run directory.
    study = optuna.load_study(study_name="finegrain", storage=f"sqlite:///{output / STUDY_DB}")
    stale = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-9, 1e-1, log=True)})
    stale.set_user_attr("run_dir", str(output / "trial-2"))
    again = tune(config, [], ["train.lr=log(1e-9,1e-1)"], trials=3, output=output, progress=False)
    states = [t["state"] for t in again["trials"]]
    assert states[:3] == ["complete", "pruned", "fail"] and states[3] in ("complete", "pruned")
    assert again["trials"][3]["params"] == {"train.lr": stale.params["train.lr"]}
    assert again["trials"][3]["run_dir"] == str(output / "trial-2")
    assert len([s for s in states if s in ("complete", "pruned")]) == 3  # --trials counts the earlier ones

    # The same study with another base setting: its earlier trials' scores were not made so.
    with pytest.raises(FinegrainError, match=r"trial-0: this run has train.epochs: 2.* and this command sets 1"):
        tune(config, ["train.epochs=1"], ["train.lr=log(1e-9,1e-1)"], trials=4, output=output, progress=False)


@pytest.mark.parametrize("reaching", ["the search", "the trial"])
def test_ctrl_c_leaves_the_trial_to_the_same_command_again(tiny_model_dir, tmp_path, monkeypatch, reaching):
    """Ctrl-C while a trial trains, whether it reaches the search (which stops the trial's process)
    or the trial's process alone, queues the trial again with its values and directory: run again,
    the search continues that trial from its checkpoint. (It used to be a failed trial whose work
    was lost, the next run drawing new values.)"""
    import finegrain.tune

    config = config_path(tiny_model_dir, tmp_path, checkpoint_every=1)
    output, space = tmp_path / "tune", ["train.lr=log(1e-3,1e-1)"]
    follow = finegrain.tune._follow

    def ctrl_c_after_a_checkpoint(trial, process, run_dir, metric):
        while not (run_dir / "checkpoint" / "state.json").exists() and process.poll() is None:
            time.sleep(0.05)
        raise KeyboardInterrupt

    if reaching == "the search":
        monkeypatch.setattr(finegrain.tune, "_follow", ctrl_c_after_a_checkpoint)
    else:  # the trial's `finegrain train` sends itself SIGINT at its third step
        monkeypatch.setenv("FINEGRAIN_FAULT", "train_step:3:int")
    # As from a terminal: a suite started in the background (`cmd &`) ignores SIGINT, and so would the trial.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted, match="the same command again goes on: finished trials count towards --trials"):
            tune(config, [], space, trials=1, output=output, progress=False)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert not is_running(output / "trial-0") and (output / "trial-0" / "checkpoint" / "state.json").exists()
    monkeypatch.setattr(finegrain.tune, "_follow", follow)
    monkeypatch.delenv("FINEGRAIN_FAULT", raising=False)
    commands, popen = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda command, **kw: commands.append(command) or popen(command, **kw))
    again = tune(config, [], space, trials=1, output=output, progress=False)
    first, second = again["trials"]
    assert (first["state"], second["state"]) == ("fail", "complete")
    assert second["params"] == first["params"] and second["run_dir"] == str(output / "trial-0")
    assert commands[0][-2:] == ["--resume", str(output / "trial-0")]  # continued, not started again


def test_tune_command_names_a_bad_key_before_any_trial(tiny_model_dir, tmp_path, capsys):
    config = config_path(tiny_model_dir, tmp_path)
    assert main(["tune", config, "--space", "train.lrr=log(1e-5,1e-2)", "--output", str(tmp_path / "t")]) != 0
    assert "unknown key 'train.lrr'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_tune_command_checks_every_choice_before_any_trial(tiny_model_dir, tmp_path, capsys):
    config = config_path(tiny_model_dir, tmp_path)
    assert main(["tune", config, "--space", "lora.r=4|x", "--output", str(tmp_path / "t")]) != 0
    assert "'lora.r' must be int, not 'x'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
