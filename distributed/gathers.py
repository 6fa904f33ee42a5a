"""FSDP's gather rules, stated once: which gathered flat buckets a rank holds through a step, and what each seam call
gathers, under the schedule options (options.py). Pure (no communicator): fsdp.ShardedParamSeams executes these
rules, schedule._MicroBatches lists the collectives they call, rank_memory counts what they hold.

Gather order of a micro-batch (`gather_order`): forward embed, layers 0…L−1, head (and embed again when tied to the
head), backward head (embed), layers L−1…0. Every flat bucket (plan.FlatBucket) has a kind: "experts" (the routed
experts, sharded over efsdp) or "dense" (the rest, over fsdp). `Holding` follows the model's seam calls:

    gather(b)     b's flat buckets neither held nor posted are posted now (Iallgather, one per flat bucket in plan
                  order) and every one not held is waited for; b's flat buckets are then held. After it the next
                  model bucket of the order has its flat buckets neither held nor posted posted (prefetch); nothing
                  is posted past the end of the order (a micro-batch's parameters may change at the update)
    release(b)    b's flat buckets are dropped, except
                    kept ones (keep_gathered): held from their first gather in a step until the step's end;
                    those of a kind that reshard_after_forward leaves gathered, while b is gathered again later in
                    the micro-batch's order (a forward's release keeps them for the backward: one gather per
                    micro-batch instead of two; the untied embedding is gathered once and always dropped)
    end_forward   a forward no backward follows ended (evaluation): every held bucket is dropped (kept ones too:
                  an evaluation keeps nothing across its micro-batches), the order restarts
    end_step      the step's micro-batches ended: the kept buckets are dropped (before the update changes them)

Kept buckets (`kept_gathered`): the flat buckets of the kinds keep_gathered names, of groups of more than one rank,
in plan order (embed, layers 0…L−1, head: the order of their first gathers), each while its gathered bytes (padded
elements × the itemsize the model computes with) fit in what is left of keep_gathered_gib GiB (0: no limit); one that
does not fit is not kept, and a later smaller one may still be.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from .plan import ParallelPlan

__all__ = ["gather_order", "FlatRef", "flat_refs", "bucket_kind", "kept_gathered", "Holding", "GIB"]

GIB = 1 << 30


def gather_order(config) -> tuple[list, int]:
    """(the model buckets a micro-batch gathers, in order; how many of them are the forward's)."""
    L = config.num_hidden_layers
    tied = ["embed"] if config.tie_word_embeddings else []
    return ["embed", *range(L), "head", *tied, "head", *tied, *reversed(range(L))], L + 2 + len(tied)


def bucket_kind(group: str) -> str:
    """"experts" for a routed-expert flat bucket (sharded over efsdp), else "dense"."""
    return "experts" if group == "efsdp" else "dense"


class FlatRef(NamedTuple):
    """A flat bucket as every rank of a layout has it (only which shard a rank holds differs)."""
    name: str
    model_bucket: object
    group: str
    optimizer: str
    n: int
    shard: int  # elements of a shard
    shapes: tuple

    @property
    def padded(self) -> int:
        return self.n * self.shard

    @property
    def kind(self) -> str:
        return bucket_kind(self.group)


@functools.lru_cache(maxsize=256)
def flat_refs(config, layout) -> tuple:
    """The plan's flat buckets, in plan order (cached: do not modify)."""
    return tuple(FlatRef(b.name, b.model_bucket, b.group, b.optimizer, b.n, b.shard_size,
                         tuple(tuple(int(x) for x in s) for s in b.shapes))
                 for b in ParallelPlan(config, layout.sizes).buckets(0))


def kept_gathered(refs, options, itemsize: int) -> frozenset:
    """The names of the flat buckets kept gathered across a step's micro-batches (module docstring)."""
    budget = options.keep_gathered_gib * GIB
    kept, spent = set(), 0
    for f in refs:
        if f.n == 1 or not options.keeps(f.kind):
            continue
        cost = f.padded * itemsize
        if budget and spent + cost > budget:
            continue
        kept.add(f.name)
        spent += cost
    return frozenset(kept)


class Holding:
    """The flat buckets a rank holds gathered and has posted, through the seam calls of its steps (module
    docstring). `refs`: flat_refs; `itemsize`: bytes per element of a gathered buffer (the budget's)."""

    def __init__(self, config, refs, options, itemsize: int):
        self.order, self.forward_gathers = gather_order(config)
        self.options = options
        self.by_model: dict = {}
        for f in refs:
            self.by_model.setdefault(f.model_bucket, []).append(f)
        self.kept = kept_gathered(refs, options, itemsize)
        self.held: set = set()
        self.posted: set = set()
        self.at = 0  # where the next gather is looked for in the order
        self.after = 0  # the order position after the last gather (what a release looks past)

    def place(self, bucket):
        """Where this gather of `bucket` falls in a micro-batch's order (the next occurrence from the current
        position; None for a bucket outside the order)."""
        seq = self.order
        at = next((i for i in range(self.at, len(seq)) if seq[i] == bucket), None)
        return seq.index(bucket) if at is None and bucket in seq else at

    def gather(self, bucket):
        """(phase "forward" | "backward" | None, flat buckets of `bucket` to post now, those to wait for (posted
        now or earlier), those of the next bucket to post after)."""
        at = self.place(bucket)
        phase = None if at is None else ("forward" if at < self.forward_gathers else "backward")
        missing = [f for f in self.by_model.get(bucket, []) if f.name not in self.held]
        now = [f for f in missing if f.name not in self.posted]
        self.held.update(f.name for f in missing)
        self.posted.difference_update(f.name for f in missing)
        prefetch = []
        if at is not None:
            self.at = self.after = at + 1
            if self.at < len(self.order):
                prefetch = [f for f in self.by_model.get(self.order[self.at], [])
                            if f.name not in self.held and f.name not in self.posted]
                self.posted.update(f.name for f in prefetch)
            else:
                self.at = 0  # the micro-batch is done: the next gather starts a new one
        return phase, now, missing, prefetch

    def release(self, bucket) -> list:
        """The flat buckets of `bucket` dropped now."""
        again = bucket in self.order[self.after:]
        dropped = []
        for f in self.by_model.get(bucket, []):
            if f.name not in self.held or f.name in self.kept or (again and not self.options.reshards(f.kind)):
                continue
            self.held.discard(f.name)
            dropped.append(f)
        return dropped

    def hand_back(self, bucket) -> None:
        if bucket == "embed":
            self.at = 0

    def end_forward(self) -> list:
        """Every held flat bucket's name, dropped (nothing may be posted: RuntimeError)."""
        if self.posted:
            raise RuntimeError(f"end_forward: buckets {sorted(self.posted)} are still in flight")
        self.at = self.after = 0
        dropped, self.held = sorted(self.held), set()
        return dropped

    def end_step(self) -> list:
        """The kept flat buckets' names, dropped (the step's micro-batches ended)."""
        if self.posted or self.held - self.kept:
            raise RuntimeError(f"the step's micro-batches ended with buckets {sorted(self.posted | self.held)} "
                               f"gathered or in flight")
        self.at = self.after = 0
        dropped, self.held = sorted(self.held), set()
        return dropped

    def settled(self) -> bool:
        """Whether a micro-batch left only the kept buckets held, nothing posted, and the order at its start."""
        return not self.posted and self.held <= self.kept and self.at == 0
