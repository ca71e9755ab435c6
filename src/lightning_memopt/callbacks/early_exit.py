"""``EarlyExit``: train early-exit heads (LayerSkip, EE-LLM) in Lightning, as a callback.

The callback attaches exits after the chosen decoder blocks with the core's
:func:`~lightning_memopt.layers.add_early_exits`, right after the LightningModule builds its
model in ``configure_model`` and before ``configure_optimizers``: own exit heads
(``share_head=False``) are then trained by the optimizer, and a checkpoint (``ckpt_path=...``)
is restored into the model with its exits. With :class:`~lightning_memopt.models.CausalLM`
nothing else changes:

- **Loss.** The exits' cross-entropies are added to the training loss through
  ``CausalLM.loss_terms``, weighted relative to the final loss: ``final + sum_k (w_k / w_final)
  * exit_k``, the weighted sum of :func:`~lightning_memopt.layers.early_exit_loss` divided by
  the final loss's weight ``w_final`` (the same objective, scaled). ``train/loss`` stays the
  final layer's loss, comparable with runs without exits.
- **Logged** every step: ``train/exit_<layer>_loss`` for each exit that trained at that step
  (a curriculum may switch some off). At the end of each validation: ``val/exit_<layer>_loss`` and
  ``val/exit_<layer>_ppl``; ``val/loss`` and ``val/ppl`` stay the final layer's.
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
``configure_model``, its batches are dicts with ``input_ids`` (and optional ``labels``), and
it has a ``loss_terms`` dict like ``CausalLM``'s.

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
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..layers.early_exit import CURRICULA, EarlyExits, add_early_exits, get_early_exits
from .model_surgery import remove_model_surgery, run_after_configure_model
from .strategy_support import refuse_sharding_strategies

_LOSS_TERM = "early_exit"
# Strategies that shard the parameters: the exit heads run outside the root forward, unsharded.


class EarlyExit(Callback):
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
                "exits' losses are added to the final loss (train/loss), so its weight must be > 0. Give one weight "
                "per exit (the final loss weighs 1)."
            )
        if curriculum not in CURRICULA:
            raise ValueError(f"EarlyExit: curriculum={curriculum!r}; use one of {list(CURRICULA)}.")
        self.loss_weights = loss_weights if isinstance(loss_weights, str) else [float(w) for w in loss_weights]
        self.share_head = share_head
        self.layerskip_scale = layerskip_scale
        self.curriculum = curriculum
        self.curriculum_steps = curriculum_steps
        self.checkpoint_heads = checkpoint_heads
        self._wrapped: pl.LightningModule | None = None
        self._labels: torch.Tensor | None = None
        self._val_sums: dict[int, float] = {}
        self._val_batches = 0

    # -- attaching ---------------------------------------------------------------------------------

    @staticmethod
    def _network(pl_module: pl.LightningModule) -> nn.Module | None:
        return getattr(pl_module, "model", None)

    def _attach(self, pl_module: pl.LightningModule) -> EarlyExits:
        network = self._network(pl_module)
        if network is None:
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
            return exits  # a second fit (or validate) on the same model
        return add_early_exits(
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
        network = self._network(pl_module)
        return get_early_exits(network) if network is not None else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharding_strategies(
            "EarlyExit",
            trainer,
            "it shards the LM head and final norm, which the exits call outside the model's forward",
        )
        terms = getattr(pl_module, "loss_terms", None)
        if stage == "fit" and not isinstance(terms, dict):
            raise TypeError(
                f"EarlyExit adds the exits' losses through a `loss_terms` dict, which {type(pl_module).__name__} "
                "lacks (lightning_memopt.models.CausalLM has one). Train with "
                "lightning_memopt.layers.early_exit_loss(self.model, input_ids).loss in your training_step instead."
            )
        if isinstance(terms, dict):
            terms[_LOSS_TERM] = lambda: self._loss_term(pl_module)
        if self._network(pl_module) is not None:
            self._attach(pl_module)
            return
        # The model is built in configure_model, which Lightning calls right after this hook and
        # before configure_optimizers and checkpoint restoring: attach the exits at the end of it.
        run_after_configure_model(pl_module, lambda: self._attach(pl_module))
        self._wrapped = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            remove_model_surgery(self._wrapped)
            self._wrapped = None
        terms = getattr(pl_module, "loss_terms", None)
        if isinstance(terms, dict):
            terms.pop(_LOSS_TERM, None)
        exits = self._exits(pl_module)
        if exits is not None:
            exits.stop_capture()

    # -- training ----------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        exits = self._exits(pl_module)
        if exits is not None:
            self._labels = _labels(batch)
            exits.start_capture()

    def _loss_term(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """The exits' share of the training loss, from the hidden states of this step's forward."""
        exits = self._exits(pl_module)
        hidden = exits.stop_capture() if exits is not None else {}
        if exits is None or self._labels is None or not hidden:
            raise RuntimeError(
                "EarlyExit: no hidden states were captured in this training step: the loss term must be called "
                "after the model's forward in training_step (CausalLM does)."
            )
        active = exits.active_exits(pl_module.global_step)
        weights = exits.weights(active)
        losses = exits.exit_losses(hidden, self._labels, active)
        self._labels = None
        term = sum(weights[layer] / weights["final"] * loss for layer, loss in losses.items())
        for layer, loss in losses.items():
            pl_module.log(f"train/exit_{layer}_loss", loss.detach(), on_step=True, on_epoch=False)
        if isinstance(term, torch.Tensor):
            return term
        return torch.zeros((), device=self._device(pl_module))  # the curriculum switched every exit off

    @staticmethod
    def _device(pl_module: pl.LightningModule) -> torch.device:
        return next(pl_module.parameters()).device

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        exits = self._exits(pl_module)
        if exits is not None:
            exits.stop_capture()  # the step was skipped (or the term never ran): keep nothing
        self._labels = None

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
