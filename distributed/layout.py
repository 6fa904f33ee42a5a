"""The parallel layout of a training job: a mesh with named dimensions (torchtitan's ParallelDims is the model).

    dp_replicate  data parallel, every rank holds the whole model (gradients all-reduced)
    dp_shard      data parallel, params and optimizer state sharded over these ranks (FSDP/ZeRO-3)
    cp            context parallel: each sequence is split over these ranks
    ep            expert parallel: the experts of a MoE layer are split over these ranks; ep borrows its ranks
                  from dp_shard·cp (it does not multiply the world)

The world is dp_replicate·dp_shard·cp ranks; dp = dp_replicate·dp_shard of them take different slices of the global
batch. Size-1 dimensions cost nothing. A layout is written "dp_shard=2,ep=2" (the non-1 dimensions, in the order
above; "single" when all are 1), followed by its schedule options that differ from the defaults (options.py:
"dp_shard=4,ep=4,keep_gathered=all"): `Layout.parse(str(layout)) == layout`. It is run configuration (the run
file's [parallel] section, `trinity train --mesh`), not model configuration.

`Layout.check` refuses, before any work, a layout that cannot run a given job and lists the layouts that would
(`fitting_layouts`). The rules:

1. dp_replicate·dp_shard·cp == the job's number of ranks;
2. ep divides dp_shard·cp, and num_experts is divisible by ep;
3. every sequences-per-step value of the run (the base value and every batch_schedule value) is divisible by
   dp·micro_batch_size: each data-parallel rank takes an equal whole number of micro-batches of the global batch;
4. with cp > 1: seq_len is divisible by 2·cp (each sequence is cut into 2·cp chunks; cp rank r holds chunks r and
   2·cp−1−r, which balances the causal work), and every sliding window w of the model shorter than the sequence
   has w−1 <= seq_len/(2·cp) (the w−1 preceding tokens a chunk needs come from the one neighbouring chunk; a window
   of at least seq_len is causal attention over the whole sequence, gathered like a global layer's).
   `gathers_whole_sequence` and `window_problem` state the window part once; context parallel
   (context_parallel.gather_kv) runs exactly the windows they allow (tests/test_layout.py runs it to check).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from .options import NOT_YET_RUN, OPTION_NAMES, OptionError, ParallelOptions, option_value

__all__ = ["DIMS", "Layout", "LayoutError", "fitting_layouts", "gathers_whole_sequence", "window_problem"]

SINGLE = "single"  # the text of the layout whose dimensions are all 1
MAX_LISTED = 8  # layouts named by a refusal


class LayoutError(ValueError):
    """A layout that cannot be written or cannot run the job; the message is one line."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


DIMS = ("dp_replicate", "dp_shard", "cp", "ep")


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    ep: int = 1
    options: ParallelOptions = field(default_factory=ParallelOptions)  # how it moves what it shards (options.py)

    def __post_init__(self):
        for name in DIMS:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise LayoutError(f"{name} = {value!r}: must be a positive integer")
        if not isinstance(self.options, ParallelOptions):
            raise LayoutError(f"options = {self.options!r}: must be ParallelOptions")

    @property
    def sizes(self) -> "Layout":
        """This layout without its options (the sizes alone)."""
        return Layout(self.dp_replicate, self.dp_shard, self.cp, self.ep)

    @property
    def world_size(self) -> int:
        """The number of ranks: dp_replicate·dp_shard·cp (ep borrows from dp_shard·cp)."""
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def dp(self) -> int:
        """The number of data-parallel ranks, each taking a different slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    def __str__(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in DIMS if getattr(self, name) != 1]
        sizes = ",".join(parts) or SINGLE
        options = self.options.text()
        return sizes if not options else f"{sizes},{options}"

    @classmethod
    def parse(cls, text: str, options: ParallelOptions | None = None) -> "Layout":
        """The layout a text names: "dp_shard=2,ep=2" → Layout(dp_shard=2, ep=2). Comma-separated name=size pairs
        in any order, spaces tolerated, and name=value pairs of schedule options (options.py); unnamed dimensions
        are 1, unnamed options those of `options` (default: the defaults; `--mesh` passes the run file's, which the
        text then overrides option by option); "single" (alone or first) is the layout of all 1s. An unknown or
        repeated name, a size that is not a positive integer or an option value that is not one of the option's
        raises LayoutError naming the part and the names."""
        def bad(why):
            return LayoutError(f"layout {text!r}: {why}; write name=size pairs separated by commas, names "
                               f"{', '.join(DIMS)} (e.g. dp_shard=2,ep=2; or single), then any schedule options "
                               f"name=value, names {', '.join(OPTION_NAMES)}")

        if not isinstance(text, str):
            raise bad("not a string")
        parts = [p for p in text.split(",")]
        if parts and parts[0].strip() == SINGLE and all(p.partition("=")[0].strip() in OPTION_NAMES
                                                         for p in parts[1:]):
            parts = parts[1:]  # "single", then only options
        base = ParallelOptions() if options is None else options
        sizes, named = {}, {}
        for part in parts:
            name, eq, size = (s.strip() for s in part.partition("="))
            if not eq or not name:
                raise bad(f"{part.strip()!r} is not name=size")
            if name in sizes or name in named:
                raise bad(f"{name} given twice")
            if name in OPTION_NAMES:
                try:
                    named[name] = option_value(name, size)
                except OptionError as e:
                    raise bad(str(e)) from None
                continue
            if name not in DIMS:
                raise bad(f"unknown dimension {name!r}")
            if not re.fullmatch(r"[0-9]+", size) or int(size) == 0:
                raise bad(f"{name}={size}: the size must be a positive integer")
            sizes[name] = int(size)
        try:
            return cls(**sizes, options=dataclasses.replace(base, **named))
        except OptionError as e:
            raise bad(str(e)) from None

    def problems(self, *, world_size: int, config, seq_len: int, micro_batch_size: int, batch_sizes) -> list[str]:
        """Why this layout cannot run the job (the rules of the module docstring), one phrase each; [] if it can."""
        why = []
        waiting = [name for name in self.options.changed() if name in NOT_YET_RUN]
        if waiting:
            why.append(f"the schedule option(s) {', '.join(waiting)} are not run by the cluster mode yet")
        why.extend(self.options.unavailable())
        if self.world_size != world_size:
            why.append(f"dp_replicate·dp_shard·cp = {self.world_size}, but the job has {world_size} "
                       f"rank{'s' if world_size != 1 else ''}")
        if (self.dp_shard * self.cp) % self.ep:
            why.append(f"ep = {self.ep} does not divide dp_shard·cp = {self.dp_shard * self.cp}")
        if config.num_experts % self.ep:
            why.append(f"ep = {self.ep} does not divide num_experts = {config.num_experts}")
        per_step = self.dp * micro_batch_size
        bad = sorted({int(b) for b in batch_sizes if int(b) % per_step})
        if bad:
            why.append(f"sequences per step {', '.join(map(str, bad))} not divisible by dp·micro_batch_size = "
                       f"{self.dp}·{micro_batch_size} = {per_step}")
        if self.cp > 1:
            if seq_len % (2 * self.cp):
                why.append(f"seq_len = {seq_len} not divisible by 2·cp = {2 * self.cp}")
            windows = {config.window_of(layer) for layer in range(config.num_hidden_layers)} - {None}
            too_wide = [problem for w in sorted(windows) if (problem := window_problem(w, seq_len, self.cp))]
            if too_wide:
                why.append(too_wide[-1])  # the widest window that does not fit
        return why

    def check(self, *, world_size: int, config, seq_len: int, micro_batch_size: int, batch_sizes) -> None:
        """Raise LayoutError when this layout cannot run the job, naming why and the layouts that fit.

        `config` is the model's Config (num_experts, num_hidden_layers, window_of); `batch_sizes` the run's
        sequences-per-step values (the base value and every batch_schedule value).
        """
        job = dict(world_size=world_size, config=config, seq_len=seq_len, micro_batch_size=micro_batch_size,
                   batch_sizes=list(batch_sizes))
        why = self.problems(**job)
        if not why:
            return
        fits = fitting_layouts(**job)
        if fits:
            listed = "; ".join(str(x) for x in fits[:MAX_LISTED])
            more = f"; ... ({len(fits)} in all)" if len(fits) > MAX_LISTED else ""
            hint = f"layouts that fit: {listed}{more}"
        else:
            hint = f"no layout of {world_size} ranks fits this model, seq_len and batch sizes"
        raise LayoutError(f"layout {self}: {'; '.join(why)}; {hint}")


def gathers_whole_sequence(window: int | None, seq_len: int) -> bool:
    """Whether context parallel gives a layer with this attention window every chunk of the sequence: a global
    layer (None) and a window of at least seq_len, which covers every earlier token (causal attention over the whole
    sequence). A shorter window takes only its halo, the w−1 keys before each chunk, from the neighbouring chunk."""
    return window is None or window >= seq_len


def window_problem(window: int | None, seq_len: int, cp: int) -> str | None:
    """Why context parallel over `cp` ranks cannot run a layer with this window on sequences of seq_len (rule 4's
    window part), or None when it can: a halo of w−1 keys must fit in one chunk of seq_len/(2·cp) tokens."""
    if cp == 1 or gathers_whole_sequence(window, seq_len):
        return None
    chunk = seq_len // (2 * cp)
    if window - 1 <= chunk:
        return None
    return f"sliding window {window} needs {window - 1} preceding tokens but a cp chunk holds seq_len/(2·cp) = {chunk}"


def _divisors(n: int) -> list[int]:
    """The divisors of n, ascending (in O(√n) steps: the planner asks for worlds of a million ranks)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small) | {n // d for d in small})


def fitting_layouts(*, world_size: int, config, seq_len: int, micro_batch_size: int, batch_sizes) -> list[Layout]:
    """Every layout of `world_size` ranks that passes `Layout.check`, simplest first: fewest non-1 dimensions,
    then larger dp_shard, then smaller cp, then smaller ep (dp_replicate follows from the world size)."""
    if not (isinstance(world_size, int) and world_size > 0):
        raise LayoutError(f"world size {world_size!r}: must be a positive integer")
    job = dict(world_size=world_size, config=config, seq_len=seq_len, micro_batch_size=micro_batch_size,
               batch_sizes=list(batch_sizes))
    found = []
    for dp_shard in _divisors(world_size):
        for cp in _divisors(world_size // dp_shard):
            for ep in _divisors(dp_shard * cp):
                layout = Layout(world_size // (dp_shard * cp), dp_shard, cp, ep)
                if not layout.problems(**job):
                    found.append(layout)
    return sorted(found, key=lambda x: (sum(getattr(x, n) != 1 for n in DIMS), -x.dp_shard, x.cp, x.ep))

