"""Published training runs, as data: the cost model's validation set (validation.py, benchmarks/validate_published.py,
docs/simulation.md "Validation on published runs").

Each entry: the model (an equivalent trinity Config: hidden size, layers, heads, experts…), the GPU and its count,
the layout in trinity's terms, micro-batch, sequence length, global batch (sequences per step), activation
recompute, the published throughput (tokens/s per GPU) or duration (days for a token budget), the memory per GPU
where published, the exact source, and what differs from trinity's step. A run whose schedule trinity does not run
(pipeline parallelism, DualPipe, FP8 compute or dispatch, tensor parallelism, ZeRO-2's keep-after-forward) carries
`out_of_scope` (the reason): it is listed, never predicted, never counted.

Equivalent configs. Trinity's attention always has an output gate (one more q-wide projection) and its MLPs are
SwiGLU; a published dense model is matched in parameters and FLOPs per token by shrinking the SwiGLU width:
I = (mats·ffn − h_q·d_h) / 3 for a published MLP of `mats` matrices of width `ffn` (2 for GELU, 3 for SwiGLU).
Every layer is global attention (no sliding window), no MoE layer, AdamW for every matrix (matrix_optimizer
"adamw"), as the published runs train. Norms, rotary embeddings and the loss are trinity's (memory-bound work of a
few per cent).

Framework schedules in trinity's terms: FSDP (FSDP1 FULL_SHARD, FSDP2, torchtitan, OLMo-core) gathers each layer
per micro-batch, prefetched, and reduce-scatters its gradients on a second stream (trinity's async_reduce option);
HSDP adds a replica all-reduce, which trinity's schedule runs once per step after the backward (exposed; theirs is
bucketed into the backward — a difference noted, priced as trinity runs it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trinity.reference import Config

__all__ = ["PublishedRun", "CATALOGUE", "dense_equivalent", "in_scope", "gpus_with_runs"]


def dense_equivalent(*, hidden: int, layers: int, heads: int, kv_heads: int | None = None, head_dim: int = 128,
                     ffn: int, mats: int, vocab: int, tied: bool = False, max_seq: int = 131072) -> Config:
    """A dense trinity Config with the published model's parameters and FLOPs per token (module docstring)."""
    kv_heads = kv_heads or heads
    width = (mats * ffn - heads * head_dim) // 3
    return Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                  num_dense_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=max_seq, global_attn_every_n_layers=1, num_experts=1, num_experts_per_tok=1,
                  num_shared_experts=0, tie_word_embeddings=tied, matrix_optimizer="adamw", router_optimizer="adamw",
                  balance_loss_coeff=0.0)


def _mpt(d: int, layers: int, heads: int) -> Config:
    """llm-foundry's MPT: d_model, n_layers, n_heads, expansion_ratio 4 (GELU, 2 matrices), vocab 50368, tied."""
    return dense_equivalent(hidden=d, layers=layers, heads=heads, head_dim=d // heads, ffn=4 * d, mats=2, vocab=50368,
                            tied=True)


def _llama3_8b() -> Config:
    return dense_equivalent(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, mats=3, vocab=128256)


def _olmo2(d: int, layers: int, heads: int, ffn: int) -> Config:
    return dense_equivalent(hidden=d, layers=layers, heads=heads, ffn=ffn, mats=3, vocab=100352)


def _deepseek_v3_16b() -> Config:
    """torchtitan's DeepSeek-V3 16B: dim 2048, 27 layers (1 dense, inter_dim 10944), 16 heads of MLA, 64 routed
    experts of 1408 (top 6) and 2 shared, vocab 102400. MLA (q 16·192, kv through a 512 latent, o 16·128: 13.8M
    parameters a layer) is stood for by trinity's gated GQA of 16 query heads and 1 KV head of 128 (13.1M); its
    attention scores count 16·128 instead of 16·(192+128)/2 per key (about 20 % fewer attention FLOPs)."""
    return Config(vocab_size=102400, hidden_size=2048, intermediate_size=(3 * 10944 - 2048) // 3,
                  moe_intermediate_size=1408, num_hidden_layers=27, num_dense_layers=1, num_attention_heads=16,
                  num_key_value_heads=1, head_dim=128, max_position_embeddings=16384, global_attn_every_n_layers=1,
                  num_experts=64, num_experts_per_tok=6, num_shared_experts=2, matrix_optimizer="adamw",
                  router_optimizer="adamw", balance_loss_coeff=0.0)


def _trinity_large() -> Config:
    return Config.preset("trinity-large")


@dataclass(frozen=True)
class PublishedRun:
    """One published training run (module docstring). `tokens_per_s` is per GPU; a run published as a duration has
    `days`, `tokens` and its batch schedule `batches` [(from token, sequences per step)] instead. `layout`: trinity's
    layout text (with the schedule options its framework corresponds to); None where the split is unpublished (the
    planner's fastest layout under `fixed` is taken: an assumption, stated). `hardware`: fields of the catalogue's
    Hardware this run's GPUs differ in; `peak_range`: (low, high) dense bf16 FLOP/s where the published GPU's peak is
    not known exactly."""
    name: str
    source: str
    reference: str
    model: str
    family: str
    gpu: str
    gpus: int
    seq_len: int
    micro_batch: int
    global_batch: int
    config: object = None  # a function returning the equivalent Config
    layout: str | None = None
    recompute: bool = False
    tokens_per_s: float | None = None
    days: float | None = None
    tokens: float | None = None
    batches: tuple = ()
    memory_gib: float | None = None
    out_of_scope: str | None = None
    notes: str = ""
    hardware: dict = field(default_factory=dict)
    peak_range: tuple | None = None
    fixed: dict = field(default_factory=dict)
    partial_recompute: bool = False  # selective activation checkpointing: some of the forward recomputed
    preset: str | None = None  # the trinity preset it is (a plan of that preset on that job compares with it)


_FOUNDRY = ("https://github.com/mosaicml/llm-foundry/blob/495218376/scripts/train/benchmarking/README.md "
            "(commit 4952183764b8, 2024-04-22), table {}")
_FOUNDRY_NOTE = ("MPT (LayerNorm, no biases, GELU MLP, tied embeddings), FSDP1 FULL_SHARD, bf16 mixed precision, "
                 "flash attention, AdamW, no torch.compile; MosaicML platform, 8 GPUs per node, 3.2 Tb/s per node")


def _foundry(name, table, model, config, gpus, seq, mbs, ga, tps, ac):
    return PublishedRun(name, "llm-foundry", _FOUNDRY.format(table), model, "dense", "h100", gpus, seq, mbs,
                        gpus * mbs * ga, config, f"dp_shard={gpus},async_reduce=true", recompute=ac,
                        tokens_per_s=tps, notes=_FOUNDRY_NOTE + (", activation checkpointing" if ac else ""))


_TITAN = ("https://github.com/pytorch/torchtitan/blob/b5bcd76c/benchmarks/llama3_h100_202412_torchtitan.md "
          "(commit b5bcd76c66d0, runs of 2024-12 at torchtitan 9dec370), table {}")
_TITAN_H100 = dict(hbm_bytes=96e9, hbm_bandwidth=2.4e12)  # "96GB HBM2e with 2.4 TB/sec", 500 W power limit
_TITAN_NOTE = ("Grand Teton H100 at a 500 W limit, 96 GB HBM2e at 2.4 TB/s: its dense peak is between the NVL's "
               "835 and the SXM's 989 TFLOP/s (the source says it does not know it; the range takes both, the point "
               "their mean); FSDP2, selective (per-op) activation checkpointing (it recomputes every other matrix product: "
               "the point counts no recompute, the range reaches trinity's whole-layer recompute); throughput read "
               "at step 90")


def _titan(name, table, gpus, compiled, tps, mem):
    return PublishedRun(name, "torchtitan", _TITAN.format(table), "Llama 3.1 8B", "dense", "h100", gpus, 8192, 2,
                        2 * gpus, _llama3_8b, f"dp_shard={gpus},async_reduce=true", tokens_per_s=tps, memory_gib=mem,
                        notes=_TITAN_NOTE + ("; torch.compile" if compiled else ""), hardware=_TITAN_H100,
                        peak_range=(835e12, 989e12), partial_recompute=True)


_OLMO = ("https://github.com/allenai/OLMo-core/blob/eaecf879c/README.md (commit eaecf879c, 2025-03-12), "
         "throughput table; layouts from src/scripts/train/{}.py at that commit")
_OLMO_NOTE = ("OLMo-core HSDP (FSDP2) within a node, bf16 params, fp32 reductions, torch.compile, AdamW; the node "
              "count is not published: the scripts' default of one node of 8 H100 is taken (HSDP = FSDP 8 there)")


def _olmo(name, script, model, config, mbs, tps):
    return PublishedRun(name, "olmo-core", _OLMO.format(script), model, "dense", "h100", 8, 4096, mbs, 1024, config,
                        "dp_shard=8,async_reduce=true", tokens_per_s=tps, notes=_OLMO_NOTE)


CATALOGUE: list[PublishedRun] = [
    # ---- MosaicML llm-foundry, H100 80GB, bf16, FSDP FULL_SHARD (in scope) ----------------------------------------
    _foundry("MPT-70B, 512 H100", "H100 80GB BF16 (Large Scale)", "MPT-70B", lambda: _mpt(8192, 80, 64), 512, 2048,
             8, 1, 1007, True),
    _foundry("MPT-70B, 128 H100", "H100 80GB BF16 (Large Scale)", "MPT-70B", lambda: _mpt(8192, 80, 64), 128, 2048,
             8, 1, 1058, True),
    _foundry("MPT-30B, 256 H100", "H100 80GB BF16 (Large Scale)", "MPT-30B", lambda: _mpt(7168, 48, 56), 256, 2048,
             8, 1, 2148, True),
    _foundry("MPT-13B, 512 H100", "H100 80GB BF16 (Large Scale)", "MPT-13B", lambda: _mpt(5120, 40, 40), 512, 2048,
             16, 1, 4952, True),
    _foundry("MPT-7B, 128 H100", "H100 80GB BF16 (Large Scale)", "MPT-7B", lambda: _mpt(4096, 32, 32), 128, 2048,
             6, 1, 10475, False),
    _foundry("MPT-70B, 64 H100", "H100 80GB BF16", "MPT-70B", lambda: _mpt(8192, 80, 64), 64, 2048, 8, 4, 1039,
             True),
    _foundry("MPT-30B, 8 H100, 8k", "H100 80GB BF16", "MPT-30B", lambda: _mpt(7168, 48, 56), 8, 8192, 1, 21, 1384,
             True),
    _foundry("MPT-30B, 32 H100", "H100 80GB BF16", "MPT-30B", lambda: _mpt(7168, 48, 56), 32, 2048, 14, 3, 2308,
             True),
    _foundry("MPT-13B, 8 H100, 32k", "H100 80GB BF16", "MPT-13B", lambda: _mpt(5120, 40, 40), 8, 32768, 1, 3, 1976,
             True),
    _foundry("MPT-13B, 8 H100, 4k", "H100 80GB BF16", "MPT-13B", lambda: _mpt(5120, 40, 40), 8, 4096, 10, 3, 4717,
             True),
    _foundry("MPT-13B, 64 H100", "H100 80GB BF16", "MPT-13B", lambda: _mpt(5120, 40, 40), 64, 2048, 2, 1, 4800,
             False),
    _foundry("MPT-7B, 8 H100, 64k", "H100 80GB BF16", "MPT-7B", lambda: _mpt(4096, 32, 32), 8, 65536, 1, 2, 1956,
             True),
    _foundry("MPT-7B, 8 H100, 8k", "H100 80GB BF16", "MPT-7B", lambda: _mpt(4096, 32, 32), 8, 8192, 8, 2, 6935,
             True),
    _foundry("MPT-7B, 8 H100, 2k", "H100 80GB BF16", "MPT-7B", lambda: _mpt(4096, 32, 32), 8, 2048, 6, 1, 10643,
             False),
    _foundry("MPT-3B, 8 H100, 16k", "H100 80GB BF16", "MPT-3B", lambda: _mpt(2560, 32, 20), 8, 16384, 1, 6, 11152,
             False),
    _foundry("MPT-3B, 64 H100", "H100 80GB BF16", "MPT-3B", lambda: _mpt(2560, 32, 20), 64, 2048, 6, 3, 22525,
             False),
    _foundry("MPT-1B, 8 H100, 4k", "H100 80GB BF16", "MPT-1B", lambda: _mpt(2048, 24, 16), 8, 4096, 7, 4, 38535,
             False),
    _foundry("MPT-1B, 8 H100, 32k", "H100 80GB BF16", "MPT-1B", lambda: _mpt(2048, 24, 16), 8, 32768, 1, 4, 12025,
             False),
    _foundry("MPT-760M, 8 H100, 8k", "H100 80GB BF16", "MPT-760M", lambda: _mpt(1536, 24, 12), 8, 8192, 6, 2,
             41825, False),
    # ---- out of scope in llm-foundry's tables ------------------------------------------------------------------
    PublishedRun("MPT-3B, 512 H100, SHARD_GRAD_OP", "llm-foundry", _FOUNDRY.format("H100 80GB BF16 (Large Scale)"),
                 "MPT-3B", "dense", "h100", 512, 2048, 8, 4096, lambda: _mpt(2560, 32, 20),
                 "dp_shard=512,reshard_after_forward=none,async_reduce=true", tokens_per_s=21664,
                 notes=_FOUNDRY_NOTE + "; SHARD_GRAD_OP (ZeRO-2: parameters stay gathered from forward to backward): "
                       "trinity's reshard_after_forward=none"),
    PublishedRun("MPT-3B, 8 H100, FP8", "llm-foundry", _FOUNDRY.format("H100 80GB FP8"), "MPT-3B", "dense", "h100", 8,
                 2048, 10, 480, tokens_per_s=30586, out_of_scope="FP8 matrix products (TransformerEngine)"),
    # ---- torchtitan, Llama 3.1 8B, FSDP2 on H100 (in scope) ---------------------------------------------------------
    _titan("Llama 3.1 8B, 8 H100", "1 (FSDP)", 8, False, 5762, 82.4),
    _titan("Llama 3.1 8B, 8 H100, compiled", "1 (FSDP + torch.compile)", 8, True, 6667, 77.0),
    _titan("Llama 3.1 8B, 128 H100", "3 (FSDP)", 128, False, 5605, 67.0),
    _titan("Llama 3.1 8B, 128 H100, compiled", "3 (FSDP + torch.compile)", 128, True, 6514, 62.0),
    PublishedRun("DeepSeek-V3 16B, 8 H100, EP 8", "torchtitan",
                 "https://github.com/pytorch/torchtitan/issues/1789 (steps 10-40 of the log in its description, "
                 "2025-10-02; config train_configs/deepseek_v3_16b.toml at 82a9530f6: local batch 4 as #1792 set it, "
                 "seq_len 4096, EP 8, FSDP over the 8 GPUs, selective AC, compile of the loss only)",
                 "DeepSeek-V3 16B (MoE, 64 experts top 6, 2 shared)", "moe", "h100", 8, 4096, 4, 32, _deepseek_v3_16b,
                 "dp_shard=8,ep=8,async_reduce=true", tokens_per_s=(11636 + 11758 + 11533 + 11254) / 4,
                 memory_gib=73.32, partial_recompute=True,
                 notes="H100 80GB HBM3; MLA stood for by gated GQA (the config's docstring); softmax routing; "
                       "AdamW; selective AC (the range reaches whole-layer recompute); published mean of the log's steps 10, 20, 30, 40"),
    PublishedRun("Llama 3.1 8B, 8 H100, FSDP + Float8", "torchtitan", _TITAN.format("1"), "Llama 3.1 8B", "dense",
                 "h100", 8, 8192, 2, 16, tokens_per_s=8532, memory_gib=76.8,
                 out_of_scope="Float8 matrix products (torchao)"),
    PublishedRun("Llama 3.1 8B, 8 H100, FSDP 4 + CP 2, Float8", "torchtitan", _TITAN.format("2"), "Llama 3.1 8B",
                 "dense", "h100", 8, 65536, 1, 4, tokens_per_s=2540, memory_gib=84.2,
                 out_of_scope="Float8 matrix products; ring-attention context parallel"),
    PublishedRun("Llama 3.1 70B, 256 H100, FSDP 32 + TP 8", "torchtitan", _TITAN.format("4"), "Llama 3.1 70B",
                 "dense", "h100", 256, 8192, 16, 512, tokens_per_s=829, memory_gib=71.9,
                 out_of_scope="tensor parallelism, Float8"),
    PublishedRun("Llama 3.1 405B, 512 H100, FSDP 8 + TP 8 + PP 8", "torchtitan", _TITAN.format("5"),
                 "Llama 3.1 405B", "dense", "h100", 512, 8192, 32, 256, tokens_per_s=128, memory_gib=72.7,
                 out_of_scope="pipeline parallelism (interleaved 1F1B), tensor parallelism, Float8"),
    PublishedRun("Llama 3.1 8B, 32 H200, FSDP + Float8", "torchtitan",
                 "https://github.com/pytorch/torchtitan/blob/b5bcd76c/benchmarks/"
                 "llama3-8b_h200_202506_trainy-whitefiber.md", "Llama 3.1 8B", "dense", "h200", 32, 8192, 2, 64,
                 tokens_per_s=10938, memory_gib=47.96,
                 out_of_scope="Float8 matrix products and Float8 FSDP gathers"),
    # ---- OLMo-core, H100, HSDP (in scope) ------------------------------------------------------------------------
    _olmo("OLMo 2 1B, H100", "OLMo2-1B", "OLMo 2 1B", lambda: _olmo2(2048, 16, 16, 8192), 8, 55000),
    _olmo("OLMo 2 7B, H100", "OLMo2-7B", "OLMo 2 7B", lambda: _olmo2(4096, 32, 32, 11008), 2, 10000),
    _olmo("Llama 3 8B (OLMo-core), H100", "Llama3-8B", "Llama 3 8B", _llama3_8b, 2, 9500),
    _olmo("OLMo 2 13B, H100", "OLMo2-13B", "OLMo 2 13B", lambda: _olmo2(5120, 40, 40, 13824), 1, 4600),
    # ---- DeepSeek-V3 (paper), out of scope -------------------------------------------------------------------------
    PublishedRun("DeepSeek-V3 671B, 2048 H800", "deepseek",
                 "https://arxiv.org/abs/2412.19437 (DeepSeek-V3 technical report: 2.788M H800 GPU hours, 14.8T "
                 "tokens)", "DeepSeek-V3 671B", "moe", "h100", 2048, 4096, 1, 15360, days=2.788e6 / 2048 / 24,
                 tokens=14.8e12, out_of_scope="DualPipe pipeline parallelism (PP 16), FP8 compute, node-limited "
                                              "EP 64 dispatch; H800 (not in the catalogue)"),
    PublishedRun("DeepSeek-V3 671B, 256 B200 (Nebius)", "pytorch-blog",
                 "https://pytorch.org/blog/enabling-up-to-41-faster-pre-training-mxfp8-and-deepep-for-deepseek-v3-on-"
                 "b200-with-torchtitan (BF16 baseline 651 tokens/s)", "DeepSeek-V3 671B", "moe", "b200", 256, 4096, 1,
                 256, tokens_per_s=651,
                 out_of_scope="layout not given in the text (tensor parallelism in use, by its future work); MLA"),
    # ---- Arcee Trinity (held out by the split rule) ----------------------------------------------------------------
    PublishedRun("Trinity Large, 2048 B300", "arcee",
                 "https://www.arcee.ai/blog/trinity-large (2,048 B300; HSDP with EP 8, 2,048 data-parallel ranks; "
                 "batch raised from 12,288 to 16,384 sequences after 4.9T tokens; 17T tokens in 33 days); "
                 "https://huggingface.co/arcee-ai/Trinity-Large-Base (pretraining context 8,192); shared/seeds/",
                 "Trinity Large (400B MoE, 256 experts top 4)", "moe", "b300", 2048, 8192, 0, 12288, _trinity_large,
                 days=33.0, tokens=17e12, batches=((0.0, 12288), (4.9e12, 16384)), fixed={"ep": 8},
                 preset="trinity-large",
                 notes="the dp_shard × dp_replicate split, micro-batch and recompute are not published: the "
                       "planner's fastest ep = 8 choice that fits is taken (optimistic: a real run need not sit at "
                       "the optimum); 33 days of wall time taken as all training (no downtime); Muon; torchtitan "
                       "(its config names are torchtitan's MoEArgs), whose HSDP all-reduce runs in the backward, "
                       "where trinity's runs once per step"),
]


def in_scope(runs=None) -> list[PublishedRun]:
    """The runs the model predicts (no out_of_scope), in catalogue order."""
    return [r for r in (CATALOGUE if runs is None else runs) if r.out_of_scope is None]


def gpus_with_runs() -> set:
    """The GPU kinds (catalogue keys) that have at least one in-scope published run."""
    return {r.gpu for r in in_scope()}
