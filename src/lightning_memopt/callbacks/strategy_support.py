"""Which Lightning strategies a callback supports, checked one way with one message style.

Checks are ``isinstance`` checks against Lightning's classes, so subclasses count as their base:
``apollo_fsdp`` (:class:`~lightning_memopt.strategies.ApolloFSDPStrategy`) is a
``ModelParallelStrategy`` and is refused wherever FSDP2 is.

Example:
    >>> from types import SimpleNamespace
    >>> from lightning.pytorch.strategies import SingleDeviceStrategy
    >>> trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"))
    >>> refuse_sharding_strategies("MyCallback", trainer, "it hooks every parameter")  # passes
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    XLAStrategy,
)

# Strategies that shard or flatten parameters and gradients (FSDP1, FSDP2 incl. apollo_fsdp,
# DeepSpeed ZeRO, XLA's SPMD).
SHARDING_STRATEGIES: tuple[type[Strategy], ...] = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy, XLAStrategy)
_ALTERNATIVE = "Use a single device or DDP (strategy='ddp')."


def _describe(strategy: Strategy, bases: tuple[type[Strategy], ...]) -> str:
    name = type(strategy).__name__
    base = next((b.__name__ for b in bases if isinstance(strategy, b) and type(strategy) is not b), None)
    return f"{name} (a {base})" if base else name


def refuse_sharding_strategies(callback: str, trainer: Any, why: str, alternative: str = _ALTERNATIVE) -> None:
    """Raise ``ValueError`` if ``trainer.strategy`` shards the model (FSDP, FSDP2, DeepSpeed, XLA).

    ``why`` completes "the strategy ... is not supported: ..." with the reason, e.g. "it shards the
    gradients, which per-parameter hooks never see".

    Example:
        >>> from types import SimpleNamespace
        >>> from lightning.pytorch.strategies import ModelParallelStrategy
        >>> try:
        ...     refuse_sharding_strategies("X", SimpleNamespace(strategy=ModelParallelStrategy()), "a reason")
        ... except ValueError as error:
        ...     print(error)
        X: strategy ModelParallelStrategy is not supported: a reason. Use a single device or DDP (strategy='ddp').
    """
    strategy = trainer.strategy
    if isinstance(strategy, SHARDING_STRATEGIES):
        raise ValueError(
            f"{callback}: strategy {_describe(strategy, SHARDING_STRATEGIES)} is not supported: {why}. {alternative}"
        )


def require_single_device(callback: str, trainer: Any, why: str) -> None:
    """Raise ``ValueError`` unless ``trainer.strategy`` runs on one device (``strategy='auto'``,
    ``devices=1``).

    Example:
        >>> from types import SimpleNamespace
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> require_single_device("X", SimpleNamespace(strategy=SingleDeviceStrategy("cpu")), "reason")
    """
    strategy = trainer.strategy
    if not isinstance(strategy, SingleDeviceStrategy):
        raise ValueError(
            f"{callback}: strategy {_describe(strategy, SHARDING_STRATEGIES)} is not supported: {why}. "
            "Train on one device (strategy='auto', devices=1) or remove the callback."
        )
