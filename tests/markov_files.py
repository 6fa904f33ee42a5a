"""Token files of the tests' synthetic corpus: one Markov source (256 tokens, EOS 0, branching 4, documents of about
20 tokens, seed 0), so that runs in different test files read the same kind of data."""

from __future__ import annotations

from trinity.reference.data.store import write_token_file
from trinity.reference.data.synthetic import MarkovSource

__all__ = ["markov_token_file", "train_and_held_files"]


def _documents(count: int):
    return MarkovSource(256, eos_id=0, branching=4, mean_doc_len=20, seed=0).documents(count)


def markov_token_file(path, documents: int):
    """`documents` documents written to the token file `path`; returns path."""
    write_token_file(path, _documents(documents), eos_id=0)
    return path


def train_and_held_files(folder, documents: int):
    """(train.bin, held.bin) in `folder`: the first 4/5 of `documents` documents and the rest, disjoint."""
    docs = _documents(documents)
    cut = len(docs) * 4 // 5
    write_token_file(folder / "train.bin", docs[:cut], eos_id=0)
    write_token_file(folder / "held.bin", docs[cut:], eos_id=0)
    return folder / "train.bin", folder / "held.bin"
