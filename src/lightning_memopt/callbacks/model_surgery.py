"""Model surgery from a callback: run it at the end of the LightningModule's ``configure_model``.

Callbacks that change the network (INT8 weights, early exits, MoE upcycling) must act after the
module builds its model and before ``configure_optimizers`` and checkpoint restoring; Lightning
calls ``configure_model`` right after the callbacks' ``setup``, so each such callback wraps it
on the instance. Wrappers chain: every callback wraps what is there, so several of them compose
in the order they are listed, and :func:`remove_model_surgery` restores the class's method.
:class:`ModelSurgery` is their common base (setup, teardown, logging the loss parts).

Example:
    >>> import lightning as L
    >>> module = L.LightningModule()
    >>> run_after_configure_model(module, lambda: print("surgery"))
    >>> module.configure_model()
    surgery
    >>> remove_model_surgery(module)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..layers import get_objective, last_loss_parts, last_model_loss, set_training_step


def run_after_configure_model(pl_module: pl.LightningModule, surgery: Callable[[], None]) -> None:
    """Make ``pl_module.configure_model()`` call ``surgery()`` after building the model (and
    after any surgery registered before this one).

    Example:
        >>> import lightning as L
        >>> module = L.LightningModule()
        >>> run_after_configure_model(module, lambda: print("first"))
        >>> run_after_configure_model(module, lambda: print("second"))
        >>> module.configure_model()
        first
        second
    """
    build = pl_module.configure_model

    def configure_model() -> None:
        build()
        surgery()

    pl_module.configure_model = configure_model  # type: ignore[method-assign]


def remove_model_surgery(pl_module: pl.LightningModule) -> None:
    """Drop every wrapper :func:`run_after_configure_model` put on ``pl_module`` (the model it
    already built keeps its changes).

    Example:
        >>> import lightning as L
        >>> module = L.LightningModule()
        >>> run_after_configure_model(module, lambda: None)
        >>> remove_model_surgery(module)
        >>> "configure_model" in vars(module)
        False
    """
    vars(pl_module).pop("configure_model", None)


class ModelSurgery(Callback):
    """Base of the callbacks that change the network (:class:`~lightning_memopt.callbacks.EarlyExit`,
    :class:`~lightning_memopt.callbacks.UpcycleToMoE`, :class:`~lightning_memopt.callbacks.Int8Weights`):
    one way to set up, tear down and log what the surgery adds to the training objective.

    - ``setup``: :meth:`check_strategy`, then :meth:`apply` at the end of the module's
      ``configure_model`` (:func:`run_after_configure_model`: after the model is built, before
      ``configure_optimizers`` and checkpoint restoring); ``teardown`` removes the wrapper.
    - Training: the surgery's loss term sits in the network's own ``forward``
      (:mod:`lightning_memopt.layers.objective`), so the LightningModule trains it by calling
      ``network(input_ids=..., labels=...)`` in training mode, as
      :class:`~lightning_memopt.models.CausalLM` does. At each batch's start the callback tells
      the terms the optimizer step (:func:`~lightning_memopt.layers.set_training_step`: an exit
      curriculum follows it); at its end it logs the parts whose names start with
      :attr:`loss_parts` (``train/<part>``), and refuses a module that never ran the objective.

    Subclasses define :meth:`apply` and may set :attr:`loss_parts`, :attr:`progress_bar_parts`
    and override :meth:`check_strategy` and :meth:`network`.

    Example:
        >>> import lightning as L
        >>> class Freeze(ModelSurgery):
        ...     def apply(self, pl_module):
        ...         self.network(pl_module).requires_grad_(False)
        >>> trainer = L.Trainer(callbacks=[Freeze()], accelerator="cpu", logger=False)
    """

    #: name prefixes of the objective's parts this callback logs (e.g. ``("exit_",)``).
    loss_parts: tuple[str, ...] = ()
    #: parts also shown in the progress bar.
    progress_bar_parts: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._wrapped: list[pl.LightningModule] = []

    def apply(self, pl_module: pl.LightningModule) -> None:
        """The surgery, on the built network (called once per ``fit``/``validate``/...; a
        network that already carries it must be left as it is)."""
        raise NotImplementedError(f"{type(self).__name__} must define apply(self, pl_module).")

    def check_strategy(self, trainer: pl.Trainer) -> None:
        """Refuse the strategies the surgery cannot run under (see ``strategy_support``); default:
        none refused."""

    def network(self, pl_module: pl.LightningModule) -> nn.Module | None:
        """The network the surgery changes: ``pl_module.model`` when the module has one (``None``
        while it is not built yet, as ``CausalLM`` before ``configure_model``), else the module."""
        model = getattr(pl_module, "model", pl_module)
        return model if isinstance(model, nn.Module) else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_strategy(trainer)
        if any(module is pl_module for module in self._wrapped):
            return  # already wrapped (a second setup without teardown)
        # Other callbacks' surgery on the same module chains with this one, in callback order.
        run_after_configure_model(pl_module, lambda: self.apply(pl_module))
        self._wrapped.append(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for module in self._wrapped:
            remove_model_surgery(module)
        self._wrapped = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        network = self.network(pl_module)
        if network is not None:
            set_training_step(network, trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        network = self.network(pl_module)
        if not self.loss_parts or network is None or get_objective(network) is None:
            return
        if last_model_loss(network) is None:
            raise RuntimeError(
                f"{type(self).__name__}: the training objective is in the model's own forward, but "
                f"{type(pl_module).__name__}.training_step did not call it in training mode with labels. Compute "
                "the loss as `self.model(input_ids=..., labels=...).loss` (lightning_memopt.models.CausalLM does)."
            )
        for name, value in sorted(last_loss_parts(network).items()):
            if name.startswith(self.loss_parts):
                prog_bar = name in self.progress_bar_parts
                pl_module.log(f"train/{name}", value, prog_bar=prog_bar, on_step=True, on_epoch=False)
