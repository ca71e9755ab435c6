"""Hardware tuning of APOLLO's step, kept apart from its math (:mod:`.apollo_math`).

Each function here computes exactly what its name says, as a plain PyTorch expression would,
but in a way that is faster (mostly on the CPU) or allocates less. The math module calls them;
none of them knows about optimizers. Why each trick exists, in one line, beside it; the
measurements behind them are in ``benchmarks/results/optimizer_step_history.md``.

Example:
    >>> m = torch.randn(100, 7)
    >>> torch.allclose(channel_norms(m, 0), m.norm(dim=0, keepdim=True))
    True
    >>> all_finite([m, torch.tensor(float("inf"))])
    False
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw as functional_adamw

from .workspace import Workspace

# finite_witness reads float32 tensors of at least twice this many elements as a dot product
# of their halves (smaller ones are not worth it).
FINITE_DOT_MIN = 1 << 16
# Rows per slice when channel_norms sums squared columns on the CPU: the running sums of a
# slice's height stay in the cache.
COLUMN_NORM_ROWS = 64
# bitsandbytes quantises 8-bit moments in blocks of this many elements (its blockwise kernel).
BLOCK_8BIT = 256
# Elements per slice of blockwise_chunks: bitsandbytes' CPU kernel makes about five full-size
# float32 temporaries of the tensor it updates; slices of 4 MiB bound them.
CPU_8BIT_CHUNK = 4096 * BLOCK_8BIT


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host synchronisation per device.

    Each tensor is reduced to one number that is NaN or infinite when an entry is (see
    :func:`finite_witness`); those are stacked and checked together.

    Example:
        >>> all_finite([torch.zeros(3), torch.ones(2, 2)])
        True
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(finite_witness(t))
    return all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())


def finite_witness(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 scalar that is NaN or infinite when an entry of ``tensor`` is, read in one pass.

    A sum is (inf - inf is NaN). For a large contiguous float32 tensor, the dot product of its
    two halves is too (inf * 0 is NaN). Products of entries overflow only beyond ~1e19, far
    past any usable gradient; float16 sums are taken in float32, as float16 overflows past 65504.

    Example:
        >>> bool(torch.isfinite(finite_witness(torch.ones(5))))
        True
    """
    if tensor.dim() == 0 and tensor.dtype == torch.float32:  # a norm already
        return tensor
    if tensor.dtype == torch.float32 and tensor.is_contiguous() and tensor.numel() >= 2 * FINITE_DOT_MIN:
        # Why: on the CPU a dot product reads two streams at once, drawing more bandwidth than a sum.
        flat = tensor.view(-1)
        half = flat.numel() // 2
        witness = torch.dot(flat[:half], flat[half : 2 * half])
        return witness + flat[-1] if flat.numel() % 2 else witness
    if tensor.element_size() < 4 and tensor.is_floating_point():
        return tensor.sum(dtype=torch.float32)
    return tensor.sum().float()


def frobenius_norm(matrix: torch.Tensor) -> torch.Tensor:
    """``||matrix||_F`` as a 0-d tensor.

    Example:
        >>> frobenius_norm(torch.tensor([[3.0, 4.0]]))
        tensor(5.)
    """
    if matrix.is_contiguous() and matrix.dtype in (torch.float32, torch.float64) and matrix.numel():
        # Why: a BLAS dot product of the matrix with itself is one vectorised read, faster on the
        # CPU than vector_norm (it overflows to inf only for entries beyond ~1e19).
        flat = matrix.view(-1)
        return torch.dot(flat, flat).sqrt_()
    return torch.linalg.vector_norm(matrix)


def channel_norms(matrix: torch.Tensor, dim: int, workspace: Workspace | None = None) -> torch.Tensor:
    """Euclidean norms of ``matrix`` along ``dim``, keeping the reduced dimension (what
    ``torch.linalg.vector_norm(matrix, dim=dim, keepdim=True)`` returns).

    ``workspace`` lends the CPU's running sums for ``dim=0`` (else they are allocated).

    Example:
        >>> channel_norms(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), 0)
        tensor([[5., 1.]])
    """
    if dim == 0 and matrix.dtype in (torch.float32, torch.float64):
        # Why: vector_norm reduces the leading dimension of a row-major matrix far slower on the
        # CPU than summing its squared rows.
        rows, cols = matrix.shape
        if matrix.device.type != "cpu" or rows <= COLUMN_NORM_ROWS:
            return matrix.square().sum(dim=0, keepdim=True).sqrt_()
        # Why: fused multiply-adds of COLUMN_NORM_ROWS rows at a time into running sums that stay
        # in the cache, and no temporary of the matrix's size (whose fresh pages cost more than
        # the arithmetic).
        shape = (COLUMN_NORM_ROWS, cols)
        if workspace is None:
            sums = torch.empty(shape, dtype=matrix.dtype)
        else:
            (sums,) = workspace.take("column_norms", [shape], matrix.dtype, matrix.device)
        head = matrix[:COLUMN_NORM_ROWS]
        torch.mul(head, head, out=sums)
        for start in range(COLUMN_NORM_ROWS, rows, COLUMN_NORM_ROWS):
            block = matrix[start : start + COLUMN_NORM_ROWS]
            sums[: block.shape[0]].addcmul_(block, block)
        return sums.sum(dim=0, keepdim=True).sqrt_()
    return torch.linalg.vector_norm(matrix, dim=dim, keepdim=True)


def project_into(grad: torch.Tensor, proj: torch.Tensor, out: torch.Tensor, workspace: Workspace) -> None:
    """``out = R``, APOLLO's projected gradient (``G Pᵀ`` for a tall ``grad``, else ``Pᵀ G``; see
    :func:`.project_gradient`), taken in ``proj``'s dtype through ``workspace``: no temporary is
    allocated on the CPU, whatever the projection dtype.

    Example:
        >>> g, p, out = torch.randn(8, 4), torch.randn(2, 4), torch.empty(8, 2)
        >>> project_into(g, p, out, Workspace())
        >>> torch.allclose(out, g @ p.T)
        True
    """
    tall = grad.shape[0] >= grad.shape[1]
    if grad.dtype != proj.dtype:
        (work,) = workspace.take("grad_in_projection_dtype", [grad.shape], proj.dtype, grad.device)
        grad = work.copy_(grad)
    target = out
    if out.dtype != proj.dtype:
        (target,) = workspace.take("projected_in_projection_dtype", [out.shape], proj.dtype, out.device)
    rank = proj.shape[0] if tall else proj.shape[1]
    if rank == 1 and tall and grad.device.type == "cpu":
        # Why: MKL's gemv streams a tall G at a third of the memory bandwidth on an AMD Zen 4
        # CPU, its gemm with a two-column operand at full speed: multiply by [p, 0], keep column 0.
        m, n = grad.shape
        operand, pair = workspace.take("rank_one_pair", [(2, n), (m, 2)], proj.dtype, grad.device)
        operand[0].copy_(proj[0])
        operand[1].zero_()
        torch.mm(grad, operand.T, out=pair)
        target.view(-1).copy_(pair[:, 0])
    elif rank == 1:
        # Why: for a wide G (or off the CPU) BLAS's gemv reads G faster than gemm's packing does.
        torch.mv(grad if tall else grad.T, proj[0] if tall else proj[:, 0], out=target.view(-1))
    elif tall:
        torch.mm(grad, proj.T, out=target)
    else:
        torch.mm(proj.T, grad, out=target)
    if target is not out:
        out.copy_(target)


def adam_direction_(
    out: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """Advance Adam's moments (and ``steps``) with ``grads`` and add the bias-corrected
    direction ``M̂ / (sqrt(V̂) + eps)`` to ``out`` (zero it first to get the direction itself).

    Example:
        >>> out, g = [torch.zeros(3)], [torch.tensor([1.0, -2.0, 0.5])]
        >>> adam_direction_(out, g, [torch.zeros(3)], [torch.zeros(3)], [torch.tensor(0.0)], 0.9, 0.999, 0.0)
        >>> out[0].round()  # the first step is the sign of the gradient (up to eps-like rounding)
        tensor([ 1., -1.,  1.])
    """
    # Why: torch's own AdamW kernels (fused on the CPU, foreach elsewhere) do it in one pass over
    # the moments: a "weight" stepped with lr=-1 and no decay moves by exactly the direction.
    on_cpu = all(g.device.type == "cpu" for g in grads)
    functional_adamw(
        out,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=not on_cpu,
        fused=on_cpu,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=-1.0,
        weight_decay=0.0,
        eps=eps,
        maximize=False,
    )


def blockwise_chunks(
    grad: torch.Tensor,
    param: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
) -> list[tuple[torch.Tensor, ...]]:
    """The 8-bit AdamW update's tensors as block-aligned slices of ``CPU_8BIT_CHUNK`` elements
    (views: updating them updates the whole), or whole when a slice would not be a view or the
    kernel is fused (not on the CPU).

    Why: each quantisation block is independent, so updating block-aligned slices in turn gives
    the same bits as the whole tensor with a slice's temporaries instead of the tensor's.

    Example:
        >>> t = torch.zeros(10)
        >>> len(blockwise_chunks(t, t, t, t, torch.zeros(1), torch.zeros(1)))
        1
    """
    tensors = (grad, param, state1, state2)
    if param.device.type != "cpu" or param.numel() <= CPU_8BIT_CHUNK or not all(t.is_contiguous() for t in tensors):
        return [(grad, param, state1, state2, absmax1, absmax2)]
    flat = [t.view(-1) for t in tensors]
    blocks_per_chunk = CPU_8BIT_CHUNK // BLOCK_8BIT
    chunks = []
    for start in range(0, param.numel(), CPU_8BIT_CHUNK):
        first_block = start // BLOCK_8BIT
        elements = slice(start, start + CPU_8BIT_CHUNK)
        blocks = slice(first_block, first_block + blocks_per_chunk)
        chunks.append((*(t[elements] for t in flat), absmax1[blocks], absmax2[blocks]))
    return chunks
