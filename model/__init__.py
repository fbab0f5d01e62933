"""DeepSeek-V4 architecture in plain single-device PyTorch (spec v4-architecture.md §2-§6)."""

from .args import INDEXER_MODES, PRESETS, ModelArgs, expected_init_loss
from .cache import ModelCache
from .generate import Generation, generate, sample_next
from .moe import balanced_tid2eid
from .transformer import LayerStats, ModelOutput, V4Model, masked_cross_entropy

__all__ = ["ModelCache", "generate", "Generation", "sample_next", "ModelArgs", "PRESETS", "INDEXER_MODES", "V4Model", "ModelOutput", "LayerStats",
           "balanced_tid2eid", "expected_init_loss", "masked_cross_entropy"]
