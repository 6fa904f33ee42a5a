"""Kinds of bug in the cluster mode and the simulator that the rest of the suite let through (issue 18, Deliver 8),
each pinned by a property a wrong implementation breaks:

- retention in the sharded checkpoint manager keeps to its own run: two runs' sharded checkpoints in one folder;
- message checksums cover every byte of every block that travels, for every collective kind the mesh checks, and
  nothing else (a checked collective moves exactly the unchecked one's bytes);
- the link tier of a traced collective: intra-node iff every rank of its group is on one node, the groups written
  out by hand from docs/distributed.md's numbering;
- the cost model's MFU, its activation memory under cp and its halo traffic on the busiest cp rank, against hand
  calculations from docs/simulation.md and simulate/planning/traffic_model.py's notation;
- distributed Muon's owners: every matrix owned once, within its group, by the stated greedy rule, with the greedy
  balance bound (the busiest owner's Newton–Schulz work is at most the idlest's plus the largest matrix's).
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trinity.distributed.checksums import CRC_BYTES, ChecksumError
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import GROUPS, Mesh, group_members
from trinity.reference import Config
from trinity.simulate.virtual.virtual_comm import RankFailed, VirtualCluster


# ---- retention of sharded checkpoints keeps to its run ---------------------------------------------------------
def _save_sharded_steps(directory, run_id, steps, keep_last):
    """Save `steps` as sharded checkpoints of run `run_id` (dp_shard=2 on virtual ranks) with keep_last."""
    from test_sharded_checkpoint import COMMON, OPT, PARAMS, shard
    from trinity.distributed.sharded_checkpoint import ShardedCheckpointManager
    common = {k: v for k, v in COMMON.items() if k != "run_id"}

    def rank(comm):
        mesh = Mesh(comm, Layout(dp_shard=2))
        sharded, state = shard(mesh, PARAMS, OPT)
        manager = ShardedCheckpointManager(directory, keep_last=keep_last, run_id=run_id)
        return [manager.save_sharded(step, mesh, sharded, state, **common) for step in steps]
    return VirtualCluster(2, timeout=60.0).run(rank)[0]


def test_sharded_retention_removes_only_this_runs_old_checkpoints(tmp_path):
    """Run "other" left three sharded checkpoints (and keeps all); run "mine" saves four with keep_last=2, its steps
    interleaved with the other's: only mine beyond the newest two go, every one of the other run's stays, files and
    all. Then the other run saves again with keep_last=1 and removes only its own."""
    from trinity.distributed.sharded_checkpoint import ShardedCheckpointManager, read_manifest
    foreign = _save_sharded_steps(tmp_path, "other", [2, 4, 6], keep_last=None)
    mine = _save_sharded_steps(tmp_path, "mine", [1, 3, 5, 7], keep_last=2)
    listed = ShardedCheckpointManager(tmp_path).list()
    assert sorted(listed) == sorted(foreign + mine[-2:])
    for path in foreign:
        assert read_manifest(path)["run_id"] == "other" and len(os.listdir(path)) == 3  # manifest + 2 rank files
    newer = _save_sharded_steps(tmp_path, "other", [8], keep_last=1)
    assert sorted(ShardedCheckpointManager(tmp_path).list()) == sorted(mine[-2:] + newer)
    assert {read_manifest(p)["run_id"] for p in mine[-2:]} == {"mine"}


# ---- message checksums: every byte of every block, and only those ----------------------------------------------
class _FlippingComm:
    """A communicator that delivers one byte flipped, as a faulty link would: after the `call`-th data-moving call
    (counted from 0 on this rank) the byte `pos` of what `receiver` got from `sender` is XORed with 0xFF. The byte
    counts from the start of that sender's block as it arrived (data then crc32, for a checked call)."""

    def __init__(self, comm, flip: dict | None):
        self.comm, self.flip, self.calls = comm, flip, 0

    def Get_size(self):
        return self.comm.Get_size()

    def Get_rank(self):
        return self.comm.Get_rank()

    def Set_name(self, name):
        self.comm.Set_name(name)

    def Split(self, color, key):
        return _FlippingComm(self.comm.Split(color, key), self.flip)

    def _region(self, recv, sender: int, counts=None) -> np.ndarray:
        """The bytes of recv that came from `sender` (a flat uint8 view)."""
        if counts is None:
            arr = np.asarray(recv)
            return arr.reshape(self.Get_size(), -1)[sender].view(np.uint8).reshape(-1)
        arr, (c, d) = np.asarray(recv), counts
        item = arr.dtype.itemsize
        return arr.reshape(-1).view(np.uint8)[d[sender] * item:(d[sender] + c[sender]) * item]

    def _maybe_flip(self, recv, counts=None) -> None:
        f, call = self.flip, self.calls
        self.calls += 1
        if f and f["call"] == call and f["receiver"] == self.Get_rank():
            region = self._region(recv, f["sender"], counts)
            f["size"] = region.size
            if f["pos"] < region.size:
                region[f["pos"]] ^= 0xFF
                f["done"] = True

    def Allgather(self, send, recv):
        self.comm.Allgather(send, recv)
        self._maybe_flip(recv)

    def Alltoall(self, send, recv):
        self.comm.Alltoall(send, recv)
        self._maybe_flip(recv)

    def Alltoallv(self, send, recv):
        self.comm.Alltoallv(send, recv)
        self._maybe_flip(recv[0], recv[1])

    def Iallgather(self, send, recv):
        request, outer = self.comm.Iallgather(send, recv), self

        class _Flipped:
            def Wait(self, status=None):
                request.Wait()
                outer._maybe_flip(recv)
        return _Flipped()


N = 3
ELEMENTS = 3  # float64 elements per block


def _call(mesh, kind: str):
    """One mesh collective of `kind` over the world on distinct small data; returns what it delivered."""
    r = mesh.rank
    base = np.arange(N * ELEMENTS, dtype=np.float64) + 100.0 * r + 0.25
    if kind in ("Allreduce", "Reduce_scatter_block"):
        recv = np.empty(ELEMENTS if kind == "Reduce_scatter_block" else N * ELEMENTS)
        mesh.collective(kind, "world", base, recv)
        return recv
    if kind in ("Allgather", "Iallgather"):
        recv = np.empty(N * ELEMENTS)
        request = mesh.collective(kind, "world", base[:ELEMENTS].copy(), recv)
        if kind == "Iallgather":
            request.Wait()
        return recv
    if kind == "Alltoall":
        recv = np.empty(N * ELEMENTS)
        mesh.collective(kind, "world", base, recv)
        return recv
    # Alltoallv with gaps: rank r sends j+1 elements to rank j from displacement 4·j of a buffer whose other
    # elements (never sent) are NaN, and receives into a buffer whose unfilled elements must keep their -7
    counts = np.arange(1, N + 1, dtype=np.int64)
    send = np.full(4 * N, np.nan)
    sdispl = 4 * np.arange(N, dtype=np.int64)
    for j in range(N):
        send[sdispl[j]:sdispl[j] + counts[j]] = base[:counts[j]] + j
    rcounts = np.full(N, r + 1, dtype=np.int64)
    rdispl = 5 * np.arange(N, dtype=np.int64)
    recv = np.full(5 * N, -7.0)
    mesh.collective(kind, "world", [send, (counts, sdispl)], [recv, (rcounts, rdispl)],
                    sent_bytes=8 * int(counts.sum() - counts[r]))
    return recv


CHECKED_KINDS = ("Allreduce", "Reduce_scatter_block", "Allgather", "Iallgather", "Alltoall", "Alltoallv")


def _run_checked(kind: str, checksums: bool, flip: dict | None = None):
    def rank(comm):
        return _call(Mesh(_FlippingComm(comm, flip), Layout(dp_shard=N), checksums=checksums), kind)
    return VirtualCluster(N, timeout=30.0).run(rank)


def _inner_calls(kind: str) -> int:
    return 2 if kind == "Allreduce" else 1  # an all-reduce moves an Alltoall and an Allgather


def _block_bytes(kind: str, sender: int, receiver: int, call: int) -> int:
    """Data bytes one block from `sender` carries to `receiver` in the `call`-th inner call of `kind` (3 ranks)."""
    if kind == "Alltoallv":
        return 8 * (receiver + 1)
    return 8 * ELEMENTS


@pytest.mark.parametrize("kind", CHECKED_KINDS)
def test_every_byte_of_every_block_that_travels_is_checked(kind):
    """For every inner call, ordered pair of ranks and byte of the block as it arrives (its data and its crc32): the
    flipped byte stops the receiver with a ChecksumError naming the sender and the receiver."""
    for call, sender, receiver in itertools.product(range(_inner_calls(kind)), range(N), range(N)):
        if sender == receiver:
            continue
        for pos in range(_block_bytes(kind, sender, receiver, call) + CRC_BYTES):
            flip = {"call": call, "sender": sender, "receiver": receiver, "pos": pos}
            with pytest.raises(RankFailed) as failed:
                _run_checked(kind, checksums=True, flip=flip)
            assert flip.get("done") and flip["size"] == _block_bytes(kind, sender, receiver, call) + CRC_BYTES, flip
            cause = failed.value.__cause__
            assert isinstance(cause, ChecksumError), (flip, failed.value)
            assert f"from rank {sender} to rank {receiver} in {kind}" in str(cause), (flip, str(cause))


@pytest.mark.parametrize("kind", CHECKED_KINDS)
def test_a_checked_collective_delivers_exactly_the_unchecked_ones_bytes(kind):
    """Checksums cover the blocks and nothing else: without a fault a checked call delivers the unchecked call's
    bits, the elements of a send buffer outside its counts (NaN here) travel nowhere, and a receive buffer's elements
    outside its counts keep what they held."""
    plain, checked = _run_checked(kind, checksums=False), _run_checked(kind, checksums=True)
    for a, b in zip(checked, plain):
        assert a.tobytes() == b.tobytes()
        assert not np.isnan(a).any()
    if kind == "Alltoallv":
        for r, got in enumerate(checked):
            outside = np.ones(got.size, dtype=bool)
            for j in range(N):
                outside[5 * j:5 * j + r + 1] = False
            assert (got[outside] == -7.0).all()


def test_the_byte_flipper_reaches_every_byte_without_checksums():
    """The fault is real: unchecked, a flipped data byte arrives as a different value and nothing notices."""
    flip = {"call": 0, "sender": 2, "receiver": 0, "pos": 7}
    plain, flipped = _run_checked("Alltoall", checksums=False), _run_checked("Alltoall", False, flip)
    assert flip.get("done") and plain[0].tobytes() != flipped[0].tobytes()
    assert [a.tobytes() for a in plain[1:]] == [a.tobytes() for a in flipped[1:]]


# ---- link tiers of traced collectives ---------------------------------------------------------------------------
def _hand_members(layout: Layout) -> dict:
    """{group name: {rank: the world ranks of its group, sorted}}, from docs/distributed.md: rank =
    (replica·dp_shard + shard)·cp + chunk, f = shard·cp + chunk, ep rank f mod ep; each group is the ranks that share
    what the table says."""
    L = layout
    coords = {}
    for replica, shard, chunk in itertools.product(range(L.dp_replicate), range(L.dp_shard), range(L.cp)):
        f = shard * L.cp + chunk
        coords[(replica * L.dp_shard + shard) * L.cp + chunk] = dict(replica=replica, shard=shard, chunk=chunk, f=f)
    shares = {"world": lambda c: 0, "dp_replicate": lambda c: (c["shard"], c["chunk"]),
              "dp_shard": lambda c: (c["replica"], c["chunk"]), "cp": lambda c: (c["replica"], c["shard"]),
              "fsdp": lambda c: c["replica"], "dp": lambda c: c["chunk"],
              "ep": lambda c: (c["replica"], c["f"] // L.ep), "efsdp": lambda c: (c["replica"], c["f"] % L.ep)}
    out = {}
    for name, key in shares.items():
        groups: dict = {}
        for rank in sorted(coords):
            groups.setdefault(key(coords[rank]), []).append(rank)
        out[name] = {rank: g for g in groups.values() for rank in g}
    return out


def _hand_tier(ranks, ranks_per_node: int) -> str:
    nodes = {r // ranks_per_node for r in ranks}
    return "intra-node" if len(nodes) == 1 else "inter-node"


TIER_LAYOUTS = ["dp_replicate=2,dp_shard=2,cp=2,ep=2", "dp_shard=4,ep=2", "dp_replicate=2,dp_shard=4,ep=4",
                "dp_replicate=4,cp=2", "dp_shard=2,cp=4,ep=4", "dp_replicate=3,dp_shard=2"]


@pytest.mark.parametrize("text", TIER_LAYOUTS)
def test_a_trace_puts_each_collective_on_the_tier_of_its_groups_nodes(text):
    """Each rank calls one counted Allreduce per group on its Mesh (recording); summarise's by_tier, for several
    ranks per node, is the bytes of the calls whose hand-computed group lies on one node; each event names the
    hand-computed group's ranks; and the cost model's tier of a group (rank 0's) is the same rule."""
    from trinity.simulate.planning.cost_model import link_tier as model_tier
    from trinity.simulate.virtual.traces import link_tier, summarise
    layout = Layout.parse(text)
    hand = _hand_members(layout)

    def rank(comm):
        mesh = Mesh(comm, layout)
        mesh.record = True
        mesh.begin_step(1)
        for i, name in enumerate(GROUPS):
            if mesh.group_size[name] > 1:
                mesh.collective("Allreduce", name, np.full(4 * (i + 1), 1.0), np.empty(4 * (i + 1)))
        return mesh.events
    events = VirtualCluster(layout.world_size, timeout=60.0).run(rank)
    for r, evs in enumerate(events):
        assert [e["ranks"] for e in evs] == [hand[e["group"]][r] for e in evs]
    for per_node in (1, 2, 3, 4, 8, layout.world_size):
        want = {"intra-node": 0, "inter-node": 0}
        for r, evs in enumerate(events):
            for e in evs:
                want[_hand_tier(hand[e["group"]][r], per_node)] += e["bytes"]
                assert link_tier(e["ranks"], per_node) == _hand_tier(hand[e["group"]][r], per_node)
        got = summarise(events, per_node)["steps"][0]["by_tier"]
        assert {k: got.get(k, 0) for k in want} == want, (per_node, got, want)
        for name in GROUPS:
            assert model_tier(layout, name, per_node) == _hand_tier(hand[name][0], per_node), (name, per_node)
    assert sum(want.values()) > 0


def test_hand_tiers_of_named_groups():
    """Written out: 8 ranks of dp_replicate=2,dp_shard=2,cp=2,ep=2 on nodes of 2 and of 4."""
    from trinity.simulate.virtual.traces import link_tier
    layout = Layout.parse("dp_replicate=2,dp_shard=2,cp=2,ep=2")
    # (group, rank) -> its ranks, from docs/distributed.md's table for this layout
    table = {("cp", 2): [2, 3], ("ep", 5): [4, 5], ("fsdp", 6): [4, 5, 6, 7], ("dp", 1): [1, 3, 5, 7],
             ("efsdp", 3): [1, 3], ("dp_replicate", 2): [2, 6], ("dp_shard", 4): [4, 6]}
    tiers = {2: {"cp": "intra-node", "ep": "intra-node", "fsdp": "inter-node", "dp": "inter-node",
                 "efsdp": "inter-node", "dp_replicate": "inter-node", "dp_shard": "inter-node"},
             4: {"cp": "intra-node", "ep": "intra-node", "fsdp": "intra-node", "dp": "inter-node",
                 "efsdp": "intra-node", "dp_replicate": "inter-node", "dp_shard": "intra-node"}}
    for (name, rank), ranks in table.items():
        assert group_members(layout, name, rank) == ranks
        for per_node, want in tiers.items():
            assert link_tier(ranks, per_node) == want[name], (name, per_node)


# ---- the cost model against hand calculations -------------------------------------------------------------------
def _cost_config():
    return Config.preset("tiny").replace(num_hidden_layers=4, sliding_window=6, num_experts=8, num_experts_per_tok=2,
                                         num_dense_layers=1)


def _hand_forward_flops_per_token(c, T: int) -> float:
    """docs/simulation.md's MFU numerator per token, written out: products only; attention 4·h_q·d_h per visible
    key (the causal mean over positions of min(t+1, w)); MoE layers: router 2·d·E, K routed experts and the shared
    one 3 products of 2·d·I each; dense layers 3 products of 2·d·I; the head 2·d·V."""
    d = c.hidden_size
    total = 2.0 * d * c.vocab_size
    for layer in range(c.num_hidden_layers):
        w = c.sliding_window if c.layer_types[layer] == "sliding_attention" else T
        keys = sum(min(t + 1, w) for t in range(T)) / T
        h_q, h_kv, d_h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        total += 2 * d * (3 * h_q * d_h + 2 * h_kv * d_h) + 4 * h_q * d_h * keys
        if layer >= c.num_dense_layers:
            total += 2 * d * c.num_experts + 3 * 2 * d * c.moe_intermediate_size * (
                c.num_experts_per_tok + c.num_shared_experts)
        else:
            total += 3 * 2 * d * c.intermediate_size
    return total


@pytest.mark.parametrize("text", ["single", "dp_shard=4", "cp=2", "dp_shard=2,cp=2,ep=2",
                                  "dp_replicate=2,dp_shard=2,cp=2,ep=4"])
def test_mfu_is_the_training_flops_over_step_time_gpus_and_peak(text):
    from trinity.simulate.planning.cost_model import predict
    from trinity.simulate.planning.hardware import get_hardware
    c, hw, layout = _cost_config(), get_hardware("h100"), Layout.parse(text)
    assert set(c.layer_types) == {"sliding_attention", "full_attention"}
    S, T = 16, 64
    p = predict(c, layout, hw, seq_len=T, sequences=S, micro_batch_size=1)
    want = 3 * _hand_forward_flops_per_token(c, T) * S * T / (p.step_seconds * layout.world_size * 989e12)
    assert p.mfu == pytest.approx(want, rel=1e-12)


def _hand_activation_bytes(c, B, tokens, recompute):
    from trinity.reference.training.memory import estimate_step_bytes
    e = estimate_step_bytes(c, B, tokens, np.float16, recompute)
    return e["activations"] + e["logits"] + e["workspace"]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("text", ["cp=2", "cp=4", "dp_shard=2,cp=2,ep=2", "dp_replicate=2,cp=4"])
def test_activation_memory_under_cp_is_one_micro_batch_at_t_over_cp_tokens(text, recompute):
    """docs/simulation.md: one micro-batch's activations at T/cp tokens (reference/training/memory.py's count, bf16
    elements) whatever the other dimensions; so under cp they are less than one process's at T."""
    from trinity.simulate.planning.cost_model import predict
    from trinity.simulate.planning.hardware import get_hardware
    c, layout, T, B = _cost_config(), Layout.parse(text), 64, 2
    p = predict(c, layout, get_hardware("h100"), seq_len=T, sequences=8 * layout.dp, micro_batch_size=B,
                recompute=recompute)
    assert p.memory["activations"] == _hand_activation_bytes(c, B, T // layout.cp, recompute)
    assert p.memory["activations"] < _hand_activation_bytes(c, B, T, recompute)


def _halos_sent(cp: int) -> list[int]:
    """Halos each cp rank sends per sliding layer, from the chunk rule: rank r holds chunks r and 2·cp−1−r; chunk
    k > 0 needs the tail of chunk k−1, sent by its holder when that is another rank."""
    holder = {k: min(k, 2 * cp - 1 - k) for k in range(2 * cp)}
    sent = [0] * cp
    for k in range(1, 2 * cp):
        if holder[k - 1] != holder[k]:
            sent[holder[k - 1]] += 1
    return sent


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("recompute", [False, True])
def test_halo_traffic_of_the_busiest_cp_rank(cp, recompute):
    """The sliding layers' Alltoallv over cp, bytes leaving the busiest rank: per micro-batch and sliding layer, its
    halos of h = w−1 positions each carry k and v (2·B·h_kv·d_h elements of 2 bytes per position) and the doc ids
    (B int64 per position) in every forward (twice under recompute), and their gradients (k and v) once."""
    from trinity.simulate.planning.traffic_model import Itemsizes, step_collectives
    c = _cost_config()
    layout, T, B, S = Layout(cp=cp), 48, 2, 4
    m = S // (layout.dp * B)
    sliding = sum(c.layer_types[layer] == "sliding_attention" for layer in range(c.num_hidden_layers))
    h, kv = c.sliding_window - 1, 2 * B * c.num_key_value_heads * c.head_dim * 2
    forwards = 2 if recompute else 1
    per_halo = h * (forwards * (kv + 8 * B) + kv)
    want = m * sliding * max(_halos_sent(cp)) * per_halo
    cols = [col for col in step_collectives(c, layout, S, T, B, Itemsizes(gather=2, reduce=4, act=2),
                                            recompute=recompute) if (col.kind, col.group) == ("Alltoallv", "cp")]
    assert len(cols) == 1 and cols[0].rank_bytes == pytest.approx(want, rel=1e-12)
    assert cols[0].total_bytes == pytest.approx(m * sliding * sum(_halos_sent(cp)) * per_halo, rel=1e-12)


def test_the_hand_halo_rule_matches_the_docs_picture():
    """cp = 3: chunks held r0 r1 r2 r2 r1 r0; rank 1 sends two halos (to 2 and to 0), ranks 0 and 2 one each."""
    assert _halos_sent(2) == [1, 1] and _halos_sent(3) == [1, 2, 1] and _halos_sent(4) == [1, 2, 2, 1]


# ---- distributed Muon's owners ----------------------------------------------------------------------------------
def _work(shape) -> int:
    rows, cols = shape
    return rows * cols * min(rows, cols)


def _documented_owners(shapes, n: int) -> list[int]:
    """The rule as stated (sharded_optim, docs/distributed.md), written plainly: the matrices (a stacked [E, o, i]
    is E) in flat order; the largest out·in·min(out, in) first, ties by position; each to the rank with the least
    work so far, ties to the lowest rank."""
    matrices = [tuple(s[-2:]) for s in shapes for _ in range(math.prod(s[:-2]))]
    order = sorted(range(len(matrices)), key=lambda i: (-_work(matrices[i]), i))
    loads, owner = [0] * n, [0] * len(matrices)
    for i in order:
        r = min(range(n), key=lambda q: (loads[q], q))
        owner[i] = r
        loads[r] += _work(matrices[i])
    return owner


def _check_owners(shapes, n: int) -> None:
    from trinity.distributed.sharded_optim import owners_of
    got = owners_of(tuple(tuple(s) for s in shapes), n)
    matrices = [tuple(s[-2:]) for s in shapes for _ in range(math.prod(s[:-2]))]
    # every matrix once, end to end in flat order, with its shape
    assert [g[3] for g in got] == matrices
    at = 0
    for lo, hi, _, (rows, cols) in got:
        assert (lo, hi) == (at, at + rows * cols)
        at = hi
    owners = [g[2] for g in got]
    assert all(0 <= o < n for o in owners)  # within the group
    loads = np.zeros(n, dtype=np.int64)
    for o, m in zip(owners, matrices):
        loads[o] += _work(m)
    assert loads.max() <= loads.min() + max(_work(m) for m in matrices), loads  # the greedy bound
    assert owners == _documented_owners(shapes, n)


shape_lists = st.lists(st.one_of(
    st.tuples(st.integers(1, 48), st.integers(1, 48)),
    st.tuples(st.integers(1, 6), st.integers(1, 32), st.integers(1, 32))), min_size=1, max_size=12)


@given(shape_lists, st.integers(1, 9))
def test_owners_of_drawn_buckets_balance_by_the_stated_rule(shapes, n):
    _check_owners(shapes, n)


@pytest.mark.parametrize("text", ["dp_shard=2", "dp_shard=4,ep=2", "dp_shard=2,cp=2,ep=4", "dp_shard=8,ep=8",
                                  "dp_replicate=2,dp_shard=3"])
@pytest.mark.parametrize("preset", ["tiny", "bench-medium"])
def test_owners_of_every_muon_bucket_of_a_layout(text, preset):
    """The real buckets: every Muon flat bucket of the layout (dense ones over fsdp, experts over efsdp)."""
    from trinity.simulate.planning.traffic_model import flat_buckets, group_sizes
    config, layout = Config.preset(preset), Layout.parse(text)
    if config.num_experts % layout.ep:
        pytest.skip("ep does not divide the experts")
    sizes = group_sizes(layout)
    checked = 0
    for parts in flat_buckets(config, layout.ep).values():
        for group, optimizer, shapes in parts:
            if optimizer == "muon":
                _check_owners([tuple(int(x) for x in s) for s in shapes], sizes[group])
                checked += 1
    assert checked > 0
