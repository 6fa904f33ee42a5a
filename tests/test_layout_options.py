"""Every training option under a layout, and every step statistic under context parallel, equal the single process.

1. Every optimizer, balancing and recipe option the step reads (reference/model/config.py's Recipe,
   reference/training/optim.py) under a layout with dp_replicate, dp_shard, cp and ep all > 1, so that the sharded
   Muon path (its momentum and Nesterov update, the owners' Alltoallv, an expert bucket sharded over efsdp), the
   sharded AdamW and the replicated bias update all run: three steps of a small `tiny` on virtual ranks equal the
   single process in float64 to 1e-10 relative (tests/test_layouts.py's check). tests/test_layouts.py runs one recipe
   at many layouts; this file runs many recipes at one layout, so an option that only the sharded path gets wrong
   (Nesterov's momentum taken in the wrong order, a decay applied with the adjusted lr, a clip skipped) fails here.
2. Every statistic a metrics line reports of a step (the loss parts, the gradient norm, the logits' max and mean,
   BatchHet, the expert load and MaxVio per MoE layer, the bias step, the optimizer's update norms) equals the single
   process's under cp = 2 alone and with data parallel: counts exactly, floats to 1e-12 relative. A statistic averaged
   over the wrong number of cp ranks is off by a factor of 2.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from test_layouts import _batches, _config, check_layout
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.parallel_ops import parallelize
from trinity.reference import init_params
from trinity.reference.model.ops import REFERENCE
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.step import Gradients, apply_update, compute_gradients
from trinity.simulate.virtual.virtual_comm import VirtualCluster

# One layout where every dimension is > 1: fsdp groups of 4 (sharded Muon with owners), efsdp groups of 2 (the
# experts' own sharded Muon), replicas (the dp_replicate all-reduce), cp (halos, per-sequence sums).
EVERY_DIMENSION = "dp_replicate=2,dp_shard=2,cp=2,ep=2"

# Each option of the recipe that changes what an optimizer step or a balancing step computes, away from the
# default of `_config` (SMEBU, Muon for matrices and the router, no Nesterov, dion coefficients, trinity lr
# adjustment, clip at 1.0, no decay on norms, untied embeddings). Every value of every such option appears in
# at least one case.
OPTIONS = {
    "nesterov": dict(muon_nesterov=True),
    "nesterov, low momentum": dict(muon_nesterov=True, muon_momentum=0.5),
    "no nesterov, low momentum": dict(muon_nesterov=False, muon_momentum=0.5),
    "smebu": dict(load_balancing="smebu", smebu_beta=0.9, smebu_kappa=1.0),
    "sign": dict(load_balancing="sign"),
    "sign, nesterov": dict(load_balancing="sign", muon_nesterov=True),
    "no balancing": dict(load_balancing="none", balance_loss_coeff=0.0),
    "adamw only": dict(matrix_optimizer="adamw"),
    "adamw only, sign": dict(matrix_optimizer="adamw", load_balancing="sign", adamw_beta1=0.8, adamw_beta2=0.9,
                             adamw_eps=1e-6),
    "router on adamw": dict(router_optimizer="adamw", muon_nesterov=True),
    "keller coefficients": dict(muon_ns_coefficients="keller", muon_ns_steps=3),
    "dion lr adjustment": dict(muon_lr_adjust="dion", muon_nesterov=True),
    "clipped every step": dict(grad_clip_norm=1e-3),
    "no clipping": dict(grad_clip_norm=0.0),
    "decay on norms": dict(norm_weight_decay=0.05, weight_decay=0.3),
    "tied embeddings, z-loss": dict(tie_word_embeddings=True, z_loss_coeff=1e-2),
}


def _option_config(options: dict):
    return _config(window=6, doc_mask=True, method="smebu", tied=False).replace(**options)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_under_every_dimension_equals_the_single_process(name):
    layout = Layout.parse(EVERY_DIMENSION)
    check_layout(layout, _option_config(OPTIONS[name]), S=2 * layout.dp, T=12 * layout.cp, mbs=1, seed=3)


def test_the_options_cover_every_value_of_every_choice():
    """Each choice field of the recipe that the step reads takes each of its values in some case (a new value
    added to the config without a case here fails)."""
    choices = {"load_balancing": {"smebu", "sign", "none"}, "muon_nesterov": {True, False},
               "matrix_optimizer": {"muon", "adamw"}, "router_optimizer": {"muon", "adamw"},
               "muon_ns_coefficients": {"dion", "keller"}, "muon_lr_adjust": {"trinity", "dion"},
               "tie_word_embeddings": {True, False}}
    seen = {field: {getattr(_option_config(o), field) for o in OPTIONS.values()} for field in choices}
    assert seen == choices
    assert {_option_config(o).grad_clip_norm > 0 for o in OPTIONS.values()} == {True, False}


# ---- 2. step statistics under context parallel ----------------------------------------------------------------
STEPS = 3
MICRO_BATCH = 1
LR = (2e-2, 1e-2)
RTOL = 1e-12


def _statistics(gradients: Gradients, update: dict) -> dict:
    """Everything a metrics line reports of a step (run/trainer.py's train_step), and the update norms."""
    opt = update["optimizer"]
    return {"loss": dict(gradients.losses), "grad_norm": gradients.grad_norm, "logits_max": gradients.logits_max,
            "logits_mean": gradients.logits_mean, "batch_het": gradients.batch_het, "tokens": gradients.tokens,
            "sequences": gradients.sequences,
            "expert_load": {layer: np.asarray(n).astype(np.int64).tolist() for layer, n in gradients.counts.items()},
            "max_vio": {layer: m["max_vio"] for layer, m in update["balance"].items()},
            "bias_step_rms": {layer: m["bias_step_rms"] for layer, m in update["balance"].items()},
            "muon_update_norm": opt["muon_update_norm"], "adamw_update_norm": opt["adamw_update_norm"]}


def _steps(config, params, opt, batches, ops, mesh=None) -> list[dict]:
    extra = {} if mesh is None else {"mesh": mesh}
    bal = init_balancing_state(config, params)
    out = []
    for batch in batches:
        g = compute_gradients(config, params, batch, micro_batch_size=MICRO_BATCH, ops=ops, check=False, **extra)
        out.append(_statistics(g, apply_update(config, params, opt, bal, g, *LR, ops=ops, **extra)))
    return out


def _rank_statistics(comm, layout, config, params0, batches):
    mesh = Mesh(comm, layout)
    ops, params, opt = parallelize(REFERENCE, mesh, config, params0, init_optimizer_state(config, params0))
    return _steps(config, params, opt, batches, ops, mesh)


def _assert_same(got, want, where: str) -> None:
    """Integers (counts, tokens) exactly; floats to RTOL relative; nested dicts and lists key by key."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert got == want, f"{where}: {got} != {want}"
    elif want is None or isinstance(want, (int, np.integer)):
        assert got == want, f"{where}: {got} != {want}"
    else:
        assert abs(got - want) <= RTOL * max(abs(want), 1e-300), f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("text", ["cp=2", "dp_shard=2,cp=2", "dp_replicate=2,cp=2,ep=2"])
@pytest.mark.parametrize("method", ["smebu", "sign"])
def test_every_step_statistic_under_context_parallel_is_the_single_process(text, method):
    layout = Layout.parse(text)
    config = _config(window=6, doc_mask=True, method=method, tied=False).replace(z_loss_coeff=1e-3)
    S, T = 2 * layout.dp, 24
    params0 = init_params(config, seed=5, dtype=np.float64)
    batches = _batches(config, S, T, seed=5, doc_every=7.0)
    params = {k: v.copy() for k, v in params0.items()}
    want = _steps(config, params, init_optimizer_state(config, params), batches, REFERENCE)
    assert want[0]["batch_het"] is not None and want[0]["loss"]["z"] > 0 and want[0]["loss"]["balance"] > 0
    for rank, got in enumerate(VirtualCluster(layout.world_size).run(_rank_statistics, layout, config, params0,
                                                                      batches)):
        for step, (g, w) in enumerate(zip(got, want), start=1):
            _assert_same(g, w, f"{text} rank {rank} step {step}")


def test_the_statistics_compared_are_every_one_the_step_returns():
    """A statistic added to Gradients without a place in `_statistics` fails here (grads and the per-micro-batch
    stats are not statistics of the step)."""
    fields = {f.name for f in dataclasses.fields(Gradients)} - {"grads", "stats", "losses", "counts"}
    named = set(_statistics.__code__.co_consts) | set(_statistics.__code__.co_names)
    assert fields <= named, fields - named
