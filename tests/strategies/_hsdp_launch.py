"""One rank of the 2-node HSDP run that test_apollo_hsdp.py launches with ``torchrun --nnodes=2``.

``torchrun ... _hsdp_launch.py ROOT ENVIRONMENT`` (or 4 processes with SLURM's variables):
trains ``TinyModel`` for 2 epochs with ``strategy="apollo_hsdp"``, ``num_nodes=2, devices=2``
(Lightning reads the launcher's environment),
checks the weights against one device, and has rank 0 write ``ROOT/summary.pt`` (the mesh
and the per-node memory totals from the ``MemoryProfiler`` report it gathered from every
rank). Each rank writes ``ROOT/rank<global rank>``. ``ENVIRONMENT`` is the Lightning cluster
environment the run must detect (``TorchElasticEnvironment``, ``SLURMEnvironment``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from test_apollo_fsdp import TinyModel, assert_same_weights, reference

import lightning_memopt  # noqa: F401  (registers apollo_hsdp)
from lightning_memopt.callbacks import MemoryProfiler


def main(root: Path, environment: str) -> None:
    torch.set_num_threads(1)
    report_path = root / "memory.json"
    trainer = pl.Trainer(
        strategy="apollo_hsdp",
        accelerator="cpu",
        devices=2,
        num_nodes=2,
        max_epochs=2,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[MemoryProfiler(interval=1, report_path=report_path, plot=False, table=False)],
    )
    detected = type(trainer.strategy.cluster_environment).__name__
    assert detected == environment, f"Lightning detected {detected}, expected {environment}"
    model = TinyModel()
    trainer.fit(model)
    assert_same_weights(model, reference(2), "apollo_hsdp on 2 nodes x 2 processes")
    mesh = trainer.strategy.fsdp_mesh
    assert mesh.mesh_dim_names == ("replicate", "shard"), mesh
    (root / f"rank{trainer.global_rank}").write_text(f"node {trainer.node_rank} local {trainer.local_rank}")
    if trainer.global_rank == 0:
        report = json.loads(report_path.read_text())
        per_node: dict[int, int] = {}
        for entry in report["ranks"]:
            # Lightning numbers ranks node by node: global rank = node_rank * devices + local_rank.
            node = entry["rank"] // 2
            per_node[node] = per_node.get(node, 0) + int(entry["final"]["optimizer_state_bytes"])
        summary = {"mesh": list(mesh.shape), "num_nodes": trainer.num_nodes, "world_size": report["world_size"]}
        torch.save({**summary, "optimizer_state_bytes_per_node": per_node}, root / "summary.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
