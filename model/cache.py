"""Decode caches (spec §3.7): what each attention layer keeps between generated tokens.

Per layer: the window KV of every token so far (rotated and quantized as attention uses it),
the per-token projections of the main and indexer compressors (entries are re-pooled from them
each step, which is cheap next to the projections), and the doc ids and positions of the tokens.
Entries become visible exactly when their block completes, as in the full forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


def _append(old: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat((old, new), 1)


@dataclass
class AttentionCache:
    """History of one attention layer, [B, L, ...] tensors."""
    kv: Optional[torch.Tensor] = None
    comp: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    index_comp: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    doc_ids: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv.shape[1]

    def append(self, kv, doc_ids, positions, comp=None, index_comp=None) -> None:
        self.kv = _append(self.kv, kv)
        self.doc_ids = _append(self.doc_ids, doc_ids)
        self.positions = _append(self.positions, positions)
        if comp is not None:
            self.comp = comp if self.comp is None else tuple(_append(a, b) for a, b in zip(self.comp, comp))
        if index_comp is not None:
            self.index_comp = (index_comp if self.index_comp is None
                               else tuple(_append(a, b) for a, b in zip(self.index_comp, index_comp)))


@dataclass
class ModelCache:
    """One AttentionCache per trunk layer (MTP does not take part in decoding)."""
    layers: List[AttentionCache] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> "ModelCache":
        return cls([AttentionCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0
