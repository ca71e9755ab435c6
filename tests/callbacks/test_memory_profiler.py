"""The Lightning MemoryProfiler callback in real (CPU) Trainer runs."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_memopt.callbacks import MemoryProfiler

ROOT = Path(__file__).resolve().parents[2]
NUMEL = 32 * 64 + 64 + 64 * 4 + 4


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(torch.randn(64, 32, generator=g), torch.randn(64, 4, generator=g)), batch_size=8
        )


@pytest.fixture
def trainer(quiet_trainer):
    """``trainer(tmp_path, profiler, **kwargs)``: 4 quiet steps with the profiler."""

    def make(tmp_path: Path, profiler: MemoryProfiler, **kwargs: object) -> L.Trainer:
        return quiet_trainer(**dict(max_steps=4, default_root_dir=tmp_path, callbacks=[profiler]) | kwargs)

    return make


def test_fit_logs_metrics_and_writes_the_report(tmp_path: Path, trainer) -> None:
    profiler = MemoryProfiler(interval=2, report_path=tmp_path / "memory.json", table=False)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, profiler, logger=logger).fit(TinyModule())

    report = json.loads((tmp_path / "memory.json").read_text())
    assert report == json.loads(json.dumps(profiler.report))
    history = report["ranks"][0]["history"]
    assert [r["step"] for r in history] == [0, 2, 3]  # every 2 steps, and the last of max_steps=4
    for record in history:
        assert record["params_bytes"] == 4 * NUMEL
        assert record["grads_bytes"] == 4 * NUMEL  # measured in on_before_optimizer_step
        assert record["optimizer_state_bytes"] == 8 * NUMEL + 4 * 4
        assert record["adamw_baseline_bytes"] == 16 * NUMEL
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"

    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [r for r in rows if r.get("memory/optimizer_state_bytes")]
    assert len(logged) == 3
    assert float(logged[0]["memory/optimizer_state_bytes"]) == 8 * NUMEL + 16
    assert {
        "memory/params_bytes",
        "memory/peak_bytes",
        "memory/activations_estimate_bytes",
        "memory/saving_ratio",
    } <= set(rows[0])


def test_no_logger_unwritable_path_and_accumulation(tmp_path: Path, trainer) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    profiler = MemoryProfiler(interval=1, report_path=blocker / "memory.json", table=True)
    with pytest.warns(RuntimeWarning, match="could not write the memory report"):
        trainer(tmp_path, profiler, accumulate_grad_batches=2, max_steps=3).fit(TinyModule())
    history = profiler.report["ranks"][0]["history"]
    assert [r["step"] for r in history] == [0, 1, 2]  # one record per optimizer step, not per batch
    assert all(r["grads_bytes"] == 4 * NUMEL for r in history)


def test_yaml_fragment_builds_the_callback() -> None:
    fragment = yaml.safe_load((ROOT / "callbacks" / "memory_profiler.yaml").read_text())
    # "callbacks+:" appends to the callbacks of the config it is composed onto
    (entry,) = fragment["trainer"]["callbacks+"]
    assert entry["class_path"] == "lightning_memopt.callbacks.MemoryProfiler"
    documented = set(entry["init_args"])
    accepted = set(inspect.signature(MemoryProfiler).parameters)
    assert documented == accepted, "every option of MemoryProfiler is in the YAML fragment, and only those"
    profiler = MemoryProfiler(**entry["init_args"])
    assert profiler.tracker.interval == 50


@pytest.mark.slow
def test_ddp_two_cpu_processes_report_both_ranks(tmp_path: Path, trainer) -> None:
    profiler = MemoryProfiler(interval=1, report_path=tmp_path / "memory.json", table=False, plot=False)
    trainer(tmp_path, profiler, strategy="ddp_spawn", devices=2, max_steps=2).fit(TinyModule())
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["world_size"] == 2
    assert [e["rank"] for e in report["ranks"]] == [0, 1]
    for entry in report["ranks"]:
        # DDP replicates: every rank holds the whole model, its gradients and the state
        assert [r["step"] for r in entry["history"]] == [0, 1]
        assert entry["final"]["params_bytes"] == 4 * NUMEL
        assert entry["final"]["grads_bytes"] == 4 * NUMEL
        assert entry["final"]["optimizer_state_bytes"] == 8 * NUMEL + 16
