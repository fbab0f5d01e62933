"""Layout-free ("universal") checkpoints: resume a run under another parallel layout (issue 6).

A checkpoint holds one part per rank with that rank's optimizer state in its own layout (a ZeRO flat
partition per parameter group, the expert shard's masters and state). `to_universal` rebuilds, from
all rank parts, one full tensor per parameter name and state key — fp32 master weight, Muon's
`momentum_buffer`, AdamW's `exp_avg` / `exp_avg_sq` and its `step` — under the single-device names
and shapes, and writes it as a checkpoint of layout "universal" that any layout loads
(`LocalEngine.load_universal`, `ParallelEngine.load_universal`).

How the pieces go back together, from each rank part's shard record (`ParallelEngine.shard_record`):
- dense parameters: ZeRO fragments (their addresses in the flattened local parameter and in the
  rank's flat partition, DeepSpeed's `_hp_mapping`) are placed per tensor-parallel rank; then
  tensor-parallel shards are concatenated along their megatron `partition_dim` (replicated
  parameters are taken from tensor-parallel rank 0);
- expert stacks: the shards of expert-parallel ranks 0..ep-1 are concatenated along the expert dim.

Why not DeepSpeed's universal checkpoint: its converter (deepspeed 0.19.8,
checkpoint/ds_to_universal.py `extract_zero_shards`) reads `exp_avg` and `exp_avg_sq` of every ZeRO
parameter group, i.e. Adam's state only — our Muon groups hold `momentum_buffer` — and ZeRO's
elastic checkpoints change only the data-parallel size; our experts live outside DeepSpeed.

Per-rank state that has no layout-free form is handled explicitly: the CPU RNG state is rank 0's;
the anticipatory-routing cache (routing of this rank's future micro-batches) is dropped and
recomputed from the current parameters on the next steps, its on/off window is kept.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

UNIVERSAL = "universal"
"""The layout name of a converted checkpoint (its manifest meta "layout")."""
FP32 = "fp32"
"""Key of the fp32 master weight next to the optimizer state keys."""
_RANK_PART = re.compile(r"^rank(\d{5})$")

# DeepSpeed ZeRO-1/2 state_dict keys (deepspeed/checkpoint/constants.py, 0.19.8).
_ZERO_FP32 = "single_partition_of_fp32_groups"
_ZERO_BASE = "base_optimizer_state"

ParamState = Dict[str, object]
"""State key -> full tensor (or a scalar such as AdamW's step) of one parameter."""


def named_optimizer_state(optimizer_state: dict, names: List[str]) -> Dict[str, ParamState]:
    """A torch optimizer state_dict's per-index state, keyed by parameter name instead.
    `names`: the parameter names in the optimizer's param_groups order (what its indices count)."""
    indices = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    if len(indices) != len(names):
        raise ValueError(f"optimizer state has {len(indices)} parameters, the shard record names "
                         f"{len(names)}; the checkpoint's rank parts do not match")
    return {name: dict(optimizer_state["state"].get(i, {})) for name, i in zip(names, indices)}


def optimizer_param_names(optimizer: torch.optim.Optimizer, name_of: Dict[int, str]) -> List[str]:
    """Parameter names in the optimizer's param_groups order (`name_of`: id(param) -> name)."""
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _is_tensor_state(value) -> bool:
    return torch.is_tensor(value) and value.dim() > 0


def _scalar(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


# ------------------------------------------------------------------ conversion

def _rank_parts(ckpt: dict) -> List[dict]:
    ranks = sorted((int(m.group(1)), name) for name in ckpt if (m := _RANK_PART.match(name)))
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise ValueError(f"checkpoint rank parts {[n for _, n in ranks]} are not ranks 0..{len(ranks) - 1}")
    parts = [ckpt[name] for _, name in ranks]
    for rank, part in enumerate(parts):
        if "shards" not in part:
            raise ValueError(f"rank {rank}'s part has no shard record (a checkpoint from before v4forge "
                             "could reshard); resume it under its own layout, or use run.init_from for its weights")
    return parts


def _local_universal(part: dict, weights: Dict[str, torch.Tensor]) -> Dict[str, ParamState]:
    """One process (LocalEngine): the parameters are the fp32 masters, the state is per parameter."""
    state = named_optimizer_state(part["optimizer"], part["shards"]["names"])
    return {name: {FP32: weights[name].float(), **values} for name, values in state.items()}


def _dense_universal(parts: List[dict]) -> Dict[str, ParamState]:
    """ZeRO fragments -> per tensor-parallel rank local tensors -> tensor-parallel merge."""
    local: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = {}     # (name, tp_rank) -> key -> flat
    covered: Dict[Tuple[str, int], int] = {}
    scalars: Dict[str, Dict[str, float]] = {}
    records: Dict[str, dict] = {}
    for rank, part in enumerate(parts):
        shards = part["shards"]
        zero = part["optimizer"]["zero"]
        group_state = zero[_ZERO_BASE]["state"]
        for entry in shards["dense"]:
            name, numel = entry["name"], entry["numel"]
            records.setdefault(name, entry)
            if numel == 0:
                continue
            key = (name, shards["tp_rank"])
            size = math.prod(entry["shape"])
            flats = {FP32: zero[_ZERO_FP32][entry["group"]]}
            for state_key, value in group_state.get(entry["group"], {}).items():
                if _is_tensor_state(value):
                    flats[state_key] = value
                else:
                    scalars.setdefault(name, {})[state_key] = _scalar(value)
            slot = local.setdefault(key, {})
            for state_key, flat in flats.items():
                buf = slot.setdefault(state_key, torch.zeros(size, dtype=torch.float32))
                buf[entry["lp_start"]: entry["lp_start"] + numel] = flat[entry["hp_start"]: entry["hp_start"] + numel]
            covered[key] = covered.get(key, 0) + numel
    tp = parts[0]["shards"]["tp"]
    out: Dict[str, ParamState] = {}
    for name, entry in records.items():
        dim = entry["partition_dim"]
        tp_ranks = range(tp) if dim is not None else [0]
        for tp_rank in tp_ranks:
            if covered.get((name, tp_rank), 0) != math.prod(entry["shape"]):
                raise ValueError(f"{name}: the rank parts cover {covered.get((name, tp_rank), 0)} of "
                                 f"{math.prod(entry['shape'])} values of tensor-parallel rank {tp_rank}; "
                                 "the checkpoint is incomplete")
        keys = local[(name, 0)].keys()
        full = {}
        for state_key in keys:
            pieces = [local[(name, r)][state_key].view(entry["shape"]) for r in tp_ranks]
            full[state_key] = torch.cat(pieces, dim) if dim is not None else pieces[0]
        full.update(scalars.get(name, {}))
        out[name] = full
    return out


def _expert_universal(parts: List[dict]) -> Dict[str, ParamState]:
    """Expert shards of expert-parallel ranks 0..ep-1 concatenated along the expert dim."""
    by_ep_rank: Dict[int, dict] = {}
    for part in parts:
        if part["shards"]["experts"]:
            by_ep_rank.setdefault(part["shards"]["ep_rank"], part)     # replicas over expert data parallel
    if not by_ep_rank:
        return {}
    ep = parts[0]["shards"]["ep"]
    if sorted(by_ep_rank) != list(range(ep)):
        raise ValueError(f"expert shards of expert-parallel ranks {sorted(by_ep_rank)} found, expected 0..{ep - 1}")
    shard_states = []
    for ep_rank in range(ep):
        part = by_ep_rank[ep_rank]
        experts = part["shards"]["experts"]
        state = named_optimizer_state(part["optimizer"]["experts"], experts["optimizer_order"])
        for name, master in zip(experts["master_order"], part["optimizer"]["expert_masters"]):
            state[name][FP32] = master.float()
        shard_states.append(state)
    out: Dict[str, ParamState] = {}
    for name in shard_states[0]:
        full: ParamState = {}
        for key, value in shard_states[0][name].items():
            if _is_tensor_state(value):
                full[key] = torch.cat([s[name][key] for s in shard_states], 0)
            else:
                full[key] = _scalar(value)
        out[name] = full
    return out


def to_universal(ckpt: dict) -> Dict[str, ParamState]:
    """name -> {fp32, state keys...} with full single-device shapes, from a loaded checkpoint
    (`load_checkpoint` with every part) written under any layout."""
    parts = _rank_parts(ckpt)
    if parts[0]["shards"]["kind"] == "local":
        return _local_universal(parts[0], ckpt["model"])
    params = _dense_universal(parts)
    params.update(_expert_universal(parts))
    return params


def universal_dir(ckpt_path: Path) -> Path:
    """Where `convert` writes by default: <run>/universal/step_<N> for <run>/checkpoints/step_<N>."""
    return ckpt_path.parent.parent / UNIVERSAL


def convert(ckpt_path: Path, out_root: Optional[Path] = None) -> Path:
    """Write the universal form of checkpoint `ckpt_path` (or a run's newest valid one) under
    `out_root` (default `universal_dir`); returns the new checkpoint directory. Never touches the source."""
    ckpt_path = resolve_checkpoint(ckpt_path, "checkpoint")
    ckpt = load_checkpoint(ckpt_path, mmap=True)     # rank files are read where their fragments lie
    meta = dict(ckpt["_meta"])
    if meta.get("layout") == UNIVERSAL:
        raise ValueError(f"{ckpt_path} is already universal; resume from it directly")
    params = to_universal(ckpt)
    rank0 = ckpt["rank00000"]
    routing = dict(rank0["routing"], cache={})
    parts = {"model": ckpt["model"], "trainer": ckpt["trainer"],
             UNIVERSAL: {"params": params, "rng_cpu": rank0["rng_cpu"], "routing": routing}}
    meta.update(layout=UNIVERSAL, source=str(ckpt_path), source_layout=meta.get("layout"))
    out_root = Path(out_root) if out_root is not None else universal_dir(ckpt_path)
    return save_checkpoint(out_root, ckpt["_step"], parts, meta=meta)


def local_entry(params: Dict[str, ParamState], name: str, shape: torch.Size,
                cut: Iterable[Tuple[int, int, int]] = ()) -> ParamState:
    """This rank's slice of parameter `name`'s universal entry: the fp32 weight and every state
    tensor cut by (dim, parts, index) steps (tensor-parallel, expert-parallel), checked against
    the local `shape`; scalar state (AdamW's step) as a float."""
    if name not in params:
        raise ValueError(f"the universal checkpoint has no state for {name}; resume with the model "
                         "config of the run that wrote it")
    out: ParamState = {}
    for key, value in params[name].items():
        if _is_tensor_state(value):
            for dim, n_parts, index in cut:
                value = value.chunk(n_parts, dim)[index]
            out[key] = value.contiguous()
        else:
            out[key] = _scalar(value)
    if tuple(out[FP32].shape) != tuple(shape):
        raise ValueError(f"{name}: the universal checkpoint gives this rank a {tuple(out[FP32].shape)} slice, "
                         f"the parameter is {tuple(shape)}; resume with the model config of the run that wrote it")
    return out


def optimizer_state(entry: ParamState, device: torch.device) -> dict:
    """A parameter's optimizer state from its local entry, on `device`; scalars (AdamW's step)
    become the float32 tensors torch's optimizers keep."""
    return {key: (value.to(device, copy=True) if torch.is_tensor(value)
                  else torch.tensor(value, dtype=torch.float32, device=device))
            for key, value in entry.items() if key != FP32}


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m train.universal CHECKPOINT [--out DIR]` (also `v4-reshard`)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="v4-reshard", description="Convert a checkpoint written under one parallel layout into the "
        "universal form that any layout (one process, DP, TP, EP) resumes from.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run directory (its newest)")
    parser.add_argument("--out", type=Path, default=None,
                        help="parent directory of the converted checkpoint (default: <run>/universal)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert(args.checkpoint, args.out)
    except ValueError as exc:
        raise SystemExit(f"v4-reshard: {exc}") from None
    print(f"universal checkpoint: {out}\nresume under any layout with run.resume={out}")


if __name__ == "__main__":
    main()
