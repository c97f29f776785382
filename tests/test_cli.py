"""The `mot` command as a newcomer meets it: every sub-command's `--help` works and answers without importing the
heavy libraries it does not need for parsing (each `--help` took 4-6 s when they were imported first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixture_of_tokens.cli import COMMANDS

MOT = str(Path(sys.executable).parent / "mot")

# What each `--help` may not import. The training commands need `TrainingArguments` (and with it torch) for their
# options, but not `Trainer`, datasets or our model code; the others need none of them. transformers' modeling code
# comes with `TrainingArguments` where PEFT is installed (the dev extra installs it): transformers.trainer_utils
# imports PEFT, which imports it.
HEAVY = ("torch", "transformers.modeling_utils", "transformers.trainer", "datasets", "lm_eval")
ALLOWED = {
    "train": ("torch", "transformers.modeling_utils"),
    "transition": ("torch", "transformers.modeling_utils"),
    "lm-eval": ("torch", "transformers.modeling_utils", "datasets", "lm_eval"),  # lm-eval's own CLI imports them
}


def imported_modules(stderr: str) -> set[str]:
    """Module names from `-X importtime` lines (`import time: self | cumulative | name`)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_help_works_and_imports_no_heavy_library(command):
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run([MOT, command, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout.lower() and "--" in result.stdout
    heavy = sorted(set(HEAVY) - set(ALLOWED.get(command, ())) & imported_modules(result.stderr))
    assert heavy == [], f"`mot {command} --help` imported {heavy}"


def test_top_level_help_lists_every_command():
    result = subprocess.run([MOT, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in COMMANDS:
        assert f"  {command} " in result.stdout


@pytest.mark.parametrize("argv", [[], ["help"], ["-h"], ["--version"]])
def test_usage_and_version_import_no_heavy_library(argv):
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run([MOT, *argv], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    assert sorted(set(HEAVY) & imported_modules(result.stderr)) == []


@pytest.mark.parametrize(("argv", "expected"), [
    (["card", "--help"], True), (["generate", "folder", "-h"], True), (["-V"], True),
    (["generate", "folder", "--prompt", "help"], False), (["train", "--output_dir", "out"], False),
])
def test_the_console_script_skips_the_registration_only_for_help_and_version(argv, expected):
    from mixture_of_tokens_console import uses_no_model

    assert uses_no_model(argv) is expected


# ------------------------------------------------------------------ bad model folders: one line, exit 2, nothing written


@pytest.fixture(scope="module")
def model_dir(tiny_model_folder) -> Path:
    """A tiny untrained MoT folder with a byte-level tokenizer (no training needed to be read)."""
    return tiny_model_folder("model", max_position_embeddings=32)


def broken_copy(model_dir: Path, tmp_path: Path, breakage: str) -> Path:
    import json
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(model_dir, folder)
    if breakage == "truncated weights":
        weights = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    elif breakage == "invalid config value":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "group_size": 0}))
    elif breakage == "config not json":
        (folder / "config.json").write_text("{ not json")
    return folder


BREAKAGES = {
    "truncated weights": "model.safetensors: not a complete safetensors file (incomplete metadata",
    "invalid config value": "config.json: group_size must be a positive integer, got 0",
    "config not json": "config.json: not a readable JSON file",
}
COMMAND_LINES = {
    "generate": lambda folder, out: ["generate", str(folder), "--prompt", "a small"],
    "eval": lambda folder, out: ["eval", str(folder), "--perplexity", str(folder / "config.json"), "--output",
                                 str(out / "eval.json")],
    "convert": lambda folder, out: ["convert", str(folder), str(out / "converted"), "--to", "token_choice"],
    "push": lambda folder, out: ["push", str(folder), "org/name"],
    "card": lambda folder, out: ["card", str(folder)],
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("command", sorted(COMMAND_LINES))
def test_a_broken_model_folder_gives_one_line_and_writes_nothing(command, breakage, model_dir, tmp_path):
    if command == "card" and breakage == "truncated weights":
        pytest.skip("`mot card` reads config.json and the records, never the weights")
    folder = broken_copy(model_dir, tmp_path, breakage)
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in folder.iterdir())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing may reach a network
    result = subprocess.run([MOT, *COMMAND_LINES[command](folder, out)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"mot {command}: error: ") and BREAKAGES[breakage] in lines[0], lines[0]
    assert list(out.iterdir()) == [] and sorted(p.name for p in folder.iterdir()) == before


def test_converted_folder_has_the_umask_permissions(model_dir, tmp_path):
    """`mot convert` publishes its output folder with the permissions of the user's umask, not those of the private
    temporary folder it was written in (0700) or of transformers' atomic save of the weights (0600)."""
    result = subprocess.run([MOT, "convert", str(model_dir), str(tmp_path / "tc"), "--to", "token_choice"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    mask = os.umask(0)
    os.umask(mask)
    for path in [tmp_path / "tc", *(tmp_path / "tc").rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == expected, f"{path}: {oct(path.stat().st_mode & 0o777)}"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_unknown_routing_gives_one_line_naming_it_and_the_allowed_ones(command, model_dir, tmp_path):
    """MoTConfig judges `--mot_routing` (its commands take no argparse choices: the routings live in the config)."""
    from mixture_of_tokens.modeling.configuration_mot import MOT_ROUTINGS

    result = subprocess.run([MOT, *COMMAND_LINES[command](model_dir, tmp_path), "--mot_routing", "bogus"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"mot {command}: error: --mot_routing") and "'bogus'" in lines[0], lines[0]
    assert ", ".join(MOT_ROUTINGS) in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_readme_and_help_give_the_same_smoke_run_time():
    """The README's smoke-run line states the figure `python -m experiments --help` gives."""
    import re

    root = Path(__file__).resolve().parents[1]
    help_text = subprocess.run([sys.executable, "-m", "experiments", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=root).stdout
    figure = re.search(r"checks the pipeline \((~\d+ \w+) on", " ".join(help_text.split())).group(1)
    readme = (root / "README.md").read_text()
    smoke_line = next(line for line in readme.splitlines() if "experiments --smoke" in line)
    assert figure in smoke_line
