"""Layer-wise (in-backward) updates under ``transformers.Trainer``: ``optim="apollo_layerwise"``.

The work is done by the core driver, :class:`lightning_memopt.optim.LayerwiseOptimizer`; this
module only fits it to the Trainer:

- **Gradient accumulation.** The driver asks, at the first gradient of every backward pass,
  whether this backward ends an accumulation window. The Trainer answers through
  accelerate's ``GradientState.sync_gradients``, which it sets before every micro-batch
  (also for the shorter last window of an epoch), so the weights are updated during the
  backward of the last micro-batch and gradients accumulate in ``.grad`` before it.
- **DDP.** Detected by the driver (``torch.distributed`` with more than one process): the
  weights are updated after DDP's all-reduce, still inside ``backward()``.
- **LR scheduler.** The Trainer's ``optimizer.step()`` becomes a no-op (the update already
  happened inside backward) and its scheduler steps once per optimizer step as usual, on the
  inner optimizer's param groups: the same learning rates, step for step, as without
  layer-wise updates.
- **Checkpoints.** ``state_dict()`` is the inner optimizer's (tensors only), so ``optimizer.pt``
  loads with ``weights_only=True`` and is interchangeable with the non-layer-wise run's.
- **max_grad_norm.** The Trainer clips by the global norm of all gradients, which never
  exists in layer-wise mode; so a ``max_grad_norm > 0`` (the ``TrainingArguments`` default is
  1.0) is refused with a message. Set ``max_grad_norm=0``, or ask for per-parameter clipping
  with ``optim_args="layerwise_max_grad_norm=1.0"`` (each weight's gradient is clipped to that
  norm on its own).
- **Refused:** ``fp16`` (the loss scaler must unscale all gradients before the step; use
  ``bf16``), FSDP and DeepSpeed (they own the gradients; use the non-layer-wise names).

Example:
    >>> import lightning_memopt
    >>> from transformers import TrainingArguments
    >>> args = TrainingArguments("out", optim="apollo_layerwise", max_grad_norm=0.0,
    ...                          gradient_accumulation_steps=4, report_to=[])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..optim import LayerwiseOptimizer, OptimizerSpec

# optim_args keys that configure the layer-wise driver, not the optimizer.
LAYERWISE_OPTIONS = {"layerwise_max_grad_norm": float}


class SyncGradients:
    """The Trainer's accumulation boundary: accelerate's ``GradientState().sync_gradients``.

    accelerate's ``GradientState`` is a process-wide shared state; the Trainer sets
    ``sync_gradients`` before every micro-batch (``True`` on the last one of a window).
    Outside a Trainer it is ``True``, i.e. every backward pass updates the weights.

    Example:
        >>> SyncGradients()()
        True
    """

    def __call__(self) -> bool:
        from accelerate.state import GradientState

        return bool(GradientState().sync_gradients)

    def __repr__(self) -> str:
        return "SyncGradients()"


class TrainerLayerwiseOptimizer(LayerwiseOptimizer):
    """:class:`~lightning_memopt.optim.LayerwiseOptimizer` that the Trainer can build from ``(params, **kwargs)``.

    ``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` instantiates ``cls(params, **kwargs)``;
    this class builds the inner optimizer ``optimizer_cls(params, **optimizer_kwargs)`` and
    wraps it, with the Trainer's accumulation boundary (:class:`SyncGradients`).

    Args:
        params: param groups of the inner optimizer.
        optimizer_cls: the inner optimizer class (``APOLLO``, ``APOLLOMini``...).
        max_grad_norm: per-parameter clipping (see ``LayerwiseOptimizer``), or ``None``.
        optimizer_kwargs: the inner optimizer's options (``lr``, ``rank``...).

    Example:
        >>> from lightning_memopt.optim import APOLLO
        >>> model = torch.nn.Linear(8, 8)
        >>> opt = TrainerLayerwiseOptimizer([model.weight, model.bias], optimizer_cls=APOLLO, lr=1e-3, rank=2)
        >>> type(opt.optimizer).__name__, opt.param_groups[0]["lr"]
        ('APOLLO', 0.001)
    """

    def __init__(
        self,
        params: Any,
        *,
        optimizer_cls: type[torch.optim.Optimizer],
        max_grad_norm: float | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        super().__init__(
            optimizer_cls(params, **optimizer_kwargs), boundary=SyncGradients(), max_grad_norm=max_grad_norm
        )


def split_layerwise_options(
    options: str | Mapping[str, Any] | None,
) -> tuple[str | dict[str, Any] | None, dict[str, Any]]:
    """Separate the driver's keys (``layerwise_max_grad_norm``) from the optimizer's options.

    Example:
        >>> split_layerwise_options("rank=4, layerwise_max_grad_norm=1.0")
        ('rank=4', {'layerwise_max_grad_norm': 1.0})
    """
    if options is None or options == "":
        return options, {}
    if isinstance(options, str):
        rest, found = [], {}
        for item in options.split(","):
            key = item.split("=", 1)[0].strip()
            if key in LAYERWISE_OPTIONS and "=" in item:
                found[key] = _typed(key, item.split("=", 1)[1])
            elif item.strip():
                rest.append(item.strip())
        return ",".join(rest), found
    rest_map = {k: v for k, v in options.items() if k not in LAYERWISE_OPTIONS}
    return rest_map, {k: _typed(k, v) for k, v in options.items() if k in LAYERWISE_OPTIONS}


def _typed(key: str, raw: Any) -> Any:
    try:
        value = LAYERWISE_OPTIONS[key](raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise ValueError(f"option {key}={raw!r} is not a valid number.") from None
    if not value > 0:
        raise ValueError(f"option {key}={raw!r}: use a number > 0 (or leave it out for no clipping).")
    return value


def check_training_arguments(name: str, args: Any, layerwise_options: Mapping[str, Any]) -> None:
    """Refuse the ``TrainingArguments`` that layer-wise updates cannot honour, saying what to do.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(max_grad_norm=1.0, fp16=False, fsdp=[], deepspeed=None)
        >>> check_training_arguments("apollo_layerwise", args, {})
        Traceback (most recent call last):
        ...
        ValueError: optim='apollo_layerwise' updates each weight inside backward, ...
    """
    max_grad_norm = getattr(args, "max_grad_norm", 0.0) or 0.0
    if max_grad_norm > 0 and "layerwise_max_grad_norm" not in layerwise_options:
        raise ValueError(
            f"optim={name!r} updates each weight inside backward, as soon as its gradient is ready, so the "
            f"Trainer's gradient clipping (max_grad_norm={max_grad_norm}; 1.0 is the TrainingArguments default) "
            "cannot run: it needs the global norm of all gradients, which never exist at the same time. Set "
            "max_grad_norm=0 to train without clipping, or add 'layerwise_max_grad_norm=1.0' to optim_args to clip "
            "each weight's gradient on its own (per-parameter clipping), or use optim="
            f"{name.removesuffix('_layerwise')!r} for global clipping."
        )
    if getattr(args, "fp16", False):
        raise ValueError(
            f"optim={name!r} cannot run with fp16=True: the loss scaler unscales all gradients before one "
            "optimizer step, but layer-wise updates step each weight inside backward. Use bf16=True, or optim="
            f"{name.removesuffix('_layerwise')!r}."
        )
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        raise ValueError(
            f"optim={name!r} does not run under FSDP or DeepSpeed (they own the gradients and their reduction); "
            f"use optim={name.removesuffix('_layerwise')!r}, which works with both."
        )


def layerwise_optimizer_cls_and_kwargs(
    spec: OptimizerSpec,
    groups: list[dict[str, Any]],
    optimizer_kwargs: dict[str, Any],
    layerwise_options: Mapping[str, Any],
    *,
    args: Any,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``(TrainerLayerwiseOptimizer, kwargs)`` for a layer-wise name, after checking ``args``.

    Example:
        >>> from lightning_memopt.optim import get_optimizer_spec
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(max_grad_norm=0.0, fp16=False, fsdp=[], deepspeed=None)
        >>> model = torch.nn.Linear(4, 4)
        >>> cls, kw = layerwise_optimizer_cls_and_kwargs(
        ...     get_optimizer_spec("apollo_layerwise"), [{"params": list(model.parameters())}], {"lr": 1e-3}, {},
        ...     args=args)
        >>> cls.__name__, kw["optimizer_cls"].__name__
        ('TrainerLayerwiseOptimizer', 'APOLLO')
    """
    if args is None:
        raise ValueError(
            f"optimizer {spec.name!r}: pass args=<your TrainingArguments> so that the Trainer settings layer-wise "
            "updates depend on (max_grad_norm, fp16, FSDP) can be checked."
        )
    check_training_arguments(spec.name, args, layerwise_options)
    return TrainerLayerwiseOptimizer, {
        "params": groups,
        "optimizer_cls": spec.factory,
        "max_grad_norm": layerwise_options.get("layerwise_max_grad_norm"),
        **optimizer_kwargs,
    }
