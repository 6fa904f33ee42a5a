"""Stepping through a run: `StepThrough` / `step_through` run one forward (+ losses and backward, + clipping, the
load-balancing update and one optimizer step, in the trainer's order) through a TracingOps, pausing after each event
until the caller asks for the next."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..model.config import Config
from ..model.model import check_inputs, model_forward
from ..model.ops import REFERENCE
from ..operators.array_module import array_namespace
from .events import _LAYER, Event, _copy
from .tracing import TracingOps

__all__ = ["StepThrough", "step_through", "RouterInfo"]


# ---- stepping through a run ---------------------------------------------------------------------------------------
class _Cancelled(BaseException):
    pass


@dataclass
class RouterInfo:
    """One MoE layer's routing of the inspected tokens: scores s [N, E], chosen experts [N, K] (biased selection),
    gate weights g [N, K], the expert bias b [E] used for the selection, and (token, slot) counts per expert [E]."""
    scores: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    counts: np.ndarray


class StepThrough:
    """One forward (+ losses and backward when labels are given, + the update when step=True), operator by operator.

    Iterate it for the events, in the order they happen; the model thread waits after each event until the next is
    asked for, and stopping early (break) ends it. `run()` instead runs everything and returns self. Afterwards:
      logits [B, T, V]; losses, grads (unclipped), stats (as loss_and_grads); routers {layer: RouterInfo};
      with step: grad_norm, clipped_grads, balance (balance_step's metrics), optimizer (optimizer_step's info),
      lr {"muon", "adamw"}; params, optimizer_state, balancing_state (after the step).
    Parameters are copied before a step unless inplace=True (then `params` and the states are updated in place,
    as the trainer does).

    With an op table on a device, params, states, tokens, labels and doc_ids are the table's arrays (`ops.to_device`);
    the events hold device arrays too (copies where the reference copies), while `logits` and `routers` come back to
    the host through `ops.to_host`.

    lr: (muon_lr, adamw_lr) for the step; default the config's peak rates. optimizer_state, balancing_state: the
    run's state (default fresh: init_optimizer_state / init_balancing_state). ops: the table to trace (default the
    reference). keep(name, op, phase): which events to record (default all).
    """

    def __init__(self, config: Config, params: dict, tokens, labels=None, doc_ids=None, *, backward: bool | None = None,
                 step: bool = False, optimizer_state: dict | None = None, balancing_state: dict | None = None,
                 lr: tuple[float, float] | None = None, ops=None, keep: Callable | None = None, inplace: bool = False):
        xp = array_namespace(tokens)
        tokens = xp.asarray(tokens)
        if tokens.ndim == 1:
            tokens = xp.expand_dims(tokens, axis=0)
            labels = None if labels is None else xp.expand_dims(xp.asarray(labels), axis=0)
            doc_ids = None if doc_ids is None else xp.expand_dims(xp.asarray(doc_ids), axis=0)
        if step and labels is None:
            labels = tokens
        self.backward = (labels is not None) if backward is None else bool(backward)
        if self.backward and labels is None:
            labels = tokens
        self.tokens, doc_ids = check_inputs(config, params, tokens, doc_ids)
        self.labels = None if labels is None else xp.asarray(labels)
        self.config, self.doc_ids, self.step = config, doc_ids, bool(step)
        if self.step and not inplace:
            params = {k: _copy(v) for k, v in params.items()}
            optimizer_state = None if optimizer_state is None else {
                k: (np.array(v, copy=True) if k == "step" else _copy(v)) for k, v in optimizer_state.items()}
            balancing_state = None if balancing_state is None else {k: _copy(v) for k, v in balancing_state.items()}
        self.params, self.optimizer_state, self.balancing_state = params, optimizer_state, balancing_state
        self.lr_peak, self.base_ops, self.keep = lr, ops, keep
        self.events: list[Event] = []
        self.logits = self.losses = self.grads = self.stats = None
        self.routers: dict[int, RouterInfo] = {}
        self.grad_norm = self.clipped_grads = self.balance = self.optimizer = self.lr = None
        self._started = False

    # -- the computation, calling emit(event) after each recorded event
    def _compute(self, emit):
        from ..training.balancing import init_balancing_state, momentum_key
        from ..training.optim import init_optimizer_state
        from ..training.step import GlobalBatch, apply_update, compute_gradients

        c, params = self.config, self.params
        host = (self.base_ops or REFERENCE).to_host
        keep = None if self.keep is None else (lambda name, op, phase: self.keep(name, op, phase))
        tracer = TracingOps(self.base_ops, params, keep=keep, on_event=emit,
                            capture=lambda name, op: op == "router_forward" or name == "lm_head")
        self.tracer = tracer
        if self.backward:  # the training step's gradients (training/step.py), one micro-batch
            result = compute_gradients(c, params, GlobalBatch(self.tokens, self.labels, self.doc_ids), ops=tracer,
                                       check=False)
            self.losses, self.grads, self.stats = result.losses, result.grads, result.stats[0]
            tracer.emit("loss", "losses", "loss", {}, {k: float(v) for k, v in self.losses.items()})
        else:
            _, ctx = model_forward(c, params, self.tokens, self.doc_ids, keep_ctx=True, ops=tracer)
        self.logits = host(tracer.captured[("forward", "lm_head")][0])
        for (phase, name), result_ in tracer.captured.items():
            m = _LAYER.match(name)
            if phase != "forward" or m is None or len(result_) != 3:
                continue
            layer = int(m.group(1))
            weights, experts, rctx = result_
            scores, experts, weights, bias = host((getattr(rctx, "scores", None), experts, weights,
                                                   params[f"model.layers.{layer}.mlp.expert_bias"]))
            self.routers[layer] = RouterInfo(scores, experts, weights, bias,
                                             np.bincount(experts.reshape(-1), minlength=c.num_experts))
        if not self.step:
            return

        # The update, as the trainer takes it (training/step.py apply_update): clip, balancing, optimizer, with an
        # event for each.
        if self.balancing_state is None:
            self.balancing_state = init_balancing_state(c, params)
        if self.optimizer_state is None:
            self.optimizer_state = init_optimizer_state(c, params)
        muon_lr, adamw_lr = self.lr_peak if self.lr_peak is not None else (c.muon_lr, c.adamw_lr)
        self.lr = {"muon": float(muon_lr), "adamw": float(adamw_lr)}

        def on_clip(norm, scale):
            tracer.emit("clip_grad_norm", "clip_grad_norm", "clip", {"max_norm": c.grad_clip_norm},
                        {"grad_norm": norm, "scale": scale})

        def on_balance(layer, counts, old, m_old, metrics):
            key = f"model.layers.{layer}.mlp.expert_bias"
            new = params[key]
            outputs = {"bias": _copy(new), "delta": (new - old)}
            if momentum_key(key) in self.balancing_state:
                outputs["momentum"] = _copy(self.balancing_state[momentum_key(key)])
            inputs = {"counts": _copy(counts), "bias": old, "method": c.load_balancing}
            if m_old is not None:
                inputs["momentum"] = m_old
            outputs.update({k: float(v) for k, v in metrics.items()})
            tracer.emit(key, "balance_step", "balancing", inputs, outputs)

        def observe(key, group, X, G, lr, own):
            if observe.first:  # the balancing moved expert_bias: recognise the new arrays as parameters
                tracer.set_params(params)
                observe.first = False
            name = key[: -len(".weight")] if key.endswith(".weight") else key
            if tracer.keep is not None and not tracer.keep(name, group, "optimizer"):
                return None
            before = _copy(X)

            def after():
                outputs = {"update": X - before}
                outputs.update({k.split("/", 1)[0]: _copy(v) for k, v in own.items()})
                tracer.emit(name, group, "optimizer", {"grad": G, "param": before, "lr": lr}, outputs,
                            {"param": key})
            return after
        observe.first = True

        update = apply_update(c, params, self.optimizer_state, self.balancing_state, result, muon_lr, adamw_lr,
                              ops=self.base_ops, on_clip=on_clip, on_balance=on_balance, observe=observe)
        self.clipped_grads, self.grad_norm = update["clipped_grads"], result.grad_norm
        self.balance, self.optimizer = update["balance"], update["optimizer"]

    def _start(self):
        if self._started:
            raise RuntimeError("a StepThrough runs once; make a new one")
        self._started = True

    def run(self) -> "StepThrough":
        """Run everything (no pausing); events in self.events."""
        self._start()
        self._compute(self.events.append)
        return self

    def __iter__(self):
        self._start()
        handoff: queue.Queue = queue.Queue(maxsize=1)
        resume = threading.Semaphore(0)
        cancel = threading.Event()

        def emit(event):
            self.events.append(event)
            handoff.put(("event", event))
            resume.acquire()
            if cancel.is_set():
                raise _Cancelled()

        def worker():
            try:
                self._compute(emit)
            except _Cancelled:
                handoff.put(("cancelled", None))
                return
            except BaseException as e:  # handed to the consumer, raised there
                handoff.put(("error", e))
                return
            handoff.put(("done", None))

        thread = threading.Thread(target=worker, name="trinity-step-through", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = handoff.get()
                if kind == "event":
                    yield value
                    resume.release()
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            if thread.is_alive():
                cancel.set()
                resume.release()
                # drain so the worker can finish
                while thread.is_alive():
                    try:
                        handoff.get(timeout=0.05)
                        resume.release()
                    except queue.Empty:
                        pass
                thread.join()


def step_through(config: Config, params: dict, tokens, labels=None, step: bool = False, **kwargs) -> StepThrough:
    """Iterate the events of one forward (labels: + backward; step: + balancing and optimizer step), one operator
    at a time. See StepThrough for the keywords and for the results available afterwards."""
    return StepThrough(config, params, tokens, labels, step=step, **kwargs)
