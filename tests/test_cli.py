"""The ``lightning-memopt`` command: defaults, short names, composition, errors, entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from jsonargparse import Namespace

from lightning_memopt.cli import dedupe_our_callbacks, run_cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
BORING = [
    "--model=lightning.pytorch.demos.boring_classes.BoringModel",
    "--data=lightning.pytorch.demos.boring_classes.BoringDataModule",
]


@pytest.fixture(autouse=True)
def _isolated_run(tmp_path, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("LIGHTNING_MEMOPT_CACHE", str(tmp_path_factory.getbasetemp() / "memopt_cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-memopt"])


def _as_dict(config: Namespace) -> dict:
    config = config.clone()
    config.pop("config", None)
    return config.as_dict()


def test_no_arguments_run_the_quickstart_config() -> None:
    """`lightning-memopt fit` and configs/quickstart.yaml are the same experiment: the YAML ships in
    the package and is the parser's defaults, and the repository's copy is a link to it."""
    from lightning_memopt.cli import QUICKSTART_CONFIG

    assert QUICKSTART.resolve() == QUICKSTART_CONFIG
    defaults = run_cli([], run=False)
    from_file = run_cli(["--config", str(QUICKSTART)], run=False)
    assert _as_dict(defaults.config) == _as_dict(from_file.config)
    assert type(defaults.model).__name__ == "CausalLM" and type(defaults.datamodule).__name__ == "TextDataModule"
    assert defaults.config.model.init_args.optimizer.class_path.endswith("APOLLOMini")
    assert type(defaults.trainer.logger).__name__ == "TensorBoardLogger"
    # Crash-safe checkpoint files by default (temporary name, fsync, atomic rename).
    assert type(defaults.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"


def test_short_names_resolve_for_our_classes() -> None:
    cli = run_cli(
        [
            "--model=CausalLM",
            "--model.init_args.optimizer=APOLLO",
            "--model.init_args.optimizer.rank=8",
            "--model.init_args.lr_scheduler=WarmupCosineLR",
            "--data=TextDataModule",
            "--trainer.callbacks+=MemoryProfiler",
        ],
        run=False,
    )
    assert cli.config.model.init_args.optimizer.class_path.endswith(".APOLLO")
    assert cli.config.model.init_args.optimizer.init_args.rank == 8
    assert [type(c).__name__ for c in cli.trainer.callbacks].count("MemoryProfiler") == 1


def test_any_field_can_be_overridden() -> None:
    cli = run_cli(
        ["--trainer.max_steps=7", "--model.init_args.model_name=60m", "--data.init_args.seq_len=32"], run=False
    )
    assert cli.trainer.max_steps == 7 and cli.model.model_name == "60m" and cli.datamodule.seq_len == 32


def test_errors_name_the_field(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:  # a value the class refuses: one line, exit 2
        run_cli(["--model.init_args.model_name=huge"], run=False)
    assert exit_info.value.code == 2
    assert "model.model_name='huge' is neither a LLaMA size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # jsonargparse's own report of a YAML/flag error
        run_cli(["fit", "--model.init_args.model_nme=tiny"])
    assert exit_info.value.code == 2 and "model_nme" in capsys.readouterr().err


def test_automatic_optimizer_key_is_refused_with_the_fix(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--optimizer=torch.optim.AdamW", "--optimizer.lr=0.001"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "top-level `optimizer:`" in err and "train nothing" in err
    assert "model.init_args.optimizer" in err and "class_path: torch.optim.AdamW" in err and "lr: 0.001" in err
    with pytest.raises(SystemExit):
        run_cli(["fit", "--lr_scheduler=torch.optim.lr_scheduler.ConstantLR"])
    assert "model.init_args.lr_scheduler" in capsys.readouterr().err


def test_automatic_optimizer_key_refused_under_fsdp_even_for_a_plain_model(capsys) -> None:
    with pytest.raises(SystemExit):
        run_cli(
            [*BORING, "--trainer.strategy=apollo_fsdp", "--optimizer=torch.optim.SGD", "--optimizer.lr=0.1"], run=False
        )
    assert "train nothing" in capsys.readouterr().err


def test_automatic_optimizer_key_works_for_a_plain_unsharded_model() -> None:
    cli = run_cli([*BORING, "--optimizer=torch.optim.SGD", "--optimizer.lr=0.1", "--trainer.callbacks=[]"], run=False)
    assert type(cli.model.configure_optimizers()).__name__ == "SGD"


def test_fragments_append_and_our_callbacks_are_not_doubled(tmp_path: Path) -> None:
    fragment = tmp_path / "fragment.yaml"
    fragment.write_text(
        "trainer:\n  callbacks+:\n"
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
        "    - class_path: MemoryProfiler\n      init_args:\n        interval: 7\n"
    )
    cli = run_cli(["--config", str(QUICKSTART), "--config", str(fragment)], run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("MemoryProfiler") == 1 and "LearningRateMonitor" in names
    profiler = next(c for c in cli.trainer.callbacks if type(c).__name__ == "MemoryProfiler")
    assert profiler.tracker.interval == 7  # the later fragment's settings win


def test_dedupe_keeps_other_libraries_duplicates() -> None:
    checkpoint = "lightning.pytorch.callbacks.ModelCheckpoint"
    callbacks = [
        Namespace(class_path=checkpoint, init_args=Namespace(monitor="a")),
        Namespace(class_path="lightning_memopt.callbacks.LayerwiseUpdates"),
        Namespace(class_path=checkpoint, init_args=Namespace(monitor="b")),
        Namespace(class_path="lightning_memopt.callbacks.LayerwiseUpdates", init_args=Namespace(x=1)),
    ]
    kept = dedupe_our_callbacks(callbacks)
    assert [c.class_path for c in kept] == [checkpoint, "lightning_memopt.callbacks.LayerwiseUpdates", checkpoint]
    assert kept[1].init_args.x == 1


@pytest.mark.slow
def test_fit_ends_with_the_summary(capsys) -> None:
    cli = run_cli(
        [
            "fit",
            "--trainer.fast_dev_run=2",
            "--data.init_args.max_chars=60000",
            "--data.init_args.seq_len=64",
            "--data.init_args.batch_size=4",
        ]
    )
    assert cli.trainer.global_step == 2
    out = capsys.readouterr().out
    assert "fit finished" in out and "tokens/s" in out and "train " in out
    assert "optimizer state" in out and "fp32 AdamW" in out  # from the memory profiler's report


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_the_other_subcommands(subcommand: str) -> None:
    cli = run_cli(
        [
            subcommand,
            "--trainer.fast_dev_run=1",
            "--data.init_args.max_chars=60000",
            "--data.init_args.seq_len=64",
            "--data.init_args.batch_size=4",
        ]
    )
    if subcommand == "predict":  # generated text from a held-out prompt
        (row,) = cli.trainer.predict_loop.predictions  # fast_dev_run=1: one prompt
        assert row["prompt"] and isinstance(row["text"], str) and row["new_tokens"] <= 32
    else:
        assert f"{'val' if subcommand == 'validate' else 'test'}/loss" in cli.trainer.callback_metrics


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "120"}


@pytest.mark.slow
def test_the_lightning_memopt_command(tmp_path: Path) -> None:
    """The installed console script trains the default with TensorBoard logs and a memory report."""
    command = [
        "lightning-memopt",
        "fit",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--data.init_args.max_chars=60000",
        "--data.init_args.seq_len=64",
        "--data.init_args.batch_size=4",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "lightning-memopt: fit finished" in result.stdout
    version = tmp_path / "lightning_logs" / "version_0"
    assert list(version.glob("events.out.tfevents.*")) and (version / "config.yaml").exists()
    assert list((version / "checkpoints").glob("*.ckpt"))
    assert (version / "memory_report.json").exists()  # the run's report, in the run's folder


@pytest.mark.slow
def test_python_dash_m_lightning_memopt(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_memopt", "fit", "--print_config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: lightning_memopt.models.CausalLM" in result.stdout
