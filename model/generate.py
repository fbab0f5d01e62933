"""Batched sampling from a V4 model (student rollouts for on-policy distillation).

Prompts of different lengths are left-padded; the padding forms its own document (doc id 0,
the prompt and its continuation doc id 1), so the model's per-document masking hides it from
attention and KV compression, and RoPE's shift invariance makes the left offset irrelevant.
A prefill pass fills a decode cache (window KV and compressor projections per layer, see
cache.py); each new token then costs one single-token forward against it. Sampling is
temperature + nucleus (top-p), greedy at temperature 0.

Legend: B prompts, L padded length so far, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .cache import ModelCache
from .transformer import V4Model


@dataclass
class Generation:
    """tokens [B, L] (left-padded prompt + completion), doc_ids [B, L] (0 padding, 1 text),
    completion_mask [B, L] (True on sampled tokens up to and including eos), prompt_lengths [B]."""
    tokens: torch.Tensor
    doc_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_lengths: torch.Tensor


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row from temperature-scaled, nucleus-truncated probabilities."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p          # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: V4Model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, eos_id: Optional[int] = None,
             pad_id: int = 0, generator: Optional[torch.Generator] = None) -> Generation:
    """Sample up to `max_new_tokens` per prompt; rows stop after `eos_id`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.embed.weight.device
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"generate: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={model.args.max_seq_len}; shorten the prompts or the rollouts")
    B = len(prompts)
    tokens = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
    doc_ids = torch.zeros((B, longest), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        doc_ids[i, longest - len(p):] = 1
    completion = torch.zeros((B, longest), dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    cache = ModelCache.empty(model.args.n_layers)
    logits = model(tokens, doc_ids=doc_ids, cache=cache).logits[:, -1]
    for step in range(max_new_tokens):
        if step:
            logits = model(tokens[:, -1:], doc_ids=doc_ids[:, -1:], cache=cache).logits[:, -1]
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens = torch.cat((tokens, nxt[:, None]), 1)
        doc_ids = torch.cat((doc_ids, torch.ones_like(nxt)[:, None]), 1)
        completion = torch.cat((completion, ~finished[:, None]), 1)
        if eos_id is not None:
            finished = finished | (nxt == eos_id)
        if bool(finished.all()):
            break
    model.train(was_training)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    return Generation(tokens, doc_ids, completion, lengths)
