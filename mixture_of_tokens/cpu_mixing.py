"""Fused CPU kernels for the MoT mixing (merge, emit and their gradients), compiled on first use.

On a CPU the mixing around the experts is memory-bound: with batched matmuls each of the merge and the emit reads
the activations once for a layout copy, once for a small [32 x 32] @ [32 x d] product whose oneDNN kernel runs at
a quarter of its peak, and once more for the copy back, forward and backward. `csrc/mixing_cpu.cpp` does each of
them in one pass that reads one layout and writes the other (see its header); docs/performance.md has the figures.

The kernels are optional. They are built with `torch.utils.cpp_extension` (a C++ compiler and `ninja`, ~30 s the
first time, cached under `TORCH_EXTENSIONS_DIR` after that) when a MoT layer first runs on a CPU; without a
compiler, or with `MOT_CPU_KERNELS=0`, the layer uses the batched matmuls instead and computes the same thing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "mixing_cpu.cpp"
DISABLE_VARIABLE = "MOT_CPU_KERNELS"

_lock = threading.Lock()
_attempted = False
_kernels: ModuleType | None = None


def kernels_enabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1").lower() not in ("0", "false", "no", "off")


def _cpu_fingerprint() -> str:
    """A short hash of this CPU's instruction-set flags (Linux), else of what `platform` reports."""
    description = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            description = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), description)
    except OSError:
        pass
    return hashlib.sha1(" ".join(sorted(description.split())).encode()).hexdigest()[:10]


def _extension_name() -> str:
    # -march=native builds for this CPU, against this torch's C++ ABI: name the build after both, so that a cache
    # shared between machines (a network home on a cluster) or torch versions never hands one of them a binary
    # built for another (an AVX512-BF16 build would crash on a CPU without it).
    torch_version = "".join(character if character.isalnum() else "_" for character in torch.__version__)
    return f"mot_mixing_cpu_{_cpu_fingerprint()}_torch{torch_version}"


def _put_ninja_on_path() -> None:
    # torch runs `ninja` from PATH; the `ninja` wheel installs it next to the interpreter, which is not on PATH
    # when the virtualenv's python is run without activating it.
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _is_built(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:  # a private helper of torch's: if it moves, just say we are building
        return False


def build(name: str, extra_cflags: tuple[str, ...] = (), verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the kernels for this CPU; raises when that fails."""
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    if not _is_built(name):  # a one-off pause of ~30 s deserves a word
        logger.warning("Building the fused MoT CPU mixing kernels (once per machine, ~30 s)...")
    return load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags],
        extra_ldflags=["-fopenmp"],
        verbose=verbose,
    )


def load_kernels(verbose: bool = False) -> ModuleType | None:
    """The compiled kernels, building them on the first call; None when disabled or when the build fails."""
    global _attempted, _kernels
    if not kernels_enabled():
        return None
    if _attempted:  # every MoT layer call asks: answer without the lock once settled
        return _kernels
    with _lock:
        if _attempted:
            return _kernels
        try:
            _kernels = build(_extension_name(), verbose=verbose)
        except Exception as error:  # no compiler, no ninja, an unsupported platform: fall back, but say so
            logger.warning(
                "Could not build the MoT CPU mixing kernels (%s: %s); MoT layers on CPU use batched matmuls "
                "instead (same results, slower). Set %s=0 to skip this attempt.",
                type(error).__name__,
                str(error).strip().splitlines()[-1] if str(error).strip() else "",
                DISABLE_VARIABLE,
            )
            _kernels = None
        _attempted = True  # after _kernels is set: the check before the lock must never see a half-done attempt
        return _kernels
