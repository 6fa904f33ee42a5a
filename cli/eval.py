"""`trinity eval CKPT [CKPT ...] --data DIR`: the held-out loss of checkpoints, one row each, on the same batches.

CKPT is a training checkpoint file (step_N.h5), a sharded checkpoint directory (step_N.sharded, from a layout) or a
Hugging Face checkpoint directory (config.json + safetensors); only their params are read (run/eval_checkpoint.py).
--data is a prepared dataset directory (a held-out set is `<prepared>/holdout`, written by `trinity data prepare
--holdout`: name it) or a flat token file with --eos-id.

Every checkpoint is evaluated on the same fixed batches (run/eval_data.py `fixed_batches`: N batches of
--sequences-per-batch rows of --seq-len tokens, rows spread evenly over the set packed as in training, documents in
the order of --seed),
with the training objective's forward (reference/training/evaluation.py): the mean token cross-entropy over every
target of the batches, its perplexity exp(CE), and bits per byte CE·tokens / (ln 2 · UTF-8 bytes of the targets)
when the set's tokenizer tells each token's bytes ("—" otherwise). A checkpoint whose config has
intra_document_mask attends within documents, as in training.

Defaults: --seq-len is the seq_len of the run that wrote the first checkpoint recording it (the trainer records
extra.seq_len), else 512, at most the model's max_position_embeddings; --batches every whole batch the set
holds (--tokens N: the batches that hold N tokens, rounded up); --micro-batch-size a rank's rows of a batch; --dtype
the checkpoint's own.

Under a layout (`mpiexec -n N python -m mpi4py -m trinity.cli eval CKPT --data DIR --mesh dp_shard=2,ep=2`) each
rank reads only its spans of the params and evaluates its rows and positions of every batch; the result is the
single process's. Rank 0 alone prints and writes --json. A problem any rank finds before evaluating ends every rank
with one line, printed once. With `--backend cupy` each rank uses one GPU (its place among its host's ranks); the
params and each batch go to the device, the sums come back (run/placement.py).

Refused in one line (exit 2): a missing path or one that is not a checkpoint, data that is missing or holds fewer
tokens than one batch (or than --batches asks for), token ids beyond a model's vocabulary, a training checkpoint whose
recorded tokenizer is not the data's, a --seq-len beyond max_position_embeddings, a layout that does not fit.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from trinity.accel import BACKENDS

from .common import CLIError, add_precision_argument
from .inputs import check_output_file, whole

NAME = "eval"
HELP = "held-out loss, perplexity and bits per byte of checkpoints on a dataset (one row per checkpoint)"
DEFAULT_SEQ_LEN = 512


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0],
                              epilog="examples: trinity eval runs/tiny/ckpt/step_00000300.h5 --data data/tiny/holdout; "
                                     "trinity eval ckpt/step_*.h5 ./Trinity-Nano --data held --batches 20 --json "
                                     "eval.json; mpiexec -n 2 python -m mpi4py -m trinity.cli eval "
                                     "ckpt/step_00000300.sharded --data held --mesh dp_shard=2,ep=2")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="a training checkpoint (step_N.h5), a sharded checkpoint directory (step_N.sharded) or a "
                        "Hugging Face checkpoint directory; several: one row each, on the same batches")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a prepared dataset directory (a held-out set: <prepared>/holdout) or a flat token file "
                        "(with --eos-id)")
    p.add_argument("--eos-id", type=whole(0), metavar="ID", help="the EOS id of a flat token file")
    p.add_argument("--seq-len", type=whole(2), metavar="T",
                   help=f"tokens per sequence (default: the seq_len the checkpoint's run trained with, when it "
                        f"records it, else {DEFAULT_SEQ_LEN}; at most max_position_embeddings)")
    p.add_argument("--sequences-per-batch", type=whole(1), default=8, metavar="S",
                   help="sequences per batch (default 8)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--batches", type=whole(1), metavar="N",
                        help="evaluate N batches, their rows spread over the set (default: every whole batch the "
                             "set holds)")
    amount.add_argument("--tokens", type=whole(1), metavar="N",
                        help="evaluate the batches that hold N tokens (rounded up to a whole batch)")
    p.add_argument("--micro-batch-size", type=whole(1), metavar="M",
                   help="sequences per forward on a rank (default: all of a rank's rows of a batch)")
    p.add_argument("--seed", type=whole(0), default=0, help="the order of the documents (default 0)")
    p.add_argument("--backend", default="reference", choices=BACKENDS,
                   help="operator table (trinity.accel.get_backend; default reference)")
    add_precision_argument(p)
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="compute dtype (default: the checkpoint's; an HF directory's is float64 for F64 weights, "
                        "else float32)")
    p.add_argument("--mesh", metavar="SPEC",
                   help="parallel layout under mpiexec: name=size pairs of dp_replicate, dp_shard, cp, ep, e.g. "
                        "dp_shard=2,ep=2; the job needs dp_replicate*dp_shard*cp ranks")
    p.add_argument("--json", metavar="PATH",
                   help="also write the results as JSON: a list with one object per checkpoint (written atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


@dataclass
class _Setup:
    """What every rank agreed to evaluate."""
    store: object
    token_bytes: object
    checkpoints: list
    seq_len: int
    sequences: int
    batches: int
    micro_batch_size: int
    layout: object
    backend: object  # the op table (None: the reference)
    several: bool  # a job of several ranks (a layout)
    rank: int


# ---- agreement between ranks --------------------------------------------------------------------------------------
def _user_errors() -> tuple:
    from trinity.distributed.layout import LayoutError
    from trinity.reference.data.store import DataError
    from trinity.reference.data.tokenizer import TokenizerError
    from trinity.reference.files import CheckpointError
    from trinity.reference.model.config import ConfigError
    from trinity.run.run_config import RunConfigError
    return CLIError, ConfigError, CheckpointError, DataError, LayoutError, RunConfigError, TokenizerError, OSError


def _together(comm, work):
    """work() on this rank. Alone, a user's error is a CLIError (one line). In a job of several ranks, the ranks
    then agree (run/startup.py `agree`): the first rank's error, if any rank had one, ends every rank alike, printed
    once."""
    several = comm is not None and comm.Get_size() > 1
    result, error = None, None
    try:
        result = work()
    except _user_errors() as e:
        error = e if isinstance(e, CLIError) else CLIError(" ".join(str(e).splitlines()))
        if not several:
            raise error from None
    if several:
        from trinity.run.run_config import RunConfigError
        from trinity.run.startup import agree
        try:
            agree(comm, None if error is None else str(error), None)
        except RunConfigError as agreed:
            raise CLIError(str(agreed), every_rank=True) from None
    return result


# ---- what is evaluated --------------------------------------------------------------------------------------------
def _open_data(args):
    from trinity.reference.data.store import DataError, DocumentStore
    if not os.path.exists(args.data):
        raise CLIError(f"--data {args.data}: no such file or directory")
    try:
        return DocumentStore(args.data, args.eos_id)
    except (DataError, OSError) as e:
        text = " ".join(str(e).splitlines())
        if args.eos_id is None and not os.path.isdir(args.data):
            text += "; pass --eos-id ID"
        raise CLIError(f"--data {text}" if text.startswith(args.data) else f"--data {args.data}: {text}") from None


def _tokenizer_text(info: dict) -> str:
    sha = info.get("sha256")
    return f"{info.get('kind')} (vocab {info.get('vocab_size')}" + (f", sha256 {sha[:12]}…)" if sha else ")")


def _check_tokenizers(args, store, checkpoints) -> None:
    """A training checkpoint that records its tokenizer must be evaluated on data of that tokenizer."""
    if getattr(store, "meta", None) is None or not any(ck.tokenizer for ck in checkpoints):
        return
    from trinity.reference.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_record
    try:
        data = tokenizer_record(load_tokenizer(store.path))[0]
    except (TokenizerError, OSError) as e:
        raise CLIError(f"--data {args.data}: its tokenizer cannot be read ({e})") from None
    for ck in checkpoints:
        was = ck.tokenizer
        if was and (was.get("kind"), was.get("sha256")) != (data.get("kind"), data.get("sha256")):
            raise CLIError(f"{ck.path} was trained with the tokenizer {_tokenizer_text(was)}, but --data "
                           f"{args.data} holds tokens of the tokenizer {_tokenizer_text(data)}: their ids mean "
                           f"different things; evaluate on data prepared with the checkpoint's tokenizer")


def _seq_len(args, checkpoints) -> int:
    from trinity.run.eval_checkpoint import run_seq_len
    if args.seq_len is not None:
        for ck in checkpoints:
            if args.seq_len > ck.config.max_position_embeddings:
                raise CLIError(f"--seq-len {args.seq_len}: exceeds max_position_embeddings = "
                               f"{ck.config.max_position_embeddings} of {ck.path}")
        return args.seq_len
    recorded = next((n for n in map(run_seq_len, checkpoints) if n), None)
    return min([recorded or DEFAULT_SEQ_LEN] + [ck.config.max_position_embeddings for ck in checkpoints])


def _batch_count(args, store, S: int, T: int) -> int:
    from trinity.run.eval_data import whole_batches
    per_batch = S * T
    holds = whole_batches(store, T, S)
    if holds == 0:
        raise CLIError(f"--data {args.data}: the set holds {store.num_tokens:,} tokens, fewer than one batch of "
                       f"{S} sequences × {T} tokens ({per_batch:,}); lower --sequences-per-batch or --seq-len, or "
                       f"hold out more documents")
    if args.batches is not None:
        count, option = args.batches, f"--batches {args.batches}"
    elif args.tokens is not None:
        count, option = -(-args.tokens // per_batch), f"--tokens {args.tokens}"
    else:
        return holds
    if count > holds:
        raise CLIError(f"{option}: --data {args.data} holds {store.num_tokens:,} tokens, {holds} whole batch(es) of "
                       f"{S} × {T} tokens; ask for at most {holds} batch(es)")
    return count


def _parse_layout(args, comm):
    """--mesh (default: no layout), before any file is opened."""
    from trinity.distributed.layout import Layout, LayoutError
    try:
        layout = Layout.parse(args.mesh) if args.mesh is not None else Layout()
    except LayoutError as e:
        raise CLIError(f"--mesh: {e}") from None
    if comm is None and layout.world_size > 1:
        raise CLIError(f"--mesh {layout} needs {layout.world_size} ranks, but no MPI launcher started this process: "
                       f"mpiexec -n {layout.world_size} python -m mpi4py -m trinity.cli eval ... --mesh {layout}")
    return layout


def _micro_batch_size(args, comm, layout, checkpoints, T: int, S: int) -> int:
    """--micro-batch-size (default: a rank's rows of a batch), and the layout checked against the job, every model
    and the batch."""
    from trinity.distributed.layout import LayoutError
    world = 1 if comm is None else comm.Get_size()
    mbs = args.micro_batch_size if args.micro_batch_size is not None else max(S // layout.dp, 1)
    if world == 1 and layout.world_size == 1:
        if S % mbs:
            raise CLIError(f"--micro-batch-size {mbs}: does not divide the {S} sequences of a batch")
        return mbs
    checked = mbs if args.micro_batch_size is not None else 1  # the default fits exactly when dp divides S
    for ck in checkpoints:
        try:
            layout.check(world_size=world, config=ck.config, seq_len=T, micro_batch_size=checked, batch_sizes=[S])
        except LayoutError as e:
            hint = "" if args.mesh else " (no layout was given: choose one with --mesh)"
            raise CLIError(f"--mesh: {ck.path}: {e}{hint}") from None
    return mbs


def _check_vocab(args, store, checkpoints, T: int, S: int, count: int, seed: int) -> None:
    """Every token id of the evaluated batches (all rows: every rank reads the same) is inside every model's
    vocabulary."""
    from trinity.run.eval_data import fixed_batches
    top = -1
    for batch in fixed_batches(store, T, S, count, doc_ids=False, seed=seed):
        top = max(top, int(batch.tokens.max()))
    for ck in checkpoints:
        if top >= ck.config.vocab_size:
            raise CLIError(f"--data {args.data}: token id {top} of the evaluated batches is outside the vocabulary "
                           f"[0, {ck.config.vocab_size}) of {ck.path}")


def _setup(args, comm) -> _Setup:
    """Everything before the first weight is read, checked (on every rank alike)."""
    from trinity.reference.files import CheckpointError
    from trinity.run.eval_checkpoint import open_checkpoint
    from trinity.run.eval_data import token_bytes_of

    from .common import load_backend

    rank = 0 if comm is None else comm.Get_rank()
    if args.json is not None and rank == 0:
        check_output_file(args.json, "--json", inputs=[p for p in [*args.checkpoints, args.data]
                                                        if os.path.exists(p)])
    layout = _parse_layout(args, comm)
    backend = load_backend(args.backend, args.precision)
    if backend is not None and backend.on_device:
        from trinity.run.placement import layout_problem
        problem = layout_problem(backend, layout)
        if problem:
            raise CLIError(f"--mesh: {problem}")
    checkpoints = []
    for path in args.checkpoints:
        try:
            checkpoints.append(open_checkpoint(path))
        except CheckpointError as e:
            raise CLIError(str(e)) from None
    store = _open_data(args)
    _check_tokenizers(args, store, checkpoints)
    S, T = args.sequences_per_batch, _seq_len(args, checkpoints)
    count = _batch_count(args, store, S, T)
    mbs = _micro_batch_size(args, comm, layout, checkpoints, T, S)
    _check_vocab(args, store, checkpoints, T, S, count, args.seed)
    return _Setup(store=store, token_bytes=token_bytes_of(store), checkpoints=checkpoints, seq_len=T, sequences=S,
                  batches=count, micro_batch_size=mbs, layout=layout, backend=backend,
                  several=comm is not None and comm.Get_size() > 1, rank=rank)


# ---- evaluating ---------------------------------------------------------------------------------------------------
def _evaluate_one(args, setup: _Setup, ck, comm, on_batch) -> dict:
    """The result row of one checkpoint (collective under a layout)."""
    from trinity.accel import get_backend
    from trinity.reference.training.evaluation import evaluate
    from trinity.reference.training.step import LOCAL
    from trinity.run.eval_checkpoint import read_params
    from trinity.run.eval_data import fixed_batches
    from trinity.run.placement import batch_to_device

    S, T = setup.sequences, setup.seq_len
    table = setup.backend if setup.backend is not None else get_backend("reference")
    if setup.several:
        from trinity.distributed.mesh import Mesh
        from trinity.distributed.parallel_ops import ParallelOps
        mesh = Mesh(comm, setup.layout, config=ck.config)
        params, dtype = _together(comm, lambda: read_params(ck, args.dtype, mesh.plan, mesh.rank))
        params.mesh = mesh
        ops = ParallelOps(table, mesh, ck.config)
        rows = mesh.local_sequences(S)
    else:
        params, dtype = _together(comm, lambda: read_params(ck, args.dtype))
        mesh, ops, rows = LOCAL, setup.backend, None
    params = table.to_device(params)  # a device table's: the params once, then each batch (run/placement.py)
    batches = (batch_to_device(table, b) for b in
               fixed_batches(setup.store, T, S, setup.batches, rows=rows, doc_ids=ck.config.intra_document_mask,
                             seed=args.seed))
    result = evaluate(ck.config, params, batches, micro_batch_size=setup.micro_batch_size, ops=ops, mesh=mesh,
                      token_bytes=setup.token_bytes, on_batch=on_batch)
    del params
    perplexity = result.perplexity
    return {"path": ck.path, "kind": ck.kind, "step": ck.step, "tokens": result.tokens,
            "sequences": result.sequences, "batches": result.batches, "loss": dict(result.losses),
            "ce": result.losses["ce"], "perplexity": perplexity if math.isfinite(perplexity) else None,
            "bits_per_byte": result.bits_per_byte, "seq_len": T, "dtype": dtype.name, "data": args.data}


def _select_device(table, comm) -> None:
    """One device per rank: this rank's place among its host's ranks (an Allgather of the hosts in a job)."""
    from trinity.accel import BackendUnavailable
    from trinity.run.placement import local_rank
    if comm is None or comm.Get_size() == 1:
        where = 0
    else:
        import os
        import socket

        from trinity.distributed.mesh import allgather_json
        where = local_rank(allgather_json(comm, [os.getpid(), socket.gethostname()]), comm.Get_rank())
    try:
        table.select_device(where)
    except BackendUnavailable as e:
        raise CLIError(f"--backend: {e}") from None


def render_table(rows: list[dict]) -> str:
    """The result table: checkpoint, step, tokens, CE, perplexity, bits/byte ("—" when unknown)."""
    head = ["checkpoint", "step", "tokens", "CE", "perplexity", "bits/byte"]
    body = [[r["path"], "—" if r["step"] is None else str(r["step"]), f"{r['tokens']:,}", f"{r['ce']:.6f}",
             "inf" if r["perplexity"] is None else f"{r['perplexity']:.4f}",
             "—" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.6f}"] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in [head, *body])


def _write_json(path: str, rows: list[dict]) -> None:
    import json

    from trinity.reference.files import atomic_path, open_new
    try:
        with atomic_path(path) as tmp:
            with open_new(tmp, "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=1, allow_nan=False)
                f.write("\n")
    except OSError as e:
        raise CLIError(f"--json {path}: cannot write ({e.strerror or e})") from None


def run(args) -> int:
    from trinity.distributed.launch import LaunchError, rank_zero_log, world
    from trinity.reference.data.prepare import HOLDOUT_DIR

    try:
        comm = world()
    except LaunchError as e:
        raise CLIError(str(e)) from None
    setup = _together(comm, lambda: _setup(args, comm))
    if setup.backend is not None and setup.backend.on_device:
        _together(comm, lambda: _select_device(setup.backend, comm))
    log = rank_zero_log(comm)
    where = f"; layout {setup.layout} over {setup.layout.world_size} ranks" if setup.several else ""
    log(f"eval on {args.data}: {setup.batches} batch(es) of {setup.sequences} × {setup.seq_len} tokens "
        f"(seed {args.seed}), backend {args.backend}{where}")
    if setup.rank == 0 and os.path.isdir(os.path.join(args.data, HOLDOUT_DIR)):
        print(f"trinity eval: note: --data {args.data} is a training set; its held-out documents are in "
              f"{os.path.join(args.data, HOLDOUT_DIR)}", file=sys.stderr)
    bar = None
    if setup.rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=setup.batches * len(setup.checkpoints), desc="eval", unit="batch", file=sys.stderr,
                   dynamic_ncols=True)
    try:
        rows = [_evaluate_one(args, setup, ck, comm, None if bar is None else bar.update)
                for ck in setup.checkpoints]
    finally:
        if bar is not None:
            bar.close()
    log(render_table(rows))
    if args.json is not None and setup.rank == 0:
        _write_json(args.json, rows)
        log(f"wrote {args.json}")
    return 0
