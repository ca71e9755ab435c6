"""Every script in examples/ runs (with its --fast flag), so none of them rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    expected = {
        "pretrain_apollo",
        "hf_trainer_apollo",
        "qlora_apollo",
        "early_exit",
        "moe_upcycling",
        "memory_comparison",
    }
    assert expected <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.slow
def test_example_runs_fast(script: Path, tmp_path: Path, tmp_path_factory) -> None:
    assert "--fast" in script.read_text(), f"{script.name} needs a --fast flag for this smoke test"
    env = {**os.environ, "LIGHTNING_MEMOPT_CACHE": str(tmp_path_factory.getbasetemp() / "memopt_cache")}
    result = subprocess.run(
        [sys.executable, str(script), "--fast"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, f"{script.name} failed:\n{(result.stdout + result.stderr)[-6000:]}"
