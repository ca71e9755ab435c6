"""LayerwiseUpdates: Lightning fit with in-backward updates equals fit without, and resumes exactly."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from lightning_memopt.callbacks import LayerwiseUpdates
from lightning_memopt.optim import APOLLO, LayerwiseOptimizer, apollo_param_groups

ROOT = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class TinyLM(L.LightningModule):
    def __init__(self, vocab: int = 40, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(2))
        self.lm_head = nn.Linear(width, vocab)
        self.lrs: list[float] = []
        self.grads_seen_before_step: list[bool] = []

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return nn.functional.cross_entropy(self.lm_head(x).flatten(0, 1), tokens.roll(-1, 1).flatten())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.grads_seen_before_step.append(any(p.grad is not None for p in self.parameters()))

    def configure_optimizers(self):
        optimizer = APOLLO(apollo_param_groups(self, rank=4), lr=1e-2, update_proj_gap=2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def data(batches: int = 5) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(torch.randint(0, 40, (batches * 2, 12), generator=generator), batch_size=2)


@pytest.fixture
def fit(quiet_trainer):
    """``fit(callbacks, max_epochs=1, ckpt_path=None, model=None, **trainer_kwargs)`` -> (trainer, model)."""

    def run(callbacks, max_epochs: int = 1, ckpt_path=None, model=None, **trainer_kwargs) -> tuple[L.Trainer, TinyLM]:
        if model is None:
            torch.manual_seed(0)
            model = TinyLM()
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, **trainer_kwargs)
        trainer.fit(model, data(), ckpt_path=ckpt_path)
        return trainer, model

    return run


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fit_with_layerwise_updates_equals_fit_without(accumulate: int, fit) -> None:
    # 5 batches: with accumulation 2 the epoch ends on a shorter window of one batch.
    _, reference = fit([], accumulate_grad_batches=accumulate)
    callback = LayerwiseUpdates()
    trainer, model = fit([callback], accumulate_grad_batches=accumulate)

    assert_same(reference, model)
    assert model.lrs == reference.lrs and len(model.lrs) == (5 if accumulate == 1 else 3)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == len(model.lrs)
    assert all(reference.grads_seen_before_step) and not any(model.grads_seen_before_step)
    # After fit the hooks are gone and the user's optimizer is back.
    assert not isinstance(trainer.strategy.optimizers[0], LayerwiseOptimizer)
    model.training_step(next(iter(data())), 0).backward()
    assert model.lm_head.weight.grad is not None


def test_checkpoint_resume_is_exact(tmp_path, fit) -> None:
    _, reference = fit([LayerwiseUpdates()], max_epochs=2)

    first_trainer, _ = fit([LayerwiseUpdates()], max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert "exp_avg" in checkpoint["optimizer_states"][0]["state"][0]  # the inner optimizer's state

    torch.manual_seed(123)  # a fresh model: everything must come from the checkpoint
    _, resumed = fit([LayerwiseUpdates()], max_epochs=2, ckpt_path=path, model=TinyLM())
    assert_same(reference, resumed)


def test_global_gradient_clipping_is_refused_with_the_alternative(fit) -> None:
    with pytest.raises(ValueError, match=r"gradient_clip_val=1.0.*LayerwiseUpdates\(max_grad_norm=...\)"):
        fit([LayerwiseUpdates()], gradient_clip_val=1.0)


def test_per_parameter_clipping_runs(fit) -> None:
    _, unclipped = fit([LayerwiseUpdates()])
    _, clipped = fit([LayerwiseUpdates(max_grad_norm=1e-3)])
    assert not torch.equal(unclipped.lm_head.weight, clipped.lm_head.weight)


def test_manual_optimization_is_refused(fit) -> None:
    class Manual(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="wrap your optimizer yourself"):
        fit([LayerwiseUpdates()], model=Manual())


def test_yaml_fragment_builds_the_callback() -> None:
    fragment = yaml.safe_load((ROOT / "callbacks" / "layerwise_updates.yaml").read_text())
    (entry,) = fragment["trainer"]["callbacks+"]  # appends to the callbacks of the config it is composed with
    assert entry["class_path"] == "lightning_memopt.callbacks.LayerwiseUpdates"
    assert set(entry["init_args"]) == set(inspect.signature(LayerwiseUpdates).parameters)
    assert LayerwiseUpdates(**entry["init_args"]).max_grad_norm is None
