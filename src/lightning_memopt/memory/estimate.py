"""Memory of a training setup before it exists: a meta-device model and an optimizer name.

:func:`estimate` counts parameters and buffers exactly as :func:`breakdown` does (on the
meta device they take no memory), and derives gradients and optimizer state from the
optimizer's state layout, by arithmetic only: nothing is allocated and nothing is stepped.
Which layout an optimizer has is a fact of the registry
(:meth:`~lightning_memopt.optim.OptimizerSpec.layout`: declared with ``state_layout=`` or
implied by the optimizer class); this module only does the arithmetic of each layout.

State layouts (per trainable parameter, moments in the parameter's dtype unless
``state_dtype`` says otherwise):

- APOLLO / APOLLO-Mini, low-rank ``m x n`` matrix with ``r = min(rank, min(m, n))``:
  ``exp_avg`` and ``exp_avg_sq`` of ``r x max(m, n)`` each, plus three scalars: ``seed``
  (int64) and ``prev_update_norm`` (fp32), which are the ``+ 2`` of the paper's ``2nr + 2``
  (the random projection is regenerated from the seed; the norm-growth limiter keeps the last
  update norm), and ``step`` (fp32), which the paper leaves out for AdamW's ``2mn`` as well.
  With ``cache_projection=True`` the current projection (``r x min(m, n)``, the parameter's
  dtype) is held too, reported as ``projection_cache_bytes``. ``workspace_bytes`` (the scratch
  buffers a step keeps on the CPU) stays 0: nothing is stepped, and the workspace's size
  depends on how a step chunks the matrices, not on the state layout.
- AdamW (APOLLO's non-low-rank parameters, ``adamw``): ``exp_avg`` and ``exp_avg_sq`` like
  the parameter (and ``max_exp_avg_sq`` with ``amsgrad``), plus ``step`` (fp32).
- bitsandbytes 8-bit AdamW (``adamw8bit``): for a parameter of at least ``min_8bit_size``
  (4096) elements, two uint8 moments and two fp32 ``absmax`` vectors (one value per block of
  256 elements); below that, two fp32 moments. The two 256-entry fp32 quantization maps are
  shared by all parameters and counted once. ``step`` is a Python int (no tensor).
- SGD (``state_layout="sgd"``, torch ``SGD``): one ``momentum_buffer`` like the parameter when
  ``momentum`` is not 0, nothing otherwise (no ``step``).

Gradients: one per trainable parameter, in its dtype; with a layer-wise name
(``apollo_layerwise``) each gradient is consumed as soon as it is ready, so at most one
exists at a time and the estimate is the largest one.

Example:
    >>> import torch
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
    >>> est = estimate(model, "apollo", "rank=4", target_modules=["0"])
    >>> [(p.name, p.update, p.state_elements) for p in est.parameters]  # 2 * 4 * 128 + 2
    [('0.weight', 'low_rank', 1026), ('0.bias', 'adamw', 256), ('1.weight', 'adamw', 2048), ('1.bias', 'adamw', 16)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..optim import apollo_param_groups, get_optimizer_spec, parse_options
from ..optim.apollo import MIN_8BIT_SIZE
from ..optim.param_groups import TargetModules
from ..optim.registry import STATE_LAYOUTS
from .accounting import MemoryBreakdown, ParamMemory, breakdown, dtype_name, is_dtensor, logical_numel

# APOLLO's scalars besides the moments: seed (int64) and prev_update_norm (fp32) -- the
# paper's "+ 2" -- and step (fp32), left out of the paper's formulas as for AdamW.
_APOLLO_SCALAR_ELEMENTS = 2
_APOLLO_SCALAR_BYTES = 8 + 4
_STEP_BYTES = 4
# bitsandbytes' blockwise 8-bit states: one fp32 absmax per block, two 256-entry fp32 maps.
_BNB_BLOCKSIZE = 256
_BNB_QMAP_BYTES = 2 * 256 * 4


def _scalar_step_bytes() -> int:
    # torch.optim keeps "step" in float64 only when that is the default dtype.
    return 8 if torch.get_default_dtype() == torch.float64 else _STEP_BYTES


def _adamw(name: str, param: torch.Tensor, shape: tuple[int, ...], itemsize: int, amsgrad: bool) -> ParamMemory:
    elements = (3 if amsgrad else 2) * logical_numel(param)
    return ParamMemory(
        name,
        shape,
        dtype_name(param.dtype),
        True,
        "adamw",
        None,
        elements,
        elements * itemsize + _scalar_step_bytes(),
        0,
    )


def _apollo(
    name: str, param: torch.Tensor, shape: tuple[int, ...], itemsize: int, rank: int, cache: bool
) -> ParamMemory:
    m, n = shape
    r = min(rank, m, n)
    moments = 2 * r * max(m, n)
    cache_bytes = r * min(m, n) * param.element_size() if cache else 0
    return ParamMemory(
        name,
        shape,
        dtype_name(param.dtype),
        True,
        "low_rank",
        r,
        moments + _APOLLO_SCALAR_ELEMENTS,
        moments * itemsize + _APOLLO_SCALAR_BYTES + _STEP_BYTES,
        cache_bytes,
    )


def _sgd(name: str, param: torch.Tensor, shape: tuple[int, ...], itemsize: int, momentum: float) -> ParamMemory:
    elements = logical_numel(param) if momentum else 0
    return ParamMemory(name, shape, dtype_name(param.dtype), True, "sgd", None, elements, elements * itemsize, 0)


def _adamw8bit(name: str, param: torch.Tensor, shape: tuple[int, ...], min_8bit_size: int, unorm: bool) -> ParamMemory:
    numel = param.numel()
    extra = 4 if unorm else 0  # "unorm_vec": one fp32
    if numel < min_8bit_size:
        return ParamMemory(
            name, shape, dtype_name(param.dtype), True, "adamw32bit", None, 2 * numel, 8 * numel + extra, 0
        )
    blocks = math.ceil(numel / _BNB_BLOCKSIZE)
    return ParamMemory(
        name,
        shape,
        dtype_name(param.dtype),
        True,
        "adamw8bit",
        None,
        2 * numel + 2 * blocks,
        2 * numel + 8 * blocks + extra,
        0,
    )


def estimate(
    model: nn.Module,
    optimizer: str = "apollo",
    options: str | Mapping[str, Any] | None = None,
    state_dtype: torch.dtype | None = None,
    *,
    target_modules: TargetModules = None,
) -> MemoryBreakdown:
    """Bytes a training step would hold for ``model`` with the optimizer registered as ``optimizer``.

    Args:
        model: best built on the meta device (``with torch.device("meta"): ...``), so that
            even a 7B model costs no memory; a real model works too and is not modified.
        optimizer: a registry name (:func:`~lightning_memopt.optim.available_optimizers`) whose
            state layout the registry knows (APOLLO / APOLLO-Mini, torch AdamW / Adam / SGD,
            bitsandbytes 8-bit Adam, or any name registered with ``state_layout=``).
        options: that name's options, as for :func:`~lightning_memopt.optim.create_optimizer`
            (``"rank=128,cache_projection=false"`` or a mapping).
        state_dtype: dtype of the moments if not the parameter's (ignored by 8-bit Adam).
        target_modules: for the APOLLO family, which modules are low-rank (as for
            :func:`~lightning_memopt.optim.apollo_param_groups`).

    Returns:
        a :class:`~lightning_memopt.memory.MemoryBreakdown` with ``source="estimate"`` and one
        :class:`~lightning_memopt.memory.ParamMemory` per parameter in ``parameters``.

    Example:
        >>> with torch.device("meta"):
        ...     model = torch.nn.Linear(1024, 1024, bias=False)
        >>> est = estimate(model, "adamw")
        >>> est.params_bytes, est.grads_bytes, est.optimizer_state_bytes  # + 4-byte step
        (4194304, 4194304, 8388612)
    """
    spec = get_optimizer_spec(optimizer)
    family = spec.layout()
    if family not in STATE_LAYOUTS:  # a layout added to the registry before its arithmetic here
        raise ValueError(f"optimizer {optimizer!r}: estimate() cannot count state layout {family!r} yet.")
    settings = {**spec.option_defaults(), **parse_options(optimizer, options)}
    measured = breakdown(model, grads=False)

    low_rank_ids: set[int] = set()
    if family == "apollo":
        if spec.low_rank:
            groups = apollo_param_groups(model, target_modules)
            low_rank_ids = {id(p) for g in groups if g["low_rank"] for p in g["params"]}
        else:  # APOLLO given all parameters in one group: every matrix is low-rank
            low_rank_ids = {id(p) for p in model.parameters() if p.dim() == 2}

    details: list[ParamMemory] = []
    grad_sizes: list[int] = []
    shared_state_bytes = 0
    for name, param in model.named_parameters():
        shape = tuple(param.to_local().shape if is_dtensor(param) else param.shape)
        if not param.requires_grad:
            details.append(ParamMemory(name, shape, dtype_name(param.dtype), False, "frozen", None, 0, 0, 0))
            continue
        grad_sizes.append(logical_numel(param) * param.element_size())
        itemsize = (state_dtype or param.dtype).itemsize
        if family == "apollo" and id(param) in low_rank_ids:
            details.append(
                _apollo(name, param, shape, itemsize, settings["rank"], settings.get("cache_projection", True))
            )
        elif family == "apollo" and settings.get("adamw_8bit", False) and param.numel() >= MIN_8BIT_SIZE:
            # APOLLO's own 8-bit AdamW: bitsandbytes' layout, plus a 4-byte step tensor.
            entry = _adamw8bit(name, param, shape, MIN_8BIT_SIZE, False)
            details.append(dataclasses.replace(entry, state_bytes=entry.state_bytes + _scalar_step_bytes()))
        elif family in ("apollo", "adamw"):
            details.append(_adamw(name, param, shape, itemsize, bool(settings.get("amsgrad", False))))
        elif family == "sgd":
            details.append(_sgd(name, param, shape, itemsize, settings.get("momentum", 0)))
        else:
            entry = _adamw8bit(name, param, shape, settings["min_8bit_size"], settings.get("max_unorm", 0.0) > 0)
            details.append(entry)
            if entry.update == "adamw8bit":
                shared_state_bytes = _BNB_QMAP_BYTES

    grads_bytes = max(grad_sizes, default=0) if spec.layerwise else sum(grad_sizes)
    return dataclasses.replace(
        measured,
        grads_bytes=grads_bytes,
        optimizer_state_bytes=sum(p.state_bytes for p in details) + shared_state_bytes,
        projection_cache_bytes=sum(p.projection_cache_bytes for p in details),
        workspace_bytes=0,  # no step has run, so no step workspace exists
        source="estimate",
        parameters=details,
    )
