"""The teacher pool: dozens of domain teachers kept off the student's memory (spec opd-and-fused-loss §8).

A teacher is a checkpoint plus the domain key it serves and the tokenizer it was trained with
(`TeacherSpec`, listed in a teachers.json manifest). The pool refuses a teacher whose vocabulary or
tokenizer differs from the student's (spec §4.8 item 4: equal widths are not enough, so the
tokenizer fingerprint is compared too). Teacher weights stay in host memory or on disk and are
loaded into a few device "shells", `group_size` teachers at a time; each brought-in group runs a
no-grad forward over the rows routed to it and ships only its final hidden states (bf16 by
default) plus its output head, so that the loss recomputes the logits (§8.1, §8.3). The rows of a
batch are grouped by teacher, so each head is used once per group.

Legend: B rows, P positions per row (L-1), N loss positions of a group, V vocabulary, D width.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import torch
from omegaconf import OmegaConf

from distill.config import TeacherPoolConfig
from distill.rollout import RolloutBatch
from model import ModelArgs, V4Model
from train.checkpoint import checkpoint_meta, resolve_checkpoint
from train.data.tokenizer import load_tokenizer_dir


@dataclass
class TeacherSpec:
    """One teacher: a checkpoint serving the samples of one domain key."""

    name: str
    """Unique name (metrics are keyed by it)."""
    domain: str
    """Domain label whose prompts (samples) this teacher scores."""
    checkpoint: str
    """Checkpoint directory (or run directory: its newest valid checkpoint)."""
    tokenizer: str
    """Tokenizer directory (tokenizer.json) the teacher was trained with."""


def write_manifest(path: Path, specs: Sequence[TeacherSpec]) -> None:
    path.write_text(json.dumps([asdict(s) for s in specs], indent=2) + "\n")


def read_manifest(path: Path) -> List[TeacherSpec]:
    """Teachers listed in a teachers.json manifest (a list of {name, domain, checkpoint, tokenizer})."""
    if not path.is_file():
        raise ValueError(f"distill.teachers.manifest={path} does not exist; run the expert stage or write the file")
    try:
        rows = json.loads(path.read_text())
        specs = [TeacherSpec(**row) for row in rows]
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path} is not a list of {{name, domain, checkpoint, tokenizer}} objects ({exc})") from None
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"{path} must list at least one teacher with unique names (got {names})")
    return specs


def checkpoint_config(path: Path) -> dict:
    """The run config a checkpoint recorded (its manifest's meta), {} if none."""
    return checkpoint_meta(path).get("config", {}) or {}


def checkpoint_model_args(path: Path) -> ModelArgs:
    """The ModelArgs recorded in a checkpoint's manifest."""
    model = checkpoint_config(path).get("model")
    if not model:
        raise ValueError(f"checkpoint {path} records no model config in its manifest; save it with train.checkpoint "
                         "and meta={'config': ...}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelArgs), model))


def check_compatible(name: str, teacher_vocab: int, teacher_fingerprint: str, student_vocab: int,
                     student_fingerprint: str) -> None:
    """Refuse a teacher whose vocabulary size or tokenizer differs from the student's."""
    if teacher_vocab != student_vocab or teacher_fingerprint != student_fingerprint:
        raise ValueError(f"teacher {name!r} has vocab_size={teacher_vocab} and tokenizer {teacher_fingerprint[:12]} "
                         f"but the student has vocab_size={student_vocab} and tokenizer {student_fingerprint[:12]}; "
                         "distil only from teachers trained with the student's vocabulary and tokenizer")


@dataclass
class TeacherGroup:
    """What one brought-in group of teachers ships to the loss."""

    teachers: List[int]
    """Pool indices of the group's teachers; position j is local teacher id j."""
    positions: torch.Tensor
    """[N] int64 flat indices (into B*P) of the loss positions routed to this group."""
    hidden: torch.Tensor
    """[N, D] the teachers' final hidden states at those positions, in the payload dtype."""
    heads: torch.Tensor
    """[G, V, D] the group's output heads (frozen)."""
    local_ids: torch.Tensor
    """[N] int64 local teacher id of each position."""


@dataclass
class StageTimes:
    """Accumulated seconds and tokens of the teacher stage (reset by the caller each step)."""

    forward_s: float = 0.0
    load_s: float = 0.0
    tokens: int = 0


class TeacherPool:
    """Teachers outside the student's device memory, brought in `cfg.group_size` at a time."""

    def __init__(self, specs: Sequence[TeacherSpec], cfg: TeacherPoolConfig, student_args: ModelArgs,
                 student_tokenizer_fingerprint: str, device: torch.device):
        self.specs, self.cfg, self.device = list(specs), cfg, device
        self.names = [s.name for s in self.specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"teacher names must be unique, got {self.names}")
        self.hidden_dtype = getattr(torch, cfg.hidden_dtype)
        self.checkpoints: List[Path] = []
        self.args: List[ModelArgs] = []
        fingerprints: Dict[str, str] = {}  # tokenizer directory -> fingerprint (teachers often share one)
        for spec in self.specs:
            path = resolve_checkpoint(spec.checkpoint, f"teacher {spec.name!r} checkpoint")
            args = checkpoint_model_args(path)
            if spec.tokenizer not in fingerprints:
                fingerprints[spec.tokenizer] = load_tokenizer_dir(Path(spec.tokenizer).expanduser()).fingerprint
            check_compatible(spec.name, args.vocab_size, fingerprints[spec.tokenizer], student_args.vocab_size,
                             student_tokenizer_fingerprint)
            self.checkpoints.append(path)
            self.args.append(args)
        self._host_states: Dict[int, dict] = {}
        if cfg.offload == "cpu":
            pin = device.type == "cuda"
            for i in range(len(self.specs)):
                state = self._read_state(i, mmap=False)
                self._host_states[i] = {k: v.pin_memory() if pin else v for k, v in state.items()}
        self._shells: Dict[tuple, V4Model] = {}
        self.times = StageTimes()

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def domains(self) -> List[str]:
        return list(dict.fromkeys(s.domain for s in self.specs))

    def plan(self, teachers: Sequence[int]) -> List[List[int]]:
        """Split the teachers present in a batch into groups of at most group_size of one width."""
        by_width: Dict[int, List[int]] = {}
        for t in sorted(set(int(t) for t in teachers)):
            by_width.setdefault(self.args[t].dim, []).append(t)
        size = self.cfg.group_size
        return [ids[i:i + size] for ids in by_width.values() for i in range(0, len(ids), size)]

    def _read_state(self, teacher: int, mmap: bool = True) -> dict:
        """The teacher's state dict from its checkpoint (memory-mapped: read as it is copied)."""
        return torch.load(self.checkpoints[teacher] / "model.pt", map_location="cpu", weights_only=True, mmap=mmap)

    @contextmanager
    def materialize(self, group: Sequence[int]) -> Iterator[List[V4Model]]:
        """The group's teachers on the device (eval mode), loaded into reusable shells."""
        start = time.perf_counter()
        models = []
        for slot, teacher in enumerate(group):
            key = (repr(self.args[teacher]), slot)
            if key not in self._shells:
                self._shells[key] = V4Model(self.args[teacher]).to(self.device).eval().requires_grad_(False)
            shell = self._shells[key]
            state = self._host_states.get(teacher)
            shell.load_state_dict(state if state is not None else self._read_state(teacher))
            models.append(shell)
        self.times.load_s += time.perf_counter() - start
        yield models

    @torch.no_grad()
    def hidden_states(self, teacher: V4Model, inputs: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        """[b, P, D] final hidden states of `teacher` over the student's tokens, in the payload dtype."""
        out = teacher(inputs, doc_ids=doc_ids, return_hidden=True, compute_logits=False)
        return out.hidden.to(self.hidden_dtype)

    def teacher_groups(self, batch: RolloutBatch) -> Iterator[TeacherGroup]:
        """Bring in the batch's teachers group by group; each yields its loss positions' hidden states.

        Lazy: a group's weights and heads are only alive while the consumer handles that group.
        """
        P = batch.inputs.shape[1]
        positions_all = batch.loss_mask.reshape(-1).nonzero().flatten()
        teacher_of_position = batch.teacher_of_row[positions_all // P]
        present = torch.unique(teacher_of_position).tolist()
        for group in self.plan(present):
            with self.materialize(group) as models:
                start = time.perf_counter()
                parts_pos, parts_hidden, parts_ids = [], [], []
                for local, (teacher, model) in enumerate(zip(group, models)):
                    positions = positions_all[teacher_of_position == teacher]
                    rows = torch.unique(positions // P)
                    hidden = self.hidden_states(model, batch.inputs[rows], batch.doc_ids[rows])
                    # position p of row r sits at hidden[index of r in rows, p % P]
                    row_index = torch.searchsorted(rows, positions // P)
                    parts_hidden.append(hidden[row_index, positions % P])
                    parts_pos.append(positions)
                    parts_ids.append(torch.full_like(positions, local))
                    self.times.tokens += rows.numel() * P
                heads = torch.stack([m.head.weight.detach() for m in models])
                if self.device.type == "cuda":  # kernels run asynchronously: time them, not their launch
                    torch.cuda.synchronize(self.device)
                self.times.forward_s += time.perf_counter() - start
            yield TeacherGroup(teachers=list(group), positions=torch.cat(parts_pos), hidden=torch.cat(parts_hidden),
                               heads=heads, local_ids=torch.cat(parts_ids))
