"""``UpcycleToMoE``: sparse upcycling to a mixture of experts in Lightning, as a callback.

The callback turns the MLPs of the model's transformer blocks into
:class:`~lightning_memopt.layers.MoELayer` s whose experts are copies of the dense MLP (the
core's :func:`~lightning_memopt.layers.upcycle_to_moe`), right after the LightningModule
builds its model in ``configure_model`` and before ``configure_optimizers``, so the optimizer
holds the experts and routers, and a checkpoint (``ckpt_path=...``) is restored into the
upcycled model. With :class:`~lightning_memopt.models.CausalLM` nothing else changes:

- **Auxiliary losses.** ``upcycle_to_moe`` makes the model's own ``forward`` add
  ``aux_loss_weight * moe_aux_loss + z_loss_weight * moe_z_loss`` to its loss in training mode
  (as transformers' Mixtral adds its router loss), so ``CausalLM`` trains with them unchanged;
  ``train/loss`` stays the language-model loss.
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
and it either trains ``self.model(input_ids=..., labels=...).loss`` like ``CausalLM`` or adds
``moe_aux_loss`` itself (then pass ``aux_loss_weight=0, z_loss_weight=0``: the model's forward
is then left as it is).

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import UpcycleToMoE
    >>> trainer = L.Trainer(callbacks=[UpcycleToMoE(num_experts=4, top_k=2)], accelerator="cpu", logger=False)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..layers import (
    add_moe_loss,
    check_moe_routing,
    moe_aux_loss,
    moe_expert_loads,
    moe_layers,
    moe_z_loss,
    remove_moe_loss,
    set_moe_modality,
    upcycle_to_moe,
)
from .model_surgery import ModelSurgery


class UpcycleToMoE(ModelSurgery):
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

    loss_parts = ("moe_",)
    progress_bar_parts = ("moe_aux_loss",)

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
        super().__init__()
        if aux_loss_weight < 0 or z_loss_weight < 0:
            raise ValueError(
                f"UpcycleToMoE: aux_loss_weight={aux_loss_weight} and z_loss_weight={z_loss_weight} must be >= 0 "
                "(0 turns a loss off)."
            )
        # Checked here, before any data is prepared, with the core's messages.
        check_moe_routing(num_experts, top_k, modality_groups)
        self.num_experts = num_experts
        self.top_k = top_k
        self.layers = list(layers) if layers is not None else None
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.modality_groups = list(modality_groups) if modality_groups is not None else None
        self.capacity_factor = capacity_factor
        self.router_init_std = router_init_std
        self.log_expert_loads = log_expert_loads

    # -- upcycling ---------------------------------------------------------------------------------

    @property
    def _adds_losses(self) -> bool:
        return bool(self.aux_loss_weight or self.z_loss_weight)

    def apply(self, pl_module: pl.LightningModule) -> None:
        """Upcycle the network (one already upcycled, by a second fit or saved that way, keeps its
        layers) and set the auxiliary losses' weights in its training objective."""
        network = self.network(pl_module)
        if network is None:
            return  # not built: nothing to upcycle
        if not moe_layers(network):
            upcycle_to_moe(
                network,
                num_experts=self.num_experts,
                top_k=self.top_k,
                layers=self.layers,
                modality_groups=self.modality_groups,
                router_init_std=self.router_init_std,
                capacity_factor=self.capacity_factor,
                aux_loss_weight=self.aux_loss_weight,
                z_loss_weight=self.z_loss_weight,
            )
        if self._adds_losses:
            add_moe_loss(network, self.aux_loss_weight, self.z_loss_weight)
        else:
            remove_moe_loss(network)  # the module adds the losses itself: its forward stays plain

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
        set_moe_modality(self.network(pl_module), ids)

    def _clear_modality(self, pl_module: pl.LightningModule) -> None:
        if self.modality_groups is not None:
            set_moe_modality(self.network(pl_module), None)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
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

    # -- logging ---------------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._clear_modality(pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # moe_aux_loss, moe_z_loss
        network = self.network(pl_module)
        layers = moe_layers(network) if network is not None else []
        if not layers or layers[0][1].aux_loss is None:
            return
        log = dict(on_step=True, on_epoch=False)
        if not self._adds_losses:  # no term in the objective, hence no parts: read the layers
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
