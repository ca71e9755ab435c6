"""``lightning-memopt estimate``: the table, the JSON, the models it reads and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_memopt import planner_cli
from lightning_memopt.models.llama import llama_config

SMALL = ["--seq-len", "64", "--precision", "32-true"]


def test_table_json_and_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    code = planner_cli.main(
        ["--model", "tiny", *SMALL, "--optimizer", "adamw", "--gpu-memory", "1GiB", "--json", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "total (peak)" in printed and "AdamW fp32" in printed and printed.count("fits:") == 1
    assert max(len(line) for line in printed.splitlines()) <= 80
    document = json.loads(out.read_text())
    per_device, baseline = document["per_device"], document["baseline"]
    for key in ("params", "grads", "optimizer_state", "activations", "total"):
        assert isinstance(per_device[key], int) and isinstance(baseline[key], int)
    # AdamW in fp32 is its own baseline, but for the step counters (4 bytes per tensor).
    assert per_device["params"] == baseline["params"] and per_device["grads"] == baseline["grads"]
    assert 0 < per_device["optimizer_state"] - baseline["optimizer_state"] < 4 * 100
    assert document["fits"] is True
    # Too small a GPU: the verdict says so, by how much, and what to try.
    assert planner_cli.main(["--model", "tiny", *SMALL, "--gpu-memory", "100MB", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "does not fit" in printed and "--activation-checkpointing" in printed
    assert json.loads(out.read_text())["fits"] is False


def test_reads_a_model_folder_and_a_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = llama_config("tiny", vocab_size=1000, num_hidden_layers=1)
    config.save_pretrained(tmp_path / "folder")
    (tmp_path / "config.json").write_text(config.to_json_string())
    for spec in (tmp_path / "folder", tmp_path / "config.json"):
        out = tmp_path / f"{spec.name}.out.json"
        assert planner_cli.main(["--model", str(spec), *SMALL, "--json", str(out)]) == 0
        numel = json.loads(out.read_text())["numel"]
        assert numel == 2 * 1000 * 256 + 4 * 256 * 256 + 3 * 256 * 688 + 3 * 256
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "8b"], "known size (tiny, 60m, 130m, 350m, 1b, 7b, 13b, 70b)"),
        (["--model", "7b", "--devices", "6", "--sharding", "hybrid", "--nodes", "4"], "do not split into nodes=4"),
        (["--model", "7b", "--devices", "8", "--nodes", "2"], "--sharding hybrid"),
        (["--model", "7b", "--devices", "8", "--sharding", "hybrid", "--mesh", "3,2"], "not devices=8"),
        (["--model", "7b", "--devices", "2", "--int8-weights"], "--devices 1"),
        (["--model", "7b", "--gpu-memory", "lots"], "not a size"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert planner_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_dispatches_estimate() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "lightning_memopt", "estimate", "--help"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "--activation-checkpointing" in run.stdout and "--gpu-memory" in run.stdout
    from lightning_memopt.cli import main  # in this process: the console script's entry point

    with pytest.raises(SystemExit) as bad:
        main(["estimate", "--model", "8b"])
    assert bad.value.code == 2


def test_top_level_help_mentions_estimate(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_memopt.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-memopt"])  # not pytest's own arguments
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "lightning-memopt estimate --help" in capsys.readouterr().out
