"""APOLLO as the paper writes it, in float64, for the tests to compare against.

The reference re-creates each matrix's projection with :func:`gaussian_projection` from the
seed the optimizer keeps in its state and the window ``(step - 1) // update_proj_gap``, then
follows the algorithm of arXiv 2412.05270 step by step: project, Adam with bias correction,
channel- or tensor-wise scaling of the raw gradient, norm-growth limiter, decoupled weight
decay.
"""

from __future__ import annotations

import math

import torch

from lightning_memopt.optim import gaussian_projection

# Tall (m >= n: R = G Pᵀ, channels are rows), wide (m < n: R = Pᵀ G, channels are columns), square.
SHAPES = [(12, 5), (6, 14), (7, 7)]
# Wide, with more rows than the CPU's column norms add up at once (64; see kernels.channel_norms).
MANY_ROWS_WIDE = (70, 90)


def make_problem(steps: int, shapes=SHAPES, seed: int = 0, growth: float = 1.0):
    """Initial weights and a gradient sequence; ``growth`` > 1 makes the gradients grow
    geometrically, so that the norm-growth limiter engages."""
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) * growth**t for s in shapes] for t in range(steps)]
    return weights, grads


def run_optimizer(cls, weights, grads, **options):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = cls(params, **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


def reference_apollo(
    weights,
    grads,
    seeds,
    *,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-2,
    rank=256,
    scale_type="channel",
    scale=1.0,
    update_proj_gap=200,
    norm_growth_limit=1.01,
    projection_dtype=None,
):
    """APOLLO as the paper writes it, one matrix at a time, in float64. With
    ``projection_dtype``, ``G`` and ``P`` are rounded to it for the projection, and so is ``R``
    (what a matmul in that dtype returns)."""

    def rounded(t):
        return t if projection_dtype is None else t.to(projection_dtype).double()

    beta1, beta2 = betas
    out = []
    for i, w in enumerate(weights):
        w = w.double().clone()
        m, n = w.shape
        r = min(rank, m, n)
        exp_avg = exp_avg_sq = None
        prev_norm = None
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[i].double()
            window = (t - 1) // update_proj_gap
            if m >= n:
                p = rounded(gaussian_projection(seeds[i], window, r, n, rank=r, dtype=torch.float64))
                proj_grad, channel_dim = rounded(rounded(g) @ p.T), 1  # m x r, one channel per row
            else:
                p = rounded(gaussian_projection(seeds[i], window, m, r, rank=r, dtype=torch.float64))
                proj_grad, channel_dim = rounded(p.T @ rounded(g)), 0  # r x n, one channel per column
            if exp_avg is None:
                exp_avg, exp_avg_sq = torch.zeros_like(proj_grad), torch.zeros_like(proj_grad)
            exp_avg = beta1 * exp_avg + (1 - beta1) * proj_grad
            exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * proj_grad**2
            m_hat = exp_avg / (1 - beta1**t)
            v_hat = exp_avg_sq / (1 - beta2**t)
            normalized = m_hat / (v_hat.sqrt() + eps)
            if scale_type == "channel":
                factor = normalized.norm(dim=channel_dim, keepdim=True) / (
                    proj_grad.norm(dim=channel_dim, keepdim=True) + 1e-8
                )
            else:
                factor = normalized.norm() / (proj_grad.norm() + 1e-8)
            update = g * factor
            if norm_growth_limit is not None:
                norm = update.norm()
                if prev_norm is not None and norm / (prev_norm + 1e-8) > norm_growth_limit:
                    update = update * (norm_growth_limit / (norm / (prev_norm + 1e-8)))
                prev_norm = update.norm()
            w = w * (1 - lr * weight_decay) - lr * math.sqrt(scale) * update
        out.append(w)
    return out


def seeds_of(optimizer, params):
    return [int(optimizer.state[p]["seed"]) for p in params]


def assert_matches_reference(params, expected, rtol=1e-5, atol=1e-6):
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=rtol, atol=atol)
