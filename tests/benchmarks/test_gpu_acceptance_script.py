"""benchmarks/gpu_acceptance.py: the step list on any machine, the refusal without CUDA, and the
expectations read from the result files the steps write."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_every_step_within_eight_minutes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    module = load_script()
    for step in module.STEPS:
        assert f"{step.name} (<= {step.timeout_s} s)" in done.stdout
    assert sum(step.timeout_s for step in module.STEPS) <= 8 * 60
    assert "--device cuda" in done.stdout and "--trainer.accelerator=gpu" in done.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_unknown_step_is_refused_with_the_valid_names() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--only", "optimizer_stpe"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "unknown step(s) ['optimizer_stpe']" in done.stderr and "memory_recipes" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_and_points_to_dry_run(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "--dry-run" in done.stderr


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(payload))


def test_expectations_judge_the_measured_ratios(tmp_path: Path) -> None:
    module = load_script()

    def record(shape: str, r256: float, mini: float) -> dict:
        names = {"adamw_fused": 1.0, "apollo_r256": r256, "apollo_mini": mini}
        return {"shape": shape, "results": [{"name": n, "ratio_to_adamw_fused": v} for n, v in names.items()]}

    _write(
        tmp_path / "optimizer_step" / "optimizer_step.json",
        {"records": [record("60m", 1.4, 1.1), record("130m", 1.6, 0.9)]},
    )
    rows = [("adamw", 1000), ("adamw_offload", 700), ("all", 200)]
    _write(
        tmp_path / "memory_recipes" / "memory_recipes.json",
        {"rows": [{"recipe": n, "tensor_peak_bytes": b} for n, b in rows]},
    )
    checks = {c["expectation"]: (c["value"], c["met"]) for c in module.expectations(tmp_path)}
    assert checks["60m: APOLLO rank 256 step / fused AdamW <= 1.5"] == (1.4, True)
    assert checks["60m: APOLLO-Mini step / fused AdamW <= 1.0"] == (1.1, False)
    assert checks["130m: APOLLO rank 256 step / fused AdamW <= 1.5"] == (1.6, False)
    assert checks["130m: APOLLO-Mini step / fused AdamW <= 1.0"] == (0.9, True)
    assert checks["full recipe tensor peak / fp32 AdamW <= 0.25"] == (0.2, True)
    assert checks["activation offloading tensor peak / fp32 AdamW < 1"] == (0.7, True)


def test_expectations_of_steps_that_did_not_run_are_not_measured(tmp_path: Path) -> None:
    module = load_script()
    checks = module.expectations(tmp_path)
    assert checks and all(c["value"] is None and c["met"] is None for c in checks)
    text = module.render_markdown(
        {
            "machine": {"cpu": "x", "cores": 2, "threads": 2, "torch": "t", "gpu": "H100"},
            "seconds": 1.0,
            "steps": [],
            "expectations": checks,
        }
    )
    assert "not measured" in text and "MISSED" not in text
