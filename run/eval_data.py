"""The data of held-out evaluation: which sets a run evaluates, and the fixed batches read from each.

Eval sets. A run's [eval] section names one dataset (`path`: a prepared directory or a flat token file), or by
default evaluates the held-out set of each training source: `<source>/holdout`, written by `trinity data prepare
--holdout` (reference/data/prepare.py), one set per [[data.sources]] entry of a mixture (each named by its folder),
so a mixture's eval line has per-source losses. An eval set that is a training source itself is refused: its loss
would not be held out.

Fixed batches. An evaluation reads `count` batches of `sequences` rows of `seq_len` tokens spread evenly over the
whole set: the set's documents in the order of `seed`, packed into one stream of R = ⌊tokens / seq_len⌋ rows as in
training (reference/data/packing.py), of which it takes every k-th row, k = ⌊R / (count · sequences)⌋, from row 0 (so
a small evaluation samples the whole set, not its first documents; with k = 1 it is every row). A fresh loader reads
them each time: every evaluation of a run sees the same tokens, whatever the training stream did, and no training
loader is touched. Under a layout each rank reads only its rows of each batch (`rows`, the plan's), skipping the
others unread, as in training. A set that holds fewer rows than the batches need is refused (the loader would wrap
around and repeat documents).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from trinity.reference.data.packing import PackedTokenLoader
from trinity.reference.data.prepare import HOLDOUT_DIR
from trinity.reference.data.store import DataError, DocumentStore
from trinity.reference.training.step import GlobalBatch

__all__ = ["EvalSet", "whole_batches", "fixed_batches", "eval_sets", "token_bytes_of", "HOLDOUT_DIR"]


@dataclass
class EvalSet:
    """One evaluated dataset: its name in the metrics, its store, and its tokens' UTF-8 byte lengths (None:
    unknown, no bits per byte)."""
    name: str
    store: DocumentStore
    token_bytes: np.ndarray | None = None


def whole_batches(store, seq_len: int, sequences: int) -> int:
    """How many batches of `sequences` rows of `seq_len` tokens `store` holds without repeating a token: the most
    an evaluation of it may read (fixed_batches refuses more)."""
    return store.num_tokens // (sequences * seq_len)


def fixed_batches(store, seq_len: int, sequences: int, count: int, rows: slice | None = None, doc_ids: bool = True,
                  seed: int = 0):
    """`count` batches of `sequences` rows of `seq_len` tokens spread over `store` (module docstring), as
    GlobalBatch, each holding rows `rows` only (None: all). DataError when the store is too small."""
    if count > whole_batches(store, seq_len, sequences):
        raise DataError(f"{store.path}: the eval set holds {store.num_tokens:,} tokens, fewer than {count} batch(es) "
                        f"of {sequences} × {seq_len} tokens ({count * sequences * seq_len:,}); evaluate fewer "
                        f"batches or prepare a larger held-out set")
    stride = (store.num_tokens // seq_len) // (count * sequences)
    loader = PackedTokenLoader(store, seq_len, 1, seed=seed)
    return _batches(loader, count, sequences, stride, rows, doc_ids)


def _batches(loader, count, sequences, stride, rows, doc_ids):
    a, b = (0, sequences) if rows is None else (rows.start, rows.stop)
    for _ in range(count):
        tokens, docs = [], []
        for i in range(sequences):  # row i of the batch: the first of the next `stride` rows, read only if kept
            t, d = loader.next_rows(stride, keep=slice(0, 1 if a <= i < b else 0))
            tokens.append(t)
            docs.append(d)
        tokens, docs = np.concatenate(tokens), np.concatenate(docs)
        yield GlobalBatch(tokens, doc_ids=docs if doc_ids else None, rows=rows,
                          sequences=sequences if rows is not None else None)


def token_bytes_of(store) -> np.ndarray | None:
    """The UTF-8 byte length of each token id of the store's tokenizer (a prepared directory's meta.json names it),
    or None when unknown (a flat token file, a tokenizer whose byte lengths cannot be known)."""
    from trinity.reference.data.tokenizer import TokenizerError, load_tokenizer, token_byte_lengths
    if getattr(store, "meta", None) is None:
        return None
    try:
        return token_byte_lengths(load_tokenizer(store.path))
    except (TokenizerError, OSError):
        return None


def _unique_names(paths) -> list[str]:
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def eval_sets(run, training_stores) -> list[EvalSet]:
    """The run's eval sets (module docstring), opened; errors (DataError) name the [eval] key or the source."""
    settings = run.evaluation
    training = {os.path.realpath(s.path) for s in training_stores}
    if settings.path is not None:
        paths, names, where = [settings.path], None, "[eval] path"
    else:
        sources = list(run.data_sources) if run.data_sources else [run.data_path]
        paths = [os.path.join(p, HOLDOUT_DIR) for p in sources]
        names, where = _unique_names(sources), "[eval] (default: each [data] source's held-out set)"
        for source, path in zip(sources, paths):
            if not os.path.isdir(path):
                raise DataError(f"{where}: {source} has no held-out set ({path}); prepare it with `trinity data "
                                f"prepare ... --holdout FRACTION`, or name an eval set with [eval] path")
    sets = []
    for i, path in enumerate(paths):
        if not os.path.exists(path):
            raise DataError(f"{where} = {path!r}: no such file or directory")
        if os.path.realpath(path) in training:
            raise DataError(f"{where} = {path!r}: is training data; its loss would not be held out")
        try:
            store = DocumentStore(path, run.eos_id if not os.path.isdir(path) else None)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        name = names[i] if names else os.path.basename(os.path.normpath(path))
        sets.append(EvalSet(name, store, token_bytes_of(store)))
    return sets
