"""Shared fixtures. Tests that need ../shared/data use `shared_data`: they fail (not skip) under CI=true when the
data is missing, so a broken checkout layout can never pass silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").exists():
        message = f"../shared/data not found at {SHARED_DATA}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
