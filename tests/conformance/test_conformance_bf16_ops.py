"""Every leaf operator of the backend at precision "bf16" against the reference's at "bf16", op by op, on the
inputs a training step hands it (reference/model/precision.py).

The reference's bf16 forward and backward of a drawn model and batch is recorded call by call (arguments and
results, at the level of the bf16 table), then every call is replayed on the backend's bf16 table with the same
arguments: each backward gets the ctx of the backend's own forward of the same call. So each operator is checked on
realistic bf16 inputs, independently of the others (the whole step: test_conformance_step.py).

Tolerance of a result r (tolerances.py): both tables compute in float32 on the same bf16 inputs and round the result
to bf16; their float32 values differ by the usual rtol(float32, n)·terms, and where that difference straddles a bf16
rounding boundary the rounded results are one bf16 ulp apart. So max |b − r| ≤ eps(bf16)·max|r| + rtol(float32, n)·S,
with n = model_reduction_length (an upper bound on any one operator's reduction) and S the largest magnitude among
the call's float arguments and results (a bound on its terms' scale up to the reduction length). Results the rules
keep in float32 (router scores and gate weights, losses, parameter gradients) get the same check.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import is_simulated
from hypothesis import assume, given
from test_conformance_step import STEP_SETTINGS, step_cases

from strategies import min_topk_gap
from tolerances import BF16, check_close, eps, model_reduction_length, rtol, topk_gap
from trinity.reference import loss_and_grads, model_forward
from trinity.reference.model.ops import REFERENCE
from trinity.reference.model.precision import BF16_RULES, FLOAT32_OPS, with_precision


class _Recording:
    """An op table over `table` that records every leaf operator call: (name, args, kwargs, result)."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __getattr__(self, name):
        attr = getattr(self.table, name)
        if name not in BF16_RULES and name not in FLOAT32_OPS:
            return attr

        def recorded(*args, **kwargs):
            out = attr(*args, **kwargs)
            # arrays as they are now (the step adds later gradients into earlier ones in place); a ctx as itself
            self.calls.append((name, _snapshot(args), {k: _snapshot(v) for k, v in kwargs.items()}, _snapshot(out)))
            return out
        return recorded


def _snapshot(x):
    """Copies of the arrays in x (a tuple's top level included); anything else (a ctx, a plan) as itself."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if type(x) is tuple:
        return tuple(v.copy() if isinstance(v, np.ndarray) else v for v in x)
    return x


def _is_array(x) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape")


def _np(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, (dict, np.ndarray)) else np.asarray(x)


def _largest(values) -> float:
    """The largest finite magnitude among the float arrays and numbers in `values` (nested tuples included)."""
    best = 0.0
    for v in values:
        if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
            best = max(best, _largest(v))
        elif _is_array(v) and np.dtype(v.dtype).kind == "f" and v.size:
            a = np.abs(_np(v))
            best = max(best, float(a[np.isfinite(a)].max(initial=0.0)))
        elif isinstance(v, float) and np.isfinite(v):
            best = max(best, abs(v))
    return best


@STEP_SETTINGS
@given(step_cases(max_layers=2, max_hidden=24, max_vocab=40, max_len=16))
def test_every_operator_in_bf16(backend, record, case):
    if is_simulated(backend):
        pytest.skip("the CUDA simulator checks the bf16 operators through test_every_operator_in_bf16_simulated")
    check_operators_bf16(backend, record, case)


@pytest.mark.sim_examples(3)
@STEP_SETTINGS
@given(step_cases(max_layers=2, max_hidden=16, max_vocab=32, max_batch=1, max_len=12))
def test_every_operator_in_bf16_simulated(backend, record, case):
    if not is_simulated(backend):
        pytest.skip("for tables under the CUDA simulator")
    check_operators_bf16(backend, record, case)


def check_operators_bf16(backend, record, case):
    config, params64, tokens, labels, doc_ids, _ = case
    params = {k: v.astype(np.float32) for k, v in params64.items()}
    _, ctx = model_forward(config, params, tokens, doc_ids)
    assume(min_topk_gap(config, params, ctx) > topk_gap(np.float32, config, tokens.shape[1]))  # no top-k near-tie
    recording = _Recording(with_precision(REFERENCE, "bf16"))
    loss_and_grads(config, params, tokens, labels, doc_ids, ops=recording)
    table = with_precision(backend, "bf16")
    n = model_reduction_length(config, tokens.shape[1])
    ctx_of = {}  # id of a reference forward's ctx → the backend's ctx of the same call
    seen = set()

    def moved(x):
        if id(x) in ctx_of:
            return ctx_of[id(x)]
        if isinstance(x, np.ndarray):
            return backend.xp.asarray(x)
        if isinstance(x, tuple) and hasattr(x, "_fields") and all(_is_array(v) for v in x):  # a dispatch plan
            return type(x)(*(backend.xp.asarray(v) for v in x))
        return x

    for name, args, kwargs, want in recording.calls:
        got = getattr(table, name)(*map(moved, args), **{k: moved(v) for k, v in kwargs.items()})
        seen.add(name)
        pairs = list(zip(want, got)) if isinstance(want, tuple) and not _is_array(want) else [(want, got)]
        scale = _largest([*args, *kwargs.values(), want])
        for i, (w, g) in enumerate(pairs):
            if _is_array(w) and np.dtype(w.dtype).kind in "iub":
                np.testing.assert_array_equal(_np(g), w, err_msg=f"{name} result {i}")
            elif _is_array(w) or isinstance(w, float):
                w = np.asarray(w, np.float64)
                tol = eps(BF16) * _largest([w]) + rtol(np.float32, n) * scale
                check_close(_np(g), w, BF16, n, what=f"bf16 op {name}", recorder=record, tol=tol)
            elif isinstance(w, tuple) and hasattr(w, "_fields") and all(_is_array(v) for v in w):
                for a, b in zip(w, g):
                    np.testing.assert_array_equal(_np(b), a, err_msg=f"{name} result {i}")
            else:  # a ctx: the backward of this call gets the backend's own
                ctx_of[id(w)] = g
    assert {"linear_forward", "linear_backward", "rmsnorm_forward", "rmsnorm_backward", "attention_forward",
            "attention_backward", "cross_entropy_forward", "cross_entropy_backward"} <= seen
