"""Fault injection (`pytest -m faults`): a real `finegrain train` SIGKILLed at each phase of a run,
or stopped by Ctrl-C, then continued, must end as the uninterrupted run does; damaged adapters and
checkpoints are refused.

The kill points are `finegrain.atomic.fault_point` calls that fire only under FINEGRAIN_FAULT
(a test-only hook): `FINEGRAIN_FAULT=checkpoint_write:2` kills the process inside its second
checkpoint write. Every continued run is compared with one uninterrupted run of the same config:
the adapter file byte for byte, the test metrics and the metrics.jsonl steps.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.peft.base import WEIGHTS_NAME, read_adapter, save_weights, verify_adapter

pytestmark = pytest.mark.faults

ADAPTER = Path("adapter") / WEIGHTS_NAME


def write_run_config(root: Path, model_dir: Path) -> Path:
    """A tiny classification run: 2 epochs of 7 steps, a checkpoint every 2 steps, prefix caching on,
    the weights of the last 3 evaluations averaged (their validation is logged after the last checkpoint)."""
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i % 7}", "label": "fresh" if i % 2 else "rotten"} for i in range(64)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"name": str(model_dir), "num_layers": 2},  # set, so that no recipe cuts layers (and the cache)
        "data": {"train": str(root / "data.jsonl"), "max_length": 12},
        "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "layers": [-1]},  # layer 0 is cached
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "threads": 1, "eval_every": 3, "checkpoint_every": 2,
                  "average_last": 3, "patience": None},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("faults")
    config = write_run_config(root, tiny_model_dir)
    assert main(["train", str(config), "--output", str(root / "straight")]) == 0
    return config, root / "straight"


def killed_train(*args: str, fault: str) -> subprocess.CompletedProcess:
    """`finegrain train ARGS` in a subprocess that SIGKILLs itself at `fault`."""
    env = {**os.environ, "FINEGRAIN_FAULT": fault, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "finegrain.cli", "train", *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    return result


def untimed(value):
    """metrics.json without its clock readings (seconds, tokens per second), which differ run to run."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not k.endswith(("seconds", "tokens_per_s"))}
    return value


def assert_same_run(run: Path, reference: Path) -> None:
    """The continued run ended where the uninterrupted one did, and left no temporaries behind."""
    assert (run / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes()
    a, b = (untimed(json.loads((d / "metrics.json").read_text())) for d in (reference, run))
    assert a == b  # every score, count and choice; the data recipe's too (it was lost on resume)
    assert a["recipe"]
    assert a["tfidf_mix"]["cross_validated"]  # a few validation texts: the training texts' states, read before training
    steps = [[json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (reference, run)]
    assert steps[0] == steps[1]  # no record lost or repeated
    hidden = [p.relative_to(run).as_posix() for p in run.rglob(".*") if p.name not in (".lock", ".explicit_keys.json", ".recipe.json", ".data_files.json")]
    assert hidden == [], hidden


@pytest.mark.parametrize(
    "fault, again",
    [
        ("prefix_cache", "output"),  # before the first checkpoint: started again with --output
        ("train_step", "resume"),  # after step 1, before the first checkpoint: --resume starts from the beginning
        ("checkpoint_write:2", "resume"),  # inside the second checkpoint write: resumed from the first
        ("adapter_write", "resume"),  # inside the adapter write: a hidden temporary is left
        ("test", "resume"),  # during the test pass
    ],
)
def test_killed_run_continues_to_the_uninterrupted_result(straight, tmp_path, capsys, fault, again):
    config, reference = straight
    run = tmp_path / "run"
    killed_train(str(config), "--output", str(run), fault=fault)
    assert (run / "config.yaml").exists() and not (run / "metrics.json").exists()
    started = (run / "checkpoint" / "state.json").exists()
    assert started == (fault not in ("prefix_cache", "train_step"))
    if fault == "adapter_write":
        assert list((run / "adapter").glob(".adapter_model.safetensors.*.tmp.safetensors"))
    if fault == "checkpoint_write:2":
        assert list(run.glob(".checkpoint.*.tmp"))
    args = ["train", "--resume", str(run)] if again == "resume" else ["train", str(config), "--output", str(run)]
    assert main(args) == 0, capsys.readouterr().err
    assert_same_run(run, reference)


def test_a_resume_onto_changed_data_is_refused_and_goes_on_once_it_is_back(tiny_model_dir, tmp_path, capsys):
    """Training rows removed or edited after a kill: the checkpoint's place in its epoch would point
    past a shorter epoch (the loop spun for ever) or at other rows. The resume is refused in one line,
    nothing changes, and with the data put back it ends where the uninterrupted run did."""
    own = write_run_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    killed_train(str(own), "--output", str(run), fault="train_step:5")
    data = tmp_path / "data.jsonl"
    rows = data.read_text()
    logged, labels = (run / "metrics.jsonl").read_bytes(), (run / "labels.json").read_bytes()
    for changed, said in [("".join(rows.splitlines(keepends=True)[:40]), "(51 rows then, 32 now)"),
                          (rows.replace("good film 1", "good film 2", 1), "(51 rows, other tokens or labels)"),
                          (rows.replace('"fresh"', '"rotten"', 1), "(51 rows, other tokens or labels)"),
                          (rows.replace('"fresh"', '"new"', 1), "(51 rows, other tokens or labels)")]:
        data.write_text(changed)
        assert main(["train", "--resume", str(run)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"finegrain train: error: {run}: the training data or its batching changed since the "
                                  f"checkpoint at step 4 {said}"), err[-1]
        assert (run / "metrics.jsonl").read_bytes() == logged and (run / "labels.json").read_bytes() == labels
        assert not (run / "metrics.json").exists()
    data.write_text(rows)
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert main(["train", str(own), "--output", str(tmp_path / "straight")]) == 0
    assert_same_run(run, tmp_path / "straight")


def test_a_resume_after_its_validation_file_changed_is_refused(tiny_model_dir, tmp_path, capsys):
    """A validation or test file edited after a kill: the best checkpoint would be chosen on two files
    and the test scored on another than the run started with. Refused in one line, nothing changed."""
    own = write_run_config(tmp_path, tiny_model_dir)
    validation = tmp_path / "validation.jsonl"
    validation.write_text((tmp_path / "data.jsonl").read_text())
    config = yaml.safe_load(own.read_text())
    config["data"]["validation"] = str(validation)
    own.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    killed_train(str(own), "--output", str(run), fault="train_step:5")
    rows = validation.read_text()
    validation.write_text(rows.replace('"fresh"', '"rotten"', 3))
    logged = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(run)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"finegrain train: error: {run}: {validation} changed since the run started; --resume goes on with what the run "
        "started with: put the file back as it was, or train into another --output")
    assert (run / "metrics.jsonl").read_bytes() == logged and not (run / "metrics.json").exists()
    validation.write_text(rows)
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err


def test_a_resume_after_its_distillation_teacher_changed_is_refused(tiny_model_dir, tmp_path, capsys):
    """A distilled run reads its teacher's predictions again at each (re)start: a teacher trained again
    after a kill would teach the rest of the run other targets. Refused in one line, naming its weights."""
    from safetensors.torch import load_file, save_file

    own = write_run_config(tmp_path, tiny_model_dir)
    teacher = tmp_path / "teacher"
    assert main(["train", str(own), "--output", str(teacher)]) == 0
    config = yaml.safe_load(own.read_text())
    config["distill"] = {"teacher": str(teacher)}
    own.write_text(yaml.safe_dump(config))
    run = tmp_path / "student"
    killed_train(str(own), "--output", str(run), fault="train_step:5")
    weights = teacher / "adapter" / WEIGHTS_NAME
    kept = weights.read_bytes()
    save_file({name: 2 * tensor for name, tensor in load_file(weights).items()}, str(weights))  # the teacher retrained
    assert main(["train", "--resume", str(run)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"finegrain train: error: {run}: {weights} changed since the run started; --resume goes on with what the run "
        "started with: put the file back as it was, or train into another --output")
    assert not (run / "metrics.json").exists()
    weights.write_bytes(kept)
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err


def default_sigint() -> None:
    """Ctrl-C as a terminal delivers it: a job started in the background (`cmd &`, as CI may run
    the suite) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(command: str, *args: str, fault: str) -> str:
    """`finegrain COMMAND ARGS` in a subprocess that gets Ctrl-C (SIGINT) at `fault`; its last line."""
    env = {**os.environ, "FINEGRAIN_FAULT": f"{fault}:int", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "finegrain.cli", command, *args], capture_output=True, text=True,
                            timeout=300, env=env, preexec_fn=default_sigint)
    assert result.returncode == 130, result.stderr[-2000:]
    return result.stderr.replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.parametrize("fault, said", [
    ("train_step:5", "`finegrain train --resume {run}` goes on from its checkpoint at step 4"),
    ("train_step:1", "no checkpoint yet: `finegrain train --resume {run}` starts it again"),
])
def test_ctrl_c_says_how_the_run_goes_on_and_that_ends_like_the_uninterrupted_run(straight, tmp_path, capsys, fault, said):
    config, reference = straight
    run = tmp_path / "run"
    line = interrupted("train", str(config), "--output", str(run), fault=fault)
    assert line == "finegrain train: interrupted; " + said.format(run=run)
    assert not (run / "error.txt").exists()  # no failure: the dashboard shows it as interrupted
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err  # the way the line gives
    assert_same_run(run, reference)


def test_ctrl_c_in_a_sweep_says_the_same_command_goes_on(straight, tmp_path, capsys):
    config, reference = straight
    args = [str(config), "--seeds", "2", "--output", str(tmp_path / "sweep")]
    steps = json.loads((reference / "metrics.json").read_text())["train"]["steps"]
    line = interrupted("sweep", *args, fault=f"train_step:{steps + 3}")  # the second run's third step
    assert line == ("finegrain sweep: interrupted; the same command again goes on: finished runs are read back, "
                    "the one it stopped in continues from its checkpoint")
    first, second = (tmp_path / "sweep" / "all" / f"seed-{seed}" for seed in (0, 1))
    finished = (first / "metrics.json").read_bytes()
    assert (second / "checkpoint" / "state.json").exists() and not (second / "metrics.json").exists()
    assert main(["sweep", *args]) == 0, capsys.readouterr().err
    assert (first / "metrics.json").read_bytes() == finished and (second / "metrics.json").exists()


def damage_tail(path: Path, size: int = 64) -> None:
    """Overwrite the last `size` bytes (tensor data, not the header) as a bad disk or copy would."""
    data = bytearray(path.read_bytes())
    data[-size:] = os.urandom(size)
    path.write_bytes(bytes(data))


def one_line_error(capsys, *fragments: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_damaged_adapter_is_refused_by_evaluate_predict_and_rebuilt_by_resume(straight, tmp_path, capsys):
    config, reference = straight
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damage_tail(run / ADAPTER)
    data = yaml.safe_load(config.read_text())["data"]["train"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", data]) == 1
    one_line_error(capsys, str(run / ADAPTER), "checksum", f"finegrain train --resume {run}")
    assert main(["predict", str(run), "--input", data]) == 1
    one_line_error(capsys, str(run / ADAPTER), "checksum")
    with pytest.raises(FinegrainError, match="checksum"):
        read_adapter(run / "adapter")  # what `finegrain serve` loads adapters with
    assert main(["train", "--resume", str(run)]) == 0  # the fix the message gives
    assert (run / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", data]) == 0


def test_adapters_without_a_checksum_still_load_but_not_with_nan(straight, tmp_path):
    from safetensors.torch import load_file, save_file

    _, reference = straight
    adapter = tmp_path / "adapter"
    shutil.copytree(reference / "adapter", adapter)
    tensors = load_file(adapter / WEIGHTS_NAME)
    save_file(tensors, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})  # as runs before the checksum
    verify_adapter(adapter)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(FinegrainError, match=f"'{name}' holds NaN or infinite values"):
        verify_adapter(adapter)
    save_weights(tensors, adapter / WEIGHTS_NAME)  # a checksum that matches does not make NaN acceptable
    with pytest.raises(FinegrainError, match="holds NaN"):
        verify_adapter(adapter)


def test_adapter_whose_ranks_do_not_fit_its_config_is_refused(straight, tmp_path):
    _, reference = straight
    adapter = tmp_path / "adapter"
    shutil.copytree(reference / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(FinegrainError, match=r"does not fit r=8 of adapter_config.json; save or copy the adapter again"):
        verify_adapter(adapter)


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.pt"])
def test_damaged_checkpoint_is_refused_in_one_line(straight, tmp_path, capsys, damaged):
    _, reference = straight
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    path = run / "checkpoint" / damaged
    if damaged == "optimizer.pt":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    else:
        damage_tail(path)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 1
    one_line_error(capsys, str(run / "checkpoint"), "train the run again into another --output")
    assert (run / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes()  # the finished run is untouched
    shutil.rmtree(run / "adapter")  # as a run killed before its adapter was written
    (run / "metrics.json").unlink()
    assert main(["train", "--resume", str(run)]) == 1
    one_line_error(capsys, f"delete {run / 'checkpoint'} and {run / 'best'}, then `finegrain train --resume {run}`")
    shutil.rmtree(run / "checkpoint")  # the fix the message gives
    shutil.rmtree(run / "best")
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(run, reference)


def test_best_weights_are_checked_too(straight, tmp_path):
    """best/ is what a run's adapter is built from at the end: a damaged file is not used."""
    from finegrain.peft.base import load_weights

    _, reference = straight
    path = tmp_path / "trainable.safetensors"
    shutil.copy(reference / "best" / "trainable.safetensors", path)
    assert all(torch.isfinite(t).all() for t in load_weights(path, "retrain").values())
    damage_tail(path, 16)
    with pytest.raises(FinegrainError, match="checksum.*; retrain"):
        load_weights(path, "retrain")


def test_a_second_train_on_a_run_in_progress_exits_at_once(straight, tmp_path, capsys):
    """A `train --resume` on a directory another train is running in exits with one line while
    the first (frozen by SIGSTOP at step 3, lock held) is alive; after the first dies, resume works."""
    import time

    config, reference = straight
    run = tmp_path / "run"
    env = {**os.environ, "FINEGRAIN_FAULT": "train_step:3:stop", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "finegrain.cli", "train", str(config), "--output", str(run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and Path(f"/proc/{first.pid}/stat").read_text().split(") ")[1][0] != "T":
            time.sleep(0.05)
        assert first.poll() is None
        capsys.readouterr()
        assert main(["train", "--resume", str(run)]) == 1
        one_line_error(capsys, str(run), f"in use by finegrain train (pid {first.pid})")
        lines = (run / "metrics.jsonl").read_text().splitlines()
    finally:
        first.kill()
        first.wait()
    assert len(lines) == len(set(lines))  # the second process logged nothing
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(run, reference)
