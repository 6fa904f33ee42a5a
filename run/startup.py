"""Starting a job: everything the trainer does before its first step (docs/distributed.md, "Starting a job").

`Startup` (a base of `Trainer`) reads the run's model source, builds the config, backend, loader and state or loads
the resume point, checks the layout against the job and the memory against the machine, claims the run folder and
takes its lock (run_lock.py), and under a layout runs the ranks' agreement (`agree`), builds the mesh and keeps each
rank's shards. The order is the contract:

  1. every rank prepares on its own (`_prepare`): nothing collective, nothing removed, no state built or loaded
     (the model's config only, never its weights); rank 0 takes the lock;
  2. under a layout, the ranks agree (`agree`, two Allgathers of JSON): any rank's error, ranks running different
     jobs, or a host whose ranks together need more memory than it has, ends every rank alike, printed once;
  3. only then each rank builds or loads the whole state (`_build_state`: init_params, init_from's weights or the
     resume point), and under a layout the ranks agree again on what they loaded (`_agree_state`);
  4. only then `--restart` removes the earlier run (`_restart_folder`), and the mesh is built.

Errors a user can cause before the agreement are routed through it (`STARTUP_ERRORS`), also those raised before the
Trainer exists (`refuse_together`, from `trinity train`), so that a job of N ranks prints one line, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections import defaultdict

import numpy as np

from trinity.accel import BackendUnavailable, get_backend
from trinity.reference.model.precision import with_precision
from trinity.distributed.layout import Layout, LayoutError
from trinity.distributed.mesh import allgather_json
from trinity.distributed.plan import ParallelPlan
from trinity.distributed.rank_memory import BASELINE_BYTES, estimate_rank_bytes
from trinity.distributed.sharded_checkpoint import ShardedCheckpointManager
from trinity.distributed.watchdog import Watchdog, watchdog_seconds
from trinity.reference import Config, ConfigError, init_params
from trinity.reference.data.mixture import MixtureLoader
from trinity.reference.data.packing import PackedTokenLoader
from trinity.reference.data.rsdb import RSDBLoader
from trinity.reference.data.store import DataError, DocumentStore
from trinity.reference.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_record
from trinity.reference.training.balancing import init_balancing_state
from trinity.reference.training.checkpoint import CheckpointCorrupt, CheckpointError, config_changes
from trinity.reference.training.memory import available_memory_bytes
from trinity.reference.training.optim import init_optimizer_state
from trinity.reference.training.schedules import BatchSchedule

from .metrics_log import MetricsLog, is_metrics_file
from .placement import layout_problem, local_rank
from .rank_state import fresh_rank_state, pretrained_rank_state, resumed_rank_state
from .run_config import RunConfig, RunConfigError, check_output_paths
from .run_lock import RunLock, RunLockError

__all__ = ["Startup", "STARTUP_ERRORS", "agree", "refuse_together", "build_loader", "data_fingerprint"]

GIB = 2.0 ** 30
# Added to a layout refusal when the job named no layout (several ranks, no --mesh and no [parallel]).
NO_LAYOUT_HINT = " (no layout was given: choose one with --mesh or the run file's [parallel])"
# What a user can get wrong before a job starts: under a layout each is carried to every rank by the agreement.
STARTUP_ERRORS = (RunConfigError, LayoutError, CheckpointError, ConfigError, DataError, FileNotFoundError)


def _every_rank(error):
    """Mark an error that every rank of the job raises at the same point (the command can then end the job once and
    cleanly instead of aborting it from each rank)."""
    error.every_rank = True
    return error


def _ranges(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}…{ranks[-1]} ({len(ranks)})"


def model_config(run: RunConfig) -> Config:
    """The Config the run trains (its model source with the run's overrides), reading no weights: what a check
    before any rank starts needs (`trinity simulate`). Errors are RunConfigError naming the [model] key."""
    return run.build_config(_base_config(run))


def _base_config(run: RunConfig) -> Config:
    """The Config of the run's model source, reading no weights: a preset, a config.json, or an HF checkpoint's
    config.json (its weights are read once the job agreed to start: `_load_weights`). Errors name the [model]
    key."""
    kind, value = run.model_source
    if kind == "preset":
        return Config.preset(value)
    from trinity.reference.interop.hf import CONFIG_NAME, CheckpointError as HFError
    try:
        path = value
        if kind == "init_from":  # the checks load_pretrained makes first, with its words
            if not os.path.isdir(value):
                raise HFError(f"missing file: checkpoint directory {value} does not exist")
            path = os.path.join(value, CONFIG_NAME)
            if not os.path.isfile(path):
                raise HFError(f"missing file: {path}")
        return Config.from_hf(path)
    except (ConfigError, HFError, OSError, ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise RunConfigError(f"[model] {kind} = {value!r}: {e}") from None


def _load_weights(run: RunConfig, base: Config) -> dict:
    """The params of the run's `init_from` HF checkpoint, whose config must still be `base` (the one the job agreed
    on), holding no NaN or infinity. Errors name the [model] key."""
    from trinity.reference.interop.hf import CheckpointError as HFError, load_pretrained
    value = run.model_source[1]
    try:
        config, params = load_pretrained(value, dtype=np.dtype(run.dtype))
    except (ConfigError, HFError, OSError, ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise RunConfigError(f"[model] init_from = {value!r}: {e}") from None
    if config != base:
        raise RunConfigError(f"[model] init_from = {value!r}: its config.json changed while the job started")
    for key, array in params.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise RunConfigError(f"[model] init_from = {value!r}: the weights hold NaN or infinity ({key})")
    return params


def data_fingerprint(stores) -> list[dict]:
    """Per data source: documents, tokens and the SHA-256 of its document index (where each document starts)."""
    return [{"documents": int(s.num_documents), "tokens": int(s.num_tokens),
             "index_sha256": hashlib.sha256(np.ascontiguousarray(s.starts, dtype="<i8").tobytes()).hexdigest()}
            for s in stores]


def _data_changes(saved, now, stores) -> list[str]:
    """What differs between a checkpoint's data fingerprint and the current data's, one phrase per change."""
    if not isinstance(saved, list) or len(saved) != len(now):
        return [f"{len(now)} data source(s) now, {len(saved) if isinstance(saved, list) else '?'} in the checkpoint"]
    changes = []
    for store, old, new in zip(stores, saved, now):
        what = [f"{k} {old.get(k)} -> {new[k]}" for k in ("documents", "tokens") if old.get(k) != new[k]]
        if not what and old.get("index_sha256") != new["index_sha256"]:
            what = ["the document boundaries differ"]
        if what:
            changes.append(f"{store.path}: " + ", ".join(what))
    return changes


def _dataset_tokenizer(stores):
    """(info, tokenizer.json bytes) of the prepared datasets' tokenizer, or None when no source names one (raw
    token files). Sources with different tokenizers are refused: their ids would mean different things."""
    records = []
    for store in stores:
        if getattr(store, "meta", None) is None:
            continue
        try:
            records.append((store.path, tokenizer_record(load_tokenizer(store.path))))
        except (TokenizerError, OSError) as e:
            raise RunConfigError(f"[data] {store.path}: its tokenizer cannot be read ({e})") from None
    if len({r[1][0].get("sha256") or r[1][0]["kind"] for r in records}) > 1:
        raise RunConfigError(f"[data] sources use different tokenizers: {', '.join(p for p, _ in records)}")
    return records[0][1] if records else None


def build_loader(run: RunConfig):
    """(loader, [DocumentStore per data source]) for the run's [data] section: a PackedTokenLoader or RSDBLoader
    over `path` (a token file or prepared directory), or a MixtureLoader of one such loader per [[data.sources]]
    with the run's phases: one stream of rows, the same on every rank (each rank reads its own rows of a step,
    BatchedRows.next_batches). Errors name the [data] key."""
    paths = list(run.data_sources) if run.data_sources else [run.data_path]
    stores = []
    for path in paths:
        if not os.path.exists(path):
            raise RunConfigError(f"[data] path: no such file or directory {path}")
        try:
            stores.append(DocumentStore(path, run.eos_id))
        except DataError as e:
            raise RunConfigError(f"[data] {e}") from None
    if len({s.eos_id for s in stores}) > 1:
        raise RunConfigError(f"[data] sources disagree on eos_id: {[s.eos_id for s in stores]}")

    def one(store):
        if run.data_loader == "rsdb":
            return RSDBLoader(store, run.seq_len, run.micro_batch_size, buffer_size=run.rsdb_buffer,
                              seed=run.data_seed)
        return PackedTokenLoader(store, run.seq_len, run.micro_batch_size, seed=run.data_seed)

    try:
        if not run.data_sources:
            return one(stores[0]), stores
        phases = [(start, list(w)) for start, w in run.data_phases]
        return MixtureLoader([one(s) for s in stores], phases, seed=run.data_seed), stores
    except DataError as e:
        raise RunConfigError(f"[data] {e}") from None


def _open_eval_sets(run: RunConfig, stores) -> list:
    """The run's eval sets (run/eval_data.py), each checked to hold the batches an evaluation reads and the training
    data's EOS id. Errors name the [eval] key."""
    from .eval_data import eval_sets, whole_batches
    settings = run.evaluation
    try:
        sets = eval_sets(run, stores)
    except DataError as e:
        raise RunConfigError(str(e)) from None
    need = settings.batches * settings.sequences_per_batch * run.seq_len
    for s in sets:
        if s.store.eos_id != stores[0].eos_id:
            raise RunConfigError(f"[eval] {s.store.path}: eos_id {s.store.eos_id} differs from the training data's "
                                 f"{stores[0].eos_id}")
        if settings.batches > whole_batches(s.store, run.seq_len, settings.sequences_per_batch):
            raise RunConfigError(f"[eval] batches = {settings.batches}: the eval set {s.store.path} holds "
                                 f"{s.store.num_tokens:,} tokens, fewer than {settings.batches} batch(es) of "
                                 f"{settings.sequences_per_batch} × {run.seq_len} tokens ({need:,}); lower [eval] "
                                 f"batches or sequences_per_batch, or hold out more documents")
    return sets


def agree(comm, error: str | None, job: str | None, memory: dict | None = None, same_what: str = "") -> None:
    """The ranks' agreement to start (module docstring, step 2): every rank's error or None, the digest of its job,
    its host and its memory `need` (bytes it still has to allocate; `_check_memory`). Raises, on every rank alike,
    the first rank's error, a refusal of ranks running different jobs, or the memory refusal of the first host whose
    ranks together need more than its available memory (virtual ranks all share one host)."""
    mine = {"error": error, "job": job, "host": socket.gethostname(), "memory": memory}
    everyone = allgather_json(comm, mine)
    errors = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"]]
    if errors:
        first, message = errors[0]
        where = ("every rank" if len(errors) == len(everyone) else
                 f"rank {first}" + (f" and {len(errors) - 1} more" if len(errors) > 1 else ""))
        raise _every_rank(RunConfigError(f"{message} ({where})"))
    jobs = {}
    for r, e in enumerate(everyone):
        jobs.setdefault(e["job"], []).append(r)
    if len(jobs) > 1:
        groups = " vs ".join(_ranges(rs) for rs in jobs.values())
        raise _every_rank(RunConfigError(f"the ranks are not running the same job (run file, model or resume "
                                         f"point differ): ranks {groups}; start every rank with the same run file"
                                         + (f" {same_what}" if same_what else "")))
    _check_hosts(everyone)


def _check_hosts(everyone: list[dict]) -> None:
    """The memory check over the ranks that share a host: the sum of their needs against the host's available
    memory (the least any of its ranks measured)."""
    _check_devices(everyone)
    hosts = defaultdict(list)
    for r, e in enumerate(everyone):
        if e.get("memory") and e["memory"].get("available") is not None:
            hosts[e["host"]].append(r)
    for host, ranks in hosts.items():
        need = sum(everyone[r]["memory"]["need"] for r in ranks)
        available = min(everyone[r]["memory"]["available"] for r in ranks)
        if need > available:
            said, hint = everyone[ranks[0]]["memory"]["refusal"]
            raise _every_rank(RunConfigError(
                f"{said} per rank; the {len(ranks)} ranks on {host} ({_ranges(ranks)}) need "
                f"{need / GIB:.2f} GiB, more than the {available / GIB:.2f} GiB available there; {hint}, or "
                f"run fewer ranks per host"))


def _check_devices(everyone: list[dict]) -> None:
    """One device per rank: a host running more ranks than it has devices (when the table counts them) is refused."""
    hosts = defaultdict(list)
    for r, e in enumerate(everyone):
        hosts[e["host"]].append((r, (e.get("memory") or {}).get("devices")))
    for host, ranks in hosts.items():
        devices = min((n for _, n in ranks if n is not None), default=None)
        if devices is not None and len(ranks) > devices:
            raise _every_rank(RunConfigError(
                f"[train] backend: {host} runs {len(ranks)} ranks ({_ranges([r for r, _ in ranks])}) but has "
                f"{devices} GPU(s): one GPU per rank; run at most {devices} ranks per host"))


def _digest(what) -> str:
    """The SHA-256 of `what` as JSON: what the ranks compare to know they run the same job."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def refuse_together(comm, error: Exception) -> None:
    """A rank that failed before its Trainer existed (the run file, --mesh, --backend) joins the agreement the
    other ranks' Trainers run, so that the job ends once, cleanly: raises the agreed error on this rank."""
    agree(comm, str(error), None)
    raise _every_rank(RunConfigError(str(error)))  # not reached: the agreement raised this rank's error


class Startup:
    """The trainer's start (module docstring); `Trainer` derives from it."""

    _lock = None  # the run folder's RunLock (rank 0), held until close()
    _watchdog = None  # the mesh's Watchdog under mpiexec
    _restart_removes = None  # --restart: whether the metrics are removed too (None: nothing to remove)
    start_report = None  # under a layout, what every rank read to start (the first metrics line carries it)
    _memory_need = None  # this rank's memory need, for the agreement's per-host check
    _table = None  # an op table object to train with instead of the run's backend name (Trainer's `backend`)
    local_rank = 0  # this rank's place among the ranks of its host: its device, one per rank (placement.py)

    def _attempt(self, stage, distributed: bool, *args) -> Exception | None:
        """Run one stage of the start; under a layout a user's error (STARTUP_ERRORS) is returned, for the next
        agreement to carry to every rank, instead of raised."""
        try:
            stage(*args)
        except STARTUP_ERRORS as e:
            if not distributed:
                raise
            return e
        return None

    def _prepare(self, resume: bool, restart: bool, comm, distributed: bool) -> None:
        """Everything before the first collective: the run file, model config, backend, layout check, data, memory
        need, run folder. No state is built or loaded here (that waits for the agreement, which checks every host's
        memory first: `_build_state`), and nothing in the run folder is removed: `--restart` removes the old run
        once the job agreed to start (_restart_folder)."""
        run = self.run
        self._comm = comm
        check_output_paths(run)
        if self.is_main:  # the job's lock on its run folder, before anything changes (run_lock.py)
            self._take_lock()
        self._base = base = _base_config(run)
        self.config = config = run.build_config(base)
        try:
            backend = get_backend(run.backend if self._table is None else self._table)
        except BackendUnavailable as e:
            raise RunConfigError(f"[train] backend = {run.backend!r}: {e}") from None
        self.ops = with_precision(backend, run.precision)  # the table at [train] precision (model/precision.py)
        self._check_layout(comm)
        self.loader, self.stores = build_loader(run)
        self.eval_sets = _open_eval_sets(run, self.stores) if run.evaluation is not None else []
        for store in [*self.stores, *(s.store for s in self.eval_sets)]:
            largest = store.max_token()
            if largest >= config.vocab_size:
                raise RunConfigError(f"[data] {store.path} holds token id {largest} >= vocab_size "
                                     f"{config.vocab_size}")
        memory = self._check_memory(distributed=distributed, resume=resume)
        self.fingerprint = data_fingerprint(self.stores)
        self.tokenizer = _dataset_tokenizer(self.stores)
        self.batches = BatchSchedule(run.sequences_per_step, run.batch_schedule)
        try:
            # only rank 0, which holds the run folder's lock, creates the folder (a refused start removes it)
            self.checkpoints = ShardedCheckpointManager(run.checkpoint_dir, keep_last=run.keep_last,
                                                        create=self.is_main)
        except CheckpointError as e:
            raise RunConfigError(f"[checkpoint] dir = {run.checkpoint_dir!r}: {e}") from None
        self.metrics = MetricsLog(run.metrics_path) if self.is_main else None
        if not is_metrics_file(run.metrics_path):
            raise RunConfigError(f"[logging] metrics = {run.metrics_path!r}: holds a file that is not a trinity "
                                 f"metrics file; it is left alone: choose another path")
        if not resume and self.is_main:  # rank 0 decides for the job (an error there ends every rank)
            self._claim_folder(restart)
        self.log(memory)

    def _build_state(self, resume: bool, distributed: bool = False) -> None:
        """The state, built or loaded once the job agreed to start (so that no rank allocates it before every host's
        memory was checked): the resume point, else init_from's weights or a fresh init, with the optimizer and
        balancing state. Under a layout each rank builds only its own spans (rank_state.py): no rank creates or
        reads a whole sharded key."""
        run, config = self.run, self.config
        plan = ParallelPlan(config, run.layout) if distributed else None
        ckpt = self._load_resume_point(config, plan) if resume else None
        self.resumed_from = None if ckpt is None else (ckpt.path, ckpt.step)
        self.last_checkpoint = None if ckpt is None else ckpt.path  # the newest one this run knows to be good
        self.metrics_lines = None if ckpt is None else ckpt.extra.get("metrics_lines")
        self.bytes_read = 0  # of checkpoint and weight files, by this rank
        if ckpt is not None:
            if plan is None:
                self.params, self.opt_state, self.balance_state = ckpt.params, ckpt.optimizer_state, \
                    ckpt.balancing_state
            else:
                self._take(resumed_rank_state(ckpt, plan, self.rank))
            self.step, self.tokens_seen = ckpt.step, ckpt.tokens_seen
            self.skipped_steps = int(ckpt.extra.get("skipped_steps", 0))
            self.run_id = ckpt.run_id or uuid.uuid4().hex
            self.loader.load_state_dict(ckpt.data_state)
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = ckpt.rng_state
            self.log(f"resumed from {ckpt.path} at step {self.step} ({self.tokens_seen:,} tokens seen)")
            changed = config_changes(ckpt.config, config, recipe=True)
            was = ckpt.extra.get("precision", "full")
            if was != run.precision:
                changed.append(f"[train] precision {was} != {run.precision}")
            if changed:
                self.log(f"the recipe changed since that checkpoint (checkpoint != now): {'; '.join(changed)}")
        else:
            if resume:
                self.log(f"no checkpoint in {run.checkpoint_dir}: starting from step 0")
            init_from = run.model_source[0] == "init_from"
            if plan is not None:
                self._take(pretrained_rank_state(run, self._base, plan, self.rank) if init_from else
                           fresh_rank_state(run, config, plan, self.rank))
            else:
                self.params = _load_weights(run, self._base) if init_from else \
                    init_params(config, seed=run.init_seed, dtype=np.dtype(run.dtype))
                self.opt_state = init_optimizer_state(config, self.params)
                self.balance_state = init_balancing_state(config, self.params)
            self.step, self.tokens_seen, self.skipped_steps = 0, 0, 0
            self.run_id = uuid.uuid4().hex
            self.rng = np.random.default_rng(run.init_seed)
        self.checkpoints.run_id = self.run_id

    def _take(self, state) -> None:
        """This rank's state under a layout (rank_state.RankState)."""
        self.params, self.opt_state, self.balance_state = state.params, state.optimizer_state, state.balancing_state
        self.bytes_read += state.bytes_read

    # ---- the layout ---------------------------------------------------------------------------------------------
    def _check_layout(self, comm) -> None:
        """Refuse, before any work, a layout the job cannot run, listing those that fit (Layout.check)."""
        run = self.run
        single = run.layout.sizes == Layout()
        if single and (comm is None or comm.Get_size() == 1):
            return
        if comm is None:
            raise RunConfigError(f"[parallel] layout {run.layout} needs {run.layout.world_size} ranks, but no MPI "
                                 f"launcher started this process: mpiexec -n {run.layout.world_size} python -m mpi4py "
                                 f"-m trinity.cli train {run.path} --mesh {run.layout}")
        try:
            run.layout.check(world_size=comm.Get_size(), config=self.config, seq_len=run.seq_len,
                             micro_batch_size=run.micro_batch_size, batch_sizes=run.batch_sizes + run.eval_sequences)
        except LayoutError as e:
            hint = NO_LAYOUT_HINT if single else ""
            raise RunConfigError(f"[parallel] {e}{hint}") from None
        problem = layout_problem(self.ops, run.layout)
        if problem:
            raise RunConfigError(f"[parallel] {problem}")

    def _agree(self, comm, failed: Exception | None, resume: bool) -> None:
        """The ranks' first exchange (`agree`), before any state exists: each one's error (if any), a digest of the
        job it is about to run (the run configuration, the model), its host and its memory need. An error on any
        rank, ranks that disagree, or a host whose ranks together need more memory than it has, is raised on every
        rank alike (`every_rank`: the command ends the job once, cleanly)."""
        job = None if failed else _digest([repr(self.run), self.config.to_dict()])
        agree(comm, None if failed is None else str(failed), job, self._memory_need,
              "and checkpoint folder" if resume else "")

    def _agree_state(self, comm, failed: Exception | None, resume: bool) -> None:
        """The ranks' second exchange, once each built or loaded its state (`_build_state`): each one's error
        (init_from's weights or the resume point), and the resume point it loaded; raised on every rank alike."""
        job = None if failed else _digest([self.resumed_from, self.step, self.tokens_seen])
        agree(comm, None if failed is None else str(failed), job, None, "and checkpoint folder" if resume else "")

    def _build_mesh(self, comm):
        """The run's layout over `comm` (collective), and one line naming every rank's pid and host."""
        from trinity.distributed.mesh import Mesh
        run = self.run
        mesh = Mesh(comm, run.layout, checksums=run.checksums, config=self.config)
        seconds = watchdog_seconds(run.watchdog_seconds, comm)
        if seconds > 0:
            mesh.watchdog = self._watchdog = Watchdog(seconds, self.rank, comm)
        ranks = allgather_json(comm, [os.getpid(), socket.gethostname()])
        self.local_rank = local_rank(ranks, self.rank)
        shown = "; ".join(f"rank {r} pid {pid} on {host}" for r, (pid, host) in enumerate(ranks[:16]))
        self.log(f"layout {run.layout} over {len(ranks)} ranks: {shown}" + (" …" if len(ranks) > 16 else ""))
        return mesh

    def _attach_mesh(self) -> None:
        """Under a layout: the mesh gathers this rank's params (built from its spans before the mesh existed), the
        layout's op table trains them, and rank 0's run id names the run."""
        from trinity.distributed.parallel_ops import ParallelOps
        self.run_id = self.checkpoints.run_id = allgather_json(self.mesh.comm, self.run_id)[0]  # rank 0's names it
        self.start_report = {"bytes_read": allgather_json(self.mesh.comm, self.bytes_read)}
        self.params.mesh = self.mesh
        self.ops = ParallelOps(self.ops, self.mesh, self.config)

    def _check_memory(self, distributed: bool = False, resume: bool = False) -> str:
        """Refuse, before any work, a run whose estimated peak memory exceeds what the machine has available. The
        estimate is this rank's under the run's layout (distributed/rank_memory.py, the same function the cost model
        prices a GPU with): its shards of the params, gradients and optimizer state, the buckets gathered in flight,
        one micro-batch's activations on its positions, a checkpoint save, the startup's spans, the process itself;
        the peak over those phases. It runs before any state is allocated. Under a layout the ranks of a host are
        counted together in the agreement (`agree`), before any of them builds its state: here each rank only
        records its need. Returns the estimate, to log."""
        run = self.run
        micro_steps = max(n for _, n in [(0, run.sequences_per_step), *run.batch_schedule]) // run.micro_batch_size
        layout = run.layout if distributed else Layout()
        start = "resume" if resume else ("init_from" if run.model_source[0] == "init_from" else "fresh")
        estimate = estimate_rank_bytes(self.config, layout, self.rank if distributed else 0, run.seq_len,
                                       run.micro_batch_size, run.dtype, run.recompute,
                                       max(micro_steps // layout.dp, 1), backend=run.backend, start=start)
        total, phase = estimate["total"], estimate["phase"]
        try:
            available = available_memory_bytes()
        except ValueError as e:
            raise RunConfigError(str(e)) from None
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in estimate["counted"].items() if v)
        said = f"estimated peak memory {total / GIB:.2f} GiB per rank, in the {phase} ({parts} GiB)"
        state = estimate["params"] + estimate["optimizer"] + estimate["grads"]
        state_alone_too_big = phase in ("save", "startup") or (available is not None and state > available)
        refusal = (f"[data] seq_len = {run.seq_len}, micro_batch_size = {run.micro_batch_size}: {said}",
                   "this model's state does not fit this machine" if state_alone_too_big else
                   "lower them" + ("" if run.recompute else ", or set [train] recompute = true"))
        # what the rank still has to allocate: the process as it starts (rank_memory.BASELINE_BYTES) is resident
        need = max(0, total - BASELINE_BYTES.get(run.backend, BASELINE_BYTES["numba"])[0])
        self._memory_need = {"need": need, "available": available, "refusal": refusal,
                             "devices": getattr(self.ops, "device_count", lambda: None)()}
        self.memory_estimate = estimate
        if available is not None and not distributed and need > available:
            raise RunConfigError(f"{refusal[0]} exceeds the {available / GIB:.2f} GiB available; {refusal[1]}")
        return said + (f" of {available / GIB:.2f} GiB available" if available is not None else "")

    def _claim_folder(self, restart: bool) -> None:
        """A new run needs a folder of its own: existing checkpoints (or a non-empty metrics file) are refused,
        unless `restart`, which marks them for removal once the job agreed to start (_restart_folder)."""
        run = self.run
        found = self.checkpoints.list()
        metrics = os.path.isfile(run.metrics_path) and os.path.getsize(run.metrics_path) > 0
        if not found and not metrics:
            return
        if restart:
            self._restart_removes = metrics
            return
        where = (f"[checkpoint] dir = {run.checkpoint_dir!r}: holds checkpoints of an earlier run ("
                 f"{', '.join(os.path.basename(p) for p in found[-3:])}{', ...' if len(found) > 3 else ''})"
                 if found else f"[logging] metrics = {run.metrics_path!r}: holds the metrics of an earlier run")
        raise RunConfigError(f"{where}; continue it with --resume, give this run another [checkpoint] dir and "
                             f"[logging] metrics, or start over with --restart (removes the old checkpoints and "
                             f"metrics)")

    def _restart_folder(self) -> None:
        """--restart, once every rank agreed to start: remove the earlier run's checkpoints (rank 0; the metrics
        file is started empty by `train`)."""
        if self._restart_removes is None:
            return
        run = self.run
        try:
            removed = self.checkpoints.remove_all()
        except (CheckpointError, OSError) as e:
            raise RunConfigError(f"[checkpoint] dir = {run.checkpoint_dir!r}: --restart cannot remove the earlier "
                                 f"run ({getattr(e, 'strerror', None) or e})") from None
        self.log(f"--restart: removed {len(removed)} checkpoint(s) from {run.checkpoint_dir}"
                 + (f" and the metrics in {run.metrics_path}" if self._restart_removes else ""))

    def _take_lock(self) -> None:
        """The job's lock on its checkpoint folder and metrics file (run_lock.py); a second job is refused."""
        try:
            self._lock = RunLock(self.run.checkpoint_dir, self.run.metrics_path)
        except RunLockError as e:
            raise RunConfigError(str(e)) from None
        for stale in self._lock.took_over:
            self.log(f"took over the lock {stale}")

    def close(self) -> None:
        """Give back what the job holds outside its state: the run folder's lock and the watchdog (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.close()

    def _agreed_resume_point(self, config, plan):
        """Under a layout: the newest checkpoint whose parts every rank reads verify, read by this rank's spans (a
        rank verifies only what it reads, so a damaged block only some ranks read would otherwise split the job).
        The ranks try rank 0's candidates in order, newest first, and after each they exchange what happened: any
        error but corruption ends every rank alike; corruption seen by any rank skips the candidate on all."""
        comm = self._comm
        try:
            listed, error = self.checkpoints.resume_candidates(), None
        except Exception as e:  # noqa: BLE001 - carried through the exchange, so that no rank waits for another
            listed, error = [], f"{type(e).__name__}: {e}"
        said = allgather_json(comm, [listed, error])
        failed = [(r, e) for r, (_, e) in enumerate(said) if e is not None]
        if failed:
            raise CheckpointError(f"cannot list the checkpoints: {failed[0][1]} (rank {failed[0][0]})")
        candidates = said[0][0]
        skipped = []
        for path in candidates:
            ckpt, status = None, None
            try:
                ckpt = self.checkpoints.load_spans(path, config, plan, self.rank)
            except CheckpointCorrupt as e:
                status = ["corrupt", str(e)]
            except Exception as e:  # noqa: BLE001 - every rank must reach the exchange below, or the others wait
                status = ["error", str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"]
            said = allgather_json(comm, status)
            errors = [(r, s[1]) for r, s in enumerate(said) if s is not None and s[0] == "error"]
            if errors:
                raise CheckpointError(errors[0][1] + (f" (rank {errors[0][0]})" if errors[0][0] else ""))
            corrupt = [(r, s[1]) for r, s in enumerate(said) if s is not None]
            if not corrupt:
                return ckpt, skipped
            skipped.append((path, f"{corrupt[0][1]} (seen by rank {corrupt[0][0]})"))
        return None, skipped

    def _load_resume_point(self, config, plan=None):
        """The newest checkpoint that verifies (None: none at all); skipped corrupt ones are logged; one whose
        data fingerprint differs from the current data is refused. Under a layout (`plan`) it is read by this rank's
        spans (what a rank reads it verifies; ranks that chose different checkpoints disagree in `_agree_state`)."""
        try:
            ckpt, skipped = self.checkpoints.load_newest_valid(config) if plan is None else \
                self._agreed_resume_point(config, plan)
        except CheckpointError as e:
            raise RunConfigError(f"[checkpoint] dir = {self.run.checkpoint_dir!r}: {e}") from None
        for path, why in skipped:
            self.log(f"skipped checkpoint {path}: {why}")
        if ckpt is None and skipped:
            raise RunConfigError(f"[checkpoint] dir = {self.run.checkpoint_dir!r}: none of its {len(skipped)} "
                                 f"checkpoint(s) verifies (corrupt); start over with --restart")
        if ckpt is not None and ckpt.data_fingerprint is not None:
            changes = _data_changes(ckpt.data_fingerprint, self.fingerprint, self.stores)
            was, now = ckpt.tokenizer or {}, self.tokenizer[0] if self.tokenizer else {}
            if (was.get("kind"), was.get("sha256")) != (now.get("kind"), now.get("sha256")):
                changes.append(f"the tokenizer changed ({was.get('kind')} -> {now.get('kind')})")
            if changes:
                raise RunConfigError(f"[data] the training data changed since checkpoint {ckpt.path}: "
                                     f"{'; '.join(changes)}; resume on the same data, or start a new run")
        return ckpt

    # ---- one optimizer step -------------------------------------------------------------------------------------
