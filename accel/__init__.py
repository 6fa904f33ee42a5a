"""trinity.accel: backends with the reference's operator table (docs/architecture.md "Core design").

    get_backend("reference" | "numba" | "cupy")  → an op table: the leaf operators of trinity.reference.model.ops with
                                                  the same names and signatures, `name`, `xp` (the array module),
                                                  `scope(name)`, and the optimizer kernels `newton_schulz`,
                                                  `adamw_update`, `sum_of_squares`, `scaled` (same signatures as
                                                  in trinity.reference.training.optim), and the placement
                                                  `to_device(tree)` / `to_host(tree)` / `on_device` (the identity
                                                  for NumPy tables; counted copies for cupy: accel/device.py)
    get_backend(table)                           → the op table object itself, checked (check_table)
    BACKENDS                                     the names get_backend accepts
    BackendUnavailable                           raised when a backend cannot run here (ImportError subclass)

Pass the table as `ops=` to model_forward / logits / loss_and_grads / evaluate_losses, and as `kernels=` to
optimizer_step / clip_grad_norm. Backends supply kernels
only: model composition, losses and optimizer stay in trinity.reference.
"""

from __future__ import annotations

__all__ = ["get_backend", "check_table", "BACKENDS", "BackendUnavailable", "available_backends"]

BACKENDS = ("reference", "numba", "cupy")


class BackendUnavailable(ImportError):
    """The requested backend's requirements (package, device) are missing on this machine."""


def _reference():
    from trinity.reference.model.ops import REFERENCE
    return REFERENCE  # the one reference table, optimizer kernels included


def _numba():
    try:
        import numba  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"backend 'numba' needs the numba package (pip install numba): {e}") from None
    from .host_memory import keep_freed_memory
    from .numba_backend import NumbaOps
    keep_freed_memory()  # a fast path should not page-fault through its activations every step (host_memory.py)
    return NumbaOps()


def _cupy():
    from .cupy_backend import load
    return load()


_LOADERS = {"reference": _reference, "numba": _numba, "cupy": _cupy}
_CACHE: dict = {}


def get_backend(name="reference"):
    """The op table of backend `name` (one shared instance per name). Raises ValueError for an unknown name and
    BackendUnavailable when the backend cannot run on this machine.

    An op table object instead of a name is returned as it is, once checked (`check_table`): the hook through which
    a table from outside this package, or a test's stand-in, reaches the trainer (Trainer(..., backend=table)) and
    the commands' functions."""
    if not isinstance(name, str):
        return check_table(name)
    if name not in _LOADERS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name not in _CACHE:
        _CACHE[name] = _LOADERS[name]()
    return _CACHE[name]


def check_table(table):
    """`table` if it is an op table: the leaf operators, `xp`, and a placement (`to_device`, `to_host`,
    `on_device`): the identity for a NumPy table, trinity.accel.device.DeviceTable's copies for any other module.
    ValueError otherwise, in one line."""
    import numpy as np

    from trinity.reference.model.ops import LEAF_OPS, OPTIMIZER_KERNELS

    what = getattr(table, "name", type(table).__name__)
    missing = [n for n in ["xp", "to_device", "to_host", "on_device", "scope", *OPTIMIZER_KERNELS,
                           *(n for names in LEAF_OPS.values() for n in names)] if not hasattr(table, n)]
    if missing:
        raise ValueError(f"op table {what!r} lacks {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    if table.xp is not np and not table.on_device:
        raise ValueError(f"op table {what!r} computes on {getattr(table.xp, '__name__', table.xp)} but does not place "
                         f"its arrays there: mix in trinity.accel.device.DeviceTable")
    return table


def available_backends() -> dict[str, str | None]:
    """{name: None if it can run here, else why not}."""
    out = {}
    for name in BACKENDS:
        try:
            get_backend(name)
            out[name] = None
        except BackendUnavailable as e:
            out[name] = str(e)
    return out
