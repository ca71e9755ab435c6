"""APOLLO's step in chunks with reused workspace buffers, and its finite check on large tensors.

The step projects the gradients of a group's matrices a chunk at a time into buffers it keeps
between steps (see ``lightning_memopt.optim.workspace``); how the matrices fall into chunks
must not change a single bit of the result.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from apollo_reference import MANY_ROWS_WIDE, SHAPES, assert_matches_reference, make_problem, reference_apollo, seeds_of

import lightning_memopt.optim.apollo as apollo_module
from lightning_memopt.optim import APOLLO, kernels
from lightning_memopt.optim.workspace import Workspace

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIONS = dict(lr=0.05, rank=3, scale=4.0, update_proj_gap=2, weight_decay=0.1, betas=(0.8, 0.95))


def run(weights, grads, groups_of=None, **options):
    """Step ``weights`` through ``grads``; ``groups_of(params)`` makes the param groups."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = APOLLO(groups_of(params) if groups_of else params, **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("limiter", [1.01, None], ids=["limiter", "no-limiter"])
@pytest.mark.parametrize("budget", [1, 40], ids=["one-matrix-chunks", "few-matrix-chunks"])
def test_chunked_step_matches_reference_and_one_chunk_bit_for_bit(monkeypatch, scale_type, limiter, budget):
    # Projected sizes (rank 3): 36, 42, 21 and 270 elements. Budget 40: chunks of one or two
    # matrices, and one larger than the budget; budget 1: every matrix alone.
    options = dict(OPTIONS, scale_type=scale_type, norm_growth_limit=limiter)
    weights, grads = make_problem(steps=5, shapes=[*SHAPES, MANY_ROWS_WIDE], growth=1.5)
    whole, _ = run(weights, grads, **options)
    monkeypatch.setattr(apollo_module, "_CHUNK_ELEMENTS", budget)
    params, optimizer = run(weights, grads, **options)
    assert_matches_reference(params, reference_apollo(weights, grads, seeds_of(optimizer, params), **options))
    for chunked, single in zip(params, whole):
        assert torch.equal(chunked, single)


def test_groups_projected_before_the_check_keep_their_own_projections():
    # Two low-rank groups, both small enough to be projected before the finite check, with
    # different learning rates and ranks: each must follow its own reference.
    weights, grads = make_problem(steps=3, growth=1.5)
    options_a = dict(OPTIONS, scale_type="channel")
    options_b = dict(OPTIONS, scale_type="tensor", lr=0.02, rank=2)

    def groups_of(params):
        return [
            {"params": params[:2], "low_rank": True},
            {"params": params[2:], "low_rank": True, "lr": 0.02, "rank": 2, "scale_type": "tensor"},
        ]

    params, optimizer = run(weights, grads, groups_of, **options_a)
    seeds = seeds_of(optimizer, params)
    expected_a = reference_apollo(weights[:2], [g[:2] for g in grads], seeds[:2], **options_a)
    expected_b = reference_apollo(weights[2:], [g[2:] for g in grads], seeds[2:], **options_b)
    assert_matches_reference(params, expected_a + expected_b)


@pytest.mark.parametrize("budget", [None, 1], ids=["default-chunks", "one-matrix-chunks"])
def test_group_mixing_dtypes_equals_one_group_per_matrix(monkeypatch, budget):
    # Chunks never mix dtypes: a bfloat16 matrix between two float32 ones in one group steps
    # exactly as with a group per matrix (same order, so the same projection seeds).
    if budget is not None:
        monkeypatch.setattr(apollo_module, "_CHUNK_ELEMENTS", budget)
    weights, grads = make_problem(steps=3, growth=1.5)

    def with_bf16_middle(params):
        params[1].data = params[1].data.to(torch.bfloat16)
        return params

    mixed, opt_mixed = run(weights, grads, lambda ps: [{"params": with_bf16_middle(ps), "low_rank": True}], **OPTIONS)
    alone, _ = run(
        weights, grads, lambda ps: [{"params": [p], "low_rank": True} for p in with_bf16_middle(ps)], **OPTIONS
    )
    assert opt_mixed.state[mixed[1]]["exp_avg"].dtype == torch.bfloat16
    for a, b in zip(mixed, alone):
        assert torch.equal(a, b)


def test_step_reuses_its_workspace():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(96, 80)), torch.nn.Parameter(torch.randn(70, 120))]
    optimizer = APOLLO(params, lr=1e-2, rank=8)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    held = optimizer.workspace_bytes()
    pointers = {key: t.data_ptr() for key, t in optimizer._workspace._buffers.items()}
    assert held > 0
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    assert optimizer.workspace_bytes() == held
    assert {key: t.data_ptr() for key, t in optimizer._workspace._buffers.items()} == pointers
    # The projected gradients of both (96 x 8 and 8 x 120), and the column norms' running sums
    # (64 x 120, for the wide matrix's 70 rows): never the size of a gradient.
    assert held < sum(p.numel() for p in params) * 4


def test_workspace_views_do_not_overlap_and_grow_on_demand():
    ws = Workspace()
    cpu = torch.device("cpu")
    a, b = ws.take("x", [(3, 4), (5,)], torch.float32, cpu)
    a.fill_(1.0)
    b.fill_(2.0)
    # Each view starts on a 64-byte boundary (16 floats): 12 and 5 floats take 16 each.
    assert a.sum() == 12 and b.sum() == 10 and ws.nbytes() == 32 * 4
    assert a.data_ptr() % 64 == 0 and b.data_ptr() - a.data_ptr() == 64
    (c,) = ws.take("x", [(40,)], torch.float32, cpu)  # larger: a new buffer
    assert ws.nbytes() == 48 * 4 and c.is_contiguous()
    (d,) = ws.take("x", [(2, 2)], torch.float32, cpu)  # smaller: the same memory
    assert d.data_ptr() == c.data_ptr()
    (e,) = ws.take("x", [(4,)], torch.bfloat16, cpu)  # another dtype: a buffer of its own
    assert ws.nbytes() == 48 * 4 + 64 and e.dtype == torch.bfloat16
    # Elsewhere (a GPU; here the meta device) the caching allocator reuses: nothing is kept.
    (f,) = ws.take("x", [(8,)], torch.float32, torch.device("meta"))
    assert f.shape == (8,) and ws.nbytes() == 48 * 4 + 64
    ws.clear()
    assert ws.nbytes() == 0


@pytest.mark.parametrize("position", ["first", "middle", "second-half", "last-odd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_large_gradient_check_catches_every_position(position, bad):
    # Large float32 tensors are checked with a dot product of their halves (see
    # kernels.finite_witness): a non-finite entry anywhere, whatever its partner (here 0), must show.
    grad = torch.zeros(2 * kernels.FINITE_DOT_MIN + 1)
    index = {"first": 0, "middle": grad.numel() // 2 - 1, "second-half": grad.numel() // 2 + 5, "last-odd": -1}
    grad[index[position]] = bad
    assert not kernels.all_finite([grad])
    grad[index[position]] = 1e18  # large but finite: its products stay below float32's range
    assert kernels.all_finite([grad])


def test_large_adamw_gradient_with_inf_skips_the_step():
    embedding = torch.nn.Parameter(torch.randn(600, 300))  # above the dot-product threshold
    matrix = torch.nn.Parameter(torch.randn(40, 30))
    optimizer = APOLLO([{"params": [matrix], "low_rank": True}, {"params": [embedding], "low_rank": False}], rank=4)
    before = (embedding.detach().clone(), matrix.detach().clone())
    embedding.grad = torch.zeros_like(embedding)
    embedding.grad[599, 299] = float("inf")
    matrix.grad = torch.randn_like(matrix)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    assert any("NaN or inf" in str(w.message) for w in caught)
    assert torch.equal(embedding, before[0]) and torch.equal(matrix, before[1])
    assert not optimizer.state[embedding] and not optimizer.state[matrix]
