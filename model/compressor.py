"""Token-level KV compression for CSA and HCA, with packed-document restarts (spec §3.4, §3.3).

Legend: B batch, T tokens, E compressed entries, R ratio (tokens per entry), C channels
(coff * Dc), Dc entry dim.

Entry layout. Each document (a run of equal `doc_ids`) is cut into blocks of R tokens starting at
its first token, so compression restarts at every document boundary (spec §3.12 item 4). Entry e
of a row covers the tokens of one (document, block) pair; `EntryLayout` records which tokens
fill its R slots, the position of its first token (its RoPE position) and the position of its
last token were the block complete (`end_pos`). Query t sees entry e iff both are in the same
document and end_pos[e] <= t (spec §3.3); incomplete tail blocks therefore stay invisible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .norm import RMSNorm
from .quant import fake_quant_fp4, fake_quant_fp8, hadamard
from .rope import apply_rope


@dataclass
class EntryLayout:
    """Where the compressed entries of each row come from (one layout per ratio)."""
    ratio: int
    token_idx_BER: torch.Tensor   # int64 token index filling each slot, -1 = empty
    first_pos_BE: torch.Tensor    # position of the entry's first token (RoPE position)
    end_pos_BE: torch.Tensor      # position its last token has when complete; huge if padding
    doc_BE: torch.Tensor          # document id of the entry (-1 for padding)
    has_prev_BE: torch.Tensor     # bool: the previous entry is the same document's previous block

    @property
    def n_entries(self) -> int:
        return self.token_idx_BER.shape[1]

    def visible_BTE(self, doc_ids_BT: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
        """Causal visibility of entries to queries (same document, block complete by t)."""
        same_doc = self.doc_BE[:, None, :] == doc_ids_BT[:, :, None]
        return same_doc & (self.end_pos_BE[:, None, :] <= positions_BT[:, :, None])


def entry_layout(doc_ids_BT: torch.Tensor, positions_BT: torch.Tensor, ratio: int) -> EntryLayout:
    """Build the entry layout for packed rows (doc_ids non-decreasing along T)."""
    B, T = doc_ids_BT.shape
    device = doc_ids_BT.device
    t_idx = torch.arange(T, device=device).expand(B, T)
    doc_start = torch.ones_like(doc_ids_BT, dtype=torch.bool)
    doc_start[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    start_t = torch.cummax(torch.where(doc_start, t_idx, torch.zeros_like(t_idx)), dim=1).values
    offset_in_doc = t_idx - start_t
    slot = offset_in_doc % ratio
    entry_of_token = torch.cumsum((slot == 0).long(), dim=1) - 1
    n_entries = int(entry_of_token.max()) + 1 if T else 0

    token_idx = torch.full((B, n_entries, ratio), -1, dtype=torch.long, device=device)
    token_idx[torch.arange(B, device=device)[:, None], entry_of_token, slot] = t_idx
    first_t = token_idx[..., 0]
    real = first_t >= 0
    first_safe = first_t.clamp_min(0)
    first_pos = torch.gather(positions_BT, 1, first_safe)
    doc = torch.where(real, torch.gather(doc_ids_BT, 1, first_safe), torch.full_like(first_t, -1))
    huge = torch.iinfo(torch.long).max
    end_pos = torch.where(real, first_pos + ratio - 1, torch.full_like(first_pos, huge))
    first_offset = torch.gather(offset_in_doc, 1, first_safe)
    has_prev = real & (first_offset > 0)
    return EntryLayout(ratio, token_idx, first_pos, end_pos, doc, has_prev)


def _gather_slots(x_BTC: torch.Tensor, token_idx_BER: torch.Tensor) -> torch.Tensor:
    """x at each slot's token -> [B, E, R, C] (empty slots read token 0; callers mask them)."""
    B, E, R = token_idx_BER.shape
    flat = token_idx_BER.clamp_min(0).reshape(B, E * R, 1).expand(-1, -1, x_BTC.shape[-1])
    return torch.gather(x_BTC, 1, flat).reshape(B, E, R, -1)


def _masked_softmax_pool(scores_BEKC: torch.Tensor, values_BEKC: torch.Tensor,
                         valid_BEK: torch.Tensor) -> torch.Tensor:
    """Per-channel softmax over slot dim K of the valid slots, then the weighted sum."""
    scores = scores_BEKC.masked_fill(~valid_BEK[..., None], float("-inf"))
    peak = scores.amax(2, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    weights = torch.exp(scores - peak)
    weights = weights / weights.sum(2, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return (weights * values_BEKC.masked_fill(~valid_BEK[..., None], 0.0)).sum(2)


class Compressor(nn.Module):
    """Pools R tokens into one entry with a per-channel softmax (spec §3.4).

    `overlap` (CSA): 2*Dc channels; the "b" half [0, Dc) of block i-1 and the "a" half [Dc, 2Dc)
    of block i share one softmax over 2R slots. Without overlap (HCA): Dc channels, R slots.
    After pooling: weighted RMSNorm, RoPE at the first token's position, then quantization:
    FP8 on the non-RoPE dims for the main compressor, Hadamard + FP4 for the indexer's.
    """

    def __init__(self, dim: int, entry_dim: int, ratio: int, overlap: bool, rope_dim: int,
                 norm_eps: float, quant: str, quant_block: int):
        super().__init__()
        self.entry_dim, self.ratio, self.overlap, self.rope_dim = entry_dim, ratio, overlap, rope_dim
        self.quant, self.quant_block = quant, quant_block
        coff = 2 if overlap else 1
        self.wkv = nn.Linear(dim, coff * entry_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * entry_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * entry_dim))
        self.norm = RMSNorm(entry_dim, norm_eps)

    def project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token values and gate scores [B, T, C] in fp32 (what a decode cache keeps)."""
        x = x_BTD.float()
        return x @ self.wkv.weight.float().t(), x @ self.wgate.weight.float().t()

    def forward(self, x_BTD: torch.Tensor, layout: EntryLayout, cos_BE: torch.Tensor,
                sin_BE: torch.Tensor) -> torch.Tensor:
        """x_BTD: layer input; returns entries [B, E, Dc] (fp32)."""
        return self.pool(*self.project(x_BTD), layout, cos_BE, sin_BE)

    def pool(self, kv_BTC: torch.Tensor, gate_BTC: torch.Tensor, layout: EntryLayout,
             cos_BE: torch.Tensor, sin_BE: torch.Tensor) -> torch.Tensor:
        """Entries [B, E, Dc] from per-token projections."""
        kv = _gather_slots(kv_BTC, layout.token_idx_BER)
        score = _gather_slots(gate_BTC, layout.token_idx_BER) + self.ape.float()
        valid = layout.token_idx_BER >= 0
        if self.overlap:
            Dc = self.entry_dim
            prev_kv = _shift_entries(kv[..., :Dc])
            prev_score = _shift_entries(score[..., :Dc])
            prev_valid = _shift_entries(valid) & layout.has_prev_BE[..., None]
            entries = _masked_softmax_pool(torch.cat((prev_score, score[..., Dc:]), 2),
                                           torch.cat((prev_kv, kv[..., Dc:]), 2),
                                           torch.cat((prev_valid, valid), 2))
        else:
            entries = _masked_softmax_pool(score, kv, valid)
        entries = self.norm(entries)
        entries = apply_rope(entries, cos_BE, sin_BE)
        if self.quant == "fp8":
            nope = self.entry_dim - self.rope_dim
            entries = torch.cat((fake_quant_fp8(entries[..., :nope], self.quant_block),
                                 entries[..., nope:]), -1)
        elif self.quant == "hadamard_fp4":
            entries = fake_quant_fp4(hadamard(entries), self.quant_block)
        elif self.quant == "hadamard":
            entries = hadamard(entries)
        return entries


def _shift_entries(x_BE: torch.Tensor) -> torch.Tensor:
    """Entry e receives entry e-1's values (entry 0 receives zeros / False)."""
    out = torch.zeros_like(x_BE)
    out[:, 1:] = x_BE[:, :-1]
    return out
