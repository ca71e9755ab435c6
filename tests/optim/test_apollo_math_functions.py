"""APOLLO's pure functions (``optim/apollo_math.py``), each against its closed form in float64,
and the structure around them: one scaling rule = one function, no module cycle, seeds indexed once.
"""

from __future__ import annotations

import math

import grimp
import pytest
import torch
from apollo_reference import make_problem, reference_apollo, run_optimizer, seeds_of

from lightning_memopt.optim import APOLLO, apollo_math, gaussian_projection
from lightning_memopt.optim.apollo_math import (
    RATIO_EPS,
    ApolloHyperparameters,
    ScalingRule,
    adam_normalized,
    apply_update_,
    channel_dim,
    channel_scaling_factors,
    gradient_norms,
    limit_norm_growth_,
    low_rank_shape,
    norm_growth_limiters,
    project_gradient,
    random_projection,
    tensor_scaling_factors,
    update_norms,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# Tall, wide, square, and wide with more rows than the CPU's column norms add up at once (64).
SHAPES = [(12, 5), (6, 14), (7, 7), (70, 90)]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_random_projection_shape_seed_and_variance(shape):
    rank = 3
    p = random_projection(5, 2, shape, rank, dtype=torch.float64)
    m, n = shape
    assert p.shape == ((rank, n) if m >= n else (m, rank))
    assert torch.equal(p, gaussian_projection(5, 2, *p.shape, rank=rank, dtype=torch.float64))
    assert not torch.equal(p, random_projection(5, 3, shape, rank, dtype=torch.float64))  # next window
    # Entries of variance 1/r (200000 draws: the estimate's standard error is about 0.3%).
    big = random_projection(0, 0, (60000, 50000), 4, dtype=torch.float64)
    assert big.shape == (4, 50000) and abs(big.var().item() * 4 - 1.0) < 0.02


@pytest.mark.parametrize("shape", SHAPES)
def test_project_gradient_is_g_pt_or_pt_g(shape):
    g = randn(*shape)
    p = random_projection(1, 0, shape, 3, dtype=torch.float64)
    expected = g @ p.T if shape[0] >= shape[1] else p.T @ g
    torch.testing.assert_close(project_gradient(g, p), expected)
    assert project_gradient(g, p).shape == low_rank_shape(shape, 3)


def test_adam_normalized_is_bias_corrected_adam_direction():
    beta1, beta2, eps = 0.8, 0.95, 1e-6
    r_seq = [randn(4, 3, seed=t).float() for t in range(3)]
    m, v, step = torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor(0.0)
    m64, v64 = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    for t, r in enumerate(r_seq, start=1):
        (n,) = adam_normalized([r], [m], [v], [step], betas=(beta1, beta2), eps=eps)
        m64 = beta1 * m64 + (1 - beta1) * r.double()
        v64 = beta2 * v64 + (1 - beta2) * r.double() ** 2
        expected = (m64 / (1 - beta1**t)) / ((v64 / (1 - beta2**t)).sqrt() + eps)
        torch.testing.assert_close(n.double(), expected, rtol=1e-5, atol=1e-6)
        assert int(step) == t
    # Into given buffers, whatever they held.
    out = [torch.full((4, 3), 7.0)]
    m2, v2 = torch.zeros(4, 3), torch.zeros(4, 3)
    adam_normalized([r_seq[0]], [m2], [v2], [torch.tensor(0.0)], betas=(beta1, beta2), eps=eps, out=out)
    torch.testing.assert_close(out[0], r_seq[0].sign() * (r_seq[0].abs() / (r_seq[0].abs() + eps)))


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_scaling_is_ratio_of_channel_norms(shape):
    r = randn(*low_rank_shape(shape, 66 if shape == (70, 90) else 3), seed=1).float()
    n = randn(*r.shape, seed=2).float()
    r[0].zero_()  # an all-zero channel (row or column 0 of R) must not divide by zero
    dim = channel_dim(shape)
    (factor,) = channel_scaling_factors([n], [r], [dim])
    expected = n.double().norm(dim=dim, keepdim=True) / (r.double().norm(dim=dim, keepdim=True) + RATIO_EPS)
    torch.testing.assert_close(factor.double(), expected, rtol=1e-5, atol=0)
    assert factor.shape == ((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1]))


def test_tensor_scaling_is_ratio_of_frobenius_norms():
    rs = [randn(*low_rank_shape(s, 1), seed=i).float() for i, s in enumerate(SHAPES)]
    ns = [randn(*r.shape, seed=10 + i).float() for i, r in enumerate(rs)]
    factors = tensor_scaling_factors(ns, rs, [channel_dim(s) for s in SHAPES])
    for f, n, r in zip(factors, ns, rs):
        assert f.dim() == 0
        torch.testing.assert_close(f.double(), n.double().norm() / (r.double().norm() + RATIO_EPS), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_update_norms_equal_the_norm_of_the_scaled_gradient(scale_type):
    grads = [randn(*s, seed=i).float() for i, s in enumerate(SHAPES)]
    if scale_type == "channel":
        factors = [randn(s[0], 1, seed=20).abs().float() if s[0] >= s[1] else randn(1, s[1], seed=21).abs().float()
                   for s in SHAPES]  # fmt: skip
    else:
        factors = [torch.tensor(0.5 + i, dtype=torch.float32) for i in range(len(SHAPES))]
    norms = update_norms(factors, [gradient_norms(g, scale_type) for g in grads])
    expected = torch.stack([(g.double() * f.double()).norm() for g, f in zip(grads, factors)])
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=0)


def test_norm_growth_limiter_closed_form():
    limit = 1.01
    prev = torch.tensor([math.inf, 2.0, 2.0, 0.0])
    norms = torch.tensor([5.0, 2.01, 3.0, 1.0])
    limiters, limited = norm_growth_limiters(norms, prev, limit)
    # First step (no previous norm) and growth within the limit pass unchanged; growth beyond it
    # is scaled back to limit x the previous norm (a zero previous norm allows no growth at all).
    expected_limited = torch.minimum(norms, limit * prev)
    expected_limited[0] = 5.0
    torch.testing.assert_close(limited, expected_limited, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(limiters, norms / limited)
    assert limiters[0] == 1.0 and limiters[1] == 1.0

    factors = [torch.tensor(1.0), torch.tensor([[1.0, 2.0]]), torch.tensor(4.0), torch.tensor(1.0)]
    prevs = list(prev.clone().unbind())
    limit_norm_growth_(factors, norms, prevs, limit)
    torch.testing.assert_close(torch.stack(prevs), limited)
    torch.testing.assert_close(factors[2], 4.0 / limiters[2])
    torch.testing.assert_close(factors[1], torch.tensor([[1.0, 2.0]]) / limiters[1])


def test_apply_update_is_decoupled_decay_plus_scaled_gradient():
    w, g = randn(6, 4, seed=1).float(), randn(6, 4, seed=2).float()
    s = randn(6, 1, seed=3).abs().float()
    expected = w.double() * (1 - 0.1 * 0.2) - 0.1 * math.sqrt(9.0) * g.double() * s.double()
    weights = [w.clone()]
    apply_update_(weights, [g], [s], lr=0.1, weight_decay=0.2, scale=9.0)
    torch.testing.assert_close(weights[0].double(), expected, rtol=1e-6, atol=1e-6)


def test_hyperparameters_read_a_tensor_lr_as_a_number():
    group = dict(lr=torch.tensor(0.01), betas=[0.9, 0.99], eps=1e-8, weight_decay=0.0, scale_type="channel",
                 scale=1.0, norm_growth_limit=None)  # fmt: skip
    hyper = ApolloHyperparameters.from_group(group)
    assert hyper.lr == pytest.approx(0.01) and isinstance(hyper.lr, float) and hyper.betas == (0.9, 0.99)


# ---------------------------------------------------------------------- a new scaling rule
def unit_scaling_factors(normalized, projected, channel_dims, workspace=None):
    """A rule for the test: every factor 1, so that APOLLO becomes SGD with decoupled decay."""
    return [torch.ones((), dtype=r.dtype) for r in projected]


@pytest.mark.parametrize("limiter", [None, 1.01], ids=["no-limiter", "limiter"])
def test_a_new_scaling_rule_is_one_function_and_one_entry(monkeypatch, limiter):
    monkeypatch.setitem(apollo_math.SCALING_RULES, "unit", ScalingRule(unit_scaling_factors, "tensor"))
    options = dict(lr=0.05, rank=2, scale_type="unit", scale=4.0, weight_decay=0.1, norm_growth_limit=limiter)
    weights, grads = make_problem(steps=3, growth=1.5)
    params, _ = run_optimizer(APOLLO, weights, grads, **options)
    for w, p, i in zip(weights, params, range(len(weights))):
        expected, prev = w.double(), None
        for step_grads in grads:
            update = step_grads[i].double()
            if limiter is not None:
                norm = update.norm()
                if prev is not None and norm / (prev + RATIO_EPS) > limiter:
                    update = update * (limiter / (norm / (prev + RATIO_EPS)))
                prev = update.norm()
            expected = expected * (1 - 0.05 * 0.1) - 0.05 * 2.0 * update
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_unknown_scale_type_names_the_rules():
    with pytest.raises(ValueError, match=r"scale_type='unit'.*'channel', 'tensor'"):
        APOLLO([torch.nn.Parameter(torch.zeros(4, 4))], scale_type="unit")


# ---------------------------------------------------------------------- structure
def test_optim_modules_import_without_cycles():
    # The math, the kernels and the sharded step sit below the optimizer: none reaches back to it.
    graph = grimp.build_graph("lightning_memopt")
    optim = sorted(m for m in graph.modules if m.startswith("lightning_memopt.optim."))
    cycles = [
        (a, b)
        for a in optim
        for b in graph.find_modules_directly_imported_by(a)
        if b.startswith("lightning_memopt.optim.") and graph.find_shortest_chain(importer=b, imported=a)
    ]
    assert cycles == []
    for low in ("apollo_math", "kernels", "sharding", "projection", "workspace"):
        chain = graph.find_shortest_chain(
            importer=f"lightning_memopt.optim.{low}", imported="lightning_memopt.optim.apollo"
        )
        assert chain is None, chain


def test_projection_seeds_follow_the_index_after_groups_change():
    first = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(3)]
    optimizer = APOLLO(first, lr=1e-2, rank=2, seed=10)
    for p in first:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert [int(optimizer.state[p]["seed"]) for p in first] == [10, 11, 12]
    indices = optimizer._param_indices
    optimizer.step()
    assert optimizer._param_indices is indices  # built once, not per parameter or per step
    later = torch.nn.Parameter(torch.randn(5, 8))
    optimizer.add_param_group({"params": [later]})
    later.grad = torch.randn_like(later)
    optimizer.step()
    assert int(optimizer.state[later]["seed"]) == 13
    # A copy loaded from the state dict draws the same seeds for parameters without state yet.
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in first]
    fresh_later = torch.nn.Parameter(later.detach().clone())
    copy = APOLLO(fresh, lr=1e-2, rank=2, seed=10)
    copy.add_param_group({"params": [fresh_later]})
    copy.load_state_dict(optimizer.state_dict())
    assert copy._param_seed(fresh_later) == 13


def test_dense_step_still_matches_the_float64_reference():
    # The refactor's safety net in one line: the optimizer built on the pure functions follows
    # the paper's math, with the limiter biting.
    options = dict(lr=0.05, rank=3, scale=4.0, update_proj_gap=2, weight_decay=0.1, betas=(0.8, 0.95))
    weights, grads = make_problem(steps=4, growth=1.5)
    params, optimizer = run_optimizer(APOLLO, weights, grads, **options)
    expected = reference_apollo(weights, grads, seeds_of(optimizer, params), **options)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_skip_warnings_of_step_and_step_parameters_point_at_the_caller():
    # step and step_parameters share one path; its warning names the user's line, not torch's wrappers.
    weight = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = APOLLO([weight], rank=2)
    weight.grad = torch.full((4, 4), float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped a step") as caught:
        optimizer.step()
    with pytest.warns(RuntimeWarning, match="skipped the update of a parameter") as caught_too:
        optimizer.step_parameters([weight])
    assert {w.filename for w in [*caught, *caught_too]} == {__file__}
    assert not optimizer.state[weight]
