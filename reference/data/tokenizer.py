"""Tokenizers for the data pipeline (SPEC §10): one small interface over three kinds.

  kind "hf"    a Hugging Face tokenizer.json (e.g. the 200K-entry BPE of a released Trinity checkpoint), read with
               the `tokenizers` library. Only JSON is read: no Python code from a checkpoint is ever run.
  kind "bpe"   a byte-level BPE trained by us (`train_bpe`, used by `trinity data prepare --train-bpe V`). It is
               saved as a tokenizer.json, so it loads through the same `tokenizers` code as "hf"; the kind only
               records where it came from (a prepared dataset's meta.json names it).
  kind "bytes" raw UTF-8 bytes: ids 0..255 are the bytes, EOS = 256, vocab_size 257; decode uses errors="replace".

`load_tokenizer(source)` accepts
  - "bytes" (the byte tokenizer),
  - a prepared dataset directory (its meta.json `tokenizer` entry names the kind and file),
  - an HF checkpoint directory holding tokenizer.json (EOS from config.json `eos_token_id`, else tokenizer_config.json
    `eos_token`, else a well-known end-of-text special token),
  - a tokenizer.json path (EOS from a sibling config.json / tokenizer_config.json if present, else a well-known
    special token).
`eos_id=` overrides the EOS lookup. Every `Tokenizer` has `.encode(text) -> list[int]`, `.decode(ids) -> str`,
`.vocab_size`, `.eos_id`, `.kind` and `.path` (the tokenizer.json, or None for bytes).

`token_byte_lengths(tokenizer)` gives the number of UTF-8 bytes of text each token id stands for (bits per byte of
an evaluation), or None where a tokenizer's tokens are not byte sequences (e.g. sentencepiece / Metaspace).
"""

from __future__ import annotations

import hashlib
import json
import os

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "TokenizerError", "load_tokenizer", "train_bpe",
           "BPE_EOS_TOKEN", "KINDS", "tokenizer_record", "tokenizer_from_record", "token_byte_lengths"]

KINDS = ("hf", "bpe", "bytes")
BPE_EOS_TOKEN = "<|endoftext|>"
# Special tokens tried, in this order, when nothing names the EOS token.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


class TokenizerError(ValueError):
    """A tokenizer source that cannot be used; the message names the file."""


class Tokenizer:
    """Interface: encode(text) -> list[int], decode(ids) -> str, vocab_size, eos_id, kind, path."""

    kind: str
    vocab_size: int
    eos_id: int
    path: str | None

    def encode(self, text: str) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, ids) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def describe(self) -> dict:
        """What a prepared dataset's meta.json records about this tokenizer (`file` is filled in by the caller)."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def __repr__(self):
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, " \
               f"path={self.path!r})"


class ByteTokenizer(Tokenizer):
    """ids 0..255 are the UTF-8 bytes of the text, 256 is EOS; vocab_size 257."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256
    path = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) != self.eos_id).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A tokenizer.json read with the `tokenizers` library (kind "hf", or "bpe" for one we trained)."""

    def __init__(self, path, eos_id: int | None = None, kind: str = "hf", *, json_text: str | None = None):
        """Read the tokenizer.json at `path`; or, with `json_text`, parse that JSON text (a copy stored in a
        checkpoint; `path` then only labels it in messages and eos_id must be given)."""
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # pragma: no cover - dependency
            raise TokenizerError("the `tokenizers` package is needed for tokenizer.json files "
                                 "(pip install tokenizers)") from e
        if kind not in ("hf", "bpe"):
            raise TokenizerError(f"kind must be 'hf' or 'bpe' for a tokenizer.json, got {kind!r}")
        self.path = os.fspath(path)
        if json_text is None and not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        if json_text is not None and eos_id is None:
            raise TokenizerError(f"{self.path}: a tokenizer given as JSON text needs its eos_id")
        try:
            self._tok = _Tok.from_str(json_text) if json_text is not None else _Tok.from_file(self.path)
        except Exception as e:
            raise TokenizerError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        self._json_text = json_text
        self.kind = kind
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = int(eos_id) if eos_id is not None else self._find_eos()
        if not 0 <= self.eos_id < 2**32:
            raise TokenizerError(f"{self.path}: eos_id {self.eos_id} out of range")

    def _find_eos(self) -> int:
        folder = os.path.dirname(os.path.abspath(self.path))
        config = _read_json(os.path.join(folder, "config.json"))
        if isinstance(config, dict):
            eos = config.get("eos_token_id")
            if isinstance(eos, list) and eos:
                eos = eos[0]
            if isinstance(eos, int) and not isinstance(eos, bool):
                return eos
        tconf = _read_json(os.path.join(folder, "tokenizer_config.json"))
        if isinstance(tconf, dict):
            eos = tconf.get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and self._tok.token_to_id(eos) is not None:
                return int(self._tok.token_to_id(eos))
        for name in _EOS_CANDIDATES:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return int(tid)
        raise TokenizerError(f"{self.path}: cannot tell the EOS token (no config.json eos_token_id, no "
                             f"tokenizer_config.json eos_token, none of {list(_EOS_CANDIDATES)}); pass eos_id=")

    def __getstate__(self):  # pickles as its file or JSON text (for worker processes)
        return {"path": self.path, "eos_id": self.eos_id, "kind": self.kind, "json_text": self._json_text}

    def __setstate__(self, state):
        self.__init__(state["path"], state["eos_id"], state["kind"], json_text=state.get("json_text"))

    def json_bytes(self) -> bytes:
        """The tokenizer.json this tokenizer was read from, byte for byte."""
        if self._json_text is not None:
            return self._json_text.encode("utf-8")
        with open(self.path, "rb") as f:
            return f.read()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)


# ---- a tokenizer carried inside a checkpoint ----------------------------------------------------------------------
def tokenizer_record(tok: Tokenizer) -> tuple[dict, bytes | None]:
    """(info, tokenizer.json bytes or None) that `tokenizer_from_record` turns back into the same tokenizer:
    info = {kind, vocab_size, eos_id, sha256 of the JSON bytes (None for bytes)}."""
    blob = None if isinstance(tok, ByteTokenizer) else tok.json_bytes()
    info = dict(tok.describe(), sha256=hashlib.sha256(blob).hexdigest() if blob is not None else None)
    return info, blob


def tokenizer_from_record(info: dict, blob: bytes | None, where: str = "checkpoint") -> Tokenizer:
    """The tokenizer stored by `tokenizer_record`; `where` names the container in errors."""
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind not in ("hf", "bpe") or blob is None:
        raise TokenizerError(f"{where}: stored tokenizer of kind {kind!r} cannot be read")
    if info.get("sha256") != hashlib.sha256(blob).hexdigest():
        raise TokenizerError(f"{where}: stored tokenizer.json does not match its sha256")
    try:
        text = bytes(blob).decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{where}: stored tokenizer.json is not UTF-8") from None
    return HFTokenizer(f"{where}:tokenizer.json", info.get("eos_id"), kind, json_text=text)


def _read_json(path):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_tokenizer(source, eos_id: int | None = None, kind: str | None = None) -> Tokenizer:
    """The tokenizer named by `source`: "bytes", a prepared dataset dir (meta.json), an HF checkpoint dir holding
    tokenizer.json, or a tokenizer.json path. `kind` ("hf" or "bpe") labels a tokenizer.json; `eos_id` overrides
    the EOS lookup."""
    if isinstance(source, Tokenizer):
        return source
    src = os.fspath(source)
    if src == "bytes":
        return ByteTokenizer()
    if os.path.isdir(src):
        meta = _read_json(os.path.join(src, "meta.json"))
        if isinstance(meta, dict) and isinstance(meta.get("tokenizer"), dict):
            info = meta["tokenizer"]
            k = info.get("kind")
            if k == "bytes":
                return ByteTokenizer()
            if k in ("hf", "bpe"):
                f = info.get("file")
                if not isinstance(f, str):
                    raise TokenizerError(f"{src}/meta.json: tokenizer kind {k!r} names no file")
                f = f if os.path.isabs(f) else os.path.join(src, f)
                return HFTokenizer(f, info.get("eos_id") if eos_id is None else eos_id, k)
            raise TokenizerError(f"{src}/meta.json: unknown tokenizer kind {k!r} (expected one of {list(KINDS)})")
        path = os.path.join(src, "tokenizer.json")
        if os.path.isfile(path):
            return HFTokenizer(path, eos_id, kind or "hf")
        raise TokenizerError(f"{src}: neither a prepared dataset (meta.json with a tokenizer entry) nor a "
                             f"checkpoint directory with tokenizer.json")
    if os.path.isfile(src):
        return HFTokenizer(src, eos_id, kind or "hf")
    raise FileNotFoundError(f"tokenizer source not found: {src}")


def train_bpe(texts, vocab_size: int, out_path, eos_token: str = BPE_EOS_TOKEN, show_progress: bool = False,
              length: int | None = None) -> HFTokenizer:
    """Train a byte-level BPE of `vocab_size` entries (256 byte symbols + merges + the EOS special token, id 0) on
    the iterable of strings `texts` with the `tokenizers` library (ByteLevel pre-tokenizer and decoder), save it as
    tokenizer.json at `out_path` atomically and return it (kind "bpe")."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ..files import atomic_path

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise TokenizerError(f"BPE vocab size must be an integer >= 258 (256 bytes + EOS + 1 merge), "
                             f"got {vocab_size!r}")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    with atomic_path(out_path) as tmp:
        tok.save(tmp)
    return HFTokenizer(out_path, eos_id=tok.token_to_id(eos_token), kind="bpe")


# ---- bytes per token (bits per byte) ------------------------------------------------------------------------------
def _byte_level_table() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the printable character that stands for each byte in a byte-level
    BPE vocabulary -> that byte (the `tokenizers` ByteLevel pre-tokenizer and decoder use the same table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _byte_level_length(token: str, table: dict[str, int]) -> int:
    """Bytes the ByteLevel decoder turns `token` into: one per character when every character is in the table,
    else the token's own UTF-8 bytes (what `tokenizers` does with such a token)."""
    if all(c in table for c in token):
        return len(token)
    return len(token.encode("utf-8"))


def token_byte_lengths(tokenizer):
    """int64 array [vocab_size]: the number of UTF-8 bytes of text each token id stands for, so that the sum over a
    token sequence is the byte length of the text it decodes to; None when that cannot be known.

    `tokenizer`: a Tokenizer, or any source `load_tokenizer` accepts (e.g. a prepared dataset directory).
    Byte tokenizer: 1 for ids 0..255, 0 for EOS. A tokenizer.json whose decoder is ByteLevel (our "bpe", GPT-2
    style "hf" tokenizers): each vocabulary entry's characters mapped back through GPT-2's bytes_to_unicode table
    (one byte each); special tokens (EOS, ...) count 0; a non-special added token counts as the ByteLevel decoder
    decodes it. Ids the file does not name count 0; the array is longer than vocab_size only when the file's ids
    leave gaps. Any other tokenizer (e.g. sentencepiece / Metaspace, WordPiece): None.
    """
    import numpy as np

    tok = load_tokenizer(tokenizer)
    if isinstance(tok, ByteTokenizer):
        out = np.ones(tok.vocab_size, dtype=np.int64)
        out[tok.eos_id] = 0
        return out
    if not isinstance(tok, HFTokenizer):
        return None
    try:
        spec = json.loads(tok.json_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    decoder = spec.get("decoder") if isinstance(spec, dict) else None
    model = spec.get("model") if isinstance(spec, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel" and isinstance(vocab, dict)):
        return None
    added = [a for a in spec.get("added_tokens") or [] if isinstance(a, dict) and isinstance(a.get("id"), int)
             and isinstance(a.get("content"), str)]
    ids = [i for i in vocab.values() if isinstance(i, int)] + [a["id"] for a in added]
    out = np.zeros(max([tok.vocab_size] + [i + 1 for i in ids]), dtype=np.int64)
    table = _byte_level_table()
    for token, i in vocab.items():
        if isinstance(i, int) and i >= 0:
            out[i] = _byte_level_length(token, table)
    for a in added:  # added tokens replace a vocabulary entry of the same id
        if a["id"] >= 0:
            out[a["id"]] = 0 if a.get("special") else _byte_level_length(a["content"], table)
    return out
