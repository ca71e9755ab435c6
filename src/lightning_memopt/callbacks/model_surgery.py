"""Model surgery from a callback: run it at the end of the LightningModule's ``configure_model``.

Callbacks that change the network (INT8 weights, early exits, MoE upcycling) must act after the
module builds its model and before ``configure_optimizers`` and checkpoint restoring; Lightning
calls ``configure_model`` right after the callbacks' ``setup``, so each such callback wraps it
on the instance. Wrappers chain: every callback wraps what is there, so several of them compose
in the order they are listed, and :func:`remove_model_surgery` restores the class's method.

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

import lightning.pytorch as pl


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
