"""Key/value cache for incremental decoding (SPEC §4.4-§4.6).

What is cached, per layer, are the keys and values exactly as attention consumes them: keys AFTER the QK-norm and,
on sliding layers, after RoPE at their absolute position; values as projected. A cached forward
(`model_forward(..., kv_cache=cache)`) processes any number of new tokens at once (a prompt: prefill) or one at a
time (decode); positions continue from `cache.length`, so a token at absolute position p gets RoPE at p.

- Sliding-window layers (window w): each query at position t sees exactly the keys s ∈ [t − w + 1, t] (SPEC §4.6),
  so the cache is a ring buffer of exactly w entries: the key at position p lives in slot p mod w. Memory is O(w)
  however long the sequence grows. For attention the ring is unrolled in position order (attention_forward needs
  keys sorted by position) and the new keys are appended.
- Global layers (NoPE, causal): a growing buffer holding every key so far (capacity doubles when full).

`LayerCache.gather_kv(...)` is what the attention block calls, in place of the op table's gather_kv seam
(model/seams.py: the cache is another implementation of the same interface): it stores the new keys and returns the
keys, values and positions the new queries attend to. The cache holds B rows that all advance together (no padding).

The buffers are arrays of the activations' module `xp` (a device's for a device table), read and written by slices
only (a ring's slots in position order are at most two runs), and the positions handed to attention are made there
too: a cached step moves nothing between host and device. `positions` (which slot holds which position) is host
bookkeeping.
"""

from __future__ import annotations

import numpy as np

from ..operators.array_module import array_bytes
from .config import Config

__all__ = ["KVCache", "LayerCache"]

_MIN_CAPACITY = 16


class LayerCache:
    """One layer's keys and values [B, slots, h_kv, d_h].

    window is w for a sliding layer (a ring of exactly w slots) or None for a global layer (a growing buffer).
    `positions` [slots] is the absolute position held by each slot (−1: empty). `length` counts the tokens seen.
    Buffers are allocated on the first update, in the dtype and array module of the keys.
    """

    def __init__(self, window: int | None, xp=np):
        if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
            raise ValueError(f"window must be a positive integer or None, got {window!r}")
        self.window = None if window is None else int(window)
        self.xp = xp
        self.length = 0
        self.k = self.v = None
        self.positions = np.zeros(0, dtype=np.int64)

    # ---- what attention sees -----------------------------------------------------------------------------------
    def update(self, k, v):
        """Store the keys / values [B, T, h_kv, d_h] of the next T positions (length … length+T−1) and return
        (k_all, v_all, q_pos, k_pos): the keys and values those T queries may attend to, sorted by position, with
        the positions of the queries [T] and of the keys [S]. The cache advances by T."""
        xp = self.xp
        B, T = k.shape[:2]
        if v.shape != k.shape:
            raise ValueError(f"keys {k.shape} and values {v.shape} must have the same shape")
        if self.k is None:
            cap = self.window if self.window is not None else max(_MIN_CAPACITY, T)
            self.k = xp.zeros((B, cap) + tuple(k.shape[2:]), dtype=k.dtype)
            self.v = xp.zeros_like(self.k)
            self.positions = np.full(cap, -1, dtype=np.int64)
        elif k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:] or k.dtype != self.k.dtype:
            raise ValueError(f"keys {k.shape} {k.dtype} do not fit this cache "
                             f"[{self.k.shape[0]}, *, {', '.join(map(str, self.k.shape[2:]))}] {self.k.dtype}")
        n = self.length
        q_pos = xp.arange(n, n + T, dtype=xp.int64)
        if self.window is None:
            if n + T > self.k.shape[1]:
                self._grow(n + T)
            self.k[:, n:n + T, ...] = k
            self.v[:, n:n + T, ...] = v
            self.positions[n:n + T] = np.arange(n, n + T)
            k_all, v_all = self.k[:, :n + T, ...], self.v[:, :n + T, ...]
            k_pos = xp.arange(n + T, dtype=xp.int64)
        else:
            w = self.window
            keep = min(n, w - 1)  # the older keys any new query can see: positions n−keep … n−1
            runs = _ring_runs(n - keep, keep, w)
            k_all = xp.concat([self.k[:, a:b, ...] for a, b, _ in runs] + [k], axis=1)
            v_all = xp.concat([self.v[:, a:b, ...] for a, b, _ in runs] + [v], axis=1)
            k_pos = xp.arange(n - keep, n + T, dtype=xp.int64)
            m = min(T, w)  # only the last w new keys stay
            for a, b, at in _ring_runs(n + T - m, m, w):
                i = T - m + at  # the new key of position n + T − m + at
                self.k[:, a:b, ...] = k[:, i:i + b - a, ...]
                self.v[:, a:b, ...] = v[:, i:i + b - a, ...]
                self.positions[a:b] = np.arange(n + T - m + at, n + T - m + at + b - a)
        self.length = n + T
        return k_all, v_all, q_pos, k_pos

    def gather_kv(self, k, v, positions, doc_ids, window):
        """The gather_kv seam (model/seams.py) for an incremental step: `update`, checking that the queries sit at
        the cache's next positions. No document mask and no backward (ctx None)."""
        if doc_ids is not None:
            raise ValueError("the KV-cache path does not take doc_ids (inference has no intra-document mask)")
        if window != self.window:
            raise ValueError(f"this cache holds a layer of window {self.window}, the attention asks for {window}")
        n = self.length
        k_all, v_all, q_pos, k_pos = self.update(k, v)
        positions = self.xp.asarray(positions)
        if positions.shape != q_pos.shape or not bool(self.xp.all(positions == q_pos)):  # one value read back
            raise ValueError(f"queries at positions {int(positions[0]) if positions.shape[0] else '?'}… do not "
                             f"continue the cache at {n}…")
        return k_all, v_all, k_pos, None, None

    def _grow(self, needed: int):
        xp = self.xp
        cap = max(needed, 2 * self.k.shape[1])
        shape = (self.k.shape[0], cap) + tuple(self.k.shape[2:])
        k, v = xp.zeros(shape, dtype=self.k.dtype), xp.zeros(shape, dtype=self.v.dtype)
        n = self.length
        k[:, :n, ...] = self.k[:, :n, ...]
        v[:, :n, ...] = self.v[:, :n, ...]
        self.k, self.v = k, v
        self.positions = np.concatenate([self.positions, np.full(cap - len(self.positions), -1, dtype=np.int64)])

    # ---- inspection --------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Entries held: min(length, w) for a sliding layer, length for a global one."""
        return self.length if self.window is None else min(self.length, self.window)

    def ordered(self):
        """(k, v, positions) of the held entries in position order: [B, size, h_kv, d_h] and [size]."""
        if self.k is None:
            return None, None, np.zeros(0, dtype=np.int64)
        pos = np.arange(self.length - self.size, self.length, dtype=np.int64)
        if self.window is None:
            return self.k[:, :self.length, ...], self.v[:, :self.length, ...], pos
        runs = _ring_runs(self.length - self.size, self.size, self.window)
        return (self.xp.concat([self.k[:, a:b, ...] for a, b, _ in runs], axis=1),
                self.xp.concat([self.v[:, a:b, ...] for a, b, _ in runs], axis=1), pos)

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else array_bytes(self.k) + array_bytes(self.v)


def _ring_runs(first: int, count: int, w: int) -> list:
    """The slots of positions first … first+count−1 in a ring of w slots (slot = position mod w, count ≤ w) as
    [(slot_lo, slot_hi, offset of slot_lo's position from `first`)]: at most two runs, in position order."""
    if count <= 0:
        return []
    a = first % w
    b = min(a + count, w)
    runs = [(a, b, 0)]
    if b - a < count:
        runs.append((0, count - (b - a), b - a))
    return runs


class KVCache:
    """The caches of every layer of a model: `layers[l]` is a LayerCache with the layer's window (SPEC §4.6).

    Pass it to `model_forward(..., kv_cache=cache)` / `logits(..., kv_cache=cache)`; each call continues at
    position `cache.length` and advances it. `xp` is the array module of the activations (numpy, or cupy for a GPU
    op table: pass `ops.xp`).
    """

    def __init__(self, config: Config, xp=np):
        self.config = config
        self.layers = [LayerCache(config.window_of(layer), xp) for layer in range(config.num_hidden_layers)]

    @property
    def length(self) -> int:
        """Tokens processed so far = the position of the next token."""
        return self.layers[0].length if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def __repr__(self) -> str:
        kinds = "".join("G" if c.window is None else "S" for c in self.layers)
        return f"KVCache(length={self.length}, layers={kinds}, nbytes={self.nbytes})"
