"""Pretraining data pipeline: documents on `datasets`, a byte-level BPE, document-aware packing, and a
resumable, data-parallel-sliced loader. Entry point: `build_data(DataConfig(), ...)`."""

from .build import Data, DomainStats, EvalSet, build_data
from .config import DataConfig
from .loader import PackedLoader
from .packing import IGNORE_INDEX, pack_rows
from .sources import load_documents
from .tokenizer import TextTokenizer, build_tokenizer

__all__ = ["Data", "DataConfig", "DomainStats", "EvalSet", "IGNORE_INDEX", "PackedLoader", "TextTokenizer",
           "build_data", "build_tokenizer", "load_documents", "pack_rows"]
