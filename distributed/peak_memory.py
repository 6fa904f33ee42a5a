"""This process's measured peak resident memory, every rank's peak on a metrics line, and a reset of the peak.

    peak_rss_bytes()     the high-water mark of this process's resident set since it started (or since the last
                         reset): VmHWM in /proc/self/status (Linux), else resource.getrusage's ru_maxrss (KiB on
                         Linux, bytes on macOS), else None
    current_rss_bytes()  the resident set now: VmRSS (None where /proc is not there)
    reset_peak()         set the high-water mark back to the current resident set by writing "5" to
                         /proc/self/clear_refs (Linux ≥ 4.0), so that a later peak_rss_bytes() measures one phase
                         (the step, a save) alone; False where the OS does not allow it (then the peak keeps counting
                         from the start, and ru_maxrss is never reset)
    rank_peaks(mesh)     every rank's peak, in rank order, on every rank: one Allreduce of world_size float64
                         (each rank fills its own slot; bytes below 2^53 are exact), in the mesh's "metrics" phase
    peak_summary(peaks)  {"max": the largest peak, "rank": the first rank with it, "ranks": every rank's}: what a
                         metrics line carries (issue 19 item 6), bytes

Resident memory counts every page the process touched and still holds: Python and its libraries (their code is
file-backed, shared between ranks, counted in each), NumPy arrays, the allocator's free lists (with
accel/host_memory.keep_freed_memory a freed block stays resident), MPI's shared-memory buffers. It is what an
operating system's limit or a host's memory sees, so it is what distributed/rank_memory.py's estimate is checked
against.
"""

from __future__ import annotations

import os
import resource
import sys

import numpy as np

__all__ = ["peak_rss_bytes", "current_rss_bytes", "reset_peak", "rank_peaks", "peak_summary"]


def _status_bytes(field: str, proc: str) -> int | None:
    """A "Field:   N kB" line of <proc>/self/status, in bytes (None when it is not there)."""
    try:
        with open(os.path.join(proc, "self", "status"), encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field + ":"):
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    except OSError:
        pass
    return None


def peak_rss_bytes(proc: str = "/proc") -> int | None:
    """The peak resident set of this process in bytes (module docstring); None when nothing reports it."""
    peak = _status_bytes("VmHWM", proc)
    if peak is not None:
        return peak
    try:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    if maxrss <= 0:
        return None
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def current_rss_bytes(proc: str = "/proc") -> int | None:
    """The resident set of this process now, in bytes (VmRSS); None where /proc does not report it."""
    return _status_bytes("VmRSS", proc)


def reset_peak(proc: str = "/proc") -> bool:
    """Reset this process's peak resident set to its current one (clear_refs "5"); True when done."""
    try:
        with open(os.path.join(proc, "self", "clear_refs"), "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rank_peaks(mesh, peak: int | None = None) -> list[int]:
    """Every rank's peak resident bytes (`peak`, default peak_rss_bytes(); 0 where unknown), in rank order, on
    every rank: a "world" sum of a vector in which each rank fills its own slot (collective)."""
    if peak is None:
        peak = peak_rss_bytes() or 0
    mine = np.zeros(mesh.world_size, dtype=np.float64)
    mine[mesh.rank] = float(peak)
    mesh.set_phase("metrics")
    return [int(x) for x in np.asarray(mesh.sum(mine, "world"))]


def peak_summary(peaks: list[int]) -> dict:
    """{"max": bytes, "rank": the first rank at the max, "ranks": [bytes per rank]} of every rank's peak."""
    if not peaks:
        raise ValueError("peak_summary: no ranks")
    top = max(peaks)
    return {"max": int(top), "rank": int(peaks.index(top)), "ranks": [int(p) for p in peaks]}
