"""HSDP in ``apollo_fsdp``: ``sharding_strategy="HYBRID_SHARD"`` / ``strategy="apollo_hsdp"``.

Bad input fails when the Trainer is built; on 4 forked gloo ranks a (2 replicas, 2 shards)
mesh trains as one device does and its distributed checkpoint resumes on (2, 2), on (1, 2)
and on one process. The multi-node launch (``torchrun --nnodes=2``, two launchers on this
machine) is in ``test_multi_node_launch``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from test_apollo_fsdp import GLOBAL_BATCH, SAMPLES, TinyModel, assert_same_weights, make_trainer, reference

import lightning_memopt  # noqa: F401  (registers the strategy names)
from lightning_memopt.optim.sharding import local_view
from lightning_memopt.strategies import ApolloFSDPStrategy

LAUNCH_SCRIPT = Path(__file__).with_name("_hsdp_launch.py")


# ---------------------------------------------------------------------- construction and bad input
def test_apollo_hsdp_is_registered_with_lightnings_argument_names() -> None:
    assert "apollo_hsdp" in StrategyRegistry
    trainer = pl.Trainer(strategy="apollo_hsdp", accelerator="cpu", devices=4, num_nodes=2, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, ApolloFSDPStrategy) and strategy.sharding_strategy == "HYBRID_SHARD"
    assert strategy.hybrid_mesh_shape(8) == (2, 4)  # default: shard within a node, replicate across nodes
    from torch.distributed.fsdp import ShardingStrategy  # Lightning's FSDPStrategy also takes torch's enum

    assert ApolloFSDPStrategy(sharding_strategy=ShardingStrategy.HYBRID_SHARD).sharding_strategy == "HYBRID_SHARD"
    assert ApolloFSDPStrategy(sharding_strategy="full_shard").sharding_strategy == "FULL_SHARD"


@pytest.mark.parametrize(
    "first_import",
    ["from lightning_memopt.strategies import ApolloFSDPStrategy", "import lightning_memopt.strategies.apollo_fsdp"],
)
@pytest.mark.slow
def test_importing_the_strategy_first_registers_the_names(first_import: str) -> None:
    """The strategy module imports Lightning, whose import runs the registration hook while the
    module is half-imported: that used to fail with a circular ImportError."""
    code = (
        f"{first_import}\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "assert {'apollo_fsdp', 'apollo_hsdp'} <= set(StrategyRegistry), list(StrategyRegistry)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sharding_strategy": "ZERO3"}, "sharding_strategy='ZERO3' is not supported; use 'FULL_SHARD'"),
        ({"sharding_strategy": "SHARD_GRAD_OP"}, "reshard_after_forward=False"),
        ({"sharding_strategy": "NO_SHARD"}, "strategy='ddp'"),
        ({"device_mesh": (2, 2)}, "only valid with sharding_strategy='HYBRID_SHARD'"),
        ({"sharding_strategy": "HYBRID_SHARD", "device_mesh": (2, 0)}, "two positive integers"),
        ({"sharding_strategy": "HYBRID_SHARD", "device_mesh": (4,)}, "two positive integers"),
        ({"sharding_strategy": "HYBRID_SHARD", "data_parallel_size": 2}, "leave data_parallel_size='auto'"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ApolloFSDPStrategy(**kwargs)


@pytest.mark.parametrize(
    ("mesh", "devices", "num_nodes", "match"),
    [
        ((2, 2), 3, 1, r"device_mesh=\(2, 2\) holds 4 ranks, but the run has 3 .* e\.g\. \(1, 3\)"),
        ((2, 3), 4, 2, r"holds 6 ranks, but the run has 8 .* e\.g\. \(2, 4\)"),
    ],
)
def test_a_mesh_that_does_not_match_the_world_fails_when_the_trainer_is_built(mesh, devices, num_nodes, match):
    strategy = ApolloFSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=mesh)
    with pytest.raises(ValueError, match=match):
        pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices, num_nodes=num_nodes, logger=False)


def test_shard_groups_across_nodes_warn() -> None:
    strategy = ApolloFSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(1, 4))
    with pytest.warns(UserWarning, match="shard groups span nodes"):
        pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, num_nodes=2, logger=False)


def test_int8_weights_are_refused_with_the_fix() -> None:
    from lightning_memopt.quant import quantize_linear_weights

    model = TinyModel()
    quantize_linear_weights(model, "all-linear")
    # The refusal comes when fit connects the model to the strategy; fit itself would first run
    # Lightning's launcher (with several devices: copies of the whole pytest command as the other
    # ranks), so the test connects the model the way fit does, in this process.
    trainer = pl.Trainer(strategy="apollo_hsdp", accelerator="cpu", devices=2, logger=False, max_steps=1)
    with pytest.raises(ValueError, match=r"INT8 weights .* FSDP2 cannot shard .* \(strategy='auto', devices=1\)"):
        trainer.strategy.connect(model)


# ---------------------------------------------------------------------- 4 ranks, a (2, 2) mesh
def _hybrid_four_ranks(rank: int, world_size: int, root: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    hsdp = ApolloFSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 2))
    model = TinyModel()
    make_trainer(root, epochs=2, strategy=hsdp).fit(model)
    assert hsdp.fsdp_mesh.mesh_dim_names == ("replicate", "shard") and tuple(hsdp.fsdp_mesh.shape) == (2, 2)
    assert_same_weights(model, reference(2), "HSDP (2, 2)")
    optimizer = hsdp.optimizers[0]
    shard_group = hsdp.fsdp_mesh.get_group("shard")
    for p in model.parameters():
        assert p.placements == (Replicate(), Shard(0))
        if p.dim() == 2 and min(p.shape) > 1:  # low-rank: the moments split over the 2 ranks of a shard group
            moment = optimizer.state[p]["exp_avg"]
            held = torch.tensor([local_view(moment).numel()])
            in_group, in_world = held.clone(), held.clone()
            torch.distributed.all_reduce(in_group, group=shard_group)
            torch.distributed.all_reduce(in_world)
            # A shard group holds one copy (each rank about half), the world one per replica.
            assert in_group.item() == moment.numel() and in_world.item() == 2 * moment.numel(), tuple(p.shape)
            assert held.item() <= -(-moment.numel() // 2) + max(moment.shape), tuple(p.shape)

    # 1 epoch, a distributed checkpoint, the 2nd epoch resumed on the same mesh.
    trainer = make_trainer(
        root, epochs=1, strategy=ApolloFSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 2))
    )
    trainer.fit(TinyModel())
    trainer.save_checkpoint(f"{root}/hsdp.ckpt")
    resumed = TinyModel(init_seed=1)
    strategy = ApolloFSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 2))
    make_trainer(root, epochs=2, strategy=strategy).fit(resumed, ckpt_path=f"{root}/hsdp.ckpt")
    assert resumed.steps_run == SAMPLES // GLOBAL_BATCH
    assert_same_weights(resumed, reference(2), "HSDP (2, 2) resumed")


def _resume_elsewhere(rank: int, world_size: int, root: str, strategy: str) -> None:
    model = TinyModel(init_seed=1)
    make_trainer(root, epochs=2, strategy=strategy).fit(model, ckpt_path=f"{root}/hsdp.ckpt")
    assert model.steps_run == SAMPLES // GLOBAL_BATCH
    assert_same_weights(model, reference(2), f"HSDP (2, 2) resumed with {strategy} on {world_size} rank(s)")


@pytest.mark.slow
def test_hsdp_trains_like_one_device_and_reshards(tmp_path, run_ranks) -> None:
    root = str(tmp_path)
    run_ranks(_hybrid_four_ranks, root, world_size=4, init_process_group=False)
    run_ranks(_resume_elsewhere, root, "apollo_hsdp", world_size=2, init_process_group=False)  # a (1, 2) mesh
    run_ranks(_resume_elsewhere, root, "apollo_fsdp", world_size=1, init_process_group=False)


# ---------------------------------------------------------------------- torchrun --nnodes=2 on one machine
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_multi_node_launch(tmp_path) -> None:
    """Two ``torchrun --nnodes=2 --nproc-per-node=2`` launchers (node ranks 0 and 1) meet at a c10d
    rendezvous on 127.0.0.1, as two machines would: Lightning reads torchrun's environment,
    ``apollo_hsdp`` builds the (2 nodes, 2 per node) mesh, training matches one device, and
    rank 0 writes the memory report gathered from all 4 ranks."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(LAUNCH_SCRIPT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=2",
                f"--node-rank={node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=hsdp-test",
                "--max-restarts=0",
                str(LAUNCH_SCRIPT),
                str(tmp_path),
                "TorchElasticEnvironment",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=600)[0])
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for launcher, output in zip(launchers, outputs):
        assert launcher.returncode == 0, output[-4000:]
    _check_two_node_run(tmp_path)


def _check_two_node_run(root: Path) -> None:
    ranks = sorted(p.name for p in root.glob("rank*"))
    assert ranks == ["rank0", "rank1", "rank2", "rank3"]
    assert (root / "rank2").read_text() == "node 1 local 0"
    summary = torch.load(root / "summary.pt", weights_only=True)
    assert summary["mesh"] == [2, 2] and summary["num_nodes"] == 2 and summary["world_size"] == 4
    # Each node holds one full replica of the optimizer state (its two ranks hold half each).
    per_node = summary["optimizer_state_bytes_per_node"]
    assert set(per_node) == {0, 1} and per_node[0] == per_node[1] > 0


@pytest.mark.slow
def test_slurm_environment_launch(tmp_path) -> None:
    """The 4 tasks of a 2-node SLURM job (``srun`` in examples/slurm_hsdp.sh), emulated with SLURM's
    variables on this machine: Lightning's SLURMEnvironment takes ranks and nodes from them."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "WORLD_SIZE"))}
    base["PYTHONPATH"] = str(LAUNCH_SCRIPT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    base.update(
        SLURM_NTASKS="4",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_JOB_NAME="hsdp-test",
        SLURM_JOB_ID="4242",
        SLURM_NODELIST="127.0.0.1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    tasks = [
        subprocess.Popen(
            [sys.executable, str(LAUNCH_SCRIPT), str(tmp_path), "SLURMEnvironment"],
            env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2), "SLURM_NODEID": str(r // 2)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(4)
    ]
    outputs = []
    try:
        for task in tasks:
            outputs.append(task.communicate(timeout=600)[0])
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
    for task, output in zip(tasks, outputs):
        assert task.returncode == 0, output[-4000:]
    _check_two_node_run(tmp_path)
