"""APOLLO's optimizer state: its size, save / load / resume, and where it lives after loading."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_memopt.optim import APOLLO, APOLLOMini, apollo_param_groups

# Tiny tensors: one thread is as fast, and robust on a shared machine (see conftest).
pytestmark = pytest.mark.usefixtures("single_thread")


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("rank", [1, 16])
def test_state_bytes_are_2_r_max_m_n_per_matrix(rank, make_llama, make_batches, train_step):
    model = make_llama(hidden=64, intermediate=172)
    optimizer = APOLLO(apollo_param_groups(model, rank=rank), lr=1e-3)
    train_step(model, optimizer, make_batches(1, 2, 8)[0])
    low_rank, rest = (g["params"] for g in optimizer.param_groups)
    assert len(low_rank) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    scalars = 4 + 8 + 4  # step (float32), seed (int64), prev_update_norm (float32)
    for p in low_rank:
        m, n = p.shape
        state = optimizer.state[p]
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "prev_update_norm", "seed", "step"]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == rank * max(m, n)
        assert state_nbytes(state) == 2 * rank * max(m, n) * 4 + scalars
    for p in rest:  # embeddings, norms, LM head: AdamW
        assert state_nbytes(optimizer.state[p]) == 2 * p.numel() * 4 + 4

    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, adamw, make_batches(1, 2, 8)[0])
    for p in low_rank:
        m, n = p.shape
        assert state_nbytes(adamw.state[p]) == 2 * m * n * 4 + 4
    ours = sum(state_nbytes(s) for s in optimizer.state.values())
    theirs = sum(state_nbytes(s) for s in adamw.state.values())
    expected_saving = sum(2 * 4 * (p.numel() - rank * max(p.shape)) for p in low_rank) - len(low_rank) * (scalars - 4)
    assert theirs - ours == expected_saving


def test_projection_is_not_in_the_state_dict(make_llama, make_batches, train_step):
    model = make_llama()
    optimizer = APOLLO(apollo_param_groups(model, rank=4), lr=1e-3)
    train_step(model, optimizer, make_batches(1, 2, 8)[0])
    assert optimizer.projection_cache_bytes() > 0
    for state in optimizer.state_dict()["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        assert set(state) <= {"exp_avg", "exp_avg_sq", "prev_update_norm", "seed", "step"}


# ----------------------------------------------------------------------------- resume
def _train(model, optimizer, batches, train_step):
    for tokens in batches:
        train_step(model, optimizer, tokens)


def _checkpoint_bytes(model, optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("cls", "options"),
    [(APOLLO, {"rank": 8}), (APOLLOMini, {}), (APOLLO, {"rank": 4, "scale_type": "tensor", "norm_growth_limit": None})],
    ids=["apollo", "apollo_mini", "apollo_tensor_no_limiter"],
)
@pytest.mark.parametrize("split", [3, 5], ids=["resume-at-redraw", "resume-inside-window"])
def test_resume_is_bit_identical(cls, options, split, make_llama, make_batches, train_step):
    # update_proj_gap=3 over 8 steps: windows 1-3, 4-6, 7-8. Saving after step 3 resumes on
    # a redraw; after step 5 the resumed run must re-create the projection it was using.
    steps, gap = 8, 3
    batches = make_batches(steps, 2, 16)

    def fresh(init_seed=0, optimizer_seed=0):
        model = make_llama(seed=init_seed)
        groups = apollo_param_groups(model, update_proj_gap=gap, **options)
        return model, cls(groups, lr=1e-2, seed=optimizer_seed)

    model, optimizer = fresh()
    _train(model, optimizer, batches, train_step)
    straight = [p.detach().clone() for p in model.parameters()]

    model, optimizer = fresh()
    _train(model, optimizer, batches[:split], train_step)
    saved = _checkpoint_bytes(model, optimizer)
    # A differently initialised model and an optimizer with another base seed: the checkpoint
    # (weights, moments, step counters, projection seeds) must carry everything.
    model, optimizer = fresh(init_seed=1, optimizer_seed=1234)
    checkpoint = torch.load(io.BytesIO(saved), weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    _train(model, optimizer, batches[split:], train_step)
    for (name, p), q in zip(model.named_parameters(), straight):
        assert torch.equal(p, q), name


def test_resume_is_bit_identical_in_bfloat16(make_llama, make_batches, train_step):
    """bf16 weights: load_state_dict casts floating state to the parameter's dtype; seeds
    (here >= 1000, not representable in bf16) and the limiter's float32 norm must survive."""
    batches = make_batches(6, 2, 16)

    def fresh():
        model = make_llama().to(torch.bfloat16)
        return model, APOLLO(apollo_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2, seed=1001)

    model, optimizer = fresh()
    _train(model, optimizer, batches, train_step)
    straight = [p.detach().clone() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in straight)

    model, optimizer = fresh()
    _train(model, optimizer, batches[:3], train_step)
    saved = _checkpoint_bytes(model, optimizer)
    model, optimizer = fresh()
    checkpoint = torch.load(io.BytesIO(saved), weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for p in optimizer.param_groups[0]["params"]:
        state = optimizer.state[p]
        assert state["seed"].dtype == torch.int64 and int(state["seed"]) >= 1001
        assert state["prev_update_norm"].dtype == torch.float32
        assert state["exp_avg"].dtype == torch.bfloat16
    _train(model, optimizer, batches[3:], train_step)
    for p, q in zip(model.parameters(), straight):
        assert torch.equal(p, q)


def test_bfloat16_training_sanity(make_llama, make_batches, train_step):
    model = make_llama().to(torch.bfloat16)
    optimizer = APOLLO(apollo_param_groups(model, rank=8), lr=1e-2)
    losses = [train_step(model, optimizer, tokens) for tokens in make_batches(12, 4, 32)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert p.dtype == torch.bfloat16
            assert optimizer.state[p]["exp_avg"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- placement
def _assert_placement(optimizer: APOLLO) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            assert state["exp_avg"].device == p.device and state["exp_avg_sq"].device == p.device
            assert state["exp_avg"].dtype == p.dtype
            assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32
            if "seed" in state:
                assert state["seed"].device.type == "cpu" and state["seed"].dtype == torch.int64
                assert state["prev_update_norm"].device == p.device
                assert state["prev_update_norm"].dtype == torch.float32


def test_state_placement_after_load_on_cpu(make_llama, make_batches, train_step):
    batches = make_batches(3, 2, 8)
    model = make_llama()
    optimizer = APOLLO(apollo_param_groups(model, rank=4), lr=1e-2)
    _train(model, optimizer, batches[:2], train_step)
    _assert_placement(optimizer)
    saved = _checkpoint_bytes(model, optimizer)

    # Into a bf16 copy: moments follow the parameters' dtype, host scalars and the limiter's
    # float32 norm keep theirs.
    model16 = make_llama().to(torch.bfloat16)
    optimizer16 = APOLLO(apollo_param_groups(model16, rank=4), lr=1e-2)
    optimizer16.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True)["optimizer"])
    _assert_placement(optimizer16)
    train_step(model16, optimizer16, batches[2])
    _assert_placement(optimizer16)
    assert int(next(iter(optimizer16.state.values()))["step"]) == 3

    # Loading twice from one state dict does not tie the two optimizers' counters together.
    state_dict = torch.load(io.BytesIO(saved), weights_only=True)["optimizer"]
    a, b = make_llama(), make_llama()
    opt_a = APOLLO(apollo_param_groups(a, rank=4), lr=1e-2)
    opt_b = APOLLO(apollo_param_groups(b, rank=4), lr=1e-2)
    opt_a.load_state_dict(state_dict)
    opt_b.load_state_dict(state_dict)
    train_step(a, opt_a, batches[2])
    assert [int(s["step"]) for s in opt_b.state.values()] == [2] * len(opt_b.state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on the CPU-only CI)")
def test_state_placement_after_load_on_cuda(make_llama, make_batches, train_step):
    batches = make_batches(4, 2, 8)
    model = make_llama()
    optimizer = APOLLO(apollo_param_groups(model, rank=4), lr=1e-2)
    _train(model, optimizer, batches[:2], train_step)
    saved = _checkpoint_bytes(model, optimizer)

    cuda_model = make_llama().cuda()
    cuda_optimizer = APOLLO(apollo_param_groups(cuda_model, rank=4), lr=1e-2)
    checkpoint = torch.load(io.BytesIO(saved), weights_only=True, map_location="cpu")
    cuda_model.load_state_dict(checkpoint["model"])
    cuda_optimizer.load_state_dict(checkpoint["optimizer"])
    _assert_placement(cuda_optimizer)
    _train(cuda_model, cuda_optimizer, batches[2:], train_step)
    _assert_placement(cuda_optimizer)
    # The same run on the CPU: same projections (drawn on the CPU), so the same weights up to
    # kernel rounding.
    _train(model, optimizer, batches[2:], train_step)
    for p, q in zip(model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4)
