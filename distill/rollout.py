"""Prompts and student rollouts for OPD, aligned for the loss (spec opd-and-fused-loss §3, §4).

Prompts are windows of documents of each domain (train split for training, eval split for the
KL evaluations). The student samples continuations with `model.generate` (batched, left-padded);
`RolloutBatch` then holds what both the student and every teacher run their forward on and which
positions enter the loss: the hidden state at position t predicts token t+1, so position t counts
exactly when token t+1 was sampled by the student (completion positions). Prompt tokens, padding
and everything after <eos> are masked.

Legend: B rows (samples), L-1 positions fed to the models (the last token is only a target).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from distill.config import RolloutConfig
from model import V4Model, generate


@dataclass
class RolloutBatch:
    """One batch of student samples, ready for the student's and the teachers' forwards."""

    inputs: torch.Tensor
    """[B, L-1] int64 token ids fed to every model (prompt + completion without its last token)."""
    doc_ids: torch.Tensor
    """[B, L-1] int64 document ids (0 = left padding, masked by the model's per-document attention)."""
    targets: torch.Tensor
    """[B, L-1] int64 the next token of each position."""
    loss_mask: torch.Tensor
    """[B, L-1] bool, True where the next token was sampled by the student."""
    teacher_of_row: torch.Tensor
    """[B] int64 index of each sample's teacher in the pool (its domain key's teacher)."""
    sampled_tokens: int
    """Tokens the student sampled (the True entries of loss_mask)."""

    @property
    def num_positions(self) -> int:
        return self.inputs.numel()


def cut_prompts(token_lists: Sequence[Sequence[int]], bos_id: int, prompt_tokens: int) -> List[List[int]]:
    """Windows of `prompt_tokens` tokens of each document (<bos> + its start, then consecutive
    windows); a window shorter than half the length is dropped unless it is the document's first."""
    prompts = []
    for ids in token_lists:
        ids = [bos_id, *ids]
        for start in range(0, len(ids), prompt_tokens):
            window = list(ids[start:start + prompt_tokens])
            if start == 0 or 2 * len(window) >= prompt_tokens:
                prompts.append(window)
    return prompts


class PromptSets:
    """Prompts per domain: a shuffled cycle over the train windows, fixed eval windows."""

    def __init__(self, train: Dict[str, List[List[int]]], eval: Dict[str, List[List[int]]], seed: int):
        for domain, prompts in train.items():
            if not prompts:
                raise ValueError(f"domain {domain!r} has no training document to cut prompts from; drop it from "
                                 "distill.experts.domains or add documents")
        self.train, self.eval = train, eval
        self._rng = random.Random(seed)
        self._order = {d: [] for d in train}

    @classmethod
    def from_data(cls, data, domains: Sequence[str], cfg: RolloutConfig, seed: int) -> "PromptSets":
        """Cut prompts from `data` (a `train.data.Data`) for `domains`."""
        tok = data.tokenizer
        train, eval_ = {}, {}
        for domain in domains:
            if domain not in data.domains:
                raise ValueError(f"a teacher is keyed to domain {domain!r} but the data has no such domain "
                                 f"(domains: {data.domains}); fix the teacher's domain or data.domains")
            train[domain] = cut_prompts(tok.encode_batch(data.texts(domain, "train", cfg.prompt_docs)),
                                        tok.bos_id, cfg.prompt_tokens)
            held_out = data.texts(domain, "eval", cfg.prompt_docs)
            # A domain without held-out documents is evaluated on its training prompts.
            eval_[domain] = (cut_prompts(tok.encode_batch(held_out), tok.bos_id, cfg.prompt_tokens)
                             if held_out else train[domain])
        return cls(train, eval_, seed)

    def take(self, domain: str, count: int) -> List[List[int]]:
        """The next `count` training prompts of `domain` (reshuffled after each pass)."""
        out = []
        while len(out) < count:
            if not self._order[domain]:
                order = list(range(len(self.train[domain])))
                self._rng.shuffle(order)
                self._order[domain] = order
            out.append(self.train[domain][self._order[domain].pop()])
        return out

    def state_dict(self) -> dict:
        """Where each domain's shuffled pass stands (a resumed OPD run takes the same prompts)."""
        return {"rng": self._rng.getstate(), "order": {d: list(o) for d, o in self._order.items()}}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["order"]) != sorted(self._order):
            raise ValueError(f"the checkpoint's prompt domains {sorted(state['order'])} differ from this job's "
                             f"{sorted(self._order)}; resume with the teachers of the run that wrote it")
        self._rng.setstate(state["rng"])
        self._order = {d: list(o) for d, o in state["order"].items()}

    def eval_prompts(self, domain: str, count: int) -> List[List[int]]:
        """The first `count` held-out prompts of `domain` (cycled if there are fewer)."""
        prompts = self.eval[domain]
        return [prompts[i % len(prompts)] for i in range(count)]


def rollout(student: V4Model, prompts: Sequence[Sequence[int]], teacher_of_row: Sequence[int],
            cfg: RolloutConfig, eos_id: Optional[int], pad_id: int,
            generator: Optional[torch.Generator] = None) -> RolloutBatch:
    """Sample one completion per prompt with the student and align it for the loss."""
    gen = generate(student, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                   eos_id=eos_id if cfg.stop_at_eos else None, pad_id=pad_id, generator=generator)
    loss_mask = gen.completion_mask[:, 1:]
    return RolloutBatch(inputs=gen.tokens[:, :-1], doc_ids=gen.doc_ids[:, :-1], targets=gen.tokens[:, 1:],
                        loss_mask=loss_mask,
                        teacher_of_row=torch.as_tensor(list(teacher_of_row), dtype=torch.long,
                                                       device=gen.tokens.device),
                        sampled_tokens=int(loss_mask.sum()))
