"""Backend selection for the conformance suite (like array-api-tests: one suite, the backend is a parameter).

    python -m pytest tests/conformance --backend numba            one backend
    python -m pytest tests/conformance --backend numba,reference  several (each test runs per backend)
    TRINITY_BACKEND=numba python -m pytest                        the same through the environment

Default (no option, no variable): "numba" when numba is installed, else "reference" (which passes trivially, being
the definition), so the plain `python -m pytest -n 2` run checks the numba backend. `--backend` is registered
in tests/conftest.py, so it works from the repository root too (`python -m pytest --backend numba`). A backend
that cannot run here (e.g. cupy without a GPU) is skipped with the reason, unless it was asked for explicitly, in
which case the tests fail: asking for a backend and silently testing nothing would hide a broken install.

Every comparison records its measured error and tolerance; the terminal summary lists, per backend, op and dtype,
the largest error/tolerance ratio seen (also under xdist: the numbers travel in the test reports).
"""

from __future__ import annotations

import os

import pytest

BACKEND_ENV = "TRINITY_BACKEND"


def _default_backend() -> str:
    try:
        import numba  # noqa: F401
        return "numba"
    except ImportError:
        return "reference"


def requested_backends(config) -> tuple[list[str], bool]:
    """(backend names, whether they were asked for explicitly)."""
    value = config.getoption("--backend", default=None) or os.environ.get(BACKEND_ENV, "").strip()
    if value:
        return [v.strip() for v in value.split(",") if v.strip()], True
    return [_default_backend()], False


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names, _ = requested_backends(metafunc.config)
        metafunc.parametrize("backend_name", names, scope="session")


@pytest.fixture(scope="session")
def backend(backend_name, request):
    from trinity.accel import BackendUnavailable, get_backend

    _, explicit = requested_backends(request.config)
    try:
        return get_backend(backend_name)
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
