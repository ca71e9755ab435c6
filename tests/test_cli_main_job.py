"""The main job as a newcomer meets it, through the real ``lightning-memopt`` command (subprocesses):
an interrupted run resumes to exactly the uninterrupted result, every run keeps its own report,
predict generates text, bad values fail in one line, help fits a terminal.

Every run is a 2-block, 64-wide LLaMA on a byte-tokenised slice of the corpus, a few steps long.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_memopt.cli import main, reset_on_class_switch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    '--model.init_args.model_overrides={"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, '
    '"num_attention_heads": 4, "num_key_value_heads": 4}',
    "--data.init_args.tokenizer=byte",
    "--data.init_args.max_chars=30000",
    "--data.init_args.seq_len=32",
    "--data.init_args.batch_size=4",
    "--trainer.val_check_interval=100",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-memopt"])  # the in-process calls give their own


def _signal_at(step: int, name: str) -> str:
    spec = {"class_path": "_signal_at.SignalAt", "init_args": {"step": step, "signal_name": name}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


@pytest.fixture
def run(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.getbasetemp() / "memopt_cache"
    env = {
        **os.environ,
        "COLUMNS": "80",
        "LIGHTNING_MEMOPT_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }

    def _run(cwd: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        cwd.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["lightning-memopt", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
        )
        assert result.returncode == expect, (result.stdout + result.stderr)[-6000:]
        return result

    return _run


def _checkpoint(folder: Path, step: int) -> Path:
    (path,) = folder.glob(f"checkpoints/*step={step}.ckpt")
    return path


def _final(report: Path) -> dict:
    return json.loads(report.read_text())["ranks"][0]["final"]


COUNTED = ("params_bytes", "grads_bytes", "optimizer_state_bytes", "training_state_bytes", "saving_ratio")


@pytest.mark.slow  # three CLI runs in subprocesses, about 30 s
def test_ctrl_c_saves_and_resume_continues_exactly(run, tmp_path: Path) -> None:
    """SIGINT after step 3 -> a checkpoint of step 4, the report and the summary, exit 130; resuming
    it ends with the weights, optimizer state and memory report of a run never interrupted."""
    whole = run(tmp_path / "whole", "fit", *TINY, "--trainer.max_steps=8")
    assert "8 optimizer steps" in whole.stdout
    screen = [line for line in whole.stdout.splitlines() if not line.startswith("To resume")]  # one copyable line
    assert all(len(line) <= 80 for line in screen), whole.stdout  # 80 columns
    assert "Tip:" not in whole.stderr and "FLOPs" not in whole.stdout + whole.stderr and "v_num" not in whole.stdout
    uninterrupted = tmp_path / "whole" / "lightning_logs" / "version_0"

    folder = tmp_path / "stopped"
    stopped = run(folder, "fit", *TINY, "--trainer.max_steps=8", _signal_at(3, "SIGINT"), expect=130)
    assert "SIGINT received" in stopped.stderr
    assert "by SIGINT after step 4" in stopped.stdout and "fit finished" in stopped.stdout
    first = folder / "lightning_logs" / "version_0"
    checkpoint = _checkpoint(first, 4)
    (resume,) = [line for line in stopped.stdout.splitlines() if line.startswith("To resume or train on: ")]
    assert resume.replace("./", "").endswith(
        f"lightning-memopt fit --config {first.relative_to(folder)}/config.yaml --ckpt_path "
        f"{checkpoint.relative_to(folder)}"
    )
    assert _final(first / "memory_report.json")["step"] == 3  # after step 4 (records count from 0)

    resumed = run(folder, "fit", "--config", str(first / "config.yaml"), "--ckpt_path", str(checkpoint))
    assert "not resumable" not in resumed.stderr  # the data stream continues, no repeated batches
    assert "Resuming from step 4: the data stream continues with the next unseen batch" in resumed.stderr
    text = " ".join(resumed.stdout.split())
    assert "4 optimizer steps" in text and "resumed from step 4, now at 8" in text
    second = folder / "lightning_logs" / "version_1"

    # Two runs in one folder: each kept its own report.
    assert (first / "memory_report.json").exists() and (second / "memory_report.json").exists()
    history = json.loads((second / "memory_report.json").read_text())["ranks"][0]["history"]
    assert history[0]["step"] == 4 and history[0]["grads_bytes"] > 0  # the resumed run's first step
    expected, got = _final(uninterrupted / "memory_report.json"), _final(second / "memory_report.json")
    assert got["step"] == expected["step"] == 7
    assert {k: got[k] for k in COUNTED} == {k: expected[k] for k in COUNTED}
    assert "Memory per device, after step 8" in resumed.stdout

    a = torch.load(_checkpoint(uninterrupted, 8), map_location="cpu", weights_only=True)
    b = torch.load(_checkpoint(second, 8), map_location="cpu", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    states_a, states_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index, state in states_a.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, states_b[index][key]), (index, key)


@pytest.mark.slow  # four runs of the command, about a minute on two idle cores
def test_sigterm_then_predict_validate_and_a_second_run(run, tmp_path: Path) -> None:
    """A scheduler's SIGTERM also checkpoints (exit 143); predict continues prompts from that
    checkpoint into predictions.jsonl; validate without --ckpt_path warns; a run that ends
    between validations still leaves a checkpoint."""
    stopped = run(tmp_path, "fit", *TINY, "--trainer.max_steps=50", _signal_at(2, "SIGTERM"), expect=143)
    assert "by SIGTERM after step 3" in " ".join(stopped.stdout.split())
    checkpoint = _checkpoint(tmp_path / "lightning_logs" / "version_0", 3)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\n\nThe for statement\n")
    predicted = run(
        tmp_path,
        "predict",
        *TINY,
        f"--ckpt_path={checkpoint}",
        f"--data.init_args.prompts={prompts}",
        "--model.init_args.max_new_tokens=5",
    )
    rows = [json.loads(line) for line in (tmp_path / "lightning_logs" / "version_1" / "predictions.jsonl").open()]
    assert [r["prompt"] for r in rows] == ["def main(", "The for statement"]
    assert all(r["prompt_tokens"] == len(r["prompt"]) and 0 <= r["new_tokens"] <= 5 for r in rows)  # bytes
    assert all(isinstance(r["text"], str) for r in rows)
    assert "> def main(" in predicted.stdout and "2 predictions in" in predicted.stdout
    assert "without --ckpt_path" not in predicted.stderr

    validated = run(tmp_path, "validate", *TINY)
    assert "validate without --ckpt_path runs a freshly initialised model" in validated.stderr
    assert f"--ckpt_path {checkpoint.relative_to(tmp_path)}" in validated.stderr

    short = run(tmp_path, "fit", *TINY, "--trainer.max_steps=2", "--model.init_args.optimizer=adamw")
    assert "AdamW" in short.stdout
    assert _checkpoint(tmp_path / "lightning_logs" / "version_3", 2).exists()  # no validation ran


def test_bad_values_fail_in_one_line_before_any_folder(run, tmp_path: Path) -> None:
    result = run(tmp_path, "fit", "--model.init_args.optimizer.init_args.rank=-3", expect=2)
    (line,) = [line for line in result.stderr.splitlines() if not line.startswith("Seed set")]
    assert line.startswith("lightning-memopt: error: model.optimizer: APOLLO: invalid rank=-3"), result.stderr
    assert "rank=-3" in result.stderr and "positive integer" in result.stderr
    assert not (tmp_path / "lightning_logs").exists()
    result = run(tmp_path, "fit", "--model.init_args.optimizer=apolo", expect=2)
    assert "unknown optimizer name 'apolo'" in result.stderr and "apollo_mini" in result.stderr
    assert not (tmp_path / "lightning_logs").exists()


def test_program_name_and_short_help(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_memopt", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "usage: lightning-memopt" in result.stdout and "__main__" not in result.stdout


def test_fit_help_is_short_and_ours_first(capsys) -> None:
    main(["fit", "--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 40 and max(map(len, text.splitlines())) <= 80
    assert "--model.help CausalLM" in text and "--help-all" in text and "--model.init_args.optimizer=NAME" in text
    with pytest.raises(SystemExit):
        main(["fit", "--help-all"])
    full = capsys.readouterr().out
    assert "--trainer.max_steps" in full and "--optimizer " not in full and "--lr_scheduler " not in full


def test_registry_names_and_class_switch_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.init_args.optimizer=APOLLO", "--print_config"])
    config = capsys.readouterr().out
    # APOLLO's own defaults, not APOLLO-Mini's preset (rank 1, tensor-wise, scale 128).
    assert "rank: 256" in config and "scale_type: channel" in config and "scale: 1.0" in config
    with pytest.raises(SystemExit):
        main(["fit", "--model.init_args.optimizer=APOLLO", "--model.init_args.optimizer.rank=8", "--print_config"])
    assert "rank: 8" in capsys.readouterr().out  # options after the switch still apply
    with pytest.raises(SystemExit):
        main(
            ["fit", "--model.init_args.optimizer=apollo_mini", "--model.init_args.optimizer.lr=0.02", "--print_config"]
        )
    config = capsys.readouterr().out  # a registry name: its class with the registry's defaults
    assert "class_path: lightning_memopt.APOLLOMini" in config and "lr: 0.02" in config
    assert "rank: 1" in config and "scale: 128.0" in config
    (adamw,) = reset_on_class_switch(["--model.init_args.optimizer", "adamw"])
    assert json.loads(adamw.split("=", 1)[1])["class_path"] == "torch.optim.adamw.AdamW"
    unknown = ["--model.init_args.optimizer=apolo"]
    assert reset_on_class_switch(unknown) == unknown  # left for the model to refuse, listing the names


@pytest.mark.parametrize("config", ["early_exit", "moe"])
def test_predict_with_early_exits_and_moe(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """predict runs the model the config's surgery made: early exits report each token's exit."""
    monkeypatch.setenv("LIGHTNING_MEMOPT_CACHE", str(tmp_path / "cache"))
    main(
        [
            "predict",
            "--config",
            str(ROOT / "configs" / f"{config}.yaml"),
            "--data.init_args.tokenizer=byte",
            "--data.init_args.max_chars=20000",
            "--data.init_args.seq_len=64",
            "--data.init_args.num_prompts=2",
            "--model.init_args.max_new_tokens=4",
        ]
    )
    (path,) = (tmp_path / "lightning_logs").glob("**/predictions.jsonl")
    rows = [json.loads(line) for line in path.open()]
    assert len(rows) == 2 and all(0 <= r["new_tokens"] <= 4 for r in rows)
    if config == "early_exit":
        for row in rows:
            assert len(row["exits"]) == row["new_tokens"] and all(0 <= e <= 3 for e in row["exits"])
        assert "early exits:" in capsys.readouterr().out
    else:
        assert "exits" not in rows[0]


def test_a_mistyped_subcommand_names_the_closest_and_every_choice(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt", "--trainer.max_steps=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'fitt'; did you mean 'fit'?" in err and "estimate" in err
    assert max(map(len, err.splitlines())) <= 80
    with pytest.raises(SystemExit):
        main(["benchmark"])
    assert "unknown subcommand 'benchmark'. Choose from: fit, validate" in capsys.readouterr().err.replace("\n", " ")
