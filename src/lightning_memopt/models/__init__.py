"""The embedded models of the main job: LLaMA-family causal LMs in named sizes, and the
``CausalLM`` LightningModule that trains them (or any local Hugging Face checkpoint).

The LLaMA builders do not import Lightning; ``CausalLM`` and its schedule (which do) are
imported on first use.

Example:
    >>> from lightning_memopt.models import CausalLM, build_llama
    >>> lm = CausalLM("tiny")
"""

from __future__ import annotations

import importlib
from typing import Any

from .llama import LLAMA_SIZES, PAPER_VOCAB_SIZE, build_llama, llama_config

_LAZY = ("CausalLM", "WarmupCosineLR", "build_causal_lm", "check_model_name")

__all__ = ["LLAMA_SIZES", "PAPER_VOCAB_SIZE", *_LAZY, "build_llama", "llama_config"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.causal_lm"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
