"""Muon for matrices plus AdamW for everything else, in one optimizer (spec §3.11).

Per matrix W ∈ R^{n×m}, with learning rate η, momentum μ, weight decay λ and target RMS γ:

    M ← μ·M + G
    O ← HybridNS(μ·M + G) · sqrt(max(n, m)) · γ          (Nesterov look-ahead; RMS(O) ≈ γ)
    W ← W·(1 − η·λ) − η·O                                (decoupled weight decay)

Muon and AdamW share η. Expert stacks and wo_a are orthogonalised per block (train.optim.grouping).

Layouts the step handles:
- plain parameters (one process, or data-parallel replicas with identical gradients): the Newton–Schulz
  work is shared over `dp_group` (experts over `expert_dp_group`) when OptimConfig.distribute_ns is set;
- tensor-parallel shards (`param.tensor_model_parallel` and `param.partition_dim`, as megatron-core sets
  them): the shard's look-ahead is gathered over `tp_group`, the full matrix orthogonalised and the local
  shard of the result applied (or each shard alone when OptimConfig.tp_blockwise);
- DeepSpeed ZeRO stage 1/2 flat partitions: DeepSpeed replaces a group's params with one flat fp32 partition
  and links every model parameter to its fragment (`param._hp_mapping`, `param._dp_group`). The momentum
  lives on the partition (sharded like Adam's state); the look-ahead fragments are summed over the ZeRO group
  into full matrices, orthogonalised (shared over that group), and each rank applies its fragment. DeepSpeed
  clips the raw gradients before calling step(), as a single process would. See train.optim.zero.

Fast paths, each selected by OptimConfig and checked against the torch path by tests/optim: ns_kernel="triton"
(symmetric Newton–Schulz products), muon_elementwise="triton" (plain parameters: fused momentum/look-ahead
and update passes over shape buckets, train.optim.bucketed_step; with it fold_ns_normalization and
overlap_muon_update), ns_cuda_graphs, overlap_adamw (AdamW on a side stream while Newton–Schulz runs).
"""

import contextlib
import logging
import math

import torch
import torch.distributed as dist

from train.optim import bucketed_step
from train.optim.config import OptimConfig
from train.optim.grouping import MuonTensor, ParamGrouping
from train.optim.newton_schulz import resolve_ns_dtype
from train.optim.orthogonalize import gather_tensor_parallel, local_tensor_parallel, orthogonalize_blocks

logger = logging.getLogger(__name__)

MUON_GROUP = "muon"
ADAMW_DECAY_GROUP = "adamw_decay"
ADAMW_VECTOR_GROUP = "adamw_vector"


class Muon(torch.optim.Optimizer):
    """Muon (hybrid Newton–Schulz) for the Muon tensors of `grouping`, AdamW for its AdamW tensors.

    dp_group / expert_dp_group: groups over which the Newton–Schulz work is shared (None: all local).
    tp_group / expert_tp_group: tensor-parallel groups of parameters marked `tensor_model_parallel`.
    """

    def __init__(
        self,
        grouping: ParamGrouping,
        cfg: OptimConfig,
        *,
        dp_group: dist.ProcessGroup | None = None,
        expert_dp_group: dist.ProcessGroup | None = None,
        tp_group: dist.ProcessGroup | None = None,
        expert_tp_group: dist.ProcessGroup | None = None,
    ):
        cfg.validate()
        params = [m.param for m in grouping.muon] + [a.param for a in grouping.adamw]
        self.cfg = cfg.resolved(params[0].device if params else torch.device("cpu"))
        self.grouping = grouping
        self.dp_group = dp_group
        self.expert_dp_group = expert_dp_group
        self.tp_group = tp_group
        self.expert_tp_group = expert_tp_group
        self._muon_meta: dict[int, MuonTensor] = {id(m.param): m for m in grouping.muon}
        self._ns_graphs: dict[int, dict] = {}  # one CUDA-graph cache per process group sharing the NS work
        self._bucket_ns_graphs: dict[int, dict] = {}  # the same for the fused step, whose inputs are static
        self._bucket_plans: dict[tuple, list[bucketed_step.Bucket]] = {}
        self._fused_fallback_logged = False
        self._side_stream: torch.cuda.Stream | None = None  # OptimConfig.overlap_adamw
        self._update_stream: torch.cuda.Stream | None = None  # OptimConfig.overlap_muon_update
        self._start_adamw = None  # launches this step's AdamW half; set by step(), run once by _begin_adamw

        muon_groups = []
        if grouping.muon:
            muon_groups.append(
                dict(
                    params=[m.param for m in grouping.muon],
                    name=MUON_GROUP,
                    kind="muon",
                    lr=cfg.lr,
                    weight_decay=cfg.weight_decay,
                    momentum=cfg.muon_momentum,
                    nesterov=cfg.nesterov,
                    update_rms=cfg.update_rms,
                )
            )
        adam_groups = []
        for name, decay, weight_decay in (
            (ADAMW_DECAY_GROUP, True, cfg.weight_decay),
            (ADAMW_VECTOR_GROUP, False, cfg.vector_weight_decay),
        ):
            params = [a.param for a in grouping.adamw if a.decay == decay]
            if params:
                adam_groups.append(dict(params=params, name=name, kind="adamw", weight_decay=weight_decay))
        self._adamw = None
        if adam_groups:
            on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])
            # torch's AdamW fills its defaults into these same group dicts and shares our state; its fused
            # CUDA kernel is the "fused AdamW" the step-time benchmark compares against.
            self._adamw = torch.optim.AdamW(
                adam_groups,
                lr=cfg.lr,
                betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_eps,
                fused=True if on_cuda else None,
            )
        super().__init__(muon_groups + adam_groups, dict(lr=cfg.lr))
        self._model_params = {g["name"]: list(g["params"]) for g in self.param_groups}

    def set_lr(self, lr: float) -> None:
        """Set the shared learning rate of every group (Muon and AdamW use the same η)."""
        for group in self.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adam_groups = [group for group in self.param_groups if group["kind"] != "muon"]
        side_stream = None
        if adam_groups and self.cfg.overlap_adamw and all(p.is_cuda for g in adam_groups for p in g["params"]):
            side_stream = self._side_stream = self._side_stream or torch.cuda.Stream()
        # Started by the first Muon step once its look-ahead is written (or below when none runs).
        self._start_adamw = (lambda: self._adamw_step(adam_groups, side_stream)) if adam_groups else None
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
        self._begin_adamw()
        if side_stream is not None:
            torch.cuda.current_stream().wait_stream(side_stream)
        return loss

    def _begin_adamw(self) -> None:
        start, self._start_adamw = self._start_adamw, None
        if start is not None:
            start()

    def _adamw_step(self, adam_groups: list[dict], side_stream: "torch.cuda.Stream | None") -> None:
        # DeepSpeed steps one group at a time and load_state_dict rebuilds groups and state: re-point each step.
        self._adamw.param_groups = adam_groups
        self._adamw.state = self.state
        if side_stream is None:
            self._adamw.step()
            return
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            self._adamw.step()

    def _muon_step(self, group: dict) -> None:
        params = group["params"]
        model_params = self._model_params[group["name"]]
        if all(id(p) in self._muon_meta for p in params):
            self._muon_step_params(group, [p for p in params if p.grad is not None])
        elif len(params) == 1:
            self._muon_step_zero_partition(group, params[0], model_params)
        else:
            raise RuntimeError(
                "Muon group holds tensors that are neither model parameters nor one ZeRO flat partition; "
                "build the engine with the settings of train.optim.zero"
            )

    def _lookahead(self, buffers: list[torch.Tensor], grads: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        momentum = group["momentum"]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        if group["nesterov"]:
            return torch._foreach_add(grads, buffers, alpha=momentum)
        return buffers

    def _momentum_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        state = self.state[tensor]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _muon_step_params(self, group: dict, params: list[torch.nn.Parameter]) -> None:
        if not params:
            return
        momenta = [self._momentum_buffer(p) for p in params]
        if self.cfg.muon_elementwise == "triton":
            reason = bucketed_step.unsupported_reason(params, momenta)
            if reason is None:
                self._muon_step_bucketed(group, params, momenta)
                return
            if not self._fused_fallback_logged:
                logger.warning("muon_elementwise='triton' falls back to the foreach path: %s", reason)
                self._fused_fallback_logged = True
        metas = [self._muon_meta[id(p)] for p in params]
        lookaheads = self._lookahead(momenta, [p.grad for p in params], group)
        self._begin_adamw()
        updates = self._orthogonal_updates(metas, lookaheads, group["update_rms"])
        lr = group["lr"]
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
        for param, (update, scale) in zip(params, updates):
            param.add_(update, alpha=-lr * scale)

    def _muon_step_bucketed(
        self, group: dict, params: list[torch.nn.Parameter], momenta: list[torch.Tensor]
    ) -> None:
        """The foreach step's math with fused Triton passes over shape buckets (train.optim.bucketed_step)."""
        from train.optim.elementwise_kernel import apply_bucket_update, lookahead_into_bucket

        cfg = self.cfg
        metas = [self._muon_meta[id(p)] for p in params]
        dtype = resolve_ns_dtype(cfg.ns_dtype, params[0].device)
        key = (tuple(id(p) for p in params), dtype)
        buckets = self._bucket_plans.get(key)
        if buckets is None:
            groups = [self._ns_group(meta) for meta in metas]
            buckets = self._bucket_plans[key] = bucketed_step.build_buckets(metas, groups, dtype)
        addresses = bucketed_step.address_table(params, momenta)
        fold = cfg.fold_ns_normalization
        for bucket in buckets:
            for launch in bucket.launches:
                lookahead_into_bucket(
                    addresses, launch, bucket.buffer, params[0], group["momentum"], group["nesterov"],
                    sum_squares=bucket.sum_squares if fold else None,
                )
        self._begin_adamw()  # overlaps Newton–Schulz when OptimConfig.overlap_adamw is set

        lr = group["lr"]
        decay = 1.0 - lr * group["weight_decay"]
        update_stream = None
        if cfg.overlap_muon_update:
            update_stream = self._update_stream = self._update_stream or torch.cuda.Stream()
        # One Newton–Schulz call per share group, or per bucket when its update pass overlaps the next NS.
        calls: dict[object, list[bucketed_step.Bucket]] = {}
        for bucket in buckets:
            calls.setdefault(id(bucket) if update_stream is not None else id(bucket.group), []).append(bucket)
        for members in calls.values():
            share_group = members[0].group
            graphs = self._bucket_ns_graphs.setdefault(id(share_group), {}) if cfg.ns_cuda_graphs else None
            outs = orthogonalize_blocks(
                [b.buffer for b in members], dtype=dtype, kernel=cfg.ns_kernel, group=share_group,
                graphs=graphs, static_inputs=True, sum_squares=[b.sum_squares for b in members] if fold else None,
                form=cfg.ns_form,
            )
            if update_stream is not None:
                update_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(update_stream) if update_stream is not None else contextlib.nullcontext():
                for bucket, out in zip(members, outs):
                    step = lr * bucket.update_scale(group["update_rms"])
                    for launch in bucket.launches:
                        apply_bucket_update(addresses, launch, out, params[0], decay, step)
                    if update_stream is not None and graphs is None:
                        # Eager NS outputs return to the main stream's pool when dropped (graph outputs are static).
                        out.record_stream(update_stream)
        if update_stream is not None:
            addresses.record_stream(update_stream)
            torch.cuda.current_stream().wait_stream(update_stream)

    def _muon_step_zero_partition(self, group: dict, flat: torch.Tensor, model_params: list) -> None:
        grad = flat.grad if flat.grad is not None else torch.zeros_like(flat)
        lookahead = self._lookahead([self._momentum_buffer(flat)], [grad], group)[0]
        fragments = [getattr(p, "_hp_mapping", None) for p in model_params]
        zero_group = getattr(model_params[0], "_dp_group", None)
        if zero_group is None:
            raise RuntimeError("Muon got a flat partition but the parameters carry no DeepSpeed _dp_group link")
        if any(getattr(p, "use_muon", False) for p in model_params):
            # DeepSpeed would already have replaced these gradients with its own orthogonalised updates.
            raise RuntimeError("parameters carry DeepSpeed's use_muon tag: see train.optim.zero.check_no_deepspeed_muon_tags")

        # Each element of the full look-ahead lives in exactly one rank's partition: summing the zero-filled
        # buffers over the ZeRO group rebuilds the matrices exactly.
        offsets = [0]
        for p in model_params:
            offsets.append(offsets[-1] + p.numel())
        full = torch.zeros(offsets[-1], dtype=lookahead.dtype, device=lookahead.device)
        for p, start, mapping in zip(model_params, offsets, fragments):
            if mapping is not None:
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                full.narrow(0, start + lp.start, lp.numel).copy_(lookahead.narrow(0, hp.start, hp.numel))
        dist.all_reduce(full, group=zero_group)
        lookaheads = [full.narrow(0, start, p.numel()).view(p.shape) for p, start in zip(model_params, offsets)]

        metas = [self._muon_meta[id(p)] for p in model_params]
        updates = self._orthogonal_updates(metas, lookaheads, group["update_rms"], ns_group=zero_group)
        flat_update = torch.zeros_like(flat)
        for (update, scale), mapping in zip(updates, fragments):
            if mapping is not None:
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                piece = update.reshape(-1).narrow(0, lp.start, lp.numel)
                torch.mul(piece, scale, out=flat_update.narrow(0, hp.start, hp.numel))
        lr = group["lr"]
        if group["weight_decay"]:
            flat.mul_(1.0 - lr * group["weight_decay"])
        flat.add_(flat_update, alpha=-lr)

    def _orthogonal_updates(
        self,
        metas: list[MuonTensor],
        lookaheads: list[torch.Tensor],
        update_rms: float,
        ns_group: dist.ProcessGroup | None = None,
    ) -> list[tuple[torch.Tensor, float]]:
        """(orthogonalised look-ahead shaped like the local parameter, RMS scale) per Muon tensor."""
        cfg = self.cfg
        tp_layouts = [self._tensor_parallel_layout(m) for m in metas]
        fulls = [
            gather_tensor_parallel(t, *layout) if layout is not None and not cfg.tp_blockwise else t
            for t, layout in zip(lookaheads, tp_layouts)
        ]
        blocks = [m.as_blocks(f) for m, f in zip(metas, fulls)]

        # One orthogonalize call per process group sharing the work (dense vs expert-parallel tensors).
        by_group: dict[int, tuple[dist.ProcessGroup | None, list[int]]] = {}
        for index, meta in enumerate(metas):
            share_group = ns_group if ns_group is not None else self._ns_group(meta)
            by_group.setdefault(id(share_group), (share_group, []))[1].append(index)
        orthogonal: list[torch.Tensor | None] = [None] * len(metas)
        for share_group, indices in by_group.values():
            dtype = resolve_ns_dtype(cfg.ns_dtype, blocks[indices[0]].device)
            graphs = self._ns_graphs.setdefault(id(share_group), {}) if cfg.ns_cuda_graphs else None
            outs = orthogonalize_blocks(
                [blocks[i] for i in indices], dtype=dtype, kernel=cfg.ns_kernel, group=share_group, graphs=graphs,
                form=cfg.ns_form,
            )
            for i, out in zip(indices, outs):
                orthogonal[i] = out

        updates = []
        for block, out, full, layout in zip(blocks, orthogonal, fulls, tp_layouts):
            scale = math.sqrt(max(block.shape[-2], block.shape[-1])) * update_rms
            out = out.reshape(full.shape)
            if layout is not None and not cfg.tp_blockwise:
                out = local_tensor_parallel(out, *layout)
            updates.append((out, scale))
        return updates

    def _ns_group(self, meta: MuonTensor) -> dist.ProcessGroup | None:
        if not self.cfg.distribute_ns:
            return None
        if meta.is_expert and self.expert_dp_group is not None:
            return self.expert_dp_group
        return self.dp_group

    def _tensor_parallel_layout(self, meta: MuonTensor) -> tuple[int, dist.ProcessGroup] | None:
        param = meta.param
        if not getattr(param, "tensor_model_parallel", False):
            return None
        if getattr(param, "partition_stride", 1) != 1:
            raise ValueError(f"{meta.name}: partition_stride={param.partition_stride} is not supported; use stride 1")
        group = self.expert_tp_group if meta.is_expert else self.tp_group
        if group is None:
            which = "expert_tp_group" if meta.is_expert else "tp_group"
            raise ValueError(f"{meta.name} is tensor-parallel (partition_dim={param.partition_dim}): pass Muon({which}=...)")
        return param.partition_dim, group
