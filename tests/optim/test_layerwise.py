"""LayerwiseOptimizer: in-backward updates equal normal stepping, and free gradients early."""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from torch import nn

from lightning_memopt.optim import APOLLO, APOLLOMini, LayerwiseOptimizer, apollo_param_groups


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 40, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return nn.functional.cross_entropy(self.lm_head(x).flatten(0, 1), tokens.roll(-1, 1).flatten())


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "apollo":
        return APOLLO(apollo_param_groups(model, rank=4), lr=1e-2, update_proj_gap=2)
    if name == "apollo_mini":
        return APOLLOMini(apollo_param_groups(model), lr=1e-2, update_proj_gap=2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def batches(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (4, 12), generator=generator) for _ in range(count)]


def train_normal(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], accumulation: int, sched=None):
    for i, tokens in enumerate(data):
        (model(tokens) / accumulation).backward()
        if (i + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()


def train_layerwise(model: nn.Module, opt: LayerwiseOptimizer, data: list[torch.Tensor], accumulation: int, sched=None):
    for i, tokens in enumerate(data):
        (model(tokens) / accumulation).backward()  # updates happen in here on the last micro-batch
        if (i + 1) % accumulation == 0:
            assert all(p.grad is None for p in model.parameters())
            if sched is not None:
                sched.step()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("optimizer", ["apollo", "apollo_mini", "adamw"])
def test_layerwise_equals_normal_stepping(optimizer: str, accumulation: int) -> None:
    torch.manual_seed(0)
    reference = TinyLM()
    model = copy.deepcopy(reference)
    data = batches(5 * accumulation)

    train_normal(reference, make_optimizer(optimizer, reference), data, accumulation)
    opt = LayerwiseOptimizer(make_optimizer(optimizer, model), accumulation_steps=accumulation)
    train_layerwise(model, opt, data, accumulation)

    assert_same_parameters(reference, model)


def test_layerwise_apollo_draws_the_same_projection_seeds() -> None:
    torch.manual_seed(0)
    reference, model = TinyLM(), TinyLM()
    model.load_state_dict(reference.state_dict())
    normal, inner = make_optimizer("apollo", reference), make_optimizer("apollo", model)
    data = batches(1)
    train_normal(reference, normal, data, 1)
    train_layerwise(model, LayerwiseOptimizer(inner), data, 1)
    seeds = [int(normal.state[p]["seed"]) for p in reference.parameters() if "seed" in normal.state[p]]
    assert seeds and seeds == [int(inner.state[p]["seed"]) for p in model.parameters() if "seed" in inner.state[p]]


def test_scheduler_wraps_the_driver_and_counts_optimizer_steps() -> None:
    torch.manual_seed(0)
    reference = TinyLM()
    model = copy.deepcopy(reference)
    data = batches(8)

    normal = make_optimizer("apollo", reference)
    normal_sched = torch.optim.lr_scheduler.LambdaLR(normal, lambda step: 0.5**step)
    train_normal(reference, normal, data, 2, normal_sched)

    opt = LayerwiseOptimizer(make_optimizer("apollo", model), accumulation_steps=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        train_layerwise(model, opt, data, 2, sched)

    assert sched.last_epoch == normal_sched.last_epoch == 4
    assert calls == ["pre", "post"] * 4  # around each optimizer step, not each parameter
    assert opt.param_groups is opt.optimizer.param_groups
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in normal.param_groups]
    assert_same_parameters(reference, model)


def test_state_dict_round_trip_with_weights_only_resumes_exactly() -> None:
    torch.manual_seed(0)
    reference = TinyLM()
    model = copy.deepcopy(reference)
    data = batches(6)

    opt = LayerwiseOptimizer(make_optimizer("apollo", reference))
    train_layerwise(reference, opt, data, 1)

    first = LayerwiseOptimizer(make_optimizer("apollo", model))
    train_layerwise(model, first, data[:3], 1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": first.state_dict()}, buffer)
    first.remove_hooks()
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = TinyLM()
    resumed.load_state_dict(checkpoint["model"])
    second = LayerwiseOptimizer(make_optimizer("apollo", resumed))
    second.load_state_dict(checkpoint["optimizer"])
    train_layerwise(resumed, second, data[3:], 1)

    assert_same_parameters(reference, resumed)
    # The state dict is the inner optimizer's: it loads into the unwrapped optimizer too.
    make_optimizer("apollo", TinyLM()).load_state_dict(checkpoint["optimizer"])
    # State-dict hooks go to the inner optimizer, whose state_dict() runs.
    second.register_state_dict_post_hook(lambda optimizer, state_dict: state_dict.update(tagged=True))
    assert second.state_dict()["tagged"]


def _peak_live_gradient_bytes(model: nn.Module, opt_factory) -> tuple[int, int]:
    """(peak bytes of live .grad tensors during backward, largest single parameter's bytes)."""
    params = list(model.parameters())
    peak = 0

    def track(_: torch.Tensor) -> None:
        nonlocal peak
        peak = max(peak, sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:  # registered before the driver's hooks, so they see each gradient alive
        p.register_post_accumulate_grad_hook(track)
    opt = opt_factory(model)
    model(batches(1)[0]).backward()
    opt.step()
    return peak, max(p.nbytes for p in params)


def test_peak_gradient_bytes_fall_to_the_largest_parameter() -> None:
    torch.manual_seed(0)
    normal_peak, _ = _peak_live_gradient_bytes(TinyLM(depth=4), lambda m: make_optimizer("apollo", m))
    layerwise_peak, largest = _peak_live_gradient_bytes(
        TinyLM(depth=4), lambda m: LayerwiseOptimizer(make_optimizer("apollo", m))
    )
    total = sum(p.nbytes for p in TinyLM(depth=4).parameters())
    assert normal_peak == total
    assert layerwise_peak == largest < total / 4


def test_per_parameter_clipping_and_global_clipping_refused() -> None:
    torch.manual_seed(0)
    reference = TinyLM()
    model = copy.deepcopy(reference)
    data = batches(3)
    max_norm = 0.05

    normal = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    norms = []
    for tokens in data:
        reference(tokens).backward()
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])))
        for p in reference.parameters():
            torch.nn.utils.clip_grad_norm_([p], max_norm)
        normal.step()
        normal.zero_grad()

    opt = LayerwiseOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=max_norm)
    train_layerwise(model, opt, data, 1)
    assert_same_parameters(reference, model)
    torch.testing.assert_close(opt.last_grad_norm, norms[-1])
    with pytest.raises(RuntimeError, match="per-parameter clipping"):
        opt.clip_grad_norm_(1.0)


def test_boundary_closure_and_callable() -> None:
    torch.manual_seed(0)
    reference = TinyLM()
    model_a, model_b = copy.deepcopy(reference), copy.deepcopy(reference)
    data = batches(6)
    train_normal(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), data, 2)

    # "closure": only the backward inside step(closure) updates (Lightning's automatic optimization).
    opt_a = LayerwiseOptimizer(torch.optim.AdamW(model_a.parameters(), lr=1e-2), boundary="closure")
    for i, tokens in enumerate(data):
        if i % 2 == 0:
            (model_a(tokens) / 2).backward()
        else:
            opt_a.step(lambda tokens=tokens: (model_a(tokens) / 2).backward())
    assert_same_parameters(reference, model_a)

    # A callable, asked once per backward (e.g. accelerate's sync_gradients).
    sync = {"now": False}
    opt_b = LayerwiseOptimizer(torch.optim.AdamW(model_b.parameters(), lr=1e-2), boundary=lambda: sync["now"])
    assert opt_b.boundary is not None
    for i, tokens in enumerate(data):
        sync["now"] = i % 2 == 1
        (model_b(tokens) / 2).backward()
    assert_same_parameters(reference, model_b)


def test_parameter_without_gradient_in_the_last_micro_batch_is_still_updated() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    params = [*first.parameters(), *second.parameters()]
    opt = LayerwiseOptimizer(torch.optim.SGD(params, lr=0.1), accumulation_steps=2)
    before = second.weight.detach().clone()
    second(first(torch.randn(2, 4))).sum().backward()  # both get gradients
    first(torch.randn(2, 4)).sum().backward()  # boundary: only `first` fires its hooks
    assert not torch.equal(before, second.weight) and second.weight.grad is None
    assert all(p.grad is None for p in opt.optimizer.param_groups[0]["params"])


def test_step_updates_leftover_gradients_when_hooks_did_not_step() -> None:
    model = nn.Linear(4, 4)
    opt = LayerwiseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), boundary=lambda: False)
    before = model.weight.detach().clone()
    model(torch.randn(2, 4)).sum().backward()
    assert torch.equal(before, model.weight)
    opt.step()
    assert not torch.equal(before, model.weight) and model.weight.grad is None


def test_invalid_arguments_are_rejected_with_the_value() -> None:
    model = nn.Linear(2, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accumulation_steps=0"):
        LayerwiseOptimizer(inner, accumulation_steps=0)
    with pytest.raises(ValueError, match="boundary='sometimes'"):
        LayerwiseOptimizer(inner, boundary="sometimes")
    with pytest.raises(TypeError, match="already layer-wise"):
        LayerwiseOptimizer(LayerwiseOptimizer(inner))


# ---------------------------------------------------------------------------- DDP (2 CPU processes, gloo)
def _ddp_worker(rank: int, world: int, out_dir: str, accumulation: int, naive: bool) -> None:
    for layerwise in (False, True):
        torch.manual_seed(0)
        model = TinyLM()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)  # several buckets
        inner = make_optimizer("apollo", model)
        opt = LayerwiseOptimizer(inner, accumulation_steps=accumulation, ddp=not naive) if layerwise else inner
        data = batches(3 * accumulation, seed=100 + rank)  # each rank sees different data
        for i, tokens in enumerate(data):
            boundary = (i + 1) % accumulation == 0
            if boundary:
                (ddp(tokens) / accumulation).backward()
                opt.step()
                opt.zero_grad()
            else:
                with ddp.no_sync():
                    (ddp(tokens) / accumulation).backward()
        torch.save(model.state_dict(), os.path.join(out_dir, f"{'lw' if layerwise else 'ref'}{rank}.pt"))


def _run_ddp(run_ranks, tmp_path, naive: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    run_ranks(_ddp_worker, str(tmp_path), 2, naive)
    return {name: torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("ref0", "ref1", "lw0", "lw1")}


@pytest.mark.slow
def test_ddp_layerwise_sees_reduced_gradients(tmp_path, run_ranks) -> None:
    """2 processes, gloo, different data per rank, accumulation 2 (no_sync on the first micro-batch)."""
    states = _run_ddp(run_ranks, tmp_path)
    for key, value in states["ref0"].items():
        torch.testing.assert_close(states["ref1"][key], value, rtol=0, atol=0)  # DDP keeps ranks in sync
        torch.testing.assert_close(states["lw0"][key], value, rtol=0, atol=0)
        torch.testing.assert_close(states["lw1"][key], value, rtol=0, atol=0)


def test_composes_with_non_reentrant_checkpointing_and_refuses_reentrant() -> None:
    from torch.utils.checkpoint import checkpoint

    from lightning_memopt.layers import apply_activation_checkpointing

    torch.manual_seed(0)
    reference = TinyLM()
    model = copy.deepcopy(reference)
    data = batches(4)
    train_normal(reference, make_optimizer("apollo", reference), data, 2)
    apply_activation_checkpointing(model)
    train_layerwise(model, LayerwiseOptimizer(make_optimizer("apollo", model), accumulation_steps=2), data, 2)
    assert_same_parameters(reference, model)

    # Reentrant checkpointing runs a nested backward whose end the driver cannot place: refused.
    for layer in model.layers:
        layer.forward = lambda x, layer=layer: checkpoint(type(layer).forward, layer, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="nested \\(reentrant\\) backward"):
        model(data[0]).backward()
