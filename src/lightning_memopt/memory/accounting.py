"""Exact bytes by category (params, grads, optimizer state, buffers), counted from the tensors.

Every tensor is reduced to the plain tensors that really hold memory, and each of their
storages is counted once:

- an FSDP2 / tensor-parallel ``DTensor`` counts its local shard (``to_local()``): the numbers
  are per device;
- other wrapper subclasses (torchao's quantized tensors and 8-bit optimizer states) count the
  inner tensors they flatten to (``__tensor_flatten__``), not their display dtype;
- parameter subclasses that carry quantization metadata beside their payload (bitsandbytes
  ``Int8Params`` with its ``SCB`` row scales, ``Params4bit`` with the ``absmax`` / ``code``
  tensors of its ``QuantState``) count the payload and the metadata, as parameter bytes under
  their own dtypes;
- a storage shared by several tensors (tied weights, views, FSDP2's gradient buffers) is
  counted once, whole, in the first category that meets it (params, buffers, grads,
  optimizer state, in that order);
- meta tensors hold no memory but are counted as if they did (their storage's ``nbytes``),
  so that a model built on the meta device is accounted exactly without allocating it.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 2)  # 8 + 2 fp32 elements
    >>> breakdown(model).params_bytes
    40
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..optim.sharding import is_dtensor
from .baseline import CATEGORIES, AdamWBaseline, CategorySaving

# How deep to look into the objects a parameter subclass carries (QuantState -> state2 -> tensors).
_METADATA_DEPTH = 3
# How deep to look into an optimizer's per-parameter state (dicts of tensors, lists of dicts ...).
_STATE_DEPTH = 4


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def leaf_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s memory: a DTensor's local shard, a wrapper
    subclass's inner tensors, or the tensor itself.

    Example:
        >>> [t.shape for t in leaf_tensors(torch.zeros(2, 3))]
        [torch.Size([2, 3])]
    """
    if is_dtensor(tensor):
        yield from leaf_tensors(tensor.to_local())
    elif is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        for name in inner_names:
            yield from leaf_tensors(getattr(tensor, name))
    else:
        yield tensor


def _storage_key_and_bytes(tensor: torch.Tensor) -> tuple[Any, int]:
    """A key that identifies ``tensor``'s storage, and the storage's size in bytes."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        # Sparse and other storage-less layouts: count the tensor itself, once per object.
        return ("object", id(tensor)), tensor.numel() * tensor.element_size()
    nbytes = storage.nbytes()
    if tensor.device.type == "meta":
        # Meta storages have no address; the storage object identifies them (views share it).
        return ("meta", getattr(storage, "_cdata", id(tensor))), nbytes
    return (tensor.device.type, tensor.device.index, storage.data_ptr()), nbytes


def _tensors_in(obj: Any, depth: int, skip: set[int]) -> Iterator[torch.Tensor]:
    """Tensors held by ``obj``: itself, or inside containers / plain objects, ``depth`` deep."""
    if id(obj) in skip:
        return
    skip.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth <= 0 or isinstance(obj, (nn.Module, str, bytes, int, float, bool, type, torch.dtype)):
        return
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth - 1, skip)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors_in(value, depth - 1, skip)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from _tensors_in(value, depth - 1, skip)


def _is_plain_parameter(param: torch.Tensor) -> bool:
    return type(param) in (torch.Tensor, nn.Parameter) or is_dtensor(param)


def quantization_metadata(param: torch.Tensor) -> list[torch.Tensor]:
    """Tensors a parameter subclass carries beside its payload (bitsandbytes scales, codes).

    Plain parameters and DTensors carry none. The module a ``Params4bit`` points back to is
    not searched.

    Example:
        >>> quantization_metadata(nn.Parameter(torch.zeros(2)))
        []
    """
    if _is_plain_parameter(param):
        return []
    skip = {id(param)}
    return [t for value in vars(param).values() for t in _tensors_in(value, _METADATA_DEPTH, skip)]


def logical_numel(param: torch.Tensor) -> int:
    """Elements the parameter stands for, on this device.

    A packed 4-bit weight counts its unpacked shape (``quant_state.shape``); a DTensor counts
    its local shard.

    Example:
        >>> logical_numel(torch.zeros(3, 4))
        12
    """
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    if shape is not None:
        return math.prod(shape)
    return param.to_local().numel() if is_dtensor(param) else param.numel()


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer behind wrappers (Lightning's ``LightningOptimizer``,
    accelerate's ``AcceleratedOptimizer``).

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> unwrap_optimizer(opt) is opt
        True
    """
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or not hasattr(inner, "state"):
            break
        optimizer = inner
    return optimizer


def _optimizer_list(optimizer: Any) -> list[Any]:
    if optimizer is None:
        return []
    if isinstance(optimizer, (list, tuple)):
        return [unwrap_optimizer(o) for o in optimizer if o is not None]
    return [unwrap_optimizer(optimizer)]


class StorageCounter:
    """Counts bytes by category, each storage once, also by device and by parameter dtype.

    Example:
        >>> counter = StorageCounter()
        >>> w = torch.zeros(4, 4)
        >>> counter.add(w, "params"), counter.add(w[1:], "grads")  # a view: already counted
        (64, 0)
    """

    def __init__(self) -> None:
        self._seen: set[Any] = set()
        self.by_category: dict[str, int] = defaultdict(int)
        self.by_device: dict[str, int] = defaultdict(int)
        self.by_dtype: dict[str, int] = defaultdict(int)

    def add(self, tensor: torch.Tensor, category: str, *, by_dtype: bool = False) -> int:
        """Count ``tensor``'s storages not seen yet under ``category``; the bytes added."""
        added = 0
        for leaf in leaf_tensors(tensor):
            key, nbytes = _storage_key_and_bytes(leaf)
            if nbytes == 0 or key in self._seen:
                continue
            self._seen.add(key)
            added += nbytes
            self.by_device[str(leaf.device)] += nbytes
            if by_dtype:
                self.by_dtype[dtype_name(leaf.dtype)] += nbytes
        self.by_category[category] += added
        return added


@dataclass
class ParamMemory:
    """Memory of one parameter and its optimizer state (filled in by :func:`estimate`).

    ``state_elements`` counts the optimizer-state elements that the APOLLO paper's formulas
    count: the moments, plus APOLLO's two scalars (projection ``seed`` and the norm-growth
    limiter's ``prev_update_norm``); the ``step`` counter, which the formulas leave out for
    AdamW as well, is not among them. ``state_bytes`` is everything, ``step`` included.

    Example:
        >>> ParamMemory("w", (4, 8), "float32", True, "adamw", None, 64, 260, 0).state_bytes
        260
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    update: str
    rank: int | None
    state_elements: int
    state_bytes: int
    projection_cache_bytes: int


@dataclass
class MemoryBreakdown:
    """Bytes per category on this device, with the fp32 AdamW baseline of the same model.

    ``projection_cache_bytes`` is APOLLO's cached projection (``optimizer.projection_cache_bytes()``):
    real memory held by the optimizer, reported on its own line and not in
    ``optimizer_state_bytes``, which is what the paper's formulas describe. It does count in
    :attr:`static_bytes` and in the ``"total"`` saving.

    ``workspace_bytes`` is APOLLO's step workspace (``optimizer.workspace_bytes()``): the
    scratch buffers a step keeps for the next one, on the CPU only (on a GPU the caching
    allocator reuses the memory instead and it is 0), and 0 before the first step. Like the
    projection cache it is real memory outside the optimizer state, on its own line, counted
    in :attr:`static_bytes` and in the ``"total"`` saving.

    Example:
        >>> b = breakdown(torch.nn.Linear(4, 2))
        >>> (b.params_bytes, b.grads_bytes, b.baseline.total_bytes)
        (40, 0, 160)
        >>> b.savings()["params"].saving_ratio
        0.0
    """

    params_bytes: int
    grads_bytes: int
    optimizer_state_bytes: int
    buffers_bytes: int
    baseline: AdamWBaseline
    numel: int
    trainable_numel: int
    params_by_dtype: dict[str, int] = field(default_factory=dict)
    bytes_by_device: dict[str, int] = field(default_factory=dict)
    projection_cache_bytes: int = 0
    workspace_bytes: int = 0
    source: str = "measured"
    parameters: list[ParamMemory] = field(default_factory=list)

    @property
    def static_bytes(self) -> int:
        """Everything counted: params + grads + optimizer state + projection cache + step workspace
        + buffers."""
        return (
            self.params_bytes
            + self.grads_bytes
            + self.optimizer_state_bytes
            + self.projection_cache_bytes
            + self.workspace_bytes
            + self.buffers_bytes
        )

    def savings(self) -> dict[str, CategorySaving]:
        """Saving per category against the AdamW baseline, and ``"total"`` over the three
        (projection cache and step workspace included in the measured total)."""
        measured = {
            "params": self.params_bytes,
            "grads": self.grads_bytes,
            "optimizer_state": self.optimizer_state_bytes,
        }
        baseline = {
            "params": self.baseline.params_bytes,
            "grads": self.baseline.grads_bytes,
            "optimizer_state": self.baseline.optimizer_state_bytes,
        }
        result = {c: CategorySaving(measured[c], baseline[c]) for c in CATEGORIES}
        # The AdamW baseline has no cache and no workspace: what APOLLO holds outside its state
        # counts against its saving.
        held_outside_state = self.projection_cache_bytes + self.workspace_bytes
        result["total"] = CategorySaving(sum(measured.values()) + held_outside_state, self.baseline.total_bytes)
        return result

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (per-parameter details included when present)."""
        data = asdict(self)
        data["static_bytes"] = self.static_bytes
        data["baseline"]["total_bytes"] = self.baseline.total_bytes
        data["savings"] = {name: s.to_dict() for name, s in self.savings().items()}
        return data


def _walk_optimizer_state(optimizer: Any) -> Iterator[torch.Tensor]:
    state = getattr(optimizer, "state", None)
    if not state:
        return
    skip: set[int] = set()
    for param_state in list(state.values()):
        yield from _tensors_in(param_state, _STATE_DEPTH, skip)


def projection_cache_bytes(optimizer: Any) -> int:
    """Bytes an optimizer reports through ``projection_cache_bytes()`` (APOLLO); 0 otherwise.

    Example:
        >>> projection_cache_bytes(None)
        0
    """
    total = 0
    for opt in _optimizer_list(optimizer):
        method = getattr(opt, "projection_cache_bytes", None)
        if callable(method):
            total += int(method())
    return total


def workspace_bytes(optimizer: Any) -> int:
    """Bytes an optimizer reports through ``workspace_bytes()`` (APOLLO's step scratch buffers,
    kept on the CPU only); 0 otherwise.

    Example:
        >>> workspace_bytes(None)
        0
    """
    total = 0
    for opt in _optimizer_list(optimizer):
        method = getattr(opt, "workspace_bytes", None)
        if callable(method):
            total += int(method())
    return total


def breakdown(model: nn.Module, optimizer: Any = None, *, grads: bool = True) -> MemoryBreakdown:
    """Exact bytes of ``model``'s parameters, gradients and buffers, and of ``optimizer``'s state.

    Args:
        model: any ``nn.Module``; FSDP2-sharded, quantized (bitsandbytes) and meta-device
            models included.
        optimizer: an optimizer (any ``torch.optim.Optimizer``, wrapped or not), a list of
            them, or ``None``. Its state is empty until the first step.
        grads: count ``param.grad``; gradients exist between backward and ``zero_grad``, so
            measure them then (the callbacks do it just before the optimizer step).

    Example:
        >>> model = torch.nn.Linear(8, 4)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> model(torch.randn(2, 8)).sum().backward()
        >>> opt.step()
        >>> b = breakdown(model, opt)
        >>> (b.params_bytes, b.grads_bytes, b.optimizer_state_bytes)  # step counters: 2 x 4 bytes
        (144, 144, 296)
    """
    counter = StorageCounter()
    params = list(model.parameters())
    numel = trainable = 0
    for param in params:
        counter.add(param, "params", by_dtype=True)
        for extra in quantization_metadata(param):
            counter.add(extra, "params", by_dtype=True)
        count = logical_numel(param)
        numel += count
        if param.requires_grad:
            trainable += count
    for buffer in model.buffers():
        counter.add(buffer, "buffers")
    if grads:
        for param in params:
            if param.grad is not None:
                counter.add(param.grad, "grads")
    optimizers = _optimizer_list(optimizer)
    for opt in optimizers:
        for tensor in _walk_optimizer_state(opt):
            counter.add(tensor, "optimizer_state")
    return MemoryBreakdown(
        params_bytes=counter.by_category["params"],
        grads_bytes=counter.by_category["grads"],
        optimizer_state_bytes=counter.by_category["optimizer_state"],
        buffers_bytes=counter.by_category["buffers"],
        baseline=AdamWBaseline.from_numel(numel, trainable),
        numel=numel,
        trainable_numel=trainable,
        params_by_dtype=dict(counter.by_dtype),
        bytes_by_device=dict(counter.by_device),
        projection_cache_bytes=projection_cache_bytes(optimizers),
        workspace_bytes=workspace_bytes(optimizers),
    )


def gradient_bytes(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Bytes of the gradients that exist now, total and by device (each storage once).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(1, 4)).sum().backward()
        >>> gradient_bytes(model)
        (40, {'cpu': 40})
    """
    counter = StorageCounter()
    for param in model.parameters():
        if param.grad is not None:
            counter.add(param.grad, "grads")
    return counter.by_category["grads"], dict(counter.by_device)
