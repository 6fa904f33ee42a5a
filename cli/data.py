"""`trinity data ...`: make token files for training.

  trinity data synthetic --out tokens.bin --vocab 256 --tokens 2000000
      a learnable Markov-chain stream with a known entropy floor (trinity.reference.data.synthetic), written as flat
      uint32 tokens with EOS-separated documents; the floor goes in tokens.bin.json and on stdout.

  trinity data prepare INPUTS... --out DIR [--tokenizer tokenizer.json | --train-bpe VOCAB | --bytes]
                       [--glob '*.py'] [--exclude PATTERN] [--errors strict|replace] [--shard-tokens N] [--workers N]
                       [--holdout FRACTION|N_DOCS]
      text files (each file one document; folders are walked recursively) tokenized in parallel into uint32 shards
      with document indexes and meta.json (trinity.reference.data.prepare). The directory is a [data] path for
      `trinity train`. --out is a new or empty directory, or a prepared dataset (prepared again in place); an
      existing file or another non-empty directory is refused before anything is written. --holdout 0.01 (a
      fraction: it holds "." or "e") or --holdout 500 (a number of documents) writes a held-out set, chosen by the
      SHA-256 of each file's content, as a prepared dataset of its own in DIR/holdout, never in the training shards.
      Example: the Python standard library with a byte-level BPE of 4096 entries trained on it:
        trinity data prepare "$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")" \
            --glob '*.py' --train-bpe 4096 --out data/stdlib
"""

from __future__ import annotations

import json
import os

from .common import CLIError

NAME = "data"
HELP = "make token data (prepare text files, synthetic streams)"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = sub.add_parser("synthetic", help="a Markov-chain token stream with a known entropy floor")
    s.add_argument("--out", required=True, help="output token file (uint32)")
    s.add_argument("--vocab", type=int, default=256, help="vocabulary size, EOS included (default 256)")
    s.add_argument("--eos-id", type=int, default=0)
    s.add_argument("--tokens", type=int, default=1_000_000, help="about this many tokens (default 1,000,000)")
    s.add_argument("--branching", type=int, default=4, help="successors per token (default 4)")
    s.add_argument("--mean-doc-len", type=float, default=64.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=run_synthetic)

    q = sub.add_parser("prepare", help="tokenize text files into a prepared dataset directory",
                       description="Tokenize text files (each one document) into uint32 token shards, document "
                                   "indexes and meta.json. Folders are walked recursively.")
    q.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    q.add_argument("--out", required=True, help="output directory")
    tok = q.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH",
                     help="a tokenizer.json, or an HF checkpoint directory holding one (kind 'hf')")
    tok.add_argument("--train-bpe", type=int, metavar="VOCAB",
                     help="train a byte-level BPE of this vocab size on the inputs (kind 'bpe')")
    tok.add_argument("--bytes", action="store_true",
                     help="raw UTF-8 bytes: ids 0..255, EOS 256 (kind 'bytes'; the default)")
    q.add_argument("--glob", help="only files in folders whose name matches this pattern, e.g. '*.py'")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip files and folders whose path or name matches (repeatable), e.g. 'site-packages'")
    q.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="files that are not valid UTF-8: strict = skip and report (default), replace = decode "
                        "with U+FFFD")
    q.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                   help="close a shard once it holds N tokens (default 2**28)")
    q.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizer processes (default: the usable cores)")
    q.add_argument("--holdout", metavar="FRACTION|N_DOCS",
                   help="hold documents out of training into OUT/holdout (a prepared dataset of its own), chosen by "
                        "the SHA-256 of their content: a fraction 0 < f < 1 (written with '.' or 'e'), or a number "
                        "of documents (the ones with the smallest hashes, plus exact duplicates of them)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    q.set_defaults(run=run_prepare)
    return p


def run_prepare(args) -> int:
    from trinity.reference.data.store import DataError
    from trinity.reference.data.prepare import DEFAULT_SHARD_TOKENS, prepare
    from trinity.reference.data.tokenizer import TokenizerError

    try:
        prepare(args.inputs, args.out, tokenizer=args.tokenizer, train_bpe_vocab=args.train_bpe,
                use_bytes=args.bytes, errors=args.errors,
                shard_tokens=DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
                workers=args.workers, glob=args.glob, exclude=tuple(args.exclude), progress=not args.no_progress,
                holdout=args.holdout)
    except (DataError, TokenizerError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except OSError as e:  # e.g. an output folder that cannot be written
        raise CLIError(f"cannot prepare into {args.out}: {e.strerror or e}"
                       + (f": {e.filename}" if e.filename else "")) from None
    return 0


def run_synthetic(args) -> int:
    from trinity.reference.data.store import write_token_file
    from trinity.reference.data.synthetic import MarkovSource

    try:
        source = MarkovSource(args.vocab, args.eos_id, args.branching, args.mean_doc_len, args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.tokens <= 0:
        raise CLIError(f"--tokens must be positive, got {args.tokens}")
    for path in (args.out, args.out + ".json"):
        if os.path.isdir(path):
            raise CLIError(f"--out {args.out}: {path} is a directory (--out names the token file to write)")
    documents = source.documents(args.tokens)
    floor = source.entropy_floor()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        written = write_token_file(args.out, documents, args.eos_id)
        meta = {"kind": "markov", "vocab_size": args.vocab, "eos_id": args.eos_id, "tokens": written,
                "documents": len(documents), "branching": args.branching, "mean_doc_len": args.mean_doc_len,
                "seed": args.seed, "entropy_floor_nats": floor}
        with open(args.out + ".json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    except OSError as e:
        raise CLIError(f"cannot write --out {args.out}: {e.strerror or e}"
                       + (f": {e.filename}" if e.filename else "")) from None
    print(f"wrote {written:,} tokens in {len(documents):,} documents to {args.out}; "
          f"entropy floor {floor:.4f} nats/token")
    return 0
