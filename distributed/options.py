"""The schedule options of a layout: how the cluster mode moves what a layout shards, not what it shards.

Every option trains the single process's model (float64 rounding apart, as every layout does; the dtype options on
purpose change the rounding of what they move), and the parallel plan's schedule (schedule.py) is what the step
calls with it, collective by collective, so the cost model prices exactly what runs. Defaults are today's schedule.

    keep_gathered          "none" | "experts" | "all": the buckets of these kinds stay gathered across the
                           micro-batches of a step (gathered once per step instead of once or twice per micro-batch),
                           within `keep_gathered_gib` GiB per rank (0: no limit; buckets kept in gather order while
                           each still fits in what is left; gathers.kept_gathered); dropped before the update
    reshard_after_forward  "all" | "dense" | "experts" | "none": the bucket kinds released after their forward
                           (ZeRO-3-like); the others stay gathered until their backward (ZeRO-2-like: one gather
                           per micro-batch instead of two)
    reduce_gradients       "micro_batch" | "step": gradients reduce-scattered per micro-batch, or accumulated whole
                           on each rank and reduce-scattered once per step (ZeRO-1/2-like gradient keeping)
    muon_owners            "balanced" | "local": distributed Muon's owner of each matrix balances the Newton–Schulz
                           work over the group, or is the rank holding the largest part of it (ties: the least
                           loaded), so only the parts outside its shard travel; the same update either way, the
                           balance stated by the plan (ParallelPlan.muon_balance, plan.owners_of)
    cp_exchange            "all" | "read": context-parallel global layers gather every chunk (Allgather; the
                           gradients back by Reduce_scatter_block), or only the chunks a rank's queries read
                           (causal: cp rank r never reads a chunk after its last one, 2·cp−1−r; plan.chunks_read):
                           one Alltoallv of those chunks' keys, values and doc ids, one of their gradients back; a
                           quarter fewer bytes (3(cp−1) chunks per rank and layer instead of 4(cp−1)), and ranks
                           r > 0 hold fewer keys
    gather_dtype           "param" | "float32" | "bfloat16": the dtype parameters are gathered in (each shard
                           rounded to it, gathered, and the whole bucket brought back to the parameters' dtype; a
                           group of one rank moves nothing and rounds nothing)
    reduce_dtype           "param" | "float32" | "bfloat16": the dtype gradients are reduced in (the reduce-scatters
                           and the replicas' all-reduce: rounded to it, summed in it, brought back)
    async_reduce           false | true: gradient reduce-scatters posted non-blocking (Ireduce_scatter_block) as
                           the backward hands them back; a hand-back first waits for the previous one's (one in
                           flight at a time), and the last of a micro-batch (the embedding's) for its own

They are written in a layout's text after its sizes ("dp_shard=4,ep=4,keep_gathered=all,reduce_gradients=step";
layout.py), and in the run file's [parallel] section as keys of their own. The gather rules they change are stated
once in gathers.py, the collectives in schedule.py. "param" dtypes keep the parameters' own (float32 or float64 on
the CPU); bfloat16 needs the ml_dtypes package (a layout naming it is refused without it). An evaluation's forward
gathers as a step's and keeps nothing across its micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["ParallelOptions", "OPTION_NAMES", "NOT_YET_RUN", "OptionError", "option_value", "wire_itemsize",
           "wire_dtype"]

CHOICES = {
    "keep_gathered": ("none", "experts", "all"),
    "reshard_after_forward": ("all", "dense", "experts", "none"),
    "reduce_gradients": ("micro_batch", "step"),
    "muon_owners": ("balanced", "local"),
    "cp_exchange": ("all", "read"),
    "gather_dtype": ("param", "float32", "bfloat16"),
    "reduce_dtype": ("param", "float32", "bfloat16"),
}


class OptionError(ValueError):
    """A schedule option that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class ParallelOptions:
    """The schedule options (module docstring); the defaults are the schedule without options."""
    keep_gathered: str = "none"
    keep_gathered_gib: float = 0.0
    reshard_after_forward: str = "all"
    reduce_gradients: str = "micro_batch"
    muon_owners: str = "balanced"
    cp_exchange: str = "all"
    gather_dtype: str = "param"
    reduce_dtype: str = "param"
    async_reduce: bool = False

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise OptionError(f"{name} = {getattr(self, name)!r}: must be one of {', '.join(choices)}")
        budget = self.keep_gathered_gib
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
                or budget < 0:
            raise OptionError(f"keep_gathered_gib = {budget!r}: must be a number of GiB >= 0 (0: no limit)")
        if not isinstance(self.async_reduce, bool):
            raise OptionError(f"async_reduce = {self.async_reduce!r}: must be true or false")

    def changed(self) -> dict:
        """{name: value} of the options that differ from the defaults, in field order."""
        default = ParallelOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    def text(self) -> str:
        """The non-default options as "name=value" pairs joined by commas ("" when all are defaults)."""
        return ",".join(f"{k}={_show(v)}" for k, v in self.changed().items())

    def keeps(self, kind: str) -> bool:
        """Whether buckets of `kind` ("dense" or "experts") stay gathered across a step's micro-batches."""
        return self.keep_gathered == "all" or self.keep_gathered == kind

    def reshards(self, kind: str) -> bool:
        """Whether buckets of `kind` ("dense" or "experts") are released after their forward."""
        return self.reshard_after_forward == "all" or self.reshard_after_forward == kind

    def unavailable(self) -> list[str]:
        """Why these options cannot run on this machine (one phrase each; [] when they can)."""
        wanted = [name for name in ("gather_dtype", "reduce_dtype") if getattr(self, name) == "bfloat16"]
        if wanted and _bfloat16() is None:
            return [f"{' and '.join(wanted)} = bfloat16 needs the ml_dtypes package (pip install ml_dtypes)"]
        return []


def wire_itemsize(choice: str, itemsize: int) -> int:
    """Bytes per element moved under a dtype option (gather_dtype, reduce_dtype): `itemsize` (the parameters' or the
    caller's) for "param"."""
    return itemsize if choice == "param" else WIRE_ITEMSIZE[choice]


def wire_dtype(choice: str, dtype):
    """The numpy dtype a dtype option moves `dtype`'s arrays in; OptionError in one line when bfloat16 is asked for
    without ml_dtypes."""
    import numpy as np
    if choice == "param":
        return np.dtype(dtype)
    if choice == "float32":
        return np.dtype(np.float32)
    bf16 = _bfloat16()
    if bf16 is None:
        raise OptionError("bfloat16 gathers or reductions need the ml_dtypes package (pip install ml_dtypes)")
    return bf16


def _bfloat16():
    """ml_dtypes' bfloat16 dtype, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    import numpy as np
    return np.dtype(ml_dtypes.bfloat16)


OPTION_NAMES = tuple(f.name for f in fields(ParallelOptions))
# Options written and checked but not yet run by the cluster mode: a layout that sets one is refused (Layout.check)
# instead of silently running the default schedule. Each leaves this set with the code that runs it.
NOT_YET_RUN: set = set()
WIRE_ITEMSIZE = {"float32": 4, "bfloat16": 2}  # bytes per element of a dtype option other than "param"


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def option_value(name: str, text: str):
    """The value of option `name` written as `text` in a layout's text ("all", "2.5", "true"). OptionError names
    the option when the text is no value of it."""
    kind = {f.name: f.type for f in fields(ParallelOptions)}[name]
    if kind in ("bool", bool):
        if text not in ("true", "false"):
            raise OptionError(f"{name}={text}: must be true or false")
        return text == "true"
    if kind in ("float", float):
        try:
            return float(text)
        except ValueError:
            raise OptionError(f"{name}={text}: must be a number") from None
    return text
