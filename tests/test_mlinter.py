"""transformers' modeling-structure linter (transformers-mlinter, in the dev extra) on the files that travel to the
Hub: at most three violations, each of a rule that docs/design.md ("transformers' modeling linter") names with why it
cannot apply to a remote-code model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO, require

require("mlinter", reason="transformers-mlinter is in the dev extra")

MODEL_FILES = ("mixture_of_tokens/modeling/modeling_mot.py", "mixture_of_tokens/modeling/configuration_mot.py")
MAX_VIOLATIONS = 3
SECTION = "## transformers' modeling linter"
# A documented exception: a list item that starts with the rule id and goes on to say why, e.g. "- `TRF018`: ...".
EXCEPTION = re.compile(r"^- `?(TRF\d{3})`?\W+\w", re.MULTILINE)


def lint(tmp_path) -> list[dict]:
    """The linter's findings on the model files, from its JSON report."""
    report = tmp_path / "mlinter.json"
    result = subprocess.run(
        [sys.executable, "-m", "mlinter", "--no-progress", "--no-cache", "--output-json", str(report), *MODEL_FILES],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    findings = json.loads(report.read_text())["findings"]
    assert result.returncode == (1 if findings else 0), result.stdout[-3000:] + result.stderr[-3000:]
    return findings


def documented_exceptions() -> set[str]:
    """The rule ids listed in docs/design.md's section on the linter."""
    text = (REPO / "docs" / "design.md").read_text()
    assert SECTION in text, f"docs/design.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return set(EXCEPTION.findall(section))


def test_model_files_pass_transformers_modeling_linter_but_for_documented_exceptions(tmp_path):
    findings = lint(tmp_path)
    listing = "\n".join(f"{f['path']}:{f['line']}: {f['message']}" for f in findings)
    assert len(findings) <= MAX_VIOLATIONS, f"{len(findings)} violations (at most {MAX_VIOLATIONS}):\n{listing}"
    documented = documented_exceptions()
    undocumented = sorted({f["rule"] for f in findings} - documented)
    assert not undocumented, f"not named in docs/design.md ({SECTION[3:]}): {undocumented}\n{listing}"
    # and the list names no rule the files no longer break
    stale = sorted(documented - {f["rule"] for f in findings})
    assert not stale, f"docs/design.md ({SECTION[3:]}) names rules the model files no longer break: {stale}"
