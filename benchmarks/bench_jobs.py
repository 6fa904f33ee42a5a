"""What the cluster benchmarks share: a run folder of `bench-medium` (float32, numba backend, synthetic Markov data),
the environment of a job pinned to a number of threads, and one `trinity train` job that leaves its metrics.

    folder = make_run_folder(seq_len=512, micro=1, steps=4, sequences=4)
    rows = train(folder, [*mpiexec_command(4), "--mesh", "dp_shard=4"], threads=1)   # metrics.jsonl rows
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

__all__ = ["make_run_folder", "job_env", "mpiexec", "mpiexec_command", "single_command", "train"]

RUN = """
[model]
preset = "bench-medium"
dtype = "float32"
[data]
path = "tokens.bin"
eos_id = 0
seq_len = {seq_len}
micro_batch_size = {micro}
[train]
steps = {steps}
sequences_per_step = {sequences}
backend = "numba"
[checkpoint]
dir = "ckpt"
every = 1000000
[logging]
metrics = "metrics.jsonl"
progress = false
"""


def make_run_folder(*, seq_len: int, micro: int, steps: int, sequences: int) -> str:
    """A new temporary folder with tokens.bin (twice the tokens the run reads) and run.toml."""
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource

    folder = tempfile.mkdtemp(prefix="trinity-bench-")
    write_token_file(os.path.join(folder, "tokens.bin"), MarkovSource(32000, eos_id=0, branching=8, mean_doc_len=600,
                     seed=0).documents(steps * sequences * seq_len * 2), eos_id=0)
    with open(os.path.join(folder, "run.toml"), "w") as f:
        f.write(RUN.format(seq_len=seq_len, micro=micro, steps=steps, sequences=sequences))
    return folder


def job_env(threads: int) -> dict:
    """This environment without launcher variables, every thread pool at `threads`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def mpiexec() -> str:
    """The mpiexec next to this interpreter (the `mpi` extra's), else the first on PATH; exits when there is none."""
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = path if os.path.exists(path) else shutil.which("mpiexec")
    if path is None:
        sys.exit("no mpiexec: pip install -e '.[mpi]'")
    return path


def mpiexec_command(ranks: int) -> list[str]:
    """`mpiexec -n ranks python -m mpi4py -m trinity.cli train run.toml`."""
    return [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "trinity.cli", "train", "run.toml"]


def single_command() -> list[str]:
    return [sys.executable, "-m", "trinity.cli", "train", "run.toml"]


def train(folder: str, cmd: list[str], threads: int) -> list[dict]:
    """Run one job from scratch in `folder` (earlier checkpoints and metrics removed); its metrics rows."""
    shutil.rmtree(os.path.join(folder, "ckpt"), ignore_errors=True)
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        os.remove(os.path.join(folder, "metrics.jsonl"))
    r = subprocess.run(cmd, cwd=folder, env=job_env(threads), capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
