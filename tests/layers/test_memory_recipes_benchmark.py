"""benchmarks/memory_recipes.py runs end to end (--smoke), each recipe in its own process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_memory_recipes_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("memory_recipes", ROOT / "benchmarks" / "memory_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--recipes", "adamw,int8,all", "--out", str(tmp_path)])

    adamw, int8, full = report["rows"]
    assert (int8["recipe"], full["recipe"]) == ("int8", "all")
    assert int8["params_bytes"] < adamw["params_bytes"]  # the blocks' weights: 1 byte + scales
    # Layer-wise: never more than the largest parameter's gradient alive at once.
    assert full["grads_peak_bytes"] < adamw["grads_peak_bytes"] == adamw["params_bytes"]
    assert full["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert full["activation_bytes"] < adamw["activation_bytes"]  # checkpointing
    assert full["params_bytes"] < full["tensor_peak_bytes"] < adamw["tensor_peak_bytes"]
    assert full["process_peak_bytes"] > full["training_peak_bytes"] > 0 and full["tokens_per_s"] > 0
    assert set(report["target"]) >= {"peak_ratio", "tensor_peak_ratio", "speed_ratio", "cpu_speed_ratio", "met"}
    assert json.loads((tmp_path / "memory_recipes.json").read_text())["rows"][0]["recipe"] == "adamw"
    assert "| + INT8 weights |" in (tmp_path / "memory_recipes.md").read_text()


@pytest.mark.slow
def test_memory_recipes_repeats_give_a_tokens_per_s_spread(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("memory_recipes_repeats", ROOT / "benchmarks" / "memory_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--recipes", "adamw", "--repeats", "2", "--out", str(tmp_path)])
    (row,) = report["rows"]
    between = row["tokens_per_s_spread"]
    assert between["n"] == 2 and between["min"] <= row["tokens_per_s"] <= between["max"]
    assert report["repeats"] == 2 and {"cpu", "cores"} <= set(report["machine"])
    assert "2 processes each" in (tmp_path / "memory_recipes.md").read_text()
