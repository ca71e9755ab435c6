"""benchmarks/optimizer_step.py runs end to end (--smoke: tiny shapes) and writes its JSON and table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "optimizer_step.py"
RESULT_KEYS = {
    "name",
    "description",
    "step_ms_median",
    "step_ms_min",
    "step_ms_all",
    "ratio_to_adamw_fused",
    "ratio_spread",
    "step_cpu_ms_median",
    "cpu_ratio_to_adamw_fused",
    "state_bytes",
    "state_ratio_to_adamw_fused",
    "extra_bytes",
    "workspace_bytes",
}


def load_script():
    spec = importlib.util.spec_from_file_location("optimizer_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("single_thread")
def test_optimizer_step_benchmark_smoke(tmp_path):
    bench = load_script()
    bench.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "optimizer_step.json").read_text())
    assert report["benchmark"] == "optimizer_step"
    assert {"cpu", "threads", "torch", "python", "device"} <= set(report["machine"])
    (record,) = report["records"]
    assert record["shape"] == "smoke" and record["repeats"] == 2 and record["warmup"] == 1
    assert record["config"] == {**bench.LLAMA_SIZES["tiny"], **bench.SIZES["smoke"][1]}
    rows = {r["name"]: r for r in record["results"]}
    assert record["results"][0]["name"] == "adamw_fused"
    assert {"adamw_fused", "adamw_foreach", "apollo_r256", "apollo_r128", "apollo_mini"} <= set(rows)
    for row in rows.values():
        assert set(row) == RESULT_KEYS
        assert len(row["step_ms_all"]) == 2 and row["step_ms_median"] > 0
        assert row["ratio_to_adamw_fused"] == pytest.approx(
            row["step_ms_median"] / rows["adamw_fused"]["step_ms_median"]
        )
        assert row["cpu_ratio_to_adamw_fused"] == pytest.approx(
            row["step_cpu_ms_median"] / rows["adamw_fused"]["step_cpu_ms_median"]
        )
    assert rows["adamw_fused"]["ratio_to_adamw_fused"] == 1.0
    for row in rows.values():  # per-round ratios: each round steps every optimizer once
        spread = row["ratio_spread"]
        assert spread["n"] == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert rows["adamw_fused"]["ratio_spread"] == {"min": 1.0, "median": 1.0, "max": 1.0, "n": 2}

    # State bytes, exactly: AdamW keeps 2 floats per weight (+ a step counter per tensor);
    # APOLLO-Mini keeps 2 x max(m, n) floats per low-rank matrix (+ step, seed, limiter norm).
    shapes = bench.llama_param_shapes("smoke")
    assert len(shapes["low_rank"]) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    numel = lambda shape: shape[0] * (shape[1] if len(shape) > 1 else 1)  # noqa: E731
    all_shapes = shapes["low_rank"] + shapes["rest"]
    assert rows["adamw_fused"]["state_bytes"] == sum(2 * numel(s) * 4 + 4 for s in all_shapes)
    assert record["num_params"] == sum(numel(s) for s in all_shapes)
    mini = sum(2 * numel(s) * 4 + 4 for s in shapes["rest"]) + sum(2 * max(s) * 4 + 16 for s in shapes["low_rank"])
    assert rows["apollo_mini"]["state_bytes"] == mini
    # Scratch kept between steps: ours on the CPU only, and never near a state's size.
    assert rows["adamw_fused"]["workspace_bytes"] == 0
    assert 0 < rows["apollo_r256"]["workspace_bytes"] < rows["apollo_r256"]["state_bytes"]

    table = (tmp_path / "optimizer_step.md").read_text()
    assert "| optimizer | step (ms) | x fused AdamW |" in table
    assert all(row["description"] in table for row in rows.values())


@pytest.mark.usefixtures("single_thread")
@pytest.mark.slow
def test_optimizer_step_across_fresh_processes_reports_their_spread(tmp_path):
    bench = load_script()
    argv = ["--smoke", "--threads", "1", "--only", "adamw_fused", "apollo_mini", "--processes", "2"]
    bench.main([*argv, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "optimizer_step.json").read_text())
    assert report["processes"] == 2 and report["machine"]["cores"] >= 1
    (record,) = report["records"]
    base, mini = record["results"]
    assert base["ratio_spread"] == {"min": 1.0, "median": 1.0, "max": 1.0, "n": 2}
    assert mini["ratio_spread"]["n"] == 2 and len(mini["step_ms_all"]) == 4  # 2 repeats in each process
    assert mini["ratio_spread"]["min"] <= mini["ratio_to_adamw_fused"] <= mini["ratio_spread"]["max"]
    assert "over 2 fresh processes' medians" in (tmp_path / "optimizer_step.md").read_text()


def test_child_arguments_drop_the_options_the_parent_sets():
    bench = load_script()
    argv = ["--processes", "3", "--smoke", "--out=/x", "--only", "a", "b", "--processes=2", "--out", "/y"]
    assert bench._without_option(bench._without_option(argv, "--processes"), "--out") == ["--smoke", "--only", "a", "b"]
