"""The numba backend's results do not depend on its thread count (accel/_jit.py: fixed task lists, no atomics,
cross-task sums in a fixed order), so a run resumed with another NUMBA_NUM_THREADS continues bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from strategies import random_params
from trinity.reference import Config, loss_and_grads


def test_training_step_is_bitwise_independent_of_thread_count(backend):
    if backend.name != "numba":
        pytest.skip("numba-specific")
    import numba

    most = numba.config.NUMBA_NUM_THREADS
    if most < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    config = Config.preset("tiny").replace(z_loss_coeff=1e-3, balance_loss_coeff=1e-2, intra_document_mask=True)
    params = {k: v.astype(np.float32) for k, v in random_params(config, 0).items()}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, 200))
    doc_ids = np.sort(rng.integers(0, 3, tokens.shape), axis=1)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, most):
            numba.set_num_threads(threads)
            results.append(loss_and_grads(config, params, tokens, tokens, doc_ids, ops=backend))
    finally:
        numba.set_num_threads(before)
    (l1, g1, _), (l2, g2, _) = results
    assert l1 == l2
    for key in g1:
        np.testing.assert_array_equal(g1[key], g2[key], err_msg=key)
