"""benchmarks/convergence.py: a tiny sweep end to end, its file format, and that it resumes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("convergence_benchmark", ROOT / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("single_thread")
def test_smoke_sweep_writes_runs_table_and_plot_and_resumes(tmp_path: Path) -> None:
    bench = load_script()
    rows = bench.main(["--smoke", "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "convergence.json").read_text())
    # Three learning rates each at seed 0, then one more seed at each optimizer's best.
    assert len(runs) == 2 * (3 + 1)
    for run in runs:
        assert {"optimizer", "lr", "seed", "val_loss", "optimizer_state_bytes", "tokens_per_s"} <= set(run)
        assert run["optimizer"] in {"adamw", "apollo_mini"} and math.isfinite(run["val_loss"])
        assert run["curve"][0][0] == 0 and run["curve"][-1][0] == run["steps"] * 4 * 32
        assert run["curve"][-1][1] < run["curve"][0][1]  # it learned something
    by_name = {r["optimizer"]: r for r in rows}
    assert by_name["adamw"]["ppl_vs_adamw"] == 1.0 and by_name["apollo_mini"]["seeds"] == 2
    # APOLLO-Mini keeps AdamW moments only for the embeddings, norms and head.
    assert by_name["apollo_mini"]["state_vs_adamw"] < 1.0
    assert best_is_lowest(runs, "adamw", by_name["adamw"]["best_lr"])
    assert "| apollo_mini |" in (tmp_path / "convergence.md").read_text()
    assert (tmp_path / "convergence.png").stat().st_size > 10_000

    # A second invocation trains nothing: every run is already there.
    bench.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "convergence.json").read_text()) == runs


def best_is_lowest(runs: list[dict], name: str, lr: float) -> bool:
    sweep = [r for r in runs if r["optimizer"] == name and r["seed"] == 0]
    return min(sweep, key=lambda r: r["val_loss"])["lr"] == lr


def test_document_split_never_shares_text() -> None:
    bench = load_script()
    from lightning_memopt.data.corpus import load_corpus

    documents = load_corpus(["pydoc", "stdlib"], bench.SMOKE.max_chars)
    held_out = {d for i, d in enumerate(documents) if i % 20 == 0}
    trained = {d for i, d in enumerate(documents) if i % 20 != 0}
    assert held_out and trained and not held_out & trained
    train, val = bench.document_split_blocks(bench.SMOKE)
    assert train.shape[1] == val.shape[1] == bench.SMOKE.seq_len and len(val) <= bench.SMOKE.val_blocks


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script()
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--only", "adamm"])
    assert "unknown contender(s) ['adamm']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--tokens", "10"])
    assert "less than one batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--lrs", "1e-3,fast"])
    assert "--lrs '1e-3,fast': expected comma-separated numbers" in capsys.readouterr().err


@pytest.mark.usefixtures("single_thread")
def test_a_run_cut_off_midway_continues_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script()
    setting = bench.SMOKE
    train, val = bench.document_split_blocks(setting)
    vocab = int(max(train.max(), val.max())) + 1
    contender = bench.contenders(setting)["apollo_mini"]
    whole = bench.train_run(contender, 1e-2, 0, setting, train, val, vocab)

    partial = tmp_path / "partial" / "run.pt"
    save = bench._save_partial

    def save_then_die(*args: object) -> None:
        save(*args)
        raise KeyboardInterrupt  # the session is cut off right after the first evaluation

    monkeypatch.setattr(bench, "_save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        bench.train_run(contender, 1e-2, 0, setting, train, val, vocab, partial)
    assert torch.load(partial, weights_only=True)["step"] == setting.eval_every
    monkeypatch.setattr(bench, "_save_partial", save)
    continued = bench.train_run(contender, 1e-2, 0, setting, train, val, vocab, partial)
    assert continued["curve"] == whole["curve"] and continued["val_loss"] == whole["val_loss"]
    assert not partial.exists()
