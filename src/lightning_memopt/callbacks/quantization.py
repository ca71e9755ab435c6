"""``Int8Weights``: train a LightningModule's linear weights in INT8 with stochastic rounding.

The callback converts the selected ``nn.Linear`` weights to
:class:`lightning_memopt.quant.Int8Weight` (1 byte per weight plus one fp32 scale per group)
after the model exists and before ``configure_optimizers`` runs, so the optimizer holds the
INT8 weights. Lightning's order in ``fit`` is: callbacks' ``setup``, the module's
``configure_model``, restoring a checkpoint's weights, then the strategy's setup (which calls
``configure_optimizers``). So in ``setup`` the callback wraps the module's ``configure_model``
(for this instance only, undone in ``teardown``): the model is built as usual, then converted.
A module that builds its layers in ``__init__`` is converted at the same moment.

- **Optimizers**: any torch optimizer, :class:`~lightning_memopt.optim.APOLLO` / APOLLO-Mini, and
  :class:`~lightning_memopt.callbacks.LayerwiseUpdates` work unchanged: each in-place update of
  a weight is requantized with stochastic rounding.
- **Checkpoints** hold the INT8 data, the scales and the rounding state (1 byte per weight on
  disk too); resuming with the callback continues exactly, and ``torch.load(...,
  weights_only=True)`` loads them once ``lightning_memopt`` is imported.
- **Strategies**: one device only (``strategy="auto"`` with ``devices=1``). Refused, with a
  message: FSDP / FSDP2 / ``apollo_fsdp`` / DeepSpeed (they shard or flatten the weights, which
  the INT8 tensor does not support), and DDP (untested: its parameter broadcast and gradient
  buckets are not checked with INT8 weights).

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import Int8Weights
    >>> trainer = L.Trainer(callbacks=[Int8Weights(group_size=128)], accelerator="cpu", logger=False)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..optim.param_groups import TargetModules
from ..quant import DEFAULT_GROUP_SIZE, quantize_linear_weights
from ..quant.int8 import check_group_size
from .model_surgery import ModelSurgery
from .strategy_support import require_single_device


class Int8Weights(ModelSurgery):
    """Store and train the model's linear weights as INT8 with stochastic rounding (no fp32 copy).

    Args:
        target_modules: which ``nn.Linear`` layers, as in
            :func:`~lightning_memopt.optim.select_low_rank_modules`: ``None`` (default) for the
            linear layers of the repeated blocks (a transformer's attention and MLP; embeddings
            and the LM head stay in float), ``"all-linear"``, a regex, or a list of names.
        group_size: input features that share one fp32 scale (default 128: about 1.03 bytes
            per weight instead of 4).
        seed: base seed of the stochastic rounding; ``None``: ``torch.initial_seed()`` (what
            ``seed_everything`` sets).

    Raises:
        ValueError: for a bad ``group_size`` (at construction), a strategy other than a single
            device (at ``setup``), or ``target_modules`` that select nothing or a non-linear
            module (when the model is built).

    Example:
        >>> import lightning as L
        >>> from lightning_memopt.callbacks import LayerwiseUpdates
        >>> trainer = L.Trainer(callbacks=[Int8Weights(), LayerwiseUpdates()], accelerator="cpu", logger=False)
    """

    def __init__(
        self, target_modules: TargetModules = None, group_size: int = DEFAULT_GROUP_SIZE, seed: int | None = None
    ) -> None:
        super().__init__()
        self.target_modules = target_modules
        self.group_size = check_group_size(group_size)
        self.seed = seed
        #: Names of the modules converted in the last ``fit`` / ``validate`` / ...
        self.converted: list[str] = []

    def check_strategy(self, trainer: pl.Trainer) -> None:
        require_single_device(
            "Int8Weights",
            trainer,
            "FSDP, FSDP2 (apollo_fsdp) and DeepSpeed shard or flatten the weights, which the INT8 tensor does not "
            "support, and DDP is untested with it",
        )

    def apply(self, pl_module: pl.LightningModule) -> None:
        """Convert the selected linear weights of the whole module (its network included)."""
        self.converted = quantize_linear_weights(pl_module, self.target_modules, self.group_size, self.seed)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: the weights carry their scales and rounding state themselves."""
        return {}
