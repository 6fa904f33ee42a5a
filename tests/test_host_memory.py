"""accel/host_memory.py: with the policy on, a freed large array's pages are reused by the next allocation instead
of being unmapped and faulted in again; TRINITY_HOST_MALLOC=default leaves glibc's defaults."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, numpy as np
from trinity.accel import host_memory
applied = host_memory.keep_freed_memory()
def touch():  # 64 MiB, every page written
    a = np.empty(1 << 24, dtype=np.float32); a[:] = 1.0; return a
a = touch(); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "threshold": host_memory.mmap_threshold}))
"""


def _probe(env_value=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRINITY_HOST_MALLOC"}
    if env_value is not None:
        env["TRINITY_HOST_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_pages_are_reused_and_the_policy_can_be_turned_off():
    huge_pages = (1 << 26) // (2 << 20)  # 64 MiB is 32 transparent huge pages (NumPy asks for them), 16,384 small
    on, off = _probe(), _probe("default")
    assert on["applied"] and not off["applied"]
    if on["threshold"] < 1 << 26:
        pytest.skip(f"this glibc caps the mmap threshold at {on['threshold']} bytes, below the 64 MiB probe")
    # glibc's default unmaps a freed 64 MiB block (it is above the largest dynamic mmap threshold), so the second
    # array faults in every page again, at least one fault per huge page; with the policy the pages are still mapped
    assert off["faults"] >= huge_pages, off
    assert on["faults"] < huge_pages // 2, on
