"""``LayerwiseUpdates``: layer-wise (in-backward) optimizer steps in Lightning, as a switch.

The callback wraps the optimizer that ``configure_optimizers`` returned in the core driver,
:class:`lightning_memopt.optim.LayerwiseOptimizer`, once the strategy has set it up. Nothing
else changes for the user:

- **Automatic optimization.** Lightning runs the training step and backward of the last
  micro-batch of an accumulation window inside ``optimizer.step(closure)``, and the others
  outside it. The driver is built with ``boundary="closure"``: the backward inside ``step`` updates
  each parameter as soon as its gradient is ready and frees the gradient; the other backward
  passes accumulate gradients as usual. ``accumulate_grad_batches`` and the shorter last window
  of an epoch work unchanged.
- **LR schedulers** from ``configure_optimizers`` keep stepping once per optimizer step; they
  act on the same param groups the driver uses.
- **Checkpoints.** The driver's ``state_dict()`` is the inner optimizer's, so checkpoints are
  the same as without the callback (and interchangeable with them); resuming is exact.
- **DDP.** With ``DistributedDataParallel`` the driver updates the parameters after DDP's
  all-reduce, still inside backward.
- **Refused, with a message:** manual optimization (wrap your optimizer in
  ``LayerwiseOptimizer`` yourself), ``Trainer(gradient_clip_val=...)`` (the global norm never
  exists: use ``LayerwiseUpdates(max_grad_norm=...)``, per-parameter clipping), a gradient
  scaler (``precision="16-mixed"``: use ``"bf16-mixed"``), and strategies that own the
  gradients (FSDP, DeepSpeed).

Hooks that read gradients after backward (``on_before_optimizer_step``, gradient-norm
logging) find none: every gradient has been used and freed by then.

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import LayerwiseUpdates
    >>> trainer = L.Trainer(callbacks=[LayerwiseUpdates()], accelerator="cpu", logger=False)
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel

from ..optim import LayerwiseOptimizer
from .strategy_support import refuse_sharding_strategies


class LayerwiseUpdates(Callback):
    """Update each weight during backward as soon as its gradient is ready (no full gradient buffer).

    Works with the optimizer and LR scheduler of the user's ``configure_optimizers`` as they
    are (APOLLO, APOLLO-Mini, torch AdamW, ...), with gradient accumulation, single-device and
    DDP training, and exact checkpoint resume. Peak gradient memory falls from the model's size
    to its largest parameter's (without accumulation; with it, gradients accumulate in full
    between optimizer steps).

    Args:
        max_grad_norm: per-parameter gradient clipping (each parameter's gradient is clipped to
            this L2 norm on its own), or ``None``. ``Trainer(gradient_clip_val=...)`` clips by the
            global norm, which layer-wise updates cannot compute, and is refused.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[LayerwiseUpdates(max_grad_norm=1.0)], accelerator="cpu",
        ...                     accumulate_grad_batches=4, logger=False)
    """

    def __init__(self, max_grad_norm: float | None = None) -> None:
        if max_grad_norm is not None and not (max_grad_norm > 0):
            raise ValueError(f"LayerwiseUpdates: max_grad_norm={max_grad_norm!r}; use a number > 0 or None.")
        self.max_grad_norm = max_grad_norm
        self._drivers: list[LayerwiseOptimizer] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the strategy shards or wraps anything: a refusal loses no work.
        if stage == "fit":
            self._check_supported(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = isinstance(trainer.strategy.model, DistributedDataParallel)
        wrapped = []
        for optimizer in trainer.strategy.optimizers:
            if not isinstance(optimizer, LayerwiseOptimizer):
                optimizer = LayerwiseOptimizer(optimizer, boundary="closure", max_grad_norm=self.max_grad_norm, ddp=ddp)
                self._drivers.append(optimizer)
            wrapped.append(optimizer)
        # Lightning's setter also rebuilds its LightningOptimizer wrappers around the drivers.
        trainer.strategy.optimizers = wrapped

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._drivers:
            return
        for driver in self._drivers:
            driver.remove_hooks()  # a backward after fit must not update the weights
        trainer.strategy.optimizers = [
            o.optimizer if any(o is d for d in self._drivers) else o for o in trainer.strategy.optimizers
        ]
        self._drivers = []

    @staticmethod
    def _check_supported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "LayerwiseUpdates works with automatic optimization; with manual optimization wrap your "
                "optimizer yourself: lightning_memopt.optim.LayerwiseOptimizer(optimizer), then call "
                "self.manual_backward(loss) as usual (the weights are updated inside it)."
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"LayerwiseUpdates: Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips by the global "
                "norm of all gradients, but layer-wise updates free each gradient as soon as its parameter is "
                "updated, so that norm never exists. Remove gradient_clip_val and use per-parameter clipping: "
                "LayerwiseUpdates(max_grad_norm=...)."
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"LayerwiseUpdates: precision={trainer.precision!r} uses a gradient scaler, which must unscale "
                "all gradients before the step; layer-wise updates have no such moment. Use "
                "precision='bf16-mixed' (no scaler) or 32."
            )
        refuse_sharding_strategies(
            "LayerwiseUpdates",
            trainer,
            "it owns the gradients (sharded or fused), so per-parameter hooks cannot update the weights there",
        )
