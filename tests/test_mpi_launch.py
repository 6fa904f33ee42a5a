"""Real MPI jobs through trinity.distributed.launch and the `trinity` CLI (mpiexec of the `mpi` extra, 2-4 ranks).

- the world communicator all-reduces and every rank agrees; rank_zero_log prints once;
- a rank that fails in the middle of a collective loop (the others blocked in Allreduce) ends the whole job within
  seconds, non-zero, naming the rank and its error: through launch.fail_job, and through `python -m mpi4py` alone;
- the same through `trinity.cli.main.main`: a CLIError or a bug on rank 1 only;
- a single process without a launcher (also inside an sbatch script: SLURM_PROCID without srun) never imports
  mpi4py, and a launcher without mpi4py is one line naming the extra.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

from mpi_jobs import LAUNCHER_VARS, ended_by_itself, job_env, requires_mpi, run_mpi
from trinity.distributed import launch


def _script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# ---- (a) all-reduce through launch.world() ------------------------------------------------------------------------
ALLREDUCE = """
    import json
    import numpy as np
    from mpi4py import MPI
    from trinity.distributed.launch import rank_zero_log, world

    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    assert comm is MPI.COMM_WORLD
    x = np.arange(5, dtype=np.float64) + rank
    total = np.empty_like(x)
    comm.Allreduce(x, total, op=MPI.SUM)
    seen = comm.gather([rank, size, total.tolist()], root=0)  # one writer: lines of several ranks may interleave
    log = rank_zero_log(comm)
    log(f"logged by rank {rank}")
    log("results " + json.dumps(seen))
"""


@requires_mpi
@pytest.mark.parametrize("n", [2, 4])
def test_allreduce_through_world_agrees_on_every_rank(tmp_path, n):
    code, out, err, seconds = run_mpi(n, [_script(tmp_path, "allreduce.py", ALLREDUCE)], timeout=30)
    assert code == 0, err
    expect = [float(n * i + sum(range(n))) for i in range(5)]
    lines = out.splitlines()
    results = [json.loads(line[len("results "):]) for line in lines if line.startswith("results ")]
    assert results == [[[r, n, expect] for r in range(n)]], out
    assert out.count("logged by rank") == 1 and "logged by rank 0" in lines, out


# ---- (b) one rank fails inside a collective loop -----------------------------------------------------------------
COLLECTIVE_LOOP = """
    import sys
    import numpy as np
    from mpi4py import MPI
    from trinity.distributed.launch import fail_job, world

    comm = world()
    rank = comm.Get_rank()
    x, y = np.ones(1024), np.empty(1024)
    step = 0
    try:
        while True:  # the other ranks never leave this loop: only an abort ends them
            comm.Allreduce(x, y, op=MPI.SUM)
            step += 1
            if rank == 1 and step == 20:
                raise RuntimeError(f"boom at step {step}")
    except RuntimeError as e:
        if sys.argv[1] == "fail_job":
            fail_job(comm, rank, f"{type(e).__name__}: {e}", 3)
        raise  # uncaught: python -m mpi4py aborts the job
"""


@requires_mpi
@pytest.mark.parametrize("how", ["fail_job", "uncaught"])
@pytest.mark.parametrize("n", [2, 4])
def test_a_rank_failing_in_a_collective_loop_ends_the_job(tmp_path, n, how):
    code, out, err, seconds = run_mpi(n, [_script(tmp_path, "loop.py", COLLECTIVE_LOOP), how], timeout=30)
    assert code != 0, (out, err)
    assert ended_by_itself(err), f"the launcher's timeout ended the job after {seconds:.1f} s\n{err}"
    assert "RuntimeError: boom at step 20" in err
    if how == "fail_job":
        assert "rank 1: RuntimeError: boom at step 20" in err, err
    else:
        assert "Traceback" in err


def test_fail_job_without_a_communicator_returns_the_status(capsys):
    assert launch.fail_job(None, 0, "anything", 5) == 5
    assert capsys.readouterr() == ("", "")


def test_fail_job_prints_the_rank_then_aborts(capsys):
    class Comm:
        aborted = None

        def Abort(self, status):
            Comm.aborted = status

    with pytest.raises(SystemExit):
        launch.fail_job(Comm(), 3, "trinity train: error: bad", 2)
    assert Comm.aborted == 2
    assert capsys.readouterr().err == "rank 3: trinity train: error: bad\n"
    with pytest.raises(SystemExit):
        launch.fail_job(Comm(), 0, "x", 0)
    assert Comm.aborted == 1  # an abort is never a success


def test_rank_zero_log(capsys):
    class Comm:
        def __init__(self, rank):
            self.rank = rank

        def Get_rank(self):
            return self.rank

    launch.rank_zero_log(None)("single")
    launch.rank_zero_log(Comm(0))("zero", 1)
    launch.rank_zero_log(Comm(1))("one")
    assert capsys.readouterr().out == "single\nzero 1\n"


# ---- (c) the CLI: a failure on rank 1 only -----------------------------------------------------------------------
CLI_JOB = """
    import sys
    from trinity.distributed.launch import world
    from trinity.cli.main import main

    comm = world()
    rank = comm.Get_rank()
    how = sys.argv[1]
    spec = "tiny"
    if rank == 1 and how == "missing_file":
        spec = "/nonexistent/trinity-test/config.json"
    if rank == 1 and how == "bug":
        import trinity.cli.info as info

        def describe(config):
            raise ValueError("injected bug")

        info.describe = describe
    code = main(["info", spec])
    comm.Barrier()  # the ranks that succeeded wait here for rank 1, which never comes: only an abort ends them
    sys.exit(code)
"""


@requires_mpi
@pytest.mark.parametrize("how", ["missing_file", "bug"])
def test_cli_error_on_one_rank_ends_the_job_naming_it(tmp_path, how):
    n = 3
    code, out, err, seconds = run_mpi(n, [_script(tmp_path, "cli_job.py", CLI_JOB), how], timeout=30)
    assert code != 0, (out, err)
    assert ended_by_itself(err), f"the launcher's timeout ended the job after {seconds:.1f} s\n{err}"
    if how == "missing_file":
        assert ("rank 1: trinity info: error: no such file or directory: /nonexistent/trinity-test/config.json"
                in err), err
        assert "Traceback" not in err
    else:
        assert "Traceback" in err and "injected bug" in err
        assert "rank 1: trinity info: ValueError: injected bug (traceback above)" in err, err
    assert "rank 0:" not in err and "rank 2:" not in err


@requires_mpi
def test_cli_success_on_every_rank_exits_zero(tmp_path):
    n = 2
    code, out, err, seconds = run_mpi(n, [_script(tmp_path, "cli_job.py", CLI_JOB), "ok"], timeout=30)
    assert code == 0, err
    assert out.count("tiny (preset)") == n
    assert "rank" not in err


@requires_mpi
def test_cli_module_under_mpiexec(tmp_path):
    """`mpiexec -n 2 python -m mpi4py -m trinity.cli ...`, the documented command: an error on every rank (the same
    argument everywhere) ends the job with the CLIError's status, each line naming its rank."""
    code, out, err, seconds = run_mpi(2, ["-m", "trinity.cli", "info", "/nonexistent/trinity-test"], timeout=30)
    assert code != 0 and ended_by_itself(err), err
    assert "trinity info: error: no such file or directory: /nonexistent/trinity-test" in err
    assert "rank 0: " in err or "rank 1: " in err


# ---- (d) no launcher: no mpi4py; a launcher without mpi4py: one line --------------------------------------------
CHECK_NO_MPI = """
    import sys
    from trinity.distributed.launch import world
    from trinity.cli.main import main
    assert world() is None
    assert main(["info", "tiny"]) == 0
    assert main(["info", "/nonexistent/trinity-test"]) == 2
    print("mpi4py imported:", any(m == "mpi4py" or m.startswith("mpi4py.") for m in sys.modules))
"""


@pytest.mark.parametrize("extra_env", [{}, {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"},
                                       {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}],
                         ids=["plain", "sbatch-script", "srun-n1"])
def test_a_single_process_never_imports_mpi4py(tmp_path, extra_env):
    env = job_env(extra_env)
    assert not any(k in env for k in LAUNCHER_VARS if k not in extra_env)
    r = subprocess.run([sys.executable, _script(tmp_path, "single.py", CHECK_NO_MPI)], capture_output=True,
                       text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("mpi4py imported: False"), r.stdout
    assert r.stderr == "trinity info: error: no such file or directory: /nonexistent/trinity-test\n"


@pytest.mark.parametrize("environ, expect", [
    ({}, None),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, None),  # inside an sbatch script, before any srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, None),  # srun -n 1
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, ("SLURM_STEP_NUM_TASKS", 4)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, ("PMI_SIZE", 2)),
    ({"PMI_RANK": "1"}, ("PMI_RANK", None)),
    ({"PMIX_RANK": "0"}, ("PMIX_RANK", None)),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, ("OMPI_COMM_WORLD_SIZE", 4)),
])
def test_launcher_detection(environ, expect):
    assert launch.launcher(environ) == expect
    if expect is None:
        assert launch.world(environ) is None


def test_a_launcher_without_mpi4py_is_one_line(monkeypatch, capsys):
    from trinity.cli.main import main

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `from mpi4py import MPI` raises ImportError
    with pytest.raises(launch.LaunchError, match=r"pip install 'trinity-moe\[mpi\]'"):
        launch.world({"PMI_RANK": "0", "PMI_SIZE": "2"})
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert main(["info", "tiny"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("trinity info: error: started by an MPI launcher")
    assert "$OMPI_COMM_WORLD_SIZE" in err and "pip install 'trinity-moe[mpi]'" in err


@requires_mpi
def test_srun_without_pmi_is_refused_not_run_alone(tmp_path):
    """srun started 2 tasks but MPI came up as a job of one (no --mpi=pmi2/pmix): refused in one line, instead of two
    copies training side by side."""
    body = """
        from trinity.distributed.launch import LaunchError, world
        try:
            world()
        except LaunchError as e:
            print("refused:", e)
    """
    env = job_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"})
    r = subprocess.run([sys.executable, _script(tmp_path, "srun.py", body)], capture_output=True, text=True,
                       timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused: the launcher started 2 processes ($SLURM_STEP_NUM_TASKS)"), r.stdout
    assert "--mpi=pmi2" in r.stdout


def test_only_the_launcher_takes_comm_world():
    """`COMM_WORLD` is taken in one module of the package, distributed/launch.py (docs/architecture.md: every other
    module receives its communicator). Code only: docstrings and comments may name it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for folder in ("reference", "accel", "distributed", "simulate", "cli"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                if any(isinstance(node, ast.Attribute) and node.attr == "COMM_WORLD" for node in ast.walk(tree)):
                    found.append(os.path.relpath(path, root))
    assert found == [os.path.join("distributed", "launch.py")], found


def test_supervise_forks_only_under_a_launcher():
    """No launcher, TRINITY_SUPERVISE=0, or the supervised child itself: the command runs in this process."""
    from trinity.distributed.launch import supervise
    assert supervise({}) is None
    assert supervise({"PMI_RANK": "0", "PMI_SIZE": "2", "TRINITY_SUPERVISE": "0"}) is None
    assert supervise({"PMI_RANK": "0", "PMI_SIZE": "2", "TRINITY_SUPERVISE": "child"}) is None
