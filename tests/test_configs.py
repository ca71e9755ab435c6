"""Every experiment in configs/ and every callback fragment in callbacks/ runs, so none of them rots.

Each config trains for 2 steps (Lightning's ``fast_dev_run``) on a slice of the corpus, with
the settings passed on the command line as a user would. Configs on one device run in this
process through the CLI's ``run_cli``; a multi-device config runs as the real command in a
subprocess (Lightning's launcher starts the other ranks by re-running the command line).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_memopt.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FRAGMENTS = sorted((ROOT / "callbacks").glob("*.yaml"))
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# Two training steps and two validation batches (no logger, no checkpoint), on small batches of a
# corpus slice: what is checked is that the config builds and trains, not how well.
FAST = [
    "--trainer.fast_dev_run=2",
    "--data.init_args.max_chars=60000",
    "--data.init_args.seq_len=64",
    "--data.init_args.batch_size=4",
]


@pytest.fixture(autouse=True)
def _isolated_run(tmp_path, monkeypatch, tmp_path_factory):
    """Runs write lightning_logs/ and memopt_reports/ into a temporary folder; the tokenizer and
    tokenised corpus are cached once for the whole session."""
    monkeypatch.setenv("LIGHTNING_MEMOPT_CACHE", str(tmp_path_factory.getbasetemp() / "memopt_cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-memopt"])  # the CLI is given its arguments explicitly


def _devices(path: Path) -> int:
    devices = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("devices", 1)
    return len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else 1


def _callback_classes(cli) -> list[str]:
    return [type(c).__name__ for c in cli.trainer.callbacks]


def _assert_trained(cli) -> None:
    assert cli.trainer.global_step == 2
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss)


def test_there_are_configs_and_fragments() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "adamw", "apollo", "apollo_mini", "apollo_fsdp", "layerwise"} <= names
    assert FRAGMENTS, "callbacks/ holds no fragments"


# A multi-process config starts its own ranks: a slow test (CI runs it; the fast loop does not).
@pytest.mark.parametrize(
    "config",
    [pytest.param(c, marks=pytest.mark.slow) if _devices(c) > 1 else c for c in CONFIGS],
    ids=lambda p: p.stem,
)
def test_config_trains(config: Path, tmp_path: Path) -> None:
    if _devices(config) > 1:
        command = [sys.executable, "-m", "lightning_memopt", "fit", "--config", str(config), *FAST]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "fit finished" in output and "× 2" in output, output[-3000:]
        return
    cli = run_cli(["fit", "--config", str(config), *FAST])
    _assert_trained(cli)


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_fragment_composes_onto_quickstart(fragment: Path) -> None:
    """The fragment adds its callbacks and keeps the config's own (``trainer.callbacks+:``)."""
    # A config with a callback that no fragment provides, to see whether composing keeps it.
    base = ["--config", str(QUICKSTART), "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"]
    composed = run_cli([*base, "--config", str(fragment)], run=False)
    trainer = yaml.safe_load(fragment.read_text())["trainer"]
    listed = next(value for key, value in trainer.items() if key.rstrip("+") == "callbacks")
    expected = {c["class_path"].rsplit(".", 1)[-1] for c in listed} | {"MemoryProfiler", "LearningRateMonitor"}
    missing = expected - set(_callback_classes(composed))
    assert not missing, (
        f"composing {fragment.name} onto a config lost {sorted(missing)}: a fragment must add to the config's "
        "callbacks with `callbacks+:` under `trainer:`, not replace them with `callbacks:`"
    )


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_fragment_trains_with_quickstart(fragment: Path) -> None:
    cli = run_cli(["fit", "--config", str(QUICKSTART), "--config", str(fragment), *FAST])
    _assert_trained(cli)
