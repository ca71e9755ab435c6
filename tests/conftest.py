"""Fixtures shared by every test folder: ``tiny_llama`` and ``tiny_bert`` (random-weight models),
``quiet_trainer`` (a Lightning Trainer without logger, checkpoints or progress bar),
``single_thread`` and ``run_ranks`` (forked gloo ranks).

Every distributed test goes through ``run_ranks`` so that each one tears its process group down
the same safe way. Both are handed to tests as fixtures, never imported, so that no test depends
on which ``conftest`` module is first on ``sys.path``.
"""

from __future__ import annotations

import gc
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_models


def pytest_configure(config: pytest.Config) -> None:
    """Stop at once if this pytest process is a copy that Lightning's launcher started.

    ``Trainer(devices=2).fit(...)`` inside a test makes Lightning re-run the script that started
    the process, here the whole pytest command, as rank 1: the suite would run twice, and the
    copy's death kills the real run. Multi-process tests go through ``run_ranks`` or a subprocess.
    """
    rank = os.environ.get("LOCAL_RANK")
    if rank not in (None, "0"):
        pytest.exit(
            f"pytest started as LOCAL_RANK={rank}: a test ran a multi-device Lightning Trainer in the pytest process "
            "(use the run_ranks fixture or a subprocess instead).",
            returncode=3,
        )


# What Lightning's launcher and torchrun set for a rank. Lightning's subprocess launcher sets them
# in the launching process itself, and a Trainer that finds LOCAL_RANK takes itself for an
# already launched rank: left behind by one test, they make a later multi-device run wait forever
# for ranks nobody starts.
_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK")


@pytest.fixture(autouse=True)
def _restore_launcher_variables() -> Iterator[None]:
    before = {name: os.environ.get(name) for name in _LAUNCHER_VARIABLES}
    yield
    launched = os.environ.get("LOCAL_RANK") != before["LOCAL_RANK"]
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if launched:
        warnings.warn(
            "this test ran Lightning's subprocess launcher in the pytest process (it set LOCAL_RANK and, with "
            "several devices, starts copies of the pytest command as the other ranks): use the run_ranks fixture "
            "or a subprocess",
            pytest.PytestWarning,
            stacklevel=1,
        )


@pytest.fixture
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """``tiny_llama(seed=0, **llama_config)``: a 2-block ``LlamaForCausalLM`` over bytes with
    random weights (``tiny_models.tiny_llama``); override any ``LlamaConfig`` field.

    Example::

        def test_it(tiny_llama):
            model = tiny_llama(num_hidden_layers=3)
    """
    return tiny_models.tiny_llama


@pytest.fixture
def tiny_bert() -> Callable[..., torch.nn.Module]:
    """``tiny_bert(num_labels=2, vocab_size=256, seed=0, **bert_config)``: a 2-layer BERT
    classifier with random weights and no dropout (``tiny_models.tiny_bert``).

    Example::

        def test_it(tiny_bert):
            model = tiny_bert(vocab_size=100)
    """
    return tiny_models.tiny_bert


@pytest.fixture
def quiet_trainer() -> Callable[..., Any]:
    """``quiet_trainer(**trainer_kwargs)``: a Lightning ``Trainer`` on one CPU device with no
    logger, no checkpointing, no progress bar and no model summary; any argument overrides.

    Example::

        def test_it(quiet_trainer):
            quiet_trainer(max_steps=2, callbacks=[LayerwiseUpdates()]).fit(model, loader)
    """

    def make(**kwargs: Any) -> Any:
        from lightning.pytorch import Trainer

        options: dict[str, Any] = dict(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        return Trainer(**options | kwargs)

    return make


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for the tiny models: as fast as two, and far faster when the
    machine's cores are shared (OpenMP's spinning threads then wait on each other).

    Example::

        pytestmark = pytest.mark.usefixtures("single_thread")
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(
    rank: int, fn: Callable[..., None], world_size: int, port: int, store: str, init: bool, args: tuple
) -> None:
    # Lightning reads these to run a Trainer in place as an already launched rank.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LIGHTNING_TEST_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    if init:
        # A file store: no TCP server living in rank 0 that the other rank still needs at exit.
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
    fn(rank, world_size, *args)
    if dist.is_initialized():
        # Models sharded by FSDP2 (DeviceMesh) or wrapped by DDP keep a reference to the process
        # group, often in reference cycles. If one outlives destroy_process_group, gloo's
        # threads are torn down during interpreter shutdown instead, and the process can abort
        # ("terminate called without an active exception", SIGABRT) while its peer exits.
        # So: free them, wait for every rank, then destroy the group while all are alive.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture
def run_ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., None]:
    """``run_ranks(fn, *args, world_size=2, init_process_group=True)`` runs
    ``fn(rank, world_size, *args)`` in ``world_size`` forked processes and fails if any fails.

    With ``init_process_group=True`` each rank joins a gloo group first; with ``False`` the
    ranks only get Lightning's launcher variables, and the Trainer creates the group.

    Example::

        def test_sum(run_ranks):
            run_ranks(_check_sum)  # _check_sum(rank, world_size) asserts inside each rank
    """

    def launch(fn: Callable[..., None], *args: Any, world_size: int = 2, init_process_group: bool = True) -> None:
        store = Path(tmp_path_factory.mktemp("gloo_store")) / "store"
        mp.start_processes(
            _rank_entry,
            args=(fn, world_size, _free_port(), str(store), init_process_group, args),
            nprocs=world_size,
            start_method="fork",
        )

    return launch
