"""`trinity simulate` takes bad input like `trinity train` does (issue 18): every input it can check is checked
before any virtual rank starts (the run file, --mesh against --ranks and the model, an upper bound on --ranks,
faults that could never act, the trace's path, NaN/infinite/non-positive numbers), each refusal one line with exit
status 2; SIGTERM/SIGINT end the run as they end `trinity train`: every rank stops after the same step, a checkpoint,
one line, 143/130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_mpi_train import ONE_THREAD
from test_simulate import _data, _run_dir
from trinity.cli.main import main

MESH = ["--mesh", "dp_shard=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def no_threads(monkeypatch):
    """Fail the test if `simulate` starts its virtual ranks (refusals must come before any thread)."""
    from trinity.simulate.virtual.virtual_comm import VirtualCluster

    def started(self, fn, *args, **kwargs):
        raise AssertionError(f"{self.n} virtual ranks were started before the input was checked")

    monkeypatch.setattr(VirtualCluster, "run", started)


def _refused(capsys, argv, *expected):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # argparse's refusals exit; ours return the status
        sys.exit(main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, (stop.value.code, err)
    assert err[0].startswith("trinity simulate: error: ") and "Traceback" not in err[0], err
    for text in expected:
        assert text in err[0], (text, err[0])
    return err[0]


BAD = [  # (arguments after RUN.toml, what the one line says)
    (["--ranks", "2"], "no layout was given: choose one with --mesh"),  # 7: no --mesh
    (["--ranks", "3"] + MESH, "but the job has 3 ranks; no layout of 3 ranks fits"),
    (["--ranks", "2000"] + MESH, "--ranks: '2000': must be from 1 to 1,024"),  # 3: the bound on virtual ranks
    (["--ranks", "512"] + MESH, "dp_replicate·dp_shard·cp = 2, but the job has 512 ranks"),  # 3: ranks vs layout
    (["--ranks", "0"] + MESH, "--ranks: '0': must be from 1 to 1,024"),
    (["--ranks", "-4"] + MESH, "--ranks: '-4': must be from 1"),
    (["--ranks", "two"] + MESH, "--ranks: 'two' is not a whole number"),
    (["--ranks", "2", "--mesh", "dp_shard=two"], "--mesh: layout 'dp_shard=two'"),
    (["--ranks", "2", "--mesh", ""], "--mesh: layout ''"),
    (["--ranks", "2", "--ranks-per-node", "0"] + MESH, "--ranks-per-node: '0': must be at least 1"),
    (["--ranks", "2", "--timeout", "0"] + MESH, "--timeout: '0': must be above 0"),  # 2
    (["--ranks", "2", "--timeout", "-3"] + MESH, "--timeout: '-3': must be above 0"),
    (["--ranks", "2", "--timeout", "nan"] + MESH, "--timeout: 'nan': must be a finite number"),
    (["--ranks", "2", "--timeout", "inf"] + MESH, "--timeout: 'inf': must be a finite number"),
    (["--ranks", "2", "--fault", "kill:rank=2,step=1"] + MESH, "kill fault at rank 2: the run has ranks 0 to 1"),  # 4
    (["--ranks", "2", "--fault", "hang:rank=1,step=4"] + MESH, "hang fault at step 4: the run ends at step 3"),
    (["--ranks", "2", "--fault", "kill:rank=1,step=1,phase=fwd"] + MESH, "phase 'fwd' is none of forward, backward"),
    (["--ranks", "2", "--fault", "kill:rank=1,step=0"] + MESH, "step must be 1 or more"),
    (["--ranks", "2", "--fault", "kill:rank=-1,step=1"] + MESH, "rank must be 0 or more"),
    (["--ranks", "2", "--fault", "corrupt:rank=1,step=1,after=-2"] + MESH, "after must be 0 or more"),
    (["--ranks", "2", "--fault", "slow:rank=1,seconds=nan"] + MESH, "seconds must be from 0 to 60"),
    (["--ranks", "2", "--fault", "kill:rank=1,rank=0,step=1"] + MESH, "rank given twice"),
    (["--ranks", "2", "--fault", "kill:rank=1,step=1,phase=checkpoint"] + MESH,  # every = 2 in these tests
     "kill:rank=1,step=1,phase=checkpoint: step 1 writes no checkpoint"),
    (["--ranks", "2", "--fault", "corrupt:rank=1,step=2,phase=control"] + MESH, "could change nothing"),
    (["--ranks", "2", "--trace", "{d}/no/such/folder/trace.json"] + MESH, "does not exist"),  # 6: checked first
    (["--ranks", "2", "--trace", "{d}"] + MESH, "is a folder"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_refused_in_one_line_before_any_rank_starts(tmp_path, data, capsys, no_threads, args,
                                                                 message):
    d = _every_two(_run_dir(tmp_path / "run", data))
    before = sorted(os.listdir(d))
    _refused(capsys, ["simulate", str(d / "run.toml"), *[a.format(d=d) for a in args]], message)
    assert sorted(os.listdir(d)) == before  # no checkpoint folder, no metrics: nothing started


def _every_two(d):
    """The run folder with a checkpoint every 2 steps (steps 2 and 3 of 3 save, step 1 does not)."""
    (d / "run.toml").write_text((d / "run.toml").read_text().replace("every = 1", "every = 2"))
    return d


def _simulate_status(capsys, argv):
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


def test_a_fault_that_never_acted_is_named_and_the_exit_status_is_2(tmp_path, data, capsys):
    """A kill at the millionth collective of step 2 cannot be refused before the run (the count of collectives is
    the trainer's): the run trains to its end, then one line names the fault, exit status 2 (0 before)."""
    d = _run_dir(tmp_path / "run", data)
    status, err = _simulate_status(capsys, ["simulate", str(d / "run.toml"), "--ranks", "2", *MESH, "--fault",
                                            "kill:rank=1,step=2,after=999999", "--fault", "slow:rank=0,seconds=0"])
    assert status == 2 and len(err) == 1, (status, err)
    assert "kill:rank=1,step=2,after=999999: never acted" in err[0] and "slow" not in err[0], err
    assert _metrics_lines(d) == 3  # the run itself completed


def test_a_fault_before_the_resume_point_is_refused_before_any_step(tmp_path, data, capsys):
    """--resume from step 3's checkpoint of a 4-step run: a fault at step 2 could never act; refused in one line,
    exit 2, before any step (it resumed at step 4 and exited 0 before); the metrics stay as they were."""
    d = _run_dir(tmp_path / "run", data)
    assert main(["simulate", str(d / "run.toml"), "--ranks", "2", *MESH]) == 0
    (d / "run.toml").write_text((d / "run.toml").read_text().replace("steps = 3", "steps = 4"))
    before = (d / "metrics.jsonl").read_text()
    status, err = _simulate_status(capsys, ["simulate", str(d / "run.toml"), "--ranks", "2", *MESH, "--resume",
                                            "--fault", "kill:rank=1,step=2"])
    assert status == 2, (status, err)
    assert [line for line in err if "error" in line] == [
        "trinity simulate: error: --fault: kill:rank=1,step=2: the run resumes after step 3, so step 2 never runs"]
    assert (d / "metrics.jsonl").read_text() == before


def test_a_signal_ends_a_run_whose_rank_hangs_without_waiting_out_the_timeout(tmp_path, data):
    """Rank 1 hangs in step 1's stop agreement under the default --timeout (600 s): a SIGTERM cannot be agreed on,
    so after a short grace the run ends in one line naming the stuck ranks, exit 143 (before, it waited out the
    timeout). The watchdog below (300 s) only guards against that hang."""
    d = _run_dir(tmp_path / "run", data)
    proc = subprocess.Popen([sys.executable, "-m", "trinity.cli", "simulate", str(d / "run.toml"), "--ranks", "2",
                             *MESH, "--fault", "hang:rank=1,step=1,phase=control"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    try:
        _wait_for(lambda: _metrics_lines(d) >= 1 or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [line for line in err.splitlines() if "error" in line]
    assert proc.returncode == 143 and len(lines) == 1 and "Traceback" not in err, (proc.returncode, err)
    assert "stopped by SIGTERM: rank(s) 0-1 could not reach the end of a step" in lines[0], lines
    assert "rank 1: hung by fault injection at step 1 (control" in lines[0], lines


def test_a_bad_run_file_is_one_line(tmp_path, data, capsys, no_threads):
    _refused(capsys, ["simulate", str(tmp_path / "missing.toml"), "--ranks", "2"] + MESH, "missing.toml")
    d = _run_dir(tmp_path / "run", data)
    (d / "run.toml").write_text((d / "run.toml").read_text().replace("steps = 3", "steps = -1"))
    _refused(capsys, ["simulate", str(d / "run.toml"), "--ranks", "2"] + MESH, "[train] steps")
    (d / "run.toml").write_text("[model\n")
    _refused(capsys, ["simulate", str(d / "run.toml"), "--ranks", "2"] + MESH)


def test_a_layout_the_model_cannot_run_is_refused_before_any_rank_starts(tmp_path, data, capsys, no_threads):
    """ep must divide the model's experts (tiny has 8) and cp must hold the sliding window's halo: the model's rules,
    checked up front with the layouts that fit."""
    d = _run_dir(tmp_path / "run", data)
    _refused(capsys, ["simulate", str(d / "run.toml"), "--ranks", "2", "--mesh", "dp_shard=2,ep=16"],
             "ep = 16 does not divide", "layouts that fit: dp_shard=2")


def _wait_for(predicate, seconds: float = 300.0):
    """Poll until predicate() holds; a watchdog against a hang, not a timing assertion."""
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "gave up waiting"
        time.sleep(0.05)


def _metrics_lines(d) -> int:
    path = d / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_virtual_rank_after_the_same_step_with_a_checkpoint(tmp_path, data, sig):
    """As `trinity train`: the first SIGTERM/SIGINT finishes the step under way; then every rank (threads that never
    see the signal themselves) stops after that same step, the checkpoint of that step is written (checkpoints are
    otherwise never due), one line says so, and the exit status is 128 + the signal."""
    from trinity.distributed.sharded_checkpoint import ShardedCheckpointManager

    d = _run_dir(tmp_path / "run", data, steps=200)
    (d / "run.toml").write_text((d / "run.toml").read_text().replace("every = 1", "every = 1000"))
    proc = subprocess.Popen([sys.executable, "-m", "trinity.cli", "simulate", str(d / "run.toml"), "--ranks", "4",
                             "--mesh", "dp_shard=2,cp=2,ep=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **ONE_THREAD})
    try:
        _wait_for(lambda: _metrics_lines(d) >= 1 or proc.poll() is not None)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    name = signal.Signals(sig).name
    assert f"trinity: {name} received: finishing this step" in err and "Traceback" not in err, err
    stopped = [line for line in out.splitlines() if line.startswith(f"stopped by {name} after step ")]
    assert len(stopped) == 1, out
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 1 <= step < 200 and "continue with --resume" in stopped[0]
    manager = ShardedCheckpointManager(d / "ckpt")
    assert manager.latest().endswith(f"step_{step:08d}.sharded") and manager.load(manager.latest()).step == step
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, step + 1))
