"""HF interop without transformers: layout conversion, save/load round trips, shards, bf16, and every error case
(SPEC §3.1, §3.2). The comparisons against transformers itself are in test_oracle_hf.py.

expert_bias is float32 in every model dtype (docs/decisions.md #18): the random params here hold it so, and every
comparison checks dtypes as well as values."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from trinity.reference.interop import hf_files
from trinity.reference.interop.hf import (CheckpointError, from_hf_state_dict, hf_disk_shapes, load_pretrained,
                                          save_pretrained, to_hf_state_dict)
from trinity.reference.model.config import Config
from trinity.reference.model.params import init_params, param_dtype, param_shapes

TINY = Config.preset("tiny")
TMP_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


@st.composite
def small_configs(draw):
    """Small AFMoE shapes covering the layout-relevant choices: dense/MoE mix, shared experts 0–2, tied heads."""
    h_kv = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 4))
    E = draw(st.integers(1, 6))
    return TINY.replace(
        vocab_size=draw(st.integers(3, 40)), hidden_size=draw(st.integers(2, 24)),
        intermediate_size=draw(st.integers(1, 20)), moe_intermediate_size=draw(st.integers(1, 12)),
        num_hidden_layers=layers, num_dense_layers=draw(st.integers(0, min(2, layers))),
        num_attention_heads=h_kv * draw(st.integers(1, 3)), num_key_value_heads=h_kv,
        head_dim=2 * draw(st.integers(1, 6)), num_experts=E, num_experts_per_tok=draw(st.integers(1, E)),
        num_shared_experts=draw(st.integers(0, 2)), tie_word_embeddings=draw(st.booleans()),
        mup_enabled=draw(st.booleans()))


def random_params(config, seed=0, dtype=np.float64):
    """Random values for every param (expert_bias and norms included), so no two entries coincide; a model of
    `dtype`: every key in `dtype` but expert_bias, float32 (docs/decisions.md #18)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(param_dtype(k, dtype)) for k, s in param_shapes(config).items()}


def as_model(params, dtype):
    """`params` cast to a model of `dtype` by the rule: expert_bias float32, every other key `dtype`."""
    return {k: v.astype(param_dtype(k, dtype)) for k, v in params.items()}


def fused(config, params):
    """The transformers v5 in-memory layout (SPEC §3.2): gate_up_proj [E, 2I, d] = gate rows, then up rows."""
    out = {}
    for key, value in params.items():
        if key.endswith("experts.gate_proj"):
            out[key[: -len("gate_proj")] + "gate_up_proj"] = np.concatenate(
                [value, params[key[: -len("gate_proj")] + "up_proj"]], axis=1)
        elif not key.endswith("experts.up_proj"):
            out[key] = value
    return out


def write_config(path, config, **extra):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config.to_hf(), **extra}, f)


def write_raw(filename, tensors):
    """A safetensors file written by hand: tensors maps key -> (dtype tag, shape, raw bytes)."""
    header, offset = {}, 0
    for key, (tag, shape, data) in tensors.items():
        header[key] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, _, data in tensors.values():
            f.write(data)


def bf16_bits(x):
    """float -> bfloat16 bit patterns, round to nearest even (what torch's .to(bfloat16) does for finite values)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_round(x):
    return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def saved(tmp_path, config=TINY, seed=0, dtype=np.float32):
    params = random_params(config, seed, dtype)
    path = tmp_path / "ckpt"
    save_pretrained(path, config, params)
    return path, params


# ---- layout conversion -------------------------------------------------------------------------------------------
def test_to_hf_keys_shapes_and_views():
    params = random_params(TINY)
    hf = to_hf_state_dict(TINY, params)
    assert {k: v.shape for k, v in hf.items()} == hf_disk_shapes(TINY)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert hf[key].shape == (TINY.moe_intermediate_size, TINY.hidden_size)
    assert np.shares_memory(hf[key], params["model.layers.1.mlp.experts.up_proj"])  # a view, not a copy
    np.testing.assert_array_equal(hf[key], params["model.layers.1.mlp.experts.up_proj"][3])
    assert hf["model.norm.weight"] is params["model.norm.weight"]


@given(config=small_configs(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_round_trip_per_expert_layout_exact(config, dtype, seed):
    params = random_params(config, seed, dtype)
    hf = to_hf_state_dict(config, params)
    assert set(hf) == set(hf_disk_shapes(config))
    assert_same(from_hf_state_dict(config, hf), params)


@given(config=small_configs(), seed=st.integers(0, 2**31))
def test_round_trip_partial_trees(config, seed):
    """Gradients and optimizer moments are trees keyed like params, possibly partial (e.g. experts only)."""
    params = random_params(config, seed)
    subset = {k: v for i, (k, v) in enumerate(params.items()) if ".experts." in k or i % 3 == 0}
    assert_same(from_hf_state_dict(config, to_hf_state_dict(config, subset)), subset)


@given(config=small_configs(), seed=st.integers(0, 2**31))
def test_fused_v5_layout_accepted(config, seed):
    params = random_params(config, seed)
    tree = fused(config, params)
    back = from_hf_state_dict(config, tree)
    assert set(back) == set(params)
    for key in params:
        np.testing.assert_array_equal(back[key], params[key], err_msg=key)
    for l in range(config.num_dense_layers, config.num_hidden_layers):  # gate/up are views of gate_up_proj
        fused_w = tree[f"model.layers.{l}.mlp.experts.gate_up_proj"]
        assert np.shares_memory(back[f"model.layers.{l}.mlp.experts.gate_proj"], fused_w)
        assert np.shares_memory(back[f"model.layers.{l}.mlp.experts.up_proj"], fused_w)


def test_from_hf_drops_buffers_tied_head_and_empty_shared():
    config = TINY.replace(num_shared_experts=0, tie_word_embeddings=True)
    params = random_params(config)
    tree = to_hf_state_dict(config, params)
    tree["model.rotary_emb.inv_freq"] = np.ones(8)
    tree["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8)
    tree["lm_head.weight"] = params["model.embed_tokens.weight"]
    for l in range(1, config.num_hidden_layers):
        s = f"model.layers.{l}.mlp.shared_experts."
        tree.update({s + "gate_proj.weight": np.zeros((0, 64)), s + "up_proj.weight": np.zeros((0, 64)),
                     s + "down_proj.weight": np.zeros((64, 0))})
    assert set(from_hf_state_dict(config, tree)) == set(params)


def test_from_hf_incomplete_or_extra_experts_named():
    params = random_params(TINY)
    tree = to_hf_state_dict(TINY, params)
    del tree["model.layers.2.mlp.experts.5.down_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing key model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight: "
                                              r"expected shape \(64, 32\) \(as the other experts\), found none"):
        from_hf_state_dict(TINY, tree)
    tree = to_hf_state_dict(TINY, params)
    tree["model.layers.2.mlp.experts.8.down_proj.weight"] = tree["model.layers.2.mlp.experts.0.down_proj.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected key model\.layers\.2\.mlp\.experts\.8\.down_proj"):
        from_hf_state_dict(TINY, tree)
    tree = fused(TINY, params)
    tree["model.layers.1.mlp.experts.gate_up_proj"] = tree["model.layers.1.mlp.experts.gate_up_proj"][:, :-1]
    with pytest.raises(CheckpointError, match=r"gate_up_proj: expected shape \(8, 64, 64\), found \(8, 63, 64\)"):
        from_hf_state_dict(TINY, tree)
    with pytest.raises(CheckpointError, match=r"experts\.up_proj: expected a stacked expert tensor with 8 experts, "
                                              r"found shape \(7, 32, 64\)"):
        to_hf_state_dict(TINY, {"model.layers.1.mlp.experts.up_proj": np.zeros((7, 32, 64))})


# ---- save / load -------------------------------------------------------------------------------------------------
@settings(parent=TMP_OK, max_examples=25)
@given(config=small_configs(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_save_load_round_trip_exact(tmp_path_factory, config, dtype, seed):
    path = tmp_path_factory.mktemp("ckpt")
    params = random_params(config, seed, dtype)
    save_pretrained(path, config, params)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]  # no temp file left behind
    on_disk = load_file(path / "model.safetensors")
    expected = dict(hf_disk_shapes(config))
    if config.num_shared_experts == 0:  # HF keeps 0-width shared-expert Linears and writes them
        for l in range(config.num_dense_layers, config.num_hidden_layers):
            s, d = f"model.layers.{l}.mlp.shared_experts.", config.hidden_size
            expected.update({s + "gate_proj.weight": (0, d), s + "up_proj.weight": (0, d),
                             s + "down_proj.weight": (d, 0)})
    assert {k: v.shape for k, v in on_disk.items()} == expected
    assert all(v.dtype == param_dtype(k, dtype) for k, v in on_disk.items())  # expert_bias F32 in a float64 model
    assert ("lm_head.weight" in on_disk) == (not config.tie_word_embeddings)
    loaded_config, loaded = load_pretrained(path, dtype=dtype)
    assert loaded_config.to_hf() == config.to_hf()
    assert_same(loaded, params)
    assert all(v.dtype == param_dtype(k, dtype) and v.flags.writeable and v.flags.c_contiguous
               for k, v in loaded.items())


def test_config_json_is_hf(tmp_path):
    path, _ = saved(tmp_path)
    d = json.loads((path / "config.json").read_text())
    assert d["model_type"] == "afmoe" and d["architectures"] == ["AfmoeForCausalLM"]
    assert d["dtype"] == "float32" and "auto_map" not in d
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_load_casts_to_requested_dtype(tmp_path):
    path, params = saved(tmp_path, dtype=np.float64)
    _, loaded = load_pretrained(path)  # default float32
    assert all(v.dtype == np.float32 for v in loaded.values())
    assert_same(loaded, {k: v.astype(np.float32) for k, v in params.items()})


def test_expert_bias_is_float32_in_every_model_dtype(tmp_path):
    """docs/decisions.md #18: saved as F32 whatever the model's dtype, loaded as float32 whatever dtype is asked for;
    a bias held in the model's dtype (float64 or float16) is rounded to float32 on the way, by every function."""
    bias = "model.layers.1.mlp.expert_bias"
    for dtype in (np.float16, np.float64):
        params = {k: v.astype(dtype) for k, v in random_params(TINY, 12, np.float64).items()}  # bias in dtype too
        want = params[bias].astype(np.float32)
        assert to_hf_state_dict(TINY, params)[bias].dtype == np.float32
        np.testing.assert_array_equal(from_hf_state_dict(TINY, to_hf_state_dict(TINY, params))[bias], want)
        assert from_hf_state_dict(TINY, params)[bias].dtype == np.float32
        path = tmp_path / np.dtype(dtype).name
        save_pretrained(path, TINY, params)
        on_disk = load_file(path / "model.safetensors")
        assert on_disk[bias].dtype == np.float32 and on_disk["model.norm.weight"].dtype == dtype
        assert json.loads((path / "config.json").read_text())["dtype"] == np.dtype(dtype).name
        for load_dtype in (np.float16, np.float32, np.float64):
            _, loaded = load_pretrained(path, dtype=load_dtype)
            assert loaded[bias].dtype == np.float32 and loaded["model.norm.weight"].dtype == load_dtype
            np.testing.assert_array_equal(loaded[bias], want)
    # A float32 bias in a float64 model passes through the layout conversion as it is (no copy).
    params = random_params(TINY, 13, np.float64)
    assert to_hf_state_dict(TINY, params)[bias] is params[bias]
    # An F64 bias on disk (what transformers 5.23 writes for a float64 model) is read as float32.
    write_config(tmp_path / "f64", TINY)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in to_hf_state_dict(TINY, params).items()}
    tensors[bias] = np.full(8, 0.1)  # not a float32 number
    save_file(tensors, str(tmp_path / "f64" / "model.safetensors"))
    _, loaded = load_pretrained(tmp_path / "f64", dtype=np.float64)
    assert loaded[bias].dtype == np.float32 and np.all(loaded[bias] == np.float32(0.1))
    assert_same({k: v for k, v in loaded.items() if k != bias}, {k: v for k, v in params.items() if k != bias})


def test_save_overwrites_atomically(tmp_path, monkeypatch):
    path, params = saved(tmp_path, seed=1)
    before = (path / "model.safetensors").read_bytes()

    def failing_write(self, name, array):  # the file is partly written, then the disk fills
        self._file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf_files.SafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(path, TINY, random_params(TINY, seed=2, dtype=np.float32))
    assert (path / "model.safetensors").read_bytes() == before  # the old checkpoint survives
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    monkeypatch.undo()
    new = random_params(TINY, seed=3, dtype=np.float32)
    save_pretrained(path, TINY, new)  # overwriting an existing checkpoint works
    assert_same(load_pretrained(path)[1], new)


def test_save_rejects_bad_params_and_writes_nothing(tmp_path):
    params = random_params(TINY)
    params["model.layers.0.self_attn.k_proj.weight"] = np.zeros((31, 64))
    del params["model.norm.weight"]
    params["model.layers.9.extra"] = np.zeros(3)
    with pytest.raises(CheckpointError) as err:
        save_pretrained(tmp_path / "x", TINY, params)
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight: expected shape (32, 64), found (31, 64)" in msg
    assert "missing key model.norm.weight: expected shape (64,), found none" in msg
    assert "unexpected key model.layers.9.extra" in msg and "found shape (3,)" in msg
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_sharded_checkpoint(tmp_path, layout):
    config = TINY.replace(num_shared_experts=2)
    params = random_params(config, 4, np.float32)
    tensors = to_hf_state_dict(config, params) if layout == "per_expert" else fused(config, params)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    keys = list(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    write_config(tmp_path, config)
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(tmp_path / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(load_pretrained(tmp_path)[1], params)

    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"missing file: shard model-00002-of-00002\.safetensors"):
        load_pretrained(tmp_path)
    index["weight_map"][keys[0]] = "../evil.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name"):
        load_pretrained(tmp_path)


def test_index_must_agree_with_shards(tmp_path):
    params = random_params(TINY, 0, np.float32)
    tensors = {k: np.ascontiguousarray(v) for k, v in to_hf_state_dict(TINY, params).items()}
    write_config(tmp_path, TINY)
    save_file(tensors, str(tmp_path / "a.safetensors"))
    index = {"weight_map": {k: "a.safetensors" for k in tensors}}
    index["weight_map"]["model.layers.0.self_attn.q_norm.weight_typo"] = "a.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing key model\.layers\.0\.self_attn\.q_norm\.weight_typo"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_bf16_checkpoint(tmp_path, out_dtype):
    """bf16 files (numpy has no bfloat16) load exactly as the bf16-rounded values, widened then cast."""
    config = TINY.replace(num_shared_experts=0, tie_word_embeddings=True)
    params = random_params(config, 5, np.float32)
    write_config(tmp_path, config, dtype="bfloat16")
    tensors = {k: ("BF16", v.shape, bf16_bits(v).tobytes()) for k, v in to_hf_state_dict(config, params).items()}
    tensors["model.layers.1.mlp.expert_bias"] = ("F32", (8,), params["model.layers.1.mlp.expert_bias"].tobytes())
    write_raw(tmp_path / "model.safetensors", tensors)
    _, loaded = load_pretrained(tmp_path, dtype=out_dtype)
    expected = {k: bf16_round(v).astype(param_dtype(k, out_dtype)) for k, v in params.items()}
    expected["model.layers.1.mlp.expert_bias"] = params["model.layers.1.mlp.expert_bias"]  # float32: not rounded
    assert_same(loaded, expected)
    assert not np.array_equal(loaded["model.norm.weight"], params["model.norm.weight"].astype(out_dtype))
    assert all(v.flags.writeable and v.flags.c_contiguous for v in loaded.values())


def test_bf16_fused_checkpoint_slices(tmp_path):
    """The v5 fused layout in bf16: gate/up rows are read as byte ranges of gate_up_proj."""
    params = random_params(TINY, 6, np.float32)
    write_config(tmp_path, TINY)
    write_raw(tmp_path / "model.safetensors",
              {k: ("BF16", v.shape, bf16_bits(v).tobytes()) for k, v in fused(TINY, params).items()})
    _, loaded = load_pretrained(tmp_path)
    assert_same(loaded, {k: bf16_round(v) for k, v in params.items()})


@pytest.mark.oracle
def test_bf16_matches_torch_rounding(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save
    params = random_params(TINY, 7, np.float32)
    write_config(tmp_path, TINY)
    torch_save({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
                for k, v in to_hf_state_dict(TINY, params).items()}, str(tmp_path / "model.safetensors"))
    _, loaded = load_pretrained(tmp_path)
    expected = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in params.items()}
    assert_same(loaded, expected)
    assert_same(expected, {k: bf16_round(v) for k, v in params.items()})


def test_load_rejects_non_float_dtype(tmp_path):
    path, _ = saved(tmp_path)
    with pytest.raises(ValueError, match="float dtype"):
        load_pretrained(path, dtype=np.int32)


def test_f16_checkpoint(tmp_path):
    params = random_params(TINY, 8, np.float16)
    path = tmp_path / "c"
    save_pretrained(path, TINY, params)
    _, loaded = load_pretrained(path, dtype=np.float64)
    assert_same(loaded, as_model(params, np.float64))


def test_tied_head_present_must_equal_embedding(tmp_path):
    config = TINY.replace(tie_word_embeddings=True)
    params = random_params(config, 9, np.float32)
    tensors = {k: np.ascontiguousarray(v) for k, v in to_hf_state_dict(config, params).items()}
    write_config(tmp_path, config)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, str(tmp_path / "model.safetensors"))
    assert_same(load_pretrained(tmp_path)[1], params)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight: tie_word_embeddings=True.*differs"):
        load_pretrained(tmp_path)


def test_ignores_inv_freq_and_auto_map(tmp_path):
    params = random_params(TINY, 10, np.float32)
    tensors = {k: np.ascontiguousarray(v) for k, v in to_hf_state_dict(TINY, params).items()}
    tensors["model.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    # An old-style config: rope_theta at top level, remote-code pointers (never followed).
    write_config(tmp_path, TINY, rope_parameters=None, auto_map={"AutoModelForCausalLM": "evil.Model"},
                 score_func="sigmoid", route_norm=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config, loaded = load_pretrained(tmp_path)
    assert config.to_hf() == TINY.to_hf()
    assert_same(loaded, params)


def test_load_holds_one_copy(tmp_path):
    """Peak memory while loading ≈ the params themselves plus one tensor in flight, never two full copies."""
    config = TINY.replace(vocab_size=64)
    for tag in ("F32", "BF16"):
        params = random_params(config, 11, np.float32)
        path = tmp_path / tag
        write_config(path, config)
        if tag == "F32":
            save_file({k: np.ascontiguousarray(v) for k, v in to_hf_state_dict(config, params).items()},
                      str(path / "model.safetensors"))
        else:
            write_raw(path / "model.safetensors",
                      {k: ("BF16", v.shape, bf16_bits(v).tobytes()) for k, v in to_hf_state_dict(config, params)
                       .items()})
        total = sum(v.nbytes for v in params.values())
        largest = max(v.nbytes for v in params.values())
        tracemalloc.start()
        try:
            load_pretrained(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < total + 4 * largest + 256 * 1024, (tag, peak, total, largest)


# ---- errors: each names the key with the expected and the found shape ---------------------------------------------
def rewrite(path, edit):
    """Apply edit(dict of tensors) to the checkpoint's model.safetensors."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_error_missing_key(tmp_path):
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.pop("model.layers.2.mlp.experts.6.gate_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key model\.layers\.2\.mlp\.experts\.6\.gate_proj\.weight: "
                                              r"expected shape \(32, 64\), found none"):
        load_pretrained(path)


def test_error_unexpected_key(tmp_path):
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected key model\.layers\.0\.self_attn\.q_proj\.bias: "
                                              r"expected none \(not in this config\), found shape \(64,\)"):
        load_pretrained(path)


def test_error_wrong_shape(tmp_path):
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.update({"model.layers.3.self_attn.o_proj.weight": np.zeros((64, 60), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.self_attn\.o_proj\.weight: "
                                              r"expected shape \(64, 64\), found \(64, 60\)"):
        load_pretrained(path)


def test_error_unsupported_dtype(tmp_path):
    path, _ = saved(tmp_path)
    rewrite(path, lambda t: t.update({"model.norm.weight": np.zeros(64, np.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: unsupported dtype I32 .*shape \(64,\)"):
        load_pretrained(path)


def test_error_nonzero_shared_experts_when_config_has_none(tmp_path):
    path, _ = saved(tmp_path)  # tiny has one shared expert
    write_config(path, TINY.replace(num_shared_experts=0))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.shared_experts\.gate_proj\.weight: "
                                              r"expected shape \(0, 64\), found \(32, 64\)"):
        load_pretrained(path)


@pytest.mark.parametrize("change, needle", [
    (dict(num_experts=4, num_experts_per_tok=2),
     r"model\.layers\.1\.mlp\.router\.gate\.weight: expected shape \(4, 64\), found \(8, 64\)"),
    (dict(num_experts=16), r"missing key model\.layers\.1\.mlp\.experts\.8\.gate_proj\.weight: "
                           r"expected shape \(32, 64\), found none"),
    (dict(num_hidden_layers=3), r"unexpected key model\.layers\.3\.\S+: expected none \(not in this config\), "
                                r"found shape"),
    (dict(hidden_size=32), r"model\.embed_tokens\.weight: expected shape \(256, 32\), found \(256, 64\)"),
    (dict(tie_word_embeddings=True), r"lm_head\.weight: tie_word_embeddings=True, but .* differs"),
    (dict(num_dense_layers=2), r"missing key model\.layers\.1\.mlp\.gate_proj\.weight: expected shape \(128, 64\)"),
])
def test_error_config_does_not_match_weights(tmp_path, change, needle):
    path, _ = saved(tmp_path)
    write_config(path, TINY.replace(**change))
    with pytest.raises(CheckpointError, match=needle):
        load_pretrained(path)


def test_error_lists_problems_but_not_thousands(tmp_path):
    path, _ = saved(tmp_path)
    write_config(path, TINY.replace(hidden_size=32))
    with pytest.raises(CheckpointError, match=r"\.\.\. and \d+ more"):
        load_pretrained(path)


def test_error_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing file: checkpoint directory"):
        load_pretrained(tmp_path / "nope")
    path, _ = saved(tmp_path)
    os.remove(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing file: .* has neither model\.safetensors nor"):
        load_pretrained(path)
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError, match=r"missing file: .*config\.json"):
        load_pretrained(path)


def test_never_unpickles(tmp_path):
    write_config(tmp_path, TINY)
    # If anything unpickled this it would raise ModuleNotFoundError (a module that does not exist), not our error.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x0bno_such_mod"
                                                 b"\x94\x8c\x01x\x94\x93\x94.")
    with pytest.raises(CheckpointError, match="pickle-based weights are never loaded"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("blob", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", b"\x04\x00\x00\x00\x00\x00\x00\x00nope",
                                  b"\x02\x00\x00\x00\x00\x00\x00\x00[]"])
def test_error_corrupt_file(tmp_path, blob):
    write_config(tmp_path, TINY)
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_error_data_offsets_outside_file(tmp_path):
    write_config(tmp_path, TINY)
    write_raw(tmp_path / "model.safetensors", {"model.norm.weight": ("F32", (64,), b"\x00" * 16)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(64,\) and dtype F32 but 16 bytes"):
        load_pretrained(tmp_path)
