"""`trinity generate MODEL --prompt TEXT --max-new-tokens N`: continue a prompt with a KV cache, streaming tokens.

MODEL is a checkpoint of ours (`trinity train` writes step_N.h5, or step_N.sharded/ under a layout) or a Hugging
Face checkpoint directory (config.json + safetensors). Greedy by default; `--temperature T` samples from
softmax(z/T), `--top-p P` keeps only the nucleus of mass P; the same --seed gives the same tokens.

The tokenizer is --tokenizer SOURCE (a prepared dataset dir with meta.json, an HF dir with tokenizer.json, a
tokenizer.json file, or "bytes"); else the HF directory's own tokenizer.json; else, for one of our checkpoints, the
copy of the training tokenizer it carries (cli/common.py resolves it, as for `trinity inspect`; no path a checkpoint
names is opened). `--prompt-tokens 1,2,3` gives the prompt as token ids and needs no
tokenizer (e.g. synthetic data). Output is the prompt and the continuation as text, or, when no tokenizer is known
(or with --output ids), the new token ids only, space-separated.
Generation stops after N tokens or at EOS (--eos-id, else the tokenizer's, else the config's eos_token_id;
--ignore-eos never stops early). `--backend numba` runs the numba kernels; `--backend cupy` runs on a GPU: the params
go to the device once, each forward's tokens in and the last logits out (reference/generation/sampling.py).
"""

from __future__ import annotations

import sys
import time

from trinity.accel import BACKENDS

from .common import CLIError, add_precision_argument, load_backend, load_model, load_model_tokenizer, resolve_eos_id

NAME = "generate"
HELP = "generate text from a checkpoint with a KV cache (greedy or temperature / top-p sampling)"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0],
                              epilog="example: trinity generate runs/tiny/checkpoints/step_1000.h5 "
                                     "--prompt-tokens 1,2,3 --max-new-tokens 32")
    p.add_argument("model", metavar="MODEL", help="our checkpoint (.h5 or .sharded) or an HF checkpoint directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-tokens", metavar="IDS", help="the prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", metavar="N", type=int, required=True, help="generate at most N tokens")
    p.add_argument("--temperature", metavar="T", type=float, default=0.0,
                   help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-p", metavar="P", type=float, default=1.0, help="nucleus sampling mass in (0, 1] "
                                                                         "(default 1: off)")
    p.add_argument("--seed", metavar="S", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", metavar="SOURCE", help="dataset dir, HF dir, tokenizer.json or 'bytes'")
    p.add_argument("--eos-id", metavar="ID", type=int, help="stop after this token (default: see above)")
    p.add_argument("--ignore-eos", action="store_true", help="never stop before N tokens")
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="compute dtype (default: the checkpoint's own; float32 for HF directories)")
    p.add_argument("--backend", default="reference", choices=BACKENDS,
                   help="operator table (trinity.accel.get_backend; default reference)")
    add_precision_argument(p)
    p.add_argument("--output", choices=("text", "ids"),
                   help="print decoded text (default when a tokenizer is known) or token ids")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    p.add_argument("--stats", action="store_true", help="print token counts and speed on stderr at the end")
    p.set_defaults(run=run)
    return p


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise CLIError(f"--prompt-tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CLIError("--prompt-tokens is empty")
    return ids


# ---- streaming output -------------------------------------------------------------------------------------------
class _TextStream:
    """Decode the ids so far and print what is new; hold back text that ends in an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer, out):
        self.tok, self.out, self.ids, self.shown = tokenizer, out, [], ""

    def add(self, token: int, final: bool = False):
        if token is not None:
            self.ids.append(token)
        text = self.tok.decode(self.ids)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def run(args) -> int:
    from trinity.reference.generation.sampling import check_sampling, generate_stream

    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        check_sampling(args.temperature, args.top_p)
    except ValueError as e:
        raise CLIError(str(e).replace("temperature", "--temperature").replace("top_p", "--top-p")) from None
    if args.eos_id is not None and args.eos_id < 0:
        raise CLIError(f"--eos-id must be >= 0, got {args.eos_id}")
    prompt_ids = _parse_ids(args.prompt_tokens) if args.prompt_tokens is not None else None
    if args.prompt is not None and args.prompt == "":
        raise CLIError("--prompt is empty")

    ops = load_backend(args.backend, args.precision)
    loaded = load_model(args.model, args.dtype, state=False)
    params = loaded.params if ops is None else ops.to_device(loaded.params)  # a device table's: once
    tokenizer = load_model_tokenizer(args.tokenizer, loaded)
    if tokenizer is None and (args.prompt is not None or args.output == "text"):
        what = "--prompt TEXT" if args.prompt is not None else "--output text"
        raise CLIError(f"{what} needs a tokenizer: {loaded.why_no_tokenizer}; pass --tokenizer SOURCE "
                       f"or give --prompt-tokens")
    if prompt_ids is None:
        prompt_ids = tokenizer.encode(args.prompt)
        if not prompt_ids:
            raise CLIError("the prompt encodes to no tokens")
    V = loaded.config.vocab_size
    bad = [i for i in prompt_ids if not 0 <= i < V]
    if bad:
        raise CLIError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {V})")

    eos = None if args.ignore_eos else resolve_eos_id(args.eos_id, tokenizer, loaded)
    output = args.output or ("text" if tokenizer is not None else "ids")

    out = sys.stdout
    stream = None
    if output == "text":
        stream = _TextStream(tokenizer, out)
        if not args.no_echo:
            out.write(args.prompt if args.prompt is not None else tokenizer.decode(prompt_ids))
            out.flush()

    t0 = time.perf_counter()
    t_first = None
    count = 0
    try:
        for token in generate_stream(loaded.config, params, prompt_ids, args.max_new_tokens,
                                     args.temperature, args.top_p, args.seed, eos, ops=ops):
            count += 1
            if t_first is None:
                t_first = time.perf_counter()
            if stream is not None:
                if token != eos:
                    stream.add(token)
            else:
                out.write(("" if count == 1 else " ") + str(token))
                out.flush()
    except ValueError as e:
        raise CLIError(str(e)) from None
    if stream is not None:
        stream.add(None, final=True)
    out.write("\n")
    out.flush()
    if args.stats:
        t1 = time.perf_counter()
        rate = (count - 1) / (t1 - t_first) if count > 1 and t1 > t_first else float("nan")
        first = (t_first or t1) - t0
        print(f"trinity generate: {len(prompt_ids)} prompt + {count} new tokens in {t1 - t0:.2f} s "
              f"(prefill + first token {first:.2f} s, then {rate:.1f} tokens/s)", file=sys.stderr)
    return 0
