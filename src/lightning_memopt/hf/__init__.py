"""Hugging Face ``transformers.Trainer`` adapter: our optimizers by name, and Trainer callbacks.

After ``import lightning_memopt``, ``TrainingArguments(optim=...)`` takes ``"apollo"``,
``"apollo_mini"``, ``"apollo_layerwise"`` and ``"apollo_mini_layerwise"``, with ``optim_args``
checked by our registry and ``optim_target_modules`` (see :mod:`.optimizers`); the
registration is in :mod:`.registration`, the layer-wise mode in :mod:`.layerwise`. The public
fallback, which needs no registration: ``Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
"apollo", model, "rank=128", args=args))``.

Beyond optimizers: :class:`LayerMetricsCallback` logs what the layers report (MoE router
losses, objective parts such as per-exit losses, INT8 facts), :func:`check_trainer_setup`
refuses combinations that cannot work (INT8 weights or the chunked loss with FSDP), and
``python -m lightning_memopt.hf SCRIPT.py [ARGS...]`` (:mod:`.__main__`) runs an unmodified
training script with our names registered.

This package must stay cheap to import (``import lightning_memopt`` imports it): modules that
import transformers at module level are loaded lazily through ``__getattr__`` below.

Example:
    >>> import lightning_memopt
    >>> from transformers import TrainingArguments
    >>> args = TrainingArguments("out", optim="apollo", optim_args="rank=128,update_proj_gap=100",
    ...                          optim_target_modules="all-linear", report_to=[])
"""

from __future__ import annotations

import importlib
from typing import Any

from .checks import check_trainer_setup
from .layerwise import SyncGradients, TrainerLayerwiseOptimizer
from .optimizers import (
    HF_OPTIMIZER_NAMES,
    build_optimizer,
    decay_parameter_names,
    optimizer_cls_and_kwargs,
    param_groups,
    resolve_target_modules,
)
from .registration import TransformersInternalsChanged, is_registered, register, register_on_transformers_import

# name -> submodule, imported on first access (they import transformers at module level).
_LAZY = {
    "MemoryProfilerCallback": ".memory_profiler",
    "LayerMetricsCallback": ".layer_metrics",
    "int8_metrics": ".layer_metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HF_OPTIMIZER_NAMES",
    "LayerMetricsCallback",
    "MemoryProfilerCallback",
    "SyncGradients",
    "TrainerLayerwiseOptimizer",
    "TransformersInternalsChanged",
    "build_optimizer",
    "check_trainer_setup",
    "decay_parameter_names",
    "int8_metrics",
    "is_registered",
    "optimizer_cls_and_kwargs",
    "param_groups",
    "register",
    "register_on_transformers_import",
    "resolve_target_modules",
]
