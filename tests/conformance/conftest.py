"""Backend selection for the conformance suite (like array-api-tests: one suite, the backend is a parameter).

    python -m pytest tests/conformance --backend numba            one backend
    python -m pytest tests/conformance --backend numba,reference  several (each test runs per backend)
    TRINITY_BACKEND=numba python -m pytest                        the same through the environment

Default (no option, no variable): "numba" when numba is installed, else "reference" (which passes trivially, being
the definition), and "cupy-sim" when numba-cuda is installed, so the plain `python -m pytest -n 2` run checks the
numba backend and the cupy backend's code path. `--backend` is registered in tests/conftest.py, so it works from
the repository root too (`python -m pytest --backend numba`). A backend that cannot run here (e.g. cupy without a
GPU) is skipped with the reason, unless it was asked for explicitly, in which case the tests fail: asking for a
backend and silently testing nothing would hide a broken install.

"cupy-sim" is a test-only name (trinity.accel.get_backend does not know it): the cupy op table with NumPy as its array
module and the Numba-CUDA kernels under the CUDA simulator, `trinity.accel.cupy_backend.simulated()`. The
simulator runs every GPU thread as a Python thread, so its tests run fewer hypothesis examples: SIM_EXAMPLES per
test (or the number of a `@pytest.mark.sim_examples(n)` marker), never more than the test's own settings, and
the tests cap some drawn shapes for it (backends.is_simulated).

Every comparison records its measured error and tolerance; the terminal summary lists, per backend, op and dtype,
the largest error/tolerance ratio seen (also under xdist: the numbers travel in the test reports).
"""

from __future__ import annotations

import os

import pytest
from backends import SIMULATED, load_backend

BACKEND_ENV = "TRINITY_BACKEND"
SIM_EXAMPLES = 20  # hypothesis examples per test for SIMULATED, unless a sim_examples marker says otherwise


def _default_backends() -> list[str]:
    import importlib.util

    try:
        import numba  # noqa: F401
        names = ["numba"]
    except ImportError:
        names = ["reference"]
    if importlib.util.find_spec("numba_cuda") is not None:
        names.append(SIMULATED)
    return names


def requested_backends(config) -> tuple[list[str], bool]:
    """(backend names, whether they were asked for explicitly)."""
    value = config.getoption("--backend", default=None) or os.environ.get(BACKEND_ENV, "").strip()
    if value:
        return [v.strip() for v in value.split(",") if v.strip()], True
    return _default_backends(), False


def pytest_configure(config):
    config.addinivalue_line("markers", f"sim_examples(n): hypothesis examples of this test for {SIMULATED} "
                                       f"(default {SIM_EXAMPLES})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """For SIMULATED, run the test's hypothesis examples up to its sim limit. A @given test reads its settings from
    the attribute below at every call (hypothesis core), so the limit is swapped in for this item only."""
    callspec = getattr(item, "callspec", None)
    fn = getattr(item, "obj", None)
    old = getattr(fn, "_hypothesis_internal_use_settings", None)
    if callspec is None or callspec.params.get("backend_name") != SIMULATED or old is None:
        yield
        return
    from hypothesis import settings

    marker = item.get_closest_marker("sim_examples")
    limit = marker.args[0] if marker else SIM_EXAMPLES
    fn._hypothesis_internal_use_settings = settings(old, max_examples=min(old.max_examples, limit))
    try:
        yield
    finally:
        fn._hypothesis_internal_use_settings = old


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names, _ = requested_backends(metafunc.config)
        metafunc.parametrize("backend_name", names, scope="session")


@pytest.fixture(scope="session")
def backend(backend_name, request):
    from trinity.accel import BackendUnavailable

    _, explicit = requested_backends(request.config)
    try:
        return load_backend(backend_name)
    except BackendUnavailable as e:
        if explicit:
            pytest.fail(f"backend {backend_name!r} was requested but cannot run here: {e}")
        pytest.skip(f"backend {backend_name!r} unavailable: {e}")


# ---- error/tolerance summary ---------------------------------------------------------------------------------------
_worst: dict[tuple, tuple[float, float, float]] = {}


def pytest_runtest_logreport(report):
    for name, value in getattr(report, "user_properties", ()):
        if name == "conformance":
            for key, (err, tol) in value.items():
                key = tuple(key)
                ratio = err / tol if tol > 0 else (0.0 if err == 0 else float("inf"))
                if key not in _worst or ratio > _worst[key][0]:
                    _worst[key] = (ratio, err, tol)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput") or not _worst:
        return
    tr = terminalreporter
    tr.section("conformance: largest error / tolerance per backend, check and dtype", sep="-")
    tr.write_line(f"{'backend':10s} {'check':34s} {'dtype':8s} {'max err':>10s} {'its tol':>10s} {'ratio':>7s}")
    for key in sorted(_worst):
        ratio, err, tol = _worst[key]
        tr.write_line(f"{key[0]:10s} {key[1]:34s} {key[2]:8s} {err:10.3g} {tol:10.3g} {ratio:7.3f}")


@pytest.fixture(scope="session", params=["float32", "float64"])
def dtype(request):
    """Every check runs in float32 (the default compute dtype) and float64."""
    import numpy as np
    return np.dtype(request.param)


@pytest.fixture
def record(request, backend_name):
    """A tolerances.Recorder for this test: the summary's max error / tolerance numbers."""
    from tolerances import Recorder
    return Recorder(request, backend_name)
