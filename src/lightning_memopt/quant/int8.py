"""INT8 weights trained directly, with stochastic rounding (the weight part of Q-APOLLO / Q-GaLore).

A weight matrix ``W`` (``out x in``) is stored as ``int8_data`` (``out x in``, one byte per
weight) and ``scales`` (fp32, ``out x ceil(in / group_size)``): each row is cut into groups of
``group_size`` consecutive input features (the last group of a row is shorter when ``in`` is not
a multiple of ``group_size``) and each group keeps one symmetric absmax scale,
``scale = max|w| / 127``, so that ``w ≈ scale * q`` with ``q`` in ``[-127, 127]``. No fp32
master copy exists.

:class:`Int8Weight` is a tensor subclass that stands for the float matrix: it reports the float
dtype and the matrix's shape, is used as the ``nn.Parameter`` of an ``nn.Linear``, and

- **forward / backward**: ``F.linear`` runs a custom autograd function that dequantizes the
  weight to a temporary float matrix, and dequantizes it again in backward (the float copy is
  never kept between the two). The weight's gradient is a plain float tensor of its shape.
  Any other op on the weight (``w @ x``, ``w.t()``, ``w.sum()``) dequantizes it and returns
  plain tensors; it is correct but keeps the float copy alive for backward like a float weight.
- **optimizer updates**: any in-place op on the weight (``add_``, ``mul_``, ``addcdiv_``,
  ``lerp_``, ``copy_``, ``zero_``, the ``_foreach_*_`` ops and fused kernels such as
  ``torch._fused_adamw_``) dequantizes it, applies the op to the float matrix, and requantizes
  the result in place with **stochastic rounding** (``q = floor(w / scale + u)``, ``u ~ U[0, 1)``,
  so ``E[scale * q] = w``: an update smaller than a quantization step is kept on average
  instead of being rounded away). The group scales are recomputed from the updated values.
  Ops on lists of tensors handle one weight at a time, so at most one weight exists in float
  at a time. Hence any torch optimizer works, and so do :class:`~lightning_memopt.optim.APOLLO`
  and :class:`~lightning_memopt.optim.LayerwiseOptimizer` unchanged.
- **optimizer state** made from the weight (``zeros_like``, ``empty_like``, ``new_zeros`` ...)
  is a plain float tensor; ``clone``, ``detach`` and ``.to(device / float dtype)`` keep the
  subclass (``.to(torch.bfloat16)`` changes the compute dtype and keeps the int8 storage).

**Reproducible rounding.** Every weight carries a rounding seed and a counter (two Python
ints, shared by the weight's aliases). Requantization ``k`` of a weight draws its noise from a
``torch.Generator`` seeded with a hash of (seed, k), so rounding never touches torch's global
RNG, and a run resumed from a checkpoint (which stores the seed and the counter) rounds
exactly as the uninterrupted run. The seed is derived from ``torch.initial_seed()`` (what
``torch.manual_seed`` / ``seed_everything`` set) and the module's name, or given explicitly.

**State dict.** ``model.state_dict()`` holds the ``Int8Weight`` itself (int8 data, scales and
rounding state: 1 byte per weight on disk too); loading it into an int8 model restores it
bit for bit, and into a float model dequantizes it. Importing this module allowlists the class
for ``torch.load(..., weights_only=True)``. :func:`dequantize_linear_weights` turns the model
back into float weights.

**safetensors, save_pretrained.** safetensors stores plain tensors only, so the state dict of a
Hugging Face model (anything with ``save_pretrained``) that :func:`quantize_linear_weights`
converted is *flat* when that model is the root of the ``state_dict()`` call: each INT8 weight
``<name>.weight`` becomes three plain tensors, ``<name>.weight.int8_data`` (int8),
``<name>.weight.int8_scales`` (fp32) and ``<name>.weight.int8_state`` (int64: rounding seed,
rounding counter, group size, float dtype code), see :func:`flatten_int8_state_dict`. Hence
``save_pretrained``, ``Trainer.save_model`` and the Trainer's ``save_steps`` checkpoints write
1 byte per weight, and the quantized layers' ``load_state_dict`` accepts the flat form (a
resumed Trainer run rounds exactly as the uninterrupted one). The same model inside another
module (Lightning's ``CausalLM``) keeps the ``Int8Weight`` form in that module's state dict.
:func:`load_int8_pretrained` loads such a folder back; :func:`save_dequantized_pretrained`
exports plain bf16 weights for ``from_pretrained``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> quantize_linear_weights(model, "all-linear", group_size=128)
    ['0', '2']
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)   # build the optimizer afterwards
    >>> model(torch.randn(4, 256)).sum().backward()
    >>> type(model[0].weight.grad).__name__, model[0].weight.int8_data.dtype
    ('Tensor', torch.int8)
    >>> opt.step()
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from .._rng import GOLDEN_GAMMA, MASK64, splitmix64
from ..optim.param_groups import TargetModules, select_low_rank_modules
from ..optim.sharding import is_dtensor

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "INT8_STATE_SUFFIXES",
    "Int8Weight",
    "dequantize_int8",
    "dequantize_linear_weights",
    "dequantize_state_dict",
    "flatten_int8_state_dict",
    "is_int8_weight",
    "load_int8_pretrained",
    "quantize_int8",
    "quantize_linear_weights",
    "save_dequantized_pretrained",
    "stochastic_round",
    "unflatten_int8_state_dict",
]

DEFAULT_GROUP_SIZE = 128
QMAX = 127
# Smallest scale: an all-zero group quantizes to zeros instead of dividing by zero.
_MIN_SCALE = 1e-12
aten = torch.ops.aten


# ---------------------------------------------------------------------------- quantization math
def check_group_size(group_size: Any) -> int:
    """``group_size`` as an int, or a ``ValueError`` naming the value and the fix.

    Example:
        >>> check_group_size(128)
        128
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"group_size={group_size!r}: use a positive integer, the number of consecutive input features "
            f"that share one scale (e.g. {DEFAULT_GROUP_SIZE}; smaller groups are more accurate and cost "
            "4 bytes per group)."
        )
    return group_size


def _grouped(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    """``matrix`` (``out x in``, fp32) as ``out x groups x group_size``, zero-padding the last group."""
    out_features, in_features = matrix.shape
    pad = -in_features % group_size
    if pad:
        matrix = F.pad(matrix, (0, pad))
    return matrix.view(out_features, -1, group_size)


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round to an integer at random, unbiased: ``floor(x) + 1`` with probability ``x - floor(x)``.

    ``E[stochastic_round(x)] = x``. The noise comes from ``generator`` (torch's global one when
    ``None``). Returns a new float tensor.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> r = stochastic_round(torch.full((10000,), 0.25), g)
        >>> sorted(set(r.tolist())), round(r.mean().item(), 1)
        ([0.0, 1.0], 0.2)
    """
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.floor(x + noise)


def quantize_int8(
    tensor: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax INT8 quantization of a matrix, per group of ``group_size`` input features.

    Returns ``(int8_data, scales)``: ``int8_data`` of ``tensor``'s shape with values in
    ``[-127, 127]``, ``scales`` fp32 of shape ``out x ceil(in / group_size)``. Rounding is to the
    nearest integer (error at most ``scale / 2`` per element), or stochastic and unbiased with
    ``stochastic=True`` (noise from ``generator``).

    Example:
        >>> w = torch.tensor([[0.5, -1.0, 0.25, 0.0]])
        >>> q, s = quantize_int8(w, group_size=2)
        >>> q.tolist(), s.tolist()
        ([[64, -127, 127, 0]], [[0.007874015718698502, 0.0019685039296746254]])
    """
    group_size = check_group_size(group_size)
    if tensor.dim() != 2:
        raise ValueError(f"quantize_int8 takes a 2-D weight matrix, got shape {tuple(tensor.shape)}.")
    out_features, in_features = tensor.shape
    grouped = _grouped(tensor.detach().float(), group_size)
    # In place where possible: besides the input, one float temporary (and the noise) at a time.
    scales = torch.linalg.vector_norm(grouped, ord=math.inf, dim=-1).div_(QMAX).clamp_min_(_MIN_SCALE)
    scaled = grouped / scales.unsqueeze(-1)
    if stochastic:
        scaled.add_(torch.rand(scaled.shape, generator=generator, device=scaled.device)).floor_()
    else:
        scaled.round_()
    q = scaled.clamp_(-QMAX, QMAX).to(torch.int8).view(out_features, -1)[:, :in_features]
    return q.contiguous(), scales


def dequantize_int8(
    int8_data: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float matrix ``scale * q`` that ``(int8_data, scales)`` stands for, in ``dtype``.

    Computed in fp32, then cast.

    Example:
        >>> q, s = quantize_int8(torch.tensor([[0.5, -1.0, 0.25, 0.0]]), group_size=2)
        >>> dequantize_int8(q, s, 2)
        tensor([[ 0.5039, -1.0000,  0.2500,  0.0000]])
    """
    out_features, in_features = int8_data.shape
    grouped = _grouped(int8_data.float(), group_size)
    result = (grouped * scales.unsqueeze(-1)).view(out_features, -1)[:, :in_features]
    return result.to(dtype) if dtype != torch.float32 else result.contiguous()


def _mix_seed(seed: int, counter: int) -> int:
    """A 63-bit generator seed from (seed, counter): splitmix64 of their combination."""
    return splitmix64((seed * GOLDEN_GAMMA + counter + 0x632BE59BD9B4E019) & MASK64) >> 1


# ---------------------------------------------------------------------------- the tensor subclass
class Int8Weight(torch.Tensor):
    """A weight matrix stored as int8 values plus fp32 group scales, trained in place.

    Stands for the float matrix (its ``dtype`` and ``shape`` are the float matrix's); see the
    module docstring for how ops behave. Build one with :meth:`from_float` or convert a model's
    linear layers with :func:`quantize_linear_weights`.

    Attributes:
        int8_data: the quantized values (``torch.int8``, the matrix's shape).
        scales: fp32 scales, one per row and group (``out x ceil(in / group_size)``).
        group_size: input features per scale.

    Example:
        >>> w = Int8Weight.from_float(torch.randn(4, 8), group_size=4, seed=0)
        >>> w.shape, w.dtype, w.int8_data.dtype, w.scales.shape
        (torch.Size([4, 8]), torch.float32, torch.int8, torch.Size([4, 2]))
        >>> w.add_(1e-4)  # dequantize, add, requantize with stochastic rounding
        Int8Weight(shape=(4, 8), dtype=torch.float32, group_size=4)
    """

    int8_data: torch.Tensor
    scales: torch.Tensor
    group_size: int
    _rounding: list[int]

    @staticmethod
    def __new__(
        cls,
        int8_data: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        dtype: torch.dtype = torch.float32,
        rounding: list[int] | None = None,
        requires_grad: bool = False,
    ) -> Int8Weight:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls,
            int8_data.shape,
            strides=int8_data.stride(),
            dtype=dtype,
            device=int8_data.device,
            requires_grad=requires_grad,
        )

    def __init__(
        self,
        int8_data: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        dtype: torch.dtype = torch.float32,
        rounding: list[int] | None = None,
        requires_grad: bool = False,
    ) -> None:
        self.int8_data = int8_data
        self.scales = scales
        self.group_size = group_size
        # [seed, number of stochastic requantizations so far]; a list so that aliases share it.
        self._rounding = rounding if rounding is not None else [0, 0]

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0, requires_grad: bool = False
    ) -> Int8Weight:
        """Quantize a float matrix (round to nearest) into an ``Int8Weight`` of its dtype.

        ``seed`` seeds the stochastic rounding of later updates.

        Example:
            >>> Int8Weight.from_float(torch.ones(2, 4), group_size=2).dequantize()
            tensor([[1., 1., 1., 1.],
                    [1., 1., 1., 1.]])
        """
        if not weight.dtype.is_floating_point:
            raise ValueError(f"Int8Weight.from_float takes a floating-point matrix, got dtype {weight.dtype}.")
        q, s = quantize_int8(weight, group_size)
        return cls(q, s, group_size, weight.dtype, [int(seed), 0], requires_grad)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """The float matrix (a new plain tensor) in ``dtype`` (default: the weight's dtype).

        Example:
            >>> Int8Weight.from_float(torch.eye(2), group_size=2).dequantize()
            tensor([[1., 0.],
                    [0., 1.]])
        """
        return dequantize_int8(self.int8_data, self.scales, self.group_size, dtype or self.dtype)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, group_size={self.group_size})"

    # -- traceable wrapper subclass protocol (also what memory accounting reads) ------------------
    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        return ["int8_data", "scales"], (self.group_size, self.dtype, self._rounding)

    @staticmethod
    def __tensor_unflatten__(
        inner_tensors: dict[str, torch.Tensor], ctx: tuple[Any, ...], outer_size: Any, outer_stride: Any
    ) -> Int8Weight:
        group_size, dtype, rounding = ctx
        return Int8Weight(inner_tensors["int8_data"], inner_tensors["scales"], group_size, dtype, rounding)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple]:
        # The inner tensors pickle as ordinary tensors, so that any map_location works (torch's
        # generic wrapper-subclass path refuses a callable one, which Lightning passes on resume).
        rebuild_args = (self.int8_data, self.scales, self.group_size, self.dtype, list(self._rounding))
        return _rebuild_int8_weight, (*rebuild_args, self.requires_grad)

    # -- the in-place update ------------------------------------------------------------------------
    def _requantize_(self, value: torch.Tensor) -> None:
        """Store ``value`` (a float matrix of this shape) with stochastic rounding, in place."""
        seed, counter = self._rounding
        self._rounding[1] = counter + 1
        generator = torch.Generator(device=value.device)
        generator.manual_seed(_mix_seed(seed, counter))
        q, s = quantize_int8(value, self.group_size, stochastic=True, generator=generator)
        self.int8_data.copy_(q)
        self.scales.copy_(s)

    def _alias(self, requires_grad: bool = False) -> Int8Weight:
        return Int8Weight(self.int8_data, self.scales, self.group_size, self.dtype, self._rounding, requires_grad)

    # -- dispatch -----------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, Int8Weight) and not isinstance(x, Int8Weight) and not isinstance(bias, Int8Weight):
                return _Int8Linear.apply(x, weight, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        if func in _FACTORY_LIKE:
            return func(*tree_map(_stand_in, args), **tree_map(_stand_in, kwargs))
        if func._schema.is_mutable:
            return _mutating(func, args, kwargs)
        return func(*tree_map(_dequantized, args), **tree_map(_dequantized, kwargs))


def _dequantized(x: Any) -> Any:
    return x.dequantize() if isinstance(x, Int8Weight) else x


def _stand_in(x: Any) -> Any:
    """A plain tensor with the weight's metadata, for ops that read only that (``zeros_like``)."""
    if isinstance(x, Int8Weight):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return x


class _Int8Linear(torch.autograd.Function):
    """``F.linear`` with an :class:`Int8Weight`: the float weight exists only inside forward and
    inside backward, never in between."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight.dequantize(), bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.dequantize(grad_out.dtype))
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
            # The same product (and summation order) autograd computes for a float nn.Linear.
            grad_w = x_2d.t().mm(grad_2d).t().to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def _mutable_argument_names(func: Any) -> list[tuple[int, str]]:
    return [
        (i, a.name) for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write
    ]


def _argument(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return args[position] if position < len(args) else kwargs.get(name)


def _run_requantizing(func: Any, args: tuple, kwargs: dict, mutable: list[tuple[int, str]]) -> Any:
    """Run ``func`` with every :class:`Int8Weight` dequantized; requantize those it wrote to."""
    floats: dict[int, tuple[Int8Weight, torch.Tensor]] = {}

    def to_float(x: Any) -> Any:
        if not isinstance(x, Int8Weight):
            return x
        if id(x) not in floats:
            floats[id(x)] = (x, x.dequantize())
        return floats[id(x)][1]

    plain_args, plain_kwargs = tree_map(to_float, args), tree_map(to_float, kwargs)
    written: set[int] = set()
    for position, name in mutable:
        value = _argument(args, kwargs, position, name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, Int8Weight):
                written.add(id(item))
    result = func(*plain_args, **plain_kwargs)
    back = {id(f): w for w, f in floats.values()}
    for key in written:
        weight, value = floats[key]
        weight._requantize_(value)
    return tree_map(lambda r: back.get(id(r), r) if isinstance(r, torch.Tensor) else r, result)


def _mutating(func: Any, args: tuple, kwargs: dict) -> Any:
    """In-place ops. Ops on lists of tensors (``_foreach_*_``, fused optimizer kernels) run once
    on the plain members and once per :class:`Int8Weight`, so that one weight at a time exists
    in float."""
    mutable = _mutable_argument_names(func)
    lists = [v for p, n in mutable if isinstance(v := _argument(args, kwargs, p, n), (list, tuple)) and len(v) > 0]
    if not lists or not any(isinstance(t, Int8Weight) for t in lists[0]):
        return _run_requantizing(func, args, kwargs, mutable)
    members = lists[0]
    length = len(members)

    def pick(indices: list[int]) -> tuple[tuple, dict]:
        def sub(a: Any) -> Any:
            return [a[i] for i in indices] if isinstance(a, (list, tuple)) and len(a) == length else a

        return tuple(sub(a) for a in args), {k: sub(v) for k, v in kwargs.items()}

    plain = [i for i, t in enumerate(members) if not isinstance(t, Int8Weight)]
    if plain:
        _run_requantizing(func, *pick(plain), mutable)
    for i in range(length):
        if isinstance(members[i], Int8Weight):
            sub_args, sub_kwargs = pick([i])
            _run_requantizing(func, sub_args, sub_kwargs, mutable)
    return None if not func._schema.returns else args[0]


def _detach(func: Any, args: tuple, kwargs: dict) -> Int8Weight:
    return args[0]._alias()


def _clone(func: Any, args: tuple, kwargs: dict) -> Int8Weight:
    w = args[0]
    return Int8Weight(w.int8_data.clone(), w.scales.clone(), w.group_size, w.dtype, list(w._rounding))


def _to_copy(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    w = args[0]
    dtype = kwargs.get("dtype") or w.dtype
    if not dtype.is_floating_point or kwargs.get("layout") not in (None, torch.strided):
        return func(w.dequantize(), **kwargs)
    device = kwargs.get("device") or w.device
    non_blocking = bool(kwargs.get("non_blocking", False))
    int8_data = w.int8_data.to(device, non_blocking=non_blocking, copy=True)
    scales = w.scales.to(device, non_blocking=non_blocking, copy=True)
    return Int8Weight(int8_data, scales, w.group_size, dtype, list(w._rounding))


def _copy_(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    dest, src = args[0], args[1]
    if not isinstance(dest, Int8Weight):
        return dest.copy_(src.dequantize(dest.dtype))
    if isinstance(src, Int8Weight) and src.shape == dest.shape and src.group_size == dest.group_size:
        # Exact: what load_state_dict does with a saved Int8Weight (rounding state included).
        dest.int8_data.copy_(src.int8_data)
        dest.scales.copy_(src.scales)
        dest._rounding[:] = src._rounding
        return dest
    value = torch.empty(dest.shape, dtype=torch.float32, device=dest.device)
    value.copy_(_dequantized(src))
    dest._requantize_(value)
    return dest


_HANDLERS: dict[Any, Callable[[Any, tuple, dict], Any]] = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
}
_FACTORY_LIKE = {
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.new_empty.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty_strided.default,
}


def _rebuild_int8_weight(
    int8_data: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    rounding: list[int],
    requires_grad: bool,
) -> Int8Weight:
    return Int8Weight(int8_data, scales, group_size, dtype, rounding, requires_grad)


# torch.load(weights_only=True) (torch's default, and HF's) calls only allowlisted functions.
torch.serialization.add_safe_globals([Int8Weight, _rebuild_int8_weight])


# ---------------------------------------------------------------------------- model conversion
def is_int8_weight(tensor: Any) -> bool:
    """Whether ``tensor`` is an :class:`Int8Weight` (a parameter converted to INT8).

    Example:
        >>> is_int8_weight(torch.zeros(2, 2)), is_int8_weight(Int8Weight.from_float(torch.zeros(2, 2), 2))
        (False, True)
    """
    return isinstance(tensor, Int8Weight)


def _weight_seed(name: str, seed: int | None) -> int:
    base = torch.initial_seed() if seed is None else int(seed)
    return _mix_seed(base, zlib.crc32(name.encode()))


def _replace_parameter(model: nn.Module, old: torch.Tensor, new: nn.Parameter) -> None:
    """Put ``new`` wherever ``old`` is registered (tied weights included)."""
    for module in model.modules():
        for key, value in list(module._parameters.items()):
            if value is old:
                module._parameters[key] = new


def quantize_linear_weights(
    model: nn.Module,
    target_modules: TargetModules = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    seed: int | None = None,
) -> list[str]:
    """Convert the weights of ``model``'s selected ``nn.Linear`` layers to :class:`Int8Weight`, in place.

    Call it **before** building the optimizer: an optimizer built earlier holds the old float
    parameters and would keep training them (this cannot be detected from here). Biases,
    embeddings, norms and the output head stay as they are.

    Args:
        model: the model; its selected weights must be real (not meta) tensors, not DTensors.
        target_modules: which layers, as in :func:`~lightning_memopt.optim.select_low_rank_modules`
            (default: the ``nn.Linear`` layers of the repeated blocks, i.e. a transformer's
            attention and MLP; ``"all-linear"``; a regex; or a list of names).
        group_size: input features per fp32 scale. A row whose length is not a multiple of it
            ends with a shorter group (no padding is stored).
        seed: base seed of the stochastic rounding; ``None``: ``torch.initial_seed()``. Each
            weight's seed also depends on its module name.

    Returns:
        The names of the modules converted by this call (weights already INT8 are skipped).

    Raises:
        ValueError: for a bad ``group_size``, a ``target_modules`` that matches nothing or
            matches a module that is not an ``nn.Linear``, or a meta / sharded weight.

    Example:
        >>> model = nn.Sequential(nn.Linear(300, 16), nn.Linear(16, 4))
        >>> quantize_linear_weights(model, ["0"], group_size=128)
        ['0']
        >>> model[0].weight.scales.shape  # groups of 128, 128 and 44 input features
        torch.Size([16, 3])
    """
    group_size = check_group_size(group_size)
    names = select_low_rank_modules(model, target_modules)
    modules = dict(model.named_modules())
    not_linear = [n for n in names if not isinstance(modules[n], nn.Linear)]
    if not_linear:
        raise ValueError(
            f"target_modules={target_modules!r} selects modules that are not nn.Linear: {not_linear[:5]}; "
            "INT8 weight training converts nn.Linear weights only. Narrow target_modules to linear layers."
        )
    converted = []
    for name in names:
        weight = modules[name].weight
        if is_int8_weight(weight):
            continue
        if is_dtensor(weight):
            raise ValueError(
                f"{name}.weight is a sharded DTensor (FSDP2): INT8 weight training runs on one device; "
                "convert before sharding is not supported either."
            )
        if weight.device.type == "meta":
            raise ValueError(
                f"{name}.weight is on the meta device: materialize the model (to_empty + initialise or load "
                "weights) before quantize_linear_weights."
            )
        int8 = Int8Weight.from_float(weight.detach(), group_size, seed=_weight_seed(name, seed))
        _replace_parameter(model, weight, nn.Parameter(int8, requires_grad=weight.requires_grad))
        converted.append(name)
    _install_state_dict_hooks(model)
    return converted


def dequantize_linear_weights(model: nn.Module) -> list[str]:
    """Turn every :class:`Int8Weight` parameter of ``model`` back into a plain float parameter.

    For export (``save_pretrained``, safetensors) or to continue in full precision. Returns
    the names of the converted parameters.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> quantize_linear_weights(model, "all-linear", group_size=4)
        ['0']
        >>> dequantize_linear_weights(model), type(model[0].weight).__name__
        (['0.weight'], 'Parameter')
    """
    converted = []
    for name, param in list(model.named_parameters()):
        if is_int8_weight(param):
            _replace_parameter(model, param, nn.Parameter(param.dequantize(), requires_grad=param.requires_grad))
            converted.append(name)
    if not any(is_int8_weight(p) for p in model.parameters()):
        # No INT8 weight left: the model is a float model again (e.g. FSDP may shard it). The
        # load hooks stay; they only act on a state dict that holds the flat INT8 form.
        for module in model.modules():
            module.__dict__.pop(_HOOKED, None)
    return converted


# ---------------------------------------------------------------------------- flat (safetensors) form
#: Suffixes of the three plain tensors that stand for one INT8 weight in a flat state dict.
INT8_STATE_SUFFIXES = (".int8_data", ".int8_scales", ".int8_state")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_HOOKED = "_memopt_int8_state_dict_hooks"


def _flat_entries(key: str, weight: Int8Weight) -> dict[str, torch.Tensor]:
    seed, counter = weight._rounding
    state = torch.tensor([seed, counter, weight.group_size, _DTYPE_CODES[weight.dtype]], dtype=torch.int64)
    data, scales, meta = (key + suffix for suffix in INT8_STATE_SUFFIXES)
    return {data: weight.int8_data.detach().contiguous(), scales: weight.scales.detach().contiguous(), meta: state}


def _from_flat(key: str, state_dict: dict[str, Any], pop: bool) -> Int8Weight:
    take = state_dict.pop if pop else state_dict.__getitem__
    data, scales, meta = (take(key + suffix) for suffix in INT8_STATE_SUFFIXES)
    seed, counter, group_size, dtype_code = (int(v) for v in meta.tolist())
    return Int8Weight(data, scales.float(), group_size, _CODE_DTYPES[dtype_code], [seed, counter])


def _flat_keys(state_dict: dict[str, Any]) -> list[str]:
    """The weight keys that a flat state dict holds in INT8 form."""
    suffix = INT8_STATE_SUFFIXES[0]
    return [k[: -len(suffix)] for k in state_dict if k.endswith(suffix)]


def flatten_int8_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` with every :class:`Int8Weight` as three plain tensors
    (``.int8_data``, ``.int8_scales``, ``.int8_state``): what safetensors can store.

    Example:
        >>> w = Int8Weight.from_float(torch.ones(2, 4), group_size=2, seed=7)
        >>> sorted(flatten_int8_state_dict({"fc.weight": w}))
        ['fc.weight.int8_data', 'fc.weight.int8_scales', 'fc.weight.int8_state']
    """
    flat: dict[str, Any] = {}
    for key, value in state_dict.items():
        if isinstance(value, Int8Weight):
            flat.update(_flat_entries(key, value))
        else:
            flat[key] = value
    return flat


def unflatten_int8_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_int8_state_dict`: :class:`Int8Weight` values again.

    Example:
        >>> w = Int8Weight.from_float(torch.ones(2, 4), group_size=2, seed=7)
        >>> back = unflatten_int8_state_dict(flatten_int8_state_dict({"fc.weight": w}))["fc.weight"]
        >>> torch.equal(back.int8_data, w.int8_data), back._rounding
        (True, [7, 0])
    """
    result = dict(state_dict)
    for key in _flat_keys(state_dict):
        result[key] = _from_flat(key, result, pop=True)
    return result


def dequantize_state_dict(state_dict: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A copy of ``state_dict`` with every INT8 weight (flat or :class:`Int8Weight`) as a plain
    float tensor, and, when ``dtype`` is given, every floating-point tensor cast to it: what a
    float model of the same architecture loads.

    Example:
        >>> w = Int8Weight.from_float(torch.ones(2, 4), group_size=2)
        >>> dequantize_state_dict(flatten_int8_state_dict({"fc.weight": w}), torch.bfloat16)["fc.weight"].dtype
        torch.bfloat16
    """
    result = unflatten_int8_state_dict(state_dict)
    for key, value in result.items():
        if isinstance(value, Int8Weight):
            result[key] = value.dequantize(dtype)
        elif dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
            result[key] = value.to(dtype)
    return result


def _flatten_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # Only when the Hugging Face model is the root of the call (save_pretrained, the Trainer's
    # checkpoints): inside another module (Lightning) the state dict keeps Int8Weight values.
    if prefix:
        return
    for key in [k for k, v in state_dict.items() if isinstance(v, Int8Weight)]:
        weight = state_dict.pop(key)
        state_dict.update(_flat_entries(key, weight))


def _unflatten_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    key = prefix + "weight"
    if key + INT8_STATE_SUFFIXES[0] in state_dict:
        state_dict[key] = _from_flat(key, state_dict, pop=True)


def _install_state_dict_hooks(model: nn.Module) -> None:
    """Let the INT8 layers load the flat form, and a Hugging Face model save it."""
    for module in model.modules():
        if isinstance(getattr(module, "weight", None), Int8Weight) and not module.__dict__.get(_HOOKED):
            module.register_load_state_dict_pre_hook(_unflatten_hook)
            module.__dict__[_HOOKED] = True
    # Duck-typed (this package's core does not import transformers): a PreTrainedModel.
    if callable(getattr(model, "save_pretrained", None)) and not model.__dict__.get(_HOOKED):
        model.register_state_dict_post_hook(_flatten_hook)
        model.__dict__[_HOOKED] = True


def _read_safetensors(folder: Any) -> dict[str, torch.Tensor]:
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{folder} holds no model.safetensors (nor its index): pass the folder that save_pretrained or the "
            "Trainer's save_steps wrote."
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name), device="cpu"))
    return state


def load_int8_pretrained(model_or_class: Any, folder: Any, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a folder written by ``save_pretrained`` / the HF Trainer from an INT8 model, INT8 again.

    The float parts (embeddings, norms, head) load through ``from_pretrained`` (when a class is
    given; its kwargs pass through), then the weights stored in INT8 form are quantized with
    their saved group size and loaded bit for bit, rounding state included (training continues
    exactly). A model instance given instead of a class is quantized and loaded in place.

    Args:
        model_or_class: a Hugging Face model class (``AutoModelForCausalLM``,
            ``LlamaForCausalLM`` ...) or an already built model of the folder's architecture.
        folder: the saved folder (``model.safetensors`` or its sharded index).

    Returns:
        the model, with :class:`Int8Weight` weights where the folder has them.

    Raises:
        FileNotFoundError: when ``folder`` holds no safetensors weights.
        ValueError: when the folder names an INT8 weight the model does not have.

    Example:
        >>> # from transformers import AutoModelForCausalLM
        >>> # model = load_int8_pretrained(AutoModelForCausalLM, "out/checkpoint-500")
    """
    state = _read_safetensors(folder)
    if isinstance(model_or_class, nn.Module):
        model = model_or_class
    else:
        import logging

        # from_pretrained reports the INT8 weights as missing and their flat parts as unexpected:
        # both are expected here, loaded below.
        # (and the tensor-parallel plan check names the flat INT8 parts as layers it did not shard).
        names = (
            "transformers.modeling_utils",
            "transformers.utils.loading_report",
            "transformers.distributed.tensor_parallel",
        )
        loggers = [logging.getLogger(n) for n in names]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            model = model_or_class.from_pretrained(folder, **from_pretrained_kwargs)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
    modules = dict(model.named_modules())
    int8_keys = _flat_keys(state)
    for key in int8_keys:
        module_name = key.removesuffix(".weight")
        module = modules.get(module_name)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{folder} stores {key} in INT8 but {type(model).__name__} has no nn.Linear {module_name!r}: "
                "load the folder into the architecture that saved it."
            )
        group_size = int(state[key + INT8_STATE_SUFFIXES[2]][2])
        if not is_int8_weight(module.weight):
            quantize_linear_weights(model, [module_name], group_size=group_size)
    _install_state_dict_hooks(model)
    wanted = {k: v for k, v in state.items() if any(k.startswith(w + ".int8_") for w in int8_keys)}
    result = model.load_state_dict(wanted, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{folder}: INT8 entries the model could not take: {result.unexpected_keys[:5]}")
    return model


def save_dequantized_pretrained(
    model: nn.Module, folder: Any, dtype: torch.dtype = torch.bfloat16, **save_kwargs: Any
) -> None:
    """Export an INT8-trained Hugging Face model as a plain ``dtype`` checkpoint (default bf16)
    that ``from_pretrained`` loads with no knowledge of INT8. The model itself is unchanged.

    Args:
        model: a Hugging Face model (``save_pretrained``) with INT8 weights.
        folder: where to write (``save_pretrained``'s folder; its other kwargs pass through).
        dtype: the floating-point dtype of every exported tensor.

    Example:
        >>> # save_dequantized_pretrained(model, "export/")
        >>> # AutoModelForCausalLM.from_pretrained("export/", dtype=torch.bfloat16)
    """
    import json
    from pathlib import Path

    if not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(
            f"save_dequantized_pretrained takes a Hugging Face model (with save_pretrained), got "
            f"{type(model).__name__}; for another module use dequantize_state_dict(model.state_dict())."
        )
    state = dequantize_state_dict(model.state_dict(), dtype)
    model.save_pretrained(folder, state_dict=state, **save_kwargs)
    # save_pretrained records the model's (float32 compute) dtype; the files hold ``dtype``.
    config = Path(folder) / "config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        values["dtype"] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
