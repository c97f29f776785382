"""retain_freed_cpu_memory: large freed tensors are reused without page faults (glibc Linux), and it can be
switched off."""

import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free a 64 MiB tensor several times; report whether the setting applied and the fewest
# minor page faults a round cost (a fresh mmap faults once per 4 KiB page: ~16K every round). With the setting,
# rounds reuse heap pages and cost none once the heap has settled, hence the minimum. Settling took up to 8 rounds
# on our CI machine (whose kernel also pages out idle memory), so 16 rounds: with glibc's default none is free.
PROBE = textwrap.dedent("""
    import resource, torch
    from mixture_of_tokens.training.cpu_memory import retain_freed_cpu_memory
    applied = retain_freed_cpu_memory()
    faults = []
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensor = torch.empty(16 * 2**20, dtype=torch.float32)
        tensor.fill_(1.0)
        del tensor
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, min(faults))
""")


def run_probe(**env) -> tuple[bool, int]:
    import os

    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    applied, faults = result.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC_LINUX, reason="the malloc setting exists only with glibc on Linux")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = run_probe(MOT_SYSTEM_MALLOC="0")
    assert applied
    assert faults < 1000, f"every re-allocation of a 64 MiB tensor page-faulted ({faults}+ faults)"


@pytest.mark.skipif(not GLIBC_LINUX, reason="the malloc setting exists only with glibc on Linux")
def test_system_malloc_opt_out():
    applied, faults = run_probe(MOT_SYSTEM_MALLOC="1")
    assert not applied
    # glibc's default: the 64 MiB block is mmapped afresh, so every page faults again.
    assert faults > 8000
