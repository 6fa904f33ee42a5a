"""`trinity simulate`: the cluster-mode trainer on virtual ranks, unchanged, against `mpiexec` and the single process;
its traces agree with the cluster mode's own accounting; message checksums change no result; every injected fault
(kill, corrupt, hang, slow) ends the run as promised: one line naming the rank, the newest complete checkpoint loads.
(tests/test_mpi_train.py compares simulate with mpiexec at every layout of the cluster-mode tests.)"""

import json
import re
import time

import numpy as np

from mpi_jobs import requires_mpi, run_mpi
from test_mpi_train import ONE_THREAD, RUN, _checkpoint, _metrics
from test_trainer import trinity


def _run_dir(path, data, steps=3, sequences=8):
    path.mkdir(parents=True, exist_ok=True)
    text = RUN.format(data=data, steps=steps).replace("sequences_per_step = 8", f"sequences_per_step = {sequences}")
    (path / "run.toml").write_text(text)
    return path


def _data(tmp_path):
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource
    path = tmp_path / "tokens.bin"
    write_token_file(path, MarkovSource(256, eos_id=0, branching=4, mean_doc_len=20, seed=0).documents(20000),
                     eos_id=0)
    return path


def _simulate(d, ranks, mesh, *extra):
    r = trinity("simulate", str(d / "run.toml"), "--ranks", str(ranks), "--mesh", mesh, *extra, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return r


def _max_rel(a, b):
    return max(float(np.abs(np.asarray(a[k], np.float64) - b[k]).max()) / max(float(np.abs(b[k]).max()), 1e-300)
               for k in b if k != "step")


@requires_mpi
def test_simulate_is_the_mpiexec_run_and_its_trace_is_the_accounting(tmp_path):
    """Bitwise the mpiexec run at a layout the cluster-mode tests (which compare every one of theirs the same way,
    tests/test_mpi_train.py) do not run: 4 ranks, where the mesh adds more than two terms in rank order whatever the
    MPI library; the same bytes per step. The trace's bytes per rank and step, without the checkpoint, are the
    trainer's own `comm_bytes`."""
    data = _data(tmp_path)
    for ranks, mesh in ((4, "dp_shard=2,cp=2,ep=2"),):
        sim, mpi = _run_dir(tmp_path / f"sim{ranks}", data), _run_dir(tmp_path / f"mpi{ranks}", data)
        _simulate(sim, ranks, mesh, "--trace", str(sim / "trace.json"))
        code, _, err, _ = run_mpi(ranks, ["-m", "trinity.cli", "train", "run.toml", "--mesh", mesh], cwd=mpi,
                                  timeout=120)
        assert code == 0, err
        a, b = _checkpoint(sim, 3), _checkpoint(mpi, 3)
        ma, mb = _metrics(sim), _metrics(mpi)
        assert [x["comm_bytes"] for x in ma] == [x["comm_bytes"] for x in mb]
        assert all(np.array_equal(a.params[k], b.params[k]) for k in b.params)
        assert all(np.array_equal(a.optimizer_state[k], b.optimizer_state[k]) for k in b.optimizer_state)
        assert [x["loss"] for x in ma] == [x["loss"] for x in mb]
        trace = json.loads((sim / "trace.json").read_text())
        assert trace["ranks"] == ranks and [s["step"] for s in trace["steps"]] == [1, 2, 3]
        for step, row in zip(trace["steps"], ma):
            assert step["counted"]["0"] == row["comm_bytes"]
            assert sum(step["by_kind"].values()) == sum(step["by_group"].values()) == step["bytes"] \
                == sum(step["by_tier"].values()) == sum(step["by_rank"].values())
            assert set(step["by_phase"]) >= {"forward", "backward", "reductions", "optimizer", "checkpoint"}


def test_64_virtual_ranks_train_the_single_process_model(tmp_path):
    data = _data(tmp_path)
    sim, one = _run_dir(tmp_path / "sim", data, steps=1, sequences=64), _run_dir(tmp_path / "one", data, steps=1,
                                                                               sequences=64)
    _simulate(sim, 64, "dp_replicate=2,dp_shard=16,cp=2,ep=4", "--trace", str(sim / "trace.json"),
              "--ranks-per-node", "8")
    r = trinity("train", str(one / "run.toml"))
    assert r.returncode == 0, r.stderr
    a, b = _checkpoint(sim, 1), _checkpoint(one, 1)
    assert _max_rel(a.params, b.params) <= 1e-10 and _max_rel(a.optimizer_state, b.optimizer_state) <= 1e-10
    tiers = json.loads((sim / "trace.json").read_text())["steps"][0]["by_tier"]
    assert tiers["intra-node"] > 0 and tiers["inter-node"] > 0  # 8 nodes of 8: some groups cross nodes


def test_a_layout_of_other_size_is_refused_in_one_line(tmp_path):
    d = _run_dir(tmp_path, _data(tmp_path))
    r = trinity("simulate", str(d / "run.toml"), "--ranks", "3", "--mesh", "dp_shard=2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "but the job has 3 ranks; no layout of 3 ranks fits" in r.stderr


def test_faults_end_the_run_naming_the_rank_and_the_last_complete_checkpoint_loads(tmp_path):
    """A rank killed in a step, or in the middle of a checkpoint write (after the rank files, before the manifest),
    ends the run naming it; the newest complete checkpoint loads. A straggler changes nothing but the time."""
    from trinity.distributed.sharded_checkpoint import ShardedCheckpointManager
    data = _data(tmp_path)
    mesh = "dp_shard=2,cp=2,ep=2"
    for name, fault, newest in (("step", "kill:rank=1,step=3", 2),
                                ("write", "kill:rank=2,step=2,phase=checkpoint,after=2", 1)):
        d = _run_dir(tmp_path / name, data)
        r = trinity("simulate", str(d / "run.toml"), "--ranks", "4", "--mesh", mesh, "--fault", fault, env=ONE_THREAD)
        rank = fault.split("rank=")[1].split(",")[0]
        assert r.returncode == 1 and f"rank {rank} killed by fault injection" in r.stderr, r.stderr
        manager = ShardedCheckpointManager(d / "ckpt")
        assert manager.latest().endswith(f"step_{newest:08d}.sharded") and manager.load(manager.latest()).step == newest
        if name == "write":  # the interrupted save has every rank file but no manifest: not a checkpoint
            partial = d / "ckpt" / "step_00000002.sharded"
            assert len(list(partial.glob("rank_*.h5"))) == 4 and not (partial / "manifest.json").exists()
    calm, slow = _run_dir(tmp_path / "calm", data), _run_dir(tmp_path / "slow", data)
    _simulate(calm, 4, mesh)
    _simulate(slow, 4, mesh, "--fault", "slow:rank=3,seconds=0.001")
    a, b = _checkpoint(slow, 3), _checkpoint(calm, 3)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in b.params)


def test_a_bad_fault_is_one_line(tmp_path):
    d = _run_dir(tmp_path, _data(tmp_path))
    r = trinity("simulate", str(d / "run.toml"), "--ranks", "2", "--mesh", "dp_shard=2", "--fault", "kill:rank=1")
    assert r.returncode == 2 and "--fault: fault 'kill:rank=1': kill needs rank and step" in r.stderr


def _same_bits(a, b):
    return all(np.array_equal(a[k], b[k]) for k in b) and set(a) == set(b)


def _newest_checkpoint_is(d, step):
    from trinity.distributed.sharded_checkpoint import ShardedCheckpointManager
    manager = ShardedCheckpointManager(d / "ckpt")
    return manager.latest().endswith(f"step_{step:08d}.sharded") and manager.load(manager.latest()).step == step


def test_checksums_change_nothing_but_the_bytes(tmp_path):
    """With checksums ([parallel] checksums = true) the run is the run without, bit for bit, though its sums and
    maxima over two ranks take the Alltoall + Allgather path; every kind of collective sends crc32s (4 bytes each)
    on top of the same data."""
    data = _data(tmp_path)
    plain, checked = _run_dir(tmp_path / "plain", data), _run_dir(tmp_path / "checked", data)
    (checked / "run.toml").write_text((checked / "run.toml").read_text() + "[parallel]\nchecksums = true\n")
    for d in (plain, checked):
        _simulate(d, 4, "dp_shard=2,cp=2,ep=2")
    a, b = _checkpoint(checked, 3), _checkpoint(plain, 3)
    assert _same_bits(a.params, b.params) and _same_bits(a.optimizer_state, b.optimizer_state)
    ma, mb = _metrics(checked), _metrics(plain)
    assert [x["loss"] for x in ma] == [x["loss"] for x in mb]
    for x, y in zip(ma, mb):
        assert set(x["comm_bytes"]) == set(y["comm_bytes"])
        extra = [x["comm_bytes"][k] - y["comm_bytes"][k] for k in y["comm_bytes"]]
        assert all(e > 0 and e % 4 == 0 for e in extra), extra


def test_a_corrupted_message_is_caught_by_its_checksum_and_unnoticed_without(tmp_path):
    """A bit flipped in what rank 1 sends one receiver in step 2's backward: with --checksums the receiver stops the
    run, one line naming both ranks, the collective, the group, the step and the phase; the newest complete
    checkpoint (step 1) loads. Without checksums the run ends as usual, with other weights than the clean run's."""
    data = _data(tmp_path)
    mesh, fault = "dp_shard=2,cp=2,ep=2", "corrupt:rank=1,step=2,phase=backward"
    caught, unnoticed, clean = (_run_dir(tmp_path / n, data) for n in ("caught", "unnoticed", "clean"))
    r = trinity("simulate", str(caught / "run.toml"), "--ranks", "4", "--mesh", mesh, "--checksums", "--fault", fault,
                env=ONE_THREAD)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    named = re.search(r"error: rank ([023]): corrupted message from rank 1 to rank \1 in [A-Z]\w+.* on the \w+ "
                      r"group at step 2 \(backward\)", r.stderr)
    assert named is not None, r.stderr
    assert _newest_checkpoint_is(caught, 1)
    _simulate(unnoticed, 4, mesh, "--fault", fault)
    _simulate(clean, 4, mesh)
    assert not _same_bits(_checkpoint(unnoticed, 3).params, _checkpoint(clean, 3).params)
    assert _same_bits(_checkpoint(unnoticed, 1).params, _checkpoint(clean, 1).params)


def test_an_unchecked_corruption_at_the_first_collective_of_a_step_changes_the_run(tmp_path):
    """corrupt:rank=1,step=2 on dp_shard=2 hits step 2's first collective, the gather of rank 1's half of the
    embedding, which rank 0 reads only at its batch's tokens: one bit in one row left the run bit-identical to the
    clean one. Every value of the message is hit now, so the losses from step 2 on differ; with --checksums it is
    caught."""
    data = _data(tmp_path)
    corrupted, clean, caught = (_run_dir(tmp_path / n, data) for n in ("corrupted", "clean", "caught"))
    _simulate(corrupted, 2, "dp_shard=2", "--fault", "corrupt:rank=1,step=2")
    _simulate(clean, 2, "dp_shard=2")
    a, b = [x["loss"]["total"] for x in _metrics(corrupted)], [x["loss"]["total"] for x in _metrics(clean)]
    assert a[0] == b[0] and a[1] != b[1], (a, b)
    r = trinity("simulate", str(caught / "run.toml"), "--ranks", "2", "--mesh", "dp_shard=2", "--checksums",
                "--fault", "corrupt:rank=1,step=2", env=ONE_THREAD)
    assert r.returncode == 1 and "corrupted message from rank 1 to rank 0" in r.stderr, r.stderr


def test_a_corruption_that_breaks_the_unchecked_run_is_one_line(tmp_path):
    """A corruption in the checkpoint's agreement (JSON bytes) breaks the unchecked run in its own way: one line
    naming the rank and the error, exit 1, no traceback (a JSONDecodeError traceback before)."""
    d = _run_dir(tmp_path, _data(tmp_path))
    r = trinity("simulate", str(d / "run.toml"), "--ranks", "2", "--mesh", "dp_shard=2", "--fault",
                "corrupt:rank=1,step=2,phase=checkpoint", env=ONE_THREAD)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "after the injected corruption" in r.stderr, r.stderr


def test_a_hung_rank_ends_the_run_in_one_line_naming_where_every_rank_waits(tmp_path):
    """Rank 2 stops calling collectives in step 2's backward; the others' waits exceed --timeout 2: exit 1 and one
    line naming each rank and the collective it is blocked in (no traceback, no thread left running)."""
    d = _run_dir(tmp_path, _data(tmp_path))
    start = time.monotonic()
    r = trinity("simulate", str(d / "run.toml"), "--ranks", "4", "--mesh", "dp_shard=2,cp=2,ep=2", "--timeout", "2",
                "--fault", "hang:rank=2,step=2,phase=backward", env=ONE_THREAD)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(r"error: deadlock: rank [013] waited 2 s in [A-Z]\w+.* for rank\(s\) \[2\]", r.stderr), r.stderr
    assert "rank 2: hung by fault injection at step 2 (backward, in " in r.stderr
    assert all(re.search(rf"rank {q}: in [A-Z]\w+", r.stderr) for q in (0, 1, 3)), r.stderr
    assert time.monotonic() - start < 60
    assert _newest_checkpoint_is(d, 1)


def test_every_way_a_virtual_rank_fails_is_one_line_and_a_bug_keeps_its_traceback():
    from trinity.cli.common import CLIError
    from trinity.cli.simulate import _one_line
    from trinity.simulate.virtual.virtual_comm import Aborted, CollectiveMismatch, DeadlockError, RankFailed

    def failed(cause):
        e = RankFailed(f"rank 1 failed: {type(cause).__name__}: {cause}")
        e.__cause__ = cause
        return _one_line(e)

    for cause, status, text in ((DeadlockError("deadlock: rank 0 waited"), 1, "deadlock: rank 0 waited"),
                                (CollectiveMismatch("rank 1 called X"), 1, "collective mismatch: rank 1 called X"),
                                (Aborted("Abort(errorcode=3) called by rank 1 of world", 3), 3, "Abort(errorcode=3)"),
                                (CLIError("bad path", status=2), 2, "rank 1: bad path")):
        got = failed(cause)
        assert isinstance(got, CLIError) and got.status == status and str(got).startswith(text), got
    assert failed(ValueError("a bug")) is None
