"""The ``apollo_fsdp`` strategy: registration, bad input, and (forked gloo ranks) training that
matches one device, checkpoints that resume exactly and re-shard 2 -> 1 -> 2, consolidation.

Multi-rank tests fork processes that set Lightning's launcher variables (``LOCAL_RANK`` ...),
so each Trainer runs in place instead of re-launching pytest. Several checks share one fork.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_memopt  # noqa: F401  (registers the strategy names)
from lightning_memopt.callbacks import ActivationCheckpointing
from lightning_memopt.optim import create_optimizer
from lightning_memopt.strategies import ApolloFSDPStrategy, consolidate_checkpoint

STRATEGY_NAMES = ["apollo_fsdp", "apollo_fsdp_cpu_offload", "apollo_fsdp_activation_checkpointing", "apollo_fsdp_bf16"]
SAMPLES, GLOBAL_BATCH = 32, 8  # 4 optimizer steps per epoch


# ---------------------------------------------------------------------- the model
class Block(nn.Module):
    """Awkward shapes on purpose: 9 rows (uneven on 2 ranks), a wide 6 x 9 matrix (its moments
    split 5 + 4 columns) and a 1-row gate (rank 1 holds none of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 9)
        self.down = nn.Linear(9, 6)
        self.gate = nn.Linear(6, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x))) * torch.sigmoid(self.gate(x))


class TinyModel(pl.LightningModule):
    def __init__(
        self, optimizer: str = "apollo", options: str = "rank=2,update_proj_gap=3", lr: float = 0.05, init_seed: int = 0
    ):
        super().__init__()
        self.save_hyperparameters()
        self.steps_run = 0
        torch.manual_seed(init_seed)
        self.inp = nn.Linear(5, 6)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.steps_run += 1
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        name, options, lr = self.hparams.optimizer, self.hparams.options, self.hparams.lr
        if name == "torch_adamw":
            return torch.optim.AdamW(self.parameters(), lr=lr)
        if name in ("apollo", "apollo_mini"):
            return create_optimizer(name, self, options, lr=lr, target_modules="all-linear")
        return create_optimizer(name, self, lr=lr)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(SAMPLES, 5, generator=generator), torch.randn(SAMPLES, 1, generator=generator))
        if self._trainer is None:
            return DataLoader(data, batch_size=GLOBAL_BATCH)
        # In order (Lightning's own sampler would shuffle): step k sees samples 8k..8k+7 on any rank count.
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)


def reference(epochs: int, **hparams) -> TinyModel:
    """The same training on one device, without Lightning."""
    model = TinyModel(**hparams)
    optimizer = model.configure_optimizers()
    for _ in range(epochs):
        for x, y in model.train_dataloader():
            model.training_step((x, y), 0).backward()
            optimizer.step()
            optimizer.zero_grad()
    return model


def make_trainer(root: str, epochs: int, strategy="apollo_fsdp", devices: int | None = None, **kwargs) -> pl.Trainer:
    if devices is None:
        devices = int(os.environ.get("LIGHTNING_TEST_WORLD_SIZE", "1"))
    os.environ["WORLD_SIZE"] = str(devices)  # Lightning's teardown removes it after each fit
    return pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_epochs=epochs,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        **kwargs,
    )


def assert_same_weights(model: nn.Module, expected: nn.Module, what: str) -> None:
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


# ---------------------------------------------------------------------- registration, construction
def test_names_are_registered_with_their_options() -> None:
    assert set(STRATEGY_NAMES) <= set(StrategyRegistry)
    assert StrategyRegistry.get("apollo_fsdp_activation_checkpointing").activation_checkpointing
    assert StrategyRegistry.get("apollo_fsdp_bf16").param_dtype is torch.bfloat16
    trainer = pl.Trainer(strategy="apollo_fsdp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, ApolloFSDPStrategy)


@pytest.mark.slow
def test_import_registers_without_importing_lightning_first() -> None:
    """``import lightning_memopt`` leaves Lightning unimported; the names appear once it is imported."""
    code = (
        "import sys, lightning_memopt\n"
        "assert 'lightning.pytorch' not in sys.modules\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        f"assert set({STRATEGY_NAMES!r}) <= set(StrategyRegistry), list(StrategyRegistry)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_lightning_cli_by_name_and_by_class_path(tmp_path) -> None:
    from lightning.pytorch.cli import LightningCLI

    def cli(strategy_args: list[str]) -> pl.Trainer:
        args = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.logger=false", *strategy_args]
        return LightningCLI(TinyModel, run=False, args=args, save_config_callback=None).trainer

    assert isinstance(cli(["--trainer.strategy=apollo_fsdp"]).strategy, ApolloFSDPStrategy)
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_memopt.strategies.ApolloFSDPStrategy\n"
        "    init_args:\n      block_classes: [Block]\n      activation_checkpointing: true\n"
        "      param_dtype: bfloat16\n"
    )
    strategy = cli([f"--config={config}"]).strategy
    assert isinstance(strategy, ApolloFSDPStrategy)
    assert strategy.block_classes == ["Block"] and strategy.activation_checkpointing
    assert strategy.param_dtype is torch.bfloat16


@pytest.mark.parametrize(
    ("trainer_kwargs", "match"),
    [
        ({"strategy": "apollo_fsdp_cpu_offload"}, "needs Trainer\\(accelerator='cuda'\\)"),
        ({"strategy": ApolloFSDPStrategy(process_group_backend="nccl")}, "process_group_backend='nccl'"),
        ({"precision": "64-true"}, "does not support precision='64-true'"),
    ],
)
def test_bad_combinations_fail_when_the_trainer_is_built(trainer_kwargs, match) -> None:
    kwargs = {"strategy": "apollo_fsdp", "accelerator": "cpu", "devices": 2, "logger": False, **trainer_kwargs}
    with pytest.raises(ValueError, match=match):
        pl.Trainer(**kwargs)


def test_unsupported_accelerator_fails_clearly() -> None:
    from lightning.pytorch.accelerators import Accelerator

    class OtherAccelerator(Accelerator):
        def setup_device(self, device):
            pass

        def teardown(self):
            pass

        @staticmethod
        def parse_devices(devices):
            return int(devices)

        @staticmethod
        def get_parallel_devices(devices):
            return [torch.device("cpu")] * int(devices)

        @staticmethod
        def auto_device_count():
            return 1

        @staticmethod
        def is_available():
            return True

        def get_device_stats(self, device):
            return {}

        @classmethod
        def name(cls):
            return "other"

    with pytest.raises(ValueError, match="runs on CPU \\(gloo\\) or CUDA"):
        pl.Trainer(strategy="apollo_fsdp", accelerator=OtherAccelerator(), devices=2, logger=False)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="param_dtype='int8'"):
        ApolloFSDPStrategy(param_dtype="int8")
    with pytest.raises(ValueError, match="data_parallel_size=0"):
        ApolloFSDPStrategy(data_parallel_size=0)


# ---------------------------------------------------------------------- training on ranks
def _train_two_ranks(rank: int, world_size: int, root: str) -> None:
    # Same weights as one device after 2 epochs (8 steps), per optimizer.
    configs = {
        "apollo channel": {"optimizer": "apollo"},
        # lr: APOLLO-Mini scales updates by sqrt(128); a smaller lr keeps the toy model out of chaos.
        "apollo_mini": {"optimizer": "apollo_mini", "options": "update_proj_gap=3", "lr": 0.01},
        "registry adamw": {"optimizer": "adamw"},
        "torch AdamW": {"optimizer": "torch_adamw"},
    }
    for what, hparams in configs.items():
        model = TinyModel(**hparams)
        make_trainer(root, epochs=2).fit(model)
        assert_same_weights(model, reference(2, **hparams), what)
    # Activation checkpointing changes memory, not the math; with the callback too, each block
    # is checkpointed once (the callback finds the strategy's checkpointing and leaves it).
    model = TinyModel()
    callback = ActivationCheckpointing()
    make_trainer(root, epochs=2, strategy="apollo_fsdp_activation_checkpointing", callbacks=[callback]).fit(model)
    assert_same_weights(model, reference(2), "apollo + activation checkpointing")
    for block in model.blocks:
        forward = block.__dict__["forward"]  # the strategy's checkpointed forward, not wrapped again
        assert type(forward).__name__ == "_CheckpointedForward" and forward.previous is None

    # Resume: 1 epoch, save, resume for the 2nd epoch == 2 epochs straight.
    model = TinyModel()
    trainer = make_trainer(root, epochs=1)
    trainer.fit(model)
    trainer.save_checkpoint(f"{root}/two_ranks.ckpt")
    assert Path(f"{root}/two_ranks.ckpt").is_dir()  # a distributed checkpoint: one shard file per rank
    resumed = TinyModel(init_seed=1)  # other weights: only the checkpoint can make them right
    make_trainer(root, epochs=2).fit(resumed, ckpt_path=f"{root}/two_ranks.ckpt")
    assert resumed.steps_run == SAMPLES // GLOBAL_BATCH
    assert_same_weights(resumed, reference(2), "2 ranks resumed")

    # The same with one full file gathered on rank 0 (save_distributed_checkpoint=False).
    trainer = make_trainer(root, epochs=1, strategy=ApolloFSDPStrategy(save_distributed_checkpoint=False))
    trainer.fit(TinyModel())
    trainer.save_checkpoint(f"{root}/full.ckpt")
    assert Path(f"{root}/full.ckpt").is_file()
    resumed = TinyModel(init_seed=1)
    strategy = ApolloFSDPStrategy(save_distributed_checkpoint=False)
    make_trainer(root, epochs=2, strategy=strategy).fit(resumed, ckpt_path=f"{root}/full.ckpt")
    assert_same_weights(resumed, reference(2), "2 ranks resumed from a full checkpoint")


def _train_one_rank(rank: int, world_size: int, root: str) -> None:
    # 2 -> 1: the 2-rank checkpoint resumes on one rank (same global batch) and continues the run.
    model = TinyModel(init_seed=1)
    make_trainer(root, epochs=2).fit(model, ckpt_path=f"{root}/two_ranks.ckpt")
    assert model.steps_run == SAMPLES // GLOBAL_BATCH
    assert_same_weights(model, reference(2), "resumed on 1 rank from 2")
    # A 1-rank checkpoint for the 1 -> 2 direction.
    trainer = make_trainer(root, epochs=1)
    trainer.fit(TinyModel())
    trainer.save_checkpoint(f"{root}/one_rank.ckpt")

    # bitsandbytes' 8-bit optimizers: a clear error before any step.
    with pytest.raises(TypeError, match="AdamW8bit \\(bitsandbytes\\) cannot step on FSDP2"):
        make_trainer(root, epochs=1).fit(TinyModel(optimizer="adamw8bit"))

    # An optimizer built before sharding (as LightningCLI's automatic `optimizer:` key does).
    stale = TinyModel()
    early = torch.optim.AdamW(stale.parameters(), lr=0.1)
    stale.configure_optimizers = lambda: early
    with pytest.raises(RuntimeError, match="OptimizerCallable"):
        make_trainer(root, epochs=1).fit(stale)

    from lightning.pytorch.cli import LightningCLI

    os.environ["WORLD_SIZE"] = "1"
    args = [
        "fit",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=apollo_fsdp",
        "--trainer.logger=false",
        "--trainer.max_epochs=1",
        "--trainer.use_distributed_sampler=false",
        f"--trainer.default_root_dir={root}",
        "--optimizer=torch.optim.AdamW",
    ]
    with pytest.raises(RuntimeError, match="LightningCLI's automatic `optimizer:` key"):
        LightningCLI(TinyModel, args=args, save_config_callback=None)

    # No repeated block: a warning, and the root alone is sharded (and trains).
    class Flat(TinyModel):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])

    with pytest.warns(UserWarning, match="found no repeated transformer block in Flat"):
        make_trainer(root, epochs=1).fit(Flat())


def _resume_two_ranks_from_one(rank: int, world_size: int, root: str) -> None:
    model = TinyModel(init_seed=1)
    make_trainer(root, epochs=2).fit(model, ckpt_path=f"{root}/one_rank.ckpt")
    assert model.steps_run == SAMPLES // GLOBAL_BATCH
    assert_same_weights(model, reference(2), "resumed on 2 ranks from 1")


@pytest.mark.slow
def test_apollo_fsdp_trains_resumes_reshards_and_consolidates(tmp_path, run_ranks) -> None:
    root = str(tmp_path)
    # Lightning creates the process group in each rank.
    run_ranks(_train_two_ranks, root, init_process_group=False)
    run_ranks(_train_one_rank, root, world_size=1, init_process_group=False)
    run_ranks(_resume_two_ranks_from_one, root, init_process_group=False)

    # Consolidated for inference: one file that load_from_checkpoint reads, weights after epoch 1.
    single = consolidate_checkpoint(tmp_path / "two_ranks.ckpt", tmp_path / "model.pt")
    loaded = TinyModel.load_from_checkpoint(single, init_seed=1)
    assert_same_weights(loaded, reference(1), "consolidated")
    assert torch.load(single, weights_only=True)["global_step"] == SAMPLES // GLOBAL_BATCH
    with pytest.raises(FileExistsError):
        consolidate_checkpoint(tmp_path / "two_ranks.ckpt", single)
    with pytest.raises(ValueError, match="not a distributed checkpoint folder"):
        consolidate_checkpoint(tmp_path / "missing", tmp_path / "other.pt")
