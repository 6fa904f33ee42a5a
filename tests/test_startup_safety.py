"""Starting a job safely (run/startup.py, run_lock.py; docs/distributed.md, "Starting a job"):

- a second job on a run folder is refused in one line naming the holder; a lock left by a killed job is taken over;
  a lock held on another host is named with how to remove it; a planted symbolic link is never followed;
- `--restart` removes nothing until the job agreed to start;
- a job of N ranks without a layout, and a run file that fails before the Trainer exists, are one line, once;
- the memory check counts every rank that shares a host (virtual ranks included).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from mpi_jobs import refused_by_every_rank, run_mpi
from test_run_safety import write_run
from trinity.run.run_config import RunConfigError, load_run_config
from trinity.run.run_lock import LOCK_NAME, RunLock
from trinity.run.trainer import Trainer

AVAILABLE_MEMORY_ENV = "TRINITY_AVAILABLE_MEMORY"  # reference/training/memory.py: replaces the measured memory

HOLD = """
    import json, os, sys, time
    from trinity.run.run_lock import RunLock
    lock = RunLock(sys.argv[1], sys.argv[2])
    if len(sys.argv) > 3:  # pretend to be a job on another host
        path = os.path.join(os.path.abspath(sys.argv[1]), {name!r})
        os.pwrite(os.open(path, os.O_WRONLY), json.dumps({{"pid": 4242, "host": sys.argv[3], "since": 0}}).encode()
                  + b" " * 64, 0)
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(tmp_path, *host):
    """A process holding the lock of tmp_path's run folder (ckpt, metrics.jsonl); returns the Popen once held."""
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(HOLD.format(name=LOCK_NAME)))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl"),
                             *host], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _quiet(*args, **kwargs):
    return None


def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    run = load_run_config(write_run(tmp_path, steps=2, every=2))
    holder = _holder(tmp_path)
    try:
        for flags in ({}, {"resume": True}, {"restart": True}):
            with pytest.raises(RunConfigError) as refused:
                Trainer(run, log=_quiet, **flags)
            message = str(refused.value)
            assert "\n" not in message and "another job is running in this run folder" in message, message
            assert f"pid {holder.pid} on " in message and " since " in message
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path):
    run = load_run_config(write_run(tmp_path, steps=1, every=1))
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "ckpt" / LOCK_NAME).exists()  # the file stays; its flock went with the process
    lines = []
    trainer = Trainer(run, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("took over the lock" in line and f"pid {holder.pid} " in line and "no longer running" in line
               for line in lines), lines
    trainer.train()
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()  # given back at the end
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["step_00000001.h5"]


@pytest.mark.parametrize("killed", [False, True])
def test_a_lock_held_on_another_host_says_how_to_remove_it(tmp_path, killed):
    """Held (its flock taken) or left behind by a killed job (no flock, which on a shared file system may simply not
    reach this host): a lock file naming another host is refused either way, and left in place."""
    run = load_run_config(write_run(tmp_path, steps=1, every=1))
    holder = _holder(tmp_path, "node-17")
    try:
        if killed:
            holder.kill()
            holder.wait()
        with pytest.raises(RunConfigError, match=r"another job holds this run folder \(pid 4242 on node-17 since "
                                                 r".*\), which cannot be checked from .*; if that job is no longer "
                                                 r"running, remove .*\.trinity\.lock and start again"):
            Trainer(run, log=_quiet)
        assert (tmp_path / "ckpt" / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_symbolic_link_for_a_lock_file_is_refused_not_followed(tmp_path):
    run = load_run_config(write_run(tmp_path, steps=1, every=1))
    (tmp_path / "ckpt").mkdir()
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("keep me")
    (tmp_path / "ckpt" / LOCK_NAME).symlink_to(victim)
    with pytest.raises(RunConfigError, match="lock file .* is a symbolic link; remove it"):
        Trainer(run, log=_quiet)
    assert victim.read_text() == "keep me"


def test_trainers_of_one_process_share_its_lock_and_a_refused_start_leaves_nothing(tmp_path):
    """The simulator's virtual ranks and tests build several Trainers in one process: they share the lock. A start
    that is refused leaves no lock file and no folder behind."""
    run = load_run_config(write_run(tmp_path, steps=1, every=1))
    lock = RunLock(run.checkpoint_dir, run.metrics_path)
    try:
        Trainer(run, log=_quiet).train()
    finally:
        lock.release()
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists() and not (tmp_path / "metrics.jsonl.lock").exists()
    bad = write_run(tmp_path / "b", steps=1, every=1)
    (tmp_path / "b" / "tokens.bin").write_bytes(b"")  # an empty token file: refused after the lock was taken
    with pytest.raises(RunConfigError):
        Trainer(load_run_config(bad), log=_quiet)
    assert not (tmp_path / "b" / "ckpt").exists() and not (tmp_path / "b" / "metrics.jsonl.lock").exists()


# ---- one line, once, for a job of several ranks --------------------------------------------------------------------
def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_several_ranks_without_a_layout_are_one_line_and_restart_removes_nothing(tmp_path):
    """`mpiexec -n 2` and `simulate --ranks 2` without --mesh: one line, once, exit 2, naming the layouts that fit;
    with --restart the earlier run's checkpoints are still there (they are removed only once the job agreed)."""
    run = write_run(tmp_path, steps=2, every=1)
    first = subprocess.run([sys.executable, "-m", "trinity.cli", "train", run], capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr
    before = sorted(os.listdir(tmp_path / "ckpt"))
    code, out, err, _ = run_mpi(2, ["-m", "trinity.cli", "train", run, "--restart"], cwd=tmp_path, timeout=120)
    line = _one_line(err)
    assert refused_by_every_rank(code, out, err) and "Traceback" not in err, err
    assert re.fullmatch(r"trinity train: error: \[parallel\] layout single: .* but the job has 2 ranks; layouts that "
                        r"fit: dp_shard=2.*--mesh.* \(every rank\)", line), line
    assert sorted(os.listdir(tmp_path / "ckpt")) == before
    sim = subprocess.run([sys.executable, "-m", "trinity.cli", "simulate", run, "--ranks", "2", "--restart"],
                         capture_output=True, text=True, timeout=600)
    assert sim.returncode == 2 and "layouts that fit: dp_shard=2" in _one_line(sim.stderr), sim.stderr
    assert sorted(os.listdir(tmp_path / "ckpt")) == before


@pytest.mark.parametrize("how", ["bad_toml", "bad_mesh"])
def test_errors_before_the_trainer_are_one_line_once(tmp_path, how):
    run = write_run(tmp_path, steps=1, every=1)
    args = ["-m", "trinity.cli", "train", run, "--mesh", "dp_shard=2"]
    if how == "bad_toml":
        with open(run, "a") as f:
            f.write("[train\n")
    else:
        args[-1] = "dp_shard=two"
    code, out, err, _ = run_mpi(2, args, cwd=tmp_path, timeout=120)
    line = _one_line(err)
    assert refused_by_every_rank(code, out, err), (code, err)
    assert line.startswith("trinity train: error: ") and line.endswith("(every rank)"), err
    assert "rank 0:" not in err and "rank 1:" not in err and "MPI_Abort" not in err


# ---- memory over the ranks of a host ---------------------------------------------------------------------------
def _need(run) -> int:
    trainer = Trainer(load_run_config(run), log=_quiet)
    trainer.close()
    return trainer._memory_need["need"]


def test_the_memory_check_counts_the_ranks_that_share_a_host(tmp_path):
    """Available memory for one rank and a half: one process passes, two virtual ranks (one host) and two mpiexec
    ranks of this machine are refused in one line naming the host and its ranks."""
    run = write_run(tmp_path, steps=1, every=1)
    env = {**os.environ, AVAILABLE_MEMORY_ENV: str(_need(run) * 3 // 2)}
    single = subprocess.run([sys.executable, "-m", "trinity.cli", "train", run], capture_output=True, text=True,
                            timeout=600, env=env)
    assert single.returncode == 0, single.stderr
    sim = subprocess.run([sys.executable, "-m", "trinity.cli", "simulate", run, "--ranks", "2", "--mesh",
                          "dp_shard=2", "--restart"], capture_output=True, text=True, timeout=600, env=env)
    line = _one_line(sim.stderr)
    assert sim.returncode == 2 and "per rank; the 2 ranks on " in line and "(0,1) need" in line, sim.stderr
    assert "GiB available there" in line and "run fewer ranks per host" in line
    code, out, err, _ = run_mpi(2, ["-m", "trinity.cli", "train", run, "--mesh", "dp_shard=2", "--restart"],
                                cwd=tmp_path, timeout=120, env={AVAILABLE_MEMORY_ENV: env[AVAILABLE_MEMORY_ENV]})
    assert refused_by_every_rank(code, out, err) and "per rank; the 2 ranks on " in _one_line(err), err
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1  # not restarted


def test_a_bad_available_memory_variable_is_one_line(tmp_path):
    run = write_run(tmp_path, steps=1, every=1)
    r = subprocess.run([sys.executable, "-m", "trinity.cli", "train", run], capture_output=True, text=True,
                       timeout=600, env={**os.environ, AVAILABLE_MEMORY_ENV: "lots"})
    assert r.returncode == 2 and f"${AVAILABLE_MEMORY_ENV} = 'lots': must be a number of bytes" in _one_line(r.stderr)



# ---- the memory check comes before any state ----------------------------------------------------------------------
LARGE = 'preset = "trinity-large"'  # terabytes of state: building it on any rank is a MemoryError or minutes of swap
SIXTEEN_GIB = str(16 << 30)


def _never(*args, **kwargs):
    raise AssertionError("a state was built or loaded before every host's memory was checked")


@pytest.mark.parametrize("resume", [False, True])
def test_simulate_of_a_model_too_large_is_refused_before_any_rank_builds_its_state(tmp_path, monkeypatch, capsys,
                                                                                   resume):
    """Two virtual ranks of trinity-large: the agreement refuses the job in one line, once, exit 2, and no rank has
    built or loaded params, optimizer or balancing state, init_from weights or a resume point by then (each of
    them fails the test if called)."""
    import trinity.run.startup as startup
    import trinity.reference.interop.hf as hf
    from trinity.cli.main import main

    run = write_run(tmp_path, steps=1, every=1, model=LARGE)
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, SIXTEEN_GIB)
    for name in ("init_params", "init_optimizer_state", "init_balancing_state"):
        monkeypatch.setattr(startup, name, _never)
    monkeypatch.setattr(hf, "load_pretrained", _never)
    monkeypatch.setattr(startup.ShardedCheckpointManager, "load_newest_valid", _never)
    status = main(["simulate", run, "--ranks", "2", "--mesh", "dp_shard=2", *(["--resume"] if resume else [])])
    line = _one_line(capsys.readouterr().err)
    assert status == 2 and line.startswith("trinity simulate: error: "), line
    assert "per rank; the 2 ranks on " in line and "more than the 16.00 GiB available there" in line, line


def test_a_model_too_large_for_its_ranks_is_one_line_under_simulate_and_mpiexec(tmp_path):
    """The same refusal as a user meets it, without any stand-in: `simulate --ranks 2` and `mpiexec -n 2` of a
    trinity-large run print one line, once, exit 2, with no traceback (before, a MemoryError on every rank)."""
    run = write_run(tmp_path, steps=1, every=1, model=LARGE)
    sim = subprocess.run([sys.executable, "-m", "trinity.cli", "simulate", run, "--ranks", "2", "--mesh",
                          "dp_shard=2"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, AVAILABLE_MEMORY_ENV: SIXTEEN_GIB})
    assert sim.returncode == 2 and "per rank; the 2 ranks on " in _one_line(sim.stderr), sim.stderr
    code, out, err, _ = run_mpi(2, ["-m", "trinity.cli", "train", run, "--mesh", "dp_shard=2"], cwd=tmp_path,
                                timeout=300, env={AVAILABLE_MEMORY_ENV: SIXTEEN_GIB})
    assert refused_by_every_rank(code, out, err), (code, err)
    assert "per rank; the 2 ranks on " in _one_line(err) and "Traceback" not in err, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "metrics.jsonl.lock").exists()


# ---- a refused start leaves no folder behind -------------------------------------------------------------------
def test_a_refused_start_removes_every_folder_the_lock_created(tmp_path):
    """A checkpoint folder two levels below a missing folder: the lock creates all three; a refused start (an empty
    token file) removes all three again, deepest first, and a folder that was there before stays."""
    from test_run_safety import edit_run

    run = write_run(tmp_path, steps=1, every=1)
    edit_run(run, 'dir = "ckpt"', 'dir = "newrun/sub/ckpt"')
    edit_run(run, 'metrics = "metrics.jsonl"', 'metrics = "newrun/logs/metrics.jsonl"')
    (tmp_path / "tokens.bin").write_bytes(b"")  # refused after the lock was taken
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RunConfigError):
        Trainer(load_run_config(run), log=_quiet)
    assert sorted(os.listdir(tmp_path)) == before
    lock = RunLock(str(tmp_path / "newrun" / "sub" / "ckpt"), str(tmp_path / "newrun" / "metrics.jsonl"))
    (tmp_path / "newrun" / "keep.txt").write_text("a file of the user's")
    lock.release()
    assert sorted(os.listdir(tmp_path / "newrun")) == ["keep.txt"]  # sub/ckpt went; newrun holds a file: it stays
