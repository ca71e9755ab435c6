"""FSDP2 shards on 2 CPU ranks (gloo) sum to the whole model; the report gathers both ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_memopt.memory import MemoryTracker, breakdown


def model() -> nn.Module:
    torch.manual_seed(0)
    # dim 0 of every parameter is even: the two shards are exact halves, without padding
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 6))


def _run(rank: int, world: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    net = model()
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    tracker = MemoryTracker(interval=1, report_path=Path(out) / "memory.json", table=False, plot=False)
    tracker.start(net)
    net(torch.randn(4, 16)).sum().backward()
    tracker.on_gradients(net, 0)
    grads = breakdown(net)
    opt.step()
    opt.zero_grad()
    tracker.on_step_end(net, opt, 0)
    after = breakdown(net, opt)
    tracker.finish(net, opt)
    result = {
        "is_dtensor": type(next(net.parameters())).__name__ == "DTensor",
        "params_bytes": after.params_bytes,
        "numel": after.numel,
        "grads_bytes": grads.grads_bytes,
        "optimizer_state_bytes": after.optimizer_state_bytes,
        "baseline_total": after.baseline.total_bytes,
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_fsdp2_shards_sum_to_the_whole(tmp_path: Path, run_ranks) -> None:
    run_ranks(_run, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["is_dtensor"] for r in ranks)

    whole = model()
    whole(torch.randn(4, 16)).sum().backward()
    opt = torch.optim.AdamW(whole.parameters(), lr=1e-3)
    opt.step()
    full = breakdown(whole, opt)
    n_tensors = len(list(whole.parameters()))

    assert sum(r["params_bytes"] for r in ranks) == full.params_bytes
    assert ranks[0]["params_bytes"] == ranks[1]["params_bytes"] == full.params_bytes // 2
    assert sum(r["numel"] for r in ranks) == full.numel
    assert sum(r["grads_bytes"] for r in ranks) == full.grads_bytes
    # the moments are sharded; every rank keeps its own 4-byte step per parameter
    assert sum(r["optimizer_state_bytes"] for r in ranks) == full.optimizer_state_bytes + 4 * n_tensors
    assert sum(r["baseline_total"] for r in ranks) == full.baseline.total_bytes

    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["world_size"] == 2
    assert [e["rank"] for e in report["ranks"]] == [0, 1]
    for entry, r in zip(report["ranks"], ranks):
        assert entry["final"]["params_bytes"] == r["params_bytes"]
        assert entry["final"]["grads_bytes"] == r["grads_bytes"]  # measured before zero_grad
