"""``LayerMetricsCallback``: what the layers of :mod:`lightning_memopt.layers` and the INT8 weights
of :mod:`lightning_memopt.quant` report, in the HF Trainer's logs.

Example:
    >>> from lightning_memopt.hf import LayerMetricsCallback
    >>> callback = LayerMetricsCallback()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..layers import get_objective, last_loss_parts, moe_aux_loss, moe_expert_loads, moe_layers, moe_z_loss
from ..layers.objective import set_training_step
from ..quant import is_int8_weight
from .checks import check_trainer_setup


def _moe_metrics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The MoE metrics of the forward that just ran (empty without MoE layers)."""
    if not moe_layers(model):
        return {}
    metrics: dict[str, torch.Tensor] = {}
    try:
        metrics["moe_aux_loss"] = moe_aux_loss(model).detach()
        metrics["moe_z_loss"] = moe_z_loss(model).detach()
    except ValueError:  # no MoE layer ran in this forward (e.g. they sit in an unused branch)
        return {}
    loads = moe_expert_loads(model)
    if loads:
        metrics["moe_max_expert_load"] = torch.stack([load.max() for load in loads.values()]).max()
    return metrics


def int8_metrics(model: nn.Module) -> dict[str, float]:
    """Facts about the model's INT8 weights (empty when it has none).

    ``int8_weights``: number of INT8 matrices; ``int8_weight_mib``: their storage (int8 values
    and fp32 scales); ``int8_compression``: fp32 bytes of the same matrices over that storage;
    ``int8_requantizations``: stochastic requantizations per INT8 matrix so far (one per in-place
    optimizer op on it; it grows by the same amount every step while they train).

    Example:
        >>> from lightning_memopt.quant import quantize_linear_weights
        >>> model = nn.Sequential(nn.Linear(256, 256))
        >>> _ = quantize_linear_weights(model, "all-linear", group_size=128)
        >>> round(int8_metrics(model)["int8_compression"], 2)  # fp32 bytes / (1 + 4 / 128)
        3.88
    """
    weights = {id(p): p for p in model.parameters() if is_int8_weight(p)}.values()
    if not weights:
        return {}
    stored = sum(w.int8_data.numel() * w.int8_data.element_size() + w.scales.numel() * 4 for w in weights)
    fp32 = sum(w.numel() * 4 for w in weights)
    return {
        "int8_weights": float(len(weights)),
        "int8_weight_mib": stored / 2**20,
        "int8_compression": fp32 / stored,
        "int8_requantizations": sum(w._rounding[1] for w in weights) / len(weights),
    }


class LayerMetricsCallback(TrainerCallback):
    """Adds what the model's layers report to the HF Trainer's logs, at the logging interval.

    - the parts of the training objective that model surgery installs (see
      :mod:`lightning_memopt.layers.objective`: ``exit_<layer>_loss`` after
      :func:`~lightning_memopt.layers.add_early_exits`),
    - MoE metrics after :func:`~lightning_memopt.layers.upcycle_to_moe`: ``moe_aux_loss``,
      ``moe_z_loss`` (averaged over the MoE layers) and ``moe_max_expert_load`` (the largest
      share of routing choices any expert got),
    - INT8 facts after :func:`~lightning_memopt.quant.quantize_linear_weights`: see
      :func:`int8_metrics`.

    The per-forward values are read after every training forward (every micro-batch, through a
    forward hook on the model) and averaged over the logging interval, as the Trainer averages
    its ``loss``; under several processes the averages are all-reduced. The INT8 facts are the
    state at logging time. They go into the ``logs`` dict (so the callbacks after this one,
    e.g. a ``report_to`` integration added later, see them) and into ``state.log_history``.
    The reporting integrations of ``report_to`` run before user callbacks: to have them log
    these metrics too, put this callback first:
    ``trainer.callback_handler.callbacks.insert(0, LayerMetricsCallback())``.

    At each step's start it tells the loss terms the optimizer step
    (:func:`~lightning_memopt.layers.objective.set_training_step`). When the Trainer is created,
    :func:`~lightning_memopt.hf.check_trainer_setup` refuses the combinations that cannot work
    (INT8 weights or the chunked loss with FSDP / DeepSpeed).

    Args:
        int8: add the INT8 facts.

    Example:
        >>> from transformers import Trainer
        >>> callback = LayerMetricsCallback()
        >>> # Trainer(model, args, train_dataset=..., callbacks=[callback]).train()
        >>> # trainer.state.log_history[-2]["moe_aux_loss"]
    """

    def __init__(self, int8: bool = True) -> None:
        self.int8 = int8
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._model: nn.Module | None = None
        self._objective_owners: list[nn.Module] = []
        self._handle: Any = None

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation and generation are not training metrics
        values: dict[str, torch.Tensor] = {}
        for owner in self._objective_owners:
            values.update(last_loss_parts(owner))
        values.update(_moe_metrics(module))
        for key, value in values.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._counts[key] = self._counts.get(key, 0) + 1

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        # At Trainer(...) time: a combination that cannot work fails before any training.
        if model is not None:
            check_trainer_setup(model, args)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        self._remove_hook()
        self._sums, self._counts = {}, {}
        if model is not None:
            self._model = model
            # The objective may sit on a wrapped model (peft's PeftModel holds the HF model).
            self._objective_owners = [m for m in model.modules() if get_objective(m) is not None]
            self._handle = model.register_forward_hook(self._record)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        # Loss terms with a schedule (an exit curriculum) learn the optimizer step here.
        if model is not None and self._objective_owners:
            set_training_step(model, state.global_step)

    def _averages(self) -> dict[str, float]:
        keys = sorted(self._sums)
        if not keys:
            return {}
        sums = torch.stack([self._sums[k].reshape(()) for k in keys])
        counts = torch.tensor([float(self._counts[k]) for k in keys], device=sums.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank runs the same model and forwards, hence the same keys.
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        return dict(zip(keys, (sums / counts).tolist()))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs:
            return  # only the training logs (not eval_*, not the final train_* summary)
        metrics = self._averages()
        self._sums, self._counts = {}, {}
        if self.int8 and self._model is not None:
            metrics.update(int8_metrics(self._model))
        if not metrics:
            return
        logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._remove_hook()
