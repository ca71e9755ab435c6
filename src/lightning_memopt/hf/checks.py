"""Combinations of our techniques and HF Trainer settings that cannot work, refused up front.

Example:
    >>> import torch
    >>> from transformers import TrainingArguments
    >>> check_trainer_setup(torch.nn.Linear(2, 2), TrainingArguments("out", report_to=[]))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layers import get_objective
from ..quant import is_int8_weight

# Set by quant.quantize_linear_weights on the converted layers and the root; it survives
# FSDP2's in-place sharding, which would replace the Int8Weight parameters themselves.
_INT8_MARKER = "_memopt_int8_state_dict_hooks"


def _has_int8_weights(model: nn.Module) -> bool:
    return any(is_int8_weight(p) for p in model.parameters()) or any(
        m.__dict__.get(_INT8_MARKER) for m in model.modules()
    )


def _sharding(args: Any) -> str | None:
    """The name of the parameter-sharding backend ``args`` enables, if any."""
    if getattr(args, "fsdp", None):
        return "FSDP (fsdp=...)"
    if getattr(args, "deepspeed", None):
        return "DeepSpeed (deepspeed=...)"
    return None


def check_trainer_setup(model: nn.Module, args: Any) -> None:
    """Raise a ``ValueError`` naming the problem and the fix when ``model`` and the Trainer's
    ``args`` combine techniques that cannot work together:

    - **INT8 weights with FSDP or DeepSpeed**: an :class:`~lightning_memopt.quant.Int8Weight`
      is stored and updated whole on one device; a sharding backend would split (and silently
      dequantize) it. Use DDP (``torchrun`` without ``--fsdp``), or
      :func:`~lightning_memopt.quant.dequantize_linear_weights` first.
    - **the chunked loss with FSDP or DeepSpeed**: the LM head is sharded and only the model's
      own forward gathers it. Use :func:`~lightning_memopt.layers.remove_chunked_loss`.

    Called when our optimizers are built (``optim="apollo"`` & co.) and by
    :class:`~lightning_memopt.hf.LayerMetricsCallback` when the Trainer is created; call it
    yourself with another optimizer.

    Example:
        >>> from transformers import TrainingArguments
        >>> from lightning_memopt.quant import quantize_linear_weights
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> _ = quantize_linear_weights(model, "all-linear", group_size=4)
        >>> check_trainer_setup(model, TrainingArguments("out", fsdp=True, report_to=[]))
        Traceback (most recent call last):
        ...
        ValueError: INT8 weights (quantize_linear_weights) cannot be trained with FSDP (fsdp=...): ...
    """
    sharding = _sharding(args)
    if sharding is None:
        return
    if _has_int8_weights(model):
        raise ValueError(
            f"INT8 weights (quantize_linear_weights) cannot be trained with {sharding}: each INT8 weight is stored and "
            "updated whole on one device, and sharding would split (and silently dequantize) it. Train with DDP "
            "(torchrun without fsdp/deepspeed), or call lightning_memopt.quant.dequantize_linear_weights(model) first."
        )
    chunked = [m for m in model.modules() if (o := get_objective(m)) is not None and o.main_loss_name == "chunked_loss"]
    if chunked:
        raise ValueError(
            f"use_chunked_loss cannot be used with {sharding}: the LM head is sharded and only the model's own "
            "forward gathers it. Call lightning_memopt.layers.remove_chunked_loss(model), or train without sharding."
        )
