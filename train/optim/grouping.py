"""Which optimizer updates which V4 parameter (spec §3.11 "Parameter groups", §3.1.4, §2.3).

- AdamW: embedding, head, RMSNorm weights, mHC static biases and gating factors (`hc_*_base`,
  `hc_*_scale`), `attn_sink`, the compressor position tables `ape` and every other tensor that is not a
  linear map (1-D tensors, scalars).
- Muon: every other matrix. Routed experts, stored as stacks `ffn.experts.w{1,2,3}` [E, out, in], are
  orthogonalised per expert; `attn.wo_a` [g·d_g, H·D/g] is g independent row blocks and is orthogonalised
  per block; the router `gate.weight` and the mHC projections `hc_*_fn` as whole matrices ([infer]).
- Not optimized: parameters with requires_grad=False (frozen tables) and the balancing state
  (`gate.bias`, `gate.tid2eid`), which the model holds as buffers; should a model hold them as parameters,
  they are excluded by name.

The grouping is computed from `model.named_parameters()` names and shapes only.
"""

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from train.optim.config import OptimConfig

MUON_MATRIX = "matrix"
"""A 2-D weight orthogonalised as one matrix."""
MUON_EXPERT_STACK = "expert_stack"
"""A 3-D stack [E, out, in] of routed-expert weights, each expert orthogonalised separately."""
MUON_ROW_GROUPS = "row_groups"
"""A 2-D weight made of independent row blocks [g·rows, in] (wo_a), each block orthogonalised separately."""

HC_FN_NAMES = ("hc_attn_fn", "hc_ffn_fn", "hc_head_fn")
BALANCING_NAMES = ("tid2eid",)


@dataclass(eq=False)
class MuonTensor:
    """A parameter updated by Muon and how it splits into the matrices that are orthogonalised."""

    name: str
    param: nn.Parameter
    layout: str
    """MUON_MATRIX, MUON_EXPERT_STACK or MUON_ROW_GROUPS."""
    group_rows: int | None = None
    """Rows of one block for MUON_ROW_GROUPS (o_lora_rank for wo_a); None otherwise."""
    is_expert: bool = False
    """Routed-expert weight: expert-parallel, so its Newton–Schulz work is shared over the expert-data-parallel group."""

    def as_blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """View `tensor` (this parameter's shape, full or a local shard) as [blocks, rows, cols]."""
        if self.layout == MUON_ROW_GROUPS:
            return tensor.reshape(-1, self.group_rows, tensor.shape[-1])
        return tensor.reshape(-1, tensor.shape[-2], tensor.shape[-1])


@dataclass(eq=False)
class AdamWTensor:
    name: str
    param: nn.Parameter
    reason: str
    decay: bool
    """True: weight_decay applies (embedding, head, `ape`); False: vector_weight_decay (1-D tensors)."""


@dataclass(eq=False)
class ExcludedTensor:
    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class ParamGrouping:
    """Every named parameter of a model, sorted into Muon, AdamW or excluded."""

    muon: list[MuonTensor] = field(default_factory=list)
    adamw: list[AdamWTensor] = field(default_factory=list)
    excluded: list[ExcludedTensor] = field(default_factory=list)

    def muon_matrix_count(self) -> int:
        """Number of matrices Newton–Schulz orthogonalises per step."""
        return sum(m.as_blocks(m.param.detach()).shape[0] for m in self.muon)

    def table(self) -> str:
        """A run-log table: one row per parameter name pattern (layer indices folded into '*')."""
        rows: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        for m in self.muon:
            blocks = m.as_blocks(m.param.detach())
            how = f"muon {m.layout}: {blocks.shape[0]} × [{blocks.shape[1]}, {blocks.shape[2]}]"
            key = (_pattern(m.name), "muon", tuple(m.param.shape).__repr__(), how)
            rows[key][0] += 1
            rows[key][1] += m.param.numel()
        for a in self.adamw:
            how = f"adamw ({a.reason}, {'decay' if a.decay else 'no decay'})"
            key = (_pattern(a.name), "adamw", tuple(a.param.shape).__repr__(), how)
            rows[key][0] += 1
            rows[key][1] += a.param.numel()
        for e in self.excluded:
            key = (_pattern(e.name), "excluded", repr(e.shape), f"not optimized ({e.reason})")
            rows[key][0] += 1
            rows[key][1] += 0
        header = f"{'parameter':<48} {'count':>5} {'shape':<20} {'numel':>13}  treatment"
        lines = [header, "-" * len(header)]
        for (pattern, _, shape, how), (count, numel) in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            lines.append(f"{pattern:<48} {count:>5} {shape:<20} {numel:>13,}  {how}")
        muon_numel = sum(m.param.numel() for m in self.muon)
        adamw_numel = sum(a.param.numel() for a in self.adamw)
        lines.append(
            f"muon: {len(self.muon)} tensors, {self.muon_matrix_count()} matrices, {muon_numel:,} params; "
            f"adamw: {len(self.adamw)} tensors, {adamw_numel:,} params; excluded: {len(self.excluded)} tensors"
        )
        return "\n".join(lines)


def _pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def param_groups_for(model: nn.Module, cfg: OptimConfig, *, o_groups: int | None = None) -> ParamGrouping:
    """Sort `model.named_parameters()` into Muon / AdamW / excluded by name and shape (rules: module docstring).

    o_groups: number of wo_a row blocks; default `model.args.o_groups`.
    Raises ValueError for a parameter no rule covers (a 3-D tensor that is not an expert stack, …).
    """
    if o_groups is None and cfg.wo_a_per_group:
        args = getattr(model, "args", None)
        o_groups = getattr(args, "o_groups", None)
    grouping = ParamGrouping()
    for name, param in model.named_parameters():
        parts = name.split(".")
        leaf = parts[-1]
        module = parts[-2] if len(parts) > 1 else ""
        if not param.requires_grad:
            grouping.excluded.append(ExcludedTensor(name, tuple(param.shape), "frozen: requires_grad=False"))
        elif leaf in BALANCING_NAMES or (module == "gate" and leaf == "bias"):
            grouping.excluded.append(ExcludedTensor(name, tuple(param.shape), "balancing state, no gradient"))
        elif leaf == "weight" and module in ("embed", "head"):
            grouping.adamw.append(AdamWTensor(name, param, "embedding" if module == "embed" else "head", True))
        elif param.ndim < 2:
            grouping.adamw.append(AdamWTensor(name, param, _vector_reason(parts), False))
        elif leaf == "ape":
            grouping.adamw.append(AdamWTensor(name, param, "compressor position table", True))
        elif leaf in HC_FN_NAMES and not cfg.hc_fn_muon:
            grouping.adamw.append(AdamWTensor(name, param, "mHC projection (hc_fn_muon=False)", True))
        elif param.ndim == 3 and module == "experts" and leaf in ("w1", "w2", "w3"):
            grouping.muon.append(MuonTensor(name, param, MUON_EXPERT_STACK, is_expert=True))
        elif param.ndim == 2 and module == "wo_a" and leaf == "weight" and cfg.wo_a_per_group:
            if o_groups is None or param.shape[0] % o_groups:
                raise ValueError(
                    f"{name} {tuple(param.shape)}: cannot split into o_groups={o_groups} row blocks; "
                    "pass o_groups= (model.args.o_groups) or set OptimConfig.wo_a_per_group=False"
                )
            grouping.muon.append(MuonTensor(name, param, MUON_ROW_GROUPS, group_rows=param.shape[0] // o_groups))
        elif param.ndim == 2:
            grouping.muon.append(MuonTensor(name, param, MUON_MATRIX))
        else:
            raise ValueError(
                f"{name} {tuple(param.shape)}: no optimizer rule for a {param.ndim}-D tensor; "
                "add one to train/optim/grouping.py"
            )
    return grouping


def _vector_reason(parts: list[str]) -> str:
    leaf = parts[-1]
    if leaf.startswith("hc_") and (leaf.endswith("_base") or leaf.endswith("_scale")):
        return "mHC static bias / gating factor"
    if leaf == "weight" and len(parts) > 1 and "norm" in parts[-2]:
        return "RMSNorm weight"
    if leaf == "attn_sink":
        return "attention sink"
    return "1-D tensor"
