"""benchmarks/moe.py end to end at tiny sizes (--smoke): every variant runs, agrees with
MoELayer, and lands in the JSON and the markdown table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("single_thread")
def test_moe_benchmark_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("moe_benchmark", ROOT / "benchmarks" / "moe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--out", str(tmp_path)])

    variants = {"dense", "ours", "ours_stacked", "mixtral_eager", "mixtral_grouped_mm", "mixtral_batched_mm"}
    for tokens in (64, 128):
        rows = {r["variant"]: r for r in report["layer"] if r["tokens"] == tokens}
        assert set(rows) == variants
        assert rows["dense"]["wall_vs_dense"]["median"] == 1.0
        for row in rows.values():
            assert row["wall_ms"]["n"] == 1 and row["wall_ms"]["median"] > 0
            # Every variant holds at least its parameters and their gradients at the peak.
            assert row["tensor_peak_bytes"] > row["peak_above_params_bytes"] > 0
        # MoE layers hold the parameters of all experts: more than the dense MLP of equal active size.
        assert rows["ours"]["tensor_peak_bytes"] > rows["dense"]["tensor_peak_bytes"]
    verdict = report["verdict"]
    assert set(verdict) == {"64", "128"} and {"wall", "cpu", "peak_vs_fastest_mixtral"} <= set(verdict["64"])
    models = {r["model"]: r for r in report["model"]}
    assert set(models) == {"dense", "dense_equal_active", "upcycled_4x_top2"}
    upcycled, wide = models["upcycled_4x_top2"], models["dense_equal_active"]
    # Top-2 of copies of the MLP: the active width of the widened dense MLP, plus the routers.
    assert upcycled["active_parameters"] - wide["active_parameters"] == 2 * 4 * 32  # 2 blocks x 4 x hidden
    assert upcycled["active_parameters"] < upcycled["total_parameters"]
    assert all(r[mode]["tokens_per_s_wall"]["median"] > 0 for r in models.values() for mode in ("train", "fwd_bwd"))
    assert json.loads((tmp_path / "moe.json").read_text())["layer"][0]["variant"] == "dense"
    assert "| 128 | mixtral_grouped_mm |" in (tmp_path / "moe.md").read_text()
