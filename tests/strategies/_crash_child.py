"""A training run that test_crash_safe_checkpoints.py kills in the middle of a checkpoint save.

``python _crash_child.py MODE ROOT [KILL_NAME]``:

- ``MODE``: ``file`` (one device, single-file checkpoints through ``AtomicCheckpointIO``) or
  ``folder`` (``apollo_fsdp`` on one process: distributed checkpoint folders).
- With ``KILL_NAME``, the save after step 3 of the checkpoint of that name (``last.ckpt``,
  ``epoch=0-step=3.ckpt``) stops half way (half the file's bytes, or the shards without Lightning's ``meta.pt``), writes
  ``ROOT/in-save`` and sleeps: the test SIGKILLs the process there.
- Without it, the run resumes with ``ckpt_path="last"`` and writes ``ROOT/result.pt``: the
  step it resumed from and the final weights.

Each step trains on the batch numbered by ``global_step`` (not on the loader's order), so a
run killed and resumed ends with the weights of a run never interrupted.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import lightning_memopt  # noqa: F401  (registers apollo_fsdp)
from lightning_memopt.optim import create_optimizer
from lightning_memopt.strategies import apollo_fsdp, atomic
from lightning_memopt.strategies.atomic import AtomicCheckpointIO

MAX_STEPS = 6
KILL_STEP = 3  # the saves after this optimizer step are the ones killed
RUNNING: list[pl.LightningModule] = []  # the model being trained (its global_step tells which save this is)


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(MAX_STEPS, 8, 6, generator=generator), torch.randn(MAX_STEPS, 8, 1, generator=generator)


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.head = nn.Linear(6, 1)
        self.inputs, self.targets = batches()
        self.resumed_from: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)

    def loss(self, step: int) -> torch.Tensor:
        return F.mse_loss(self(self.inputs[step]), self.targets[step])

    def training_step(self, batch, batch_idx):
        if self.resumed_from is None:
            self.resumed_from = self.global_step
        self.log("progress", float(self.global_step))
        return self.loss(self.global_step)

    def configure_optimizers(self):
        return create_optimizer("apollo", self, "rank=2,update_proj_gap=2", lr=0.05, target_modules="all-linear")

    def train_dataloader(self):
        return DataLoader(range(100), batch_size=1)


def reference_weights() -> dict[str, torch.Tensor]:
    """The uninterrupted run, without Lightning."""
    model = Model()
    optimizer = model.configure_optimizers()
    for step in range(MAX_STEPS):
        model.loss(step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(("inputs", "targets"))}


def is_save_to_kill(path: str, kill_name: str) -> bool:
    staged = Path(path).name == kill_name and Path(path).parent.name.startswith(atomic.STAGING_PREFIX)
    return staged and RUNNING[0].global_step == KILL_STEP


def stall_in_save(root: Path) -> None:
    (root / "in-save").write_text("now")
    time.sleep(600)  # the test kills the process here


def main(mode: str, root: Path, kill_name: str | None) -> None:
    torch.set_num_threads(1)
    checkpoints = root / "checkpoints"
    if kill_name is not None:
        if mode == "file":
            real_save = atomic._torch_save

            def half_save(checkpoint, file) -> None:
                if is_save_to_kill(file.name, kill_name):
                    buffer = io.BytesIO()
                    real_save(checkpoint, buffer)
                    file.write(buffer.getvalue()[: buffer.tell() // 2])
                    file.flush()
                    stall_in_save(root)
                real_save(checkpoint, file)

            atomic._torch_save = half_save
        else:
            real_shards = apollo_fsdp._distributed_checkpoint_save

            def shards_only(state, path: Path) -> None:
                real_shards(state, path)  # the shards are on disk; Lightning's meta.pt is not yet
                if is_save_to_kill(str(path), kill_name):
                    stall_in_save(root)

            apollo_fsdp._distributed_checkpoint_save = shards_only

    kwargs = {"plugins": [AtomicCheckpointIO()]} if mode == "file" else {"strategy": "apollo_fsdp"}
    checkpoint = ModelCheckpoint(
        dirpath=checkpoints, save_last=True, save_top_k=2, monitor="progress", mode="max", every_n_train_steps=1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=MAX_STEPS,
        default_root_dir=root,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    model = Model()
    RUNNING.append(model)
    trainer.fit(model, ckpt_path=None if kill_name else "last")
    if kill_name is None:
        weights = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()
            if not k.startswith(("inputs", "targets"))
        }
        best_k = {str(Path(p).name): float(v) for p, v in checkpoint.best_k_models.items()}
        torch.save({"resumed_from": model.resumed_from, "weights": weights, "best_k": best_k}, root / "result.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
