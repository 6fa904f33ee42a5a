"""Where a run's arrays live when its op table computes on a device (docs/gpu.md "What moves where, when").

A trainer whose table is on a device (`ops.on_device`: the cupy table, its simulation, a test's stand-in) keeps its
params, optimizer state and balancing state in the table's module from its start to its end, and moves:

    state_to_device   once, after the state was built or loaded (and, under a layout, the mesh attached): params,
                      optimizer state (its step counter stays a host NumPy scalar, as the optimizer keeps it) and
                      balancing state
    batch_to_device   each step's batch (and each evaluation batch) at its boundary: its token and document-id arrays
    state_to_host     copies for what the host keeps: a checkpoint, an export, `whole_state`

Everything else the host reads (metrics' expert loads, evaluation counts) comes back through `ops.to_host`, and
losses and norms as Python numbers. For a NumPy table (reference, numba) each function returns what it is given:
nothing is copied and nothing counted, so those runs are exactly what they were.

Under a layout each rank uses one device (`local_rank`: its place among its host's ranks) and the mesh stages the
collectives' device buffers through the host (distributed/staging.py). `layout_problem` names what a layout cannot
do yet with arrays outside NumPy (bfloat16 wire dtypes).
"""

from __future__ import annotations

import numpy as np

from trinity.reference.training.step import GlobalBatch

__all__ = ["state_to_device", "state_to_host", "batch_to_device", "local_rank", "layout_problem"]

STEP = "step"  # the optimizer state's step counter: host state on every table


def _optimizer_state(move, state: dict | None) -> dict | None:
    return None if state is None else {k: (v if k == STEP else move(v)) for k, v in state.items()}


def state_to_device(ops, params, optimizer_state: dict | None, balancing_state: dict | None):
    """(params, optimizer state, balancing state) in the table's module (a state that is None stays None); the same
    objects for a NumPy table."""
    if not ops.on_device:
        return params, optimizer_state, balancing_state
    return (ops.to_device(params), _optimizer_state(ops.to_device, optimizer_state),
            ops.to_device(balancing_state))


def state_to_host(ops, params, optimizer_state: dict, balancing_state: dict):
    """Host (NumPy) copies of the state, for a checkpoint or an export; the same objects for a NumPy table."""
    if not ops.on_device:
        return params, optimizer_state, balancing_state
    return (ops.to_host(params), _optimizer_state(ops.to_host, optimizer_state), ops.to_host(balancing_state))


def batch_to_device(ops, batch: GlobalBatch) -> GlobalBatch:
    """The batch's arrays in the table's module (labels that are the tokens stay the tokens: one array moves); the
    batch itself for a NumPy table."""
    if not ops.on_device:
        return batch
    tokens = ops.to_device(batch.tokens)
    labels = None if batch.labels is batch.tokens else ops.to_device(batch.labels)
    return GlobalBatch(tokens, labels, ops.to_device(batch.doc_ids), rows=batch.rows, sequences=batch.sequences)


def local_rank(ranks: list, rank: int) -> int:
    """This rank's place among the ranks of its host: `ranks` is every rank's [pid, host] in rank order."""
    host = ranks[rank][1]
    return sum(1 for _, h in ranks[:rank] if h == host)


def layout_problem(ops, layout) -> str | None:
    """Why `layout` cannot train with `ops`' arrays, or None: bfloat16 gathers or reductions (ml_dtypes NumPy
    arrays) are not wired for a table whose module is not NumPy yet. The simulated cupy table computes on NumPy
    arrays and runs every layout."""
    if not ops.on_device or ops.xp is np:
        return None
    for name in ("gather_dtype", "reduce_dtype"):
        if getattr(layout.options, name) == "bfloat16":
            return (f"layout {layout}: {name} = bfloat16 moves ml_dtypes NumPy arrays: not with an op table on a "
                    f"device (backend {getattr(ops, 'name', ops)!r}); use param or float32")
    return None
