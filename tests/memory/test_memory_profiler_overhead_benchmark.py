"""benchmarks/profiler_overhead.py runs end to end (--smoke) and writes its JSON and table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_profiler_overhead_smoke(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("profiler_overhead", ROOT / "benchmarks" / "profiler_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--smoke", "--out", str(tmp_path)])
    result = report["result"]
    assert result["interval"] == 2 and result["repeats"] == 2
    assert len(result["segment_s_on"]) == len(result["segment_s_off"]) == 2
    assert 0 < result["profiler_share"] < 1
    assert json.loads((tmp_path / "profiler_overhead.json").read_text())["result"]["interval"] == 2
    assert "end-to-end overhead" in (tmp_path / "profiler_overhead.md").read_text()
