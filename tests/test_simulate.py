"""`trinity simulate`: the cluster-mode trainer on virtual ranks, unchanged, against `mpiexec` and the single process;
its traces agree with the cluster mode's own accounting."""

import json

import numpy as np

from mpi_jobs import requires_mpi, run_mpi
from test_mpi_train import RUN, _checkpoint, _metrics
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


# the threads of an mpiexec job's ranks (tests/mpi_jobs.py): BLAS may round differently with other thread counts
ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _simulate(d, ranks, mesh, *extra):
    r = trinity("simulate", str(d / "run.toml"), "--ranks", str(ranks), "--mesh", mesh, *extra, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return r


def _max_rel(a, b):
    return max(float(np.abs(np.asarray(a[k], np.float64) - b[k]).max()) / max(float(np.abs(b[k]).max()), 1e-300)
               for k in b if k != "step")


@requires_mpi
def test_simulate_is_the_mpiexec_run_and_its_trace_is_the_accounting(tmp_path):
    """Bitwise the mpiexec run, at 2 and 4 ranks (the mesh adds more than two terms in rank order whatever the MPI
    library), with the same bytes per step. The trace's bytes per rank and step, without the checkpoint, are the
    trainer's own `comm_bytes`."""
    data = _data(tmp_path)
    for ranks, mesh in ((2, "dp_shard=2,ep=2"), (4, "dp_shard=2,cp=2,ep=2")):
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
