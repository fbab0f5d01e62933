"""`DataConfig`: every knob of the pretraining data pipeline (issue: "Data on `datasets`").

One dataclass for the data concern (style.md §4). Plain field types only, so Hydra's ConfigStore can
register it as a structured config. Run-level quantities that other concerns own (model vocabulary,
sequence length, global batch, data-parallel rank/size, run seed) are arguments of `build_data`, not
fields here.
"""

from dataclasses import dataclass
from typing import List, Optional

EMBEDDED_SOURCE = "embedded"
BPE_TOKENIZER = "bpe"
TEXT_UNITS = ("file", "paragraph", "line")


@dataclass
class DataConfig:
    source: str = EMBEDDED_SOURCE
    """'embedded' (built-in math/code/prose corpus), a Hugging Face dataset name read from the local HF cache (never the network), or local .jsonl/.json/.parquet/.txt/.text files or folders, comma-separated, globs allowed."""
    subset: Optional[str] = None
    """Configuration name of a Hugging Face dataset (e.g. 'wikitext-2-raw-v1'); None = the dataset's default."""
    split: str = "train"
    """Split of a Hugging Face dataset to read; local files always form the single split 'train'."""
    streaming: bool = False
    """Read documents lazily as a `datasets.IterableDataset` (shuffle buffer, nothing materialised) instead of tokenizing the whole corpus up front."""
    text_field: str = "text"
    """Column that holds each document's text."""
    domain_field: str = "domain"
    """Column that holds each document's domain label; documents without it get domain 'default'."""
    domains: Optional[List[str]] = None
    """Keep only documents of these domains, whose ids follow this order; None = all domains, ids in sorted name order."""
    text_unit: str = "file"
    """What one document is in a .txt/.text file: 'file' (the whole file), 'paragraph' (blank-line separated) or 'line'."""
    tokenizer: str = BPE_TOKENIZER
    """'bpe' = train a byte-level BPE on the corpus (cached), or a path to a local Hugging Face tokenizer directory holding tokenizer.json."""
    tokenizer_vocab_size: Optional[int] = None
    """Vocabulary size of the trained BPE (including <bos>, <eos>, <pad>); None = the model's vocab_size. Must not exceed it."""
    tokenizer_min_frequency: int = 2
    """A BPE merge is learned only for pairs seen at least this often, so a small corpus stops short of a huge vocabulary instead of memorising it."""
    tokenizer_train_max_chars: int = 50_000_000
    """BPE training reads documents in corpus order up to this many characters (bounds training time on large sources)."""
    cache_dir: str = "~/.cache/v4forge/data"
    """Directory for the trained tokenizers and tokenized corpora, keyed by content hashes (safe to share between runs)."""
    hf_cache_dir: Optional[str] = None
    """Hugging Face datasets cache to read named datasets from and to write Arrow copies of local files to; None = HF's default."""
    embedded_seed: int = 0
    """Seed of the generated math problems; fixed apart from the run seed so the embedded corpus and its tokenizer stay the same across runs."""
    embedded_math_problems: int = 3000
    """Number of generated math problems (one document each) in the embedded corpus."""
    embedded_code_max_files: int = 100
    """At most this many standard-library .py files (sorted by name) form the embedded code domain."""
    embedded_code_max_chars: int = 1_000_000
    """Total character budget of the embedded code domain."""
    embedded_code_max_file_chars: int = 40_000
    """Standard-library files longer than this are skipped, so a few huge modules do not fill the code budget."""
    embedded_prose_max_chars: int = 800_000
    """Total character budget of the embedded prose domain (pydoc topics first, then module docstrings)."""
    eval_fraction: float = 0.02
    """Fraction of each domain's documents held out for evaluation, chosen by a stable hash of the text (independent of the seed)."""
    eval_max_docs: int = 256
    """At most this many held-out documents per domain."""
    seed: Optional[int] = None
    """Seed of the per-epoch document shuffle; None = the run seed passed to `build_data`."""
    shuffle_buffer: int = 10_000
    """Streaming only: documents in the shuffle buffer (files are read in a shuffled order, rows pass through the buffer)."""
    stream_probe_docs: int = 10_000
    """Streaming only: documents read up front from the start of the stream to train the BPE, discover domains and collect the held-out sets."""
