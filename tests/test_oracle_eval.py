"""`trinity eval` against Hugging Face transformers (the oracle of tests/hf_oracle.py): the held-out CE of a
checkpoint written by save_pretrained is the mean token cross-entropy transformers' AfmoeForCausalLM computes.

A float64 model (random params, random float32 expert_bias, no intra-document mask: HF's model has none) is saved
with save_pretrained; the data is a flat token file. `trinity eval` runs as a command (--json). The oracle takes the
tokens of the same fixed batches (run/eval_data.fixed_batches), runs AfmoeForCausalLM in float64 with its float32
islands lifted (labels = the tokens), and averages the per-token cross-entropy of its logits over every target of
every batch: Σ_t (logsumexp(z_t) − z_{t, y_{t+1}}) / count. The two agree to 1e-10 relative (a wrong shift, wrong
batches, a dropped or double-counted token, a float32 step or a wrong mean would be off by far more).

transformers' own loss (labels=tokens; its mean over a batch's targets, weighted by the batch's target count) is the
same mean, but computed in float32 (loss_utils.ForCausalLMLoss casts the logits with `.float()`): it agrees to 1e-6.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/hf_oracle.py, under any import mode
import hf_oracle as O  # noqa: E402  (needs torch and transformers)

from trinity.cli.main import main  # noqa: E402
from trinity.reference import Config, init_params  # noqa: E402
from trinity.reference.data.store import DocumentStore  # noqa: E402
from trinity.reference.interop.hf import save_pretrained  # noqa: E402
from trinity.run.eval_data import fixed_batches  # noqa: E402

pytestmark = pytest.mark.oracle

S, T, BATCHES, EOS = 3, 24, 4, 0


def _model():
    config = Config.preset("tiny").replace(
        vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
        sliding_window=6, intra_document_mask=False, eos_token_id=EOS)
    params = init_params(config, seed=3, dtype=np.float64)
    rng = np.random.default_rng(3)
    for k, v in params.items():
        if k.endswith("mlp.expert_bias"):
            params[k] = (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
        elif k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight"):
            params[k] = v + 0.05 * rng.standard_normal(v.shape)  # logits far from uniform: a real CE
    return config, params


def _token_file(path, config, n=BATCHES * S * T + 200):
    """Documents of random lengths of random ids in [1, vocab), each ending with EOS."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, config.vocab_size, n).astype(np.uint32)
    tokens[rng.random(n) < 1 / 15] = EOS
    tokens[-1] = EOS
    tokens.tofile(path)


def test_eval_is_transformers_mean_token_cross_entropy(tmp_path, capsys):
    config, params = _model()
    save_pretrained(tmp_path / "hf", config, params)
    _token_file(tmp_path / "tokens.bin", config)
    out = tmp_path / "eval.json"
    status = main(["eval", str(tmp_path / "hf"), "--data", str(tmp_path / "tokens.bin"), "--eos-id", str(EOS),
                   "--seq-len", str(T), "--sequences-per-batch", str(S), "--batches", str(BATCHES), "--json",
                   str(out), "--no-progress"])
    assert status == 0, capsys.readouterr().err
    (row,) = json.loads(out.read_text())
    assert row["dtype"] == "float64" and row["kind"] == "hf"

    model = O.load_hf(tmp_path / "hf", dtype=torch.float64)
    store = DocumentStore(tmp_path / "tokens.bin", EOS)
    total, count, hf_loss_sum = 0.0, 0, 0.0
    for batch in fixed_batches(store, T, S, BATCHES, doc_ids=False):
        tokens = np.asarray(batch.tokens, dtype=np.int64)
        z = O.hf_logits(model, tokens)[:, :-1].astype(np.float64)  # position t predicts token t+1
        target = tokens[:, 1:]
        top = z.max(axis=-1, keepdims=True)
        lse = top[..., 0] + np.log(np.exp(z - top).sum(axis=-1))
        total += float((lse - np.take_along_axis(z, target[..., None], axis=-1)[..., 0]).sum())
        count += target.size
        with torch.no_grad(), O.lifted():
            loss = model(input_ids=torch.as_tensor(tokens), labels=torch.as_tensor(tokens), use_cache=False).loss
        hf_loss_sum += float(loss) * target.size
    oracle = total / count
    assert row["tokens"] == count == BATCHES * S * (T - 1)
    assert abs(row["ce"] - oracle) <= 1e-10 * abs(oracle), (row["ce"], oracle)
    assert abs(hf_loss_sum / count - oracle) <= 1e-6 * abs(oracle)  # HF's loss: float32 logits
    assert abs(row["perplexity"] - np.exp(oracle)) <= 1e-9 * np.exp(oracle)
