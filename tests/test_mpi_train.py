"""Cluster mode under real `mpiexec`: every layout trains the single process's model, resumes on another layout, and
a killed rank ends the job with the last checkpoint intact; `trinity simulate` of each layout's job is that job, bit
for bit (the numba jobs also check every message: --checksums, under real MPI).

Each job is `mpiexec -n N python -m mpi4py -m trinity.cli train run.toml --mesh …` (2–4 ranks, one thread each;
8 for the layout with every dimension above 1), compared in float64 with `trinity train` in one process: the losses
of every step and, after 1, 3 and 4 steps, the params, the optimizer state, the balancing state and every
expert_bias agree to 1e-10 relative (a wrong shard or reduction is off by far more; reordered float64 sums by
~1e-15).
"""

import json
import re

import numpy as np
import pytest

from trinity.distributed.sharded_checkpoint import ShardedCheckpointManager
from trinity.reference.training.checkpoint import CheckpointManager

from mpi_jobs import refused_by_every_rank, requires_mpi, run_mpi
from test_trainer import trinity

pytestmark = requires_mpi

RUN = """
[model]
preset = "tiny"
dtype = "float64"
[model.overrides]
sliding_window = 8
[data]
path = "{data}"
eos_id = 0
seq_len = 32
micro_batch_size = 1
[train]
steps = {steps}
sequences_per_step = 8
[optimizer]
muon_lr = 0.02
adamw_lr = 0.01
[schedule]
warmup_steps = 2
[loss]
intra_document_mask = true
balance_loss_coeff = 0.01
[checkpoint]
dir = "ckpt"
every = 1
keep_last = 10
[logging]
metrics = "metrics.jsonl"
progress = false
"""

# held-out evaluation after steps 2 and 4 (the jobs here add it to RUN; tests/test_simulate.py uses RUN alone)
EVAL = """
[eval]
every = 2
batches = 2
sequences_per_batch = 8
path = "{held}"
"""

# (ranks, layout): the layouts the issue names; one with every mechanism at 4 ranks (dp_replicate all-reduce, FSDP
# over cp, context parallel, expert parallel), and every dimension above 1 at once, which takes 8 ranks
LAYOUTS = [(4, "dp_shard=4"), (4, "dp_replicate=2,dp_shard=2"), (2, "dp_shard=2,ep=2"), (4, "dp_shard=4,ep=4"),
           (2, "cp=2"), (4, "dp_replicate=2,cp=2,ep=2"), (8, "dp_replicate=2,dp_shard=2,cp=2,ep=2")]
RTOL = 1e-10
# the threads of an mpiexec job's ranks (tests/mpi_jobs.py), for `trinity simulate` of the same job: BLAS may round
# differently with other thread counts
ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource
    path = tmp_path_factory.mktemp("data") / "tokens.bin"
    write_token_file(path, MarkovSource(256, eos_id=0, branching=4, mean_doc_len=20, seed=0).documents(20000),
                     eos_id=0)
    write_token_file(path.parent / "held.bin",
                     MarkovSource(256, eos_id=0, branching=4, mean_doc_len=20, seed=0).documents(2000), eos_id=0)
    return path


def _run_dir(tmp_path, data, steps=4):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run.toml").write_text(RUN.format(data=data, steps=steps) + EVAL.format(held=data.parent / "held.bin"))
    return tmp_path


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    """The single-process run of 4 steps (reference backend): {step: checkpoint path}, metrics lines."""
    d = _run_dir(tmp_path_factory.mktemp("single"), data, steps=4)
    r = trinity("train", str(d / "run.toml"))
    assert r.returncode == 0, r.stderr
    return d


def layout_sizes(text):
    from trinity.distributed.layout import Layout
    layout = Layout.parse(text)
    return {"dp_shard": layout.dp_shard, "cp": layout.cp}


def _metrics(d, kind=None):
    """The step lines of run folder d's metrics (kind="eval": its eval lines)."""
    lines = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("kind") == kind]


def _checkpoint(d, step):
    """The checkpoint of `step` in run folder d: a sharded directory or a single file (either verifies on load)."""
    manager = ShardedCheckpointManager(d / "ckpt")
    path = dict((int(p.rsplit("_", 1)[1].split(".")[0]), p) for p in manager.list())[step]
    return manager.load(path)


def _assert_same_state(got, want):
    assert got.step == want.step and got.tokens_seen == want.tokens_seen and got.data_state == want.data_state
    for name, a, b in (("param", got.params, want.params), ("optimizer", got.optimizer_state, want.optimizer_state),
                       ("balancing", got.balancing_state, want.balancing_state)):
        assert set(a) == set(b), name
        for k in b:
            if k == "step":
                assert int(a[k]) == int(b[k])
                continue
            err = float(np.abs(np.asarray(a[k], np.float64) - b[k]).max()) / max(float(np.abs(b[k]).max()), 1e-300)
            assert err <= RTOL, f"{name} {k}: relative error {err:.2e}"


def _assert_same_losses(got_lines, want_lines):
    assert [x["step"] for x in got_lines] == [x["step"] for x in want_lines]
    for got, want in zip(got_lines, want_lines):
        for part, value in want["loss"].items():
            assert abs(got["loss"][part] - value) <= RTOL * abs(value), (got["step"], part)


def _assert_bits(got, want, what):
    assert set(got) == set(want), what
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{what} {k}"


def _assert_simulate_is_the_job(job, data, ranks, options):
    """`trinity simulate` of the job's run file with the same options, in a folder beside it: every step's
    checkpoint (params, optimizer and balancing state), the losses and the comm_bytes are the job's, bit for bit;
    its trace's counted bytes of rank 0 are the comm_bytes of each step, and every rank's add up."""
    from trinity.simulate.virtual.traces import counted_in_step
    sim = _run_dir(job / "simulated", data)
    r = trinity("simulate", str(sim / "run.toml"), "--ranks", str(ranks), *options, "--trace",
                str(sim / "trace.json"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    for step in (1, 2, 3, 4):
        got, want = _checkpoint(sim, step), _checkpoint(job, step)
        assert (got.step, got.tokens_seen, got.data_state) == (want.step, want.tokens_seen, want.data_state)
        for name in ("params", "optimizer_state", "balancing_state"):
            _assert_bits(getattr(got, name), getattr(want, name), f"step {step} {name}")
    simulated, lines = _metrics(sim), _metrics(job)
    assert [(x["loss"], x["comm_bytes"]) for x in simulated] == [(x["loss"], x["comm_bytes"]) for x in lines]
    assert [(x["loss"], x.get("comm_bytes")) for x in _metrics(sim, "eval")] == \
        [(x["loss"], x.get("comm_bytes")) for x in _metrics(job, "eval")]
    trace = json.loads((sim / "trace.json").read_text())
    assert trace["ranks"] == ranks and [s["step"] for s in trace["steps"]] == [1, 2, 3, 4]
    for step, line in zip(trace["steps"], lines):
        assert step["counted"]["0"] == line["comm_bytes"]
        counted = {rank: sum(by_kind.values()) for rank, by_kind in step["counted"].items()}
        assert sorted(counted, key=int) == [str(q) for q in range(ranks)]
        assert all(0 < counted[q] <= step["by_rank"][q] for q in counted)
        assert sum(counted.values()) + sum(n for p, n in step["by_phase"].items() if not counted_in_step(p)) \
            == step["bytes"] \
            == sum(step["by_kind"].values()) == sum(step["by_rank"].values()) == sum(step["by_tier"].values())


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("ranks,layout", LAYOUTS)
def test_layout_trains_the_single_process_model(tmp_path, data, single, ranks, layout, backend):
    d = _run_dir(tmp_path, data)
    options = ["--mesh", layout, "--backend", backend] + (["--checksums"] if backend == "numba" else [])
    code, out, err, seconds = run_mpi(ranks, ["-m", "trinity.cli", "train", "run.toml", *options], cwd=d,
                                      timeout=120)
    assert code == 0, err
    assert f"layout {layout} over {ranks} ranks" in out
    lines = _metrics(d)
    assert [row["step"] for row in lines] == [1, 2, 3, 4]
    _assert_same_losses(lines, _metrics(single))
    _assert_same_losses(_metrics(d, "eval"), _metrics(single, "eval"))  # held-out evaluation after steps 2 and 4
    assert [row["step"] for row in _metrics(d, "eval")] == [2, 4]
    for step in (1, 3, 4):
        assert _checkpoint(d, step).path.endswith(".sharded")
        _assert_same_state(_checkpoint(d, step), _checkpoint(single, step))
    # per-rank state shrinks as 1/(dp_shard·cp): whole/F plus at most the padding of each flat bucket and the
    # replicated expert_bias
    whole = _checkpoint(single, 4).params
    F = layout_sizes(layout)["dp_shard"] * layout_sizes(layout)["cp"]
    bias = sum(v.nbytes for k, v in whole.items() if k.endswith("expert_bias"))
    shares = (sum(v.nbytes for v in whole.values()) - bias) / F
    memory = lines[-1]["memory"]
    assert shares + bias <= memory["params"] <= shares + bias + 64 * F * 8, (memory, shares, bias)
    assert memory["optimizer"] > 0 and all(row["comm_bytes"] for row in lines) == (ranks > 1)
    if backend == "reference" and ranks == 4:  # the other commands read a sharded checkpoint too
        r = trinity("inspect", _checkpoint(d, 4).path, "--tokens", "1,2,3", "--layer", "1")
        assert r.returncode == 0, r.stderr
        r = trinity("inspect", f"{_checkpoint(d, 4).path}/rank_00000.h5", "--tokens", "1,2,3")
        assert r.returncode == 2 and "one rank's part of the sharded checkpoint" in r.stderr, r.stderr
    _assert_simulate_is_the_job(d, data, ranks, options)


def test_resharding_resumes_continue_the_uninterrupted_run(tmp_path, data, single):
    """4 ranks → 2 → 4 → 1 process, each job killed right after a checkpoint, end with the uninterrupted run."""
    d = _run_dir(tmp_path, data)
    chain = [(4, "dp_shard=4", 1), (2, "dp_shard=2,ep=2", 2), (4, "dp_replicate=2,cp=2", 3)]
    for i, (ranks, layout, kill_after) in enumerate(chain):
        args = ["-m", "trinity.cli", "train", "run.toml", "--mesh", layout] + (["--resume"] if i else [])
        code, out, err, _ = run_mpi(ranks, args, cwd=d, timeout=120,
                                    env={"TRINITY_FAULT_KILL_AFTER_CHECKPOINT": str(kill_after)})
        assert code != 0, "the job should have been killed after its checkpoint"
        assert ShardedCheckpointManager(d / "ckpt").latest().endswith(f"step_{kill_after:08d}.sharded"), err
        if i:
            assert f"at step {kill_after - 1}" in out
    r = trinity("train", str(d / "run.toml"), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    assert _checkpoint(d, 4).path.endswith(".h5")  # the single process writes one file
    _assert_same_state(_checkpoint(d, 4), _checkpoint(single, 4))
    _assert_same_losses(_metrics(d), _metrics(single))


def test_a_rank_killed_mid_step_ends_the_job_and_the_last_checkpoint_loads(tmp_path, data):
    d = _run_dir(tmp_path, data)
    code, out, err, _ = run_mpi(4, ["-m", "trinity.cli", "train", "run.toml", "--mesh", "dp_shard=4"], cwd=d,
                                timeout=60, env={"TRINITY_FAULT_KILL_MID_STEP": "1:3"})
    # the job ended by itself: the launcher's watchdog (MPIEXEC_TIMEOUT = run_mpi's timeout, reached only by a hang)
    # did not end it; Hydra exits 0 when it does, saying APPLICATION TIMED OUT
    assert code != 0 and "APPLICATION TIMED OUT" not in err, (code, err)
    pids = dict(re.findall(r"rank (\d+) pid (\d+)", out))  # the job's first line: which pid is which rank
    named = re.search(r"rank (\d+) \(pid (\d+) on \S+\): killed by SIGKILL during the job", err)
    assert named is not None, err
    assert named.group(1) == "1" and pids["1"] == named.group(2), (named.group(0), pids)
    manager = ShardedCheckpointManager(d / "ckpt")
    assert manager.latest().endswith("step_00000002.sharded")
    assert manager.load(manager.latest()).step == 2


def test_a_sharded_run_writes_the_single_file_checkpoint_and_a_hugging_face_export(tmp_path, data, single):
    from trinity.reference.interop.hf import load_pretrained
    d = _run_dir(tmp_path, data)
    (d / "run.toml").write_text((d / "run.toml").read_text().replace(
        'keep_last = 10', 'keep_last = 10\nformat = "single"\nhf_export = "hf"'))
    code, out, err, _ = run_mpi(4, ["-m", "trinity.cli", "train", "run.toml", "--mesh", "dp_shard=2,ep=2,cp=2"],
                                cwd=d, timeout=120)
    assert code == 0, err
    assert CheckpointManager(d / "ckpt").latest().endswith("step_00000004.h5")
    want = _checkpoint(single, 4)
    _assert_same_state(_checkpoint(d, 4), want)
    _, params = load_pretrained(d / "hf", dtype=np.float64)
    for k, v in want.params.items():
        tol = 1e-6 if k.endswith("expert_bias") else RTOL  # the export stores the bias in float32 (decisions #18)
        assert np.abs(params[k] - v).max() <= tol * max(np.abs(v).max(), 1e-300), k


def test_a_layout_that_cannot_work_fails_before_any_work_listing_those_that_fit(tmp_path, data):
    d = _run_dir(tmp_path, data)
    code, out, err, _ = run_mpi(2, ["-m", "trinity.cli", "train", "run.toml", "--mesh", "dp_shard=4,ep=4"],
                                cwd=d, timeout=60)
    assert refused_by_every_rank(code, out, err), (code, err)
    assert not (d / "metrics.jsonl").exists(), out  # refused before any step
    # every rank refuses alike: one line, printed once, and the job ends without an MPI abort
    assert re.fullmatch(r"trinity train: error: \[parallel\] layout dp_shard=4,ep=4: .*4.* but the job has 2 ranks; "
                        r"layouts that fit: dp_shard=2.* \(every rank\)\n", err), err
    assert not (d / "ckpt").exists() or not any((d / "ckpt").iterdir())


def test_sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path, data):
    """Preemption under a launcher: SIGTERM to mpiexec; every rank finishes the same step, the checkpoint is
    written, and the job exits 143 without an MPI abort."""
    import signal
    import subprocess
    import sys
    import time

    from mpi_jobs import job_env, mpiexec_path
    d = _run_dir(tmp_path, data, steps=10_000)
    job = subprocess.Popen([mpiexec_path(), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "trinity.cli", "train",
                            "run.toml", "--mesh", "dp_shard=2"], cwd=d, env=job_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ((d / "metrics.jsonl").exists() and len(_metrics(d)) >= 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 143, err
    assert "MPI_Abort" not in err and "stopped by SIGTERM after step" in out, (out, err)
    last = _metrics(d)[-1]["step"]
    manager = ShardedCheckpointManager(d / "ckpt")
    assert manager.latest().endswith(f"step_{last:08d}.sharded") and manager.load(manager.latest()).step == last


def test_ranks_running_different_jobs_are_refused(tmp_path, data):
    d = _run_dir(tmp_path, data)
    (d / "other.toml").write_text((d / "run.toml").read_text().replace("steps = 4", "steps = 3"))
    from mpi_jobs import job_env, mpiexec_path
    import subprocess
    import sys
    cmd = [mpiexec_path(), "-n", "1", sys.executable, "-m", "mpi4py", "-m", "trinity.cli", "train", "run.toml",
           "--mesh", "dp_shard=2", ":", "-n", "1", sys.executable, "-m", "mpi4py", "-m", "trinity.cli", "train",
           "other.toml", "--mesh", "dp_shard=2"]
    r = subprocess.run(cmd, cwd=d, env=job_env(), capture_output=True, text=True, timeout=60)
    assert refused_by_every_rank(r.returncode, r.stdout, r.stderr), (r.returncode, r.stderr)
    assert "the ranks are not running the same job" in r.stderr and "ranks 0 vs 1" in r.stderr
