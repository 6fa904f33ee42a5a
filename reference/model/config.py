"""The model and recipe configuration: every HF `AfmoeConfig` field plus the trainer-side fields.

Two parts, each its own frozen dataclass: `ModelConfig` (what the model computes: the HF fields) and `Recipe` (how it
is trained: initialization, the document mask, balancing, loss coefficients, optimizers, schedule). `Config` holds
both, flat, and `config.model` / `config.recipe` give them back: a resumed run may change the recipe (logged) but not
the model (refused), nor the recipe fields that shape the saved state (STATE_SHAPING). The parallel layout is
neither: it is run configuration (trinity.distributed.layout).

SPEC §1 lists the HF fields and their defaults, §2 the published Trinity shapes, §6/§7/§9 the recipe, and
§14 the decisions this project took where public material is silent. Each §14 decision is a field here with the
§14 default, so a user can change it; the docs call those choices, not published facts.

`Config` is a frozen dataclass. Build it directly, from a preset (`Config.preset("trinity-nano")`), or from a
Hugging Face config.json (`Config.from_hf(path_or_dict)`); `to_hf()` gives back a dict that transformers loads.
Every constructor validates, and a bad value raises `ConfigError` naming the field and the constraint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, fields

__all__ = ["Config", "ModelConfig", "Recipe", "ConfigError", "PRESETS", "RESUMABLE_FIELDS", "STATE_SHAPING"]

SLIDING, FULL = "sliding_attention", "full_attention"


class ConfigError(ValueError):
    """A configuration value that breaks a constraint; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """What the model computes: the HF AfmoeConfig fields (SPEC §1) and the post-norm epsilon. A checkpoint of
    another ModelConfig is another model (a resume refuses it). Fields only: `Config` validates."""
    # ---- HF AfmoeConfig fields (SPEC §1), with HF's defaults -------------------------------------------------
    vocab_size: int = 200192
    hidden_size: int = 2048
    intermediate_size: int = 6144
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 32
    num_dense_layers: int = 1
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # None -> num_attention_heads
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 16384
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    num_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2
    route_scale: float = 1.0
    global_attn_every_n_layers: int = 4
    sliding_window: int = 1024
    layer_types: tuple[str, ...] | None = None  # None -> derived from global_attn_every_n_layers
    attention_dropout: float = 0.0
    mup_enabled: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    # ---- Norm epsilon of the post-norms (SPEC §4.2; §14 #10) ------------------------------------------------------
    post_norm_eps: float | None = None  # None -> rms_norm_eps (§14 #10); HF has one eps, so != eps is not HF-exact


@dataclass(frozen=True)
class Recipe:
    """How the model is trained (SPEC §6-§9): initialization, the training-side document mask, load balancing, loss
    coefficients, optimizers and the learning-rate schedule. A resumed run may change it (each change is logged),
    except the fields in STATE_SHAPING, which decide what the saved optimizer or balancing state holds. Fields only:
    `Config` validates."""

    # ---- Initialization (SPEC §8; §14 #9, #13) --------------------------------------------------------------
    init_std: float | None = None  # None -> 0.5/sqrt(d) under muP, else 0.02 (Arcee base_std)
    init_truncation: float = 3.0  # truncated normal on [-t*sigma, t*sigma]
    depth_init: bool = False  # True -> output-side matrices use sigma/sqrt(2(l+1)) (Arcee converter: False)
    post_norm_gain: float | None = None  # None -> 1/sqrt(num_hidden_layers)  (§14 #9)

    # ---- Training-side masks (SPEC §4.6; §14 #12) -----------------------------------------------------------
    intra_document_mask: bool = False  # Trinity Large pretraining: True; Nano/Mini: False

    # ---- Load balancing (SPEC §6; §14 #6, #7, #8, #16) -------------------------------------------------------
    load_balancing: str = "smebu"  # "smebu" | "sign" | "none"
    sign_update_rate: float = 1e-3  # gamma of the sign rule (HF fixtures: load_balance_coeff)
    smebu_lambda: float = 5e-4
    smebu_beta: float = 0.5
    smebu_kappa: float = 2.0
    balance_loss_coeff: float = 1e-4  # alpha of the sequence-wise balance loss (SPEC §6.3)

    # ---- Losses (SPEC §7; §14 #17) ---------------------------------------------------------------------------
    z_loss_coeff: float = 1e-6

    # ---- Optimizers (SPEC §9; §14 #2, #3, #4, #5) ------------------------------------------------------------
    muon_lr: float = 8e-4
    adamw_lr: float = 2e-4
    muon_momentum: float = 0.95
    muon_nesterov: bool = False
    muon_ns_coefficients: str = "dion"  # "dion" (5 per-step triples) | "keller" (3.4445, -4.7750, 2.0315)
    muon_ns_steps: int = 5
    muon_eps: float = 1e-8
    muon_lr_adjust: str = "trinity"  # "trinity": sqrt(max(1, out/in)) (eq.41) | "dion": sqrt(out/in)
    router_optimizer: str = "muon"  # "muon" | "adamw"
    matrix_optimizer: str = "muon"  # "muon" (the recipe) | "adamw": every parameter AdamW (a baseline, not Trinity's)
    weight_decay: float = 0.1  # matrices, embedding and head
    norm_weight_decay: float = 0.0  # norm gains (the report removed WD from norms)
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.95
    adamw_eps: float = 1e-8
    grad_clip_norm: float = 1.0  # global-norm clip; 0 disables

    # ---- Schedule (SPEC §9.1; §14 #11) ------------------------------------------------------------------------
    warmup_steps: int = 2000
    lr_schedule: str = "wsd"  # "wsd" (constant then linear decay) | "cosine"
    decay_start_fraction: float = 0.88  # WSD: decay over the last 12% of steps (phase 3 of the 10T mix)
    lr_floor_ratio: float = 0.0  # final lr as a fraction of peak (Large cosine: 0.1)



# Recipe fields a resume may not change: they decide the shape of the saved state (the balancing method's momentum,
# which parameters Muon or AdamW keep state for).
STATE_SHAPING = frozenset({"load_balancing", "router_optimizer", "matrix_optimizer"})


@dataclass(frozen=True)
class Config(Recipe, ModelConfig):
    """A model and its training recipe: every field of ModelConfig and of Recipe, flat (`config.hidden_size`,
    `config.muon_lr`); `config.model` and `config.recipe` are the two parts, `Config.from_parts` joins them."""

    # ------------------------------------------------------------------------------------------------------------
    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.layer_types is None:
            n = self.global_attn_every_n_layers
            if not isinstance(n, int) or n <= 0:
                raise ConfigError(f"global_attn_every_n_layers must be a positive integer, got {n!r}")
            types = tuple(FULL if (i + 1) % n == 0 else SLIDING for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._validate()

    # ---- validation ---------------------------------------------------------------------------------------------
    def _validate(self):
        def need(ok, name, constraint):
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {constraint}")

        positive = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                    "sliding_window", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        for name in ["num_dense_layers", "num_shared_experts", "warmup_steps"]:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "must be a non-negative integer")
        need(self.num_dense_layers <= self.num_hidden_layers, "num_dense_layers",
             f"must be <= num_hidden_layers ({self.num_hidden_layers})")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads ({self.num_attention_heads})")
        need(self.head_dim % 2 == 0, "head_dim", "must be even (half-split RoPE, SPEC §4.5)")
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"top-k must be <= num_experts ({self.num_experts})")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' is supported (SwiGLU, SPEC §4.7)")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"must have one entry per layer ({self.num_hidden_layers}), got {len(self.layer_types)}")
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        need(not bad, "layer_types", f"entries must be {SLIDING!r} or {FULL!r}, got {bad[:3]}")
        for name in ["rms_norm_eps", "rope_theta", "route_scale"]:
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, "must be a positive number")
        need(self.attention_dropout == 0.0, "attention_dropout", "Trinity has no attention dropout; must be 0")
        for name in ["init_std", "post_norm_gain", "post_norm_eps"]:
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v > 0), name, "must be None or a positive number")
        need(self.init_truncation > 0, "init_truncation", "must be positive")
        need(self.load_balancing in ("smebu", "sign", "none"), "load_balancing", "must be 'smebu', 'sign' or 'none'")
        need(self.muon_ns_coefficients in ("dion", "keller"), "muon_ns_coefficients", "must be 'dion' or 'keller'")
        need(self.muon_lr_adjust in ("trinity", "dion"), "muon_lr_adjust", "must be 'trinity' or 'dion'")
        need(self.router_optimizer in ("muon", "adamw"), "router_optimizer", "must be 'muon' or 'adamw'")
        need(self.matrix_optimizer in ("muon", "adamw"), "matrix_optimizer", "must be 'muon' or 'adamw'")
        need(self.lr_schedule in ("wsd", "cosine"), "lr_schedule", "must be 'wsd' or 'cosine'")
        need(0.0 <= self.decay_start_fraction <= 1.0, "decay_start_fraction", "must lie in [0, 1]")
        need(0.0 <= self.lr_floor_ratio <= 1.0, "lr_floor_ratio", "must lie in [0, 1]")
        need(0.0 <= self.smebu_beta < 1.0, "smebu_beta", "must lie in [0, 1)")
        need(0.0 <= self.muon_momentum < 1.0, "muon_momentum", "must lie in [0, 1)")
        for name in ["sign_update_rate", "smebu_lambda", "smebu_kappa", "balance_loss_coeff", "z_loss_coeff",
                     "muon_lr", "adamw_lr", "weight_decay", "norm_weight_decay", "adamw_eps", "muon_eps",
                     "grad_clip_norm"]:
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, name, "must be a non-negative number")
        need(self.muon_ns_steps > 0, "muon_ns_steps", "must be positive")
        for name in ["adamw_beta1", "adamw_beta2"]:
            need(0.0 <= getattr(self, name) < 1.0, name, "must lie in [0, 1)")
        for name in ["eos_token_id", "pad_token_id", "bos_token_id"]:
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and 0 <= v < self.vocab_size), name,
                 f"must be None or a token id in [0, {self.vocab_size})")

    # ---- derived quantities -------------------------------------------------------------------------------------
    @property
    def kv_groups(self) -> int:
        """r = h_q / h_kv: query heads per KV head (SPEC §4.4 step 4)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_width(self) -> int:
        """h_q·d_h: the width of q_proj, gate_proj and the input of o_proj (may differ from d; SPEC §2)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        """N_s·I_m: one shared SwiGLU of this width (no expert index; SPEC §3.1)."""
        return self.num_shared_experts * self.moe_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.num_dense_layers

    def is_sliding_layer(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def window_of(self, layer: int) -> int | None:
        """The attention window of a layer: w for sliding layers, None (unbounded causal) for global ones."""
        return self.sliding_window if self.is_sliding_layer(layer) else None

    @property
    def base_std(self) -> float:
        """σ of the truncated-normal init: 0.5/√d under muP, else 0.02 (SPEC §8)."""
        if self.init_std is not None:
            return self.init_std
        return 0.5 / math.sqrt(self.hidden_size) if self.mup_enabled else 0.02

    @property
    def post_norm_init(self) -> float:
        """Initial gain of the post-attention and post-MLP norms: 1/√L (SPEC §8, §14 #9)."""
        return self.post_norm_gain if self.post_norm_gain is not None else 1.0 / math.sqrt(self.num_hidden_layers)

    @property
    def post_eps(self) -> float:
        return self.post_norm_eps if self.post_norm_eps is not None else self.rms_norm_eps

    @property
    def model(self) -> ModelConfig:
        """What the model computes (a resume refuses a change)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    @property
    def recipe(self) -> Recipe:
        """How it is trained (a resume may change it, but for STATE_SHAPING)."""
        return Recipe(**{f.name: getattr(self, f.name) for f in fields(Recipe)})

    @classmethod
    def from_parts(cls, model: ModelConfig, recipe: Recipe | None = None) -> "Config":
        """The Config of a model and a recipe (default: the recipe's defaults), validated."""
        parts = dataclasses.asdict(model)
        parts.update(dataclasses.asdict(recipe if recipe is not None else Recipe()))
        return cls(**parts)

    @property
    def embedding_multiplier(self) -> float:
        """√d under muP, else 1 (SPEC §4.1)."""
        return math.sqrt(self.hidden_size) if self.mup_enabled else 1.0

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated). Changing num_hidden_layers re-derives layer_types unless
        layer_types is given too."""
        if "num_hidden_layers" in changes or "global_attn_every_n_layers" in changes:
            changes.setdefault("layer_types", None)
        return dataclasses.replace(self, **changes)

    # ---- presets ------------------------------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return Config(**PRESETS[name])

    # ---- Hugging Face config.json -------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source) -> "Config":
        """Build from an HF config: a dict, a config.json path, or a checkpoint directory holding one.

        Accepts `rope_theta` at top level (older files) and `rope_parameters` (transformers v5). The extra keys of
        released files (score_func, route_norm, n_group, …; SPEC §1) are checked to have the values under which
        HF's hard-coded routing is exact; `auto_map` is ignored: remote code is never run.
        """
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path, encoding="utf-8") as f:
                try:
                    d = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path} is not valid JSON: {e}") from None
        elif isinstance(source, dict):
            d = dict(source)
        else:
            raise TypeError(f"from_hf takes a dict or a path, got {type(source).__name__}")

        model_type = d.pop("model_type", "afmoe")
        if model_type != "afmoe":
            raise ConfigError(f"model_type={model_type!r}: only 'afmoe' is supported")
        rope = d.pop("rope_parameters", None) or {}
        rope_scaling = d.pop("rope_scaling", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or rope_scaling not in (None, {}):
            raise ConfigError(f"rope_parameters: only the default RoPE type is supported, got {rope or rope_scaling}")
        if "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
        for key, ok in _ROUTING_EXTRAS.items():
            if key in d and d.pop(key) not in ok:
                raise ConfigError(f"{key}: only {sorted(map(str, ok))} is supported (SPEC §1)")
        if d.pop("attention_bias", False):
            raise ConfigError("attention_bias=True: AFMoE has no attention biases")
        if "num_dense_layers" in d and d["num_dense_layers"] is None:
            d["num_dense_layers"] = 0
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(d.get(key), list):  # generation configs may list several; keep the first
                d[key] = d[key][0] if d[key] else None
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        unknown = sorted(k for k in d if k not in known and k not in _HF_BOOKKEEPING)
        if unknown:
            warnings.warn(f"Config.from_hf ignores unknown keys: {unknown}", stacklevel=2)
        if "layer_types" in kwargs and kwargs["layer_types"] is not None:
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The config.json dict that transformers' AfmoeConfig loads (v5 `rope_parameters` and top-level
        `rope_theta`, so older readers work too)."""
        d = {name: getattr(self, name) for name in _HF_FIELDS}
        d["layer_types"] = list(self.layer_types)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        d["model_type"] = "afmoe"
        d["architectures"] = ["AfmoeForCausalLM"]
        return d

    def to_dict(self) -> dict:
        """Every field, JSON-serialisable (used by checkpoints)."""
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown Config fields: {unknown}")
        return cls(**d)


_HF_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_dense_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
              "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings",
              "rope_theta", "num_experts", "num_experts_per_tok", "num_shared_experts", "route_scale",
              "global_attn_every_n_layers", "sliding_window", "attention_dropout", "mup_enabled",
              "eos_token_id", "pad_token_id", "bos_token_id"]

# Extra keys of released config.json files and the values under which HF's routing is exact (SPEC §1).
_ROUTING_EXTRAS = {
    "score_func": ("sigmoid",),
    "route_norm": (True,),
    "n_group": (1, None),
    "topk_group": (1, None),
    "num_expert_groups": (1, None),
    "num_limited_groups": (1, None),
}

# Keys that carry no model math (bookkeeping of transformers, remote-code pointers, kernel switches).
_HF_BOOKKEEPING = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "use_grouped_mm",
    "output_router_logits", "load_balance_coeff", "_name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "use_return_dict", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params", "torchscript",
    "pruned_heads", "add_cross_attention", "cross_attention_hidden_size", "is_decoder", "finetuning_task",
    "_attn_implementation_autoset", "_experts_implementation", "router_aux_loss_coef", "sep_token_id",
    "decoder_start_token_id", "quantization_config",
}

# The fields a resumed run may change (logged when it does): the recipe's, but for those that shape the saved state.
RESUMABLE_FIELDS = frozenset(f.name for f in fields(Recipe)) - STATE_SHAPING


_NANO_MINI_RECIPE = dict(load_balancing="sign", balance_loss_coeff=0.0, z_loss_coeff=0.0, lr_schedule="wsd",
                         lr_floor_ratio=0.0)

PRESETS: dict[str, dict] = {
    # SPEC §2, from the Nano config.json fixture and Table 1; recipe per §14 #7.
    "trinity-nano": dict(
        vocab_size=200192, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=256,
        num_hidden_layers=56, num_dense_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        max_position_embeddings=131072, rope_theta=10000.0, num_experts=128, num_experts_per_tok=8,
        num_shared_experts=1, route_scale=2.826, sliding_window=2048, mup_enabled=True,
        muon_lr=1e-3, adamw_lr=3e-4, **_NANO_MINI_RECIPE),
    "trinity-mini": dict(
        vocab_size=200192, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=1024,
        num_hidden_layers=32, num_dense_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=131072, rope_theta=10000.0, num_experts=128, num_experts_per_tok=8,
        num_shared_experts=1, route_scale=2.826, sliding_window=2048, mup_enabled=True,
        muon_lr=1e-3, adamw_lr=2e-4, **_NANO_MINI_RECIPE),
    # Large: shapes from Table 1; rope_theta/eps/max_pos/muP per §14 #1 (the Thinking config.json digest in seeds/
    # agrees: rope_theta 10000, rms_norm_eps 1e-5, max_position_embeddings 262144, mup_enabled true).
    "trinity-large": dict(
        vocab_size=200192, hidden_size=3072, intermediate_size=12288, moe_intermediate_size=3072,
        num_hidden_layers=60, num_dense_layers=6, num_attention_heads=48, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=262144, rope_theta=10000.0, num_experts=256, num_experts_per_tok=4,
        num_shared_experts=1, route_scale=2.448, sliding_window=4096, mup_enabled=True,
        intra_document_mask=True, load_balancing="smebu", balance_loss_coeff=1e-4, z_loss_coeff=1e-6,
        muon_lr=8e-4, adamw_lr=2e-4, lr_schedule="cosine", lr_floor_ratio=0.1),
    # Small presets for tests and benchmarks (not Trinity models).
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=65536, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
        route_scale=2.0, sliding_window=32, mup_enabled=True, warmup_steps=10),
    "bench-medium": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8,
        num_dense_layers=1, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        max_position_embeddings=8192, num_experts=16, num_experts_per_tok=4, num_shared_experts=1,
        route_scale=2.0, sliding_window=128, mup_enabled=True),
}
