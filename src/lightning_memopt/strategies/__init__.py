"""Lightning strategies: ``apollo_fsdp`` (FSDP2 + shard-aware APOLLO, HSDP), crash-safe checkpoints, registration.

``import lightning_memopt`` registers the strategy names in Lightning's ``StrategyRegistry``
as soon as ``lightning.pytorch`` is imported (at once if it already is), without importing
Lightning itself. The names: ``apollo_fsdp``, ``apollo_fsdp_cpu_offload``,
``apollo_fsdp_activation_checkpointing``, ``apollo_fsdp_bf16``, ``apollo_hsdp`` (hybrid sharding:
within a node, replicated across nodes). :class:`AtomicCheckpointIO` makes any strategy's
single-file checkpoints crash-safe (``apollo_fsdp`` uses it, and writes its folders the same way).

Example:
    >>> import lightning_memopt
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(strategy="apollo_fsdp", accelerator="cpu", devices=2)  # doctest: +SKIP
    >>> from lightning_memopt.strategies import ApolloFSDPStrategy
    >>> strategy = ApolloFSDPStrategy(activation_checkpointing=True)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning_memopt._after_import import call_after_import

# Public names and the submodule that defines each; imported on first use (they import Lightning).
_LAZY = {
    "ApolloFSDPStrategy": "apollo_fsdp",
    "STRATEGY_VARIANTS": "apollo_fsdp",
    "check_optimizers": "apollo_fsdp",
    "register_strategies": "apollo_fsdp",
    "shard_module": "apollo_fsdp",
    "SHARDING_STRATEGIES": "apollo_fsdp",
    "AtomicCheckpointIO": "atomic",
    "atomic_replace": "atomic",
    "atomic_write": "atomic",
    "consolidate_checkpoint": "checkpoints",
    "load_distributed_checkpoint": "checkpoints",
}

__all__ = [*_LAZY, "register_on_lightning_import"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register() -> None:
    module = sys.modules.get(f"{__name__}.apollo_fsdp")
    if module is not None and not hasattr(module, "register_strategies"):
        # apollo_fsdp is being imported and has just imported Lightning (which runs this hook):
        # it registers the names itself once it is complete.
        return
    from .apollo_fsdp import register_strategies

    register_strategies()


def register_on_lightning_import() -> None:
    """What ``import lightning_memopt`` calls: register the strategy names now if
    ``lightning.pytorch`` is imported, else right after it is.

    Example:
        >>> register_on_lightning_import()
        >>> from lightning.pytorch.strategies import StrategyRegistry
        >>> "apollo_fsdp" in StrategyRegistry
        True
    """
    call_after_import("lightning.pytorch", _register)
