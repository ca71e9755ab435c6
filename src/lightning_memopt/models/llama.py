"""LLaMA-family causal LMs in named sizes, built from ``transformers.LlamaConfig`` with random weights.

``"tiny"`` trains on a laptop CPU in minutes (the quickstart); ``"60m"`` ... ``"7b"`` are the
shapes of the APOLLO paper's pre-training runs (arXiv 2412.05270, Table 9, the GaLore configs),
for real runs on GPUs and for exact memory accounting; ``"13b"`` and ``"70b"`` (LLaMA-13B and
LLaMA-2-70B) are there for memory planning (``lightning-memopt estimate``). Built on the meta device they cost no
memory at all, so even ``"7b"`` can be counted on a laptop.

Example:
    >>> import torch
    >>> from lightning_memopt.models import build_llama
    >>> with torch.device("meta"):
    ...     model = build_llama("7b")
    >>> round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    6.74
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM

# hidden, intermediate (MLP), layers, attention heads, context length.
LLAMA_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512
    ),
    "60m": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=1024,
    ),
    "130m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
    ),
    "350m": dict(
        hidden_size=1024,
        intermediate_size=2736,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=1024,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5461,
        num_hidden_layers=24,
        num_attention_heads=32,
        max_position_embeddings=1024,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
    ),
    # LLaMA-13B (the APOLLO paper's naive-DDP scaling run) and LLaMA-2-70B (grouped-query
    # attention: 8 key/value heads), for memory planning on the meta device.
    "13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        max_position_embeddings=2048,
    ),
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    ),
}
# The paper's runs use the 32000-token LLaMA tokenizer.
PAPER_VOCAB_SIZE = 32000


def llama_config(size: str = "tiny", vocab_size: int | None = None, **overrides: Any) -> LlamaConfig:
    """The ``LlamaConfig`` of a named size; ``overrides`` replace any field (``num_hidden_layers=2``).

    ``vocab_size`` defaults to the paper's 32000; pass the tokenizer's size for training.

    Raises:
        ValueError: for an unknown size (the message lists the known ones).

    Example:
        >>> cfg = llama_config("60m", vocab_size=4096, num_hidden_layers=2)
        >>> cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        (512, 2, 4096)
    """
    key = size.lower()
    if key not in LLAMA_SIZES:
        raise ValueError(f"unknown LLaMA size {size!r}; known sizes: {', '.join(LLAMA_SIZES)}.")
    fields: dict[str, Any] = {
        **LLAMA_SIZES[key],
        "vocab_size": vocab_size or PAPER_VOCAB_SIZE,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_cache": False,
    }
    fields.update(overrides)
    # Multi-head attention (one key/value head per query head) unless asked otherwise.
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    return LlamaConfig(**fields)


def build_llama(size: str = "tiny", vocab_size: int | None = None, **overrides: Any) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of a named size (see :func:`llama_config`).

    It is built on the current default device: wrap the call in ``torch.device("meta")`` to
    count parameters or estimate memory without allocating.

    Example:
        >>> model = build_llama("tiny", vocab_size=257)
        >>> type(model).__name__, model.config.num_hidden_layers
        ('LlamaForCausalLM', 4)
    """
    return LlamaForCausalLM(llama_config(size, vocab_size, **overrides))
