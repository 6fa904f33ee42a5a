"""token_byte_lengths: per token id, the UTF-8 bytes of text it stands for (bits per byte of an evaluation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trinity.reference.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer,
                                              token_byte_lengths, train_bpe)

CORPUS = ["def main():\n    return 42  # ünïcödé\n", "print('héllo wörld 😀')\n", "naïve café — 日本語のテキスト\n",
          "\tx = [1, 2, 3]\r\n", "emoji 🎉🎉 and more 🧪\n"] * 20

# any text: ASCII, Latin-1, CJK, emoji (4-byte UTF-8), controls and whitespace; no lone surrogates (not encodable)
TEXTS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80) | st.sampled_from(CORPUS)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(CORPUS, 320, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def _total(lengths, ids):
    return int(lengths[np.asarray(ids, dtype=np.int64)].sum()) if ids else 0


def test_byte_tokenizer_is_one_byte_per_id_and_eos_nothing():
    lengths = token_byte_lengths(ByteTokenizer())
    assert lengths.dtype == np.int64 and lengths.shape == (257,)
    assert (lengths[:256] == 1).all() and lengths[256] == 0
    assert np.array_equal(token_byte_lengths("bytes"), lengths)


@given(TEXTS)
def test_byte_tokenizer_sums_to_the_text_bytes(text):
    tok = ByteTokenizer()
    lengths = token_byte_lengths(tok)
    ids = tok.encode(text) + [tok.eos_id]
    assert _total(lengths, ids) == len(text.encode("utf-8"))


@given(TEXTS)
def test_bpe_sums_to_the_text_bytes(bpe, text):
    lengths = token_byte_lengths(bpe)
    ids = bpe.encode(text)
    assert _total(lengths, ids) == len(text.encode("utf-8"))
    assert _total(lengths, ids + [bpe.eos_id] + ids) == 2 * len(text.encode("utf-8"))


def test_bpe_entries_are_their_bytes_and_specials_count_zero(bpe):
    lengths = token_byte_lengths(bpe)
    assert lengths.dtype == np.int64 and lengths.shape == (bpe.vocab_size,)
    assert lengths[bpe.eos_id] == 0
    assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"  # decoded as text, but it stands for no byte of a document
    # every non-special entry decodes (alone) to exactly its byte count when its bytes are valid UTF-8
    merged = 0
    for i in range(bpe.vocab_size):
        if i == bpe.eos_id:
            continue
        assert lengths[i] >= 1
        text = bpe.decode([i])
        if "\ufffd" not in text:
            assert lengths[i] == len(text.encode("utf-8")), (i, text)
            merged += lengths[i] > 1
    assert merged > 10  # the corpus taught it multi-byte merges


def test_a_prepared_dataset_directory_is_accepted(tmp_path, bpe):
    (tmp_path / "tokenizer.json").write_bytes(bpe.json_bytes())
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "bpe", "file": "tokenizer.json",
                                                                  "eos_id": bpe.eos_id}}))
    assert load_tokenizer(tmp_path).kind == "bpe"
    assert np.array_equal(token_byte_lengths(tmp_path), token_byte_lengths(bpe))
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "bytes"}}))
    assert np.array_equal(token_byte_lengths(str(tmp_path)), token_byte_lengths(ByteTokenizer()))


def test_added_tokens_count_as_the_byte_level_decoder_decodes_them(tmp_path, bpe):
    """GPT-2 style "hf" file with extra added tokens: a special one counts 0, a normal one its decoded bytes."""
    spec = json.loads(bpe.json_bytes())
    n = bpe.vocab_size
    spec["added_tokens"] += [
        {"id": n, "content": "<pad>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True},
        {"id": n + 1, "content": "Ġzz", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False},
        {"id": n + 2, "content": "x😀", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False}]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    tok = HFTokenizer(path, eos_id=bpe.eos_id)
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (n + 3,)
    assert lengths[n] == 0
    assert lengths[n + 1] == len(tok.decode([n + 1]).encode("utf-8")) == 3   # "Ġzz" -> " zz"
    assert lengths[n + 2] == len(tok.decode([n + 2]).encode("utf-8")) == 5   # not byte-level characters: as is
    ids = tok.encode("a zz x😀 b")
    assert _total(lengths, ids) == len("a zz x😀 b".encode("utf-8"))


def test_tokenizers_whose_bytes_are_unknown_give_none(tmp_path):
    from tokenizers import Tokenizer as Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    # sentencepiece style: Metaspace pre-tokenizer and decoder (tokens are not byte sequences)
    tok = Tok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["</s>", "<unk>"],
                                                        show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert token_byte_lengths(HFTokenizer(tmp_path / "tokenizer.json", eos_id=0)) is None
    # WordPiece: no decoder that gives bytes
    tok = Tok(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[EOS]"],
                                                              show_progress=False))
    tok.save(str(tmp_path / "wp.json"))
    assert token_byte_lengths(HFTokenizer(tmp_path / "wp.json", eos_id=1)) is None

    class Other(Tokenizer):
        kind, vocab_size, eos_id, path = "other", 10, 0, None

    assert token_byte_lengths(Other()) is None
