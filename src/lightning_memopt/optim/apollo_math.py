"""APOLLO's math as small pure functions, one per step of the paper's Algorithm 1.

Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance" (arXiv 2412.05270), Algorithm 1
("AdamW with APOLLO"), for a weight matrix ``W`` (``m x n``) with gradient ``G``, rank ``r``:

* Step 1, the gradient in a low-rank space: ``R = G Pᵀ`` or ``Pᵀ G`` with a random Gaussian
  ``P`` of variance ``1/r``, redrawn every ``update_proj_gap`` steps
  (:func:`random_projection`, :func:`project_gradient`).
* Step 2, Adam's moments on ``R``: ``R̃ = M̂ / (sqrt(V̂) + eps)`` (:func:`adam_normalized`).
* Step 3, the approximated gradient scaling factors ``s = ||R̃|| / ||R||`` per channel
  (APOLLO) or per tensor (APOLLO-Mini) (:data:`SCALING_RULES`: :func:`channel_scaling_factors`,
  :func:`tensor_scaling_factors`), then the norm-growth limiter the paper adopts from Fira
  (:func:`norm_growth_limiters`).
* Step 4, the update in the original space: ``W ← W - lr·wd·W - lr·sqrt(scale)·G·diag(s)``
  (:func:`apply_update_`).

The optimizer (:class:`~lightning_memopt.optim.APOLLO`) on whole matrices and the FSDP2 step
(:mod:`.sharding`) on row shards both call these; the sharded one adds only its collectives.
How each is made fast (a CPU's BLAS quirks, scratch buffers) is in :mod:`.kernels`, not here.
A new scaling rule is one function with the signature of :func:`tensor_scaling_factors` and an
entry in :data:`SCALING_RULES` (then ``scale_type`` accepts its name).

Example (one step of one tall matrix, by hand):
    >>> import torch
    >>> g = torch.randn(6, 4)
    >>> p = random_projection(seed=0, window=0, shape=g.shape, rank=2)
    >>> r = project_gradient(g, p)                       # step 1: 6 x 2
    >>> m, v, step = torch.zeros_like(r), torch.zeros_like(r), torch.tensor(0.0)
    >>> n = adam_normalized([r], [m], [v], [step], betas=(0.9, 0.999), eps=1e-8)  # step 2
    >>> s = channel_scaling_factors(n, [r], [channel_dim(g.shape)])  # step 3: 6 x 1
    >>> w = torch.zeros(6, 4)
    >>> apply_update_([w], [g], s, lr=0.1, weight_decay=0.0, scale=1.0)  # step 4
    >>> s[0].shape, bool(w.abs().sum() > 0)
    (torch.Size([6, 1]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import kernels
from .projection import gaussian_projection, project_gradient
from .workspace import Workspace

__all__ = [
    "RATIO_EPS",
    "SCALE_TYPES",
    "SCALING_RULES",
    "ApolloHyperparameters",
    "ScalingRule",
    "adam_normalized",
    "apply_update_",
    "channel_dim",
    "channel_scaling_factors",
    "gradient_norms",
    "limit_norm_growth_",
    "low_rank_shape",
    "norm_growth_limiters",
    "norm_ratio",
    "project_gradient",
    "random_projection",
    "tensor_scaling_factors",
    "update_norms",
]

# Guards the ratio ||R̃|| / ||R|| against an all-zero channel (same constant as the paper's code).
RATIO_EPS = 1e-8


@dataclass(frozen=True)
class ApolloHyperparameters:
    """The numbers one APOLLO step of a param group uses (a group's keys, read once).

    Example:
        >>> h = ApolloHyperparameters.from_group({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
        ...     "weight_decay": 0.0, "scale_type": "tensor", "scale": 128.0, "norm_growth_limit": 1.01})
        >>> h.scale_type, h.lr
        ('tensor', 0.001)
    """

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    scale_type: str
    scale: float
    norm_growth_limit: float | None

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> ApolloHyperparameters:
        lr = group["lr"]
        return cls(
            lr=lr.item() if isinstance(lr, torch.Tensor) else lr,
            betas=tuple(group["betas"]),  # type: ignore[arg-type]
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            scale_type=group["scale_type"],
            scale=group["scale"],
            norm_growth_limit=group["norm_growth_limit"],
        )


# ---------------------------------------------------------------------- shapes
def low_rank_shape(shape: Sequence[int], rank: int) -> tuple[int, int]:
    """The shape of ``R`` and of its Adam moments for an ``m x n`` matrix: ``m x r`` when
    ``m >= n`` (the smaller dimension is compressed), else ``r x n``.

    Example:
        >>> low_rank_shape((12, 5), 3), low_rank_shape((6, 14), 3)
        ((12, 3), (3, 14))
    """
    m, n = shape
    return (m, rank) if m >= n else (rank, n)


def channel_dim(shape: Sequence[int]) -> int:
    """The dimension that norms over one channel reduce: the channels are the rows of ``R``
    (and of ``G``) when ``m >= n`` (reduce dim 1), else its columns (reduce dim 0).

    Example:
        >>> channel_dim((12, 5)), channel_dim((6, 14))
        (1, 0)
    """
    return 1 if shape[0] >= shape[1] else 0


# ---------------------------------------------------------------------- step 1
def random_projection(
    seed: int,
    window: int,
    shape: Sequence[int],
    rank: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Algorithm 1, step 1: the random projection ``P`` of an ``m x n`` matrix, entries drawn from
    ``N(0, 1/r)``, ``r x n`` when ``m >= n`` (``R = G Pᵀ``), else ``m x r`` (``R = Pᵀ G``).

    A pure function of ``(seed, window)``: ``window = step // update_proj_gap`` redraws it every
    ``update_proj_gap`` steps, and nothing needs to be stored (see :mod:`.projection`).

    Example:
        >>> random_projection(3, 0, (12, 5), rank=2).shape, random_projection(3, 0, (6, 14), rank=2).shape
        (torch.Size([2, 5]), torch.Size([6, 2]))
    """
    m, n = shape
    rows, cols = (rank, n) if m >= n else (m, rank)
    return gaussian_projection(seed, window, rows, cols, rank=rank, device=device, dtype=dtype)


# ---------------------------------------------------------------------- step 2
def adam_normalized(
    projected: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    betas: tuple[float, float],
    eps: float,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Algorithm 1, step 2: advance Adam's moments of each ``R`` (in place, with ``steps``) and
    return ``R̃ = M̂ / (sqrt(V̂) + eps)``, with the bias corrections ``M̂ = M / (1 - beta1^t)``,
    ``V̂ = V / (1 - beta2^t)``; written into ``out`` if given (else new tensors).

    Example:
        >>> r, m, v = [torch.tensor([[2.0, -3.0]])], [torch.zeros(1, 2)], [torch.zeros(1, 2)]
        >>> [n.round() for n in adam_normalized(r, m, v, [torch.tensor(0.0)], betas=(0.9, 0.99), eps=0.0)]
        [tensor([[ 1., -1.]])]
    """
    if out is None:
        out = [torch.zeros_like(r) for r in projected]
    else:
        torch._foreach_zero_(out)
    kernels.adam_direction_(out, projected, exp_avgs, exp_avg_sqs, steps, betas[0], betas[1], eps)
    return out


# ---------------------------------------------------------------------- step 3
def norm_ratio(norm_normalized: torch.Tensor, norm_projected: torch.Tensor) -> torch.Tensor:
    """A scaling factor from two norms: ``||R̃|| / (||R|| + RATIO_EPS)`` (elementwise).

    Example:
        >>> norm_ratio(torch.tensor([2.0, 0.0]), torch.tensor([4.0, 0.0]))
        tensor([0.5000, 0.0000])
    """
    return norm_normalized / (norm_projected + RATIO_EPS)


def channel_scaling(
    normalized: torch.Tensor, projected: torch.Tensor, dim: int, workspace: Workspace | None = None
) -> torch.Tensor:
    """Algorithm 1, step 3 (APOLLO): one factor per channel, ``s_c = ||R̃_c|| / ||R_c||``, the
    norms reducing ``dim`` (see :func:`channel_dim`); shaped to broadcast over ``G``.

    Example:
        >>> channel_scaling(torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]]), dim=1)
        tensor([[0.5000]])
    """
    norm_r = kernels.channel_norms(projected, dim, workspace).add_(RATIO_EPS)
    return kernels.channel_norms(normalized, dim, workspace).div_(norm_r)


def channel_scaling_factors(
    normalized: list[torch.Tensor],
    projected: list[torch.Tensor],
    channel_dims: list[int],
    workspace: Workspace | None = None,
) -> list[torch.Tensor]:
    """:func:`channel_scaling` of each matrix (``scale_type="channel"``: APOLLO).

    Example:
        >>> channel_scaling_factors([torch.ones(2, 3)], [2 * torch.ones(2, 3)], [0])[0]
        tensor([[0.5000, 0.5000, 0.5000]])
    """
    return [channel_scaling(n, r, dim, workspace) for n, r, dim in zip(normalized, projected, channel_dims)]


def tensor_scaling_factors(
    normalized: list[torch.Tensor],
    projected: list[torch.Tensor],
    channel_dims: list[int],
    workspace: Workspace | None = None,
) -> list[torch.Tensor]:
    """Algorithm 1, step 3, tensor-wise (``scale_type="tensor"``: APOLLO-Mini): one factor per
    matrix, ``s = ||R̃||_F / ||R||_F`` (0-d tensors; ``channel_dims`` and ``workspace`` unused).

    Example:
        >>> tensor_scaling_factors([torch.ones(2, 2)], [2 * torch.ones(2, 2)], [1])
        [tensor(0.5000)]
    """
    # Why vectors: one norm of each list, a few vector operations whatever the number of matrices.
    ratios = norm_ratio(torch.stack(torch._foreach_norm(normalized)), torch.stack(torch._foreach_norm(projected)))
    return list(ratios.unbind())


ScalingFactors = Callable[[list[torch.Tensor], list[torch.Tensor], list[int], "Workspace | None"], list[torch.Tensor]]


@dataclass(frozen=True)
class ScalingRule:
    """A ``scale_type``: how its factors are computed, and their grain (``"channel"``: one per
    channel, ``"tensor"``: one per matrix), which says which norms of ``G`` the limiter needs.

    Example:
        >>> SCALING_RULES["tensor"].grain
        'tensor'
    """

    factors: ScalingFactors
    grain: str


# The scale types, by name (``scale_type``). A new one: a function and a line here.
SCALING_RULES: dict[str, ScalingRule] = {
    "channel": ScalingRule(channel_scaling_factors, "channel"),
    "tensor": ScalingRule(tensor_scaling_factors, "tensor"),
}
SCALE_TYPES = tuple(SCALING_RULES)


def gradient_norms(grad: torch.Tensor, scale_type: str, workspace: Workspace | None = None) -> torch.Tensor:
    """The norms of ``G`` at the grain of ``scale_type``'s factors: per channel, or of the whole
    matrix. ``||G·diag(s)|| = ||(norms of G)·s||``, so the limiter never forms ``G·diag(s)``.

    Example:
        >>> gradient_norms(torch.tensor([[3.0, 4.0]]), "tensor")
        tensor(5.)
    """
    if SCALING_RULES[scale_type].grain == "channel":
        return kernels.channel_norms(grad, channel_dim(grad.shape), workspace)
    return kernels.frobenius_norm(grad)


def update_norms(factors: list[torch.Tensor], grad_norms: list[torch.Tensor]) -> torch.Tensor:
    """``||G·diag(s)||`` of each matrix, from the norms of ``G`` at the factors' grain
    (:func:`gradient_norms`), as a float32 vector.

    Example:
        >>> update_norms([torch.tensor(0.5)], [torch.tensor(4.0)])
        tensor([2.])
    """
    if all(f.dim() == 0 for f in factors):  # one factor per matrix: a product of two vectors
        return torch.stack(grad_norms).float() * torch.stack(factors).float()
    return torch.stack([torch.linalg.vector_norm(f * g) for f, g in zip(factors, grad_norms)]).float()


def norm_growth_limiters(
    update_norms: torch.Tensor, prev_norms: torch.Tensor, limit: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm-growth limiter (``gamma = limit``, 1.01 in the paper): an update whose norm grew
    more than ``limit``-fold since the previous step is scaled back to ``limit`` times that norm.

    Returns the divisors of the factors, ``max(||u_t|| / ||u_{t-1}||, gamma) / gamma`` (1 when the
    growth is within the limit), and the limited norms to remember for the next step. Vectors,
    one entry per matrix; ``prev_norms`` is ``inf`` before a matrix's first step.

    Example:
        >>> norm_growth_limiters(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), 1.5)
        (tensor([1.3333, 1.0000]), tensor([1.5000, 1.0000]))
    """
    limiters = update_norms / (prev_norms + RATIO_EPS)
    limiters.clamp_min_(limit).div_(limit)
    return limiters, update_norms / limiters


def limit_norm_growth_(
    factors: list[torch.Tensor], update_norms: torch.Tensor, prev_norms: list[torch.Tensor], limit: float
) -> None:
    """Apply :func:`norm_growth_limiters`: divide ``factors`` in place and store the limited norms
    in ``prev_norms`` (each matrix's ``prev_update_norm`` state).

    Example:
        >>> factors, prev = [torch.tensor(1.0)], [torch.tensor(1.0)]
        >>> limit_norm_growth_(factors, torch.tensor([2.0]), prev, 1.5)
        >>> factors, prev
        ([tensor(0.7500)], [tensor(1.5000)])
    """
    limiters, limited = norm_growth_limiters(update_norms, torch.stack(prev_norms), limit)
    torch._foreach_copy_(prev_norms, limited.unbind())
    torch._foreach_div_(factors, [d.to(f.dtype) for d, f in zip(limiters.unbind(), factors)])


# ---------------------------------------------------------------------- step 4
def apply_update_(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    factors: list[torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    scale: float,
) -> None:
    """Algorithm 1, step 4, in place: decoupled weight decay, then the scaled raw gradient,
    ``W ← W·(1 - lr·wd) - lr·sqrt(scale)·G·diag(s)``.

    Example:
        >>> w = [torch.ones(2, 2)]
        >>> apply_update_(w, [torch.ones(2, 2)], [torch.tensor([[1.0], [0.0]])], lr=0.5, weight_decay=0.0, scale=4.0)
        >>> w[0]
        tensor([[0., 0.],
                [1., 1.]])
    """
    if weight_decay != 0.0:
        torch._foreach_mul_(weights, 1.0 - lr * weight_decay)
    factors = [f if f.dtype == g.dtype else f.to(g.dtype) for f, g in zip(factors, grads)]
    torch._foreach_addcmul_(weights, grads, factors, value=-lr * math.sqrt(scale))
