"""The step inspector: traced values are bitwise those of `logits` / `loss_and_grads` / the trainer's update, event
names follow the model, stepping is lazy, and `trinity inspect` dumps, filters and fails cleanly."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from trinity.cli.main import main
from trinity.reference import Config, init_params, logits, loss_and_grads, save_pretrained
from trinity.reference.data.packing import document_ids
from trinity.reference.inspection import (StepThrough, TracingOps, attention_entropy, event_matches, read_trace,
                                          step_through)
from trinity.reference.model.ops import ReferenceOps
from trinity.reference.training.balancing import balance_step, init_balancing_state
from trinity.reference.training.checkpoint import save_checkpoint
from trinity.reference.training.optim import clip_grad_norm, init_optimizer_state, optimizer_step

TINY = Config.preset("tiny")  # 4 layers: 0 dense, 1-3 MoE; layers 0-2 sliding (window 32), layer 3 global


def _model(dtype=np.float64, seed=0, **changes):
    config = TINY.replace(**changes) if changes else TINY
    return config, init_params(config, seed=seed, dtype=dtype)


def _tokens(B=2, T=40, seed=1, vocab=256):
    return np.random.default_rng(seed).integers(1, vocab, size=(B, T))


def _equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


# ---- values: bitwise those of the untraced model ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_trace_is_bitwise_logits(dtype):
    config, params = _model(dtype)
    tokens = _tokens()
    st = step_through(config, params, tokens)
    events = list(st)
    head = [e for e in events if e.name == "lm_head"]
    assert len(head) == 1 and head[0].phase == "forward"
    expected = logits(config, params, tokens)
    assert _equal(head[0].outputs["y"], expected)
    assert _equal(st.logits, expected)
    # every operator is recorded once per call, in order, and only forward ops ran
    assert [e.index for e in events] == list(range(len(events)))
    assert {e.phase for e in events} == {"forward"}


def test_forward_trace_with_document_mask_is_bitwise_logits():
    config, params = _model(np.float64, intra_document_mask=True)
    tokens = _tokens()
    tokens[:, 7] = tokens[:, 21] = 0  # EOS
    doc = document_ids(tokens, 0)
    st = step_through(config, params, tokens, doc_ids=doc).run()
    assert _equal(st.logits, logits(config, params, tokens, doc))
    sdpa = [e for e in st.events if e.short == "sdpa"]
    assert len(sdpa) == config.num_hidden_layers and all(_equal(e.inputs["doc_ids"], doc) for e in sdpa)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_trace_is_bitwise_loss_and_grads(dtype):
    config, params = _model(dtype)
    tokens = _tokens()
    labels = tokens.copy()
    labels[0, :5] = -100
    losses, grads, stats = loss_and_grads(config, params, tokens, labels)
    st = step_through(config, params, tokens, labels).run()
    assert st.losses == losses
    for key in grads:
        assert _equal(st.grads[key], grads[key]), key
    # each gradient as its operator produced it: one backward event per parameter (expert_bias has none)
    parts: dict = {}
    for e in st.events:
        if e.phase == "backward":
            for key, g in e.param_grads.items():
                parts.setdefault(key, []).append(g)
    assert set(parts) == {k for k in params if not k.endswith("expert_bias")}
    for key, found in parts.items():
        assert len(found) == 1 and _equal(found[0], grads[key]), key
    # the losses and the residual stream's input gradient
    ce = next(e for e in st.events if e.name == "cross_entropy" and e.phase == "forward")
    assert (ce.outputs["ce"], ce.outputs["z"]) == (losses["ce"], losses["z"])
    balance = [e.outputs["loss"] for e in st.events if e.short == "balance_loss" and e.phase == "forward"]
    assert len(balance) == 3 and sum(balance) == losses["balance"]
    embed_back = next(e for e in st.events if e.name == "model.embed_tokens" and e.phase == "backward")
    assert _equal(embed_back.inputs["dx"], stats["embedding_output_grad"])
    # the forward half equals the forward-only trace, output by output
    fwd = [e for e in step_through(config, params, tokens).run().events]
    traced = [e for e in st.events if e.phase == "forward" and e.name in {f.name for f in fwd}]
    assert [e.name for e in traced] == [e.name for e in fwd]
    for a, b in zip(traced, fwd):
        for k, v in b.arrays().items():
            assert _equal(a.arrays()[k], v), (a.name, k)


def test_tied_embedding_gradient_is_the_sum_of_its_two_events():
    config, params = _model(np.float64, tie_word_embeddings=True)
    tokens = _tokens()
    _, grads, _ = loss_and_grads(config, params, tokens, tokens)
    st = step_through(config, params, tokens, tokens).run()
    names = [e.name for e in st.events if e.phase == "forward"]
    assert "lm_head" in names and names.count("model.embed_tokens") == 1
    table = next(e for e in st.events if e.name == "model.embed_tokens" and e.phase == "backward")
    head = next(e for e in st.events if e.name == "lm_head" and e.phase == "backward")
    key = "model.embed_tokens.weight"
    assert _equal(table.param_grads[key] + head.param_grads[key], grads[key])


def test_step_is_bitwise_the_trainer_update():
    """clip → balancing → optimizer, in the trainer's order, at the peak learning rates."""
    config, params = _model(np.float32)
    tokens = _tokens()
    original = {k: v.copy() for k, v in params.items()}
    st = step_through(config, params, tokens, step=True).run()
    for k in params:  # inplace=False: the caller's params are untouched
        assert _equal(params[k], original[k])

    mine = {k: v.copy() for k, v in params.items()}
    _, grads, stats = loss_and_grads(config, mine, tokens, tokens)
    clipped, norm = clip_grad_norm(grads, config.grad_clip_norm)
    balancing = init_balancing_state(config, mine)
    metrics = balance_step(config, mine, balancing, {l: s["expert_counts"] for l, s in stats["layers"].items()})
    opt = init_optimizer_state(config, mine)
    info = optimizer_step(config, mine, clipped, opt, config.muon_lr, config.adamw_lr)

    assert st.grad_norm == norm and st.balance == metrics and st.optimizer == info
    for tree_a, tree_b in ((st.params, mine), (st.optimizer_state, opt), (st.balancing_state, balancing)):
        assert tree_a.keys() == tree_b.keys()
        for k in tree_a:
            assert _equal(tree_a[k], tree_b[k]), k
    updates = {e.param_keys["param"]: e for e in st.events if e.phase == "optimizer"}
    assert set(updates) == {k for k in params if not k.endswith("expert_bias")}
    for key, e in updates.items():
        assert _equal(e.outputs["update"], mine[key] - original[key]), key
        assert _equal(e.inputs["grad"], clipped[key])
    bias_events = [e for e in st.events if e.phase == "balancing"]
    assert [e.name for e in bias_events] == [f"model.layers.{l}.mlp.expert_bias" for l in (1, 2, 3)]
    for e in bias_events:
        assert _equal(e.outputs["bias"], mine[e.name])


def test_tracing_table_wraps_any_table():
    """TracingOps passed straight to loss_and_grads (no StepThrough), over a subclass of the reference table."""

    class Mine(ReferenceOps):
        name = "mine"

    config, params = _model(np.float64)
    tokens = _tokens(B=1, T=20)
    tracer = TracingOps(Mine(), params)
    losses, grads, _ = loss_and_grads(config, params, tokens, tokens, ops=tracer)
    ref_losses, ref_grads, _ = loss_and_grads(config, params, tokens, tokens)
    assert losses == ref_losses and all(_equal(grads[k], ref_grads[k]) for k in grads)
    assert tracer.name == "trace(mine)" and tracer.xp is np
    assert len(tracer.events) > 100


# ---- names follow the model ---------------------------------------------------------------------------------------
def test_event_names_follow_the_model():
    config, params = _model(np.float64)
    st = step_through(config, params, _tokens(), step=True).run()
    forward = [e.name for e in st.events if e.phase == "forward"]
    attn = ["q_proj", "k_proj", "v_proj", "gate_proj", "q_norm", "k_norm", "q_rope", "k_rope", "sdpa", "gate",
            "o_proj"]

    def layer(l, mlp, sliding=True):
        p = f"model.layers.{l}."
        a = attn if sliding else [n for n in attn if not n.endswith("_rope")]
        return ([p + "input_layernorm"] + [p + "self_attn." + n for n in a] +
                [p + "post_attention_layernorm", p + "pre_mlp_layernorm"] + [p + "mlp." + n for n in mlp] +
                [p + "post_mlp_layernorm"])

    dense = ["gate_proj", "up_proj", "act", "down_proj"]
    moe = ["router", "dispatch", "experts", "combine"] + ["shared_experts." + n for n in dense]
    expected = (["model.embed_tokens", "rope_tables"] + layer(0, dense) + layer(1, moe) + layer(2, moe) +
                layer(3, moe, sliding=False) + ["model.norm", "lm_head", "cross_entropy"] +
                [f"model.layers.{l}.mlp.balance_loss" for l in (1, 2, 3)])
    assert forward == expected
    assert len(set(forward)) == len(forward)
    # a backward carries its forward's name and parameters
    fwd = {e.name: e for e in st.events if e.phase == "forward"}
    for e in st.events:
        if e.phase == "backward" and e.op != "scatter_to_tokens" and e.op != "combine_backward":
            assert e.forward is fwd[e.name], e.name
            assert e.param_keys == fwd[e.name].param_keys
    back = [e.name for e in st.events if e.phase == "backward"]
    assert set(back) - set(forward) == {f"model.layers.{l}.mlp.scatter_to_tokens" for l in (1, 2, 3)}
    # layers, parameter arguments, phases
    q = fwd["model.layers.2.self_attn.q_proj"]
    assert q.layer == 2 and q.param_keys == {"w": "model.layers.2.self_attn.q_proj.weight"}
    assert q.inputs["w"] is st.params["model.layers.2.self_attn.q_proj.weight"]
    router = fwd["model.layers.1.mlp.router"]
    assert router.param_keys == {"w_router": "model.layers.1.mlp.router.gate.weight",
                                 "expert_bias": "model.layers.1.mlp.expert_bias"}
    assert set(router.outputs) == {"weights", "experts", "scores", "router_logits"}
    assert fwd["model.layers.1.mlp.experts"].param_keys == {
        "w1": "model.layers.1.mlp.experts.gate_proj", "w3": "model.layers.1.mlp.experts.up_proj",
        "w2": "model.layers.1.mlp.experts.down_proj"}
    assert [e.phase for e in st.events].index("backward") > forward.index("cross_entropy")
    order = [e.phase for e in st.events]
    assert order.index("loss") < order.index("clip") < order.index("balancing") < order.index("optimizer")


def test_filters_select_by_layer_and_operator():
    config, params = _model(np.float64)
    st = step_through(config, params, _tokens(), step=True).run()

    def pick(layers=None, ops=None):
        return sorted({(e.name, e.phase) for e in st.events if event_matches(e, layers, ops)})

    assert pick([1], ["router"]) == [("model.layers.1.mlp.router", "backward"),
                                     ("model.layers.1.mlp.router", "forward"),
                                     ("model.layers.1.mlp.router.gate", "optimizer")]
    assert {n for n, _ in pick(None, ["q_rope"])} == {f"model.layers.{l}.self_attn.q_rope" for l in (0, 1, 2)}
    assert {n for n, _ in pick([3], ["attention"])} == {"model.layers.3.self_attn.sdpa"}
    assert {n for n, _ in pick(None, ["model.layers.*.mlp.expert_bias"])} == {
        f"model.layers.{l}.mlp.expert_bias" for l in (1, 2, 3)}
    assert {p for _, p in pick([0], ["self_attn"])} == {"forward", "backward", "optimizer"}
    assert all(n.startswith("model.layers.2.") for n, _ in pick([2]))
    assert pick([0], ["router"]) == []  # layer 0 is dense


# ---- stepping -----------------------------------------------------------------------------------------------------
def test_step_through_pauses_after_each_event_and_stops_early():
    config, params = _model(np.float64)
    st = step_through(config, params, _tokens(), _tokens())
    seen = []
    for event in st:
        seen.append(event)
        assert len(st.events) == len(seen)  # the model thread waits for us
        if len(seen) == 5:
            break
    assert [e.name for e in seen][:2] == ["model.embed_tokens", "rope_tables"]
    assert not any(t.name == "trinity-step-through" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="runs once"):
        list(st)


def test_errors_inside_the_model_reach_the_caller():
    class Broken(ReferenceOps):
        @staticmethod
        def swiglu_forward(a, c):
            raise FloatingPointError("boom in swiglu")

    config, params = _model(np.float64)
    with pytest.raises(FloatingPointError, match="boom"):
        list(step_through(config, params, _tokens(), ops=Broken()))


def test_attention_entropy():
    rng = np.random.default_rng(0)
    B, T, h, dh = 1, 12, 4, 8
    k = rng.normal(size=(B, T, 2, dh))
    uniform = np.zeros((B, T, h, dh))  # all scores equal: entropy = log(number of allowed keys)
    assert np.allclose(attention_entropy(uniform, k)[0, 0], np.log(np.arange(1, T + 1)))
    assert np.allclose(attention_entropy(uniform, k, window=3)[0, 2], np.log(np.minimum(np.arange(1, T + 1), 3)))
    doc = np.array([[0] * 5 + [1] * 7])
    expected = np.log(np.r_[np.arange(1, 6), np.arange(1, 8)])
    assert np.allclose(attention_entropy(uniform, k, doc_ids=doc)[0, 3], expected)
    sharp = rng.normal(size=(B, T, h, dh))
    H = attention_entropy(sharp * 50, k)
    assert np.all(H >= -1e-12) and np.all(H <= np.log(np.arange(1, T + 1)) + 1e-9)


# ---- trinity inspect ----------------------------------------------------------------------------------------------
def _checkpoint(tmp_path, dtype=np.float32, extra=None, tokenizer=None):
    config, params = _model(dtype)
    path = tmp_path / "model.h5"
    opt = init_optimizer_state(config, params)
    bal = init_balancing_state(config, params)
    save_checkpoint(path, config=config, params=params, optimizer_state=opt, balancing_state=bal, step=0,
                    tokens_seen=0, data_state={}, rng_state=None, extra=extra, tokenizer=tokenizer)
    return path, config, params


TOKENS = [5, 17, 9, 33, 2, 100, 7, 7, 41, 200, 3, 12]


def test_inspect_dump_is_bitwise_logits_and_loss_and_grads(tmp_path, capsys):
    path, config, params = _checkpoint(tmp_path)
    trace = tmp_path / "trace.h5"
    assert main(["inspect", str(path), "--tokens", ",".join(map(str, TOKENS)), "--step", "--dump", str(trace)]) == 0
    out = capsys.readouterr().out
    for text in ("== forward ==", "== backward (gradients) ==", "== load balancing (smebu) ==", "== optimizer step ==",
                 "attention entropy per head", "expert load", "router: top-2 of 8"):
        assert text in out, text

    tokens = np.asarray([TOKENS])
    recorded = read_trace(trace)
    root = recorded.pop(None)
    assert root["tokens"].tolist() == [TOKENS] and json.loads(root["attrs"]["config"]) == config.to_dict()
    assert _equal(recorded[("lm_head", "forward")]["outputs"]["y"], logits(config, params, tokens))
    losses, grads, _ = loss_and_grads(config, params, tokens, tokens)
    assert json.loads(root["attrs"]["losses"]) == losses
    found = set()
    grad_names = {"dw": "w", "dgain": "gain", "dtable": "table", "dw_router": "w_router", "dw1": "w1",
                  "dw3": "w3", "dw2": "w2"}
    for (name, phase), rec in recorded.items():
        if phase != "backward":
            continue
        for out_name, arg in grad_names.items():
            if out_name in rec["outputs"]:
                key = rec["params"][arg]
                assert _equal(rec["outputs"][out_name], grads[key]), key
                found.add(key)
    assert found == {k for k in params if not k.endswith("expert_bias")}
    # matrices are named, not copied; small parameters (gains, bias) are copied
    q = recorded[("model.layers.1.self_attn.q_proj", "forward")]
    assert "w" not in q["inputs"] and q["params"] == {"w": "model.layers.1.self_attn.q_proj.weight"}
    assert _equal(q["outputs"]["y"], q["outputs"]["y"]) and q["inputs"]["x"].shape == (1, len(TOKENS), 64)
    assert "gain" in recorded[("model.norm", "forward")]["inputs"]
    # the step: updates equal the trainer's
    mine = {k: v.copy() for k, v in params.items()}
    clipped, _ = clip_grad_norm(grads, config.grad_clip_norm)
    _, _, stats = loss_and_grads(config, params, tokens, tokens)
    balance_step(config, mine, init_balancing_state(config, mine),
                 {l: s["expert_counts"] for l, s in stats["layers"].items()})
    optimizer_step(config, mine, clipped, init_optimizer_state(config, mine), config.muon_lr, config.adamw_lr)
    for (name, phase), rec in recorded.items():
        if phase == "optimizer":
            key = rec["params"]["param"]
            assert _equal(rec["outputs"]["update"], mine[key] - params[key]), key
        if phase == "balancing":
            assert _equal(rec["outputs"]["bias"], mine[name])
            assert _equal(rec["inputs"]["bias"], params[name])


def test_inspect_backend_traces_that_backend(tmp_path, capsys):
    """--backend numba traces the numba table: the dumped gradients are numba's (bitwise), not the reference's."""
    pytest.importorskip("numba")
    from trinity.accel import get_backend

    path, config, params = _checkpoint(tmp_path)
    trace = tmp_path / "trace.h5"
    assert main(["inspect", str(path), "--tokens", ",".join(map(str, TOKENS)), "--step", "--backend", "numba",
                 "--op", "lm_head", "--dump", str(trace)]) == 0
    tokens = np.asarray([TOKENS])
    _, grads, _ = loss_and_grads(config, params, tokens, tokens, ops=get_backend("numba"))
    recorded = read_trace(trace)
    dw = recorded[("lm_head", "backward")]["outputs"]["dw"]
    assert _equal(dw, grads["lm_head.weight"])


def test_inspect_filters_the_table_and_the_dump(tmp_path, capsys):
    path, _, _ = _checkpoint(tmp_path)
    trace = tmp_path / "trace.h5"
    assert main(["inspect", str(path), "--tokens", "5,17,9,33", "--step", "--layer", "1", "--op", "router",
                 "--dump", str(trace)]) == 0
    out = capsys.readouterr().out
    recorded = read_trace(trace)
    recorded.pop(None)
    assert sorted(recorded) == [("model.layers.1.mlp.router", "backward"), ("model.layers.1.mlp.router", "forward"),
                                ("model.layers.1.mlp.router.gate", "optimizer")]
    rows = [line for line in out.splitlines() if "_forward" in line or "_backward" in line]
    assert rows and all("router" in line for line in rows)
    assert "-- layer 1 ·" in out and "-- layer 2 ·" not in out and "q_proj" not in out
    assert "attention entropy" not in out and "router: top-2" in out

    trace2 = tmp_path / "trace2.h5"
    assert main(["inspect", str(path), "--tokens", "5,17,9,33", "--layer", "0,3", "--op", "sdpa",
                 "--op", "q_proj", "--dump", str(trace2)]) == 0
    out = capsys.readouterr().out
    recorded = read_trace(trace2)
    recorded.pop(None)
    assert sorted(recorded) == [(f"model.layers.{l}.self_attn.{n}", "forward") for l in (0, 3)
                                for n in ("q_proj", "sdpa")]
    assert out.count("attention entropy per head") == 2 and "router:" not in out


def test_inspect_hf_directory_text_and_plot(tmp_path, capsys):
    config, params = _model(np.float32)
    save_pretrained(tmp_path / "hf", config, params)
    png = tmp_path / "router.png"
    assert main(["inspect", str(tmp_path / "hf"), "--text", "Hello, MoE!", "--tokenizer", "bytes",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "HF checkpoint" in out and "'H'" in out
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same forward from an HF directory and from the params in memory
    trace = tmp_path / "t.h5"
    assert main(["inspect", str(tmp_path / "hf"), "--tokens", "72,101,108", "--op", "lm_head",
                 "--dump", str(trace)]) == 0
    capsys.readouterr()
    y = read_trace(trace)[("lm_head", "forward")]["outputs"]["y"]
    assert _equal(y, logits(config, params, np.asarray([[72, 101, 108]])))


def test_inspect_text_uses_the_tokenizer_the_checkpoint_carries(tmp_path, capsys):
    """As `trinity generate` does: `--text` is encoded by the tokenizer our checkpoint carries (the training data's,
    saved with it), never by a file a path in the checkpoint names; without one the error says so in one line."""
    from trinity.reference.data.tokenizer import ByteTokenizer, tokenizer_record

    path, _, _ = _checkpoint(tmp_path, tokenizer=tokenizer_record(ByteTokenizer()))
    assert main(["inspect", str(path), "--text", "def main():", "--op", "lm_head"]) == 0
    by_text = capsys.readouterr().out
    ids = ByteTokenizer().encode("def main():")
    assert f"tokens {len(ids)}: 100:'d' 101:'e' 102:'f'" in by_text
    # the same forward as the ids themselves (labelled with the same tokenizer)
    assert main(["inspect", str(path), "--tokens", ",".join(map(str, ids)), "--op", "lm_head"]) == 0
    assert capsys.readouterr().out == by_text
    # a checkpoint that carries no tokenizer: the error says why
    bare = tmp_path / "bare"
    bare.mkdir()
    path, _, _ = _checkpoint(bare)
    assert main(["inspect", str(path), "--text", "def main():"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "carries no tokenizer" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["tiny"], "give exactly one of --text T or --tokens"),
    (["tiny", "--tokens", "1,2", "--text", "hi"], "give exactly one of"),
    (["tiny", "--tokens", "1,x,3"], "'x' is not an integer token id"),
    (["tiny", "--tokens", "1,256"], r"token id 256 is outside the vocabulary \[0, 256\)"),
    (["tiny", "--tokens", "1,2", "--layer", "4"], r"--layer 4: the model has layers 0..3"),
    (["tiny", "--tokens", "1,2", "--op", "nosuch"], "match no operator; operator names: .*q_proj"),
    (["tiny", "--text", "hi"], "--text needs a tokenizer"),
    (["no/such/model.h5", "--tokens", "1"], "no such checkpoint file or directory"),
    (["tiny", "--tokens", "1,2", "--dump", "no/such/dir/t.h5"], "--dump no/such/dir/t.h5: the folder .* does not exist"),
    (["tiny", "--tokens", "1,2", "--layer", "0", "--plot", "PLOT"], "--plot: no MoE layer among --layer 0"),
])
def test_inspect_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trinity inspect: error: "), err
    assert re.search(message, err[0]), err[0]


def test_inspect_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    assert main(["inspect", str(bad), "--tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


def test_tracing_the_numba_table():
    """The tracer wraps a backend unchanged: bitwise that backend's own results, the reference's event names and
    outputs (router scores, attention lse included: the backend keeps the reference's ctx layout)."""
    pytest.importorskip("numba")
    from trinity.accel import get_backend

    backend = get_backend("numba")
    config, params = _model(np.float64)
    tokens = _tokens()
    losses, grads, _ = loss_and_grads(config, params, tokens, tokens, ops=backend)
    st = step_through(config, params, tokens, tokens, ops=backend).run()
    assert st.losses == losses and all(_equal(st.grads[k], grads[k]) for k in grads)
    ref = step_through(config, params, tokens, tokens).run()
    assert [(e.name, e.phase, tuple(e.outputs)) for e in st.events] == \
           [(e.name, e.phase, tuple(e.outputs)) for e in ref.events]
    assert np.allclose(st.logits, ref.logits, rtol=0, atol=1e-12)
