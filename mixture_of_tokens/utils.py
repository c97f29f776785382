"""Small helpers shared by the command-line tools (not needed by the model code itself)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class UserError(ValueError):
    """Bad input from the user: the `mot` command prints the message (no traceback) and exits with status 2."""


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `destination`; on success it replaces `destination` in one rename.

    If the body raises, the temporary folder is removed and `destination` is left exactly as it was, so an
    interrupted or failed command never leaves a half-written output behind.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise UserError(f"{destination} already exists; pass --overwrite to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if destination.exists():
        retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, retired)
        os.replace(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, destination)


def atomic_write_text(destination: str | os.PathLike, text: str) -> Path:
    """Write `text` under a temporary name beside `destination`, then rename: a crash never leaves half a file."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(staging, destination)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return destination
