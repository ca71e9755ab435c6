"""benchmarks/fsdp_memory.py runs end to end (--smoke): 1 and 2 CPU ranks, each in a fresh process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fsdp_memory_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fsdp_memory", ROOT / "benchmarks" / "fsdp_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--out", str(tmp_path)])

    rows = {(r["optimizer"], r["world_size"]): r for r in report["rows"]}
    assert set(rows) == {(o, w) for o in ("apollo", "apollo_mini", "adamw") for w in (1, 2)}
    assert all(r["sharded"] and r["tokens_per_s"] > 0 for r in rows.values())
    for name in ("apollo", "apollo_mini", "adamw"):  # the shards of 2 ranks: half of everything per rank
        one, two = rows[(name, 1)], rows[(name, 2)]
        assert two["params_bytes"] == one["params_bytes"] // 2
        assert two["grads_bytes"] == one["grads_bytes"] // 2
    targets = report["targets"]
    assert targets["apollo_state_2_vs_1"] <= 0.55 and targets["apollo_mini_state_2_vs_1"] <= 0.55
    assert targets["mini_low_rank_vs_adamw_2"] < 0.02 and targets["met"]
    assert json.loads((tmp_path / "fsdp_memory.json").read_text())["benchmark"] == "fsdp_memory"
    assert "| APOLLO-Mini | 2 |" in (tmp_path / "fsdp_memory.md").read_text()
