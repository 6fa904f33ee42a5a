"""`trinity data prepare`: text files → a prepared token dataset directory (SPEC §10).

Inputs are files or folders (walked recursively in sorted order; `glob` filters the names found in folders, e.g.
"*.py"; `exclude` drops paths matching any of its patterns). Each file is one document. The tokenizer is one of
  - a tokenizer.json (or an HF checkpoint directory holding one): kind "hf", copied into the output as tokenizer.json;
  - a byte-level BPE of vocab size V trained here on the same files (`train_bpe=V`): kind "bpe", saved as
    tokenizer.json;
  - raw UTF-8 bytes (`use_bytes=True`, the default): kind "bytes", ids 0..255, EOS 256.

Text is decoded as UTF-8. A file that is not valid UTF-8 is, with errors="strict", skipped and reported (listed in
meta.json `undecodable` and in the summary line); with errors="replace" it is decoded with U+FFFD replacement
characters, kept, and listed in `replaced`. A file that cannot be read at all is skipped and listed in `unreadable`.
Special-token strings in the text (e.g. "<|endoftext|>") are encoded as plain text, so the EOS id only ever ends a
document.

Tokenizing runs in `workers` processes (default: the usable cores); the result does not depend on the number of
workers. The output directory holds
  shard_00000.bin, ...      uint32 tokens, each document followed by the EOS id (the flat format of store.py); a
                            shard is closed once it holds >= shard_tokens tokens (documents are never split)
  shard_00000.idx.npy, ...  int64 document start offsets within the shard (np.save, allow_pickle=False)
  meta.json                 tokenizer (kind, file, vocab size, EOS id), counts, shard list, problem files
  tokenizer.json            for kinds "hf" and "bpe"
Every file is written atomically (temp file, fsync, rename); meta.json is removed first and written last, so a
directory with meta.json always describes complete shards. The output is an empty or new directory, or a prepared
dataset, which is prepared again in place (stale shards removed); an existing file or a non-empty directory that is
not a prepared dataset is refused before anything is written (`check_output_dir`).

Held-out split (`holdout=` FRACTION or N_DOCS, `--holdout`; the rule is in holdout.py): the documents whose content
hash falls below the rule's bound are written, instead of into the training shards, into the subfolder
`holdout/` (HOLDOUT_DIR) as a complete prepared dataset of its own (meta.json of the same format, shards, indexes,
a tokenizer.json copy), which a DocumentStore opens like any other. A first pass reads and hashes every file (no
tokens are kept), so the rule is known, and a split that leaves nothing on one side is refused, before anything is
written. The training meta.json counts only the training documents ("files" still counts every input file, and
the problem lists cover both sides) and gains a "holdout" record (path, rule, what was asked: "fraction" or
"asked_documents", and the held-out "documents" and "tokens"); holdout/meta.json names the rule in "held_out_by".
A BPE trained here sees only the training documents. Preparing
again without a holdout removes a holdout/ folder left from before; holdout/meta.json is written before the top
meta.json, so a directory with meta.json always describes a complete split. A holdout/ that is not a folder this
module wrote is refused before anything is written.
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

from ..files import atomic_path
from .holdout import HOLDOUT_RULE, HoldoutError, HoldoutSpec, content_digest, count_rule, fraction_rule, \
    parse_holdout
from .store import META_FILE, TOKEN_DTYPE, DataError
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = ["prepare", "find_files", "check_output_dir", "PrepareError", "FORMAT", "DEFAULT_SHARD_TOKENS",
           "HOLDOUT_DIR"]

FORMAT = "trinity-prepared-tokens"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 28  # 1 GiB of uint32 per shard
_SHARD_PREFIX = "shard_"
HOLDOUT_DIR = "holdout"  # the held-out set's subfolder of a prepared dataset


class PrepareError(DataError):
    """Inputs or options that cannot be prepared; the message names them."""


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def find_files(inputs, glob: str | None = None, exclude=()) -> list[str]:
    """The files named by `inputs` (files, or folders walked recursively), sorted within each folder, without
    duplicates. `glob` filters file names found in folders (a file named directly is always taken); `exclude`
    patterns (fnmatch on the full path and on the name) drop files and whole folders."""
    out, seen = [], set()

    def excluded(path):
        return any(fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(os.path.basename(path), pat) for pat in exclude)

    def add(path):
        real = os.path.realpath(path)
        if real not in seen and not excluded(path):
            seen.add(real)
            out.append(path)

    for item in inputs:
        item = os.fspath(item)
        if os.path.isfile(item):
            add(item)
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not excluded(os.path.join(root, d)))
                for name in sorted(files):
                    if glob is None or fnmatch.fnmatch(name, glob):
                        path = os.path.join(root, name)
                        if os.path.isfile(path):
                            add(path)
        else:
            raise PrepareError(f"input not found: {item}")
    return out


# ---- per-file work (runs in worker processes) ------------------------------------------------------------------
_WORKER_TOKENIZER: Tokenizer | None = None


def _worker_init(tokenizer_spec):
    global _WORKER_TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER_TOKENIZER = _make_tokenizer(tokenizer_spec)


def _make_tokenizer(spec) -> Tokenizer:
    kind, path, eos_id = spec
    if kind == "bytes":
        return ByteTokenizer()
    tok = HFTokenizer(path, eos_id=eos_id, kind=kind)
    try:  # special-token strings in the text are text, never the EOS id (tokenizers >= 0.15)
        tok._tok.encode_special_tokens = True
    except AttributeError:  # pragma: no cover - old tokenizers
        pass
    return tok


def _read_text(path: str, errors: str):
    """(text or None, status, message, SHA-256 digest of the raw bytes or None): status "ok" | "replaced" |
    "undecodable" | "unreadable"."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, "unreadable", f"{type(e).__name__}: {e.strerror or e}", None
    digest = content_digest(data)
    try:
        return data.decode("utf-8"), "ok", "", digest
    except UnicodeDecodeError as e:
        message = f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}"
        if errors == "strict":
            return None, "undecodable", message, digest
        return data.decode("utf-8", errors="replace"), "replaced", message, digest


def _tokenize_file(job):
    """(status, message, uint32 token array without EOS or None, number of EOS ids dropped from the text, SHA-256
    digest of the file's bytes or None)."""
    path, errors = job
    text, status, message, digest = _read_text(path, errors)
    if text is None:
        return status, message, None, 0, digest
    tok = _WORKER_TOKENIZER
    try:
        ids = np.asarray(tok.encode(text), dtype=np.int64)
    except Exception as e:  # a tokenizer failure is reported, never a crash
        return "unreadable", f"tokenizer failed: {type(e).__name__}: {e}", None, 0, digest
    dropped = int(np.count_nonzero(ids == tok.eos_id))
    if dropped:
        ids = ids[ids != tok.eos_id]
    return status, message, ids.astype(TOKEN_DTYPE), dropped, digest


def _texts_for_training(files, errors, bar, rule=None):
    """The texts a BPE is trained on: every usable file's, less the held-out ones (`rule`)."""
    for path in files:
        text, _, _, digest = _read_text(path, errors)
        bar.update(1)
        if text is not None and not (rule is not None and rule.holds(digest)):
            yield text


def _usable_digests(files, errors, bar):
    """The first pass of a held-out split: the SHA-256 digest of every file that will be a document (readable, and
    valid UTF-8 unless errors="replace"), in file order. Reads each file once and keeps nothing."""
    for path in files:
        bar.update(1)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if errors == "strict":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
        yield content_digest(data)


def _holdout_rule(spec: HoldoutSpec, files, errors, bar):
    """The rule for `spec` over these files (holdout.py), after a first pass that refuses, in one line, a split
    leaving no document on one side."""
    if spec.documents is not None:
        rule, usable = count_rule(_usable_digests(files, errors, bar), spec.documents)
        if spec.documents >= usable:
            raise HoldoutError(f"--holdout {spec.documents}: the inputs hold only {usable} usable document(s), so "
                               f"nothing would be left to train on; hold out fewer")
        return rule
    rule = fraction_rule(spec.fraction)
    usable = held = 0
    for digest in _usable_digests(files, errors, bar):
        usable += 1
        held += rule.holds(digest)
    if held == 0 or held == usable:
        side = "none" if held == 0 else "all"
        raise HoldoutError(f"--holdout {spec.fraction:g} holds out {side} of the {usable} usable document(s); "
                           f"give {'a larger' if held == 0 else 'a smaller'} fraction or a number of documents")
    return rule


# ---- shard writing -----------------------------------------------------------------------------------------------
class _ShardWriter:
    """Writes documents into shard_NNNNN.bin (+ .idx.npy) files atomically, closing a shard at shard_tokens."""

    def __init__(self, out_dir: str, eos_id: int, shard_tokens: int):
        self.out_dir, self.eos = out_dir, np.array([eos_id], TOKEN_DTYPE)
        self.shard_tokens = shard_tokens
        self.shards, self.max_token = [], -1
        self._cm = self._file = None

    def _open(self):
        name = f"{_SHARD_PREFIX}{len(self.shards):05d}"
        self._name, self._starts, self._count = name, [], 0
        self._cm = atomic_path(os.path.join(self.out_dir, name + ".bin"))
        self._file = open(self._cm.__enter__(), "wb")

    def add(self, ids: np.ndarray):
        if self._file is None:
            self._open()
        self._starts.append(self._count)
        self._file.write(ids.tobytes())
        self._file.write(self.eos.tobytes())
        self._count += ids.size + 1
        if ids.size:
            self.max_token = max(self.max_token, int(ids.max()))
        if self._count >= self.shard_tokens:
            self.close()

    def close(self):
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self._cm.__exit__(None, None, None)
        index = self._name + ".idx.npy"
        with atomic_path(os.path.join(self.out_dir, index)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(self._starts, np.int64), allow_pickle=False)
        self.shards.append({"tokens": self._name + ".bin", "index": index, "num_tokens": self._count,
                            "num_documents": len(self._starts)})

    def abort(self, exc):
        if self._file is not None:
            self._file.close()
            self._file = None
            self._cm.__exit__(type(exc), exc, exc.__traceback__)


# ---- the output directory ----------------------------------------------------------------------------------------
def _ours(name: str) -> bool:
    """A file name that `prepare` writes: shards, indexes, tokenizer.json, meta.json, or their temporary files."""
    base = name.split(".tmp-", 1)[0] if ".tmp-" in name else name
    return base in (META_FILE, "tokenizer.json") or (base.startswith(_SHARD_PREFIX)
                                                     and (base.endswith(".bin") or base.endswith(".idx.npy")))


def _not_ours(directory: str, nested: bool = False) -> str | None:
    """Why the existing directory `directory` is not one that `prepare` may write into (a foreign meta.json, or
    files it does not write), or None. A holdout/ subfolder is judged by the caller (`nested`: `directory` is
    itself a holdout/ folder, which holds none)."""
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise PrepareError(f"output directory {directory}: cannot list it ({e.strerror or e})") from None
    meta_path = os.path.join(directory, META_FILE)
    if os.path.lexists(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
            return f"holds a {META_FILE} that is not a prepared dataset's (format {FORMAT!r})"
    strangers = sorted(n for n in names if not _ours(n) and (nested or n != HOLDOUT_DIR))
    if strangers:
        shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        return f"is not empty and is not a prepared dataset (it holds {shown})"
    return None


def check_output_dir(out_dir) -> None:
    """Refuse an output that `prepare` must not write into, before anything is written: an existing file (or
    anything else that is not a directory), and a non-empty directory that is not a prepared dataset. A prepared
    dataset (meta.json of this format) is prepared again in place, as is a directory holding only files that
    `prepare` writes (what an interrupted preparation leaves). Its holdout/ must be the same kind of folder (a real
    directory, not a link, holding a prepared dataset or only files `prepare` writes). Raises PrepareError naming
    the path."""
    out_dir = os.fspath(out_dir)
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        kind = "a file" if os.path.isfile(out_dir) else "not a directory"
        raise PrepareError(f"output {out_dir} exists and is {kind}; give a new or empty directory, or a prepared "
                           f"dataset to prepare again")
    problem = _not_ours(out_dir)
    hold = os.path.join(out_dir, HOLDOUT_DIR)
    if problem is None and os.path.lexists(hold):
        if os.path.islink(hold) or not os.path.isdir(hold):
            problem = f"holds a {HOLDOUT_DIR} that is not a held-out set prepare wrote (a link or not a folder)"
        else:
            inner = _not_ours(hold, nested=True)
            if inner is not None:
                problem = f"holds a {HOLDOUT_DIR}/ folder that {inner}"
    if problem is not None:
        raise PrepareError(f"output directory {out_dir} {problem}; give a new or empty directory")


# ---- the whole job -----------------------------------------------------------------------------------------------
def _remove_stale_shards(directory: str, writer: _ShardWriter) -> None:
    """Shards left from an earlier, larger preparation of the same directory."""
    keep = {name for s in writer.shards for name in (s["tokens"], s["index"])}
    for name in os.listdir(directory):
        if name.startswith(_SHARD_PREFIX) and (name.endswith(".bin") or name.endswith(".idx.npy")) \
                and name not in keep:
            os.remove(os.path.join(directory, name))


def _write_meta(directory: str, meta: dict) -> None:
    with atomic_path(os.path.join(directory, META_FILE)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


class _Side:
    """One side of the split being written: its shard writer and counts."""

    def __init__(self, directory, eos_id, shard_tokens):
        self.directory = directory
        self.writer = _ShardWriter(directory, eos_id, shard_tokens)
        self.documents = self.tokens = self.eos_dropped = 0
        self.replaced = []

    def add(self, ids, dropped):
        self.writer.add(ids)
        self.documents += 1
        self.tokens += ids.size + 1
        self.eos_dropped += dropped


def prepare(inputs, out_dir, tokenizer=None, train_bpe_vocab: int | None = None, use_bytes: bool = False,
            errors: str = "strict", shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
            glob: str | None = None, exclude=(), progress: bool = True, log=print, holdout=None) -> dict:
    """Prepare `inputs` into `out_dir` (module docstring). `holdout`: None, a fraction 0 < f < 1, a number of
    documents >= 1, or the CLI's string for either (holdout.parse_holdout). Returns the meta.json contents."""
    t0 = time.perf_counter()
    chosen = [x for x in (tokenizer is not None, train_bpe_vocab is not None, use_bytes) if x]
    if len(chosen) > 1:
        raise PrepareError("choose one of a tokenizer, train_bpe_vocab or use_bytes")
    if errors not in ("strict", "replace"):
        raise PrepareError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise PrepareError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    workers = usable_cores() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PrepareError(f"workers must be a positive integer, got {workers!r}")
    spec = None if holdout is None else parse_holdout(holdout)
    check_output_dir(out_dir)
    out_real = os.path.realpath(os.fspath(out_dir)) + os.sep  # never read our own output (a re-run into an input)
    files = [f for f in find_files(inputs, glob, exclude) if not os.path.realpath(f).startswith(out_real)]
    if not files:
        raise PrepareError(f"no input files found in {list(map(os.fspath, inputs))}"
                           + (f" matching {glob!r}" if glob else ""))
    out_dir = os.fspath(out_dir)

    from tqdm import tqdm

    def bar(desc):
        return tqdm(total=len(files), unit="file", desc=desc, file=sys.stderr, disable=not progress,
                    dynamic_ncols=True, mininterval=0.5)

    rule = None
    if spec is not None:  # the first pass: hashes only, and a refusal before anything is written
        with bar("hashing for the holdout") as b:
            rule = _holdout_rule(spec, files, errors, b)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, META_FILE)
    if os.path.exists(meta_path):  # the directory is not a valid dataset until the new meta.json is written
        os.remove(meta_path)
    tok_file = None
    if train_bpe_vocab is not None:
        tok_file = os.path.join(out_dir, "tokenizer.json")
        with bar("reading for BPE") as b:
            tok = train_bpe(_texts_for_training(files, errors, b, rule), train_bpe_vocab, tok_file,
                            show_progress=progress, length=len(files))
        log(f"trained a byte-level BPE tokenizer: vocab {tok.vocab_size}, EOS id {tok.eos_id} -> {tok_file}"
            + (" (on the training documents only)" if rule is not None else ""))
    elif tokenizer is not None:
        source = load_tokenizer(tokenizer)
        if source.kind == "bytes":
            tok = source
        else:
            tok_file = os.path.join(out_dir, "tokenizer.json")
            if os.path.abspath(source.path) != os.path.abspath(tok_file):
                with atomic_path(tok_file) as tmp:
                    shutil.copyfile(source.path, tmp)
            tok = HFTokenizer(tok_file, eos_id=source.eos_id, kind=source.kind)
    else:
        tok = ByteTokenizer()
    hold_dir = os.path.join(out_dir, HOLDOUT_DIR)  # (after the tokenizer is read: it may be a copy in there)
    if rule is None:
        if os.path.lexists(hold_dir):  # an old held-out set could overlap the new training data
            shutil.rmtree(hold_dir)
    else:
        os.makedirs(hold_dir, exist_ok=True)
        if os.path.exists(os.path.join(hold_dir, META_FILE)):
            os.remove(os.path.join(hold_dir, META_FILE))
    if tok_file is not None and rule is not None:
        with atomic_path(os.path.join(hold_dir, "tokenizer.json")) as tmp:
            shutil.copyfile(tok_file, tmp)
    spec_tuple = (tok.kind, tok_file, tok.eos_id)

    train = _Side(out_dir, tok.eos_id, shard_tokens)
    held = None if rule is None else _Side(hold_dir, tok.eos_id, shard_tokens)
    problems = {"undecodable": [], "unreadable": [], "replaced": []}
    jobs = [(p, errors) for p in files]
    pool = None
    try:
        if workers > 1 and len(files) > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, (spec_tuple,))
            results = pool.imap(_tokenize_file, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))
        else:
            _worker_init(spec_tuple)
            results = map(_tokenize_file, jobs)
        with bar("tokenizing") as b:
            for path, (status, message, ids, dropped, digest) in zip(files, results):
                b.update(1)
                if status != "ok":
                    problems[status].append({"path": path, "reason": message})
                if ids is None:
                    continue
                side = held if held is not None and rule.holds(digest) else train
                side.add(ids, dropped)
                if status == "replaced":
                    side.replaced.append({"path": path, "reason": message})
                b.set_postfix(tokens=f"{train.tokens:,}", refresh=False)
        for side in (train, held):
            if side is not None:
                side.writer.close()
    except BaseException as e:
        for side in (train, held):
            if side is not None:
                side.writer.abort(e)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if train.documents == 0:
        raise PrepareError(f"none of the {len(files)} input files could be used for training "
                           f"({len(problems['undecodable'])} undecodable, {len(problems['unreadable'])} unreadable"
                           + (f", {held.documents} held out)" if held is not None else ")"))
    if held is not None and held.documents == 0:
        raise PrepareError(f"holdout ({spec.describe()}): no document was held out (the files it chose could not "
                           f"be tokenized; {len(problems['unreadable'])} unreadable)")

    seconds = time.perf_counter() - t0
    common = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tokenizer": {"kind": tok.kind, "file": "tokenizer.json" if tok_file else None,
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      **({"source": os.path.abspath(os.fspath(tokenizer))} if tokenizer is not None
                         and tok.kind != "bytes" else {})},
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "token_dtype": "uint32-le",
    }

    def counts(side):
        return {"max_token_id": max(side.writer.max_token, tok.eos_id), "documents": side.documents,
                "tokens": side.tokens}

    settings = {"errors": errors, "glob": glob, "exclude": list(exclude),
                "inputs": [os.path.abspath(os.fspath(i)) for i in inputs], "shard_tokens": shard_tokens}
    record = None
    if held is not None:
        _remove_stale_shards(hold_dir, held.writer)
        record = {"path": HOLDOUT_DIR, "rule": HOLDOUT_RULE, **spec.record(), "documents": held.documents,
                  "tokens": held.tokens}
        _write_meta(hold_dir, {**common, **counts(held), "files": held.documents,
                               "held_out_by": {"rule": HOLDOUT_RULE, **spec.record()},
                               "undecodable": [], "unreadable": [], "replaced": held.replaced,
                               "eos_in_text_dropped": held.eos_dropped, **settings, "shards": held.writer.shards})
    _remove_stale_shards(out_dir, train.writer)
    meta = {
        **common, **counts(train),
        "files": len(files), **({"holdout": record} if record is not None else {}),
        "undecodable": problems["undecodable"], "unreadable": problems["unreadable"],
        "replaced": problems["replaced"], "eos_in_text_dropped": train.eos_dropped,
        **settings, "shards": train.writer.shards, "seconds": round(seconds, 3), "workers": workers,
    }
    _write_meta(out_dir, meta)
    summary = (f"prepared {train.documents:,} documents, {train.tokens:,} tokens ({tok.kind} tokenizer, vocab "
               f"{tok.vocab_size}, EOS {tok.eos_id}) from {len(files):,} files in {len(train.writer.shards)} "
               f"shard(s) -> {out_dir} in {seconds:.1f} s")
    if held is not None:
        extra = held.documents - spec.documents if spec.documents is not None else 0
        summary += (f"; held out {held.documents:,} documents, {held.tokens:,} tokens ({spec.describe()} by "
                    f"SHA-256 of content" + (f", plus {extra:,} exact duplicate(s) of them" if extra > 0 else "")
                    + f") -> {hold_dir}")
    log(summary)
    if problems["undecodable"]:
        log(f"skipped {len(problems['undecodable'])} file(s) that are not valid UTF-8 (errors=strict; listed in "
            f"meta.json 'undecodable'): " + ", ".join(p["path"] for p in problems["undecodable"][:5])
            + (" ..." if len(problems["undecodable"]) > 5 else ""))
    if problems["replaced"]:
        log(f"decoded {len(problems['replaced'])} file(s) with U+FFFD replacement characters (errors=replace; "
            f"listed in meta.json 'replaced')")
    if problems["unreadable"]:
        log(f"skipped {len(problems['unreadable'])} unreadable file(s) (listed in meta.json 'unreadable')")
    return meta
