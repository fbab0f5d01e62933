"""The V4 model's parallel plan: which module becomes what (the only model-specific file here).

Tensor parallel (heads, groups, vocabulary, expert width split over `dims.tp_group`):
- attention: `wq_b` column-parallel (heads), `attn_sink` rows, `wo_a` row blocks (its o_groups
  groups, each consuming n_heads/o_groups heads), `wo_b` row-parallel (all-reduce). `wq_a`,
  `q_norm`, `wkv`, `kv_norm` and the compressor stay replicated; the model's `to_heads` seam
  all-reduces the gradient of the KV and the compressed entries, which the local heads only
  partly produce;
- indexer (CSA): `wq_b` and `weights_proj` rows (indexer heads; the model reads their weights
  directly), `reduce_heads` sums the per-head scores, `to_heads` all-reduces the keys' gradient; the attention's `reduce_heads` sums the detached head probabilities of the KL target;
- shared expert: `w1`, `w3` column-parallel, `w2` row-parallel;
- embedding: megatron's VocabParallelEmbedding; head: rows of the vocabulary (the model reads
  `head.weight` directly); `to_vocab_shards` all-reduces the gradient of the head's input;
  `cross_entropy` becomes the vocab-parallel one. `ModelOutput.logits` is then this rank's
  vocabulary slice [B, T, V/tp].

Expert parallel: every `ffn.experts` keeps E/ep experts (`expert_parallel.shard_experts`).
Everything else (mHC, norms, gates, MTP projections) is replicated.
"""

from __future__ import annotations

from torch import nn

from .dims import ParallelDims
from .expert_parallel import shard_experts
from .tensor_parallel import (VocabParallelCrossEntropyLoss, column_parallel, grad_sum_over_tp,
                              row_parallel, shard_parameter_rows, sum_over_tp,
                              vocab_parallel_embedding)


def apply_tensor_parallel(model: nn.Module, dims: ParallelDims) -> None:
    """Shard a `V4Model` in place over `dims.tp_group` (no-op for tp = 1)."""
    if dims.tp == 1:
        return
    group = dims.tp_group
    for block in list(model.layers) + list(model.mtp):
        attn = block.attn
        attn.wq_b = column_parallel(attn.wq_b, group)
        attn.wo_b = row_parallel(attn.wo_b, group)
        shard_parameter_rows(attn.wo_a, "weight", group)
        shard_parameter_rows(attn, "attn_sink", group)
        attn.to_heads = grad_sum_over_tp(group)
        attn.reduce_heads = sum_over_tp(group)
        if attn.indexer is not None:
            indexer = attn.indexer
            shard_parameter_rows(indexer.wq_b, "weight", group)
            shard_parameter_rows(indexer.weights_proj, "weight", group)
            indexer.to_heads = grad_sum_over_tp(group)
            indexer.reduce_heads = sum_over_tp(group)
        shared = block.ffn.shared_experts
        if shared is not None:
            shared.w1 = column_parallel(shared.w1, group)
            shared.w3 = column_parallel(shared.w3, group)
            shared.w2 = row_parallel(shared.w2, group)
    model.embed = vocab_parallel_embedding(model.embed, group)
    shard_parameter_rows(model.head, "weight", group)
    model.to_vocab_shards = grad_sum_over_tp(group)
    model.cross_entropy = VocabParallelCrossEntropyLoss(group)


def apply_expert_parallel(model: nn.Module, dims: ParallelDims) -> list:
    """Cut every MoE layer's experts to this rank's shard; returns the dispatchers."""
    dispatchers = []
    for moe in model.moe_layers():
        dispatcher = shard_experts(moe.experts, dims)
        if dispatcher is not None:
            dispatchers.append(dispatcher)
    return dispatchers
