"""``EarlyExit``: train early-exit heads (LayerSkip, EE-LLM) in Lightning, as a callback.

The callback attaches exits after the chosen decoder blocks with the core's
:func:`~lightning_memopt.layers.add_early_exits`, right after the LightningModule builds its
model in ``configure_model`` and before ``configure_optimizers``: own exit heads
(``share_head=False``) are then trained by the optimizer, and a checkpoint (``ckpt_path=...``)
is restored into the model with its exits. With :class:`~lightning_memopt.models.CausalLM`
nothing else changes:

- **Loss.** ``add_early_exits`` makes the model's own ``forward`` return the early-exit
  objective in training mode (the same value as :func:`~lightning_memopt.layers.early_exit_loss`,
  ``w_final * final + sum_k w_k * exit_k``), so ``CausalLM`` trains it with no change and the
  stock HF ``Trainer`` would too; the callback tells it the optimizer step (for the curriculum).
  ``train/loss`` stays the final layer's loss, comparable with runs without exits.
- **Logged** every step: ``train/exit_<layer>_loss`` for each exit that trained at that step
  (a curriculum may switch some off): the parts the objective records. At the end of each
  validation: ``val/exit_<layer>_loss`` and ``val/exit_<layer>_ppl``;
  ``val/loss`` and ``val/ppl`` stay the final layer's.
- **Memory.** Exit logits are built one exit at a time and recomputed in backward
  (``checkpoint_heads=True``), so the peak holds one ``batch x seq x vocab`` logits tensor
  for the exits, not one per exit.

Single device and DDP; sharding strategies (``apollo_fsdp``, FSDP, DeepSpeed) are refused, since
the exits call the sharded LM head outside the model's forward.

Exit layers are 0-based block indices (``model.model.layers[i]``), the last block excluded.
After ``fit`` the exits stay on the model: use :func:`~lightning_memopt.layers.early_exit_forward`
or :func:`~lightning_memopt.layers.early_exit_generate` on ``lm.model`` to infer with them.
A checkpoint of a run with ``share_head=False`` holds the exit heads
(``model.early_exit_heads.*``): load it into a model with the same exits.

Another LightningModule works if its network is ``pl_module.model``, is built in (or before)
``configure_model``, its batches are dicts with ``input_ids`` (and optional ``labels``), and its
``training_step`` trains ``self.model(input_ids=..., labels=...).loss`` (a module that does not
is refused at its first step).

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import EarlyExit
    >>> trainer = L.Trainer(callbacks=[EarlyExit(exit_layers=[1, 2])], accelerator="cpu", logger=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from ..layers.early_exit import CURRICULA, EarlyExits, add_early_exits, get_early_exits
from .model_surgery import ModelSurgery
from .strategy_support import refuse_sharding_strategies


class EarlyExit(ModelSurgery):
    """Attach early exits to the model and train them with the final loss.

    Args:
        exit_layers: increasing 0-based block indices, the last block excluded (e.g. ``[1, 2]``
            on a 4-block model).
        loss_weights: ``"layerskip"`` (LayerSkip's scale, growing with depth) or one weight per
            exit (final loss weighs 1), or one per exit plus the final's.
        share_head: ``True``: the exits use the model's final norm and LM head (no new
            parameters); ``False``: each exit gets its own copy, trained too.
        layerskip_scale: LayerSkip's ``e_scale``.
        curriculum: ``None``, ``"rotational"`` or ``"gradual"`` (LayerSkip's curricula, by
            optimizer step; see :meth:`~lightning_memopt.layers.EarlyExits.active_exits`).
        curriculum_steps: the rotation period, or the steps between two exits switching on.
        checkpoint_heads: recompute exit logits in backward instead of keeping them.

    Raises:
        ValueError: for exit layers that are not increasing distinct ints >= 0, weights of the
            wrong length, an unknown curriculum; at setup, for exit layers outside the model.

    Example:
        >>> import lightning as L
        >>> cb = EarlyExit(exit_layers=[1], loss_weights=[0.5], share_head=False)
        >>> trainer = L.Trainer(callbacks=[cb], accelerator="cpu", logger=False)
    """

    loss_parts = ("exit_",)

    def __init__(
        self,
        exit_layers: list[int],
        loss_weights: str | list[float] = "layerskip",
        share_head: bool = True,
        layerskip_scale: float = 1.0,
        curriculum: str | None = None,
        curriculum_steps: int = 1,
        checkpoint_heads: bool = True,
    ) -> None:
        super().__init__()
        self.exit_layers = _check_layers(exit_layers)
        if isinstance(loss_weights, str):
            if loss_weights != "layerskip":
                raise ValueError(f"EarlyExit: loss_weights={loss_weights!r}; use 'layerskip' or a list of numbers.")
        elif len(loss_weights) not in (len(self.exit_layers), len(self.exit_layers) + 1):
            n = len(self.exit_layers)
            raise ValueError(
                f"EarlyExit: loss_weights={list(loss_weights)} has {len(loss_weights)} values for {n} exits "
                f"{self.exit_layers}; give {n} (one per exit; the final loss weighs 1) or {n + 1} (the last for "
                "the final loss)."
            )
        elif len(loss_weights) > len(self.exit_layers) and not loss_weights[-1] > 0:
            raise ValueError(
                f"EarlyExit: loss_weights={list(loss_weights)} gives the final loss weight {loss_weights[-1]}; the "
                "final layer (train/loss) would then not train, so its weight must be > 0. Give one weight per exit "
                "(the final loss weighs 1)."
            )
        if curriculum not in CURRICULA:
            raise ValueError(f"EarlyExit: curriculum={curriculum!r}; use one of {list(CURRICULA)}.")
        self.loss_weights = loss_weights if isinstance(loss_weights, str) else [float(w) for w in loss_weights]
        self.share_head = share_head
        self.layerskip_scale = layerskip_scale
        self.curriculum = curriculum
        self.curriculum_steps = curriculum_steps
        self.checkpoint_heads = checkpoint_heads
        self._val_sums: dict[int, float] = {}
        self._val_batches = 0

    # -- attaching ---------------------------------------------------------------------------------

    def check_strategy(self, trainer: pl.Trainer) -> None:
        refuse_sharding_strategies(
            "EarlyExit",
            trainer,
            "it shards the LM head and final norm, which the exits call outside the model's forward",
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_strategy(trainer)  # first: the strategy is the first thing a user must change
        if stage == "fit" and not hasattr(pl_module, "model"):
            raise TypeError(
                f"EarlyExit attaches exits to the network in `pl_module.model`, which {type(pl_module).__name__} "
                "lacks, and trains them through its own loss: build it in configure_model and train "
                "`self.model(input_ids=..., labels=...).loss` (lightning_memopt.models.CausalLM does)."
            )
        super().setup(trainer, pl_module, stage)

    def apply(self, pl_module: pl.LightningModule) -> None:
        """Attach the exits to ``pl_module.model`` (a model that already has the same exits, from
        a second fit, is left as it is)."""
        network = self.network(pl_module)
        if network is None or network is pl_module:
            raise RuntimeError(
                f"EarlyExit: {type(pl_module).__name__}.model is still None after configure_model(); the callback "
                "attaches exits to the network in `pl_module.model`."
            )
        exits = get_early_exits(network)
        if exits is not None:
            if list(exits.exit_layers) != self.exit_layers or exits.shared != self.share_head:
                raise ValueError(
                    f"EarlyExit(exit_layers={self.exit_layers}, share_head={self.share_head}): the model already has "
                    f"exits at {list(exits.exit_layers)} (share_head={exits.shared}); remove them with "
                    "lightning_memopt.layers.remove_early_exits(model) or use the same settings."
                )
            return
        add_early_exits(
            network,
            self.exit_layers,
            share_head=self.share_head,
            loss_weights=self.loss_weights,
            layerskip_scale=self.layerskip_scale,
            curriculum=self.curriculum,
            curriculum_steps=self.curriculum_steps,
            checkpoint_heads=self.checkpoint_heads,
        )

    def _exits(self, pl_module: pl.LightningModule) -> EarlyExits | None:
        network = self.network(pl_module)
        return get_early_exits(network) if network is not None else None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        exits = self._exits(pl_module)
        if exits is not None:
            exits.stop_capture()

    @staticmethod
    def _device(pl_module: pl.LightningModule) -> torch.device:
        return next(pl_module.parameters()).device

    # -- validation --------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_sums, self._val_batches = {}, 0

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        exits = self._exits(pl_module)
        if exits is not None:
            exits.start_capture()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        exits = self._exits(pl_module)
        if exits is None:
            return
        hidden = exits.stop_capture()
        if not hidden:
            return
        with torch.no_grad():
            losses = exits.exit_losses(hidden, _labels(batch))
        for layer, loss in losses.items():
            self._val_sums[layer] = self._val_sums.get(layer, 0.0) + float(loss)
        self._val_batches += 1

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._val_batches or trainer.sanity_checking:
            return
        device = self._device(pl_module)
        for layer, total in sorted(self._val_sums.items()):
            loss = torch.tensor(total / self._val_batches, device=device)
            pl_module.log(f"val/exit_{layer}_loss", loss, sync_dist=True)
            pl_module.log(f"val/exit_{layer}_ppl", torch.exp(loss.clamp(max=50)), sync_dist=True)

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"exit_layers": list(self.exit_layers), "share_head": self.share_head}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (list(state_dict.get("exit_layers", self.exit_layers)), state_dict.get("share_head", self.share_head))
        if saved != (self.exit_layers, self.share_head):
            raise ValueError(
                f"EarlyExit: the checkpoint was trained with exit_layers={saved[0]}, share_head={saved[1]}, this "
                f"callback has exit_layers={self.exit_layers}, share_head={self.share_head}; resume with the same "
                "settings."
            )


def _labels(batch: Any) -> torch.Tensor:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError(
            f"EarlyExit expects dict batches with 'input_ids' (and optional 'labels'), got {type(batch).__name__}."
        )
    labels = batch.get("labels")
    return batch["input_ids"] if labels is None else labels


def _check_layers(exit_layers: Sequence[int]) -> list[int]:
    layers = list(exit_layers)
    if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
        raise ValueError(
            f"EarlyExit: exit_layers={layers}; give one or more 0-based block indices (ints >= 0), e.g. [1, 2]."
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"EarlyExit: exit_layers={layers} repeats a layer; list each once: {sorted(set(layers))}.")
    if layers != sorted(layers):
        raise ValueError(f"EarlyExit: exit_layers={layers} must be in increasing order; write {sorted(layers)}.")
    return layers
