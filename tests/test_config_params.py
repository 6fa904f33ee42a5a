"""Config validation, HF config round trips, presets, parameter counts and the SPEC §8 init."""

import json
import math

import numpy as np
import pytest

from trinity.reference import Config, ConfigError, check_params, init_params, param_count, param_shapes
from trinity.reference.model.config import PRESETS


@pytest.mark.parametrize("name, total, active", [
    ("trinity-nano", 6.12e9, 1.02e9), ("trinity-mini", 26.1e9, 3.47e9), ("trinity-large", 399e9, 13.4e9)])
def test_param_counts_reproduce_spec_section_2(name, total, active):
    """SPEC §2: Nano 6.12B / 1.02B, Mini 26.12B / 3.47B, Large 398.64B / 13.37B (3 significant digits)."""
    count = param_count(Config.preset(name))
    assert float(f"{count.total:.3g}") == total
    assert float(f"{count.active:.3g}") == active


def test_large_counts_need_no_allocation():
    shapes = param_shapes(Config.preset("trinity-large"))
    assert shapes["model.layers.6.mlp.experts.gate_proj"] == (256, 3072, 3072)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (48 * 128, 3072)  # h_q·d_h ≠ d


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_3_to_1_pattern(name):
    c = Config.preset(name)
    assert c.layer_types[3] == "full_attention" and c.layer_types[:3] == ("sliding_attention",) * 3
    assert all((t == "full_attention") == ((i + 1) % 4 == 0) for i, t in enumerate(c.layer_types))


def test_bench_medium_is_as_specified():
    c = Config.preset("bench-medium")
    assert (c.hidden_size, c.num_hidden_layers, c.sliding_window, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.num_shared_experts,
            c.num_dense_layers, c.intermediate_size, c.vocab_size) == \
        (512, 8, 128, 8, 4, 64, 16, 4, 256, 1, 1, 1536, 32000)


@pytest.mark.parametrize("change, field", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(layer_types=("sliding_attention",) * 3), "layer_types"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(head_dim=15), "head_dim"),
    (dict(num_dense_layers=5), "num_dense_layers"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(load_balancing="aux"), "load_balancing"),
    (dict(layer_types=("sliding_attention",) * 3 + ("global",)), "layer_types"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        Config.preset("tiny").replace(**change)


def test_from_hf_rejects_other_model_types_and_unsupported_routing():
    base = Config.preset("tiny").to_hf()
    with pytest.raises(ConfigError, match="model_type"):
        Config.from_hf(dict(base, model_type="llama"))
    with pytest.raises(ConfigError, match="score_func"):
        Config.from_hf(dict(base, score_func="softmax"))
    with pytest.raises(ConfigError, match="n_group"):
        Config.from_hf(dict(base, n_group=8))


def test_from_hf_accepts_rope_theta_in_either_place(tmp_path):
    hf = Config.preset("tiny").replace(rope_theta=5e5).to_hf()
    old = {k: v for k, v in hf.items() if k != "rope_parameters"}
    new = {k: v for k, v in hf.items() if k != "rope_theta"}
    assert Config.from_hf(old).rope_theta == 5e5
    assert Config.from_hf(new).rope_theta == 5e5
    (tmp_path / "config.json").write_text(json.dumps(dict(new, auto_map={"AutoModel": "x.Y"}, score_func="sigmoid",
                                                          route_norm=True, n_group=1, topk_group=1)))
    assert Config.from_hf(tmp_path) == Config.from_hf(new)


def test_hf_round_trip_keeps_the_model_fields():
    c = Config.preset("trinity-large")
    back = Config.from_hf(json.loads(json.dumps(c.to_hf())))
    for name in ["hidden_size", "num_hidden_layers", "num_dense_layers", "route_scale", "sliding_window",
                 "layer_types", "mup_enabled", "rope_theta", "head_dim", "num_key_value_heads"]:
        assert getattr(back, name) == getattr(c, name)


def test_default_layer_types_follow_hf_rule():
    c = Config(num_hidden_layers=10, global_attn_every_n_layers=3)
    assert [t[0] for t in c.layer_types] == list("ssfssfssfs")


def test_init_follows_spec_section_8():
    c = Config.preset("bench-medium")
    p = init_params(c, seed=0, dtype=np.float64)
    sigma = 0.5 / math.sqrt(c.hidden_size)
    w = p["model.layers.2.mlp.experts.gate_proj"]
    assert np.abs(w).max() <= 3 * sigma
    # std of a normal truncated at ±3σ is 0.9866σ; 1M samples pin it to ~0.1%.
    assert abs(w.std() / (0.98658 * sigma) - 1) < 5e-3
    assert np.all(p["model.layers.0.post_attention_layernorm.weight"] == 1 / math.sqrt(8))
    assert np.all(p["model.layers.0.post_mlp_layernorm.weight"] == 1 / math.sqrt(8))
    assert np.all(p["model.layers.0.input_layernorm.weight"] == 1)
    assert np.all(p["model.layers.0.self_attn.q_norm.weight"] == 1)
    assert np.all(p["model.layers.1.mlp.expert_bias"] == 0)
    assert set(p) == set(param_shapes(c))
    # Values depend only on (seed, key): float32 is the float64 draw rounded; another seed differs.
    tiny = Config.preset("tiny")
    p64, p32 = init_params(tiny, seed=0, dtype=np.float64), init_params(tiny, seed=0, dtype=np.float32)
    for key in p64:
        np.testing.assert_array_equal(p32[key], p64[key].astype(np.float32))
    assert not np.array_equal(init_params(tiny, seed=1)["lm_head.weight"], p32["lm_head.weight"])


def test_depth_init_shrinks_output_side_matrices():
    c = Config.preset("tiny").replace(depth_init=True)
    p = init_params(c, 0, np.float64)
    sigma = c.base_std
    assert np.abs(p["model.layers.3.self_attn.o_proj.weight"]).max() <= 3 * sigma / math.sqrt(8)
    assert np.abs(p["model.layers.3.self_attn.q_proj.weight"]).max() > 3 * sigma / math.sqrt(8)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_expert_bias_is_float32_in_every_model_dtype(dtype):
    """docs/decisions.md #18: init_params makes every expert_bias float32 whatever the model's dtype; check_params
    accepts it so (returning the model's dtype) and a bias in the model's own dtype too, nothing else."""
    c = Config.preset("tiny")
    p = init_params(c, seed=0, dtype=dtype)
    biases = [k for k in p if k.endswith("mlp.expert_bias")]
    assert len(biases) == c.num_hidden_layers - c.num_dense_layers
    assert all(p[k].dtype == np.float32 for k in biases)
    assert all(v.dtype == dtype for k, v in p.items() if k not in biases)
    assert check_params(c, p) == dtype
    key = biases[0]
    assert check_params(c, {**p, key: p[key].astype(dtype)}) == dtype  # params cast key by key
    other = np.float16 if dtype != np.float16 else np.float64
    with pytest.raises(ValueError, match=rf"{key}: expert_bias must be float32 \(or the model's {np.dtype(dtype)}\), "
                                         rf"found {np.dtype(other)}"):
        check_params(c, {**p, key: p[key].astype(other)})
    with pytest.raises(ValueError, match="one float dtype"):  # the rest must still agree
        check_params(c, {**p, "model.norm.weight": p["model.norm.weight"].astype(other)})


def test_config_is_a_model_and_a_recipe():
    """Every field belongs to exactly one part; the resumable fields are the recipe's but those shaping the state;
    the parts rebuild the Config; a learning-rate change is a recipe change only."""
    from dataclasses import fields

    from trinity.reference.model.config import RESUMABLE_FIELDS, STATE_SHAPING, ModelConfig, Recipe
    model, recipe = {f.name for f in fields(ModelConfig)}, {f.name for f in fields(Recipe)}
    assert model | recipe == {f.name for f in fields(Config)} and not model & recipe
    assert RESUMABLE_FIELDS == recipe - STATE_SHAPING and STATE_SHAPING <= recipe
    base = Config.preset("tiny")
    changed = base.replace(muon_lr=0.1, warmup_steps=7)
    assert Config.from_parts(changed.model, changed.recipe) == changed
    assert changed.model == base.model and changed.recipe != base.recipe
    assert base.replace(hidden_size=32, head_dim=8).model != base.model
