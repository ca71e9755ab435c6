"""The memory planner against real runs: exact tensors, measured activations, the paper's 7B figures."""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from lightning_memopt.layers import apply_activation_checkpointing, chunked_causal_lm_loss
from lightning_memopt.layers.blocks import find_transformer_blocks
from lightning_memopt.layers.checkpointing import SAVED_OPS
from lightning_memopt.memory import breakdown, estimate
from lightning_memopt.memory.planner import PlanSettings, parse_memory_size, plan, resolve_mesh
from lightning_memopt.models.llama import build_llama
from lightning_memopt.optim import LayerwiseOptimizer, create_optimizer
from lightning_memopt.quant import quantize_linear_weights

# A tiny LLaMA with a small vocabulary: real steps and profiles in about a second each.
SHAPE = dict(vocab_size=2048, num_hidden_layers=2)
BATCH, SEQ = 2, 128


def own_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def chunked_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return chunked_causal_lm_loss(model, ids, chunk_size=64)


def make_plan(settings: PlanSettings, **shape: int) -> object:
    with torch.device("meta"):
        model = build_llama("tiny", **{**SHAPE, **shape})
    blocks = find_transformer_blocks(model)
    return plan(
        model,
        settings,
        loss_fn=chunked_loss if settings.chunked_loss else own_loss,
        full_loss_fn=own_loss,
        blocks=blocks,
        apply_checkpointing=lambda m, policy: apply_activation_checkpointing(m, policy=policy, blocks=blocks),
        selective_ops=SAVED_OPS,
    )


def real_model(settings: PlanSettings) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_llama("tiny", **SHAPE)
    if settings.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if settings.int8_weights:
        quantize_linear_weights(model)
    if settings.activation_checkpointing:
        apply_activation_checkpointing(model, policy=settings.activation_checkpointing)
    return model


def train_step(model: torch.nn.Module, settings: PlanSettings, optimizer: object) -> None:
    shape = (settings.batch_size, settings.seq_len)
    ids = torch.randint(0, SHAPE["vocab_size"], shape, generator=torch.Generator().manual_seed(0))
    loss = chunked_loss(model, ids) if settings.chunked_loss else own_loss(model, ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def live_grad_peak(model: torch.nn.Module) -> list[int]:
    """Registers hooks (before an optimizer's) that record the most gradient bytes alive at once."""
    params = list(model.parameters())
    peak = [0]

    def record(_: torch.Tensor) -> None:
        peak[0] = max(peak[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(record)
    return peak


# Tensors, not activations: a short sequence is enough.
CASES = {
    "adamw": PlanSettings("adamw", precision="32-true", batch_size=1, seq_len=16),
    "apollo": PlanSettings("apollo", "rank=16", precision="32-true", batch_size=1, seq_len=16),
    "apollo_mini_layerwise": PlanSettings("apollo_mini", precision="32-true", layerwise=True, batch_size=1, seq_len=16),
    "apollo_mini_bf16": PlanSettings("apollo_mini", precision="bf16-true", batch_size=1, seq_len=16),
    "int8_layerwise": PlanSettings(
        "apollo_mini", precision="32-true", int8_weights=True, layerwise=True, batch_size=1, seq_len=16
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_params_grads_and_state_are_exact(case: str) -> None:
    settings = CASES[case]
    model = real_model(settings)
    peak = live_grad_peak(model)
    optimizer = create_optimizer(settings.optimizer, model, settings.options, lr=1e-3)
    if settings.layerwise:
        optimizer = LayerwiseOptimizer(optimizer)
    train_step(model, settings, optimizer)
    real = breakdown(model, optimizer)
    estimated = make_plan(settings)
    assert estimated.params == real.params_bytes
    assert estimated.optimizer_state == real.optimizer_state_bytes + real.projection_cache_bytes
    # The most gradient bytes alive at once: all of them, or one at a time (layer-wise).
    assert estimated.grads == peak[0]
    assert estimated.baseline["params"] == real.baseline.params_bytes
    assert estimated.baseline["optimizer_state"] == real.baseline.optimizer_state_bytes


def measured_activations(settings: PlanSettings) -> int:
    """Tensor peak of one training step (torch's memory timeline) minus the tensors the plan counts
    on their own lines: parameters, optimizer state and the gradients alive at each moment."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category

    model = real_model(settings)
    optimizer = create_optimizer(settings.optimizer, model, settings.options, lr=1e-3)
    if settings.layerwise:
        optimizer = LayerwiseOptimizer(optimizer)
    train_step(model, settings, optimizer)  # builds the state
    held = breakdown(model, optimizer, grads=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        train_step(model, settings, optimizer)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    grads = _CATEGORY_TO_INDEX[Category.GRADIENT] + 1
    counted = held.params_bytes + held.optimizer_state_bytes + held.projection_cache_bytes + held.workspace_bytes
    # The most bytes alive at once besides those: the activations' own peak (when the gradients
    # outweigh the activations, the step's peak is at the end of backward, not theirs).
    return max(sum(at_t) - at_t[grads] for at_t in sizes) - counted


ACTIVATION_CASES = {
    "plain": PlanSettings("adamw", precision="32-true", batch_size=BATCH, seq_len=SEQ),
    "full_checkpointing": PlanSettings(
        "adamw", precision="32-true", activation_checkpointing="full", batch_size=BATCH, seq_len=SEQ
    ),
    "selective_layerwise": PlanSettings(
        "apollo_mini",
        precision="32-true",
        activation_checkpointing="selective",
        layerwise=True,
        batch_size=BATCH,
        seq_len=SEQ,
    ),
    "chunked_loss_checkpointing": PlanSettings(
        "apollo_mini",
        precision="32-true",
        activation_checkpointing="full",
        chunked_loss=True,
        loss_chunk_size=64,
        batch_size=BATCH,
        seq_len=SEQ,
    ),
}


@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
@pytest.mark.slow
def test_activations_within_15_percent_of_the_measured_peak(case: str) -> None:
    settings = ACTIVATION_CASES[case]
    measured = measured_activations(settings)
    estimated = make_plan(settings).activations
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


def test_checkpointing_and_chunked_loss_shrink_the_activations() -> None:
    base = dict(optimizer="adamw", precision="32-true", batch_size=BATCH, seq_len=SEQ)
    plain = make_plan(PlanSettings(**base))
    full = make_plan(PlanSettings(**base, activation_checkpointing="full"))
    chunked = make_plan(PlanSettings(**base, activation_checkpointing="full", chunked_loss=True, loss_chunk_size=64))
    assert chunked.activations < full.activations < plain.activations
    # A fully checkpointed block keeps only its input hidden states (fp32) and the position tables.
    hidden = 256
    assert full.activation_detail["per_block"] >= BATCH * SEQ * hidden * 4
    assert full.activation_detail["per_block"] < plain.activation_detail["per_block"] / 4


def _meta_7b() -> torch.nn.Module:
    with torch.device("meta"):
        return build_llama("7b")


def test_7b_optimizer_state_reproduces_the_apollo_paper_table_3() -> None:
    # APOLLO paper (arXiv 2412.05270), Table 3, LLaMA-7B pre-training: optimizer memory of
    # APOLLO (rank 256) 1.6G and APOLLO-Mini 0.0G, 8-bit Adam 13G: the projected matrices'
    # moments in bf16 (the embeddings' and head's AdamW state is left out of the APOLLO rows), in GB.
    model = _meta_7b()
    gb = 1e9

    def low_rank_moments(name: str) -> float:
        est = estimate(model, name, state_dtype=torch.bfloat16)
        return sum(2 * (p.state_elements - 2) for p in est.parameters if p.update == "low_rank") / gb

    assert round(low_rank_moments("apollo"), 1) == 1.6
    assert round(low_rank_moments("apollo_mini"), 1) == 0.0
    numel = sum(p.numel() for p in model.parameters())
    assert math.floor(2 * numel / gb) == 13  # 8-bit Adam: two one-byte moments per weight
    # And through the planner, on one device: the whole state (embeddings/head included).
    settings = PlanSettings("apollo", "rank=256", precision="bf16-true", seq_len=16)
    estimated = plan(model, settings, loss_fn=lambda m, ids: m(input_ids=ids, labels=ids).loss)
    whole = estimate(model, "apollo", "rank=256")  # the planner's figure is that of estimate()
    assert estimated.optimizer_state == whole.optimizer_state_bytes + whole.projection_cache_bytes


def test_hybrid_shards_within_a_node_only() -> None:
    base = dict(optimizer="apollo_mini", precision="32-true", batch_size=1, seq_len=16)
    hybrid = make_plan(PlanSettings(**base, devices=4, sharding="hybrid", nodes=2))
    two = make_plan(PlanSettings(**base, devices=2))
    four = make_plan(PlanSettings(**base, devices=4))
    assert hybrid.mesh == (2, 2)
    per_device = ("params", "grads", "optimizer_state", "fsdp_buffers")
    assert [getattr(hybrid, k) for k in per_device] == [getattr(two, k) for k in per_device]
    assert four.params < two.params and four.optimizer_state < two.optimizer_state


def test_bf16_mixed_counts_autocasts_weight_copies() -> None:
    mixed = make_plan(PlanSettings("adamw", precision="bf16-mixed", batch_size=1, seq_len=16))
    true = make_plan(PlanSettings("adamw", precision="bf16-true", batch_size=1, seq_len=16))
    # Every block matrix is used once in forward: its bf16 copy lives until backward.
    with torch.device("meta"):
        blocks = find_transformer_blocks(build_llama("tiny", **SHAPE))
    block_matrices = sum(p.numel() for b in blocks for p in b.parameters() if p.dim() == 2)
    assert mixed.activation_detail["autocast_weight_copies"] >= 2 * block_matrices
    assert true.activation_detail["autocast_weight_copies"] == 0
    assert any("autocast" in note for note in mixed.notes)
    assert true.params * 2 == mixed.params  # bf16-true holds bf16 weights, bf16-mixed fp32 ones


@pytest.mark.slow
def test_70b_plans_in_seconds_on_a_hybrid_mesh() -> None:
    with torch.device("meta"):
        model = build_llama("70b")
    settings = PlanSettings(
        "apollo_mini", devices=64, sharding="hybrid", nodes=8, activation_checkpointing="full", seq_len=256
    )
    blocks = find_transformer_blocks(model)
    result = plan(
        model,
        settings,
        loss_fn=own_loss,
        blocks=blocks,
        apply_checkpointing=lambda m, policy: apply_activation_checkpointing(m, policy=policy, blocks=blocks),
    )
    assert result.mesh == (8, 8)
    # Parameters are split over the 8 devices of a node (not the 64): ~69B x 4 bytes / 8.
    assert result.params == pytest.approx(4 * 68.98e9 / 8, rel=0.01)
    assert result.baseline["optimizer_state"] == 2 * result.baseline["grads"]


def test_meshes_and_sizes() -> None:
    assert resolve_mesh(8) == (1, 8)
    assert resolve_mesh(16, "hybrid", nodes=2) == (2, 8)
    assert resolve_mesh(8, "hybrid", mesh=(2, 4)) == (2, 4)
    assert parse_memory_size("80GiB") == 80 * 2**30
    assert parse_memory_size("24GB") == 24 * 10**9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(devices=6, sharding="hybrid", nodes=4), "do not split into nodes=4"),
        (dict(devices=8, nodes=2), "no meaning with full sharding"),
        (dict(devices=8, sharding="hybrid", device_mesh=(3, 2)), "not devices=8"),
        (dict(devices=8, sharding="hybrid"), "needs --nodes"),
        (dict(devices=2, int8_weights=True), "use --devices 1"),
        (dict(precision="fp8"), "precision='fp8' is unknown"),
        (dict(optimizer="sgdd"), "sgdd"),
    ],
)
def test_bad_settings_name_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, KeyError), match=message):
        PlanSettings(**kwargs).validate()
    with pytest.raises(ValueError, match="not a size"):
        parse_memory_size("eighty")


def _sharded_check(rank: int, world_size: int, optimizer: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    settings = PlanSettings(optimizer, precision="32-true", devices=world_size, batch_size=BATCH, seq_len=SEQ)
    torch.manual_seed(0)
    model = build_llama("tiny", **SHAPE)
    mesh = init_device_mesh("cpu", (world_size,))
    for block in find_transformer_blocks(model):  # as apollo_fsdp shards: per block, then the root
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = create_optimizer(optimizer, model, None, lr=1e-3)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
    own_loss(model, ids).backward()
    real_grads = breakdown(model).grads_bytes
    opt.step()
    real = breakdown(model, opt, grads=False)
    estimated = make_plan(settings)
    sizes = torch.tensor([real.params_bytes, real_grads, real.optimizer_state_bytes])
    # The plan is per device for the rank that holds the most (rank 0): it is the max over ranks.
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    assert estimated.params == sizes[0].item(), (estimated.params, sizes.tolist())
    assert estimated.grads == sizes[1].item(), (estimated.grads, sizes.tolist())
    assert estimated.optimizer_state == sizes[2].item(), (estimated.optimizer_state, sizes.tolist())


@pytest.mark.parametrize("optimizer", ["adamw", "apollo_mini"])
def test_sharded_params_grads_and_state_are_exact_on_two_ranks(run_ranks: object, optimizer: str) -> None:
    run_ranks(_sharded_check, optimizer, world_size=2)


@pytest.mark.slow
def test_uneven_shards_are_exact_on_three_ranks(run_ranks: object) -> None:
    # 2048 vocabulary rows, 688 MLP rows, 256 hidden: none splits evenly in 3, so every
    # parameter's shard is padded to ceil(rows / 3) rows, and APOLLO's moments are uneven too.
    run_ranks(_sharded_check, "apollo_mini", world_size=3)


def _hybrid_check(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    settings = PlanSettings(
        "apollo_mini", precision="32-true", devices=4, sharding="hybrid", nodes=2, batch_size=BATCH, seq_len=SEQ
    )
    torch.manual_seed(0)
    model = build_llama("tiny", **SHAPE)
    mesh = init_device_mesh("cpu", settings.mesh(), mesh_dim_names=("replicate", "shard"))
    for block in find_transformer_blocks(model):  # HSDP: shard within a "node", replicate across
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = create_optimizer("apollo_mini", model, None, lr=1e-3)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
    own_loss(model, ids).backward()
    real_grads = breakdown(model).grads_bytes
    opt.step()
    real = breakdown(model, opt, grads=False)
    sizes = torch.tensor([real.params_bytes, real_grads, real.optimizer_state_bytes])
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    estimated = make_plan(settings)
    assert [estimated.params, estimated.grads, estimated.optimizer_state] == sizes.tolist()


@pytest.mark.slow
def test_hybrid_mesh_is_exact_on_four_ranks(run_ranks: object) -> None:
    run_ranks(_hybrid_check, world_size=4)
