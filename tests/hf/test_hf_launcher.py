"""``python -m lightning_memopt.hf SCRIPT.py [ARGS...]`` runs a script that never imports us with
``--optim apollo_mini``; without the launcher the same script rejects that name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "launcher_script.py"


def corpus(tmp_path: Path) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path / "train.txt"
    path.write_text(topics["assignment"][:2000], encoding="utf-8")
    return path


def script_args(tmp_path: Path, out: str = "out") -> list[str]:
    return [
        "--train_file",
        str(corpus(tmp_path)),
        "--output_dir",
        str(tmp_path / out),
        "--optim",
        "apollo_mini",
        "--optim_target_modules",
        "all-linear",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--disable_tqdm",
        "true",
    ]


def run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_launcher_runs_an_unmodified_script_with_our_optimizer_names(tmp_path: Path) -> None:
    args = script_args(tmp_path)
    launched = run([sys.executable, "-m", "lightning_memopt.hf", str(SCRIPT), *args], tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "launched.json").read_text())
    assert result["optimizer"] == "APOLLOMini"
    assert result["argv"] == [str(SCRIPT), *args]  # the script sees its own arguments, unchanged
    assert result["steps"] == 2 and len(result["losses"]) == 2

    plain = run([sys.executable, str(SCRIPT), *script_args(tmp_path, "plain")], tmp_path)
    assert plain.returncode != 0 and "apollo_mini" in plain.stderr  # what the launcher is for


def test_launcher_usage_and_missing_script(tmp_path: Path) -> None:
    from lightning_memopt.hf.__main__ import main

    with pytest.raises(SystemExit, match=r"no script at 'missing\.py'"):
        main(["missing.py"])
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2


@pytest.mark.slow
def test_launcher_under_torchrun_two_processes(tmp_path: Path) -> None:
    args = script_args(tmp_path, "ddp")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    launched = run([*command, "-m", "lightning_memopt.hf", str(SCRIPT), *args], tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "launched.json").read_text())
    assert result["optimizer"] == "APOLLOMini" and result["world_size"] == 2
