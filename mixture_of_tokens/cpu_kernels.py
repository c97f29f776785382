"""MoT's merge and emit, and the experts' batched products, as compiled kernels for CPUs with AVX512-BF16
(`csrc/kernels_cpu.cpp`), built on first use.

In bf16 on such a CPU the batched matmuls of the merge and emit run their small products (a 32-long sum, or 32
rows) through oneDNN at 60-75% of its speed on the dense FFN's, and need the merged and processed tokens, E/G times
the input each, copied between the positions' layout and the experts'. The kernels read and write the experts'
layout directly, which takes about a tenth off the granular variants' layer forward + backward (docs/performance.md,
"Compiled merge and emit"). The experts' own products (128-256 rows per expert in the granular variants) run at
85-90% of the dense FFN's speed through oneDNN; the kernels run them at about its speed ("Compiled expert
products"). The results are the batched matmuls' (fp32 sums, rounded to bf16 once).

Importing the package installs `kernels_for` as `MixtureOfTokens.mixing_kernels` and `product_kernels_for` as
`MoTExperts.product_kernels`, which ask for them on each call; the modeling files, which travel to the Hub alone,
never import this module. The kernels are built with `torch.utils.cpp_extension` (a C++ compiler and ninja, ~30 s the
first time, cached under `TORCH_EXTENSIONS_DIR` after that); without a compiler, or with `MOT_CPU_KERNELS=0`, the
layers run their batched matmuls and compute the same.
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

SOURCE = Path(__file__).parent / "csrc" / "kernels_cpu.cpp"
DISABLE_VARIABLE = "MOT_CPU_KERNELS"

_lock = threading.Lock()
_attempted = False
_kernels: ModuleType | None = None


def kernels_enabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1").lower() not in ("0", "false", "no", "off")


def cpu_runs_kernels() -> bool:
    """Whether this CPU has AVX512-BF16 and no AMX. With AMX, oneDNN's bf16 products run on the tile units, which
    these kernels do not use (not measured: no AMX machine was at hand when they were written)."""
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(has_bf16) and not has_amx


def _cpu_fingerprint() -> str:
    """A short hash of this CPU's instruction-set flags (Linux), else of what `platform` reports."""
    description = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            description = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), description)
    except OSError:
        pass
    return hashlib.sha1(" ".join(sorted(description.split())).encode()).hexdigest()[:10]


def extension_name() -> str:
    # -march=native builds for this CPU, against this torch's C++ ABI: the name carries both and the source's hash,
    # so that a cache shared between machines (a network home on a cluster), torch versions or versions of this
    # package never hands one of them a binary built for another.
    torch_version = "".join(character if character.isalnum() else "_" for character in torch.__version__)
    source_hash = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:8]
    return f"mot_cpu_kernels_{_cpu_fingerprint()}_torch{torch_version}_{source_hash}"


def _put_ninja_on_path() -> None:
    # torch runs `ninja` from PATH; the `ninja` wheel installs it next to the interpreter, which is not on PATH when
    # a virtualenv's python is run without activating it.
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
    except Exception:  # a private helper of torch's: if it moves, just say that we build
        return False


def build(name: str | None = None, verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the kernels for this CPU; raises when that fails."""
    from torch.utils.cpp_extension import load

    name = name or extension_name()
    _put_ninja_on_path()
    if not _is_built(name):  # a pause of half a minute in the middle of a first forward deserves a word
        logger.warning("Building MoT's CPU kernels (once per machine and torch version, ~30 s)...")
    return load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=verbose,
    )


def load_kernels() -> ModuleType | None:
    """The compiled kernels, building them on the first call; None where disabled, where the CPU does not run them,
    or when the build fails (with a warning)."""
    global _attempted, _kernels
    if _attempted:  # every MoT layer call asks: answer without the lock once settled
        return _kernels
    with _lock:
        if _attempted:
            return _kernels
        if kernels_enabled() and cpu_runs_kernels():
            try:
                _kernels = build()
            except Exception as error:  # no compiler, no ninja, an old compiler: fall back, but say so
                message = str(error).strip().splitlines()
                logger.warning(
                    "Could not build MoT's CPU kernels (%s: %s); MoT layers on this CPU run batched matmuls "
                    "instead (same results, slower). %s=0 skips this attempt.",
                    type(error).__name__, message[-1] if message else "", DISABLE_VARIABLE,
                )
        _attempted = True  # after _kernels is set: the check before the lock must never see a half-done attempt
        return _kernels


def kernels_fit(mixing: torch.Tensor, tokens: torch.Tensor) -> bool:
    """Whether weights `[p, G, E]` and tokens `[p, G, d]` are what the kernels take: bf16 on the CPU, G in
    {16, 32, 48, 64} (the paper's 32), E even, d a multiple of 64."""
    group_size, num_experts, hidden_size = mixing.shape[1], mixing.shape[2], tokens.shape[2]
    return (
        tokens.device.type == "cpu"
        and tokens.dtype == mixing.dtype == torch.bfloat16
        and group_size % 16 == 0
        and group_size <= 64
        and num_experts % 2 == 0
        and hidden_size % 64 == 0
    )


def kernels_for(mixing: torch.Tensor, tokens: torch.Tensor) -> ModuleType | None:
    """`MixtureOfTokens.mixing_kernels`: the kernels where they apply to these weights and tokens, else None."""
    if not kernels_fit(mixing, tokens):
        return None
    return load_kernels()


def _per_expert_matrix(tensor: torch.Tensor) -> bool:
    """Row-major per expert, or a transposed view of such a tensor, with an even stride between its rows (or
    columns): what the product kernels read."""
    row_major = tensor.stride(2) == 1 and tensor.stride(1) % 2 == 0
    return row_major or (tensor.stride(1) == 1 and tensor.stride(2) % 2 == 0)


def products_fit(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels take `[E, M, K] @ [E, K, N]` and both its gradients' products: bf16 CPU tensors, M even,
    K and N multiples of 64, each operand row-major per expert or a transposed view."""
    if inputs.dim() != 3 or weight.dim() != 3:
        return False
    rows, inner, columns = inputs.shape[1], inputs.shape[2], weight.shape[2]
    return (
        inputs.device.type == weight.device.type == "cpu"
        and inputs.dtype == weight.dtype == torch.bfloat16
        and rows % 2 == 0
        and inner % 64 == 0
        and columns % 64 == 0
        and _per_expert_matrix(inputs)
        and _per_expert_matrix(weight)
    )


def product_kernels_for(inputs: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """`MoTExperts.product_kernels`: the kernels where they apply to these inputs and weights, else None."""
    if not products_fit(inputs, weight):
        return None
    return load_kernels()


def install() -> None:
    """Make this package's MoT layers and experts ask for the kernels (called when the package is imported)."""
    from .modeling.modeling_mot import MixtureOfTokens, MoTExperts

    MixtureOfTokens.mixing_kernels = staticmethod(kernels_for)
    MoTExperts.product_kernels = staticmethod(product_kernels_for)
