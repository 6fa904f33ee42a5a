"""Shared test configuration: hypothesis profiles and the oracle-test report.

Hypothesis profiles
-------------------
- `ci` (the default): derandomized, so the README's test command runs the same examples on every run and every
  machine; 50 examples, no example database, no deadline (NumPy reference ops on random shapes have no stable
  timing), `too_slow` health check off, and no shrinking (a failure is reported as found, with its reproduce blob).
- `explore`: new random examples on every run, 200 of them, with shrinking and the reproduce blob: the command to
  look for failures before submitting (`HYPOTHESIS_PROFILE=explore python -m pytest ...`); a failure it finds is
  fixed, or pinned by an `@example`, so that the default run covers it from then on.
- `dev`: new random examples, 20 of them: a quick look while editing.

The profile is `$HYPOTHESIS_PROFILE` when set, else `ci`; no other environment variable plays a part (not `CI`).
`pytest --hypothesis-profile=NAME` overrides both. A test's own `@settings(max_examples=...)` always wins over the
profile: the profile only supplies the values a test leaves unset.

Oracle tests
------------
Tests marked `oracle` compare against Hugging Face transformers (the `oracle` extra). The terminal summary lists
how many ran and which were skipped and why. With `TRINITY_REQUIRE_ORACLE=1` (set by .ci/run) the run fails when
any oracle test was skipped, including a test module skipped at import because torch/transformers are missing.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

# ---- hypothesis -------------------------------------------------------------------------------------------------
# Every profile starts from hypothesis' plain "default" profile, not from whatever hypothesis picks by itself when it
# detects CI (its own built-in "ci" profile), so a profile means the same thing on every machine.
_BASE = settings.get_profile("default")
DEFAULT_PROFILE = "ci"
settings.register_profile(
    "ci",
    _BASE,
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    # No shrinking: a failure is reported as found (with its reproduce blob) instead of spending minutes of the run
    # on minimising it; the explore profile shrinks.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.register_profile(
    "explore",
    _BASE,
    max_examples=200,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    _BASE,
    max_examples=20,
    derandomize=False,
    deadline=None,
    print_blob=True,
)
PROFILES = ("ci", "explore", "dev")


def _profile_name() -> str:
    """$HYPOTHESIS_PROFILE, else the default profile; an unknown name stops the run in one line."""
    name = os.environ.get("HYPOTHESIS_PROFILE", "").strip() or DEFAULT_PROFILE
    if name not in PROFILES:
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE={name!r}: unknown profile; choose one of {', '.join(PROFILES)}")
    return name


def pytest_configure(config):
    # here rather than at import, so that an unknown name is pytest's one-line usage error; this conftest's hook runs
    # before hypothesis' plugin's, which then loads the profile of --hypothesis-profile when one is given
    settings.load_profile(_profile_name())


def pytest_addoption(parser):
    # here, not in tests/conformance/conftest.py, so that the option exists however pytest is started
    parser.addoption("--backend", action="store", default=None,
                     help="op-table backend(s) for tests/conformance, comma-separated: reference, numba, cupy "
                          "(default: $TRINITY_BACKEND, else numba when installed, else reference)")


def pytest_report_header(config):
    s = settings.default
    return (f"hypothesis profile {settings._current_profile or '?'}: max_examples={s.max_examples}, "
            f"derandomize={s.derandomize}, deadline={s.deadline} (a test's own @settings wins)")


# ---- oracle report ------------------------------------------------------------------------------------------------
REQUIRE_ORACLE_ENV = "TRINITY_REQUIRE_ORACLE"
_ORACLE_WORDS = ("torch", "transformers", "oracle")
_RANK = {"passed": 0, "xfailed": 1, "skipped": 2, "failed": 3}
_oracle: dict[str, tuple[str, str]] = {}  # nodeid -> (outcome, skip reason)


def _require_oracle() -> bool:
    return os.environ.get(REQUIRE_ORACLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # an xdist worker; the controller sees every report


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _note(nodeid: str, outcome: str, reason: str = "") -> None:
    old = _oracle.get(nodeid)
    if old is None or _RANK[outcome] > _RANK[old[0]]:
        _oracle[nodeid] = (outcome, reason)


def pytest_runtest_logreport(report):
    if "oracle" not in report.keywords:
        return
    if report.skipped:
        if hasattr(report, "wasxfail"):
            _note(report.nodeid, "xfailed", str(report.wasxfail))
        else:
            _note(report.nodeid, "skipped", _skip_reason(report))
    elif report.failed:
        _note(report.nodeid, "failed")
    elif report.when == "call":
        _note(report.nodeid, "passed")


def pytest_collectreport(report):
    """A module skipped at import (e.g. `pytest.importorskip("torch")`) never yields items with the oracle marker:
    count such a skip as an oracle skip when its reason names torch, transformers or the oracle extra."""
    if report.skipped:
        reason = _skip_reason(report)
        if any(word in reason.lower() for word in _ORACLE_WORDS):
            _note(report.nodeid or "<collection>", "skipped", reason)


def _oracle_problem() -> str | None:
    skipped = [n for n, (o, _) in _oracle.items() if o == "skipped"]
    if skipped:
        return f"{len(skipped)} oracle test(s) or module(s) were skipped"
    return None


def pytest_sessionfinish(session, exitstatus):
    if _is_worker(session.config) or not _require_oracle():
        return
    if _oracle_problem() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _is_worker(config):
        return
    tr = terminalreporter
    counts = {k: 0 for k in _RANK}
    for outcome, _ in _oracle.values():
        counts[outcome] += 1
    tr.section("oracle tests (Hugging Face transformers)", sep="-")
    if not _oracle:
        tr.write_line("no test marked 'oracle' was collected")
    else:
        tr.write_line("oracle: " + ", ".join(f"{k}={counts[k]}" for k in ("passed", "failed", "skipped", "xfailed")))
        for nodeid, (outcome, reason) in sorted(_oracle.items()):
            tr.write_line(f"  {outcome.upper()} {nodeid}" + (f": {reason}" if reason else ""))
    problem = _oracle_problem()
    if _require_oracle():
        if problem:
            tr.write_line(f"ERROR: {REQUIRE_ORACLE_ENV} is set and {problem}; failing the run", red=True, bold=True)
        else:
            tr.write_line(f"{REQUIRE_ORACLE_ENV} is set: no oracle test was skipped")
