"""The tiny models of the tests, written once: a LLaMA and a BERT with random weights.

Tests receive them through the ``tiny_llama`` and ``tiny_bert`` fixtures of ``tests/conftest.py``.
This plain module exists only for what cannot receive a fixture: worker scripts started as
subprocesses (``torchrun``), which import it by name.
"""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama(seed: int = 0, **config: Any) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with random weights drawn from ``seed``: 2 blocks, hidden 32, a
    byte vocabulary (256), an untied head. Any ``LlamaConfig`` field can be overridden.

    Example::

        model = tiny_llama(num_hidden_layers=3, vocab_size=64)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    options: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**options | config))


def tiny_bert(num_labels: int = 2, vocab_size: int = 256, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A 2-layer ``BertForSequenceClassification`` with random weights drawn from ``seed`` and no
    dropout (runs compare exactly). Any ``BertConfig`` field can be overridden.

    Example::

        model = tiny_bert(vocab_size=100, max_position_embeddings=32)
    """
    from transformers import BertConfig, BertForSequenceClassification

    options: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**options | config))
