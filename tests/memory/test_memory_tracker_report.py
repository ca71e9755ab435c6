"""The shared tracker (what both callbacks drive) and its report: JSON schema, PNG, table."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_memopt.memory import (
    METRIC_PREFIX,
    RECORD_KEYS,
    REPORT_SCHEMA,
    MemoryTracker,
    PeakMemory,
    breakdown,
    metrics_from_record,
    render_table,
)

INT_KEYS = {k for k in RECORD_KEYS if k.endswith("_bytes")} | {"step"}
RATIO_KEYS = {k for k in RECORD_KEYS if k.endswith("_ratio")}


def train(tracker: MemoryTracker, steps: int, optimizer_cls: type = torch.optim.AdamW) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = optimizer_cls(model.parameters(), lr=1e-3)
    tracker.start(model)
    for step in range(steps):
        model(torch.randn(8, 32)).pow(2).mean().backward()
        tracker.on_gradients(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker.on_step_end(model, opt, step)
    return model, opt


def check_record(record: dict) -> None:
    assert set(RECORD_KEYS) <= set(record)
    for key in INT_KEYS:
        assert isinstance(record[key], int), key
    for key in RATIO_KEYS:
        assert record[key] is None or isinstance(record[key], float), key


def test_records_every_interval_with_grads_measured_before_zero_grad(tmp_path: Path) -> None:
    tracker = MemoryTracker(interval=3, report_path=tmp_path / "memory.json", table=False)
    train(tracker, steps=7)
    assert [r["step"] for r in tracker.history] == [0, 3, 6]
    numel = 32 * 64 + 64 + 64 * 4 + 4
    for record in tracker.history:
        check_record(record)
        assert record["params_bytes"] == 4 * numel
        assert record["grads_bytes"] == 4 * numel  # gone after zero_grad, but measured before it
        assert record["optimizer_state_bytes"] == 8 * numel + 4 * 4
        assert record["adamw_baseline_bytes"] == 16 * numel
        assert record["saving_bytes"] == -16  # AdamW's own step counters
        assert record["peak_bytes"] > 0
        assert record["activations_estimate_bytes"] >= 0
    metrics = metrics_from_record(tracker.history[-1])
    assert metrics[METRIC_PREFIX + "optimizer_state_bytes"] == 8 * numel + 16
    assert "memory/step" not in metrics


def test_report_json_schema_and_png(tmp_path: Path) -> None:
    path = tmp_path / "out" / "memory.json"
    tracker = MemoryTracker(interval=2, report_path=path, table=False)
    model, opt = train(tracker, steps=4)
    report = tracker.finish(model, opt)
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["schema"] == REPORT_SCHEMA
    assert (data["interval"], data["world_size"], len(data["ranks"])) == (2, 1, 1)
    entry = data["ranks"][0]
    assert {"rank", "world_size", "device", "peak_source", "peak_resettable", "max_peak_bytes", "notes"} <= set(entry)
    assert entry["host"] == socket.gethostname()  # a multi-node report can group its ranks by machine
    assert (entry["rank"], entry["device"], entry["peak_source"]) == (0, "cpu", "cpu_rss")
    assert [r["step"] for r in entry["history"]] == [0, 2, 3]  # every interval, and the last step at finish
    assert entry["final"] == entry["history"][-1]
    check_record(entry["final"])
    assert entry["breakdown"]["optimizer_state_bytes"] == entry["final"]["optimizer_state_bytes"]
    assert set(entry["breakdown"]["savings"]) == {"params", "grads", "optimizer_state", "total"}

    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_table_shows_the_categories() -> None:
    from rich.console import Console

    tracker = MemoryTracker(interval=1, report_path=None, table=False)
    train(tracker, steps=1)
    report = tracker.finish()
    console = Console(record=True, width=160)
    console.print(render_table(report))
    text = console.export_text()
    for label in ("parameters", "gradients", "optimizer state", "AdamW fp32", "total", "activations (est.)"):
        assert label in text


def test_unwritable_report_path_warns_and_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    tracker = MemoryTracker(interval=1, report_path=blocker / "memory.json", table=False)
    train(tracker, steps=1)
    with pytest.warns(RuntimeWarning, match="could not write the memory report"):
        report = tracker.finish()
    assert report["ranks"][0]["final"]["step"] == 0


def test_no_optimizer_no_steps_and_foreign_optimizers(tmp_path: Path) -> None:
    model = nn.Linear(8, 8)
    tracker = MemoryTracker(interval=1, report_path=None, table=False)
    # no start(), no optimizer: the first record starts the tracker itself
    record = tracker.on_step_end(model, None, step=0)
    assert record is not None and record["optimizer_state_bytes"] == 0
    # nothing measured during training: finish measures once
    idle = MemoryTracker(interval=5, report_path=tmp_path / "idle.json", table=False)
    report = idle.finish(model, None)
    assert report["ranks"][0]["final"]["params_bytes"] == 4 * 72

    class Lion(torch.optim.Optimizer):  # a foreign optimizer with a nested state layout
        def __init__(self, params: object, lr: float) -> None:
            super().__init__(params, {"lr": lr})

        def step(self, closure: object = None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["buffers"] = {"ema": [torch.zeros_like(p)]}

    tracker = MemoryTracker(interval=1, report_path=None, table=False)
    train(tracker, steps=1, optimizer_cls=Lion)
    assert tracker.history[0]["optimizer_state_bytes"] == 4 * (32 * 64 + 64 + 64 * 4 + 4)


def test_a_failing_measurement_warns_once_and_training_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_memopt.memory.tracker as tracker_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(tracker_module, "breakdown", broken)
    tracker = MemoryTracker(interval=1, report_path=None, table=False)
    with pytest.warns(RuntimeWarning, match="boom"):
        train(tracker, steps=3)
    assert tracker.history == []


def test_a_second_run_starts_afresh() -> None:
    tracker = MemoryTracker(interval=1, report_path=None, table=False)
    train(tracker, steps=3)
    tracker.finish()
    train(tracker, steps=2)
    assert [r["step"] for r in tracker.history] == [0, 1]
    assert tracker.report is None


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval=0"):
        MemoryTracker(interval=0)


def test_cpu_peak_is_reset_per_interval() -> None:
    peak = PeakMemory("cpu")
    peak.reset()
    before = peak.read()
    if not before["peak_resettable"]:
        pytest.skip("this kernel does not let a process reset its peak resident set")
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    assert peak.read()["peak_bytes"] >= before["peak_bytes"] + 60 * 1024 * 1024
    del block
    peak.reset()
    assert peak.read()["peak_bytes"] < before["peak_bytes"] + 60 * 1024 * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_activations_and_snapshot(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    tracker = MemoryTracker(interval=1, report_path=tmp_path / "m.json", table=False, cuda_snapshot=True)
    tracker.start(model)
    for step in range(2):
        model(torch.randn(512, 1024, device="cuda")).sum().backward()
        tracker.on_gradients(model, step)
        opt.step()
        opt.zero_grad()
        tracker.on_step_end(model, opt, step)
    record = tracker.history[-1]
    # parameters, gradients and both moments were all alive during the optimizer step
    assert record["peak_bytes"] >= 4 * breakdown(model).params_bytes
    assert record["peak_reserved_bytes"] >= record["peak_bytes"]
    # a 512 x 4096 fp32 hidden activation (8 MiB) is held for backward
    assert record["activations_estimate_bytes"] >= 512 * 4096 * 4
    tracker.finish()
    assert (tmp_path / "cuda_memory_snapshot_rank0.pickle").stat().st_size > 0
    assert tracker.report["ranks"][0]["peak_source"] == "cuda_allocator"


def test_apollo_step_workspace_is_recorded_and_counted() -> None:
    from rich.console import Console

    from lightning_memopt.memory.tracker import make_record
    from lightning_memopt.optim import APOLLO, apollo_param_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = APOLLO(apollo_param_groups(model, target_modules=["0"], rank=4), lr=1e-3)
    tracker = MemoryTracker(interval=1, report_path=None, table=False)
    tracker.start(model)
    for step in range(2):
        model(torch.randn(8, 32)).pow(2).mean().backward()
        tracker.on_gradients(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker.on_step_end(model, opt, step)
    record = tracker.history[-1]
    check_record(record)
    assert record["workspace_bytes"] == opt.workspace_bytes() > 0
    assert record["training_state_bytes"] == (
        record["params_bytes"]
        + record["grads_bytes"]
        + record["optimizer_state_bytes"]
        + record["projection_cache_bytes"]
        + record["workspace_bytes"]
    )
    assert record["static_bytes"] == record["training_state_bytes"] + record["buffers_bytes"]
    # The workspace sits on the parameters' device: it is not mistaken for activations.
    measured = breakdown(model, opt)
    on_device = measured.bytes_by_device["cpu"] + measured.projection_cache_bytes + measured.workspace_bytes
    peak = {"device": "cpu", "peak_bytes": on_device + 1000}
    assert make_record(0, measured, peak, device_overhead=0)["activations_estimate_bytes"] == 1000
    console = Console(record=True, width=160)
    console.print(render_table(tracker.finish()))
    assert "step workspace" in console.export_text()
