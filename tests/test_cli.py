"""The `finegrain` command: generate/info/convert, and one-line errors with a non-zero exit."""

import json
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
    assert_one_line_error(finegrain("generate", "--prompt", "x", "--temprature", "1"), "--temprature", "--help")


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


def test_info_and_convert_tiny(tiny_model_dir, tmp_path, capsys):
    assert main(["info", "--model", str(tiny_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["layers"] == 2 and info["format"] == "huggingface"
    assert main(["convert", str(tiny_model_dir), str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").exists()


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
