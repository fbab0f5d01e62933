"""Tokenizer: a cached byte-level BPE trained on the corpus, or a local HF tokenizer directory.

Issue: "Tokenizer: a byte-level BPE trained on the embedded corpus with `tokenizers` (cached), or any
local HF tokenizer directory". The trained BPE reserves <bos>=0, <eos>=1, <pad>=2 (V4 uses bos 0,
eos 1; spec §1 table, vocab_size row). Its vocabulary never exceeds the model's; a larger request or a
larger local tokenizer is a ValueError naming both fields.

A trained tokenizer is saved as a Hugging Face tokenizer directory (tokenizer.json plus
tokenizer_config.json naming the special tokens), under
`cache_dir/tokenizers/bpe-v<vocab>-f<min_frequency>-<hash of the training text>/`, so the second build
reads it back instead of training, and the directory can be handed to `transformers` as it is.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import filelock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import BPE_TOKENIZER, DataConfig

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<bos>", "<eos>", "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2 in this order
BYTE_ALPHABET_SIZE = 256
MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
_ENCODE_CHUNK_DOCS = 1024


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the ids packing needs. `encode` adds no special tokens."""

    def __init__(self, tokenizer: Tokenizer, bos_id: int, eos_id: int, pad_id: int, origin: str):
        # A document that contains the text "<bos>" must not produce the bos id: packing relies on bos/eos
        # occurring only at document boundaries. (Not serialised; the saved tokenizer.json is unchanged.)
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.origin = origin
        """Where it came from: the cached BPE directory or the local tokenizer directory."""
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.blake2b(tokenizer.to_str().encode(), digest_size=16).hexdigest()
        """Hash of the full tokenizer definition; keys the tokenized-corpus cache."""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK_DOCS):
            chunk = self.tokenizer.encode_batch(texts[start:start + _ENCODE_CHUNK_DOCS], add_special_tokens=False)
            ids.extend(encoding.ids for encoding in chunk)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (a directory `transformers` and this module load)."""
        _write_tokenizer_dir(self.tokenizer, Path(directory), self.bos_id, self.eos_id, self.pad_id)

    def __repr__(self) -> str:
        return (f"TextTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, origin={self.origin!r})")


def build_tokenizer(cfg: DataConfig, vocab_size: int, documents: Optional[Iterable[str]] = None) -> TextTokenizer:
    """The tokenizer of `cfg` for a model of `vocab_size` tokens.

    `documents` are the training texts for `cfg.tokenizer == "bpe"`; None loads them from `cfg`.
    """
    if cfg.tokenizer == BPE_TOKENIZER:
        bpe_vocab = check_bpe_vocab(cfg, vocab_size)
        if documents is None:
            from .sources import load_documents
            documents = (row["text"] for row in load_documents(cfg))
        return train_or_load_bpe(documents, bpe_vocab, cfg.tokenizer_min_frequency,
                                 cfg.tokenizer_train_max_chars, Path(os.path.expanduser(cfg.cache_dir)))
    tokenizer = load_tokenizer_dir(Path(os.path.expanduser(cfg.tokenizer)))
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size} or use a "
                         f"smaller tokenizer")
    return tokenizer


def check_bpe_vocab(cfg: DataConfig, vocab_size: int) -> int:
    """The BPE vocabulary size to train, checked against the model's; cheap, so callers run it first."""
    bpe_vocab = vocab_size if cfg.tokenizer_vocab_size is None else cfg.tokenizer_vocab_size
    if bpe_vocab > vocab_size:
        raise ValueError(f"data.tokenizer_vocab_size={bpe_vocab} exceeds the model's vocab_size={vocab_size}; set "
                         f"data.tokenizer_vocab_size <= {vocab_size} (or null) or raise model.vocab_size")
    if bpe_vocab < MIN_BPE_VOCAB:
        field = "model.vocab_size" if cfg.tokenizer_vocab_size is None else "data.tokenizer_vocab_size"
        raise ValueError(f"{field}={bpe_vocab} is below the {MIN_BPE_VOCAB} tokens a byte-level BPE needs "
                         f"(256 bytes + <bos>, <eos>, <pad>); set it to at least {MIN_BPE_VOCAB}")
    return bpe_vocab


def train_or_load_bpe(documents: Iterable[str], vocab_size: int, min_frequency: int, max_chars: int,
                      cache_dir: Path) -> TextTokenizer:
    """Train a byte-level BPE on the first `max_chars` characters of `documents`, or load the cached one."""
    training_texts = _first_chars(documents, max_chars)
    if not training_texts:
        raise ValueError("the BPE training corpus is empty; point data.source at documents with text")
    corpus_hash = hashlib.blake2b(digest_size=16)
    for text in training_texts:
        corpus_hash.update(text.encode())
        corpus_hash.update(b"\0")  # document boundary, so ["ab"] and ["a", "b"] differ
    directory = cache_dir / "tokenizers" / f"bpe-v{vocab_size}-f{min_frequency}-{corpus_hash.hexdigest()}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Data-parallel ranks build concurrently: one trains, the others wait and read its result.
    with filelock.FileLock(str(directory) + ".lock"):
        if not (directory / "tokenizer.json").exists():
            tokenizer = _train_bpe(training_texts, vocab_size, min_frequency)
            _write_tokenizer_dir_atomically(tokenizer, directory)
    return load_tokenizer_dir(directory)


def _first_chars(documents: Iterable[str], max_chars: int) -> list[str]:
    texts, used = [], 0
    for text in documents:
        if used >= max_chars:
            break
        texts.append(text[:max_chars - used])
        used += len(texts[-1])
    return texts


def _train_bpe(texts: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    # No normalizer and add_prefix_space=False: decode(encode(text)) == text for every string.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _write_tokenizer_dir_atomically(tokenizer: Tokenizer, directory: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        _write_tokenizer_dir(tokenizer, staging, *(tokenizer.token_to_id(token) for token in SPECIAL_TOKENS))
        if directory.exists():  # a stale directory without tokenizer.json (interrupted by hand)
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_tokenizer_dir(tokenizer: Tokenizer, directory: Path, bos_id: int, eos_id: int, pad_id: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.id_to_token(bos_id),
              "eos_token": tokenizer.id_to_token(eos_id), "pad_token": tokenizer.id_to_token(pad_id),
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer_dir(directory: Path) -> TextTokenizer:
    """A local Hugging Face tokenizer directory: tokenizer.json plus special tokens from its config files."""
    if not directory.is_dir():
        raise ValueError(f"data.tokenizer={str(directory)!r} is neither 'bpe' nor an existing directory; set it to "
                         f"'bpe' or to a local Hugging Face tokenizer directory")
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.exists():
        raise ValueError(f"data.tokenizer: {directory} has no tokenizer.json; save a fast tokenizer there "
                         f"(`AutoTokenizer.from_pretrained(path).save_pretrained(path)`) or set data.tokenizer=bpe")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    special = _special_tokens(directory)
    ids = {}
    for role in ("bos_token", "eos_token", "pad_token"):
        token = special.get(role)
        token_id = tokenizer.token_to_id(token) if token is not None else None
        if token is not None and token_id is None:
            raise ValueError(f"data.tokenizer: {role} {token!r} named in {directory} is not in its vocabulary; fix "
                             f"tokenizer_config.json")
        ids[role] = token_id
    if ids["bos_token"] is None or ids["eos_token"] is None:
        raise ValueError(f"data.tokenizer: {directory} names no bos_token/eos_token in tokenizer_config.json or "
                         f"special_tokens_map.json; add both (packing wraps every document in them)")
    pad_id = ids["pad_token"] if ids["pad_token"] is not None else ids["eos_token"]
    return TextTokenizer(tokenizer, ids["bos_token"], ids["eos_token"], pad_id, origin=str(directory))


def _special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings; tokenizer_config.json wins over special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.exists():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        for role in ("bos_token", "eos_token", "pad_token"):
            value = config.get(role)
            if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
                value = value.get("content")
            if isinstance(value, str):
                found[role] = value
    return found
