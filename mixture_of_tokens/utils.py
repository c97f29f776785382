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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (and, for a folder, everything inside) the permissions a plain `open` or `mkdir` would give.

    Temporary files and folders (`mkstemp`, `mkdtemp`, and transformers' own atomic save of model.safetensors) are
    created private (0600/0700); renamed into place they would stay so, and other users of a shared machine could not
    read a model that someone meant to share.
    """
    path = Path(path)
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


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
        apply_umask(staging)
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


def atomic_write(destination: str | os.PathLike, write) -> Path:
    """`write(path)` writes the file under a temporary name beside `destination`, which is then renamed into place:
    a crash never leaves half a file."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    os.close(handle)
    try:
        write(Path(staging))
        apply_umask(staging)
        os.replace(staging, destination)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return destination


def atomic_write_text(destination: str | os.PathLike, text: str) -> Path:
    """Write `text` to `destination` atomically (see `atomic_write`)."""
    return atomic_write(destination, lambda path: path.write_text(text, encoding="utf-8"))
