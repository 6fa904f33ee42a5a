"""`trinity data ...`: make token files for training.

  trinity data synthetic --out tokens.bin --vocab 256 --tokens 2000000
      a learnable Markov-chain stream with a known entropy floor (trinity.reference.synthetic), written as flat
      uint32 tokens with EOS-separated documents; the floor goes in tokens.bin.json and on stdout.
"""

from __future__ import annotations

import json
import os

from .common import CLIError

NAME = "data"
HELP = "make token files (synthetic streams)"


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
    return p


def run_synthetic(args) -> int:
    from trinity.reference.data import write_token_file
    from trinity.reference.synthetic import MarkovSource

    try:
        source = MarkovSource(args.vocab, args.eos_id, args.branching, args.mean_doc_len, args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.tokens <= 0:
        raise CLIError(f"--tokens must be positive, got {args.tokens}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    documents = source.documents(args.tokens)
    written = write_token_file(args.out, documents, args.eos_id)
    floor = source.entropy_floor()
    meta = {"kind": "markov", "vocab_size": args.vocab, "eos_id": args.eos_id, "tokens": written,
            "documents": len(documents), "branching": args.branching, "mean_doc_len": args.mean_doc_len,
            "seed": args.seed, "entropy_floor_nats": floor}
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    print(f"wrote {written:,} tokens in {len(documents):,} documents to {args.out}; "
          f"entropy floor {floor:.4f} nats/token")
    return 0
