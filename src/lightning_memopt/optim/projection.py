"""Random projections for APOLLO, drawn reproducibly from a per-parameter seed.

APOLLO never stores its projection matrix in the optimizer state: the matrix for a
parameter is a pure function of ``(seed, window)``, where ``window`` counts how many
``update_proj_gap`` periods have passed. Drawing on the CPU with a dedicated
:class:`torch.Generator` makes the matrix identical on every device, so the same run
gives the same update on CPU and GPU, and a resumed run re-creates exactly the matrix it
was using.

Example:
    >>> p = gaussian_projection(seed=7, window=0, rows=4, cols=16)
    >>> p.shape
    torch.Size([4, 16])
    >>> bool((p == gaussian_projection(7, 0, 4, 16)).all())
    True
"""

from __future__ import annotations

import math

import torch

from .._rng import GOLDEN_GAMMA, MASK64, splitmix64

_MASK63 = (1 << 63) - 1


def projection_seed(seed: int, window: int) -> int:
    """Mix a parameter's seed with its window index into one generator seed.

    The golden-ratio multiple spreads consecutive parameters' seeds apart; splitmix64 makes
    nearby ``(seed, window)`` pairs give unrelated generator seeds.

    Example:
        >>> projection_seed(1, 0) != projection_seed(1, 1)
        True
    """
    return splitmix64((seed * GOLDEN_GAMMA + window + 1) & MASK64) & _MASK63


def gaussian_projection(
    seed: int,
    window: int,
    rows: int,
    cols: int,
    rank: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw a ``rows x cols`` Gaussian matrix with entries of variance ``1 / rank``.

    ``rank`` (default: ``min(rows, cols)``) is the projection rank r; entries are scaled by
    ``1 / sqrt(r)`` as in the APOLLO paper, so that ``E[Pᵀ P] = I``. The draw happens on the
    CPU in float32 and is then moved, so it does not depend on ``device``.

    Example:
        >>> gaussian_projection(0, 3, rows=2, cols=8, rank=2).std() > 0
        tensor(True)
    """
    r = rank if rank is not None else min(rows, cols)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(projection_seed(seed, window))
    matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float32)
    matrix.mul_(1.0 / math.sqrt(r))
    return matrix.to(device=device, dtype=dtype)


def project_gradient(grad: torch.Tensor, proj: torch.Tensor, tall: bool | None = None) -> torch.Tensor:
    """APOLLO's projected gradient: ``R = G Pᵀ`` when the weight has at least as many rows as
    columns (``tall``; ``P`` is ``r x n``), else ``R = Pᵀ G`` (``P`` is ``m x r``). ``tall``
    defaults to ``grad``'s own shape; a shard of a matrix passes the whole matrix's.

    The product is taken in ``proj``'s dtype (the optimizer's ``projection_dtype``), with
    float32 accumulation as every matmul kernel does, and ``R`` is returned in ``grad``'s
    dtype, the dtype of the Adam moments.

    Example:
        >>> g, p = torch.randn(8, 4), torch.randn(2, 4)
        >>> torch.equal(project_gradient(g, p), g @ p.T)
        True
    """
    work = grad if grad.dtype == proj.dtype else grad.to(proj.dtype)
    if tall is None:
        tall = grad.shape[0] >= grad.shape[1]
    projected = work @ proj.T if tall else proj.T @ work
    return projected if projected.dtype == grad.dtype else projected.to(grad.dtype)
