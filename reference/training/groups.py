"""The names of the groups of ranks a training step reduces over: one vocabulary for the step, the mesh, traces
and the cost model (the rules that make each group are distributed/plan.py's).

    world         every rank (each holds different tokens)      dp_replicate   the ranks holding the same shards
    dp_shard      the ranks sharding one replica's parameters   cp             the ranks holding the same sequences
                  over the same chunk
    fsdp          the ranks of one replica (dp_shard·cp)        dp             the ranks holding different sequences
    ep            the ranks exchanging tokens for experts       efsdp          the ranks holding the same experts

In one process every group is that process alone, and a reduction over any of them is the identity; a name not in
this list is an error there too, so a misspelt group fails every test, not only the distributed ones.
"""

GROUPS = ("world", "dp_replicate", "dp_shard", "cp", "fsdp", "dp", "ep", "efsdp")


def check_group(group: str) -> str:
    """`group` if it is one of GROUPS, else a ValueError naming them."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; the groups are {', '.join(GROUPS)}")
    return group
