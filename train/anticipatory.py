"""Anticipatory routing (spec §3.8.4): routing indices of step t come from the parameters of
step t - Delta t.

While active, each step runs one extra forward-only pass over the batch of step t + Delta t with
the current parameters and caches its routing indices; the step that later trains on that batch
passes them to the model as its routing override (indices from the cache, gate weights from the
current scores; hash layers unaffected). No parameter snapshot is kept, only this cache, which
checkpoints carry. When switched on, the first Delta t steps have no stale indices yet and use
the parameters of the switch-on step.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from model import V4Model

Batch = Dict[str, torch.Tensor]
Override = List[Optional[torch.Tensor]]


class AnticipatoryRouting:
    """Switch, lookahead and routing cache keyed by (step, micro-batch)."""

    def __init__(self, lookahead: int):
        self.lookahead = lookahead
        self.active_until = 0
        self.cache: Dict[Tuple[int, int], Override] = {}

    def activate(self, step: int, n_steps: int) -> None:
        self.active_until = step + n_steps
        self.cache.clear()

    def active(self, step: int) -> bool:
        return step < self.active_until

    @torch.no_grad()
    def precompute(self, model: V4Model, step: int, accum: int,
                   batch_at: Callable[[int, int], Batch], device: torch.device) -> None:
        """Fill the cache for step + lookahead (and, right after switch-on, every missing step
        up to it) with routing from the current parameters. batch_at(ahead_steps, micro)."""
        if not self.active(step):
            return
        was_training = model.training
        model.eval()
        for target in range(step, min(step + self.lookahead, self.active_until - 1) + 1):
            for micro in range(accum):
                if (target, micro) in self.cache:
                    continue
                b = batch_at(target - step, micro)
                out = model(b["input_ids"].to(device), doc_ids=b["doc_ids"].to(device))
                self.cache[(target, micro)] = [r.cpu() for r in out.routing]
        model.train(was_training)

    def take(self, step: int, micro: int, device: torch.device) -> Optional[Override]:
        """The cached override for this micro-batch (removed from the cache), or None."""
        routing = self.cache.pop((step, micro), None)
        return None if routing is None else [r.to(device) for r in routing]

    def state_dict(self) -> dict:
        return {"active_until": self.active_until, "cache": dict(self.cache)}

    def load_state_dict(self, state: dict) -> None:
        self.active_until = state["active_until"]
        self.cache = dict(state["cache"])
