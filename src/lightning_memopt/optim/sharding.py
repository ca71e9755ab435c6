"""Shard-aware APOLLO: the same update on FSDP2's row shards as on the whole matrix.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a DTensor with its
global shape, split by rows (``Shard(0)``) over a device mesh; gradients are DTensors split
the same way. Mixing a DTensor with a plain tensor in one op raises, so the step below works
on each rank's local rows (``to_local()``) and adds exactly the collectives the math needs.

For a weight ``W`` (``m x n``, the global shape) whose rank holds rows ``[a, b)`` of ``G``:

* ``m >= n``: ``R = G Pᵀ`` contracts the unsharded dimension, so ``R``'s rows ``[a, b)``
  are ``G[a:b] Pᵀ``: no collective. The moments (``m x r``) are split by rows like the
  weight (DTensor, ``Shard(0)``), and so are the channels (the rows of ``R``).
* ``m < n``: ``R = Pᵀ G`` (``r x n``) contracts the sharded dimension:
  ``R = sum over ranks of P[a:b]ᵀ G[a:b]``. A reduce-scatter over the ``n`` columns adds
  the partial products and leaves each rank only its slice of ``R``'s columns, so the
  moments (``r x n``) are split by columns (DTensor, ``Shard(1)``) and per-rank optimizer
  memory falls with the number of ranks. The channel factors (one per column) are computed
  on the owning rank and all-gathered (``n`` numbers), because every rank scales all ``n``
  columns of its rows of ``G``.
* Tensor-wise factors (APOLLO-Mini) and the norm-growth limiter need global norms: one
  all-reduce of squared sums, batched over all matrices of a param group.

On a 2-D mesh (HSDP: ``("replicate", "shard")``, placements ``(Replicate(), Shard(0))``) the
rows are split over the ``shard`` dimension only: every collective above runs within a shard
group (:func:`row_layout` picks that dimension's process group), the state is split within the
group and replicated across groups, and the replicas, fed the same averaged gradients, stay
identical without any extra communication. Only the skip-a-step agreement on non-finite
gradients (:func:`all_ranks_finite`) spans every rank.

Every rank draws the same ``P`` (from the parameter's seed, on the CPU) and takes the rows it
needs. Uneven shards (FSDP2 gives the last ranks fewer rows, or none) are handled through
the DTensor's own layout (:func:`row_layout`). The state holds only tensors, and per-shard
state is a DTensor, so ``torch.distributed.checkpoint`` saves, loads and re-shards it (2
ranks to 1 and back); the global state equals the state of the same run on one device.

The math is :mod:`.apollo_math`'s, called as on whole matrices; this module adds only the
collectives. Nothing here imports a trainer or the optimizer: :class:`~lightning_memopt.optim.APOLLO`
dispatches its DTensor parameters to :func:`apollo_step_sharded` by itself, with their state
and projections.

Example (two processes, each after ``torch.distributed.init_process_group("gloo")``):
    >>> # from torch.distributed.fsdp import fully_shard
    >>> # fully_shard(model)
    >>> # opt = APOLLO(apollo_param_groups(model, "all-linear", rank=4), lr=1e-3)
    >>> # loss.backward(); opt.step()   # same update as on one device
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .apollo_math import (
    ApolloHyperparameters,
    adam_normalized,
    apply_update_,
    channel_dim,
    channel_scaling,
    limit_norm_growth_,
    norm_ratio,
    project_gradient,
)
from .kernels import channel_norms

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``.

    Looked up lazily: importing ``torch.distributed.tensor`` costs about a second, and no
    DTensor can exist before something has imported it (single-device APOLLO never does).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    if type(tensor) in _PLAIN_TENSOR_TYPES:  # the common case, checked first: the step calls this often
        return False
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (shares storage: in-place ops under ``no_grad``
    update the DTensor), or the tensor itself.

    Example:
        >>> t = torch.ones(2)
        >>> local_view(t) is t
        True
    """
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class RowLayout:
    """Where a rank's rows of a 2-D DTensor sit, and the process group that holds the rest.

    Attributes:
        mesh: the DTensor's device mesh.
        mesh_dim: the mesh dimension that splits the rows (``Shard(0)``); ``None`` when the
            tensor is whole on every rank (all ``Replicate``).
        group: that dimension's process group; ``None`` when no collective is needed
            (not split, or split over a single rank).
        world_size: ranks in ``group`` (1 without one).
        rank: this rank's index in ``group``.
        row_offset, local_rows: this rank's rows ``[row_offset, row_offset + local_rows)``.
        comm_device: where collectives run (the mesh's device; differs from the shard's
            device under CPU offload).

    Example (rank 1 of 2 holding rows 5..8 of a 9 x 7 weight; no process group needed):
        >>> layout = RowLayout(None, 0, None, 2, 1, 5, 4, torch.device("cpu"))
        >>> layout.rows, layout.column_chunk(7)
        (slice(5, 9, None), (4, 4, 3))
    """

    mesh: DeviceMesh
    mesh_dim: int | None
    group: Any
    world_size: int
    rank: int
    row_offset: int
    local_rows: int
    comm_device: torch.device

    @property
    def rows(self) -> slice:
        return slice(self.row_offset, self.row_offset + self.local_rows)

    def column_chunk(self, n: int) -> tuple[int, int, int]:
        """``(chunk, offset, count)``: DTensor's ``Shard(1)`` split of ``n`` columns
        (``chunk = ceil(n / world_size)`` per rank, the last ranks fewer or none)."""
        chunk = -(-n // self.world_size)
        offset = min(self.rank * chunk, n)
        return chunk, offset, min(chunk, n - offset)


def _comm_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = torch.get_device_module(mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


def row_layout(param: torch.Tensor) -> RowLayout:
    """The :class:`RowLayout` of a 2-D DTensor parameter (FSDP2: ``Shard(0)`` on one mesh
    dimension, ``Replicate`` on the others, as with HSDP).

    Raises:
        NotImplementedError: for other placements (tensor parallelism's ``Shard(1)``,
            ``Partial``, a dimension split twice), which APOLLO does not support yet.

    Example (inside a process group; ``w`` a sharded weight of 7 rows on 2 ranks):
        >>> # row_layout(w).local_rows      # 4 on rank 0, 3 on rank 1
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, tuple(param.placements)
    row_dims = [i for i, pl in enumerate(placements) if type(pl) is Shard and pl.dim == 0]
    others_replicated = all(isinstance(pl, Replicate) for i, pl in enumerate(placements) if i not in row_dims)
    if len(row_dims) > 1 or not others_replicated:
        raise NotImplementedError(
            f"APOLLO: a low-rank parameter of shape {tuple(param.shape)} has DTensor placements {placements}; "
            "APOLLO supports parameters split by rows on one mesh dimension (FSDP2's Shard(0), HSDP) and "
            "replicated on the others. Leave tensor-parallel weights to AdamW (low_rank=False) or shard "
            "them with fully_shard only."
        )
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    mesh_dim = row_dims[0] if row_dims else None
    world_size = mesh.size(mesh_dim) if mesh_dim is not None else 1
    group = mesh.get_group(mesh_dim) if world_size > 1 else None
    rank = mesh.get_local_rank(mesh_dim) if world_size > 1 else 0
    return RowLayout(mesh, mesh_dim, group, world_size, rank, offset[0], local_shape[0], _comm_device(mesh))


def zeros_like_layout(param: torch.Tensor, shape: Sequence[int], split_dim: int | None, dtype: torch.dtype):
    """A zero state tensor of global ``shape`` for ``param``: plain for a plain parameter,
    else a DTensor on the parameter's mesh split along ``split_dim`` where the parameter is
    split by rows (``None``: whole on every rank).

    Example:
        >>> zeros_like_layout(torch.zeros(4, 3), (4, 2), 0, torch.float32).shape
        torch.Size([4, 2])
    """
    if not is_dtensor(param):
        return torch.zeros(tuple(shape), dtype=dtype, device=param.device)
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    layout = row_layout(param)
    placements = [Replicate()] * param.device_mesh.ndim
    if layout.mesh_dim is not None and split_dim is not None:
        placements[layout.mesh_dim] = Shard(split_dim)
    local_shape, _ = compute_local_shape_and_global_offset(tuple(shape), param.device_mesh, placements)
    local = torch.zeros(local_shape, dtype=dtype, device=local_view(param).device)
    stride = torch.empty(tuple(shape), device="meta").stride()
    return DTensor.from_local(
        local, param.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


# ---------------------------------------------------------------------- collectives
def _to_comm(tensor: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    return tensor if tensor.device == layout.comm_device else tensor.to(layout.comm_device)


def all_reduce_sums(layouts: Sequence[RowLayout], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each 1-D ``values[i]`` over ``layouts[i]``'s group, one all-reduce per group.

    Values of unsplit tensors come back unchanged. Used for squared norms, so that a step
    costs one small collective however many matrices it updates.

    Example (a layout without a group: nothing to add up):
        >>> whole = RowLayout(None, None, None, 1, 0, 0, 3, torch.device("cpu"))
        >>> all_reduce_sums([whole], [torch.tensor([2.0])])
        [tensor([2.])]
    """
    results = list(values)
    batches: dict[int, list[int]] = {}
    for i, layout in enumerate(layouts):
        if layout.group is not None:
            batches.setdefault(id(layout.group), []).append(i)
    for indices in batches.values():
        layout = layouts[indices[0]]
        flat = torch.cat([_to_comm(values[i].float().reshape(-1), layout) for i in indices])
        dist.all_reduce(flat, group=layout.group)
        pieces = flat.split([values[i].numel() for i in indices])
        for i, piece in zip(indices, pieces):
            results[i] = piece.to(values[i].device).view(values[i].shape)
    return results


def _reduce_scatter_columns(layout: RowLayout, partial_t: torch.Tensor, n: int) -> torch.Tensor:
    """Sum the ranks' ``n x r`` partials ``partial_t`` (rows padded to ``world_size x chunk``)
    and keep this rank's columns of the ``r x n`` result."""
    chunk, _, count = layout.column_chunk(n)
    out = torch.empty(chunk, partial_t.shape[1], dtype=partial_t.dtype, device=layout.comm_device)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, _to_comm(partial_t, layout), group=layout.group)
    # Contiguous: torch's fused Adam kernel pairs the moments and R element by element in memory.
    return out[:count].T.to(partial_t.device).contiguous()


def _all_gather_columns(layout: RowLayout, local: torch.Tensor, n: int) -> torch.Tensor:
    """All ``n`` per-column values from each rank's ``column_chunk`` slice ``local``."""
    chunk, _, count = layout.column_chunk(n)
    padded = torch.zeros(chunk, dtype=local.dtype, device=layout.comm_device)
    padded[:count] = local
    gathered = torch.empty(chunk * layout.world_size, dtype=local.dtype, device=layout.comm_device)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, padded, group=layout.group)
    return gathered[:n].to(local.device)


def all_ranks_finite(local_ok: bool, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``local_ok`` holds on every rank that shares a mesh with a DTensor in
    ``tensors`` (all ranks must agree to skip a step, or their collectives would part).

    Example:
        >>> all_ranks_finite(True, [torch.zeros(2)])
        True
    """
    meshes = {id(t.device_mesh): t.device_mesh for t in tensors if is_dtensor(t)}
    if not meshes:
        return local_ok
    flag = None
    for mesh in meshes.values():
        device = _comm_device(mesh)
        flag = torch.tensor([0.0 if local_ok else 1.0], device=device) if flag is None else flag.to(device)
        for dim in range(mesh.ndim):
            if mesh.size(dim) > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return bool(flag.item() == 0.0)


# ---------------------------------------------------------------------- the step
def apollo_step_sharded(
    params: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    projections: Sequence[torch.Tensor],
    hyper: ApolloHyperparameters,
) -> None:
    """One APOLLO step for the DTensor matrices ``params`` (see the module doc).

    The functions of :mod:`.apollo_math`, as on whole matrices, on this rank's rows, with the
    collectives that sharding needs; the results agree with one device up to float rounding.
    ``states`` are the matrices' APOLLO states (DTensor moments, see :func:`zeros_like_layout`)
    and ``projections`` their whole projections ``P`` for this step, as the optimizer keeps
    them. Every rank of the mesh must call it with the same parameters, in the same order.

    Example (inside a process group, after ``fully_shard(model)``):
        >>> # opt = APOLLO(apollo_param_groups(model, "all-linear"), lr=1e-3)
        >>> # loss.backward(); opt.step()   # APOLLO.step calls apollo_step_sharded for DTensors
    """
    layouts, channel_dims, grads, projected = [], [], [], []
    for p, proj in zip(params, projections):
        layout = row_layout(p)
        m, n = p.shape
        rank = proj.shape[0] if m >= n else proj.shape[1]
        grad = local_view(p.grad)
        # Algorithm 1, step 1, on this rank's rows [a, b) of G.
        if m >= n:  # R[a:b] = G[a:b] Pᵀ: local.
            r_local = project_gradient(grad, proj, tall=True)
        elif layout.group is None:
            r_local = project_gradient(grad, proj[layout.rows], tall=False)
        else:  # R = sum over ranks of P[a:b]ᵀ G[a:b]: add up and keep this rank's columns.
            # (In the projection dtype: a bf16 projection also halves the reduce-scatter.)
            chunk, _, _ = layout.column_chunk(n)
            partial_t = torch.zeros(chunk * layout.world_size, rank, dtype=proj.dtype, device=grad.device)
            torch.mm(grad.T.to(proj.dtype), proj[layout.rows], out=partial_t[:n])
            r_local = _reduce_scatter_columns(layout, partial_t, n).to(grad.dtype)
        layouts.append(layout)
        channel_dims.append(channel_dim(p.shape))
        grads.append(grad)
        projected.append(r_local)

    # Step 2: Adam on this rank's slice of R: elementwise, no collective.
    normalized = adam_normalized(
        projected,
        [local_view(s["exp_avg"]) for s in states],
        [local_view(s["exp_avg_sq"]) for s in states],
        [s["step"] for s in states],
        betas=hyper.betas,
        eps=hyper.eps,
    )

    # Step 3: the scaling factors. Channel: each channel is whole on one rank (a row of R for
    # m >= n; a column, after the reduce-scatter, for m < n), then all-gathered for m < n, as
    # every rank scales all n columns of its rows of G. Tensor: from global squared norms.
    if hyper.scale_type == "channel":
        factors = []
        for p, layout, r, n_, dim in zip(params, layouts, projected, normalized, channel_dims):
            factor = channel_scaling(n_, r, dim)
            if dim == 0 and layout.group is not None:
                factor = _all_gather_columns(layout, factor.reshape(-1), p.shape[1]).unsqueeze(0)
            factors.append(factor)
    elif hyper.scale_type == "tensor":
        squares = [
            torch.stack([n_.float().square().sum(), r.float().square().sum()]) for r, n_ in zip(projected, normalized)
        ]
        factors = []
        for r, totals in zip(projected, all_reduce_sums(layouts, squares)):
            norm_n, norm_r = totals.sqrt()
            factors.append(norm_ratio(norm_n, norm_r).to(r.dtype))
    else:
        raise NotImplementedError(
            f"APOLLO: scale_type={hyper.scale_type!r} has no sharded (FSDP2) step yet; use 'channel' or 'tensor' "
            "with apollo_fsdp, or write its collectives in optim/sharding.py."
        )
    del normalized, projected

    if hyper.norm_growth_limit is not None:
        # ||G·diag(s)||², summed over this rank's entries, then over the ranks.
        partial = []
        for grad, factor, dim in zip(grads, factors, channel_dims):
            if factor.dim():
                partial.append((factor * channel_norms(grad, dim)).float().square().sum().reshape(1))
            else:
                partial.append((factor.float().square() * grad.float().square().sum()).reshape(1))
        norms = torch.stack([total.sqrt().reshape(()) for total in all_reduce_sums(layouts, partial)])
        limit_norm_growth_(factors, norms, [s["prev_update_norm"] for s in states], hyper.norm_growth_limit)

    # Step 4, on this rank's rows of W.
    apply_update_(
        [local_view(p) for p in params],
        grads,
        factors,
        lr=hyper.lr,
        weight_decay=hyper.weight_decay,
        scale=hyper.scale,
    )
