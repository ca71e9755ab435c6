"""Shard-aware APOLLO on FSDP2 (``fully_shard``, no Lightning): the same updates as on one device.

Each test forks two gloo processes. The model mixes both orientations and awkward shapes:
rows not divisible by 2 (9, 3, 11), a matrix with a single row (rank 1 holds no row), and a
wide matrix whose columns split unevenly (3 x 9: 5 + 4 columns of the moments).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_memopt.optim import APOLLO, APOLLOMini, LayerwiseOptimizer, apollo_param_groups
from lightning_memopt.optim.sharding import RowLayout, is_dtensor, local_view

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 5
CONFIGS = {
    # update_proj_gap=2: the projection is redrawn twice in 5 steps.
    "apollo_channel": (APOLLO, {"rank": 2, "scale_type": "channel", "update_proj_gap": 2}),
    "apollo_channel_no_limiter": (APOLLO, {"rank": 2, "update_proj_gap": 2, "norm_growth_limit": None}),
    # lr: APOLLO-Mini scales its update by sqrt(128); at 0.05 this toy model turns chaotic and
    # float rounding (sums in another order) grows past any tolerance.
    "apollo_mini": (APOLLOMini, {"update_proj_gap": 2, "lr": 0.01}),
    "apollo_tensor_rank3": (APOLLO, {"rank": 3, "scale_type": "tensor", "weight_decay": 0.1}),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # weights: 9x6 (tall), 3x9 (wide), 11x3 (tall), 1x11 (wide, one row)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3), nn.Tanh(), nn.Linear(3, 11), nn.Linear(11, 1))


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(STEPS)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches, rank: int = 0, world_size: int = 1) -> None:
    for x, y in batches:
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def reference(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    cls, options = CONFIGS[name]
    model = make_model()
    optimizer = cls(apollo_param_groups(model, "all-linear", **options), lr=0.05)
    train(model, optimizer, make_batches())
    return model, optimizer


def shard(model: nn.Module, world_size: int, hybrid: tuple[int, int] | None = None) -> nn.Module:
    """FSDP2 over ``world_size`` ranks, or HSDP over a ``hybrid=(replicas, shard_size)`` mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if hybrid is None:
        mesh = init_device_mesh("cpu", (world_size,))
    else:
        mesh = init_device_mesh("cpu", hybrid, mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _check_equivalence(rank: int, world_size: int) -> None:
    from torch.distributed.tensor import Shard

    for name, (cls, options) in CONFIGS.items():
        ref_model, ref_opt = reference(name)
        model = shard(make_model(), world_size)
        optimizer = cls(apollo_param_groups(model, "all-linear", **options), lr=0.05)
        train(model, optimizer, make_batches(), rank, world_size)
        for (key, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert is_dtensor(p)
            # The shards' products are smaller matrices, which BLAS may sum in another order:
            # on an AMD Zen 4 CPU (MKL) the weights drifted by up to 4.4e-6 (2e-5 relative) in
            # 5 steps; a wrong shard layout or projection is off by orders of magnitude more.
            torch.testing.assert_close(
                p.full_tensor(), q, rtol=1e-4, atol=1e-5, msg=lambda m, k=key, c=name: f"{c}: {k}\n{m}"
            )
        for p, q in zip(model.parameters(), ref_model.parameters()):
            state, ref_state = optimizer.state[p], ref_opt.state[q]
            assert sorted(state) == sorted(ref_state), name
            for key, value in state.items():
                full = value.full_tensor() if is_dtensor(value) else value
                torch.testing.assert_close(
                    full, ref_state[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key, c=name: f"{c}: state {k}\n{m}"
                )
            if p.dim() == 2:  # low-rank: moments split like R (rows if m >= n, else columns)
                m, n = p.shape
                assert state["exp_avg"].placements == (Shard(0 if m >= n else 1),), (name, p.shape)
                assert not is_dtensor(state["step"]) and state["step"].device.type == "cpu"

    # Layer-wise updates (in backward, through APOLLO.step_parameters) on the shards: the same run.
    cls, options = CONFIGS["apollo_channel"]
    model = shard(make_model(), world_size)
    train(
        model,
        LayerwiseOptimizer(cls(apollo_param_groups(model, "all-linear", **options), lr=0.05)),
        make_batches(),
        rank,
        world_size,
    )
    for p, q in zip(model.parameters(), reference("apollo_channel")[0].parameters()):
        torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_apollo_matches_single_device(run_ranks) -> None:
    """APOLLO channel (both orientations), without limiter, APOLLO-Mini and a tensor-wise rank 3:
    5 steps on 2 ranks equal 5 steps on one device, weights and (global) optimizer state; also
    with layer-wise updates."""
    run_ranks(_check_equivalence)


def _check_state_memory_and_checkpoint(rank: int, world_size: int, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    # Per-rank low-rank state falls with the ranks: each rank holds ~1/2 of every moment.
    model = shard(nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64)), world_size)
    optimizer = APOLLO(apollo_param_groups(model, "all-linear", rank=8), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    for p in model.parameters():
        if p.dim() == 2:
            local = local_view(optimizer.state[p]["exp_avg"])
            assert local.numel() * world_size == 8 * 256, (tuple(p.shape), tuple(local.shape))

    # NaN on one rank only: every rank skips the step (else their collectives would part).
    model = shard(make_model(), world_size)
    optimizer = APOLLO(apollo_param_groups(model, "all-linear", rank=2), lr=0.05)
    model(torch.randn(4, 6)).sum().backward()
    before = [p.full_tensor().clone() for p in model.parameters()]
    if rank == 1:
        local_view(next(model.parameters()).grad).fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        optimizer.step()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p.full_tensor(), old)

    # Distributed checkpoint after 3 steps (the 1-rank test below resumes from it).
    name = "apollo_channel"
    cls, options = CONFIGS[name]
    model = shard(make_model(), world_size)
    optimizer = cls(apollo_param_groups(model, "all-linear", **options), lr=0.05)
    train(model, optimizer, make_batches()[:3], rank, world_size)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)


def _resume_on_one_rank(rank: int, world_size: int, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    name = "apollo_channel"
    cls, options = CONFIGS[name]
    model = shard(make_model(), world_size)
    optimizer = cls(apollo_param_groups(model, "all-linear", **options), lr=0.05)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    train(model, optimizer, make_batches()[3:], rank, world_size)
    ref_model, _ = reference(name)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_state_memory_nan_agreement_and_reshard_2_to_1(tmp_path, run_ranks) -> None:
    """Moments are split across ranks; a NaN on one rank skips the step everywhere; a
    2-rank distributed checkpoint resumes on 1 rank and continues the run exactly."""
    folder = str(tmp_path / "dcp")
    run_ranks(_check_state_memory_and_checkpoint, folder)
    run_ranks(_resume_on_one_rank, folder, world_size=1)


def test_row_layout_column_chunks_follow_dtensor() -> None:
    """The column split used for the moments of a wide matrix is DTensor's own (ceil chunks)."""
    layouts = [RowLayout(None, 0, None, 4, r, 0, 0, torch.device("cpu")) for r in range(4)]
    assert [lay.column_chunk(5) for lay in layouts] == [(2, 0, 2), (2, 2, 2), (2, 4, 1), (2, 5, 0)]


# ---------------------------------------------------------------------- HSDP: a (replicate, shard) mesh
def _gathered_over_replicas(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def _check_hybrid(rank: int, world_size: int, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import Replicate, Shard

    for name, (cls, options) in CONFIGS.items():
        ref_model, ref_opt = reference(name)
        model = shard(make_model(), world_size, hybrid=(2, 2))
        optimizer = cls(apollo_param_groups(model, "all-linear", **options), lr=0.05)
        train(model, optimizer, make_batches(), rank, world_size)
        mesh = next(model.parameters()).device_mesh
        replicas = mesh.get_group("replicate")
        for (key, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(
                p.full_tensor(), q, rtol=1e-4, atol=1e-5, msg=lambda m, k=key, c=name: f"{c}: {k}\n{m}"
            )
            state, ref_state = optimizer.state[p], ref_opt.state[q]
            for key_, value in state.items():
                full = value.full_tensor() if is_dtensor(value) else value
                torch.testing.assert_close(full, ref_state[key_], rtol=1e-4, atol=1e-6)
            # The replicas hold bit-identical shards: weights and every piece of optimizer state.
            for tensor in [p, *state.values()]:
                local = local_view(tensor)
                first, *others = _gathered_over_replicas(local, replicas)
                assert all(torch.equal(first, other) for other in others), (name, key)
            if p.dim() == 2:
                m, n = p.shape
                # Sharded within the shard group (dim 1 of the mesh), replicated across (dim 0).
                assert state["exp_avg"].placements == (Replicate(), Shard(0 if m >= n else 1)), (name, p.shape)

    # Per-rank low-rank state is half of one rank's (the shard group has 2 ranks), not a quarter.
    model = shard(nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64)), world_size, hybrid=(2, 2))
    optimizer = APOLLO(apollo_param_groups(model, "all-linear", rank=8), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    for p in model.parameters():
        if p.dim() == 2:
            assert local_view(optimizer.state[p]["exp_avg"]).numel() * 2 == 8 * 256, tuple(p.shape)

    # A distributed checkpoint after 3 steps, for the resumes below (same mesh, (1, 2), 1 process).
    cls, options = CONFIGS["apollo_channel"]
    model = shard(make_model(), world_size, hybrid=(2, 2))
    optimizer = cls(apollo_param_groups(model, "all-linear", **options), lr=0.05)
    train(model, optimizer, make_batches()[:3], rank, world_size)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)


def _resume_hybrid(rank: int, world_size: int, folder: str, hybrid: tuple[int, int] | None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    cls, options = CONFIGS["apollo_channel"]
    model = shard(make_model(), world_size, hybrid=hybrid)
    optimizer = cls(apollo_param_groups(model, "all-linear", **options), lr=0.05)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    train(model, optimizer, make_batches()[3:], rank, world_size)
    for p, q in zip(model.parameters(), reference("apollo_channel")[0].parameters()):
        torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_hybrid_sharded_apollo_matches_single_device_and_reshards(tmp_path, run_ranks) -> None:
    """HSDP on 4 ranks, a (2 replicas, 2 shards) mesh: every APOLLO configuration equals one
    device (weights and state), the replicas stay bit-identical, per-rank state is half of one
    rank's, and the distributed checkpoint resumes on (2, 2), on (1, 2) and on 1 process."""
    folder = str(tmp_path / "dcp")
    run_ranks(_check_hybrid, folder, world_size=4)
    run_ranks(_resume_hybrid, folder, (2, 2), world_size=4)
    run_ranks(_resume_hybrid, folder, (1, 2), world_size=2)
    run_ranks(_resume_hybrid, folder, None, world_size=1)
