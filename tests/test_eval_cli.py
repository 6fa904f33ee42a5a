"""`trinity eval` (cli/eval.py, run/eval_checkpoint.py): held-out loss of checkpoints of every kind and layout.

One tiny float64 model is written three ways (a training checkpoint file, a sharded checkpoint directory saved by a
dp_shard=2,ep=2 layout on virtual ranks, a Hugging Face directory); a byte-level dataset is prepared with a held-out
set. Properties a wrong implementation breaks:
- the three kinds give the same CE (to 1e-12), which is evaluate() of the params on fixed_batches directly (the
  wrong batches, rows, seq_len, masks or params would change it);
- the JSON and the table hold one row per checkpoint with the fields documented; the run file's seq_len is the
  default; a checkpoint with intra_document_mask is evaluated within documents;
- --backend numba agrees with the reference in float32;
- under real mpiexec (2 ranks: dp_shard=2,ep=2 over all three kinds, cp=2) the CE is the single process's to 1e-10;
- user errors are one line on stderr and exit status 2 (also under mpiexec: printed once).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from trinity.cli.main import main
from trinity.distributed.layout import Layout
from trinity.distributed.mesh import Mesh
from trinity.distributed.parallel_ops import parallelize
from trinity.distributed.sharded_checkpoint import save_sharded
from trinity.reference import Config, init_params
from trinity.reference.data.prepare import HOLDOUT_DIR, prepare
from trinity.reference.data.store import DocumentStore
from trinity.reference.data.tokenizer import ByteTokenizer, tokenizer_record
from trinity.reference.interop.hf import save_pretrained
from trinity.reference.model.ops import REFERENCE
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.checkpoint import save_checkpoint
from trinity.reference.training.evaluation import evaluate
from trinity.reference.training.optim import init_optimizer_state
from trinity.run.eval_data import fixed_batches, token_bytes_of
from trinity.simulate.virtual.virtual_comm import VirtualCluster

from mpi_jobs import refused_by_every_rank, requires_mpi, run_mpi

S, T, BATCHES = 4, 16, 3
WORDS = ("alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta", "lambda", "zeta")


def tiny(**overrides) -> Config:
    base = dict(vocab_size=260, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=4,
                num_experts_per_tok=2, sliding_window=4, intra_document_mask=False, z_loss_coeff=1e-3,
                balance_loss_coeff=1e-2)
    return Config.preset("tiny").replace(**{**base, **overrides})


def model_params(config: Config, seed: int = 1) -> dict:
    """init_params in float64 with a random float32 expert_bias (which moves the routing)."""
    params = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for k, v in params.items():
        if k.endswith("mlp.expert_bias"):
            params[k] = (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
    return params


def save_single(path, config, params, tokenizer=(tokenizer_record(ByteTokenizer())), extra=None, step=5) -> str:
    return save_checkpoint(path, config=config, params=params, optimizer_state=init_optimizer_state(config, params),
                           balancing_state=init_balancing_state(config, params), step=step, tokens_seen=640,
                           data_state={}, rng_state=None, tokenizer=tokenizer, extra=extra)


def _save_rank(comm, directory, layout, config, params):
    mesh = Mesh(comm, layout, config=config)
    _, sharded, state = parallelize(REFERENCE, mesh, config, params, init_optimizer_state(config, params))
    common = dict(balancing_state=init_balancing_state(config, params), tokens_seen=640, data_state={},
                  rng_state=None, tokenizer=tokenizer_record(ByteTokenizer()))
    return save_sharded(directory, 5, mesh, sharded, state, common)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    (root / "text").mkdir()
    for i in range(60):
        words = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), int(rng.integers(8, 30))))
        (root / "text" / f"d{i:03d}.txt").write_text(f"doc {i}: {words}.\n", encoding="utf-8")
    prepare([root / "text"], root / "data", use_bytes=True, holdout=0.3, workers=1, progress=False,
            log=lambda *a: None)
    config = tiny()
    params = model_params(config)
    single = save_single(root / "step_00000005.h5", config, params)
    sharded = VirtualCluster(2).run(_save_rank, root / "sharded", Layout.parse("dp_shard=2,ep=2"), config,
                                    params)[0]
    save_pretrained(root / "hf", config, params)
    held = str(root / "data" / HOLDOUT_DIR)
    store = DocumentStore(held)
    want = evaluate(config, params, fixed_batches(store, T, S, BATCHES, doc_ids=False),
                    token_bytes=token_bytes_of(store))
    return dict(root=root, config=config, params=params, single=str(single), sharded=str(sharded),
                hf=str(root / "hf"), data=held, store=store, want=want)


def run_eval(capsys, *args):
    """`trinity eval ARGS` in this process: (status, stdout, stderr)."""
    capsys.readouterr()
    try:
        status = main(["eval", *map(str, args)])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def eval_json(capsys, tmp_path, *args, name="out.json"):
    path = tmp_path / name
    status, out, err = run_eval(capsys, *args, "--json", path, "--no-progress")
    assert status == 0, err
    return json.loads(path.read_text()), out


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(b), 1e-300)


# ---- one process ----------------------------------------------------------------------------------------------------
def test_the_three_kinds_give_evaluate_of_their_params_one_row_each(world, capsys, tmp_path):
    w = world
    rows, out = eval_json(capsys, tmp_path, w["single"], w["sharded"], w["hf"], "--data", w["data"], "--seq-len", T,
                          "--sequences-per-batch", S, "--batches", BATCHES)
    want = w["want"]
    assert [r["kind"] for r in rows] == ["checkpoint", "sharded", "hf"]
    assert [r["path"] for r in rows] == [w["single"], w["sharded"], w["hf"]]
    assert [r["step"] for r in rows] == [5, 5, None]
    for r in rows:
        assert close(r["ce"], want.losses["ce"], 1e-12), (r, want.losses)
        assert r["loss"]["ce"] == r["ce"] and set(r["loss"]) == {"total", "ce", "z", "balance"}
        assert (r["tokens"], r["sequences"], r["batches"]) == (BATCHES * S * (T - 1), BATCHES * S, BATCHES)
        assert r["tokens"] == want.tokens
        assert close(r["perplexity"], math.exp(r["ce"]), 1e-12)
        assert close(r["bits_per_byte"], want.bits_per_byte, 1e-12)  # bytes: one byte per token but EOS
        assert (r["seq_len"], r["data"], r["dtype"]) == (T, w["data"], "float64")
    # our two kinds keep the recipe (z and balance coefficients): every loss part is evaluate()'s
    for r in rows[:2]:
        for part in ("total", "z", "balance"):
            assert close(r["loss"][part], want.losses[part], 1e-12), part
    lines = out.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("checkpoint"))):]
    assert table[0].split() == ["checkpoint", "step", "tokens", "CE", "perplexity", "bits/byte"]
    assert [l.split()[0] for l in table[1:4]] == [w["single"], w["sharded"], w["hf"]]
    assert table[3].split()[1] == "—" and table[1].split()[1] == "5"
    assert table[1].split()[3] == f"{want.losses['ce']:.6f}"


def test_defaults_the_runs_seq_len_every_whole_batch_and_document_masks(world, capsys, tmp_path):
    """A checkpoint recording its run's seq_len (extra.seq_len, as the trainer writes it) evaluates at it by default,
    every whole batch of the set; the run file it names is never opened (here: a FIFO, which would block); with
    intra_document_mask its CE is evaluate()'s with the loader's document ids (and differs without)."""
    w = world
    config = tiny(intra_document_mask=True, eos_token_id=256)
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    ckpt = save_single(tmp_path / "step_00000007.h5", config, w["params"],
                       extra={"run_file": str(fifo), "seq_len": 8}, step=7)
    rows, _ = eval_json(capsys, tmp_path, ckpt, "--data", w["data"], "--sequences-per-batch", 2)
    count = w["store"].num_tokens // (2 * 8)
    assert (rows[0]["seq_len"], rows[0]["batches"], rows[0]["step"]) == (8, count, 7)
    masked = evaluate(config, w["params"], fixed_batches(w["store"], 8, 2, count, doc_ids=True))
    plain = evaluate(config, w["params"], fixed_batches(w["store"], 8, 2, count, doc_ids=False))
    assert close(rows[0]["ce"], masked.losses["ce"], 1e-12)
    assert not close(plain.losses["ce"], masked.losses["ce"], 1e-6)
    # --tokens: the batches that hold that many tokens, rounded up; --micro-batch-size does not change the loss
    rows2, _ = eval_json(capsys, tmp_path, ckpt, "--data", w["data"], "--sequences-per-batch", 2, "--tokens", 17,
                         "--micro-batch-size", 1, "--seed", 0, name="b.json")
    again = evaluate(config, w["params"], fixed_batches(w["store"], 8, 2, 2, doc_ids=True))
    assert rows2[0]["batches"] == 2 and close(rows2[0]["ce"], again.losses["ce"], 1e-12)


def test_numba_agrees_with_the_reference_in_float32(world, capsys, tmp_path):
    w = world
    common = [w["single"], "--data", w["data"], "--seq-len", T, "--sequences-per-batch", S, "--batches", 2,
              "--dtype", "float32"]
    ref, _ = eval_json(capsys, tmp_path, *common, name="ref.json")
    fast, _ = eval_json(capsys, tmp_path, *common, "--backend", "numba", name="numba.json")
    assert ref[0]["dtype"] == fast[0]["dtype"] == "float32"
    assert close(fast[0]["ce"], ref[0]["ce"], 1e-5)
    assert close(ref[0]["ce"], evaluate(w["config"], w["params"], fixed_batches(w["store"], T, S, 2,
                                                                                doc_ids=False)).losses["ce"], 1e-5)


# ---- one-line errors ------------------------------------------------------------------------------------------------
def _refused(capsys, *args):
    status, out, err = run_eval(capsys, *args, "--no-progress")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("trinity eval: error: "), (status, err)
    return lines[0]


def test_user_errors_are_one_line(world, capsys, tmp_path):
    w = world
    data = ["--data", w["data"], "--seq-len", T, "--sequences-per-batch", S]
    assert "no such file or directory" in _refused(capsys, tmp_path / "nope.h5", *data)
    (tmp_path / "notes.h5").write_text("not a checkpoint")
    assert "notes.h5" in _refused(capsys, tmp_path / "notes.h5", *data)
    (tmp_path / "empty").mkdir()
    assert "not a checkpoint" in _refused(capsys, tmp_path / "empty", *data)
    assert "--data" in _refused(capsys, w["single"], "--data", tmp_path / "missing", "--seq-len", T)
    # a flat token file needs --eos-id
    np.arange(100, dtype=np.uint32).tofile(tmp_path / "tokens.bin")
    assert "eos_id" in _refused(capsys, w["single"], "--data", tmp_path / "tokens.bin", "--seq-len", T)
    # byte tokens (EOS 256) beyond a model of 200 ids
    small = save_single(tmp_path / "step_00000001.h5", tiny(vocab_size=200), model_params(tiny(vocab_size=200)),
                        step=1)
    assert "token id 256" in _refused(capsys, small, *data)
    assert "fewer than one batch" in _refused(capsys, w["single"], "--data", w["data"], "--seq-len", 4096)
    assert "--batches" in _refused(capsys, w["single"], *data, "--batches", 0)
    assert "--batches 100000" in _refused(capsys, w["single"], *data, "--batches", 100000)
    assert "--seq-len 70000" in _refused(capsys, w["single"], "--data", w["data"], "--seq-len", 70000)
    # a checkpoint trained with another tokenizer than the data's: both named
    other = ({"kind": "bpe", "vocab_size": 260, "eos_id": 256, "sha256": "ab" * 32}, b"{}")
    foreign = save_single(tmp_path / "step_00000002.h5", w["config"], w["params"], tokenizer=other, step=2)
    line = _refused(capsys, foreign, *data)
    assert "bpe" in line and "bytes" in line and str(foreign) in line
    assert "micro-batch" in _refused(capsys, w["single"], *data, "--micro-batch-size", 3)
    assert "mpiexec" in _refused(capsys, w["single"], *data, "--mesh", "dp_shard=2")
    assert "is a folder" in _refused(capsys, w["single"], *data, "--json", tmp_path)


# ---- under real mpiexec ---------------------------------------------------------------------------------------------
@requires_mpi
def test_layouts_under_mpiexec_evaluate_the_single_process_loss(world, tmp_path):
    w = world
    common = ["--data", w["data"], "--seq-len", T, "--sequences-per-batch", S, "--batches", BATCHES,
              "--no-progress"]
    out = tmp_path / "ep.json"
    code, stdout, err, _ = run_mpi(2, ["-m", "trinity.cli", "eval", w["single"], w["sharded"], w["hf"], *common,
                                       "--mesh", "dp_shard=2,ep=2", "--json", out], timeout=120)
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [r["kind"] for r in rows] == ["checkpoint", "sharded", "hf"]
    assert stdout.count("checkpoint  ") == 1  # rank 0 alone prints the table
    for r in rows:
        assert close(r["ce"], w["want"].losses["ce"], 1e-10), r
        assert r["tokens"] == w["want"].tokens
    out = tmp_path / "cp.json"
    code, _, err, _ = run_mpi(2, ["-m", "trinity.cli", "eval", w["sharded"], *common, "--mesh", "cp=2", "--json",
                                  out], timeout=120)
    assert code == 0, err
    (r,) = json.loads(out.read_text())
    assert close(r["ce"], w["want"].losses["ce"], 1e-10) and r["tokens"] == w["want"].tokens


@requires_mpi
def test_an_error_under_mpiexec_ends_every_rank_with_one_line(world, tmp_path):
    w = world
    code, out, err, _ = run_mpi(2, ["-m", "trinity.cli", "eval", w["single"], "--data", w["data"], "--seq-len", T,
                                    "--batches", 100000, "--mesh", "dp_shard=2", "--no-progress"], timeout=60)
    assert refused_by_every_rank(code, out, err), (code, err)
    lines = [l for l in err.splitlines() if "trinity eval" in l]
    assert len(lines) == 1 and "--batches 100000" in lines[0], err
