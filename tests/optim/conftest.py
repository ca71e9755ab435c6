"""Shared helpers of the optimizer tests: the tiny LLaMA by short names, and byte-level CPython-docs batches.

They are handed to tests as fixtures (``make_llama``, ``make_batches``, ``train_step``), never
imported, so that no test depends on which ``conftest`` module is first on ``sys.path``.
"""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch


def docs_bytes() -> torch.Tensor:
    """The CPython documentation shipped with Python, as a long tensor of bytes."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def docs_batches(steps: int, batch: int, seq_len: int, seed: int = 0, data: torch.Tensor | None = None):
    """``steps`` random windows of ``batch x seq_len`` bytes, reproducible from ``seed``."""
    data = docs_bytes() if data is None else data
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq_len - 1, (steps, batch), generator=generator)
    return [torch.stack([data[s : s + seq_len] for s in row.tolist()]) for row in starts]


def lm_step(model, optimizer, tokens: torch.Tensor) -> float:
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@pytest.fixture
def make_llama(tiny_llama):
    """The shared ``tiny_llama`` (tests/conftest.py) under the short names these tests use."""

    def make(hidden: int = 32, layers: int = 2, intermediate: int = 88, heads: int = 4, seed: int = 0):
        return tiny_llama(
            seed=seed,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
        )

    return make


@pytest.fixture(scope="session")
def docs() -> torch.Tensor:
    return docs_bytes()


@pytest.fixture
def make_batches(docs):
    def make(steps: int, batch: int, seq_len: int, seed: int = 0, data: torch.Tensor | None = None):
        return docs_batches(steps, batch, seq_len, seed=seed, data=docs if data is None else data)

    return make


@pytest.fixture
def train_step():
    return lm_step
