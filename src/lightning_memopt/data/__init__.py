"""The embedded data of the main job: a local text corpus (no downloads), offline tokenizers,
and a ``LightningDataModule`` of causal-LM blocks.

The corpus and tokenizer functions do not import Lightning; ``TextDataModule`` (which does)
is imported on first use.

Example:
    >>> from lightning_memopt.data import TextDataModule
    >>> dm = TextDataModule(sources="pydoc", tokenizer="bpe", bpe_vocab_size=4096, seq_len=128)
"""

from __future__ import annotations

import importlib
from typing import Any

from .corpus import load_corpus, path_documents, pydoc_documents, stdlib_documents
from .resumable import ResumableDataLoader, ResumableSampler
from .tokenizer import EOS_TOKEN, build_tokenizer, byte_tokenizer, default_cache_dir, train_bpe_tokenizer

__all__ = [
    "EOS_TOKEN",
    "ResumableDataLoader",
    "ResumableSampler",
    "TextDataModule",
    "build_tokenizer",
    "byte_tokenizer",
    "default_cache_dir",
    "load_corpus",
    "path_documents",
    "pydoc_documents",
    "stdlib_documents",
    "train_bpe_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name == "TextDataModule":
        return importlib.import_module(f"{__name__}.datamodule").TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
