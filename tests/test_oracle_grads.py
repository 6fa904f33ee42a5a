"""Gradient conformance against torch autograd through Hugging Face's AfmoeForCausalLM (SPEC §3.4, §4, §5).

The oracle is tests/hf_oracle.py's model: transformers' AfmoeForCausalLM in float64 with its float32 islands lifted,
eager attention and eager experts, loaded with our params. Its loss is computed here in float64 from its logits
(HF's own loss upcasts with `.float()`, i.e. to float32), with our semantics: labels shifted inside (logits[:, :-1]
predict labels[:, 1:]), −100 ignored, mean over the counted tokens (0 when none count). torch autograd then gives
the gradient of every parameter, compared with `trinity.reference.loss_and_grads`:

    per gradient tensor:  max|ours − torch| ≤ 1e-9 · max(max|ours|, 1e-5 · G)     G = max over all of |ours|
    loss:                 |ours − torch| ≤ 1e-12 · |ours|
    no counted token:     loss 0 and every gradient 0 on our side; torch's ≤ 1e-12

The floor 1e-5·G is for gradients that are zero in exact arithmetic but not in floating point, where a relative
error means nothing: the router gate with K = 1 (g_k = ρ whatever the scores), Q/K projections and q/k norms of a
layer whose window is 1 (softmax over one key), experts only reached through cancelling sums. There both sides hold
rounding noise of ~1e-17·G to ~2e-16·G that disagrees in every digit; the floor allows 1e-14·G absolute.

Layout: HF v5 holds the routed experts fused in memory (`gate_up_proj` [E, 2·I_m, d] = gate rows then up rows,
`down_proj` [E, d, I_m]); they are split here per expert and compared with our gradients converted to the HF
per-expert layout by `to_hf_state_dict`. Tied embeddings: HF's embedding gradient includes the head's contribution,
as ours does. expert_bias is not trained by gradient: ours are zeros, HF's parameter has requires_grad False. It is
float32 in our params in every model dtype (docs/decisions.md #18), so the random params get a float32 bias; HF holds
it in float32 (transformers ≥ 5.24, `_keep_in_fp32_modules_strict`) or in the model's float64 (5.23), with the same
values either way.

z-loss and the balance loss are off (HF has neither; their gradients are checked by finite differences in
test_gradients.py), and there are no doc_ids (HF has no intra-document mask). Draws whose top-k boundary gap of
s + b (from our float64 forward) is below 1e-6 for any token and MoE layer are rejected: there, rounding may flip
the selection and the two sides would differentiate different functions.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings, target
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/hf_oracle.py, strategies.py
import hf_oracle as O  # noqa: E402  (needs torch and transformers)
from strategies import min_topk_gap, random_params, small_configs, token_batches  # noqa: E402

from trinity.reference import loss_and_grads, model_forward, to_hf_state_dict  # noqa: E402
from trinity.reference.model.config import Config  # noqa: E402

pytestmark = [pytest.mark.oracle,  # HF builds 0-width shared experts when num_shared_experts = 0:
              pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")]

GRAD_TOL = 1e-9  # max abs error / max |our gradient|, per tensor
FLOOR = 1e-5  # ... with max |our gradient| floored at FLOOR × the largest |gradient| of the whole model
ZERO_TOL = 1e-12  # absolute, for torch's gradients when ours are all zero (no counted token)
LOSS_TOL = 1e-12  # relative
MIN_GAP = 1e-6
STATS: dict = {"grad": 0.0, "grad_key": "", "loss": 0.0, "examples": 0, "tensors": 0, "floored": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if STATS["examples"]:
        print(f"\n[oracle grads] {STATS['examples']} examples, {STATS['tensors']} gradient tensors "
              f"({STATS['floored']} below {FLOOR:.0e} of the largest); max relative error vs torch autograd (float64): "
              f"gradients {STATS['grad']:.2e} ({STATS['grad_key']}), loss {STATS['loss']:.2e}")


def torch_loss(logits, labels) -> "torch.Tensor":
    """Causal-LM cross-entropy in the logits' dtype: shift inside, −100 ignored, mean over counted tokens."""
    z = logits[:, :-1]
    target = torch.as_tensor(np.asarray(labels, dtype=np.int64))[:, 1:]
    valid = target != -100
    n = int(valid.sum())
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(-1, torch.where(valid, target, 0)[..., None])[..., 0]
    return torch.where(valid, lse - picked, torch.zeros_like(lse)).sum() / max(n, 1)


def hf_loss_and_grads(config: Config, params: dict, tokens, labels):
    """(loss, grads keyed like `to_hf_state_dict` output, i.e. the HF per-expert layout) from torch autograd."""
    model = O.hf_model_from_params(config, params)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    named = dict(model.named_parameters())
    for name, p in named.items():
        if name.endswith("expert_bias"):  # float32 in transformers ≥ 5.24 (and ours), float64 in 5.23: same values
            assert p.dtype == O.hf_bias_dtype(model, torch.float64), name
            np.testing.assert_array_equal(p.detach().numpy(), params[name], err_msg=name)
        else:
            assert p.dtype == torch.float64, name
        assert p.requires_grad == (not name.endswith("expert_bias")), name  # HF: expert_bias requires_grad=False
    with O.lifted(), torch.enable_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, dtype=np.int64)), use_cache=False)
        assert out.logits.dtype == torch.float64
        loss = torch_loss(out.logits, labels)
        loss.backward()

    I = config.moe_intermediate_size
    grads = {}
    for name, p in named.items():
        if name.endswith("expert_bias"):
            assert p.grad is None or not p.grad.any(), name
            continue
        if p.numel() == 0:  # 0-width shared experts when num_shared_experts = 0
            assert config.num_shared_experts == 0 and ".shared_experts." in name, name
            continue
        g = p.grad
        assert g is not None, f"{name}: no gradient"
        g = g.numpy()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            assert g.shape == (config.num_experts, 2 * I, config.hidden_size)
            for e in range(config.num_experts):
                grads[f"{prefix}{e}.gate_proj.weight"] = g[e, :I]
                grads[f"{prefix}{e}.up_proj.weight"] = g[e, I:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            assert g.shape == (config.num_experts, config.hidden_size, I)
            for e in range(config.num_experts):
                grads[f"{prefix}{e}.down_proj.weight"] = g[e]
        else:
            grads[name] = g
    return float(loss.detach()), grads


@st.composite
def cases(draw):
    """A small config (d ≤ 32, V ≤ 48, L ≤ 4, T ≤ 12), random-weight scales, tokens and labels (some −100)."""
    config = draw(small_configs(max_layers=4, max_hidden=32, max_vocab=48,
                                z_loss_coeff=0.0, balance_loss_coeff=0.0, intra_document_mask=False))
    tokens, labels, _ = draw(token_batches(config, max_batch=2, max_len=12))  # no doc_ids: HF has no doc mask
    scales = dict(router=draw(st.floats(0.5, 4.0)), bias=draw(st.floats(0.02, 0.5)))
    seed = draw(st.integers(0, 2**32 - 1))
    return config, scales, seed, tokens, labels


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=cases())
def test_oracle_grads(case):
    config, scales, seed, tokens, labels = case
    params = O.f32_bias(random_params(config, seed, **scales))
    _, ctx = model_forward(config, params, tokens)
    gap = min_topk_gap(config, params, ctx)
    assume(gap >= MIN_GAP)
    del ctx

    losses, ours, _ = loss_and_grads(config, params, tokens, labels)
    assert list(ours) == list(params)
    assert losses["z"] == 0.0 and losses["balance"] == 0.0
    for key, g in ours.items():
        if key.endswith("expert_bias"):
            assert not g.any() and g.dtype == np.float32, key
    ours = {k: v for k, v in to_hf_state_dict(config, ours).items() if not k.endswith("expert_bias")}

    hf_loss, theirs = hf_loss_and_grads(config, params, tokens, labels)
    assert sorted(theirs) == sorted(ours)

    counted = int((np.asarray(labels)[:, 1:] != -100).sum())
    event("no counted token (loss 0, zero gradients)" if counted == 0 else "some tokens counted")
    event("tied embeddings" if config.tie_word_embeddings else "untied head")
    loss_err = abs(losses["total"] - hf_loss) / max(abs(losses["total"]), 1e-300)
    if losses["total"] == 0.0:
        assert counted == 0 and hf_loss == 0.0
        loss_err = 0.0
    assert loss_err <= LOSS_TOL, f"loss: ours {losses['total']!r} vs torch {hf_loss!r} ({loss_err:.2e})"

    for key, mine in ours.items():
        assert theirs[key].shape == mine.shape, key
    G = max(float(np.abs(g).max()) for g in ours.values())
    if counted == 0:  # nothing counted: every gradient is zero, exactly on our side
        assert G == 0.0
        for key, other in theirs.items():
            assert float(np.abs(other).max()) <= ZERO_TOL, f"{key}: ours 0, torch max {np.abs(other).max():.2e}"
    worst, worst_key, floored = 0.0, "", 0
    for key, mine in ours.items() if counted else ():
        other = theirs[key]
        peak = float(np.abs(mine).max())
        scale = max(peak, FLOOR * G)
        floored += peak < FLOOR * G
        diff = float(np.abs(mine - other).max())
        err = diff / scale
        assert err <= GRAD_TOL, (f"{key}: max|Δ| {diff:.2e} = {err:.2e} × max(max|ours| {peak:.2e}, "
                                 f"{FLOOR:.0e} × G {G:.2e})")
        if err > worst:
            worst, worst_key = err, key

    target(worst / GRAD_TOL, label="gradient error / tolerance")
    STATS["examples"] += 1
    STATS["tensors"] += len(ours)
    STATS["floored"] += floored
    STATS["loss"] = max(STATS["loss"], loss_err)
    if worst > STATS["grad"]:
        STATS["grad"], STATS["grad_key"] = worst, worst_key
