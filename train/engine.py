"""The single-process engine: backward, global-norm clipping, Muon + AdamW step, state.

Same surface as the data-parallel engine in train/parallel (backward / clip_grad_norm / step /
skip_step / set_lr / state_dict), so the loop does not care which one it drives.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from train.optim import OptimConfig, build_optimizer
from train.universal import FP32, ParamState, local_entry, optimizer_param_names, optimizer_state


class LocalEngine:
    """One process, one device: plain autograd, `clip_grad_norm_`, our Muon."""

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        self.model, self.cfg = model, cfg
        self.optimizer = build_optimizer(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, *args, **kwargs):
        """Forward; on CUDA in bf16 autocast over the fp32 master weights (the model keeps its
        fp32 islands — mHC, compressor pooling, router, head — explicitly)."""
        if next(self.model.parameters()).is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(*args, **kwargs)
        return self.model(*args, **kwargs)

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_lr(lr)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self) -> float:
        """Global gradient norm before clipping; clips to cfg.grad_clip (0 = no clip)."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        """Drop this step's gradients (a spike): no update, optimizer state untouched."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def shard_record(self) -> dict:
        """What train.universal needs to read this engine's state_dict: the parameter names in
        the optimizer's order."""
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        return {"kind": "local", "names": optimizer_param_names(self.optimizer, name_of)}

    @torch.no_grad()
    def load_universal(self, params: Mapping[str, ParamState]) -> None:
        """Weights and optimizer state from a universal checkpoint (train.universal), any source layout."""
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                entry = local_entry(params, name_of[id(p)], p.shape)
                p.copy_(entry[FP32])
                self.optimizer.state[p] = optimizer_state(entry, p.device)
