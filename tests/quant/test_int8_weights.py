"""INT8 weights trained directly with stochastic rounding: the quantizer, the tensor subclass,
optimizer updates (torch AdamW, APOLLO-Mini, layer-wise), state dicts, memory accounting and a
short training run on real text."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from lightning_memopt.memory import breakdown
from lightning_memopt.optim import APOLLOMini, LayerwiseOptimizer, apollo_param_groups
from lightning_memopt.quant import (
    Int8Weight,
    dequantize_int8,
    dequantize_linear_weights,
    is_int8_weight,
    quantize_int8,
    quantize_linear_weights,
    stochastic_round,
)

# Tiny tensors: one thread is as fast, and far faster on a shared, loaded machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def expanded_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def mlp(seed: int = 0) -> nn.Module:
    """Two linear layers; 300 input features: groups of 128, 128 and a shorter one of 44."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(300, 64), nn.GELU(), nn.Linear(64, 16))


def int8_and_float_twins(seed: int = 0, group_size: int = 128) -> tuple[nn.Module, nn.Module]:
    """An INT8 model and a float model whose linear weights are its dequantized weights."""
    model = mlp(seed)
    quantize_linear_weights(model, "all-linear", group_size=group_size)
    reference = mlp(seed)
    with torch.no_grad():
        for layer, ref in zip(model, reference):
            if isinstance(layer, nn.Linear):
                ref.weight.copy_(layer.weight.dequantize())
    return model, reference


# ---------------------------------------------------------------------------- the quantizer
def test_round_to_nearest_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 300) * torch.logspace(-3, 1, 300)  # groups of very different ranges
    q, scales = quantize_int8(w, group_size=128)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (64, 3)
    assert scales.dtype == torch.float32
    error = (w - dequantize_int8(q, scales, 128)).abs()
    bound = expanded_scales(scales, 300, 128) / 2
    assert (error <= bound * (1 + 1e-6)).all()
    # Symmetric absmax: each group's largest magnitude maps to +-127.
    assert (q.float().view(64, -1)[:, :256].view(64, 2, 128).abs().amax(-1) == 127).all()


def test_stochastic_round_is_unbiased() -> None:
    draws = 4000
    x = torch.linspace(-3, 3, 61) + 0.37  # fractional parts all over [0, 1)
    generator = torch.Generator().manual_seed(0)
    rounded = stochastic_round(x.expand(draws, -1).contiguous(), generator)
    assert ((rounded == x.floor()) | (rounded == x.floor() + 1)).all()
    # A draw is floor(x) + Bernoulli(frac(x)): variance <= 1/4, so the mean's std <= 0.5 / sqrt(draws).
    tolerance = 5 * 0.5 / math.sqrt(draws)
    assert (rounded.mean(0) - x).abs().max() <= tolerance


def test_stochastic_quantization_is_unbiased() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    draws = 2000
    total = torch.zeros_like(w)
    generator = torch.Generator().manual_seed(1)
    for _ in range(draws):
        q, scales = quantize_int8(w, group_size=32, stochastic=True, generator=generator)
        total += dequantize_int8(q, scales, 32)
    step = expanded_scales(scales, 64, 32)  # the scales depend on w only, not on the draw
    # Per element: scale * Bernoulli, variance <= scale^2 / 4.
    assert ((total / draws - w).abs() <= 5 * step / (2 * math.sqrt(draws))).all()


def test_int8_range_never_overflows() -> None:
    w = Int8Weight.from_float(torch.tensor([[1.0, -1.0, 0.5, 1e-30], [0.0, 0.0, 0.0, 0.0]]), group_size=4, seed=0)
    assert torch.equal(w.int8_data[1], torch.zeros(4, dtype=torch.int8))  # all-zero group: finite scale
    assert torch.isfinite(w.scales).all()
    for _ in range(200):  # grow and shrink the absmax element, in float rounding's worst places
        w.mul_(1.0 + 1e-7)
        w.add_(torch.tensor([[1e-3, -1e-3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert w.int8_data.abs().max() == 127
    assert w.int8_data.min() >= -127
    q, _ = quantize_int8(torch.randn(16, 256) * 1e4, 64, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert q.abs().max() <= 127


# ---------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_backward_equals_the_float_linear(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(300, 32, bias=bias)
    reference = copy.deepcopy(layer)
    quantize_linear_weights(nn.Sequential(layer), "all-linear", group_size=128)
    with torch.no_grad():
        reference.weight.copy_(layer.weight.dequantize())
    x = torch.randn(3, 5, 300)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    out, out_ref = layer(x), reference(x_ref)
    assert torch.equal(out, out_ref)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    out_ref.backward(grad_out)
    assert type(layer.weight.grad) is torch.Tensor and layer.weight.grad.dtype == torch.float32
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    assert torch.equal(x.grad, x_ref.grad)
    if bias:
        assert torch.equal(layer.bias.grad, reference.bias.grad)


def test_other_ops_see_the_dequantized_matrix() -> None:
    w = Int8Weight.from_float(torch.randn(4, 8), group_size=4)
    plain = w.dequantize()
    assert torch.equal(w.t(), plain.t()) and torch.equal(w.sum(), plain.sum())
    assert type(torch.zeros_like(w)) is torch.Tensor and torch.zeros_like(w).dtype == torch.float32
    assert type(w.new_zeros(3)) is torch.Tensor
    assert is_int8_weight(w.clone()) and torch.equal(w.clone().int8_data, w.int8_data)
    assert is_int8_weight(w.to(torch.bfloat16)) and w.to(torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- optimizer updates
def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    model(torch.randn(16, 300, generator=generator)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _assert_within_one_step(model: nn.Module, reference: nn.Module) -> None:
    """Each INT8 weight is within one quantization step (its new scale) of the float one:
    stochastic rounding picks one of the two neighbouring grid points."""
    for layer, ref in zip(model, reference):
        if isinstance(layer, nn.Linear):
            w = layer.weight
            step = expanded_scales(w.scales, w.shape[1], w.group_size)
            assert ((w.dequantize() - ref.weight).abs() <= step * (1 + 1e-5)).all()
            assert torch.equal(layer.bias, ref.bias)  # float parameters: the same update


OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0),
    "adamw_fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0, fused=True),
    "adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0, foreach=True),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=1e-1, momentum=0.9),
    "apollo_mini": lambda m: APOLLOMini(apollo_param_groups(m, "all-linear"), lr=1e-2, weight_decay=0.0),
    "apollo_mini_layerwise": lambda m: LayerwiseOptimizer(
        APOLLOMini(apollo_param_groups(m, "all-linear"), lr=1e-2, weight_decay=0.0)
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_steps_match_the_float_model(name: str) -> None:
    model, reference = int8_and_float_twins()
    optimizer, ref_optimizer = OPTIMIZERS[name](model), OPTIMIZERS[name](reference)
    before = model[0].weight.int8_data.clone()
    _step(model, optimizer)
    _step(reference, ref_optimizer)
    _assert_within_one_step(model, reference)
    assert not torch.equal(model[0].weight.int8_data, before)  # it did train
    # The state is plain float tensors, and the state dict loads with weights_only=True.
    state = optimizer.state_dict()["state"]
    assert all(type(v) is torch.Tensor for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    optimizer.load_state_dict(torch.load(buffer, weights_only=True))


def test_tiny_updates_accumulate_only_with_stochastic_rounding() -> None:
    torch.manual_seed(0)
    values = torch.rand(32, 128) - 0.5
    values[:, 0] = 1.0  # each row's absmax, never updated: the scale stays 1 / 127
    scale = 1.0 / 127
    delta = torch.full_like(values, 0.1 * scale)  # a tenth of a quantization step
    delta[:, 0] = 0.0
    steps = 200

    stochastic = Int8Weight.from_float(values, group_size=128, seed=0)
    start = stochastic.dequantize()
    for _ in range(steps):
        stochastic.add_(delta)
    drift = (stochastic.dequantize() - start)[:, 1:].mean().item()

    nearest = start.clone()  # the same updates with round-to-nearest requantization
    for _ in range(steps):
        nearest = dequantize_int8(*quantize_int8(nearest + delta, 128), 128)
    lost = (nearest - start)[:, 1:].abs().max().item()

    expected = steps * 0.1 * scale
    # Rounding errors persist from step to step (a martingale): variance <= steps * scale^2 / 4 per
    # element, averaged over 32 x 127 elements.
    tolerance = 5 * math.sqrt(steps) * scale / 2 / math.sqrt(32 * 127)
    assert abs(drift - expected) <= tolerance, (drift, expected, tolerance)
    assert lost == 0.0  # nearest rounding throws every update away


def test_rounding_is_reproducible_and_independent_of_the_global_rng() -> None:
    results = []
    for global_seed in (0, 1):
        w = Int8Weight.from_float(torch.linspace(-1, 1, 64).view(4, 16), group_size=16, seed=7)
        torch.manual_seed(global_seed)
        for _ in range(5):
            w.add_(1e-3)
        results.append(w.int8_data.clone())
    assert torch.equal(results[0], results[1])


# ---------------------------------------------------------------------------- state dict, memory
def test_state_dict_round_trip_is_exact_and_loads_weights_only() -> None:
    model, _ = int8_and_float_twins()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert is_int8_weight(checkpoint["model"]["0.weight"])

    resumed = mlp(seed=5)  # other weights, other rounding seeds: all must come from the checkpoint
    quantize_linear_weights(resumed, "all-linear", seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for a, b in zip(model.parameters(), resumed.parameters()):
        if is_int8_weight(a):
            assert torch.equal(a.int8_data, b.int8_data) and torch.equal(a.scales, b.scales)
            assert a._rounding == b._rounding
    for seed in (1, 2):  # the continued runs round identically
        _step(model, optimizer, seed)
        _step(resumed, resumed_optimizer, seed)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a.dequantize() if is_int8_weight(a) else a, b.dequantize() if is_int8_weight(b) else b)

    # A float model loads the INT8 checkpoint as dequantized weights; and back to float for export.
    float_model = mlp()
    float_model.load_state_dict(checkpoint["model"])
    assert torch.equal(float_model[0].weight, checkpoint["model"]["0.weight"].dequantize())
    assert dequantize_linear_weights(resumed) == ["0.weight", "2.weight"]
    assert type(resumed[0].weight) is nn.Parameter


def test_params_bytes_are_one_byte_per_weight_plus_fp32_scales() -> None:
    from lightning_memopt.memory import estimate
    from lightning_memopt.models import build_llama

    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=257, num_hidden_layers=2)
    float_bytes = breakdown(model).params_bytes
    converted = quantize_linear_weights(model, group_size=128)
    assert len(converted) == 2 * 7  # q, k, v, o, gate, up, down per block
    weights = [p for p in model.parameters() if is_int8_weight(p)]
    numel = sum(p.numel() for p in weights)
    scales = sum(p.shape[0] * math.ceil(p.shape[1] / 128) for p in weights)
    result = breakdown(model)
    assert result.params_bytes == float_bytes - 4 * numel + numel * 1 + scales * 4
    assert result.params_by_dtype["int8"] == numel
    assert result.numel == breakdown(build_llama("tiny", vocab_size=257, num_hidden_layers=2)).numel
    # The estimate counts gradients and optimizer state in the weights' float dtype, as they are.
    est = estimate(model, "apollo_mini")
    assert est.params_bytes == result.params_bytes and est.optimizer_state_bytes > 0


def test_bad_inputs_raise_value_errors_naming_the_value() -> None:
    for bad in (0, -4, 1.5, True):
        with pytest.raises(ValueError, match=rf"group_size={bad!r}.*positive integer"):
            quantize_linear_weights(mlp(), "all-linear", group_size=bad)
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matched no module"):
        quantize_linear_weights(mlp(), ["nope"])
    projection = nn.Module()
    projection.weight = nn.Parameter(torch.zeros(4, 4))  # a 2-D weight, but no nn.Linear
    with pytest.raises(ValueError, match=r"not nn.Linear.*\['0'\]"):
        quantize_linear_weights(nn.Sequential(projection), ["0"])
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="meta device"):
        quantize_linear_weights(meta, "all-linear")
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        quantize_int8(torch.zeros(8))
    model = mlp()
    assert quantize_linear_weights(model, "all-linear") == ["0", "2"]
    assert quantize_linear_weights(model, "all-linear") == []  # already INT8: nothing to do


# ---------------------------------------------------------------------------- training on real text
@pytest.mark.slow
def test_tiny_llama_trains_as_well_as_in_float() -> None:
    """APOLLO-Mini, layer-wise, 100 steps of 8 x 64 bytes of the CPython docs, tiny LLaMA with 2
    blocks. Measured held-out loss (float / INT8), model seeds 0, 1, 2: 2.509 / 2.519,
    2.422 / 2.425, 2.520 / 2.539 (from ln(257) = 5.55): INT8 is 0.003 to 0.019 above float."""
    from lightning_memopt.data import pydoc_documents
    from lightning_memopt.models import build_llama

    text = "\n".join(pydoc_documents()).encode()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(data.numel() * 0.9)

    def batches(count: int, batch: int, seed: int, source: torch.Tensor) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, source.numel() - 65, (count, batch), generator=generator)
        return [torch.stack([source[s : s + 64] for s in row.tolist()]) for row in starts]

    train, held_out = batches(100, 8, 0, data[:cut]), batches(4, 16, 1, data[cut:])
    losses = {}
    for int8 in (False, True):
        torch.manual_seed(0)
        model = build_llama("tiny", vocab_size=257, num_hidden_layers=2)
        if int8:
            quantize_linear_weights(model, group_size=128)
        optimizer = LayerwiseOptimizer(APOLLOMini(apollo_param_groups(model), lr=3e-3, weight_decay=0.0))
        for tokens in train:
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            losses[int8] = sum(model(input_ids=t, labels=t).loss.item() for t in held_out) / len(held_out)
    assert losses[False] < 2.8, losses  # it learned: from 5.55
    assert losses[True] <= losses[False] + 0.05, losses
