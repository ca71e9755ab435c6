"""benchmarks/early_exit.py runs end to end (--smoke): trains a tiny model with exits, decodes with
every method, and self-speculative decoding comes out lossless."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.slow  # trains a tokenizer and a model, then decodes with six methods: ~45 s on a busy 2-core machine
def test_early_exit_benchmark_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("early_exit_benchmark", ROOT / "benchmarks" / "early_exit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--out", str(tmp_path)])

    assert report["train"]["steps"] == 3 and set(report["train"]["val_loss"]) == {"exit_1", "exit_2", "final"}
    rows = {row["method"]: row for row in report["decode"]["rows"]}
    assert set(rows) == {
        "HF greedy",
        "HF assistant_early_exit=2",
        "ours, full model",
        "self-speculative exit 1, draft 3",
        "confidence exit 0.5",
        "confidence exit 0.5, gates",
    }
    assert rows["HF greedy"]["speedup"]["median"] == 1.0
    assert rows["ours, full model"]["lossless"] and rows["self-speculative exit 1, draft 3"]["lossless"]
    assert 0.0 <= rows["self-speculative exit 1, draft 3"]["acceptance_rate"] <= 1.0
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    for method in ("confidence exit 0.5", "confidence exit 0.5, gates"):
        quality = report["confidence_quality"][method]
        assert 0.0 <= quality["teacher_forced_agreement"] <= 1.0
        assert rows[method]["fraction_skipped"] >= 0.0
    assert set(report["gates"]["training_agreement"]) == {"1", "2"}
    coverage = report["gates"]["coverage_at_95"]
    assert set(coverage) == {"1", "2"}
    assert all(0.0 <= value <= 1.0 for row in coverage.values() for value in row.values())
    calibration = report["config"]["calibration"]["gates"]
    assert set(calibration["generated"]) == set(calibration["teacher_forced"]) == {"0.9", "0.5"}
    assert json.loads((tmp_path / "early_exit.json").read_text())["benchmark"] == "early_exit"
    assert "| self-speculative exit 1, draft 3 |" in (tmp_path / "early_exit.md").read_text()
    assert (tmp_path / "early_exit.png").stat().st_size > 1000
    # Each run is appended to the run-by-run record.
    module.main(["--smoke", "--out", str(tmp_path), "--repeats", "1"])
    runs = json.loads((tmp_path / "early_exit_runs.json").read_text())
    assert len(runs) == 2 and runs[1]["repeats"] == 1
    assert "| self-speculative exit 1, draft 3 |" in (tmp_path / "early_exit_runs.md").read_text()
