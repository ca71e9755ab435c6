"""``UpcycleToMoE``: sparse upcycling to a mixture of experts in Lightning, as a callback.

The callback turns the MLPs of the model's transformer blocks into
:class:`~lightning_memopt.layers.MoELayer` s whose experts are copies of the dense MLP (the
core's :func:`~lightning_memopt.layers.upcycle_to_moe`), right after the LightningModule
builds its model in ``configure_model`` and before ``configure_optimizers``, so the optimizer
holds the experts and routers, and a checkpoint (``ckpt_path=...``) is restored into the
upcycled model. With :class:`~lightning_memopt.models.CausalLM` nothing else changes:

- **Auxiliary losses.** ``aux_loss_weight * moe_aux_loss + z_loss_weight * moe_z_loss`` is
  added to the training loss through ``CausalLM.loss_terms``; ``train/loss`` stays the
  language-model loss.
- **Logged** every step: ``train/moe_aux_loss`` (load balance, 1.0 = perfectly balanced),
  ``train/moe_z_loss``, ``train/moe_max_expert_load`` (the busiest expert's share of tokens
  times ``num_experts``, worst layer: 1.0 = balanced, ``num_experts`` = one expert takes all),
  ``train/moe_dropped_tokens`` with a ``capacity_factor``, and with ``log_expert_loads=True``
  every expert's share, ``train/moe_load/<layer>/<expert>``.
- **Modality groups** (MoMa): with ``modality_groups`` each batch must carry
  ``batch["modality_ids"]`` (per token ``(batch, seq)`` or per sequence ``(batch,)``); the
  callback hands them to the layers around each step. The embedded ``TextDataModule`` does
  not produce them: use your own data module, or the core's ``moe_modality`` in plain PyTorch.
- **APOLLO.** The experts' linear layers get the low-rank update, the routers (not
  ``nn.Linear``) stay full-rank with :func:`~lightning_memopt.optim.apollo_param_groups`'s
  default.

Another LightningModule works if its network is ``pl_module.model`` (or the module itself)
and it either has a ``loss_terms`` dict like ``CausalLM`` or adds ``moe_aux_loss`` itself
(then pass ``aux_loss_weight=0, z_loss_weight=0``).

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import UpcycleToMoE
    >>> trainer = L.Trainer(callbacks=[UpcycleToMoE(num_experts=4, top_k=2)], accelerator="cpu", logger=False)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..layers import moe_aux_loss, moe_expert_loads, moe_layers, moe_z_loss, set_moe_modality, upcycle_to_moe
from ..layers.moe import _check_routing
from .model_surgery import remove_model_surgery, run_after_configure_model

_LOSS_TERM = "moe_aux_loss"


class UpcycleToMoE(Callback):
    """Upcycle the model's MLPs to mixtures of experts and train with the load-balancing loss.

    Args:
        num_experts: experts per upcycled layer (copies of its dense MLP).
        top_k: experts per token.
        layers: indices of the blocks to upcycle (``None``: all), see
            :func:`~lightning_memopt.layers.upcycle_to_moe`.
        aux_loss_weight: weight of the load-balancing loss in the training loss (Switch and
            Mixtral use 0.01-0.02).
        z_loss_weight: weight of the router z-loss (ST-MoE: 0.001).
        modality_groups: expert counts per modality (e.g. ``[2, 2]``); batches must then carry
            ``modality_ids``.
        capacity_factor: per-expert token limit (``None``: unlimited), see
            :class:`~lightning_memopt.layers.MoELayer`.
        router_init_std: the routers' initialisation scale.
        log_expert_loads: also log every expert's share of tokens, per layer.

    Example:
        >>> import lightning as L
        >>> moe = UpcycleToMoE(num_experts=4, top_k=2, layers=[1, 3], aux_loss_weight=0.01)
        >>> trainer = L.Trainer(callbacks=[moe], accelerator="cpu", logger=False)
    """

    def __init__(
        self,
        num_experts: int = 8,
        top_k: int = 2,
        layers: list[int] | None = None,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        modality_groups: list[int] | None = None,
        capacity_factor: float | None = None,
        router_init_std: float = 0.02,
        log_expert_loads: bool = False,
    ) -> None:
        if aux_loss_weight < 0 or z_loss_weight < 0:
            raise ValueError(
                f"UpcycleToMoE: aux_loss_weight={aux_loss_weight} and z_loss_weight={z_loss_weight} must be >= 0 "
                "(0 turns a loss off)."
            )
        # Checked here, before any data is prepared, with the core's messages.
        _check_routing(num_experts, top_k, modality_groups)
        self.num_experts = num_experts
        self.top_k = top_k
        self.layers = list(layers) if layers is not None else None
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.modality_groups = list(modality_groups) if modality_groups is not None else None
        self.capacity_factor = capacity_factor
        self.router_init_std = router_init_std
        self.log_expert_loads = log_expert_loads
        self._wrapped: pl.LightningModule | None = None

    # -- upcycling ---------------------------------------------------------------------------------

    @staticmethod
    def _network(pl_module: pl.LightningModule) -> nn.Module | None:
        """The HF model to upcycle: ``pl_module.model`` when the module has one (``None`` while
        ``CausalLM`` has not built it yet), else the LightningModule itself."""
        if hasattr(pl_module, "model") and not isinstance(pl_module.model, nn.Module):
            return None
        return getattr(pl_module, "model", pl_module)

    def _upcycle(self, pl_module: pl.LightningModule) -> None:
        network = self._network(pl_module)
        if network is None or moe_layers(network):
            return  # not built yet, or already upcycled (a second fit, or a model saved upcycled)
        upcycle_to_moe(
            network,
            num_experts=self.num_experts,
            top_k=self.top_k,
            layers=self.layers,
            modality_groups=self.modality_groups,
            router_init_std=self.router_init_std,
            capacity_factor=self.capacity_factor,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.aux_loss_weight or self.z_loss_weight:
            terms = getattr(pl_module, "loss_terms", None)
            if not isinstance(terms, dict):
                raise TypeError(
                    f"UpcycleToMoE adds its auxiliary losses through a `loss_terms` dict, which "
                    f"{type(pl_module).__name__} lacks (lightning_memopt.models.CausalLM has one). Add "
                    "`w * lightning_memopt.layers.moe_aux_loss(self.model)` to your training loss yourself and "
                    "pass UpcycleToMoE(aux_loss_weight=0, z_loss_weight=0)."
                )
            terms[_LOSS_TERM] = lambda: self._loss_term(pl_module)
        if self._network(pl_module) is not None:
            self._upcycle(pl_module)
            return
        # The model is built in configure_model, which Lightning calls right after this hook and
        # before configure_optimizers and checkpoint restoring: upcycle at the end of it.
        run_after_configure_model(pl_module, lambda: self._upcycle(pl_module))
        self._wrapped = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            remove_model_surgery(self._wrapped)
            self._wrapped = None
        terms = getattr(pl_module, "loss_terms", None)
        if isinstance(terms, dict):
            terms.pop(_LOSS_TERM, None)

    def _loss_term(self, pl_module: pl.LightningModule) -> torch.Tensor:
        network = self._network(pl_module)
        loss = self.aux_loss_weight * moe_aux_loss(network)
        if self.z_loss_weight:
            loss = loss + self.z_loss_weight * moe_z_loss(network)
        return loss

    # -- modality ids ------------------------------------------------------------------------------

    def _set_modality(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self.modality_groups is None:
            return
        ids = batch.get("modality_ids") if isinstance(batch, dict) else None
        if ids is None:
            raise ValueError(
                f"UpcycleToMoE(modality_groups={self.modality_groups}) routes each token within its modality's "
                "experts, but the batch has no 'modality_ids' (per token (batch, seq) or per sequence (batch,)). "
                "Give your data module's batches one, or drop modality_groups."
            )
        set_moe_modality(self._network(pl_module), ids)

    def _clear_modality(self, pl_module: pl.LightningModule) -> None:
        if self.modality_groups is not None:
            set_moe_modality(self._network(pl_module), None)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set_modality(pl_module, batch)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._set_modality(pl_module, batch)

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._set_modality(pl_module, batch)

    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._set_modality(pl_module, batch)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._clear_modality(pl_module)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._clear_modality(pl_module)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._clear_modality(pl_module)

    # -- logging -----------------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._clear_modality(pl_module)
        network = self._network(pl_module)
        layers = moe_layers(network) if network is not None else []
        if not layers or layers[0][1].aux_loss is None:
            return
        log = dict(on_step=True, on_epoch=False)
        pl_module.log("train/moe_aux_loss", moe_aux_loss(network).detach(), prog_bar=True, **log)
        pl_module.log("train/moe_z_loss", moe_z_loss(network).detach(), **log)
        loads = moe_expert_loads(network)
        worst = max(float(share.max()) * share.numel() for share in loads.values())
        pl_module.log("train/moe_max_expert_load", worst, **log)
        if self.capacity_factor is not None:
            dropped = sum(int(layer.dropped_tokens) for _, layer in layers)
            pl_module.log("train/moe_dropped_tokens", float(dropped), **log)
        if self.log_expert_loads:
            for name, share in loads.items():
                for expert, value in enumerate(share.tolist()):
                    pl_module.log(f"train/moe_load/{name}/{expert}", value, **log)
