"""The README's first command, as a newcomer runs it: it trains, shows samples made of recognisable words, and
ends by saying what to do next."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_samples_words_and_shows_the_next_steps(tmp_path):
    import pydoc_data.topics

    env = {**os.environ, "OUT": str(tmp_path / "quickstart"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert "final eval loss" in output
    sampled = output.split("eight samples from", 1)[1].split("[quickstart] next steps", 1)[0]
    samples = re.split(r"^=== \d ===$", sampled, flags=re.MULTILINE)[1:]
    assert len(samples) == 8
    # Words of three letters or more: most must be words of the training text, not fragments.
    vocabulary = {word.lower() for word in re.findall(r"[A-Za-z]{3,}", " ".join(pydoc_data.topics.topics.values()))}
    generated = [word.lower() for sample in samples for word in re.findall(r"[A-Za-z]{3,}", sample)]
    assert len(generated) >= 40, samples
    known = sum(word in vocabulary for word in generated) / len(generated)
    assert known >= 0.7, (known, samples)
    next_steps = output.split("next steps", 1)[1]
    for command in ("mot generate", "mot transition", "mot eval", "mot card"):
        assert command in next_steps
    # The files the next steps name exist, so the commands run as printed.
    examples = tmp_path / "quickstart-examples"
    assert str(examples / "prompts.txt") in next_steps and len((examples / "prompts.txt").read_text().split("\n")) > 8
    assert str(examples / "held_out.txt") in next_steps and len((examples / "held_out.txt").read_text()) > 10_000
