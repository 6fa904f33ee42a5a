"""`trinity info PRESET_OR_PATH`: shapes, layer pattern, parameter counts and parameter memory of a model.

PRESET_OR_PATH is a preset name (`trinity-nano`, `trinity-mini`, `trinity-large`, `tiny`, `bench-medium`), a
Hugging Face config.json, or an HF checkpoint directory holding one. Nothing is allocated: counts come from
`trinity.reference.model.params.param_count`, which works from shapes only.
"""

from __future__ import annotations

import json

from trinity.reference.model.config import Config

from .common import human_bytes, human_count, load_config

NAME = "info"
HELP = "show a model's shapes, layer pattern, parameter counts and parameter memory"

DTYPES = {"float32": 4, "bfloat16": 2, "float64": 8}  # bytes per element
MAX_LAYERS_PER_LINE = 64


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help=HELP, description=__doc__.split("\n\n")[0],
                              epilog="example: trinity info trinity-large")
    p.add_argument("model", metavar="PRESET_OR_PATH",
                   help="a preset name, a config.json file, or an HF checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the same information as one JSON object")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    config, source = load_config(args.model)
    info = describe(config)
    info["source"] = source.to_dict()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render(info, source.describe(), config))
    return 0


# ---- the facts ------------------------------------------------------------------------------------------------
def layer_codes(config: Config) -> tuple[str, str]:
    """One character per layer: MLP kind (D dense, M MoE) and attention kind (S sliding, G global)."""
    n = config.num_hidden_layers
    mlp = "".join("M" if config.is_moe_layer(i) else "D" for i in range(n))
    attn = "".join("S" if config.is_sliding_layer(i) else "G" for i in range(n))
    return mlp, attn


def describe(config: Config) -> dict:
    """Everything `trinity info` shows, as plain JSON-able data."""
    from trinity.reference.model.params import param_count  # numpy: imported only when needed

    c = config
    count = param_count(c)
    mlp, attn = layer_codes(c)
    return {
        "model_type": "afmoe",
        "shapes": {
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_dense_layers": c.num_dense_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "q_width": c.q_width,
            "intermediate_size": c.intermediate_size,
            "num_experts": c.num_experts,
            "num_experts_per_tok": c.num_experts_per_tok,
            "num_shared_experts": c.num_shared_experts,
            "moe_intermediate_size": c.moe_intermediate_size,
            "sliding_window": c.sliding_window,
            "vocab_size": c.vocab_size,
        },
        "other": {
            "route_scale": c.route_scale,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_norm_eps,
            "mup_enabled": c.mup_enabled,
            "tie_word_embeddings": c.tie_word_embeddings,
            "max_position_embeddings": c.max_position_embeddings,
        },
        "layers": {
            "mlp": mlp,
            "attention": attn,
            "dense": mlp.count("D"),
            "moe": mlp.count("M"),
            "sliding": attn.count("S"),
            "global": attn.count("G"),
        },
        "params": {
            "total": count.total,
            "active": count.active,
            "total_human": human_count(count.total),
            "active_human": human_count(count.active),
        },
        "memory_bytes": {
            name: {"total": count.total * size, "active": count.active * size} for name, size in DTYPES.items()
        },
    }


# ---- the text view --------------------------------------------------------------------------------------------
def _group_size(config: Config) -> int:
    """Group the pattern by the global-attention period when the layer types follow it, so that `SSSG` lines up."""
    n = config.global_attn_every_n_layers
    derived = tuple(
        "full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(config.num_hidden_layers))
    return n if 2 <= n <= 8 and derived == config.layer_types else 4


def _pattern_lines(config: Config, mlp: str, attn: str) -> list[str]:
    g = _group_size(config)
    per_line = max(g, MAX_LAYERS_PER_LINE // g * g)
    lines = []
    for start in range(0, len(mlp), per_line):
        stop = min(start + per_line, len(mlp))
        groups = [(i, min(i + g, stop)) for i in range(start, stop, g)]
        # index row: the first layer of each group, where it fits without touching the previous label
        index, end = "", -1
        for i, _ in groups:
            col = (i - start) // g * (g + 1)
            label = str(i)
            if col > end:
                index = index.ljust(col) + label
                end = col + len(label)
        lines.append(f"  layer  {index}")
        lines.append("  mlp    " + " ".join(mlp[a:b] for a, b in groups))
        lines.append("  attn   " + " ".join(attn[a:b] for a, b in groups))
    return lines


def render(info: dict, title: str, config: Config) -> str:
    s, lay, p = info["shapes"], info["layers"], info["params"]
    heads = f"{s['num_attention_heads']} query / {s['num_key_value_heads']} kv, head_dim {s['head_dim']}"
    if s["q_width"] != s["hidden_size"]:
        heads += f" (q width {s['q_width']} != d)"
    experts = (f"{s['num_experts']} routed, top-{s['num_experts_per_tok']}, {s['num_shared_experts']} shared; "
               f"expert width {s['moe_intermediate_size']}")
    o = info["other"]
    rows = [
        ("hidden size d", f"{s['hidden_size']}"),
        ("layers", f"{s['num_hidden_layers']}: {lay['dense']} dense + {lay['moe']} MoE, "
                   f"{lay['sliding']} sliding + {lay['global']} global"),
        ("attention heads", heads),
        ("experts", experts),
        ("dense FFN width", f"{s['intermediate_size']}"),
        ("sliding window", f"{s['sliding_window']}"),
        ("vocab", f"{s['vocab_size']}"),
        ("other", f"route_scale {o['route_scale']:g}, rope_theta {o['rope_theta']:g}, "
                  f"muP {'on' if o['mup_enabled'] else 'off'}, "
                  f"{'tied' if o['tie_word_embeddings'] else 'untied'} embeddings"),
    ]
    out = [title]
    out += [f"  {k:<17}{v}" for k, v in rows]
    out.append(f"layer pattern (one column per layer, grouped by {_group_size(config)}):")
    out += _pattern_lines(config, lay["mlp"], lay["attention"])
    out.append(f"         D dense MLP, M MoE; S sliding window ({s['sliding_window']}), G global attention")
    out.append(f"parameters  {p['total_human']} total, {p['active_human']} active per token "
               f"({p['total']:,} / {p['active']:,})")
    out.append("parameter memory (weights only, every tensor in that dtype):")
    out.append(f"  {'':<17}{'total':>10}  {'active':>10}")
    for name, m in info["memory_bytes"].items():
        out.append(f"  {name:<17}{human_bytes(m['total']):>10}  {human_bytes(m['active']):>10}")
    return "\n".join(out)
