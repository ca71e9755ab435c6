"""Exact byte counts of lightning_memopt.memory.breakdown on models with known shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_memopt.memory import AdamWBaseline, breakdown, gradient_bytes, unwrap_optimizer
from lightning_memopt.optim import APOLLO, apollo_param_groups

# Linear(16, 32) + LayerNorm(32) + Linear(32, 8)
MLP_NUMEL = (16 * 32 + 32) + (32 + 32) + (32 * 8 + 8)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))


def test_fp32_params_buffers_and_baseline() -> None:
    model = nn.Sequential(mlp(), nn.BatchNorm1d(8))
    b = breakdown(model)
    numel = MLP_NUMEL + 2 * 8
    assert b.params_bytes == 4 * numel
    assert b.params_by_dtype == {"float32": 4 * numel}
    # running_mean + running_var (fp32) + num_batches_tracked (int64 scalar)
    assert b.buffers_bytes == 2 * 8 * 4 + 8
    assert (b.grads_bytes, b.optimizer_state_bytes, b.projection_cache_bytes, b.workspace_bytes) == (0, 0, 0, 0)
    assert b.numel == b.trainable_numel == numel
    assert b.baseline == AdamWBaseline(4 * numel, 4 * numel, 8 * numel)
    assert b.bytes_by_device == {"cpu": b.params_bytes + b.buffers_bytes}
    assert b.source == "measured"


def test_bf16_and_mixed_dtypes() -> None:
    model = mlp()
    model[0].to(torch.bfloat16)
    b = breakdown(model)
    first = 16 * 32 + 32
    assert b.params_by_dtype == {"bfloat16": 2 * first, "float32": 4 * (MLP_NUMEL - first)}
    assert b.params_bytes == sum(b.params_by_dtype.values())
    # the baseline is fp32 whatever the model's dtype
    assert b.baseline.params_bytes == 4 * MLP_NUMEL
    saving = b.savings()["params"]
    assert saving.saving_bytes == 2 * first
    assert saving.saving_ratio == pytest.approx(2 * first / (4 * MLP_NUMEL))


def test_tied_weights_and_views_are_counted_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 16)
            self.head = nn.Linear(16, 100, bias=False)
            self.head.weight = self.embed.weight
            # a buffer that is a view of a parameter: the storage is already counted
            self.register_buffer("alias", self.embed.weight.data[:10])
            self.register_buffer("own", torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

    model = Tied()
    model(torch.randint(0, 100, (2, 5))).sum().backward()
    b = breakdown(model)
    assert b.params_bytes == 100 * 16 * 4
    assert b.numel == 100 * 16
    assert b.buffers_bytes == 3 * 4
    assert b.grads_bytes == 100 * 16 * 4


def test_meta_model_counts_like_the_real_one() -> None:
    real = breakdown(nn.Sequential(mlp(), nn.BatchNorm1d(8)))
    with torch.device("meta"):
        meta_model = nn.Sequential(mlp(), nn.BatchNorm1d(8))
        # views on the meta device share their storage as well
        meta_model.register_buffer("view", meta_model[0][0].weight.data[2:])
    meta = breakdown(meta_model)
    assert (meta.params_bytes, meta.buffers_bytes, meta.numel) == (real.params_bytes, real.buffers_bytes, real.numel)
    assert meta.bytes_by_device == {"meta": meta.params_bytes + meta.buffers_bytes}


def test_grads_exist_between_backward_and_zero_grad() -> None:
    model = mlp()
    frozen = model[1]
    frozen.requires_grad_(False)
    model(torch.randn(4, 16)).sum().backward()
    b = breakdown(model)
    assert b.grads_bytes == 4 * (MLP_NUMEL - 64)
    assert b.trainable_numel == MLP_NUMEL - 64
    assert gradient_bytes(model) == (b.grads_bytes, {"cpu": b.grads_bytes})
    assert breakdown(model, grads=False).grads_bytes == 0
    model.zero_grad(set_to_none=True)
    assert breakdown(model).grads_bytes == 0


def test_adamw_and_sgd_state() -> None:
    model = mlp()
    params = list(model.parameters())
    adamw = torch.optim.AdamW(params[:2])
    sgd = torch.optim.SGD(params[2:], lr=0.1, momentum=0.9)
    assert breakdown(model, adamw).optimizer_state_bytes == 0  # state is lazy
    model(torch.randn(4, 16)).sum().backward()
    adamw.step()
    sgd.step()
    first = 16 * 32 + 32
    # exp_avg + exp_avg_sq per element, plus a 4-byte fp32 step per parameter
    assert breakdown(model, adamw).optimizer_state_bytes == 2 * 4 * first + 2 * 4
    # momentum buffers only
    assert breakdown(model, sgd).optimizer_state_bytes == 4 * (MLP_NUMEL - first)
    assert breakdown(model, [adamw, sgd]).optimizer_state_bytes == 2 * 4 * first + 8 + 4 * (MLP_NUMEL - first)


def test_wrapped_optimizers_are_unwrapped() -> None:
    model = mlp()
    inner = torch.optim.AdamW(model.parameters())

    class Wrapper:  # like Lightning's LightningOptimizer / accelerate's AcceleratedOptimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self._optimizer = optimizer

    assert unwrap_optimizer(Wrapper(inner)) is inner
    model(torch.randn(2, 16)).sum().backward()
    inner.step()
    assert breakdown(model, Wrapper(inner)).optimizer_state_bytes == breakdown(model, inner).optimizer_state_bytes > 0


def test_apollo_projection_cache_is_its_own_line() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = APOLLO(apollo_param_groups(model, target_modules=["0"], rank=4), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    b = breakdown(model, opt)
    assert b.projection_cache_bytes == opt.projection_cache_bytes() == 4 * 64 * 4  # r x min(m, n), fp32
    low_rank = 2 * 4 * 4 * 128 + 8 + 4 + 4  # moments r x max(m,n), seed int64, prev_update_norm, step
    adamw = 2 * 4 * (128 + 8 * 128 + 8) + 3 * 4
    assert b.optimizer_state_bytes == low_rank + adamw
    held = b.projection_cache_bytes + b.workspace_bytes  # outside the state, still the optimizer's
    assert b.static_bytes == b.params_bytes + b.grads_bytes + b.optimizer_state_bytes + held
    total = b.savings()["total"]
    assert total.measured_bytes == b.params_bytes + b.grads_bytes + b.optimizer_state_bytes + held


def test_apollo_step_workspace_is_its_own_line() -> None:
    # Weights 96x80 and 120x70 are tall, 70x96 is wide: both projection sides take scratch.
    model = nn.Sequential(nn.Linear(80, 96), nn.ReLU(), nn.Linear(96, 70), nn.ReLU(), nn.Linear(70, 120))
    opt = APOLLO(apollo_param_groups(model, target_modules="all-linear"), lr=1e-2, rank=8)
    before = breakdown(model, opt)
    assert before.workspace_bytes == opt.workspace_bytes() == 0  # no step, no scratch yet
    model(torch.randn(4, 80)).sum().backward()
    opt.step()
    b = breakdown(model, opt)
    # Kept between steps on the CPU: real memory, reported as the optimizer reports it.
    assert b.workspace_bytes == opt.workspace_bytes() > 0
    assert b.static_bytes == (
        b.params_bytes
        + b.grads_bytes
        + b.optimizer_state_bytes
        + b.projection_cache_bytes
        + b.workspace_bytes
        + b.buffers_bytes
    )
    # The AdamW baseline holds no workspace: it counts against APOLLO's saving.
    total = b.savings()["total"]
    assert total.measured_bytes == (
        b.params_bytes + b.grads_bytes + b.optimizer_state_bytes + b.projection_cache_bytes + b.workspace_bytes
    )
    assert b.to_dict()["workspace_bytes"] == b.workspace_bytes
    # Summed over a list of optimizers, like the other categories.
    assert breakdown(model, [opt, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)]).workspace_bytes == (
        b.workspace_bytes
    )


def test_int8_weights_count_payload_and_scales() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")  # quantized on .to()
    assert layer.weight.dtype == torch.int8
    b = breakdown(layer)
    # int8 payload 32 x 64; fp32 row scales (SCB, 32) and fp32 bias (32)
    assert b.params_by_dtype == {"int8": 32 * 64, "float32": 32 * 4 + 32 * 4}
    assert b.params_bytes == 32 * 64 + 256
    assert b.numel == 32 * 64 + 32
    assert b.trainable_numel == 32  # the int8 weight is frozen
    assert b.savings()["params"].saving_bytes == 4 * (32 * 64 + 32) - b.params_bytes


@pytest.mark.parametrize("nested", [False, True])
def test_4bit_weights_count_payload_and_quant_state(nested: bool) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested)
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.uint8
    b = breakdown(layer)
    payload = 32 * 64 // 2  # two 4-bit values per byte
    blocks = 32 * 64 // 64  # one absmax per block of 64
    code, bias = 16 * 4, 32 * 4
    if nested:  # absmax itself quantized to uint8, with an fp32 offset and its own fp32 absmax / 256-entry code
        expected = {"uint8": payload + blocks, "float32": code + bias + 4 + 4 + 256 * 4}
    else:
        expected = {"uint8": payload, "float32": blocks * 4 + code + bias}
    assert b.params_by_dtype == expected
    assert b.numel == 32 * 64 + 32  # the logical shape, not the packed one


def test_no_optimizer_and_no_parameters() -> None:
    b = breakdown(nn.ReLU())
    assert (b.params_bytes, b.numel, b.baseline.total_bytes) == (0, 0, 0)
    assert b.savings()["params"].saving_ratio is None
    assert breakdown(mlp(), None).optimizer_state_bytes == 0


def test_to_dict_is_plain_json() -> None:
    import json

    model = mlp()
    data = breakdown(model).to_dict()
    json.dumps(data)
    assert data["params_bytes"] == 4 * MLP_NUMEL
    assert data["baseline"]["total_bytes"] == 16 * MLP_NUMEL
    assert data["savings"]["optimizer_state"]["saving_bytes"] == 8 * MLP_NUMEL
