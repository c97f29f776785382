"""A normal run of `mot train`, `mot generate` and `mot eval`, each as a user runs it (a fresh process), prints no
deprecation warning: the code follows the conventions of the installed transformers release (cache name, mask
arguments) rather than relying on its backward-compatibility paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MOT = [sys.executable, "-m", "mixture_of_tokens.cli"]


def run_mot(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "default"}
    result = subprocess.run(MOT + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def deprecation_lines(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if "deprecated" in line.lower() or "FutureWarning" in line or "DeprecationWarning" in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny-mot trained for a few steps on the embedded pydoc text (the quick start's data)."""
    root = tmp_path_factory.mktemp("plain_run")
    result = run_mot(["train", "--preset", "tiny-mot", "--train_tokenizer", "1024", "--output_dir", str(root / "run"),
                      "--block_size", "32", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
                      "--max_steps", "4", "--eval_steps", "2", "--save_steps", "4", "--logging_steps", "2",
                      "--max_train_blocks", "256"], cwd=root)
    return root / "run", result


def test_mot_train_prints_no_deprecation(trained):
    _, result = trained
    assert deprecation_lines(result.stdout + result.stderr) == []


def test_mot_generate_prints_no_deprecation(trained):
    folder, _ = trained
    for extra in (["--prompt", "The module"], ["--prompt", "The module", "--prompt", "A class", "--do_sample"]):
        result = run_mot(["generate", str(folder), "--max_new_tokens", "6", *extra], cwd=folder.parent)
        assert deprecation_lines(result.stdout + result.stderr) == []


def test_mot_eval_prints_no_deprecation(trained, shared_data, tmp_path):
    folder, _ = trained
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    result = run_mot(["eval", str(folder), "--tasks", "piqa", "--limit", "8", "--data_dir", str(shared_data),
                      "--cache_dir", str(tmp_path / "cache"), "--perplexity", str(text), "--block_size", "32"],
                     cwd=tmp_path)
    assert deprecation_lines(result.stdout + result.stderr) == []


def test_mot_train_output_is_readable_by_others(trained):
    """Files and folders keep the permissions of the user's umask (transformers writes model.safetensors 0600)."""
    folder, _ = trained
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == expected, f"{path}: {oct(path.stat().st_mode & 0o777)}"
