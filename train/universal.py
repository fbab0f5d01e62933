"""Layout-free ("universal") checkpoints: resume a run under another parallel layout (issue 6).

A checkpoint holds one part per rank with that rank's optimizer state in its own layout (a ZeRO flat
partition per parameter group, the expert shard's masters and state). `convert` rebuilds, from all
rank parts, one full tensor per parameter name and state key — fp32 master weight, Muon's
`momentum_buffer`, AdamW's `exp_avg` / `exp_avg_sq` and its `step` — under the single-device names
and shapes, and writes it as a checkpoint of layout "universal" (one file per parameter, built and
written one at a time from the memory-mapped rank files) that any layout loads
(`LocalEngine.load_universal`, `ParallelEngine.load_universal`, each rank reading only its slices).

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
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

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


class _LocalSource:
    """One process (LocalEngine): the parameters are the fp32 masters, the state is per parameter."""

    def __init__(self, part: dict, weights: Dict[str, torch.Tensor]):
        self.state = named_optimizer_state(part["optimizer"], part["shards"]["names"])
        self.weights = weights

    def names(self) -> List[str]:
        return list(self.state)

    def entry(self, name: str) -> ParamState:
        return {FP32: self.weights[name].float(), **self.state[name]}


class _DenseSource:
    """ZeRO fragments -> per tensor-parallel rank local tensors -> tensor-parallel merge."""

    def __init__(self, parts: List[dict]):
        self.parts = parts
        self.tp = parts[0]["shards"]["tp"]
        self.records: Dict[str, dict] = {}
        self.pieces: Dict[str, List[Tuple[int, dict]]] = {}     # name -> (rank, fragment record)
        for rank, part in enumerate(parts):
            for entry in part["shards"]["dense"]:
                self.records.setdefault(entry["name"], entry)
                if entry["numel"]:
                    self.pieces.setdefault(entry["name"], []).append((rank, entry))

    def names(self) -> List[str]:
        return list(self.records)

    def entry(self, name: str) -> ParamState:
        record = self.records[name]
        size, dim = math.prod(record["shape"]), record["partition_dim"]
        local: Dict[int, Dict[str, torch.Tensor]] = {}           # tp_rank -> key -> flat
        covered: Dict[int, int] = {}
        scalars: Dict[str, float] = {}
        for rank, entry in self.pieces.get(name, []):
            shards, zero = self.parts[rank]["shards"], self.parts[rank]["optimizer"]["zero"]
            flats = {FP32: zero[_ZERO_FP32][entry["group"]]}
            for key, value in zero[_ZERO_BASE]["state"].get(entry["group"], {}).items():
                if _is_tensor_state(value):
                    flats[key] = value
                else:
                    scalars[key] = _scalar(value)
            slot = local.setdefault(shards["tp_rank"], {})
            lp, hp, numel = entry["lp_start"], entry["hp_start"], entry["numel"]
            for key, flat in flats.items():
                buf = slot.setdefault(key, torch.zeros(size, dtype=torch.float32))
                buf[lp: lp + numel] = flat[hp: hp + numel]
            covered[shards["tp_rank"]] = covered.get(shards["tp_rank"], 0) + numel
        tp_ranks = range(self.tp) if dim is not None else [0]
        for tp_rank in tp_ranks:
            if covered.get(tp_rank, 0) != size:
                raise ValueError(f"{name}: the rank parts cover {covered.get(tp_rank, 0)} of {size} values of "
                                 f"tensor-parallel rank {tp_rank}; the checkpoint is incomplete")
        full: ParamState = {}
        for key in local[0]:
            shards_of_key = [local[r][key].view(record["shape"]) for r in tp_ranks]
            full[key] = torch.cat(shards_of_key, dim) if dim is not None else shards_of_key[0]
        full.update(scalars)
        return full


class _ExpertSource:
    """Expert shards of expert-parallel ranks 0..ep-1 concatenated along the expert dim."""

    def __init__(self, parts: List[dict]):
        by_ep_rank: Dict[int, dict] = {}
        for part in parts:
            if part["shards"]["experts"]:
                by_ep_rank.setdefault(part["shards"]["ep_rank"], part)     # replicas over expert data parallel
        ep = parts[0]["shards"]["ep"]
        if by_ep_rank and sorted(by_ep_rank) != list(range(ep)):
            raise ValueError(f"expert shards of expert-parallel ranks {sorted(by_ep_rank)} found, expected 0..{ep - 1}")
        self.shard_states = []
        for ep_rank in sorted(by_ep_rank):
            part = by_ep_rank[ep_rank]
            experts = part["shards"]["experts"]
            state = named_optimizer_state(part["optimizer"]["experts"], experts["optimizer_order"])
            for name, master in zip(experts["master_order"], part["optimizer"]["expert_masters"]):
                state[name][FP32] = master
            self.shard_states.append(state)

    def names(self) -> List[str]:
        return list(self.shard_states[0]) if self.shard_states else []

    def entry(self, name: str) -> ParamState:
        full: ParamState = {}
        for key, value in self.shard_states[0][name].items():
            if _is_tensor_state(value):
                full[key] = torch.cat([s[name][key].float() if key == FP32 else s[name][key]
                                       for s in self.shard_states], 0)
            else:
                full[key] = _scalar(value)
        return full


def universal_sources(ckpt: dict) -> list:
    """The per-parameter converters of a loaded checkpoint (`load_checkpoint`, every part) written
    under any layout: each has names() and entry(name) -> {fp32, state keys...} at the full
    single-device shape, built on demand (one parameter in memory at a time)."""
    parts = _rank_parts(ckpt)
    if parts[0]["shards"]["kind"] == "local":
        return [_LocalSource(parts[0], ckpt["model"])]
    return [_DenseSource(parts), _ExpertSource(parts)]


class _ConvertedParts(Mapping):
    """The parts of a universal checkpoint, each parameter's built only when `save_checkpoint`
    writes it: one file per parameter, so a conversion holds one parameter in memory at a time."""

    def __init__(self, ckpt: dict):
        named = [(name, source) for source in universal_sources(ckpt) for name in source.names()]
        self.files = {name: f"param{index:05d}" for index, (name, _) in enumerate(named)}
        self.params = {self.files[name]: (name, source) for name, source in named}
        rank0 = ckpt["rank00000"]
        self.fixed = {"model": ckpt["model"], "trainer": ckpt["trainer"],
                      UNIVERSAL: {"files": self.files, "rng_cpu": rank0["rng_cpu"],
                                  "routing": dict(rank0["routing"], cache={})}}

    def __getitem__(self, part: str):
        if part in self.fixed:
            return self.fixed[part]
        name, source = self.params[part]
        return source.entry(name)

    def __iter__(self):
        return iter([*self.fixed, *self.params])

    def __len__(self) -> int:
        return len(self.fixed) + len(self.params)


class UniversalParams(Mapping):
    """name -> universal entry of a universal checkpoint, each read (memory-mapped) on access."""

    def __init__(self, path: Path, files: Dict[str, str]):
        self.path, self.files = Path(path), files

    def __getitem__(self, name: str) -> ParamState:
        return torch.load(self.path / f"{self.files[name]}.pt", map_location="cpu", weights_only=False, mmap=True)

    def __contains__(self, name) -> bool:
        return name in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def universal_dir(ckpt_path: Path) -> Path:
    """Where `convert` writes by default: <run>/universal/step_<N> for <run>/checkpoints/step_<N>."""
    return ckpt_path.parent.parent / UNIVERSAL


def convert(ckpt_path: Path, out_root: Optional[Path] = None) -> Path:
    """Write the universal form of the verified checkpoint `ckpt_path` (`resolve_checkpoint`) under
    `out_root` (default `universal_dir`); returns the new checkpoint directory. Never touches the source."""
    ckpt = load_checkpoint(ckpt_path, verify=False, mmap=True)     # rank files are read where their fragments lie
    meta = dict(ckpt["_meta"])
    if meta.get("layout") == UNIVERSAL:
        raise ValueError(f"{ckpt_path} is already universal; resume from it directly")
    meta.update(layout=UNIVERSAL, source=str(ckpt_path), source_layout=meta.get("layout"))
    out_root = Path(out_root) if out_root is not None else universal_dir(ckpt_path)
    return save_checkpoint(out_root, ckpt["_step"], _ConvertedParts(ckpt), meta=meta)


def local_entry(params: Mapping[str, ParamState], name: str, shape: torch.Size,
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
        out = convert(resolve_checkpoint(args.checkpoint), args.out)
    except ValueError as exc:
        raise SystemExit(f"v4-reshard: {exc}") from None
    print(f"universal checkpoint: {out}\nresume under any layout with run.resume={out}")


if __name__ == "__main__":
    main()
