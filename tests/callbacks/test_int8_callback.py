"""Int8Weights: Lightning fit on INT8 weights (converted after configure_model, before the
optimizer), checkpoints that hold the INT8 data and resume exactly, and the refusals."""

from __future__ import annotations

import inspect
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from lightning_memopt.callbacks import Int8Weights, LayerwiseUpdates
from lightning_memopt.memory import breakdown
from lightning_memopt.models import CausalLM
from lightning_memopt.optim import APOLLOMini
from lightning_memopt.quant import is_int8_weight

ROOT = Path(__file__).resolve().parents[2]


# Tiny tensors: one thread is as fast, and far faster on a shared, loaded machine.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def text_blocks(tmp_path_factory) -> tuple[DataLoader, int]:
    """Byte-level blocks of the CPython docs from TextDataModule, in a fixed order (no shuffle,
    so that a resumed run sees the same batches as an uninterrupted one)."""
    from lightning_memopt.data import TextDataModule

    dm = TextDataModule(
        tokenizer="byte", max_chars=20_000, seq_len=32, batch_size=4, cache_dir=str(tmp_path_factory.mktemp("cache"))
    )
    dm.prepare_data()
    dm.setup("fit")
    return DataLoader(dm.train_dataset, batch_size=4, shuffle=False), int(dm.num_tokens)


@pytest.fixture
def fit(quiet_trainer):
    """``fit(loader, vocab, max_epochs, ckpt_path=None, seed=0)`` -> (trainer, lm): INT8 + layer-wise."""

    def run(
        loader: DataLoader, vocab: int, max_epochs: int, ckpt_path=None, seed: int = 0
    ) -> tuple[L.Trainer, CausalLM]:
        torch.manual_seed(seed)
        lm = CausalLM(
            "tiny",
            optimizer=partial(APOLLOMini, lr=1e-2, weight_decay=0.0),
            vocab_size=vocab,
            model_overrides={"num_hidden_layers": 1},
        )
        trainer = quiet_trainer(
            max_epochs=max_epochs,
            limit_train_batches=2,
            limit_val_batches=0,
            callbacks=[Int8Weights(group_size=64), LayerwiseUpdates()],
        )
        trainer.fit(lm, train_dataloaders=loader, ckpt_path=ckpt_path)
        return trainer, lm

    return run


def int8_state(lm: CausalLM) -> dict[str, tuple]:
    return {
        name: (p.int8_data, p.scales, list(p._rounding)) if is_int8_weight(p) else (p,)
        for name, p in lm.named_parameters()
    }


def test_fit_trains_int8_weights_and_resumes_exactly(text_blocks, tmp_path, fit) -> None:
    loader, vocab = text_blocks
    trainer, reference = fit(loader, vocab, max_epochs=2)

    # Converted before configure_optimizers: the optimizer holds the INT8 weights, and trained them.
    weights = [p for p in reference.parameters() if is_int8_weight(p)]
    assert len(weights) == 7  # q, k, v, o, gate, up, down of the one block
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in held for p in weights)
    assert all(p._rounding[1] == 4 for p in weights)  # 4 updates, each requantized once
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    numel = sum(p.numel() for p in weights)
    scales = sum(p.shape[0] * math.ceil(p.shape[1] / 64) for p in weights)
    assert breakdown(reference).params_by_dtype["int8"] == numel
    assert (
        breakdown(reference).params_by_dtype["float32"]
        - sum(p.numel() * 4 for p in reference.parameters() if not is_int8_weight(p))
        == scales * 4
    )
    assert "configure_model" not in vars(reference)  # the wrapper is gone after fit

    first, _ = fit(loader, vocab, max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert is_int8_weight(checkpoint["state_dict"]["model.model.layers.0.mlp.down_proj.weight"])

    _, resumed = fit(loader, vocab, max_epochs=2, ckpt_path=path, seed=123)  # other weights, other rounding seeds
    expected, got = int8_state(reference), int8_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        for a, b in zip(expected[name], got[name]):
            assert (a == b) if isinstance(a, list) else torch.equal(a, b), name


class Tiny(L.LightningModule):
    """A module that builds its layers in __init__ (no configure_model)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.fixture
def tiny_trainer(quiet_trainer):
    """``tiny_trainer(callback, **kwargs)``: 2 quiet steps with the callback."""

    def make(callback: Int8Weights, **kwargs) -> L.Trainer:
        return quiet_trainer(max_steps=2, callbacks=[callback], **kwargs)

    return make


def test_a_module_built_in_init_is_converted_too(tiny_trainer) -> None:
    callback = Int8Weights(group_size=8)
    module = Tiny()
    tiny_trainer(callback).fit(module, DataLoader(torch.randn(8, 16), batch_size=4))
    assert callback.converted == ["layers.0", "layers.1"]
    assert all(is_int8_weight(layer.weight) for layer in module.layers)


def test_refusals_name_the_value(tiny_trainer) -> None:
    with pytest.raises(ValueError, match=r"group_size=0"):
        Int8Weights(group_size=0)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=1, logger=False)
    with pytest.raises(ValueError, match=r"strategy DDPStrategy is not supported.*Train on one device"):
        Int8Weights().setup(trainer, Tiny(), "fit")
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matched no module"):
        tiny_trainer(Int8Weights(target_modules=["nope"])).fit(Tiny(), DataLoader(torch.randn(8, 16), batch_size=4))


def test_yaml_fragment_builds_the_callback() -> None:
    fragment = yaml.safe_load((ROOT / "callbacks" / "int8_weights.yaml").read_text())
    (entry,) = fragment["trainer"]["callbacks+"]
    assert entry["class_path"] == "lightning_memopt.callbacks.Int8Weights"
    assert set(entry["init_args"]) == set(inspect.signature(Int8Weights).parameters)
    assert Int8Weights(**entry["init_args"]).group_size == 128


def test_composes_with_other_model_surgery_callbacks(quiet_trainer) -> None:
    """Listed after UpcycleToMoE (which also acts at the end of configure_model), Int8Weights
    still converts, the upcycled experts included."""
    from lightning_memopt.callbacks import UpcycleToMoE

    data = DataLoader([{"input_ids": torch.randint(0, 257, (16,))} for _ in range(2)], batch_size=2)
    lm = CausalLM("tiny", vocab_size=257, model_overrides={"num_hidden_layers": 1})
    int8 = Int8Weights()
    trainer = quiet_trainer(max_steps=1, callbacks=[UpcycleToMoE(num_experts=2, top_k=1), int8])
    trainer.fit(lm, data)
    assert any(".experts." in name for name in int8.converted)
    assert sum(is_int8_weight(p) for p in lm.parameters()) == len(int8.converted) == 4 + 2 * 3
