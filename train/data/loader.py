"""The training loader: a deterministic sequence of global batches, sliced per data-parallel rank.

Issue: "deterministic shuffling, and a loader state that can be saved and restored".
- Global batch s holds the `global_batch` rows that follow the rows of batches 0..s-1 in the packed
  stream (`packing.py`). Rank r of world w takes rows [r*G/w, (r+1)*G/w) of it, so the union of the
  ranks' slices is exactly the batch a single process sees.
- The loader's whole position is one integer: the stream position where the next batch's first row
  starts. The state saved by `state_dict()` is the same on every rank; restoring it under another world
  size (or global batch, or sequence length) continues at the same token.
- `peek(ahead)` returns a future batch without consuming it (look-ahead for anticipatory routing,
  spec §3.8); batches are computed from the position alone, in-process, with no worker processes.
"""

from typing import Optional, Protocol

import numpy as np
import torch

from .packing import EpochStream, pack_rows, row_positions

STATE_FORMAT = 1


class TokenSource(Protocol):
    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def release(self, position: int) -> None: ...
    def resume_point(self, position: int) -> Optional[dict]: ...
    def seek(self, position: int, resume: Optional[dict]) -> None: ...
    def epoch_at(self, position: int) -> int: ...


class MapSource:
    """`EpochStream` behind the `TokenSource` interface: random access, nothing to release or replay."""

    def __init__(self, stream: EpochStream):
        self.stream = stream

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.stream.gather(positions)

    def release(self, position: int) -> None:
        pass

    def resume_point(self, position: int) -> None:
        return None

    def seek(self, position: int, resume: Optional[dict]) -> None:
        pass

    def epoch_at(self, position: int) -> int:
        return position // self.stream.tokens_per_epoch


class PackedLoader:
    """Iterator over this rank's slices of the global batches.

    Each item is a dict of int64 tensors [global_batch // dp_size, seq_len]: input_ids, labels,
    doc_ids, domain_ids (see `packing.py`).
    """

    def __init__(self, source: TokenSource, *, seq_len: int, global_batch: int, dp_rank: int, dp_size: int,
                 seed: int, fingerprint: str, tokens_per_epoch: Optional[int]):
        self.source = source
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.local_batch = global_batch // dp_size
        self.seed = seed
        self.fingerprint = fingerprint
        """Hash of the corpus, tokenizer, held-out choice and stream mode; a saved state must match it."""
        self.tokens_per_epoch = tokens_per_epoch
        """Packed tokens in one epoch of training documents; None for a streaming source (unknown)."""
        self.position = 0
        """Stream position of the first token of the next global batch."""
        self.step = 0
        """Global batches consumed since the start of training."""

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.peek(0)
        self.position += self.global_batch * self.seq_len
        self.step += 1
        self.source.release(self.position)
        return batch

    def peek(self, ahead: int = 0) -> dict[str, torch.Tensor]:
        """This rank's slice of the global batch `ahead` steps after the next one, without consuming it."""
        first_row = ahead * self.global_batch + self.dp_rank * self.local_batch
        positions = row_positions(self.position, first_row, self.local_batch, self.seq_len)
        return pack_rows(*self.source.gather(positions))

    @property
    def epoch(self) -> int:
        """Epoch of the next batch's first token."""
        return self.source.epoch_at(self.position)

    @property
    def epoch_progress(self) -> Optional[float]:
        """Epochs consumed so far as a fraction (None for a streaming source)."""
        return None if self.tokens_per_epoch is None else self.position / self.tokens_per_epoch

    def state_dict(self) -> dict:
        """Plain ints and strings (fits torch.save and JSON); identical on every rank."""
        return {"format": STATE_FORMAT, "position": self.position, "step": self.step, "seed": self.seed,
                "fingerprint": self.fingerprint, "resume": self.source.resume_point(self.position)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state has format {state.get('format')!r}, expected {STATE_FORMAT}; pass the dict "
                             f"returned by PackedLoader.state_dict()")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("loader state was saved for other data (corpus, tokenizer, held-out split or streaming "
                             "differ); resume with the same data.* settings or start a fresh run")
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with data seed {state['seed']}, this run uses {self.seed}; "
                             f"resume with the same seed (data.seed or the run seed)")
        self.source.seek(state["position"], state["resume"])
        self.position = state["position"]
        self.step = state["step"]
