"""INT8 weights in safetensors: the flat state dict of a Hugging Face model, its exact reload, the
bf16 export, and the Int8Weight form everywhere else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_memopt.quant import (
    dequantize_state_dict,
    flatten_int8_state_dict,
    is_int8_weight,
    load_int8_pretrained,
    quantize_linear_weights,
    save_dequantized_pretrained,
    unflatten_int8_state_dict,
)


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def trained_int8_llama(seed: int = 0) -> nn.Module:
    model = tiny_llama(seed)
    quantize_linear_weights(model, group_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):  # the rounding counters move on
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert is_int8_weight(p) == is_int8_weight(q), name
        if is_int8_weight(p):
            assert torch.equal(p.int8_data, q.int8_data) and torch.equal(p.scales, q.scales), name
            assert p._rounding == q._rounding and p.group_size == q.group_size, name
        else:
            assert torch.equal(p, q), name


def test_flat_form_round_trips_every_field() -> None:
    model = trained_int8_llama()
    state = dict(model.state_dict())  # an HF model at the root: already flat, plain tensors only
    assert not any(is_int8_weight(v) for v in state.values())
    key = "model.layers.0.mlp.down_proj.weight"
    assert key not in state and state[key + ".int8_data"].dtype == torch.int8
    seed, counter = model.model.layers[0].mlp.down_proj.weight._rounding
    assert counter > 0  # the updates requantized it
    assert state[key + ".int8_state"].tolist() == [seed, counter, 16, 0]  # group size 16, float32
    back = unflatten_int8_state_dict(state)
    assert is_int8_weight(back[key]) and back[key]._rounding == model.model.layers[0].mlp.down_proj.weight._rounding
    assert flatten_int8_state_dict(back).keys() == state.keys()


def test_safetensors_reload_is_exact_and_training_continues_identically(tmp_path: Path) -> None:
    model = trained_int8_llama()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    other = tiny_llama(seed=3)
    quantize_linear_weights(other, group_size=16, seed=99)  # other weights and rounding seeds
    result = other.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_weights(model, other)
    for m in (model, other):  # one more step each: identical stochastic rounding
        ids = torch.arange(10).remainder(61)[None]
        m(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(p.grad, alpha=-1e-2)
    assert_same_weights(model, other)


def test_state_dict_keeps_int8weight_outside_hugging_face_roots() -> None:
    inner = trained_int8_llama()
    wrapper = nn.ModuleDict({"model": inner})  # e.g. a LightningModule holding the HF model
    assert is_int8_weight(wrapper.state_dict()["model.model.layers.0.mlp.down_proj.weight"])
    plain = nn.Sequential(nn.Linear(32, 32))
    quantize_linear_weights(plain, "all-linear", group_size=16)
    assert is_int8_weight(plain.state_dict()["0.weight"])


def test_save_pretrained_load_int8_pretrained_and_bf16_export(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = trained_int8_llama()
    model.save_pretrained(tmp_path / "int8")
    files = load_file(tmp_path / "int8" / "model.safetensors")
    assert files["model.layers.1.self_attn.q_proj.weight.int8_data"].dtype == torch.int8

    loaded = load_int8_pretrained(AutoModelForCausalLM, tmp_path / "int8")
    assert_same_weights(model, loaded)
    ids = torch.arange(12)[None]
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)

    save_dequantized_pretrained(model, tmp_path / "bf16")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert exported.dtype == torch.bfloat16 and not any(is_int8_weight(p) for p in exported.parameters())
    expected = dequantize_state_dict(model.state_dict(), torch.bfloat16)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_load_int8_pretrained_refusals(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        load_int8_pretrained(tiny_llama(), tmp_path)
    save_file({"lm_head.weight.int8_data": torch.zeros(2, 2, dtype=torch.int8)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"has no nn\.Linear 'lm_head'"):
        load_int8_pretrained(nn.Sequential(nn.Linear(2, 2)), tmp_path)
    with pytest.raises(ValueError, match="Hugging Face model"):
        save_dequantized_pretrained(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x")
