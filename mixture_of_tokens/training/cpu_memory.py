"""Keep freed CPU memory inside the process, so training on a CPU does not page-fault every large tensor afresh.

glibc's malloc serves every allocation above 32 MiB with its own `mmap` and returns it to the OS with `munmap`
when it is freed. A training step on a CPU allocates and frees the same large tensors every step (activations,
and with `zero_grad(set_to_none=True)` every gradient), so each step pays a page fault per 4 KiB of them again:
at the paper's Medium sizes that is ~15 ms for each 64 MiB expert-weight gradient, which is most of what made
a MoT layer look parameter-bound on a CPU. Telling malloc never to `mmap` (so large blocks come from the heap)
and never to trim the heap keeps the pages mapped and reused, the same effect as the jemalloc/tcmalloc that
`torch.backends.xeon.run_cpu` preloads. The cost: the process keeps its peak memory until it exits.

Only glibc on Linux has these knobs; everywhere else this is a no-op. `mot train` and the benchmarks call it on
CPU runs; set `MOT_SYSTEM_MALLOC=1` to keep the system's default behaviour.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# The largest int mallopt accepts: the heap is trimmed only when 2 GiB at its top are free.
_NEVER_TRIM_BYTES = 2**31 - 1

_applied = False


def retain_freed_cpu_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse (see the module docstring). Idempotent.

    Returns True when the setting is in effect, False where it is unavailable or disabled by MOT_SYSTEM_MALLOC=1.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("MOT_SYSTEM_MALLOC", "").lower() in ("1", "true", "yes"):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success, 0 on error.
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES))
    return _applied
