#!/usr/bin/env bash
# The device session (docs/gpu.md "The device session"): everything the project wants to learn from one lent GPU
# machine, in one run of about 8 minutes, from the repository root:
#
#     bash benchmarks/gpu_session.sh                           on the GPU machine (python3 with cupy, numba-cuda, torch)
#     GPU_SESSION_SIMULATE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
#                                                              the same phases on any CPU, tiny shapes (the plumbing)
#
# Phases, each with a hard time cap (timeout; never past what is left of GPU_SESSION_BUDGET seconds), its output in
# $OUT/<phase>.log and its exit status, seconds and cap in $OUT/phases.tsv; a failing phase does not stop the next:
#   install       make `import trinity` work offline: already importable from here, else pip install -e (no index,
#                 no build isolation, no deps), else a PYTHONPATH shim (a temp dir with trinity -> this root);
#                 which one in $OUT/install.txt
#   versions      $OUT/versions.txt and versions.json: nvidia-smi, python and package versions, CUDA runtime and
#                 driver, device name, SMs, memory, whether numba.cuda and the cupy table load
#   kernels       pytest tests/test_cuda_kernels.py tests/test_cupy_backend.py ($OUT/junit-kernels.xml)
#   conformance   pytest tests/conformance --backend cupy (cupy-sim when simulating; $OUT/junit-conformance.xml)
#   compare       benchmarks/gpu_step.py compare: a bf16 step on the cupy table against the reference's bf16 step (and float64)
#   time-*        benchmarks/gpu_step.py time: trinity (cupy, bf16), torch eager, torch.compile; tokens/s, MFU, memory
#   summary       benchmarks/gpu_report.py summary: $OUT/summary.json and a short summary printed last
#
# Environment: OUT (default ./gpu_session_out), PYTHON (default python3), GPU_SESSION_SIMULATE=1 (CPU, tiny shapes),
# GPU_SESSION_BUDGET (seconds for all phases, default 495), GPU_SESSION_IMPORT=shim (skip the pip try).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd -P)
OUT=${OUT:-$ROOT/gpu_session_out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd -P)
PY=${PYTHON:-python3}
if [[ $PY == */* ]]; then # a path: made absolute, since the install check runs from another folder
  PY=$(cd "$(dirname "$PY")" && pwd -P)/$(basename "$PY")
fi
SIM=${GPU_SESSION_SIMULATE:-0}
BUDGET=${GPU_SESSION_BUDGET:-495}
T0=$SECONDS
: > "$OUT/phases.tsv"
echo "device session: root $ROOT, results in $OUT, python $PY, simulate=$SIM, budget ${BUDGET}s"

# phase NAME CAP COMMAND...: COMMAND's output to $OUT/NAME.log, cut at CAP seconds or what is left of the budget
# (SIGINT first, so pytest still writes its junit xml; SIGKILL 10 s later).
phase() {
  local name=$1 cap=$2 left start rc
  shift 2
  left=$((BUDGET - (SECONDS - T0)))
  ((cap > left)) && cap=$left
  if ((cap < 5)); then
    printf '%s\tskipped\t0\t0\n' "$name" >>"$OUT/phases.tsv"
    echo "[$name] skipped: the session's time budget is spent"
    return
  fi
  echo "[$name] up to ${cap}s: $*"
  start=$SECONDS
  timeout --signal=INT --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - start)) "$cap" >>"$OUT/phases.tsv"
  echo "[$name] rc=$rc after $((SECONDS - start))s; last lines of $name.log:"
  tail -n 4 "$OUT/$name.log" | cut -c1-240
}

# where `import trinity.reference` resolves from outside the root (its parent folder), or nothing
trinity_root() {
  (cd / && "$PY" -c 'import os, trinity.reference as r; print(os.path.realpath(os.path.dirname(os.path.dirname(r.__file__))))' 2>/dev/null)
}

install_trinity() {
  if [ "$(trinity_root)" = "$ROOT" ]; then
    echo "already importable from $ROOT"
    return 0
  fi
  local why="GPU_SESSION_IMPORT=shim"
  if [ "${GPU_SESSION_IMPORT:-pip}" != shim ]; then
    why="pip install -e failed, see install.log"
    if timeout 40 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$ROOT" >"$OUT/install.log" 2>&1 &&
      [ "$(trinity_root)" = "$ROOT" ]; then
      echo "pip install --no-deps --no-build-isolation --no-index -e (editable)"
      return 0
    fi
  fi
  SHIM=$(mktemp -d)
  trap 'rm -rf "$SHIM"' EXIT
  ln -s "$ROOT" "$SHIM/trinity"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  if [ "$(trinity_root)" = "$ROOT" ]; then
    echo "PYTHONPATH shim ($SHIM/trinity -> $ROOT; $why)"
  else
    echo "FAILED: trinity is not importable (pip install -e and the PYTHONPATH shim both failed)"
    return 1
  fi
}

start=$SECONDS
install_trinity >"$OUT/install.txt"
printf 'install\t%s\t%s\t40\n' "$?" $((SECONDS - start)) >>"$OUT/phases.tsv"
echo "[install] $(cat "$OUT/install.txt")"

if [ "$SIM" = 1 ]; then
  export NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-1}
  BACKEND=cupy-sim
  KERNEL_TESTS=(-k "rmsnorm or simulated_table or round_bf16")
  CONFORMANCE_TESTS=(-k "rmsnorm")
  SIMULATE=(--simulate)
  COMPARE_RUNS=sim-tiny:1x8
  TIME_RUNS=sim-tiny:1x8
  TIMING=(--warmup 1 --steps 2 --seconds 2)
  COMPILE_BACKEND=eager # inductor takes minutes on a CPU; the plumbing is the same
else
  BACKEND=cupy
  KERNEL_TESTS=()
  CONFORMANCE_TESTS=()
  "$PY" -c 'import xdist' 2>/dev/null && CONFORMANCE_TESTS=(-n 4)
  SIMULATE=()
  COMPARE_RUNS=bench-medium:2x256,nano:1x256
  TIME_RUNS=bench-medium:8x1024,nano:4x2048
  TIMING=(--warmup 2 --steps 10 --seconds 6)
  COMPILE_BACKEND=inductor
fi
PER_TEST=()
"$PY" -c 'import pytest_timeout' 2>/dev/null && PER_TEST=(--timeout=60)

phase versions 20 "$PY" benchmarks/gpu_report.py versions "$OUT"
phase kernels 60 "$PY" -m pytest -q --maxfail=10 tests/test_cuda_kernels.py tests/test_cupy_backend.py \
  -p no:cacheprovider --junitxml="$OUT/junit-kernels.xml" "${PER_TEST[@]}" "${KERNEL_TESTS[@]}"
phase conformance 80 "$PY" -m pytest -q tests/conformance --backend "$BACKEND" -p no:cacheprovider \
  --junitxml="$OUT/junit-conformance.xml" "${PER_TEST[@]}" "${CONFORMANCE_TESTS[@]}"
phase compare 120 "$PY" benchmarks/gpu_step.py compare --runs "$COMPARE_RUNS" --out "$OUT" "${SIMULATE[@]}"
phase time-trinity 60 "$PY" benchmarks/gpu_step.py time --impl trinity --runs "$TIME_RUNS" --out "$OUT" \
  "${TIMING[@]}" "${SIMULATE[@]}"
phase time-torch-eager 40 "$PY" benchmarks/gpu_step.py time --impl torch-eager --runs "$TIME_RUNS" --out "$OUT" \
  "${TIMING[@]}" "${SIMULATE[@]}"
phase time-torch-compile 80 "$PY" benchmarks/gpu_step.py time --impl torch-compile --runs "$TIME_RUNS" \
  --out "$OUT" --compile-backend "$COMPILE_BACKEND" "${TIMING[@]}" "${SIMULATE[@]}"

# the summary runs whatever the budget says: it only reads files
timeout --kill-after=5 30 "$PY" benchmarks/gpu_report.py summary "$OUT" 2>&1 | tee "$OUT/summary.log"
rc=$?
echo "device session done in $((SECONDS - T0))s (summary rc=$rc); results in $OUT"
exit "$rc"
