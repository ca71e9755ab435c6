"""APOLLO against the paper's math (the float64 reference in ``apollo_reference.py``), and its
bad-input behaviour."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from apollo_reference import (
    MANY_ROWS_WIDE,
    SHAPES,
    assert_matches_reference,
    make_problem,
    reference_apollo,
    run_optimizer,
    seeds_of,
)

from lightning_memopt.optim import APOLLO, APOLLOMini, gaussian_projection

# Tiny tensors: one thread is as fast, and robust on a shared machine (see conftest).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("limiter", [1.01, None], ids=["limiter", "no-limiter"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-wd", "wd"])
def test_several_steps_match_reference(scale_type, limiter, weight_decay):
    # 5 steps, gap 2: windows 0, 0, 1, 1, 2, so the projection is redrawn twice; growing
    # gradients make the limiter bite; scale 4 checks the sqrt(scale) factor.
    options = dict(
        lr=0.05,
        rank=3,
        scale_type=scale_type,
        scale=4.0,
        update_proj_gap=2,
        norm_growth_limit=limiter,
        weight_decay=weight_decay,
        betas=(0.8, 0.95),
    )
    weights, grads = make_problem(steps=5, shapes=[*SHAPES, MANY_ROWS_WIDE], growth=1.5)
    params, optimizer = run_optimizer(APOLLO, weights, grads, **options)
    expected = reference_apollo(weights, grads, seeds_of(optimizer, params), **options)
    assert_matches_reference(params, expected)


@pytest.mark.parametrize("limiter", [1.01, None], ids=["limiter", "no-limiter"])
def test_channel_scaling_with_rank_above_64_matches_reference(limiter):
    # Rank 66 on a wide matrix: R and N have 66 rows, so their column norms (the scaling
    # factors) are summed in slices of 64 rows on the CPU, as the gradient's (70 rows) are.
    options = dict(lr=0.05, rank=66, scale_type="channel", update_proj_gap=2, norm_growth_limit=limiter)
    weights, grads = make_problem(steps=3, shapes=[MANY_ROWS_WIDE], growth=1.5)
    params, optimizer = run_optimizer(APOLLO, weights, grads, **options)
    assert optimizer.state[params[0]]["exp_avg"].shape == (66, 90)
    expected = reference_apollo(weights, grads, seeds_of(optimizer, params), **options)
    assert_matches_reference(params, expected)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_bf16_projection_matches_reference_with_bf16_rounding(scale_type):
    # G, P and R rounded to bf16 for the projection only; moments, factors and weights stay
    # float32. The kernel accumulates in float32 before rounding R, so an element of R can land
    # one bf16 step away from the float64 reference's: hence the looser tolerance.
    options = dict(lr=0.05, rank=3, scale_type=scale_type, scale=4.0, update_proj_gap=2, betas=(0.8, 0.95))
    weights, grads = make_problem(steps=4, growth=1.2)
    params, optimizer = run_optimizer(APOLLO, weights, grads, projection_dtype="bfloat16", **options)
    seeds = seeds_of(optimizer, params)
    expected = reference_apollo(weights, grads, seeds, projection_dtype=torch.bfloat16, **options)
    assert_matches_reference(params, expected, rtol=2e-3, atol=1e-4)
    full_precision = reference_apollo(weights, grads, seeds, **options)
    assert any(not torch.allclose(p.detach().double(), e, rtol=1e-6, atol=1e-7) for p, e in zip(params, full_precision))
    state = optimizer.state[params[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert {proj.dtype for _, proj in optimizer._projection_cache.values()} == {torch.bfloat16}


@pytest.mark.parametrize("value", ["int8", "bogus", torch.int32, 3])
def test_invalid_projection_dtype_raises(value):
    with pytest.raises(ValueError, match="projection_dtype"):
        APOLLO([torch.nn.Parameter(torch.zeros(4, 4))], projection_dtype=value)


def test_one_step_matches_reference_for_both_sides():
    weights, grads = make_problem(steps=1)
    params, optimizer = run_optimizer(APOLLO, weights, grads, lr=0.1, rank=2)
    expected = reference_apollo(weights, grads, seeds_of(optimizer, params), lr=0.1, rank=2)
    assert_matches_reference(params, expected)
    tall, wide, square = (optimizer.state[p] for p in params)
    assert tall["exp_avg"].shape == (12, 2)  # m x r
    assert wide["exp_avg"].shape == (2, 14)  # r x n
    assert square["exp_avg"].shape == (7, 2)


def test_limiter_engages_in_the_reference_test():
    """The growing gradients of the test above do trigger the limiter (else it tests nothing)."""
    weights, grads = make_problem(steps=5, growth=1.5)
    with_limit, _ = run_optimizer(APOLLO, weights, grads, lr=0.05, rank=3)
    without, _ = run_optimizer(APOLLO, weights, grads, lr=0.05, rank=3, norm_growth_limit=None)
    assert not all(torch.equal(a, b) for a, b in zip(with_limit, without))


def test_limiter_caps_update_norm_growth():
    """With a constant gradient direction growing 10x per step, the realised update of each
    matrix grows at most 1.01x per step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(16, 8))
    base = torch.randn(16, 8)
    optimizer = APOLLO([w], lr=1.0, rank=4, weight_decay=0.0)
    norms = []
    for t in range(4):
        before = w.detach().clone()
        w.grad = base * 10.0**t
        optimizer.step()
        norms.append((w.detach() - before).norm().item())
    for previous, current in itertools.pairwise(norms):
        assert current <= previous * 1.01 * (1 + 1e-5)


def test_bias_correction_first_step_is_scale_free():
    """Bias-corrected Adam on R gives |N| = 1 elementwise at step 1 (for |R| >> eps), so the
    tensor factor is sqrt(r * c) / ||R||: the first update does not depend on beta1/beta2."""
    weights, grads = make_problem(steps=1, shapes=[(10, 4)])
    a, _ = run_optimizer(APOLLO, weights, grads, lr=0.1, rank=4, scale_type="tensor", betas=(0.9, 0.999))
    b, _ = run_optimizer(APOLLO, weights, grads, lr=0.1, rank=4, scale_type="tensor", betas=(0.5, 0.9))
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


def test_projection_is_redrawn_after_update_proj_gap():
    weights, grads = make_problem(steps=3, shapes=[(12, 5)])
    params, optimizer = run_optimizer(APOLLO, weights, grads[:2], lr=0.1, rank=3, update_proj_gap=2)
    p = params[0]
    seed = int(optimizer.state[p]["seed"])
    (key, cached) = optimizer._projection_cache[p]
    assert key == (seed, 0)
    assert torch.equal(cached, gaussian_projection(seed, 0, 3, 5, rank=3))
    p.grad = grads[2][0].clone()
    optimizer.step()
    (key, cached) = optimizer._projection_cache[p]
    assert key == (seed, 1)
    assert torch.equal(cached, gaussian_projection(seed, 1, 3, 5, rank=3))
    assert not torch.equal(cached, gaussian_projection(seed, 0, 3, 5, rank=3))


def test_projection_cache_does_not_change_the_result():
    weights, grads = make_problem(steps=5)
    cached, opt = run_optimizer(APOLLO, weights, grads, lr=0.05, rank=3, update_proj_gap=2)
    fresh, opt_fresh = run_optimizer(APOLLO, weights, grads, lr=0.05, rank=3, update_proj_gap=2, cache_projection=False)
    for a, b in zip(cached, fresh):
        assert torch.equal(a, b)
    assert opt.projection_cache_bytes() == 4 * (3 * 5 + 6 * 3 + 3 * 7)  # r x min(m, n) each
    assert opt_fresh.projection_cache_bytes() == 0


def test_gaussian_projection_is_reproducible_and_scaled():
    a = gaussian_projection(seed=3, window=1, rows=64, cols=512, rank=64)
    assert torch.equal(a, gaussian_projection(3, 1, 64, 512, rank=64))
    assert not torch.equal(a, gaussian_projection(3, 2, 64, 512, rank=64))
    assert not torch.equal(a, gaussian_projection(4, 1, 64, 512, rank=64))
    assert a.var().item() == pytest.approx(1 / 64, rel=0.05)
    # drawn on the CPU in float32 whatever the requested dtype
    assert torch.equal(gaussian_projection(3, 1, 4, 8, dtype=torch.float64), gaussian_projection(3, 1, 4, 8).double())


# ----------------------------------------------------------------------------- APOLLO-Mini
def test_apollo_mini_presets():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    optimizer = APOLLOMini([p])
    assert (optimizer.defaults["rank"], optimizer.defaults["scale_type"], optimizer.defaults["scale"]) == (
        1,
        "tensor",
        128.0,
    )
    assert optimizer.defaults["update_proj_gap"] == 200
    assert optimizer.defaults["norm_growth_limit"] == 1.01
    apollo = APOLLO([torch.nn.Parameter(torch.zeros(4, 4))])
    assert (apollo.defaults["rank"], apollo.defaults["scale_type"], apollo.defaults["scale"]) == (256, "channel", 1.0)
    assert apollo.defaults["update_proj_gap"] == 200


def test_apollo_mini_equals_rank1_tensor_apollo_and_reference():
    weights, grads = make_problem(steps=4, growth=1.3)
    mini, optimizer = run_optimizer(APOLLOMini, weights, grads, lr=0.01, update_proj_gap=3)
    same, _ = run_optimizer(
        APOLLO, weights, grads, lr=0.01, rank=1, scale_type="tensor", scale=128.0, update_proj_gap=3
    )
    for a, b in zip(mini, same):
        assert torch.equal(a, b)
    for p in mini:
        assert min(optimizer.state[p]["exp_avg"].shape) == 1
    expected = reference_apollo(
        weights, grads, seeds_of(optimizer, mini), lr=0.01, rank=1, scale_type="tensor", scale=128.0, update_proj_gap=3
    )
    assert_matches_reference(mini, expected)


# ----------------------------------------------------------------------------- mixed groups
def test_adamw_groups_equal_torch_adamw():
    generator = torch.Generator().manual_seed(0)
    shapes = [(20, 8), (8,), (3, 4, 5)]
    init = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(4)]
    options = dict(lr=0.01, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05)

    def run(make):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        optimizer = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        return params

    ours = run(lambda ps: APOLLO([{"params": ps, "low_rank": False}], **options))
    fused = run(lambda ps: torch.optim.AdamW(ps, fused=True, **options))
    plain = run(lambda ps: torch.optim.AdamW(ps, **options))
    for a, b, c in zip(ours, fused, plain):
        assert torch.equal(a, b)  # the same fused kernel on the CPU
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_mixed_groups_each_part_follows_its_rule():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Linear(10, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 6)
    model(x).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    w0, b0, w1, b1 = model.parameters()
    groups = [{"params": [w0, w1], "low_rank": True}, {"params": [b0, b1], "low_rank": False, "weight_decay": 0.0}]
    optimizer = APOLLO(groups, lr=0.1, rank=2)
    optimizer.step()
    # low-rank part: the paper's update
    expected = reference_apollo(
        [reference[0], reference[2]], [[grads[0], grads[2]]], seeds_of(optimizer, [w0, w1]), lr=0.1, rank=2
    )
    assert_matches_reference([w0, w1], expected)
    # AdamW part: torch's AdamW, with the group's own weight decay
    biases = [torch.nn.Parameter(reference[1].clone()), torch.nn.Parameter(reference[3].clone())]
    biases[0].grad, biases[1].grad = grads[1].clone(), grads[3].clone()
    torch.optim.AdamW(biases, lr=0.1, weight_decay=0.0, fused=True).step()
    assert torch.equal(b0, biases[0]) and torch.equal(b1, biases[1])
    # seeds: base seed + index over all groups, in order
    assert seeds_of(optimizer, [w0, w1]) == [0, 1]


def test_unsaid_group_splits_by_dimension():
    w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))
    w.grad, b.grad = torch.randn(8, 4), torch.randn(8)
    optimizer = APOLLO([w, b], lr=0.1, rank=2, seed=10)
    optimizer.step()
    assert optimizer.state[w]["exp_avg"].shape == (8, 2)
    assert optimizer.state[b]["exp_avg"].shape == (8,)
    assert int(optimizer.state[w]["seed"]) == 10
    assert sorted(optimizer.state[b]) == ["exp_avg", "exp_avg_sq", "step"]


def test_params_without_grad_are_left_alone():
    a, b = torch.nn.Parameter(torch.randn(6, 3)), torch.nn.Parameter(torch.randn(6, 3))
    a.grad = torch.randn(6, 3)
    before = b.detach().clone()
    optimizer = APOLLO([a, b], lr=0.1, rank=2)
    optimizer.step()
    assert torch.equal(b, before) and not optimizer.state[b]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": -3}, "rank=-3"),
        ({"rank": 2.5}, "rank=2.5"),
        ({"scale_type": "row"}, "scale_type='row'"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"lr": float("inf")}, "lr=inf"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"betas": (0.9, float("nan"))}, "betas"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": float("inf")}, "eps=inf"),
        ({"eps": float("nan")}, "eps=nan"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"scale": 0.0}, "scale=0.0"),
        ({"update_proj_gap": 0}, "update_proj_gap=0"),
        ({"norm_growth_limit": 0.5}, "norm_growth_limit=0.5"),
    ],
)
def test_invalid_options_raise_value_error(options, match):
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=match):
        APOLLO([p], **options)
    # the same checks hold for a param group's own values
    with pytest.raises(ValueError, match="param group 1"):
        APOLLO([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(2, 2))], **options}])


def test_low_rank_group_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"shape \(4,\).*low_rank=False"):
        APOLLO([{"params": [torch.nn.Parameter(torch.zeros(4))], "low_rank": True}])
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\)"):
        APOLLO([{"params": [torch.nn.Parameter(torch.zeros(2, 3, 4))], "low_rank": True}])


def test_rank_above_smaller_dimension_is_clamped_with_warning():
    weights, grads = make_problem(steps=2, shapes=[(9, 3), (2, 7)])
    with pytest.warns(UserWarning, match="larger than the smaller dimension"):
        params, optimizer = run_optimizer(APOLLO, weights, grads, lr=0.1, rank=50)
    assert optimizer.state[params[0]]["exp_avg"].shape == (9, 3)
    assert optimizer.state[params[1]]["exp_avg"].shape == (2, 7)
    expected = reference_apollo(weights, grads, seeds_of(optimizer, params), lr=0.1, rank=50)
    assert_matches_reference(params, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["low_rank", "adamw"])
def test_non_finite_gradient_skips_the_step(bad, where):
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))
    optimizer = APOLLO([w, b], lr=0.1, rank=2)
    w.grad, b.grad = torch.randn(8, 4), torch.randn(8)
    optimizer.step()  # a good step first, so that there is state to protect
    snapshot = [w.detach().clone(), b.detach().clone()]
    state_before = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in (w, b)]
    w.grad, b.grad = torch.randn(8, 4), torch.randn(8)
    (w if where == "low_rank" else b).grad[1, ...].view(-1)[0] = bad
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        optimizer.step()
    assert torch.equal(w, snapshot[0]) and torch.equal(b, snapshot[1])
    for p, before in zip((w, b), state_before):
        assert sorted(optimizer.state[p]) == sorted(before)
        for key, value in before.items():
            assert torch.equal(optimizer.state[p][key], value), key
    # training goes on normally after the bad step
    w.grad, b.grad = torch.randn(8, 4), torch.randn(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert int(optimizer.state[w]["step"]) == 2 and torch.isfinite(w).all()


def test_non_finite_gradient_on_first_step_leaves_no_state():
    w = torch.nn.Parameter(torch.randn(8, 4))
    w.grad = torch.full((8, 4), float("nan"))
    optimizer = APOLLO([w], lr=0.1, rank=2)
    with pytest.warns(RuntimeWarning):
        optimizer.step()
    assert not optimizer.state[w]


def test_non_finite_gradient_propagates_without_check():
    """check_finite=False: as with torch's AdamW, a NaN gradient reaches the weights (documented)."""
    w, b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))
    optimizer = APOLLO([w, b], lr=0.1, rank=2, check_finite=False)
    w.grad, b.grad = torch.randn(8, 4), torch.randn(8)
    w.grad[0, 0] = float("nan")
    b.grad[0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert torch.isnan(w).any() and torch.isnan(b).any()


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    optimizer = APOLLO([{"params": emb.parameters(), "low_rank": False}], check_finite=False)
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_half_precision_gradient_is_not_mistaken_for_inf(dtype):
    """The finite check adds up in float32: 100k ones sum past float16's 65504 but are finite."""
    w = torch.nn.Parameter(torch.zeros(100_000, dtype=dtype))
    w.grad = torch.ones_like(w)
    optimizer = APOLLO([w], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert int(optimizer.state[w]["step"]) == 1 and (w < 0).all()


@pytest.mark.parametrize("options", [{"norm_growth_limit": None}, {"scale_type": "tensor"}, {"rank": 1}])
def test_non_finite_low_rank_gradient_is_caught_in_every_mode(options):
    """The check reads the limiter's norms of G, or R = G Pᵀ without the limiter: both see it."""
    w = torch.nn.Parameter(torch.randn(6, 9))
    w.grad = torch.randn(6, 9)
    w.grad[4, 7] = float("inf")
    before = w.detach().clone()
    optimizer = APOLLO([w], lr=0.1, **{"rank": 3, **options})
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        optimizer.step()
    assert torch.equal(w, before) and not optimizer.state[w]
