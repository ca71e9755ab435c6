"""Crash-safe checkpoints: a save killed half way never leaves a half-written checkpoint under its name.

The unit tests check the atomic primitives; the kill tests run a real training
(``_crash_child.py``) that is SIGKILLed inside a checkpoint write, then resume it with
``ckpt_path="last"``: it must pick the previous complete checkpoint, ModelCheckpoint's top-k
must name only complete files, and the resumed run must end with the weights of a run never
interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_memopt.strategies import atomic
from lightning_memopt.strategies.atomic import (
    AtomicCheckpointIO,
    atomic_replace,
    atomic_write,
    recover_interrupted_replace,
    remove_stale_temporaries,
    staging_path,
)

CHILD = Path(__file__).with_name("_crash_child.py")


# ---------------------------------------------------------------------- the primitives
def test_atomic_write_replaces_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, target)
    stale = staging_path(target, pid=999_999)
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the leftover and its folder are gone
    assert AtomicCheckpointIO().load_checkpoint(target)["step"] == 2


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_write(target, lambda f: f.write(b"complete"))

    def fails_half_way(file) -> None:
        file.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_half_way)
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_folder_replaces_a_folder_or_a_file(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda source, target: False)
    target = tmp_path / "last.ckpt"
    for content in ("first", "second"):
        new = staging_path(target)
        new.mkdir(parents=True)
        (new / "shard").write_text(content)
        atomic_replace(new, target)
        assert (target / "shard").read_text() == content
    # A file over the folder (save_distributed_checkpoint switched off), and back.
    new = staging_path(target)
    new.write_text("file")
    atomic_replace(new, target)
    assert target.read_text() == "file"
    new.mkdir()
    atomic_replace(new, target)
    assert target.is_dir()
    remove_stale_temporaries(target)  # the staging folder, now empty
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_recover_a_replace_killed_between_its_two_renames(tmp_path: Path) -> None:
    target = tmp_path / "epoch=0-step=[3].ckpt"  # glob characters in the name
    aside = staging_path(target, pid=123).with_name(target.name + atomic.OLD_SUFFIX)
    aside.mkdir(parents=True)
    (aside / "shard").write_text("previous")
    staging_path(target, pid=123).mkdir()  # the new one, half written
    assert recover_interrupted_replace(target) == target
    assert (target / "shard").read_text() == "previous"
    assert remove_stale_temporaries(target) == [staging_path(target, pid=123)]
    assert recover_interrupted_replace(target) is None  # nothing to do once the name exists
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_leftover_does_not_confuse_lightnings_checkpoint_lookups(tmp_path: Path) -> None:
    """ckpt_path="last" and the SLURM requeue resume (the highest number in any name holding
    ``hpc_ckpt_``) still find the previous complete checkpoint beside a killed save's leftover."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    for name in ("hpc_ckpt_1.ckpt", "last.ckpt"):
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, tmp_path / name)
        leftover = staging_path(tmp_path / name.replace("1", "2").replace("last", "last-v1"), pid=77)
        leftover.parent.mkdir(exist_ok=True)
        leftover.write_bytes(b"half")
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False)
    assert trainer._checkpoint_connector._hpc_resume_path == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert callback._find_last_checkpoints(trainer) == {str(tmp_path / "last.ckpt")}


def test_lightning_cli_enables_it_by_name_for_any_strategy() -> None:
    """``--trainer.plugins=lightning_memopt.strategies.AtomicCheckpointIO`` (or the same under
    ``trainer.plugins`` in YAML) gives the default single-device strategy crash-safe saves;
    ``apollo_fsdp`` has them by default."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    def strategy(*args: str):
        base = ["--trainer.accelerator=cpu", "--trainer.logger=false"]
        return LightningCLI(BoringModel, run=False, args=[*base, *args], save_config_callback=None).trainer.strategy

    single = strategy("--trainer.plugins=lightning_memopt.strategies.AtomicCheckpointIO")
    assert type(single).__name__ == "SingleDeviceStrategy" and isinstance(single.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(
        strategy("--trainer.strategy=apollo_fsdp", "--trainer.devices=2").checkpoint_io, AtomicCheckpointIO
    )


# ---------------------------------------------------------------------- killed saves
def _run_child(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(CHILD.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, str(CHILD), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _kill_during_save(mode: str, root: Path, kill_name: str) -> None:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), mode, str(root), kill_name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while not (root / "in-save").exists():
        if child.poll() is not None:
            raise AssertionError(f"the run ended before the save to kill:\n{child.stdout.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "the run never reached the save to kill"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL


def _load(path: Path) -> dict:
    if path.is_dir():
        return torch.load(path / "meta.pt", weights_only=True)
    return torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "kill_name"),
    [
        ("file", "epoch=0-step=3.ckpt"),  # a new top-k file, half written
        ("folder", "epoch=0-step=3.ckpt"),  # a new folder of shards without meta.pt
        ("folder", "last.ckpt"),  # the folder that replaces last.ckpt
    ],
)
def test_a_run_killed_during_a_save_resumes_from_the_previous_checkpoint(tmp_path: Path, mode, kill_name) -> None:
    _kill_during_save(mode, tmp_path, kill_name)
    folder = tmp_path / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    leftovers = [n for n in names if n.startswith(atomic.STAGING_PREFIX)]
    assert len(leftovers) == 1 and [p.name for p in (folder / leftovers[0]).iterdir()] == [kill_name], names
    # Under every checkpoint name, a complete checkpoint; last.ckpt is step 2's (saved before step 3's).
    complete = [n for n in names if n.endswith(".ckpt")]
    assert "last.ckpt" in complete and (kill_name == "last.ckpt") == ("epoch=0-step=3.ckpt" in complete), names
    assert _load(folder / "last.ckpt")["global_step"] == 2
    for name in complete:
        meta = _load(folder / name)
        for path in meta["callbacks"][next(k for k in meta["callbacks"] if "ModelCheckpoint" in k)]["best_k_models"]:
            assert Path(path).name in complete or Path(path).name == "epoch=0-step=1.ckpt", (name, path)

    result = _run_child(mode, str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = torch.load(tmp_path / "result.pt", weights_only=True)
    assert outcome["resumed_from"] == 2
    sys.path.insert(0, str(CHILD.parent))
    try:
        from _crash_child import reference_weights
    finally:
        sys.path.remove(str(CHILD.parent))
    for key, expected in reference_weights().items():
        torch.testing.assert_close(outcome["weights"][key], expected, rtol=1e-5, atol=1e-6, msg=key)
    # Every name in the folder now is a complete checkpoint, and top-k names exactly the two newest.
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(atomic.STAGING_PREFIX)], names
    for name in names:
        _load(folder / name)
    assert set(outcome["best_k"]) == {"epoch=0-step=5.ckpt", "epoch=0-step=6.ckpt"} <= set(names)
