"""`ModelArgs`: the flat, explicit DeepSeek-V4 configuration (spec §2.1, §4).

Every architectural switch is a field; nothing is inferred from a size. Presets come from
spec §2.1 (Flash, Pro) and §4 (tiny, h200_1b). `from_hf_config`/`to_hf_config` round-trip the
official `config.json` field names (spec §2.1 column 1).

Choices where the spec marks [rec] or an open question, exposed as fields:
- `csa_ratio`: which compress ratio means CSA (overlapping compressor + indexer); the reference
  hard-codes `ratio == 4` (spec §4 design rules).
- `indexer_mode`: "sparse" (top-k, stage C), "dense" (CSA attends to every visible entry, no
  indexer, stage A) or "warmup" (dense attention, indexer KL over all visible entries, stage B);
  spec §3.12.
- `hc_init_scale`, `hc_fn_init_std`: mHC init (spec §3.1.4 [rec]: 0.01 and 0.006).
- `hc_dynamic=False` with `hc_mult=1`: static identity connections, a plain pre-norm residual
  (spec §5 item 7).
- `balance_loss_alpha` (1e-4) and `bias_update_speed` (1e-3): V3's values (spec §3.8.3 [rec]).
- `indexer_loss_weight`: weight of the V3.2-style indexer KL (spec §3.5 [3p]).
- YaRN applies in compressed layers whenever `rope_factor > 1` and `original_seq_len > 0`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

INDEXER_MODES = ("sparse", "dense", "warmup")


@dataclass
class ModelArgs:
    """Hyper-parameters of a V4 model (field names follow DeepSeek's reference `ModelArgs`)."""

    vocab_size: int = 512
    """Vocabulary size (rows of the embedding and the output head)."""
    dim: int = 64
    """Hidden size d."""
    n_layers: int = 4
    """Number of trunk blocks (the MTP block is extra)."""
    n_mtp_layers: int = 1
    """Multi-token-prediction depth (0 or 1)."""
    max_seq_len: int = 512
    """Longest sequence the model accepts in one forward."""

    # attention
    n_heads: int = 4
    """Query heads H (a single shared KV head: MQA with K = V)."""
    head_dim: int = 32
    """Attention head dim D; RoPE acts on its last `rope_head_dim` dims."""
    rope_head_dim: int = 8
    """RoPE dims r (interleaved pairs on the last r dims)."""
    q_lora_rank: int = 32
    """Query latent rank c_q (wq_a: d -> c_q, wq_b: c_q -> H*D)."""
    o_groups: int = 2
    """Groups g of the grouped low-rank output projection."""
    o_lora_rank: int = 16
    """Rank d_g of each output group (wo_a: g blocks of H*D/g -> d_g)."""
    window_size: int = 8
    """Sliding window W in tokens, the query included (0 disables the window branch)."""
    compress_ratios: List[int] = field(default_factory=lambda: [0, 4, 16, 4, 0])
    """Per-layer compress ratio, n_layers + n_mtp_layers entries (last = MTP): 0 sliding only,
    `csa_ratio` CSA, anything else HCA."""
    csa_ratio: int = 4
    """Compress ratio that marks a CSA layer (overlapping compressor + lightning indexer)."""
    rope_theta: float = 10000.0
    """RoPE base of sliding-only layers (never YaRN)."""
    compress_rope_theta: float = 160000.0
    """RoPE base of CSA/HCA layers (every RoPE use inside those layers)."""
    rope_factor: float = 16.0
    """YaRN frequency-interpolation factor in compressed layers (1 disables YaRN)."""
    original_seq_len: int = 32
    """YaRN original context length (0 disables YaRN)."""
    beta_fast: int = 32
    """YaRN fast correction (number of rotations)."""
    beta_slow: int = 1
    """YaRN slow correction (number of rotations)."""

    # lightning indexer
    index_n_heads: int = 4
    """Indexer heads H_I."""
    index_head_dim: int = 32
    """Indexer head dim D_I (power of two: Hadamard transform)."""
    index_topk: int = 4
    """Compressed entries k_I selected per query in CSA layers."""
    indexer_mode: str = "sparse"
    """"sparse" (top-k + indexer KL), "dense" (all visible entries, no indexer) or "warmup"
    (all visible entries + indexer KL over them)."""
    indexer_loss_weight: float = 1.0
    """Weight of the indexer KL loss in the total loss (0 turns it off)."""

    # MoE
    n_routed_experts: int = 8
    """Routed experts E."""
    n_shared_experts: int = 1
    """Shared experts (the reference asserts exactly 1)."""
    n_activated_experts: int = 2
    """Experts per token K."""
    moe_inter_dim: int = 32
    """Expert hidden size I (routed and shared)."""
    n_hash_layers: int = 1
    """Leading layers routed by the frozen token-id hash table `tid2eid`."""
    score_func: str = "sqrtsoftplus"
    """Router score: sqrt(softplus(logit))."""
    route_scale: float = 1.5
    """Routed weights of a token sum to this value."""
    swiglu_limit: float = 10.0
    """SwiGLU clamp: linear part to [-limit, limit], gate capped at limit (0 disables)."""
    balance_loss_alpha: float = 1e-4
    """Sequence-wise balance loss coefficient on score layers (0 disables)."""
    bias_update_speed: float = 1e-3
    """Aux-loss-free bias step gamma used by `update_balance_biases`."""
    hash_seed: int = 0
    """Seed of the deterministic, load-balanced hash table."""

    # mHC
    hc_mult: int = 4
    """Residual streams n_hc."""
    hc_sinkhorn_iters: int = 20
    """Sinkhorn iterations for the residual mixer."""
    hc_eps: float = 1e-6
    """mHC epsilon (pre offset and Sinkhorn denominators)."""
    hc_dynamic: bool = True
    """Dynamic mHC; False (with hc_mult = 1) gives static identity connections."""
    hc_init_scale: float = 0.01
    """Initial gating factors alpha (hc_*_scale)."""
    hc_fn_init_std: float = 0.006
    """Init std of the dynamic projections hc_*_fn."""

    # numerics and init
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.006
    """Init std of every linear weight and the embedding (V3's global std)."""
    mtp_loss_weight: float = 0.3
    """lambda of the MTP loss (the trainer may schedule it)."""

    # quantization-aware training (fake quantization, straight-through gradients)
    qat_fp8_kv: bool = True
    """FP8 e4m3 fake-quant of KV non-RoPE dims (window KV and main compressed entries)."""
    fp8_block: int = 8
    """FP8 block size along channels (64 in the real model)."""
    qat_fp4_experts: bool = True
    """MXFP4 fake-quant of routed expert weights."""
    qat_fp4_indexer: bool = True
    """MXFP4 fake-quant of the indexer q and compressed k (after the Hadamard)."""
    fp4_block: int = 32
    """MXFP4 block size along the input/channel dim."""

    def __post_init__(self) -> None:
        self.compress_ratios = list(self.compress_ratios)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the inconsistent fields and the fix."""
        def fail(msg: str) -> None:
            raise ValueError(f"ModelArgs: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank",
                     "o_groups", "o_lora_rank", "n_routed_experts", "n_activated_experts",
                     "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters", "max_seq_len",
                     "index_n_heads", "index_head_dim", "fp8_block", "fp4_block", "csa_ratio"):
            if getattr(self, name) <= 0:
                fail(f"{name}={getattr(self, name)} must be positive")
        if self.n_mtp_layers not in (0, 1):
            fail(f"n_mtp_layers={self.n_mtp_layers}: only depth 0 or 1 is supported")
        expected = self.n_layers + self.n_mtp_layers
        if len(self.compress_ratios) != expected:
            fail(f"compress_ratios has {len(self.compress_ratios)} entries but n_layers + "
                 f"n_mtp_layers = {expected}; give one ratio per layer plus one for MTP")
        if any(r < 0 for r in self.compress_ratios):
            fail(f"compress_ratios={self.compress_ratios} must be >= 0")
        if self.window_size < 0:
            fail(f"window_size={self.window_size} must be >= 0")
        if self.window_size == 0 and 0 in self.compress_ratios:
            fail("window_size=0 with a sliding-only layer (compress_ratios entry 0) leaves it "
                 "no keys; set window_size >= 1")
        if self.rope_head_dim <= 0 or self.rope_head_dim % 2:
            fail(f"rope_head_dim={self.rope_head_dim} must be positive and even")
        if self.rope_head_dim > self.head_dim:
            fail(f"rope_head_dim={self.rope_head_dim} > head_dim={self.head_dim}")
        if self.rope_head_dim > self.index_head_dim:
            fail(f"rope_head_dim={self.rope_head_dim} > index_head_dim={self.index_head_dim}")
        if self.n_heads % self.o_groups:
            fail(f"o_groups={self.o_groups} must divide n_heads={self.n_heads}")
        if self.index_head_dim & (self.index_head_dim - 1):
            fail(f"index_head_dim={self.index_head_dim} must be a power of two (Hadamard)")
        if not 1 <= self.index_topk:
            fail(f"index_topk={self.index_topk} must be >= 1")
        if not 1 <= self.n_activated_experts <= self.n_routed_experts:
            fail(f"n_activated_experts={self.n_activated_experts} must be in "
                 f"[1, n_routed_experts={self.n_routed_experts}]")
        if self.n_shared_experts not in (0, 1):
            fail(f"n_shared_experts={self.n_shared_experts}: V4 uses exactly 1 (or 0)")
        if not 0 <= self.n_hash_layers <= self.n_layers:
            fail(f"n_hash_layers={self.n_hash_layers} must be in [0, n_layers={self.n_layers}]")
        if self.score_func != "sqrtsoftplus":
            fail(f"score_func={self.score_func!r}: only 'sqrtsoftplus' is V4's")
        if self.indexer_mode not in INDEXER_MODES:
            fail(f"indexer_mode={self.indexer_mode!r} must be one of {INDEXER_MODES}")
        if not self.hc_dynamic and self.hc_mult != 1:
            fail(f"hc_dynamic=False needs hc_mult=1 (got {self.hc_mult})")
        if self.swiglu_limit < 0:
            fail(f"swiglu_limit={self.swiglu_limit} must be >= 0")
        nope = self.head_dim - self.rope_head_dim
        if self.qat_fp8_kv and nope % self.fp8_block:
            fail(f"fp8_block={self.fp8_block} must divide head_dim - rope_head_dim = {nope}")
        if self.qat_fp4_experts:
            for name in ("dim", "moe_inter_dim"):
                if getattr(self, name) % self.fp4_block:
                    fail(f"fp4_block={self.fp4_block} must divide {name}={getattr(self, name)}")
        if self.qat_fp4_indexer and self.index_head_dim % self.fp4_block:
            fail(f"fp4_block={self.fp4_block} must divide index_head_dim={self.index_head_dim}")
        if self.rope_factor < 1:
            fail(f"rope_factor={self.rope_factor} must be >= 1")

    # ------------------------------------------------------------------ derived helpers
    def layer_kind(self, layer: int) -> str:
        """'sliding', 'csa' or 'hca' for trunk layer `layer` (n_layers = the MTP block)."""
        ratio = self.compress_ratios[layer]
        if ratio == 0:
            return "sliding"
        return "csa" if ratio == self.csa_ratio else "hca"

    def replace(self, **changes: Any) -> "ModelArgs":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        """Named configurations: tiny (every feature on, CPU tests), h200_1b, flash, pro."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, config: dict, **overrides: Any) -> "ModelArgs":
        """Build from the official V4 `config.json` dict (unknown keys are ignored)."""
        if config.get("model_type", "deepseek_v4") != "deepseek_v4":
            raise ValueError(f"from_hf_config: model_type={config.get('model_type')!r} is not "
                             "'deepseek_v4'")
        if config.get("num_key_value_heads", 1) != 1:
            raise ValueError("from_hf_config: V4 uses one shared KV head "
                             f"(num_key_value_heads={config['num_key_value_heads']})")
        values: dict = {}
        for ours, theirs in _HF_FIELDS.items():
            if theirs in config:
                values[ours] = config[theirs]
        scaling = config.get("rope_scaling") or {}
        if scaling:
            values["rope_factor"] = float(scaling.get("factor", 1.0))
            values["original_seq_len"] = int(scaling.get("original_max_position_embeddings", 0))
            values["beta_fast"] = int(scaling.get("beta_fast", 32))
            values["beta_slow"] = int(scaling.get("beta_slow", 1))
        else:
            values["rope_factor"], values["original_seq_len"] = 1.0, 0
        quant = config.get("quantization_config") or {}
        values.setdefault("qat_fp8_kv", bool(quant))
        values.setdefault("qat_fp4_experts", bool(quant))
        values.setdefault("qat_fp4_indexer", bool(quant))
        values.setdefault("fp8_block", 64)
        values.setdefault("fp4_block", 32)
        values.update(overrides)
        return cls(**values)

    def to_hf_config(self) -> dict:
        """The official `config.json` fields for these args."""
        config: dict = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "num_key_value_heads": 1,
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "torch_dtype": "bfloat16",
            "bos_token_id": 0,
            "eos_token_id": 1,
        }
        for ours, theirs in _HF_FIELDS.items():
            config[theirs] = getattr(self, ours)
        config["compress_ratios"] = list(self.compress_ratios)
        if self.rope_factor > 1 and self.original_seq_len > 0:
            config["rope_scaling"] = {
                "type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
            }
        else:
            config["rope_scaling"] = None
        return config


# ours -> official config.json key
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_mtp_layers": "num_nextn_predict_layers",
    "max_seq_len": "max_position_embeddings",
    "n_heads": "num_attention_heads",
    "head_dim": "head_dim",
    "rope_head_dim": "qk_rope_head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "window_size": "sliding_window",
    "compress_ratios": "compress_ratios",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "moe_inter_dim": "moe_intermediate_size",
    "n_hash_layers": "num_hash_layers",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "swiglu_limit": "swiglu_limit",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "norm_eps": "rms_norm_eps",
}

_FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4, 0]
_PRO_RATIOS = [128, 128] + [4, 128] * 29 + [4, 0]

_PRODUCTION = dict(
    head_dim=512, rope_head_dim=64, o_lora_rank=1024, window_size=128,
    index_n_heads=64, index_head_dim=128, n_activated_experts=6, n_hash_layers=3,
    rope_theta=10000.0, compress_rope_theta=160000.0, rope_factor=16.0,
    original_seq_len=65536, max_seq_len=1048576, fp8_block=64, fp4_block=32,
)

PRESETS: dict = {
    # spec §4.1: every feature on, sparse top-k (T=128: 32 CSA entries >> top-k 4).
    "tiny": dict(),
    # spec §4.2: production-shaped attention, small trunk.
    "h200_1b": dict(
        vocab_size=129280, dim=1024, n_layers=12, n_heads=16, head_dim=512, rope_head_dim=64,
        q_lora_rank=512, o_groups=4, o_lora_rank=256, window_size=128,
        compress_ratios=[0] + [4, 128] * 5 + [4, 0], index_n_heads=16, index_head_dim=128,
        index_topk=512, n_routed_experts=32, n_activated_experts=4, moe_inter_dim=384,
        n_hash_layers=1, route_scale=1.5, original_seq_len=65536, max_seq_len=65536,
        fp8_block=64, qat_fp8_kv=False, qat_fp4_experts=False, qat_fp4_indexer=False,
    ),
    # spec §2.1.
    "flash": dict(
        _PRODUCTION, vocab_size=129280, dim=4096, n_layers=43, n_heads=64, q_lora_rank=1024,
        o_groups=8, compress_ratios=_FLASH_RATIOS, index_topk=512, n_routed_experts=256,
        moe_inter_dim=2048, route_scale=1.5,
    ),
    "pro": dict(
        _PRODUCTION, vocab_size=129280, dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536,
        o_groups=16, compress_ratios=_PRO_RATIOS, index_topk=1024, n_routed_experts=384,
        moe_inter_dim=3072, route_scale=2.5,
    ),
}


def expected_init_loss(vocab_size: int) -> float:
    """ln(vocab): the cross-entropy of a uniform prediction (spec §5 item 27)."""
    return math.log(vocab_size)


__all__ = ["ModelArgs", "PRESETS", "INDEXER_MODES", "expected_init_loss"]
