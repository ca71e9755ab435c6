"""Will it fit? Bytes per device of a whole training setup, before renting a GPU.

:func:`plan` answers for a model built on the meta device (no memory, so a 70B model takes
seconds), an optimizer name and the run's settings (devices and sharding mesh, batch, sequence
length, precision, INT8 weights, layer-wise updates, activation checkpointing, chunked loss):

- **parameters, gradients, optimizer state**: counted per device exactly as
  :func:`~lightning_memopt.memory.breakdown` counts a real run's tensors. The state layout
  comes from :func:`~lightning_memopt.memory.estimate`; FSDP2's ``Shard(0)`` layout is applied
  by arithmetic (rank 0 holds ``ceil(rows / shard)`` rows, the most of any rank, and FSDP2
  pads every rank's storage to that size); APOLLO's moments are split like its projected
  gradient (rows when ``m >= n``, columns otherwise, see :mod:`lightning_memopt.optim.sharding`).
  INT8 weights hold 1 byte per weight plus one fp32 scale per group of 128 inputs.
  Layer-wise updates hold one gradient at a time (the largest).
- **activations**: measured, not guessed: the model's forward and loss run on *fake* tensors
  (``torch._subclasses.FakeTensorMode``: shapes and dtypes only, no memory, no arithmetic) and
  every tensor autograd saves for backward is counted, each storage once (parameters
  excluded), under CPU autocast for ``bf16-mixed``. A checkpointed block keeps only its inputs
  (counted too). Added to that is the peak of backward beyond the saved tensors: the loss's
  gradient (two ``tokens x vocab`` fp32 tensors; with the chunked loss one chunk's logits, the
  hidden states' gradient and the head's weight gradient) while
  everything is still saved, or later a checkpointed block's recomputation (its full
  activations) once the logits are freed, whichever is larger.
- **optimizer-step temporaries** (GPU kernels): torch's foreach AdamW allocates one
  ``sqrt(exp_avg_sq)`` list the size of its parameters; APOLLO's low-rank step works in chunks
  of at most 2**21 projected elements (two such buffers); a layer-wise step handles one
  parameter at a time. An estimate, not a count.
- **FSDP buffers** (sharded runs): one block's parameters all-gathered (and the next one
  prefetched) in the parameters' dtype, and one block's unsharded gradients before the
  reduce-scatter.

The peak (``total``) is the parameters, optimizer state (projection cache included) and FSDP
buffers, plus the larger of the activations and the gradients with the step's temporaries
(activations are freed during backward as the gradients appear); with layer-wise updates the
one live gradient and the step's temporaries come on top of the activations (the steps run
inside backward). Every figure has the fp32 AdamW baseline of the same model on the same mesh
beside it (fp32 weights, no checkpointing, full logits).

Pure PyTorch: the model (meta device), its transformer blocks, the loss function and the
checkpointing function are passed in, so this module imports no model library.

Example:
    >>> import torch
    >>> from torch import nn
    >>> with torch.device("meta"):
    ...     model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    >>> def loss_fn(m, ids):
    ...     return m(torch.nn.functional.one_hot(ids, 64).float()).sum()
    >>> p = plan(model, PlanSettings("adamw", batch_size=2, seq_len=8, precision="32-true"), loss_fn=loss_fn)
    >>> p.params, p.grads, p.optimizer_state  # 8320 fp32 elements; 4 step counters
    (33280, 33280, 66576)
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..optim import get_optimizer_spec, select_low_rank_modules
from .accounting import MemoryBreakdown
from .estimate import estimate

__all__ = [
    "PRECISIONS",
    "SHARDINGS",
    "ActivationCount",
    "MemoryPlan",
    "PlanSettings",
    "count_activations",
    "parse_memory_size",
    "plan",
    "resolve_mesh",
]

PRECISIONS = ("bf16-mixed", "32-true", "bf16-true")
SHARDINGS = ("full", "hybrid")
CHECKPOINTING = ("full", "selective")
# INT8 weights: one fp32 scale per group of this many input features (quant.int8's default).
INT8_GROUP_SIZE = 128
# APOLLO's low-rank step: projected gradients (R) and their normalised copy (N) in chunks of at
# most this many elements (optim.apollo._CHUNK_ELEMENTS), or one matrix if larger.
APOLLO_CHUNK_ELEMENTS = 1 << 21
# APOLLO's low-rank scalars: seed (int64), prev_update_norm (fp32), step (fp32), whole on every rank.
_LOW_RANK_SCALAR_BYTES = 8 + 4 + 4
_STEP_BYTES = 4
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def parse_memory_size(text: str | int) -> int:
    """``"80GiB"`` -> bytes. Units: B, kB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (of 1024);
    a bare ``G`` means GB.

    Raises:
        ValueError: naming the value and the accepted forms.

    Example:
        >>> parse_memory_size("80GiB"), parse_memory_size("24 GB"), parse_memory_size(1024)
        (85899345920, 24000000000, 1024)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"memory size {text!r} is not a size; write a number and a unit, e.g. 80GiB, 24GB or 40960MiB."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def resolve_mesh(
    devices: int, sharding: str = "full", nodes: int | None = None, mesh: Sequence[int] | None = None
) -> tuple[int, int]:
    """The ``(replicas, shard)`` mesh of ``devices`` GPUs in all (FSDP2's ``("replicate", "shard")``).

    ``"full"`` shards over every device (``(1, devices)``); ``"hybrid"`` (HSDP) shards within a
    node and replicates across ``nodes`` (``(nodes, devices // nodes)``), or follows ``mesh``.

    Raises:
        ValueError: for devices below 1, ``nodes`` with full sharding, devices that do not split
            into ``nodes`` equal nodes, or a ``mesh`` whose product is not ``devices``.

    Example:
        >>> resolve_mesh(8), resolve_mesh(16, "hybrid", nodes=2), resolve_mesh(8, "hybrid", mesh=(2, 4))
        ((1, 8), (2, 8), (2, 4))
    """
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices={devices!r}: give the number of GPUs in all, a positive integer (e.g. 8).")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r} is unknown; use one of {', '.join(SHARDINGS)}.")
    if sharding == "full":
        if nodes is not None and nodes != 1:
            raise ValueError(
                f"nodes={nodes} has no meaning with full sharding (it shards over all {devices} devices, whatever "
                "the nodes); use --sharding hybrid to shard within a node and replicate across nodes, or drop --nodes."
            )
        if mesh is not None:
            raise ValueError(f"mesh={tuple(mesh)} is for hybrid sharding; use --sharding hybrid or drop --mesh.")
        return 1, devices
    if mesh is not None:
        replicas, shard = (int(x) for x in mesh)
        if replicas < 1 or shard < 1 or replicas * shard != devices:
            raise ValueError(
                f"mesh=({replicas}, {shard}) holds {replicas * shard} devices, not devices={devices}; give a "
                f"(replicas, shard) mesh whose product is the world size, e.g. ({max(nodes or 1, 1)}, "
                f"{devices // max(nodes or 1, 1)})."
            )
        if nodes is not None and replicas != nodes:
            raise ValueError(f"mesh=({replicas}, {shard}) has {replicas} replicas but nodes={nodes}; make them agree.")
        return replicas, shard
    if nodes is None:
        raise ValueError("hybrid sharding needs --nodes N (shard within each node, replicate across the N nodes).")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes={nodes!r}: give the number of nodes, a positive integer.")
    if devices % nodes:
        raise ValueError(
            f"devices={devices} do not split into nodes={nodes} equal nodes; give a total device count that is a "
            f"multiple of the nodes (e.g. --devices {nodes * max(devices // nodes, 1)} --nodes {nodes})."
        )
    return nodes, devices // nodes


@dataclass(frozen=True)
class PlanSettings:
    """What the run will do. ``devices`` counts every GPU (all nodes together).

    Example:
        >>> PlanSettings("apollo_mini", devices=8).mesh()
        (1, 8)
    """

    optimizer: str = "apollo_mini"
    options: str | None = None
    devices: int = 1
    sharding: str = "full"
    nodes: int | None = None
    device_mesh: tuple[int, int] | None = None
    batch_size: int = 1
    seq_len: int = 2048
    precision: str = "bf16-mixed"
    int8_weights: bool = False
    layerwise: bool = False
    activation_checkpointing: str | None = None
    chunked_loss: bool = False
    loss_chunk_size: int = 1024
    gpu_memory: int | None = None

    def mesh(self) -> tuple[int, int]:
        """``(replicas, shard)``, checked (see :func:`resolve_mesh`)."""
        return resolve_mesh(self.devices, self.sharding, self.nodes, self.device_mesh)

    def validate(self) -> tuple[int, int]:
        """Check every setting; the mesh. Raises ``ValueError`` naming the bad value and the fix."""
        replicas, shard = self.mesh()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}.")
        if self.activation_checkpointing not in (None, *CHECKPOINTING):
            raise ValueError(
                f"activation_checkpointing={self.activation_checkpointing!r} is unknown; use one of "
                f"{', '.join(CHECKPOINTING)} (or leave it out)."
            )
        for name in ("batch_size", "seq_len", "loss_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.int8_weights and self.devices > 1:
            raise ValueError(
                f"INT8 weights train on one device (apollo_fsdp refuses them, the weights cannot be sharded), but "
                f"devices={self.devices}; use --devices 1, or drop --int8-weights to shard the model."
            )
        get_optimizer_spec(self.optimizer)  # an unknown name raises, listing the known ones
        return replicas, shard


@dataclass
class ActivationCount:
    """What a forward pass leaves for backward, counted on fake tensors (bytes, one device).

    ``saved`` is everything (each storage once); ``per_block`` what each transformer block
    added; ``head`` what came after the last block (final norm, logits, loss);
    ``largest``: the largest tensor a block saves (its gradient is the largest of the block's backward);
    ``weight_casts``: of ``saved``, autocast's low-precision copies of weight matrices.

    Example:
        >>> ActivationCount(saved=10, per_block=[4, 4], head=2).embeddings
        0
    """

    saved: int
    per_block: list[int] = field(default_factory=list)
    head: int = 0
    largest: int = 0
    weight_casts: int = 0

    @property
    def embeddings(self) -> int:
        """Saved before the first block (the embedding lookup, position tables)."""
        return self.saved - sum(self.per_block) - self.head


def _fake_copy(model: nn.Module, mode: Any, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Fake CPU tensors standing for ``model``'s parameters and buffers (for ``functional_call``)."""
    tensors: dict[str, torch.Tensor] = {}
    with mode:
        for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
            wanted = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            fake = torch.empty(tensor.shape, dtype=wanted, device="cpu")
            tensors[name] = fake.requires_grad_(tensor.requires_grad) if fake.is_floating_point() else fake
    return tensors


def count_activations(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    loss_fn: LossFn,
    blocks: Sequence[nn.Module] = (),
    dtype: torch.dtype | None = None,
    autocast_dtype: torch.dtype | None = None,
    selective_ops: frozenset[Any] = frozenset(),
) -> ActivationCount:
    """Bytes autograd saves for backward in one forward + loss of ``model`` on a
    ``batch_size x seq_len`` batch of token ids, without memory: the model runs on fake tensors.

    Args:
        model: any module (meta device is best); it is not modified.
        loss_fn: ``loss_fn(model, input_ids) -> scalar loss``.
        blocks: the model's transformer blocks, for the per-block figures (and so that a
            checkpointed block's inputs, which it keeps until backward, are counted).
        dtype: run with floating parameters in this dtype (``bf16-true``).
        autocast_dtype: run under CPU autocast to this dtype (``bf16-mixed``).
        selective_ops: the aten ops whose outputs a selective checkpoint keeps (its own cache,
            which no autograd hook sees): counted as they run inside a block.

    Example:
        >>> with torch.device("meta"):
        ...     model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
        >>> count = count_activations(model, 2, 3, loss_fn=lambda m, ids: m(ids).square().mean())
        >>> count.saved  # token ids (2 x 3 int64), embedding (2 x 3 x 4) and linear (2 x 3 x 10) outputs (fp32)
        384
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    # What torch.func.functional_call does, for the whole module tree: a loss function that
    # calls submodules (``model.get_decoder()``, the LM head) sees the fake tensors too.
    from torch.nn.utils.stateless import _reparametrize_module

    mode = FakeTensorMode()
    tensors = _fake_copy(model, mode, dtype)
    held = {t.untyped_storage()._cdata for t in tensors.values()}
    saved: dict[int, int] = {}
    in_block, largest, weight_casts = [False], [0], [0]
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in held:
            # autocast's low-precision copy of a weight, saved for backward like an activation.
            if storage._cdata not in saved and tensor.dtype == autocast_dtype and tuple(tensor.shape) in weight_shapes:
                weight_casts[0] += storage.nbytes()
            saved.setdefault(storage._cdata, storage.nbytes())
            if in_block[0]:
                largest[0] = max(largest[0], storage.nbytes())
        return tensor

    def keep_inputs(values: Any) -> None:
        # A checkpointed block keeps its inputs for the recomputation (no autograd hook sees them);
        # for other blocks they are saved by the first op anyway, and counted once.
        for value in values:
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, torch.Tensor) and item.is_floating_point():
                    pack(item)

    marks: list[int] = []

    def enter(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        marks.append(sum(saved.values()))
        keep_inputs([*args, *kwargs.values()])
        in_block[0] = True

    def leave(*_: Any) -> None:
        marks.append(sum(saved.values()))
        in_block[0] = False

    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        with (
            mode,
            _KeepOutputs(selective_ops, pack, in_block) if selective_ops else contextlib.nullcontext(),
            _reparametrize_module(model, tensors, tie_weights=True, strict=False),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None),
        ):
            loss_fn(model, torch.zeros(batch_size, seq_len, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    total = sum(saved.values())
    per_block = [marks[i + 1] - marks[i] for i in range(0, len(marks) - 1, 2)]
    head = total - marks[-1] if marks else 0
    return ActivationCount(
        saved=total, per_block=per_block, head=head, largest=largest[0], weight_casts=weight_casts[0]
    )


class _KeepOutputs(TorchDispatchMode):
    """Counts (through ``pack``) the outputs of ``ops`` computed inside a block: what a selective
    checkpoint's cache keeps for backward."""

    def __init__(self, ops: frozenset[Any], pack: Callable[[torch.Tensor], Any], in_block: list[bool]) -> None:
        super().__init__()
        self.ops, self.pack, self.in_block = ops, pack, in_block

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.in_block[0] and func in self.ops:
            for item in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(item, torch.Tensor):
                    self.pack(item)
        return out


@dataclass
class MemoryPlan:
    """Bytes per device of one training setup and of the fp32 AdamW baseline beside it.

    ``per_device()`` and ``baseline`` have the keys ``params``, ``grads``, ``optimizer_state``
    (the projection cache included), ``activations``, ``temporaries`` (the optimizer step),
    ``fsdp_buffers`` and ``total`` (the peak, see the module docstring).

    Example:
        >>> plan_ = MemoryPlan(PlanSettings(), (1, 1), 1, 2, 3, 4, 5, 0, 8, {"total": 16})
        >>> plan_.saving_ratio
        0.5
    """

    settings: PlanSettings
    mesh: tuple[int, int]
    params: int
    grads: int
    optimizer_state: int
    activations: int
    temporaries: int
    fsdp_buffers: int
    total: int
    baseline: dict[str, int]
    buffers: int = 0
    numel: int = 0
    activation_detail: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def per_device(self) -> dict[str, int]:
        """The figures of this setup, by category."""
        keys = ("params", "grads", "optimizer_state", "activations", "temporaries", "fsdp_buffers", "buffers", "total")
        return {key: getattr(self, key) for key in keys}

    @property
    def saving_ratio(self) -> float:
        """Fraction of the baseline's peak saved (``0.75``: a quarter of it is left)."""
        return 1 - self.total / self.baseline["total"] if self.baseline.get("total") else 0.0

    def fits(self) -> bool | None:
        """Whether the peak fits ``settings.gpu_memory`` (``None`` when no size was given)."""
        if self.settings.gpu_memory is None:
            return None
        return self.total <= self.settings.gpu_memory

    def verdict(self) -> str:
        """One line: fits or not, with the headroom or the excess; empty without ``gpu_memory``."""
        limit = self.settings.gpu_memory
        if limit is None:
            return ""
        gib = 2**30
        if self.total <= limit:
            return (
                f"fits: {self.total / gib:.1f} GiB of {limit / gib:.1f} GiB per device "
                f"({(limit - self.total) / gib:.1f} GiB to spare)."
            )
        return (
            f"does not fit: {self.total / gib:.1f} GiB per device needed, {limit / gib:.1f} GiB available "
            f"({(self.total - limit) / gib:.1f} GiB over): try more devices, --activation-checkpointing full, "
            "--layerwise, --chunked-loss or a smaller --batch-size."
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"per_device": {...}, "baseline": {...}, "activations_detail": ..., "settings": ...}`` (JSON)."""
        return {
            "per_device": self.per_device(),
            "baseline": {**self.baseline, "buffers": self.buffers},
            "activations_detail": dict(self.activation_detail),
            "mesh": {"replicas": self.mesh[0], "shard": self.mesh[1]},
            "numel": self.numel,
            "settings": asdict(self.settings),
            "fits": self.fits(),
            "verdict": self.verdict(),
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------ arithmetic
def _rows(dim0: int, shard: int) -> int:
    """Rows of rank 0's ``Shard(0)`` piece (torch.chunk: ``ceil``), the most any rank holds."""
    return math.ceil(dim0 / shard)


def _local_numel(shape: Sequence[int], shard: int) -> int:
    if not shape:
        return 1
    return _rows(shape[0], shard) * math.prod(shape[1:])


def _int8_bytes(shape: Sequence[int]) -> int:
    out_features, in_features = shape
    return out_features * in_features + 4 * out_features * math.ceil(in_features / INT8_GROUP_SIZE)


def _state_bytes_sharded(est: MemoryBreakdown, shard: int, itemsizes: dict[str, int]) -> int:
    """Rank 0's optimizer state when every parameter is split by rows over ``shard`` ranks."""
    total = 0
    for p in est.parameters:
        if not p.trainable:
            continue
        itemsize = itemsizes[p.name]
        if p.update == "low_rank":
            m, n = p.shape
            # Moments (m x r) split by rows, or (r x n) split by columns: r x ceil(max / shard).
            total += 2 * p.rank * math.ceil(max(m, n) / shard) * itemsize + _LOW_RANK_SCALAR_BYTES
        elif p.update == "adamw":
            total += 2 * _local_numel(p.shape, shard) * itemsize + _STEP_BYTES
        else:
            raise ValueError(
                f"the planner does not shard {p.update!r} optimizer state ({p.name}); use an APOLLO or AdamW "
                "optimizer with several devices, or --devices 1."
            )
    return total


def _step_temporaries(est: MemoryBreakdown, shard: int, layerwise: bool, itemsizes: dict[str, int]) -> int:
    """The optimizer step's scratch memory on a GPU (see the module docstring)."""
    adamw = [
        _local_numel(p.shape, shard) * itemsizes[p.name] for p in est.parameters if p.trainable and p.update == "adamw"
    ]
    low_rank = [
        p.rank * math.ceil(max(p.shape) / shard) * itemsizes[p.name]
        for p in est.parameters
        if p.trainable and p.update == "low_rank"
    ]
    # foreach AdamW: one sqrt(exp_avg_sq) list at once; layer-wise: one parameter's.
    adamw_bytes = (max(adamw, default=0) if layerwise else sum(adamw)) if adamw else 0
    chunk = 4 * APOLLO_CHUNK_ELEMENTS  # fp32 elements of one chunk's R
    low_rank_bytes = 2 * max(min(sum(low_rank), chunk), max(low_rank, default=0)) if low_rank else 0
    return max(adamw_bytes, low_rank_bytes) if layerwise else adamw_bytes + low_rank_bytes


def _loss_transient(settings: PlanSettings, vocab: int, hidden: int, compute_itemsize: int) -> int:
    """The loss's backward beyond the saved tensors: the logits' gradient (fp32, twice, and its
    cast to the compute dtype), or one chunk's with the chunked loss (plus the hidden's gradient)."""
    tokens = settings.batch_size * settings.seq_len
    if settings.chunked_loss:
        # One chunk's fp32 logits (and their cast), the hidden states' gradient, and the head's
        # weight gradient, accumulated there before it becomes the parameter's .grad.
        rows = min(settings.loss_chunk_size, tokens)
        cast = rows * vocab * compute_itemsize if compute_itemsize != 4 else 0
        return rows * vocab * 4 + cast + tokens * hidden * compute_itemsize + vocab * hidden * compute_itemsize
    cast = tokens * vocab * compute_itemsize if compute_itemsize != 4 else 0
    return 2 * tokens * vocab * 4 + cast


def _head_shape(model: nn.Module) -> tuple[int, int]:
    """``(vocab, hidden)`` of the output head: the last 2-D weight with the largest first dim."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return tuple(weight.shape)  # type: ignore[return-value]
    matrices = [p for p in model.parameters() if p.dim() == 2]
    return tuple(max(matrices, key=lambda p: p.shape[0]).shape) if matrices else (0, 0)  # type: ignore[return-value]


def _block_numel(blocks: Sequence[nn.Module], model: nn.Module) -> int:
    units = list(blocks) or [model]
    return max(sum(p.numel() for p in unit.parameters()) for unit in units)


def plan(
    model: nn.Module,
    settings: PlanSettings,
    *,
    loss_fn: LossFn,
    blocks: Sequence[nn.Module] = (),
    apply_checkpointing: Callable[[nn.Module, str], Any] | None = None,
    target_modules: Any = None,
    full_loss_fn: LossFn | None = None,
    selective_ops: frozenset[Any] = frozenset(),
) -> MemoryPlan:
    """Bytes per device of training ``model`` with ``settings`` (see the module docstring).

    Args:
        model: built on the meta device, in fp32 (the planner casts for ``bf16-true``); it may be
            modified (checkpointing applied): pass a model built for the planner.
        settings: the run (:class:`PlanSettings`); checked first.
        loss_fn: ``loss_fn(model, input_ids) -> loss``: the model's own loss, or the chunked one.
        blocks: the transformer blocks (per-block activations, FSDP units, checkpointing).
        apply_checkpointing: ``apply_checkpointing(model, policy)`` wraps the blocks (needed for
            ``settings.activation_checkpointing``).
        target_modules: APOLLO's low-rank modules, as for :func:`~lightning_memopt.memory.estimate`.
        full_loss_fn: the model's own loss (full logits) for the baseline, when ``loss_fn`` is
            a chunked one; default ``loss_fn``.
        selective_ops: the aten ops whose outputs the ``"selective"`` policy keeps
            (``lightning_memopt.layers.checkpointing.SAVED_OPS``).

    Raises:
        ValueError: a bad setting (see :meth:`PlanSettings.validate`), or checkpointing asked
            for without ``apply_checkpointing``.

    Example:
        >>> with torch.device("meta"):
        ...     model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 100))
        >>> p = plan(model, PlanSettings("adamw", devices=2, batch_size=1, seq_len=4),
        ...          loss_fn=lambda m, ids: m(ids).float().logsumexp(-1).mean())
        >>> p.params == p.baseline["params"] == 4 * (50 * 16 + 50 * 16 + 50)  # half the rows each
        True
    """
    _, shard = settings.validate()
    if settings.activation_checkpointing and apply_checkpointing is None:
        raise ValueError("activation checkpointing needs apply_checkpointing(model, policy) to wrap the blocks.")
    true_dtype = torch.bfloat16 if settings.precision == "bf16-true" else None
    autocast = torch.bfloat16 if settings.precision == "bf16-mixed" else None
    compute_itemsize = 4 if settings.precision == "32-true" else 2
    notes: list[str] = []

    # Parameters, gradients, optimizer state.
    if true_dtype is not None:
        model = model.to(true_dtype)
    est = estimate(model, settings.optimizer, settings.options, target_modules=target_modules)
    quantized = set()
    if settings.int8_weights:
        quantized = {f"{name}.weight" for name in select_low_rank_modules(model, None)}
    itemsizes = {name: p.element_size() for name, p in model.named_parameters()}
    params = grads_sum = grads_max = numel = 0
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        numel += p.numel()
        params += _int8_bytes(shape) if name in quantized else _local_numel(shape, shard) * itemsizes[name]
        if p.requires_grad:
            grad = _local_numel(shape, shard) * itemsizes[name]
            grads_sum, grads_max = grads_sum + grad, max(grads_max, grad)
    # FSDP2 leaves buffers whole on every rank.
    buffers = est.buffers_bytes
    if shard == 1:
        state = est.optimizer_state_bytes + est.projection_cache_bytes
    else:
        state = _state_bytes_sharded(est, shard, itemsizes)
        if est.projection_cache_bytes:
            notes.append("APOLLO's projection cache is left out on a sharded mesh (a few MiB per device).")
    grads = grads_max if settings.layerwise else grads_sum
    temporaries = _step_temporaries(est, shard, settings.layerwise, itemsizes)
    vocab, hidden = _head_shape(model)
    # Gathered in the parameters' own dtype (bf16-mixed is autocast: fp32 weights, cast per op).
    param_bytes_per_block = _block_numel(blocks, model) * (2 if true_dtype is not None else 4)
    # Two blocks gathered (the current one and the prefetched next), one block's unsharded gradients.
    fsdp = 3 * param_bytes_per_block if shard > 1 else 0

    # Activations: the plain forward (the per-block figure a checkpointed block recomputes), the
    # baseline's (fp32, full logits), then the run's own, checkpointed as asked.
    def count(loss: LossFn, dtype: torch.dtype | None, autocast_dtype: torch.dtype | None) -> ActivationCount:
        return count_activations(
            model,
            settings.batch_size,
            settings.seq_len,
            loss_fn=loss,
            blocks=blocks,
            dtype=dtype,
            autocast_dtype=autocast_dtype,
        )

    plain = count(loss_fn, None, autocast)
    full_loss = full_loss_fn or loss_fn
    same_as_baseline = settings.precision == "32-true" and (full_loss is loss_fn)
    base_saved = plain.saved if same_as_baseline else count(full_loss, torch.float32, None).saved
    counted, block_transient = plain, 0
    if settings.activation_checkpointing:
        apply_checkpointing(model, settings.activation_checkpointing)  # type: ignore[misc]
        counted = count_activations(
            model,
            settings.batch_size,
            settings.seq_len,
            loss_fn=loss_fn,
            blocks=blocks,
            autocast_dtype=autocast,
            selective_ops=selective_ops if settings.activation_checkpointing == "selective" else frozenset(),
        )
        # Backward recomputes one block at a time: its full activations come back, and the
        # gradients of its largest tensors (that of the output and that of the input) pass through.
        block_transient = max(plain.per_block, default=0) + 2 * plain.largest
    loss_transient = _loss_transient(settings, vocab, hidden, compute_itemsize)
    # The loss's backward comes first, with everything saved; a block's recomputation later, when
    # the logits and the loss's tensors are gone.
    activations = max(counted.saved + loss_transient, counted.saved - counted.head + block_transient)
    detail = {
        "saved": counted.saved,
        "blocks": len(counted.per_block),
        "per_block": max(counted.per_block, default=0),
        "embeddings": counted.embeddings,
        "head_and_loss": counted.head,
        "backward_peak": activations - counted.saved,
        "autocast_weight_copies": counted.weight_casts,
    }
    if counted.weight_casts:
        notes.append(
            f"{counted.weight_casts / 2**30:.2f} GiB of the activations are bf16 copies of the weights that "
            "torch.autocast (bf16-mixed) keeps from forward to backward; bf16-true has none."
        )
    if settings.layerwise:
        total = params + buffers + state + fsdp + activations + grads + temporaries
    else:
        total = params + buffers + state + fsdp + max(activations, grads + temporaries)

    # The fp32 AdamW baseline on the same mesh: fp32 weights, no checkpointing, full logits.
    base_params = sum(4 * _local_numel(tuple(p.shape), shard) for p in model.parameters())
    base_grads = sum(4 * _local_numel(tuple(p.shape), shard) for p in model.parameters() if p.requires_grad)
    base_settings = replace(settings, chunked_loss=False, precision="32-true")
    baseline = {
        "params": base_params,
        "grads": base_grads,
        "optimizer_state": 2 * base_grads,
        "activations": base_saved + _loss_transient(base_settings, vocab, hidden, 4),
        "temporaries": base_grads,  # foreach AdamW: one sqrt(exp_avg_sq) list
        "fsdp_buffers": 3 * _block_numel(blocks, model) * 4 if shard > 1 else 0,
    }
    baseline["total"] = (
        base_params
        + buffers
        + baseline["optimizer_state"]
        + baseline["fsdp_buffers"]
        + max(baseline["activations"], base_grads + baseline["temporaries"])
    )
    return MemoryPlan(
        settings=settings,
        mesh=settings.mesh(),
        params=params,
        grads=grads,
        optimizer_state=state,
        activations=activations,
        temporaries=temporaries,
        fsdp_buffers=fsdp,
        buffers=buffers,
        total=total,
        baseline=baseline,
        numel=numel,
        activation_detail=detail,
        notes=notes,
    )
