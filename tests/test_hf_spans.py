"""Issue 19, the HF parts: read only a rank's spans of an HF checkpoint (`read_pretrained_spans`), and write an HF
checkpoint one key at a time (`HFCheckpointWriter`, `save_pretrained_streaming`, which save_pretrained now uses).

A span of a key is a flat range [lo, hi) of our WHOLE array (stacked experts [E, I, d] / [E, d, I]) in C order. The
properties: the arrays equal load_pretrained's flattened [lo:hi] and the values written (independently rounded to the
file's dtype); the bytes read from the weight files are exactly the bytes of the spanned elements, located by the
layout rule written out here (SPEC §3.1 per-expert, §3.2 fused), so bytes_read = Σ (hi − lo) × bytes per element,
which meets the bound "span bytes + 2 rows per span" with no slack (every layout read maps a run of our elements to
a contiguous run of the file's); the streaming writer's files are byte-identical to the previous save_pretrained (kept
below as `reference_save_pretrained`, built on safetensors' own save_file)."""

from __future__ import annotations

import builtins
import json
import math
import os
import re
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from test_hf_interop import (TINY, TMP_OK, bf16_bits, bf16_round, fused, random_params, small_configs, write_config,
                             write_raw)

from trinity.reference.interop import hf, hf_files
from trinity.reference.interop.hf import (CheckpointError, HFCheckpointWriter, load_pretrained, read_pretrained_spans,
                                          save_pretrained, save_pretrained_streaming, to_hf_state_dict)
from trinity.reference.model.params import is_expert_bias, param_dtype, param_shapes

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
NUMPY_OF = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


# ---- checkpoints written by hand, in any dtype, layout and sharding ------------------------------------------------
def disk_tag(key, tag):
    """The file's dtype for `key`: `tag`, except that a BF16 checkpoint keeps expert_bias in F32 (as released ones)."""
    return "F32" if tag == "BF16" and key.endswith("expert_bias") else tag


def encode(tag, value):
    return bf16_bits(value).tobytes() if tag == "BF16" else np.ascontiguousarray(value, dtype=NUMPY_OF[tag]).tobytes()


def decoded(params, tag, dtype):
    """What a checkpoint of `tag` holding `params` reads as, in a model of `dtype`: each value rounded to the file's
    dtype (bf16 round-to-nearest-even for BF16), then cast; expert_bias float32."""
    out = {}
    for key, value in params.items():
        t = disk_tag(key, tag)
        stored = bf16_round(value) if t == "BF16" else value.astype(NUMPY_OF[t])
        out[key] = stored.astype(param_dtype(key, dtype))
    return out


def write_checkpoint(path, config, params, tag, layout, shard_of=None):
    """An HF checkpoint directory of `params` in dtype `tag`, per-expert (SPEC §3.1) or fused (§3.2) layout; with
    `shard_of` (a function of a key's position giving its shard number) a sharded set with an index."""
    tensors = to_hf_state_dict(config, params) if layout == "per_expert" else fused(config, params)
    raw = {k: (disk_tag(k, tag), v.shape, encode(disk_tag(k, tag), v)) for k, v in tensors.items()}
    write_config(path, config)
    if shard_of is None:
        write_raw(os.path.join(path, "model.safetensors"), raw)
        return
    shards: dict[int, dict] = {}
    for i, key in enumerate(raw):
        shards.setdefault(shard_of(i), {})[key] = raw[key]
    names = {s: f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n, s in enumerate(sorted(shards))}
    for s, part in shards.items():
        write_raw(os.path.join(path, names[s]), part)
    index = {"metadata": {}, "weight_map": {k: names[s] for s, part in shards.items() for k in part}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def data_offsets(path):
    """{disk key: (file, absolute offset of its data, dtype tag)} over every safetensors file of `path`."""
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for key, info in header.items():
                if key != "__metadata__":
                    out[key] = (os.path.join(path, name), 8 + n + info["data_offsets"][0], info["dtype"])
    return out


def disk_element(config, layout, key, i):
    """(disk key, flat element) holding our key's flat element i: SPEC §3.1 (expert e's matrix is its own tensor) and
    §3.2 (gate_up_proj [E, 2I, d]: expert e's gate rows, then its up rows), written out element by element."""
    m = re.match(r"^(.*\.experts)\.(gate_proj|up_proj|down_proj)$", key)
    if m is None or (layout == "fused" and m[2] == "down_proj"):  # v5 keeps our down_proj [E, d, I] as it is
        return key, i
    block = math.prod(param_shapes(config)[key][1:])
    e, r = divmod(i, block)
    if layout == "fused":
        return m[1] + ".gate_up_proj", (2 * e + (m[2] == "up_proj")) * block + r
    return f"{m[1]}.{e}.{m[2]}.weight", r


class RecordingOpen:
    """Stands in for `open` inside hf.py: every binary read of a weight file is recorded as (file, first byte, end)."""

    def __init__(self):
        self.reads: list[tuple[str, int, int]] = []

    def __call__(self, name, mode="r", *args, **kwargs):
        f = builtins.open(name, mode, *args, **kwargs)
        return _Recorded(f, os.fspath(name), self.reads) if "r" in mode and "b" in mode else f


class _Recorded:
    def __init__(self, f, name, reads):
        self.f, self.name, self.reads = f, name, reads

    def seek(self, *args):
        return self.f.seek(*args)

    def readinto(self, buffer):
        at = self.f.tell()
        n = self.f.readinto(buffer)
        self.reads.append((self.name, at, at + n))
        return n

    def read(self, size=-1):
        at = self.f.tell()
        data = self.f.read(size)
        self.reads.append((self.name, at, at + len(data)))
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@st.composite
def checkpoints(draw):
    config = draw(small_configs())
    layout = draw(st.sampled_from(["per_expert", "fused"]))
    tag = draw(st.sampled_from(["F32", "BF16", "F16", "F64"]))
    shards = draw(st.sampled_from([None, 2, 3]))
    shard_seed = draw(st.integers(0, 2**31))
    shard_of = None if shards is None else (lambda i: (i * 7919 + shard_seed) % shards)
    return config, layout, tag, shard_of, draw(st.integers(0, 2**31))


@settings(parent=TMP_OK, max_examples=40)
@given(ckpt=checkpoints(), dtype=st.sampled_from([np.float32, np.float64]), data=st.data())
def test_spans_equal_load_pretrained_and_read_only_their_bytes(tmp_path_factory, ckpt, dtype, data):
    config, layout, tag, shard_of, seed = ckpt
    path = str(tmp_path_factory.mktemp("ckpt"))
    params = random_params(config, seed, np.float32)
    write_checkpoint(path, config, params, tag, layout, shard_of)
    shapes = param_shapes(config)
    keys = data.draw(st.lists(st.sampled_from(sorted(shapes)), min_size=1, max_size=8, unique=True), "keys")
    wanted = {}
    for key in keys:
        size = math.prod(shapes[key])
        spans = data.draw(st.lists(st.tuples(st.integers(0, size), st.integers(0, size)), min_size=1, max_size=3),
                          key)
        wanted[key] = [(min(s), max(s)) for s in spans]

    recorder = RecordingOpen()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf, "open", recorder, raising=False)
        got_config, got, bytes_read = read_pretrained_spans(path, wanted, dtype=dtype)
    assert got_config.to_hf() == config.to_hf()
    _, whole = load_pretrained(path, dtype=dtype)
    expected = decoded(params, tag, dtype)
    assert list(got) == list(wanted)
    for key, spans in wanted.items():
        assert len(got[key]) == len(spans)
        for (lo, hi), array in zip(spans, got[key]):
            assert array.shape == (hi - lo,) and array.dtype == param_dtype(key, dtype), key
            np.testing.assert_array_equal(array, whole[key].ravel()[lo:hi], err_msg=key)
            np.testing.assert_array_equal(array, expected[key].ravel()[lo:hi], err_msg=key)

    # The bytes read are exactly those of the spanned elements (where the layout rule puts them), each read once per
    # span that covers it: bytes_read = Σ (hi − lo) × bytes per element ≤ span bytes + 2 rows per span.
    where = data_offsets(path)
    want_bytes: dict[str, set[int]] = {}
    span_bytes = 0
    for key, spans in wanted.items():
        for lo, hi in spans:
            for i in range(lo, hi):
                disk_key, element = disk_element(config, layout, key, i)
                file, offset, t = where[disk_key]
                size = ITEMSIZE[t]
                want_bytes.setdefault(file, set()).update(range(offset + element * size, offset + (element + 1) * size))
                span_bytes += size
    read_bytes: dict[str, set[int]] = {}
    for file, begin, end in recorder.reads:
        read_bytes.setdefault(file, set()).update(range(begin, end))
    assert {f: b for f, b in read_bytes.items() if b} == {f: b for f, b in want_bytes.items() if b}
    assert bytes_read == sum(end - begin for _, begin, end in recorder.reads) == span_bytes


def test_whole_keys_and_chunked_reads(tmp_path, monkeypatch):
    """Whole-key spans read in many small chunks (both the straight-into-the-array path and the cast path)."""
    params = random_params(TINY, 3, np.float32)
    for tag in ("F32", "BF16"):
        path = str(tmp_path / tag)
        write_checkpoint(path, TINY, params, tag, "fused", shard_of=lambda i: i % 2)
        wanted = {k: [(0, math.prod(s))] for k, s in param_shapes(TINY).items()}
        monkeypatch.setattr(hf_files, "CHUNK_BYTES", 12)
        _, got, bytes_read = read_pretrained_spans(path, wanted)
        monkeypatch.undo()
        _, whole = load_pretrained(path)
        for key, array in whole.items():
            np.testing.assert_array_equal(got[key][0], array.ravel(), err_msg=key)
        assert bytes_read == sum(math.prod(s) * ITEMSIZE[disk_tag(k, tag)] for k, s in param_shapes(TINY).items())


# ---- the same checks as load_pretrained --------------------------------------------------------------------------
def _drop(path, key):
    tensors = {k: v for k, v in hf_files.read_header(os.path.join(path, "model.safetensors"))[0].items() if k != key}
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        blob = f.read()
    write_raw(os.path.join(path, "model.safetensors"),
              {k: (e.dtype, e.shape, blob[e.offset:e.offset + math.prod(e.shape) * ITEMSIZE[e.dtype]])
               for k, e in tensors.items()})


@pytest.mark.parametrize("corrupt", ["missing_expert", "config_mismatch", "extra_key", "no_weights"])
def test_spans_refuse_what_load_pretrained_refuses(tmp_path, corrupt):
    """Validation covers the whole checkpoint, not just the keys wanted: the same error, word for word."""
    path = str(tmp_path)
    save_pretrained(path, TINY, random_params(TINY, 1, np.float32))
    if corrupt == "missing_expert":
        _drop(path, "model.layers.2.mlp.experts.6.gate_proj.weight")
    elif corrupt == "config_mismatch":
        write_config(path, TINY.replace(num_experts=16))
    elif corrupt == "extra_key":
        write_config(path, TINY.replace(num_hidden_layers=3))
    else:
        os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError) as whole:
        load_pretrained(path)
    with pytest.raises(CheckpointError) as spans:
        read_pretrained_spans(path, {"model.norm.weight": [(0, 4)]})
    assert str(spans.value) == str(whole.value)


def test_given_config_must_equal_config_json(tmp_path):
    path = str(tmp_path)
    save_pretrained(path, TINY, random_params(TINY, 1, np.float32))
    mine = TINY.replace(warmup_steps=7)  # the training recipe is not in config.json: the caller's is kept
    config, got, _ = read_pretrained_spans(path, {"model.norm.weight": [(0, 4)]}, config=mine)
    assert config is mine
    with pytest.raises(CheckpointError, match=r"config\.json: differs from the config given to read_pretrained_spans"):
        read_pretrained_spans(path, {"model.norm.weight": [(0, 4)]}, config=TINY.replace(rope_theta=5.0))


def test_tied_head_in_file_is_checked_on_the_spans_read(tmp_path):
    config = TINY.replace(tie_word_embeddings=True)
    params = random_params(config, 9, np.float32)
    tensors = {k: np.ascontiguousarray(v) for k, v in to_hf_state_dict(config, params).items()}
    write_config(tmp_path, config)
    head = tensors["model.embed_tokens.weight"].copy()
    save_file({**tensors, "lm_head.weight": head}, str(tmp_path / "model.safetensors"))
    _, got, bytes_read = read_pretrained_spans(tmp_path, {"model.embed_tokens.weight": [(5, 100)]})
    np.testing.assert_array_equal(got["model.embed_tokens.weight"][0], head.ravel()[5:100])
    assert bytes_read == 2 * 95 * 4  # the span, and the head's same elements to compare
    head.ravel()[200] += 1
    save_file({**tensors, "lm_head.weight": head}, str(tmp_path / "model.safetensors"))
    read_pretrained_spans(tmp_path, {"model.embed_tokens.weight": [(5, 100)]})  # the difference lies outside
    with pytest.raises(CheckpointError, match=r"lm_head\.weight: tie_word_embeddings=True.*differs"):
        read_pretrained_spans(tmp_path, {"model.embed_tokens.weight": [(150, 250)]})


@pytest.mark.parametrize("wanted, needle", [
    ({"model.layers.9.mlp.gate_proj.weight": [(0, 1)]}, r"unknown key 'model\.layers\.9\.mlp\.gate_proj\.weight'"),
    ({"model.layers.1.mlp.experts.5.up_proj.weight": [(0, 1)]}, r"unknown key"),  # HF's name, not ours
    ({"model.norm.weight": [(0, 65)]}, r"model\.norm\.weight: span \[0, 65\) lies outside its 64 elements"),
    ({"model.norm.weight": [(-1, 3)]}, r"span \[-1, 3\) lies outside"),
    ({"model.norm.weight": [(5, 3)]}, r"span \[5, 3\) lies outside"),
    ({"model.norm.weight": [(0.0, 3)]}, r"a span is a pair of ints \(lo, hi\), got \(0\.0, 3\)"),
    ({"model.norm.weight": [(0, 1, 2)]}, r"a span is a pair of ints"),
])
def test_bad_wanted_is_a_one_line_error(tmp_path, wanted, needle):
    save_pretrained(tmp_path, TINY, random_params(TINY, 1, np.float32))
    with pytest.raises(ValueError, match="read_pretrained_spans: .*" + needle) as err:
        read_pretrained_spans(tmp_path, wanted)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="float dtype"):
        read_pretrained_spans(tmp_path, {"model.norm.weight": [(0, 1)]}, dtype=np.int32)
    with pytest.raises(ValueError, match=r"wanted must be a dict \{key: \[\(lo, hi\), \.\.\.\]\}, got list"):
        read_pretrained_spans(tmp_path, [("model.norm.weight", [(0, 1)])])


# ---- writing: one key at a time, byte-identical to the previous save_pretrained ---------------------------------
def reference_save_pretrained(path, config, params):
    """save_pretrained as it was before the streaming writer (safetensors' save_file of the whole HF state dict)."""
    os.makedirs(path, exist_ok=True)
    embed = np.asarray(params["model.embed_tokens.weight"])
    tensors = {}
    for key, value in to_hf_state_dict(config, params).items():
        tensors[key] = np.ascontiguousarray(value)
        if config.num_shared_experts == 0 and key.endswith("mlp.expert_bias"):
            s, d = key[: -len("expert_bias")] + "shared_experts.", config.hidden_size
            tensors[s + "gate_proj.weight"] = np.zeros((0, d), embed.dtype)
            tensors[s + "up_proj.weight"] = np.zeros((0, d), embed.dtype)
            tensors[s + "down_proj.weight"] = np.zeros((d, 0), embed.dtype)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf_config = config.to_hf()
    hf_config["dtype"] = embed.dtype.name
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
        f.write("\n")


def same_files(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b)) == ["config.json", "model.safetensors"]
    for name in os.listdir(a):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


@settings(parent=TMP_OK, max_examples=30)
@given(config=small_configs(), dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       bias_in_model_dtype=st.booleans(), seed=st.integers(0, 2**31), order_seed=st.integers(0, 2**31))
def test_streaming_writer_is_byte_identical_to_the_old_save_pretrained(tmp_path_factory, config, dtype,
                                                                      bias_in_model_dtype, seed, order_seed):
    params = random_params(config, seed, np.float64)
    params = {k: v.astype(dtype if bias_in_model_dtype else param_dtype(k, dtype)) for k, v in params.items()}
    old, new, streamed = (tmp_path_factory.mktemp(n) for n in ("old", "new", "streamed"))
    reference_save_pretrained(old, config, params)
    save_pretrained(new, config, params)
    same_files(old, new)
    order = np.random.default_rng(order_seed).permutation(len(params))  # keys may arrive in any order
    keys = [list(params)[i] for i in order]
    save_pretrained_streaming(streamed, config, ((k, params[k]) for k in keys), dtype=dtype)
    same_files(old, streamed)


def test_streaming_writer_casts_to_its_dtype(tmp_path):
    params = random_params(TINY, 2, np.float64)
    save_pretrained_streaming(tmp_path / "a", TINY, params.items(), dtype=np.float32)
    as_float32 = {k: v.astype(param_dtype(k, np.float32)) for k, v in params.items()}
    reference_save_pretrained(tmp_path / "b", TINY, as_float32)
    same_files(tmp_path / "a", tmp_path / "b")


def test_streaming_writer_chunks_byte_identical(tmp_path, monkeypatch):
    params = random_params(TINY, 4, np.float64)
    reference_save_pretrained(tmp_path / "old", TINY, params)
    monkeypatch.setattr(hf_files, "CHUNK_BYTES", 24)  # many rows per chunk, one row per chunk, and rows over a chunk
    save_pretrained(tmp_path / "new", TINY, params)
    same_files(tmp_path / "old", tmp_path / "new")


def test_streaming_writer_holds_one_key_at_a_time(tmp_path):
    """Each key is made as it is asked for and dropped after it is written: the writer's peak memory is a couple of
    keys, not the model."""
    config = TINY.replace(vocab_size=64, num_hidden_layers=8)
    shapes = param_shapes(config)

    def keys():
        rng = np.random.default_rng(0)
        for key, shape in shapes.items():
            yield key, rng.standard_normal(shape).astype(param_dtype(key, np.float64))

    largest = max(math.prod(s) for s in shapes.values()) * 8
    total = sum(math.prod(s) for s in shapes.values()) * 8
    assert total > 10 * largest
    tracemalloc.start()
    try:
        save_pretrained_streaming(tmp_path, config, keys(), dtype=np.float64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * largest + 256 * 1024, (peak, largest, total)
    _, loaded = load_pretrained(tmp_path, dtype=np.float64)
    expected = dict(keys())
    for key in shapes:
        np.testing.assert_array_equal(loaded[key], expected[key].astype(loaded[key].dtype), err_msg=key)


def test_writer_refuses_bad_keys_and_leaves_the_old_checkpoint(tmp_path):
    params = random_params(TINY, 5, np.float32)
    save_pretrained(tmp_path, TINY, params)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    key = "model.layers.1.mlp.experts.up_proj"
    cases = [
        ([("model.layers.9.extra", np.zeros(3))], r"unexpected key model\.layers\.9\.extra: expected none"),
        ([(key, np.zeros((7, 32, 64)))], r"experts\.up_proj: expected shape \(8, 32, 64\), found \(7, 32, 64\)"),
        ([(key, params[key]), (key, params[key])], r"experts\.up_proj: written twice"),
        ([(key, params[key].astype(np.int32))], r"unsupported dtype int32"),
        ([(key, params[key])], r"missing key model\.embed_tokens\.weight: expected shape \(256, 64\), never written"),
    ]
    for items, needle in cases:
        with pytest.raises(CheckpointError, match=needle) as err:
            save_pretrained_streaming(tmp_path, TINY, iter(items))
        assert "\n" not in str(err.value)
        assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # no temp file left
    with pytest.raises(ValueError, match=r"dtype must be float16, float32 or float64, got int32"):
        HFCheckpointWriter(tmp_path, TINY, np.int32)


def test_writer_abort_in_a_with_block(tmp_path):
    with pytest.raises(RuntimeError, match="stop"):
        with HFCheckpointWriter(tmp_path, TINY) as writer:
            writer.write("model.norm.weight", np.ones(64))
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def test_expert_bias_written_f32_read_f32(tmp_path):
    params = random_params(TINY, 6, np.float64)
    save_pretrained_streaming(tmp_path, TINY, params.items(), dtype=np.float64)
    header = hf_files.read_header(str(tmp_path / "model.safetensors"))[0]
    assert all(e.dtype == ("F32" if is_expert_bias(k) else "F64") for k, e in header.items())
    _, got, _ = read_pretrained_spans(tmp_path, {"model.layers.1.mlp.expert_bias": [(2, 6)]}, dtype=np.float64)
    assert got["model.layers.1.mlp.expert_bias"][0].dtype == np.float32  # the float32 bias, not rounded again
    bias = "model.layers.1.mlp.expert_bias"
    np.testing.assert_array_equal(got[bias][0], params[bias][2:6])
