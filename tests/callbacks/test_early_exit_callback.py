"""EarlyExit: Lightning fit with CausalLM trains the exits, logs per-exit metrics, resumes from a
checkpoint with own exit heads, and refuses bad settings."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_memopt.callbacks import EarlyExit
from lightning_memopt.data import TextDataModule
from lightning_memopt.layers import early_exit_forward, get_early_exits
from lightning_memopt.models import CausalLM


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, tmp_path_factory, single_thread):
    monkeypatch.setenv("LIGHTNING_MEMOPT_CACHE", str(tmp_path_factory.getbasetemp() / "memopt_cache"))
    monkeypatch.chdir(tmp_path)


def data() -> TextDataModule:
    return TextDataModule(sources="pydoc", tokenizer="byte", seq_len=32, batch_size=4, max_chars=40_000)


def lm() -> CausalLM:
    return CausalLM("tiny", optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))


@pytest.fixture
def trainer(quiet_trainer):
    """``trainer(steps, callbacks, **kwargs)``: quiet, validating 2 batches at the end."""

    def make(steps: int, callbacks: list, **kwargs) -> L.Trainer:
        options = dict(max_steps=steps, limit_val_batches=2, val_check_interval=steps, num_sanity_val_steps=0)
        return quiet_trainer(callbacks=callbacks, **options | kwargs)

    return make


def test_fit_trains_the_exits_and_logs_per_exit_metrics(trainer) -> None:
    model = lm()
    fit = trainer(6, [EarlyExit(exit_layers=[1, 2])])
    fit.fit(model, data())
    metrics = fit.callback_metrics
    for key in ("train/loss", "train/exit_1_loss", "train/exit_2_loss", "val/loss", "val/ppl"):
        assert torch.isfinite(metrics[key]), key
    for layer in (1, 2):
        assert torch.isfinite(metrics[f"val/exit_{layer}_loss"])
        torch.testing.assert_close(metrics[f"val/exit_{layer}_ppl"], metrics[f"val/exit_{layer}_loss"].exp())
    # The exits stay on the model for inference; the callback's configure_model wrapper is gone after fit.
    exits = get_early_exits(model.model)
    assert exits is not None and exits.exit_layers == (1, 2)
    assert "configure_model" not in vars(model)
    ids = torch.randint(0, 257, (1, 8))
    model.model.eval()
    assert early_exit_forward(model.model, ids, threshold=0.0).exit_layers.eq(1).all()


def test_the_exit_loss_falls_during_fit(trainer) -> None:
    model = lm()
    fit = trainer(8, [EarlyExit(exit_layers=[1], loss_weights=[1.0])], log_every_n_steps=1)
    seen: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/exit_1_loss"]))

    fit.callbacks.append(Record())
    fit.fit(model, data())
    assert seen[-1] < seen[0] - 0.5, seen


def test_own_heads_are_optimized_and_resume_from_a_checkpoint(tmp_path: Path, trainer) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = lm()
    first = trainer(3, [EarlyExit(exit_layers=[1], share_head=False), checkpoint], enable_checkpointing=True)
    first.fit(model, data())
    heads = model.model.early_exit_heads
    optimized = {id(p) for group in first.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in heads.parameters())
    assert not torch.equal(heads["1"].head.weight, model.model.lm_head.weight)  # trained apart
    saved = {k: v.clone() for k, v in heads.state_dict().items()}

    resumed = lm()
    second = trainer(5, [EarlyExit(exit_layers=[1], share_head=False)])
    state = torch.load(checkpoint.last_model_path, weights_only=True)
    assert any(key.startswith("model.early_exit_heads.1.") for key in state["state_dict"])
    second.fit(resumed, data(), ckpt_path=checkpoint.last_model_path)
    assert second.global_step == 5
    assert torch.isfinite(second.callback_metrics["train/exit_1_loss"])
    # The heads were restored, then trained on: they moved from the saved values, by a little.
    moved = resumed.model.early_exit_heads["1"].head.weight
    assert not torch.equal(moved, saved["1.head.weight"])
    assert (moved - saved["1.head.weight"]).abs().max() < 0.1

    # Other exits cannot load these heads: the state dict says which keys do not match.
    with pytest.raises(RuntimeError, match=r"early_exit_heads\.2"):
        trainer(6, [EarlyExit(exit_layers=[2], share_head=False)]).fit(
            lm(), data(), ckpt_path=checkpoint.last_model_path
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit_layers": [2, 1]}, r"increasing order; write \[1, 2\]"),
        ({"exit_layers": [1, 1]}, r"repeats a layer"),
        ({"exit_layers": []}, r"one or more 0-based block indices"),
        ({"exit_layers": [1, 2], "loss_weights": [1.0]}, r"has 1 values for 2 exits"),
        ({"exit_layers": [1], "curriculum": "sometimes"}, r"curriculum='sometimes'"),
        ({"exit_layers": [1], "loss_weights": [1.0, 0.0]}, r"final loss weight 0.0.*must be > 0"),
    ],
)
def test_bad_settings_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        EarlyExit(**kwargs)


def test_exit_outside_the_model_raises_at_fit(trainer) -> None:
    with pytest.raises(ValueError, match=r"exit layer 3 is the last block"):
        trainer(1, [EarlyExit(exit_layers=[3])]).fit(lm(), data())


def test_sharding_strategies_are_refused() -> None:
    from lightning_memopt.strategies import ApolloFSDPStrategy

    with pytest.raises(ValueError, match=r"ApolloFSDPStrategy.*not supported.*strategy='ddp'"):
        EarlyExit(exit_layers=[1]).setup(SimpleNamespace(strategy=ApolloFSDPStrategy()), lm(), "fit")


def test_module_without_a_model_to_train_is_refused(trainer) -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["input_ids"].float()[:, :2]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"pl_module.model.*self.model\(input_ids=\.\.\., labels=\.\.\.\)"):
        trainer(1, [EarlyExit(exit_layers=[1])]).fit(Plain(), data())
