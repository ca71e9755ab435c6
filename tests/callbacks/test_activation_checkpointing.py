"""ActivationCheckpointing / ActivationOffloading callbacks: same training, applied once, undone after fit."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from lightning_memopt.callbacks import ActivationCheckpointing, ActivationOffloading
from lightning_memopt.layers import apply_activation_checkpointing, is_activation_checkpointed, offload

ROOT = Path(__file__).resolve().parents[2]


# The shared ``tiny_llama`` fixture at these tests' sizes.
LLAMA = dict(vocab_size=64, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)


class LlamaModule(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.checkpointed_during_fit: list[bool] = []

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.checkpointed_during_fit.append(is_activation_checkpointed(self))
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.fixture
def fit(tiny_llama, quiet_trainer):
    """``fit(callbacks)``: one epoch of the tiny LLaMA (same weights and data every time)."""

    def run(callbacks) -> LlamaModule:
        model = LlamaModule(tiny_llama(**LLAMA))
        loader = DataLoader(torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0)), batch_size=2)
        quiet_trainer(max_epochs=1, callbacks=callbacks).fit(model, loader)
        return model

    return run


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_fit_with_checkpointing_equals_fit_without(policy: str, fit) -> None:
    reference = fit([])
    model = fit([ActivationCheckpointing(policy=policy)])
    assert_same(reference, model)
    assert model.checkpointed_during_fit == [True] * 3 and reference.checkpointed_during_fit == [False] * 3
    assert model.model.config.use_cache is False  # the nested HF model's KV cache is off
    assert not is_activation_checkpointed(model)  # undone at teardown


def test_callback_does_not_double_wrap_what_a_strategy_wrapped(tiny_llama) -> None:
    model = LlamaModule(tiny_llama(**LLAMA))
    by_strategy = apply_activation_checkpointing(model)  # what apollo_fsdp's own option does
    callback = ActivationCheckpointing()
    callback.on_fit_start(None, model)  # type: ignore[arg-type]
    assert callback._wrapped == [] and len(by_strategy) == 2
    callback.teardown(None, model, "fit")  # type: ignore[arg-type]
    assert is_activation_checkpointed(model)  # the strategy's checkpointing stays


def test_named_blocks(fit) -> None:
    model = fit([ActivationCheckpointing(blocks=["model.model.layers.1"])])
    assert model.checkpointed_during_fit == [True] * 3


def test_offloading_on_cpu_is_a_no_op_that_warns_once(monkeypatch, fit) -> None:
    monkeypatch.setattr(offload, "_warned_no_cuda", False)
    reference = fit([])
    with pytest.warns(UserWarning, match="CUDA is not available") as record:
        model = fit([ActivationOffloading()])
    assert sum("CUDA is not available" in str(w.message) for w in record) == 1
    assert_same(reference, model)


def test_yaml_fragment_builds_the_callbacks() -> None:
    text = (ROOT / "callbacks" / "activation_checkpointing.yaml").read_text()
    (entry,) = yaml.safe_load(text)["trainer"]["callbacks+"]
    assert entry["class_path"] == "lightning_memopt.callbacks.ActivationCheckpointing"
    assert set(entry["init_args"]) == set(inspect.signature(ActivationCheckpointing).parameters)
    assert ActivationCheckpointing(**entry["init_args"]).policy == "full"
    # The offloading entry is there, commented out: uncommented it builds too.
    uncommented = "\n".join(
        line.replace("    # ", "    ", 1) if "#   " in line or "# - class_path" in line else line
        for line in text.splitlines()
    )
    entries = yaml.safe_load(uncommented)["trainer"]["callbacks+"]
    offloading = entries[1]
    assert offloading["class_path"] == "lightning_memopt.callbacks.ActivationOffloading"
    assert set(offloading["init_args"]) == set(inspect.signature(ActivationOffloading).parameters)
