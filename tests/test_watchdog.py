"""A hung rank ends the job (distributed/watchdog.py; docs/distributed.md, "A hung rank"): the deadline fires for
a wait in a collective, never for time between collectives; it is on by default under mpiexec only; and a real
2-rank job one of whose ranks stops (SIGSTOP) mid-step ends non-zero with the line naming the collective."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from mpi_jobs import run_mpi
from test_run_safety import write_run

HANG_ENV = "TRINITY_FAULT_STOP_MID_STEP"  # run/trainer.py: "R:S" rank R stops itself (SIGSTOP) in step S


def _watchdog(seconds):
    from trinity.distributed.watchdog import Watchdog
    fired = []
    return Watchdog(seconds, rank=3, expire=fired.append, poll=0.01), fired


def test_a_wait_longer_than_the_deadline_fires_once_naming_it():
    dog, fired = _watchdog(0.2)
    try:
        release = threading.Event()
        with dog.watch("Allreduce on group fsdp (ranks 0,1) at step 7 (backward)"):
            deadline = time.monotonic() + 60  # a watchdog of the test itself: fails only on a hang
            while not fired and time.monotonic() < deadline:
                release.wait(0.01)
        assert len(fired) == 1, fired
        assert fired[0].startswith("rank 3: no progress for ")
        assert "s in Allreduce on group fsdp (ranks 0,1) at step 7 (backward); ending the job" in fired[0]
    finally:
        dog.close()


def test_time_between_collectives_is_never_watched():
    dog, fired = _watchdog(0.05)
    try:
        for _ in range(50):
            with dog.watch("Allgather on group world"):
                pass
        time.sleep(0.5)  # computing, ten deadlines long: not a wait in a collective
        assert fired == []
    finally:
        dog.close()


def test_the_watchdog_is_on_by_default_only_under_mpiexec():
    from trinity.distributed.watchdog import WATCHDOG_DEFAULT, watchdog_seconds

    class MpiComm:  # stands for mpi4py.MPI.Intracomm
        pass

    MpiComm.__module__ = "mpi4py.MPI"

    class VirtualComm:
        pass

    assert watchdog_seconds(None, MpiComm()) == WATCHDOG_DEFAULT == 600
    assert watchdog_seconds(5, MpiComm()) == 5 and watchdog_seconds(0, MpiComm()) == 0
    assert watchdog_seconds(None, None) == 0 and watchdog_seconds(5, None) == 0  # a single process
    assert watchdog_seconds(5, VirtualComm()) == 0  # trinity simulate has its own deadlock detection


@pytest.mark.parametrize("where, value", [("file", "-1"), ("file", "nan"), ("file", '"soon"'), ("option", "-3"),
                                          ("option", "inf")])
def test_a_bad_watchdog_value_is_one_line(tmp_path, where, value):
    run = write_run(tmp_path, steps=1, every=1)
    args = [sys.executable, "-m", "trinity.cli", "train", run]
    if where == "file":
        with open(run, "a") as f:
            f.write(f"[parallel]\nwatchdog_seconds = {value}\n")
    else:
        args += ["--watchdog", value]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert ("[parallel] watchdog_seconds = " if where == "file" else "--watchdog ") in r.stderr
    assert "must be a number of seconds >= 0 (0: off)" in r.stderr


def test_a_stopped_rank_ends_the_job_naming_the_collective(tmp_path):
    """Rank 1 SIGSTOPs itself in the middle of step 2; rank 0 waits in the step's next collective; with a 5 s
    watchdog it names that collective and aborts the job (which takes the stopped rank down too). MPIEXEC_TIMEOUT
    (120 s) is only the backstop that makes a hang a failure."""
    run = write_run(tmp_path, steps=4, every=100)
    code, out, err, _ = run_mpi(2, ["-m", "trinity.cli", "train", run, "--mesh", "dp_shard=2", "--watchdog", "5"],
                                cwd=tmp_path, timeout=120, env={HANG_ENV: "1:2"})
    assert code != 0, (out, err)
    lines = [line for line in err.splitlines() if "no progress for" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("rank 0: no progress for ") and " on group " in lines[0] and "at step 2" in lines[0]
    assert lines[0].endswith("ending the job ([parallel] watchdog_seconds = 5)"), lines[0]
