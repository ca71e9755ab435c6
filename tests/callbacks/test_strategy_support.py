"""One strategy check for every callback: isinstance-based (apollo_fsdp counts as FSDP2), one message."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from lightning_memopt.callbacks import EarlyExit, Int8Weights, LayerwiseUpdates, strategy_support
from lightning_memopt.strategies import ApolloFSDPStrategy


def test_examples_run() -> None:
    assert doctest.testmod(strategy_support, raise_on_error=False).failed == 0


def _trainer(strategy) -> SimpleNamespace:
    # The attributes LayerwiseUpdates reads before its strategy check.
    return SimpleNamespace(strategy=strategy, gradient_clip_val=None, precision_plugin=None, precision="32-true")


@pytest.mark.parametrize("strategy", [ApolloFSDPStrategy(), ModelParallelStrategy(), FSDPStrategy()])
@pytest.mark.parametrize(
    ("callback", "reason"),
    [
        (LayerwiseUpdates(), "owns the gradients"),
        (EarlyExit(exit_layers=[1]), "shards the LM head"),
        (Int8Weights(), "shard or flatten the weights"),
    ],
)
def test_sharding_strategies_are_refused_by_the_callbacks_that_cannot_work_there(strategy, callback, reason) -> None:
    name = type(callback).__name__
    with pytest.raises(
        ValueError, match=rf"^{name}: strategy {type(strategy).__name__}.* is not supported: .*{reason}"
    ):
        callback.setup(_trainer(strategy), SimpleNamespace(automatic_optimization=True), "fit")


def test_a_subclass_is_named_with_its_base() -> None:
    with pytest.raises(ValueError, match=r"strategy ApolloFSDPStrategy \(a ModelParallelStrategy\) is not supported"):
        strategy_support.refuse_sharding_strategies("X", _trainer(ApolloFSDPStrategy()), "why")


def test_single_device_passes_and_ddp_only_where_supported() -> None:
    single = _trainer(SingleDeviceStrategy("cpu"))
    strategy_support.refuse_sharding_strategies("X", single, "why")
    strategy_support.require_single_device("X", single, "why")
    strategy_support.refuse_sharding_strategies("X", _trainer(DDPStrategy()), "why")
    with pytest.raises(ValueError, match=r"X: strategy DDPStrategy is not supported: why\. Train on one device"):
        strategy_support.require_single_device("X", _trainer(DDPStrategy()), "why")
