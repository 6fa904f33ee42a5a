"""`trinity inspect MODEL (--text T | --tokens 1,2,3)`: one forward through the reference, operator by operator.

MODEL is a checkpoint of ours (.h5, from `trinity train`), a Hugging Face AFMoE checkpoint directory, or a preset
name (random init, --seed). Prints, per layer and operator, every output's shape, RMS, min and max as it is
computed; for each MoE router the chosen experts of every token with their scores s, expert bias b and gate
weights g, and the expert-load histogram; for each attention the entropy of every head. --step adds the losses,
the backward, the load-balancing update and one optimizer step (the model's recipe at its peak learning rates).
--layer and --op choose what is shown and dumped; --dump writes every chosen tensor and gradient to HDF5, grouped
by module (model/layers/3/self_attn/q_proj/forward/outputs/y); --plot draws the router's choices.

The tokenizer (for --text, and to label tokens) is found as by `trinity generate`: --tokenizer SOURCE, else the HF
directory's tokenizer.json, else, for one of our checkpoints, the copy of the training tokenizer it carries (no path a
checkpoint names is opened).

`--backend cupy` traces the cupy table on a GPU: the params, states and tokens go to the device once; every event
shown or dumped, the logits and the routing come back through the table's to_host.
"""

from __future__ import annotations

import os

from trinity.accel import BACKENDS

from .common import CLIError, add_precision_argument, load_backend, load_model, load_model_tokenizer
from .inputs import check_output_file

NAME = "inspect"
HELP = "step through one forward (--step: + backward, balancing, optimizer step), operator by operator"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0],
                              epilog="examples: trinity inspect ckpt/step_00000300.h5 --tokens 5,17,9 --layer 1; "
                                     "trinity inspect ./Trinity-Nano --text 'Hello world' --op router --plot r.png; "
                                     "trinity inspect tiny --tokens 1,2,3 --step --dump trace.h5")
    p.add_argument("model", metavar="MODEL",
                   help="our checkpoint (.h5 or .sharded), an HF checkpoint directory, or a preset name (random init)")
    p.add_argument("--text", help="text to inspect (needs a tokenizer: --tokenizer, the HF directory's, or the "
                                   "tokenizer our checkpoint carries)")
    p.add_argument("--tokens", help="token ids to inspect, comma-separated: 1,2,3")
    p.add_argument("--tokenizer", metavar="SOURCE",
                   help="tokenizer: 'bytes', a prepared dataset dir, an HF checkpoint dir or a tokenizer.json "
                        "(default: the HF directory's tokenizer.json; for our checkpoint, the copy of the "
                        "training tokenizer it carries)")
    p.add_argument("--step", action="store_true",
                   help="also the losses (labels = the tokens), backward, balancing update and one optimizer step")
    p.add_argument("--dump", metavar="TRACE.h5", help="write every shown tensor and gradient to this HDF5 file")
    p.add_argument("--layer", action="append", metavar="L",
                   help="only these layers (repeat or comma-separate: --layer 1,3)")
    p.add_argument("--op", action="append", metavar="NAME",
                   help="only these operators: a part of the module name (q_proj, router, sdpa, experts, "
                        "expert_bias, self_attn), an op (linear, attention_forward, muon) or a name pattern "
                        "(model.layers.*.mlp.router); repeat or comma-separate for several")
    p.add_argument("--plot", metavar="OUT.png",
                   help="draw the router's choices: token × expert gate weights, one panel per MoE layer (those of "
                        "--layer when given)")
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="compute dtype (default: the checkpoint's; float32 for HF directories and presets)")
    p.add_argument("--seed", type=int, default=0, help="init seed for a preset (default 0)")
    p.add_argument("--backend", default="reference", choices=BACKENDS,
                   help="operator table to trace (trinity.accel.get_backend; default reference)")
    add_precision_argument(p)
    p.set_defaults(run=run)
    return p


# ---- inputs -------------------------------------------------------------------------------------------------------
def _parse_tokens(text: str) -> list[int]:
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise CLIError("--tokens is empty; give token ids like --tokens 1,2,3")
    try:
        return [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise CLIError(f"--tokens: {bad!r} is not an integer token id") from None


def _parse_layers(values, n_layers: int):
    if not values:
        return None
    layers = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                layer = int(part)
            except ValueError:
                raise CLIError(f"--layer: {part!r} is not a layer index") from None
            if not 0 <= layer < n_layers:
                raise CLIError(f"--layer {layer}: the model has layers 0..{n_layers - 1}")
            layers.append(layer)
    return sorted(set(layers))


# ---- the printed view ---------------------------------------------------------------------------------------------
def _shape(shape) -> str:
    return "×".join(str(s) for s in shape) if shape else "scalar"


def _g(v) -> str:
    return f"{v:>11.4g}"


class _View:
    """Prints events as they arrive: a table per phase and layer, router and attention details after their op."""

    def __init__(self, config, tokens, token_label, out):
        self.c, self.tokens, self.label, self.out = config, tokens, token_label, out
        self.section = None
        self.phase = None

    def p(self, line=""):
        print(line, file=self.out)

    def _layer_title(self, layer):
        c = self.c
        if layer is None:
            return "-- outside the layers --"
        w = c.window_of(layer)
        attn = f"sliding attention (window {w})" if w is not None else "global attention"
        mlp = f"MoE ({c.num_experts} experts, top-{c.num_experts_per_tok})" if c.is_moe_layer(layer) else "dense MLP"
        return f"-- layer {layer} · {attn} · {mlp} --"

    def event(self, e):
        phase_titles = {"forward": "forward", "backward": "backward (gradients)", "loss": "losses",
                        "clip": "gradient clipping", "balancing": f"load balancing ({self.c.load_balancing})",
                        "optimizer": "optimizer step"}
        if e.phase != self.phase:
            self.phase = e.phase
            self.section = None
            self.p()
            self.p(f"== {phase_titles.get(e.phase, e.phase)} ==")
            if e.phase == "optimizer":
                self.p(f"  {'parameter':<46} {'group':<6} {'lr':>9} {'grad rms':>11} {'update rms':>11} "
                       f"{'update/param':>12}")
        if e.phase in ("forward", "backward"):
            self._op_rows(e)
        elif e.phase == "loss":
            o = e.outputs
            self.p(f"  total {o['total']:.6g} = ce {o['ce']:.6g} + z {o['z']:.4g} + balance {o['balance']:.4g}")
        elif e.phase == "balancing":
            self._balancing(e)
        elif e.phase == "clip":
            o = e.outputs
            self.p(f"  global gradient norm {o['grad_norm']:.6g} (expert_bias excluded); clip at "
                   f"{e.inputs['max_norm']:g} → gradients scaled by {o['scale']:.6g}")
        elif e.phase == "optimizer":
            self._optimizer(e)

    def _op_rows(self, e):
        from trinity.reference.inspection import tensor_stats

        key = (e.phase, e.layer)
        if key != self.section:
            self.section = key
            self.p(self._layer_title(e.layer))
            self.p(f"  {'name':<34} {'op':<22} {'tensor':<14} {'shape':<16} {'rms':>11} {'min':>11} {'max':>11}")
        prefix = f"model.layers.{e.layer}." if e.layer is not None else ""
        name = e.name[len(prefix):] if prefix and e.name.startswith(prefix) else e.name
        first = True
        values = {**e.arrays("outputs"), **{k: v for k, v in e.outputs.items()
                                             if isinstance(v, float) and k not in e.arrays("outputs")}}
        for tensor, value in values.items():
            s = tensor_stats(value)
            bad = f"  ({s['nonfinite']} non-finite)" if s["nonfinite"] else ""
            self.p(f"  {name if first else '':<34} {e.op if first else '':<22} {tensor:<14} {_shape(s['shape']):<16} "
                   f"{_g(s['rms'])} {_g(s['min'])} {_g(s['max'])}{bad}")
            first = False
        if e.phase == "forward" and e.op == "router_forward":
            self._router(e)
        if e.phase == "forward" and e.op == "attention_forward":
            self._entropy(e)

    def _router(self, e):
        import numpy as np

        weights, experts = np.asarray(e.outputs["weights"]), np.asarray(e.outputs["experts"])
        scores = e.outputs.get("scores")
        bias = np.asarray(e.inputs.get("expert_bias")) if e.inputs.get("expert_bias") is not None else None
        E = e.inputs["w_router"].shape[0] if "w_router" in e.inputs else int(experts.max()) + 1
        K = experts.shape[1]
        self.p(f"  router: top-{K} of {E} experts chosen by s + b (s = σ(router logits), b = expert_bias); gates g "
               f"from s alone (Σg = {e.inputs.get('route_scale', '?')})")
        flat = self.tokens.reshape(-1)
        for t in range(experts.shape[0]):
            picks = []
            for k in range(K):
                ex = int(experts[t, k])
                s = f" s={float(scores[t, ex]):.4f}" if scores is not None else ""
                b = f" b={float(bias[ex]):+.4g}" if bias is not None else ""
                picks.append(f"e{ex}{s}{b} g={float(weights[t, k]):.4f}")
            self.p(f"    {t:>4} {self.label(int(flat[t])):<16} " + "   ".join(picks))
        counts = np.bincount(experts.reshape(-1), minlength=E)
        mean = counts.mean()
        vio = (counts.max() - mean) / mean if mean > 0 else 0.0
        self.p(f"  expert load ({int(counts.sum())} token·slot assignments, mean {mean:.2f}, MaxVio {vio:.3f}):")
        top = max(1, int(counts.max()))
        for ex, n in enumerate(counts):
            self.p(f"    e{ex:<4} {int(n):>6} {'█' * int(round(30 * n / top))}")

    def _entropy(self, e):
        import numpy as np

        from trinity.reference.operators.attention import allowed
        from trinity.reference.inspection import attention_entropy

        q, k = e.inputs["q"], e.inputs["k"]
        window, doc = e.inputs.get("window"), e.inputs.get("doc_ids")
        q_pos, k_pos = e.inputs.get("q_pos"), e.inputs.get("k_pos")
        H = attention_entropy(q, k, window, doc, q_pos, k_pos)  # [B, h, T]
        per_head = H.mean(axis=(0, 2))
        qp = np.arange(q.shape[1]) if q_pos is None else np.asarray(q_pos)
        kp = np.arange(k.shape[1]) if k_pos is None else np.asarray(k_pos)
        mask = allowed(qp, kp, window, None if doc is None else np.asarray(doc),
                       None if doc is None else np.asarray(doc))
        uniform = float(np.log(np.maximum(mask.sum(axis=-1), 1)).mean())
        heads = " ".join(f"{h:.3f}" for h in per_head)
        self.p(f"  attention entropy per head (nats, mean over queries): {heads}   (uniform over the allowed "
               f"keys: {uniform:.3f})")

    def _balancing(self, e):
        import numpy as np

        o, i = e.outputs, e.inputs
        self.p(f"  {e.name}: MaxVio {o['max_vio']:.3f}, bias step rms {o['bias_step_rms']:.3g}")
        counts, old, new = np.asarray(i["counts"]), np.asarray(i["bias"]), np.asarray(o["bias"])
        if counts.size <= 64:
            mom = o.get("momentum")
            self.p(f"    {'expert':<7} {'load':>6} {'bias before':>13} {'bias after':>13} {'Δb':>11}"
                   + (f" {'momentum':>11}" if mom is not None else ""))
            for ex in range(counts.size):
                m = f" {float(mom[ex]):>+11.3e}" if mom is not None else ""
                self.p(f"    e{ex:<6} {int(counts[ex]):>6} {float(old[ex]):>+13.6f} {float(new[ex]):>+13.6f} "
                       f"{float(new[ex] - old[ex]):>+11.3e}{m}")

    def _optimizer(self, e):
        from trinity.reference.inspection import tensor_stats

        g = tensor_stats(e.inputs["grad"])["rms"]
        u = tensor_stats(e.outputs["update"])["rms"]
        p = tensor_stats(e.inputs["param"])["rms"]
        ratio = u / p if p > 0 else float("nan")
        self.p(f"  {e.name:<46} {e.op:<6} {e.inputs['lr']:>9.3g} {_g(g)} {_g(u)} {ratio:>12.4g}")


# ---- the device ---------------------------------------------------------------------------------------------------
def _placed(table, **arrays) -> dict:
    """StepThrough's arrays (params, tokens, labels, doc_ids, optimizer and balancing state) in the table's module:
    copied to a device table once (the states as the trainer moves them, run/placement.py; labels that are the tokens
    stay the tokens), the same objects for a NumPy table."""
    if table is None or not table.on_device:
        return arrays
    from trinity.run.placement import state_to_device

    out = {k: table.to_device(arrays[k]) for k in ("tokens", "doc_ids")}
    out["labels"] = out["tokens"] if arrays["labels"] is arrays["tokens"] else table.to_device(arrays["labels"])
    out["params"], out["optimizer_state"], out["balancing_state"] = state_to_device(
        table, arrays["params"], arrays["optimizer_state"], arrays["balancing_state"])
    return out


def _on_host(table, event):
    """The event with its inputs and outputs as NumPy arrays (the event itself for a NumPy table)."""
    if table is None or not table.on_device:
        return event
    import dataclasses
    return dataclasses.replace(event, inputs=table.to_host(event.inputs), outputs=table.to_host(event.outputs))


# ---- the command --------------------------------------------------------------------------------------------------
def run(args) -> int:
    import sys

    import numpy as np

    from trinity.reference.inspection import StepThrough, name_matches, write_trace
    from trinity.reference.operators.losses import cross_entropy_forward

    if (args.text is None) == (args.tokens is None):
        raise CLIError("give exactly one of --text T or --tokens 1,2,3")
    if args.text is not None and not args.text:
        raise CLIError("--text is empty")
    for flag, path in (("--dump", args.dump), ("--plot", args.plot)):
        if path is not None:  # before any work: writable, and not the checkpoint or tokenizer being read
            check_output_file(path, flag, inputs=[args.model if os.path.exists(args.model) else None,
                                                  args.tokenizer if args.tokenizer and os.path.exists(args.tokenizer)
                                                  else None])
    if args.dump is not None and args.plot is not None and os.path.realpath(args.dump) == os.path.realpath(args.plot):
        raise CLIError(f"--dump and --plot name the same file {args.dump}")

    model = load_model(args.model, args.dtype, presets=True, seed=args.seed)
    config, params, described = model.config, model.params, model.description
    opt_state, bal_state = model.optimizer_state, model.balancing_state
    tokenizer = load_model_tokenizer(args.tokenizer, model)
    if args.text is not None:
        if tokenizer is None:
            raise CLIError(f"--text needs a tokenizer: {model.why_no_tokenizer}; pass --tokenizer SOURCE or use "
                           f"--tokens")
        ids = list(tokenizer.encode(args.text))
        if not ids:
            raise CLIError("--text encodes to no tokens")
    else:
        ids = _parse_tokens(args.tokens)
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise CLIError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    layers = _parse_layers(args.layer, config.num_hidden_layers)
    ops = [o for value in (args.op or []) for o in value.split(",") if o] or None

    tokens = np.asarray([ids], dtype=np.int64)
    doc_ids = None
    if config.intra_document_mask and config.eos_token_id is not None:
        from trinity.reference.data.packing import document_ids

        doc_ids = document_ids(tokens, config.eos_token_id)

    def label(t: int) -> str:
        if tokenizer is None:
            return str(t)
        try:
            text = tokenizer.decode([t])
        except Exception:  # noqa: BLE001 - a display nicety only
            return str(t)
        text = repr(text)
        return f"{t}:{text if len(text) <= 12 else text[:11] + '…'}"

    seen: set = set()

    def keep(name, op, phase):
        seen.add((name, op))
        return name_matches(name, op, layers, ops)

    out = sys.stdout
    dtype = params["model.embed_tokens.weight"].dtype
    print(f"model  {described}; {dtype}; {config.num_hidden_layers} layers "
          f"({sum(config.is_moe_layer(l) for l in range(config.num_hidden_layers))} MoE), d={config.hidden_size}, "
          f"{config.num_experts} experts top-{config.num_experts_per_tok}", file=out)
    print(f"tokens {len(ids)}: " + " ".join(label(t) for t in ids[:64]) + (" …" if len(ids) > 64 else ""), file=out)
    if layers is not None or ops:
        print(f"filter layers={layers if layers is not None else 'all'} ops={ops or 'all'}", file=out)

    table = load_backend(args.backend, args.precision)
    try:
        placed = _placed(table, params=params, tokens=tokens, labels=tokens if args.step else None, doc_ids=doc_ids,
                         optimizer_state=opt_state, balancing_state=bal_state)
        st = StepThrough(config, **placed, step=args.step, keep=keep, inplace=True, ops=table)
    except ValueError as e:  # bad inputs caught by the model's own checks
        raise CLIError(str(e)) from None
    view = _View(config, tokens, label, out)
    events = []  # on the host
    for event in st:
        events.append(_on_host(table, event))
        view.event(events[-1])

    if not st.events:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in seen} | {o for _, o in seen})
        raise CLIError(f"--layer/--op match no operator; operator names: {', '.join(names)}")

    print(file=out)
    print("== summary ==", file=out)
    logits = st.logits
    if st.losses is not None:
        L = st.losses
        print(f"  loss total {L['total']:.6g} (ce {L['ce']:.6g}, z {L['z']:.4g}, balance {L['balance']:.4g})",
              file=out)
    elif tokens.shape[1] > 1:
        ce, _, _ = cross_entropy_forward(logits, tokens, 0.0)
        print(f"  next-token cross-entropy of the input: {ce:.6g} nats over {tokens.shape[1] - 1} predictions",
              file=out)
    last = np.asarray(logits[0, -1], dtype=np.float64)
    p = np.exp(last - last.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:5]
    print("  next token after the input: " + ", ".join(f"{label(int(t))} ({p[t]:.3f})" for t in top), file=out)
    if st.step:
        o = st.optimizer
        print(f"  step: grad norm {st.grad_norm:.6g} (clip {config.grad_clip_norm:g}); lr muon {o['muon_lr']:g}, "
              f"adamw {o['adamw_lr']:g}; update norm muon {o['muon_update_norm']:.4g}, adamw "
              f"{o['adamw_update_norm']:.4g}; optimizer step count now {o['step']}", file=out)

    if args.dump:
        attrs = {"model": args.model, "step": bool(args.step), "layers": layers if layers is not None else "all",
                 "ops": ops or "all", "dtype": str(dtype)}
        if st.losses is not None:
            attrs["losses"] = {k: float(v) for k, v in st.losses.items()}
        try:
            write_trace(args.dump, events, config=config, tokens=tokens,
                        labels=tokens if args.step else None, attrs=attrs)
        except OSError as e:
            raise CLIError(f"cannot write {args.dump}: {e}") from None
        print(f"  wrote {len(st.events)} events to {args.dump}", file=out)
    if args.plot:
        routers = {l: r for l, r in st.routers.items() if layers is None or l in layers}
        if not routers:
            raise CLIError("--plot: no MoE layer " + ("among --layer " + ",".join(map(str, layers))
                                                      if layers is not None else "in this model"))
        from .plotting import plot_router

        try:
            plot_router(routers, [label(t) for t in ids], args.plot,
                        title=f"router gate weights per token — {os.path.basename(os.path.normpath(args.model))}")
        except OSError as e:
            raise CLIError(f"cannot write {args.plot}: {e}") from None
        print(f"  wrote the router heatmap to {args.plot}", file=out)
    return 0
