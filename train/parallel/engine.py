"""The data-parallel engine: DeepSpeed ZeRO for dense weights, our own step for the experts.

Issue 5 (the seam between the engines, verified on gloo ranks):
- DeepSpeed owns the dense parameters (ZeRO-1/2, bf16 on GPU, fp32 on CPU, gradient
  accumulation, clipping), with megatron's groups passed as `mpu` (`MegatronMpu`).
- Expert parameters (tagged `expert_parallel`) stay out of DeepSpeed's optimizer: DeepSpeed treats
  parameters marked `allreduce=False` as its own MoE parameters and needs its own expert groups.
  Their gradients are summed over megatron's expert-data-parallel group and divided by the dense
  data-parallel size (each expert shard saw the tokens of ep data slices; see `ExpertStep`), then
  stepped by the caller's expert optimizer (batched Muon + AdamW) on fp32 master weights.
- The clip norm is global: the expert gradients' squared norm is folded into the norm DeepSpeed's
  ZeRO optimizer clips with (`DeepSpeedZeroOptimizer.scaled_global_norm`, combined with
  DeepSpeed's own `combine_grad_norm_groups`), and the experts are clipped with the same factor.
- DeepSpeed broadcasts every module parameter from data-parallel rank 0 at start-up; with expert
  parallelism that would overwrite other ranks' expert shards, so they are restored right after.

Loss scaling for data parallelism: `global_token_counts` and `token_weights` (see their docstrings).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from train.universal import FP32, ParamState, local_entry, optimizer_param_names, optimizer_state

from .dims import ParallelDims
from .expert_parallel import is_expert_param
from .mpu import MegatronMpu

NamedParams = List[Tuple[str, nn.Parameter]]


def split_params(model: nn.Module) -> Tuple[NamedParams, NamedParams]:
    """(dense, expert) named trainable parameters of a parallelized model."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if is_expert_param(p) else dense).append((name, p))
    return dense, expert


def deepspeed_config(dims: ParallelDims, micro_batch_size: int, grad_accum_steps: int,
                     grad_clip: float) -> dict:
    """DeepSpeed's config dict built from ours (it never leaves this module)."""
    on_cpu = dims.device.type == "cpu"
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * dims.dp,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": dims.zero_stage,
            "overlap_comm": not on_cpu,
            "contiguous_gradients": True,
        },
        # check_grad_overflow: an invalid norm skips the step (skip_step relies on it).
        "bf16": {"enabled": dims.precision == "bf16", "check_grad_overflow": True},
        # Muon and the other optimizers DeepSpeed's ZeRO has not listed as tested.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }


def import_deepspeed(dims: ParallelDims):
    """Import DeepSpeed with the accelerator matching the device (cpu needs DS_ACCELERATOR)."""
    if dims.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if (get_accelerator().device_name() == "cpu") != (dims.device.type == "cpu"):
        raise RuntimeError(f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but the "
                           f"device is {dims.device}; set DS_ACCELERATOR before importing deepspeed")
    return deepspeed


class ExpertStep:
    """Reduce, clip and step the expert parameters (fp32 masters when the model runs in bf16).

    Gradient reduction: the owner of an expert received the (token, choice) pairs of the ep data
    slices of its EP group (or, with tp > 1, of the tp token slices of one data slice); the
    expert-data-parallel group holds one owner per remaining slice. Summing over it gives the sum
    over all dp data slices; dividing by dp gives the mean DeepSpeed applies to dense weights.
    """

    def __init__(self, named_params: NamedParams, dims: ParallelDims,
                 optimizer_fn: Callable[[NamedParams], torch.optim.Optimizer]):
        self.dims = dims
        self.names = [name for name, _ in named_params]
        self.params = [p for _, p in named_params]
        self.masters = [p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone())
                        for p in self.params]
        self.optimizer = optimizer_fn([(n, m) for (n, _), m in zip(named_params, self.masters)])
        self.grad_sq = torch.zeros((), device=dims.device)

    def reduce_grads(self) -> torch.Tensor:
        """Sum gradients over the expert-data-parallel group, / dp, into the masters' `.grad`.
        Returns the experts' squared gradient norm over all ranks (every expert once)."""
        if not self.params:
            self.grad_sq = torch.zeros((), device=self.dims.device)
            return self.grad_sq
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1)
                          for p in self.params])
        if self.dims.edp > 1:
            dist.all_reduce(flat, group=self.dims.edp_group)
        flat.div_(self.dims.dp)
        offset = 0
        for p, master in zip(self.params, self.masters):
            n = p.numel()
            master.grad = flat[offset: offset + n].view_as(p)
            offset += n
        grad_sq = flat.double().pow(2).sum().float()
        if self.dims.ep > 1:
            dist.all_reduce(grad_sq, group=self.dims.ep_group)
        self.grad_sq = grad_sq
        return grad_sq

    @torch.no_grad()
    def step(self, clip_divisor: torch.Tensor) -> None:
        """Divide the reduced gradients by `clip_divisor` (>= 1), step, copy masters back."""
        for master in self.masters:
            if master.grad is not None:
                master.grad.div_(clip_divisor)
        self.optimizer.step()
        for p, master in zip(self.params, self.masters):
            if master is not p:
                p.copy_(master)
        self.zero_grad()

    def zero_grad(self) -> None:
        for p, master in zip(self.params, self.masters):
            p.grad = None
            master.grad = None


def _check_no_deepspeed_experts(model: nn.Module, dims: ParallelDims) -> None:
    """DeepSpeed's own MoE path must stay off: no parameter marked `allreduce=False`, and any
    expert groups it created must be megatron's (else its start-up broadcast mixes shards)."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups as ds_groups

    marked = [name for name, p in model.named_parameters() if is_moe_param(p)]
    if marked:
        raise RuntimeError(f"{len(marked)} parameters carry DeepSpeed's MoE mark allreduce=False "
                           f"(e.g. {marked[0]}); expert parameters are handled by ExpertStep")
    megatron_edp = dist.get_process_group_ranks(dims.edp_group)
    for name, group in ds_groups._get_expert_data_parallel_group_dict().items():
        if dist.get_process_group_ranks(group) != megatron_edp:
            raise RuntimeError(f"DeepSpeed expert-data-parallel group {name!r} has ranks "
                               f"{dist.get_process_group_ranks(group)}, megatron's {megatron_edp}")


class ParallelEngine:
    """The data-parallel engine with the single-process engine's surface (train/engine.py).

    Per optimizer step the loop calls, on every rank: `engine(...)` and `backward(loss)` per
    micro-batch (the loss already weighted, see `token_weights`), then `clip_grad_norm()` (the
    global norm before clipping), then `step()` or `skip_step()`. `set_lr` sets one learning rate.
    """

    def __init__(self, model: nn.Module, dims: ParallelDims, dense_optimizer: torch.optim.Optimizer,
                 expert_optimizer_fn: Optional[Callable[[NamedParams], torch.optim.Optimizer]],
                 micro_batch_size: int, grad_accum_steps: int = 1, grad_clip: float = 1.0):
        deepspeed = import_deepspeed(dims)
        from deepspeed.runtime.utils import combine_grad_norm_groups
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.dims, self.grad_clip = dims, grad_clip
        _, expert_named = split_params(model)
        if expert_named and expert_optimizer_fn is None:
            raise ValueError("the model has expert parameters: pass expert_optimizer_fn")
        # DeepSpeed's start-up broadcast from data-parallel rank 0 covers every parameter.
        expert_shards = [p.detach().clone() for _, p in expert_named]
        self.ds_engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=dense_optimizer, mpu=MegatronMpu(dims),
            config=deepspeed_config(dims, micro_batch_size, grad_accum_steps, grad_clip))
        with torch.no_grad():
            for (_, p), shard in zip(expert_named, expert_shards):
                p.copy_(shard.to(p.device, p.dtype))
        _check_no_deepspeed_experts(model, dims)
        self.experts = ExpertStep(expert_named, dims, expert_optimizer_fn) if expert_named else None

        zero = self.ds_engine.optimizer
        if not isinstance(zero, DeepSpeedZeroOptimizer):
            raise RuntimeError(f"expected DeepSpeed's ZeRO-1/2 optimizer, got {type(zero).__name__}; "
                               "the expert norm is folded into its clip norm")
        self._zero = zero
        self._norm: Optional[torch.Tensor] = None     # this step's scaled global norm, once computed
        self._skip = False
        dense_norm = zero.scaled_global_norm

        def global_norm(norm_type: int = 2) -> torch.Tensor:
            if self._skip:     # DeepSpeed treats an invalid norm as overflow: no update, grads dropped
                return torch.tensor(float("inf"), device=dims.device)
            if self._norm is None:
                norm = dense_norm(norm_type)
                if self.experts is not None:
                    expert = self.experts.grad_sq.sqrt() * zero.loss_scale
                    norm = combine_grad_norm_groups([norm, expert.to(norm.device)], norm_type)
                self._norm = norm
            return self._norm

        # The single place DeepSpeed's ZeRO computes the norm it clips with (deepspeed 0.19.8):
        # it now covers the experts, and clip_grad_norm() and step() share one computation.
        zero.scaled_global_norm = global_norm

    @property
    def module(self) -> nn.Module:
        return self.ds_engine.module

    def __call__(self, *args, **kwargs):
        return self.ds_engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch (no 1/accumulation scaling: the loop weights losses)."""
        self.ds_engine.backward(loss, scale_wrt_gas=False)
        if not self.ds_engine.is_gradient_accumulation_boundary():
            self.ds_engine.step()      # advances DeepSpeed's micro-step counter only
        elif self.experts is not None:
            self.experts.reduce_grads()

    def _check_boundary(self, what: str) -> None:
        if not self.ds_engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"{what}() before the last micro-batch's backward of the step "
                               f"(grad_accum_steps={self.ds_engine.gradient_accumulation_steps()})")

    def clip_grad_norm(self) -> float:
        """The global gradient norm (dense and experts) before clipping; step() clips to grad_clip."""
        self._check_boundary("clip_grad_norm")
        return float(self._zero.scaled_global_norm() / self._zero.loss_scale)

    def step(self) -> None:
        """Clip and step dense weights (DeepSpeed) and experts with the same global norm."""
        self._check_boundary("step")
        norm = self.clip_grad_norm()
        self.ds_engine.step()
        self._norm = None
        if self.experts is not None:
            if not math.isfinite(norm):
                self.experts.zero_grad()    # DeepSpeed skipped the step as an overflow
            else:
                divisor = max((norm + 1e-6) / self.grad_clip, 1.0) if self.grad_clip > 0 else 1.0
                self.experts.step(torch.tensor(divisor, device=self.dims.device))

    def skip_step(self) -> None:
        """Drop this step's gradients (a spike): no update, optimizer state untouched."""
        self._check_boundary("skip_step")
        self._skip = True
        self.ds_engine.step()
        self._skip, self._norm = False, None
        if self.experts is not None:
            self.experts.zero_grad()

    def set_lr(self, lr: float) -> None:
        """One learning rate for the dense and expert optimizers (Muon/AdamW share it, spec §3.11)."""
        optimizers = [self._zero.optimizer]
        if self.experts is not None:
            optimizers.append(self.experts.optimizer)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict:
        """This rank's optimizer state: DeepSpeed's ZeRO partition and the expert masters/state."""
        state = {"zero": self._zero.state_dict()}
        if self.experts is not None:
            state["experts"] = self.experts.optimizer.state_dict()
            state["expert_masters"] = [m.detach().clone() for m in self.experts.masters]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict for the same layout (each rank loads its own); the model's weights
        are set from the restored fp32 masters, dense and expert."""
        # DeepSpeed reads entry [data-parallel rank] of a list of every rank's (rigid) state.
        self._zero.load_state_dict([state["zero"]] * self.dims.dp, load_optimizer_states=True,
                                   load_from_fp32_weights=True)
        self._zero.update_lp_params()
        if self.experts is not None:
            self.experts.optimizer.load_state_dict(state["experts"])
            with torch.no_grad():
                for p, master, saved in zip(self.experts.params, self.experts.masters, state["expert_masters"]):
                    master.copy_(saved)
                    if master is not p:
                        p.copy_(master)

    def _tensor_parallel_dim(self, p: nn.Parameter) -> Optional[int]:
        return p.partition_dim if self.dims.tp > 1 and getattr(p, "tensor_model_parallel", False) else None

    def _dense_params(self):
        return [(name, p) for name, p in self.module.named_parameters()
                if p.requires_grad and not is_expert_param(p)]

    def shard_record(self) -> dict:
        """Where this rank's pieces of every parameter live, for train.universal: its coordinates,
        each dense parameter's ZeRO fragment (DeepSpeed's `_hp_mapping`: group, offset in the
        flattened local parameter and in the flat partition) and tensor-parallel dim, and the
        expert names in master and optimizer order."""
        dims = self.dims
        dense = []
        for name, p in self._dense_params():
            mapping = getattr(p, "_hp_mapping", None)
            entry = {"name": name, "shape": list(p.shape), "partition_dim": self._tensor_parallel_dim(p),
                     "group": 0, "lp_start": 0, "hp_start": 0, "numel": 0}
            if mapping is not None:
                entry.update(group=mapping.param_group_index, lp_start=mapping.lp_fragment_address.start,
                             hp_start=mapping.hp_fragment_address.start, numel=mapping.lp_fragment_address.numel)
            dense.append(entry)
        experts = None
        if self.experts is not None:
            name_of = {id(m): name for name, m in zip(self.experts.names, self.experts.masters)}
            experts = {"master_order": list(self.experts.names),
                       "optimizer_order": optimizer_param_names(self.experts.optimizer, name_of)}
        return {"kind": "parallel", "tp": dims.tp, "tp_rank": dims.tp_rank, "dp": dims.dp,
                "dp_rank": dims.dp_rank, "ep": dims.ep, "ep_rank": dims.ep_rank, "dense": dense,
                "experts": experts}

    @torch.no_grad()
    def load_universal(self, params: Mapping[str, ParamState]) -> None:
        """Weights and optimizer state from a universal checkpoint (train.universal) written under
        any layout: each dense parameter's tensor-parallel slice goes into its ZeRO fragment (fp32
        master and every state key), each expert stack's expert-parallel slice into the masters."""
        dims, zero = self.dims, self._zero
        for name, p in self._dense_params():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:       # no fragment of it in this rank's partition: nothing to read
                continue
            dim = self._tensor_parallel_dim(p)
            entry = local_entry(params, name, p.shape, [(dim, dims.tp, dims.tp_rank)] if dim is not None else [])
            flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            state = zero.optimizer.state[flat]
            for key, value in entry.items():
                if not torch.is_tensor(value):
                    state[key] = torch.tensor(value, dtype=torch.float32, device=flat.device)
                    continue
                if key != FP32 and key not in state:
                    state[key] = torch.zeros_like(flat)
                target = flat if key == FP32 else state[key]
                target.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))
        zero.update_lp_params()
        if self.experts is None:
            return
        cut = [(0, dims.ep, dims.ep_rank)] if dims.ep > 1 else []
        for name, p, master in zip(self.experts.names, self.experts.params, self.experts.masters):
            entry = local_entry(params, name, p.shape, cut)
            master.copy_(entry[FP32])
            if master is not p:
                p.copy_(master)
            self.experts.optimizer.state[master] = optimizer_state(entry, master.device)


def global_token_counts(local_counts: Dict[str, int], dims: ParallelDims) -> Dict[str, int]:
    """Counts summed over the data-parallel group (call once per step with this rank's totals
    over its micro-batches; tensor-parallel peers hold the same tokens and are not summed)."""
    names = sorted(local_counts)
    counts = torch.tensor([float(local_counts[k]) for k in names], dtype=torch.float64, device=dims.device)
    if dims.dp > 1:
        dist.all_reduce(counts, group=dims.dp_group)
    return {k: int(round(c)) for k, c in zip(names, counts.tolist())}


def token_weights(micro_counts: Dict[str, int], global_counts: Dict[str, int],
                  dims: ParallelDims) -> Dict[str, float]:
    """Per loss term, the factor n_micro * dp / N that makes data parallelism exact.

    The model's token-mean losses (lm, mtp) are means over one micro-batch's non-ignored tokens,
    and ranks and micro-batches do not see equal counts. DeepSpeed averages gradients over the dp
    ranks and the micro-batch gradients add up, so weighting each micro-batch's term by
    n_micro * dp / N (N = `global_token_counts` of the step) yields sum n_micro/N * grad_micro:
    the gradient of the single-process global-batch mean. Terms not listed keep weight 1 / accum
    in the caller's hands (balance: a mean over sequences; indexer: a mean over queries).
    """
    return {k: (micro_counts[k] * dims.dp / global_counts[k] if global_counts[k] > 0 else 0.0)
            for k in micro_counts}


def reduce_expert_load(loads: Sequence[torch.Tensor], dims: ParallelDims) -> List[torch.Tensor]:
    """Per-MoE-layer expert loads summed over the data-parallel ranks (tensor-parallel peers
    count the same tokens, so they are not summed), for `V4Model.update_balance_biases`."""
    if dims.dp == 1 or not loads:
        return list(loads)
    flat = torch.stack([l.float() for l in loads])
    dist.all_reduce(flat, group=dims.dp_group)
    return list(flat.unbind(0))
