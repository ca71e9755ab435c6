"""Per-rank memory and speed of ``apollo_fsdp`` on 1 and 2 CPU ranks (gloo), against FSDP2 + AdamW.

Each optimizer trains the same LLaMA-shaped :class:`~lightning_memopt.models.CausalLM` with
``Trainer(strategy="apollo_fsdp", accelerator="cpu", devices=N)``: FSDP2 sharded per decoder
layer, the linear layers of the layers low-rank for APOLLO (embeddings, norms and the LM head on
AdamW, as in the paper). Rows:

===================  =========================================================================
APOLLO               ``APOLLO(rank=hidden/4)``, channel-wise scaling
APOLLO-Mini          ``APOLLOMini`` (rank 1, tensor-wise scaling)
AdamW                ``torch.optim.AdamW`` (fused): FSDP2 + AdamW, the peer
===================  =========================================================================

Columns, per rank (the largest over the ranks): parameter, gradient (measured after backward,
before the step) and optimizer-state bytes, the optimizer state of the low-rank matrices alone
(moments, seeds, limiter norms, step counters), and tokens/s of all ranks together (median step
after warm-up). The global batch is the same for 1 and 2 ranks. Targets: per-rank optimizer
state with 2 ranks at most 0.55x of 1 rank (APOLLO and APOLLO-Mini); APOLLO-Mini's per-rank
state for the low-rank matrices under 2% of AdamW's for the same matrices.

Each world size runs in a fresh ``python`` process; Lightning launches the second rank itself
(the path users take), and every rank writes its own numbers.

Usage::

    python benchmarks/fsdp_memory.py                       # LLaMA 60M shape (hidden 512, 8 layers)
    python benchmarks/fsdp_memory.py --smoke --out /tmp/x  # a tiny model, seconds (the test)

Writes ``<out>/fsdp_memory.json`` and ``<out>/fsdp_memory.md`` (default ``benchmarks/results``).
CPU timings on a shared machine are noisy; the byte columns are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lightning_memopt.models.llama import LLAMA_SIZES, PAPER_VOCAB_SIZE

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STATE_RATIO_TARGET, MINI_LOW_RANK_TARGET = 0.55, 0.02
OPTIMIZERS = {"apollo": "APOLLO", "apollo_mini": "APOLLO-Mini", "adamw": "AdamW"}
WORLD_SIZES = (1, 2)


def paper_shape(size: str, **run: int) -> dict[str, int]:
    """A LLaMA size of :mod:`lightning_memopt.models` (the APOLLO paper's configurations) with the
    paper's 32000-token vocabulary, plus this benchmark's ``seq`` and ``batch``."""
    config = LLAMA_SIZES[size]
    return {
        "hidden": config["hidden_size"],
        "intermediate": config["intermediate_size"],
        "layers": config["num_hidden_layers"],
        "heads": config["num_attention_heads"],
        "vocab": PAPER_VOCAB_SIZE,
        **run,
    }


SHAPES: dict[str, dict[str, int]] = {
    "60m": paper_shape("60m", seq=128, batch=4),
    "smoke": {"hidden": 64, "intermediate": 160, "layers": 2, "heads": 2, "vocab": 128, "seq": 16, "batch": 4},
}
STEPS = {"60m": (1, 3), "smoke": (1, 2)}  # (warm-up, timed) steps


# ---------------------------------------------------------------------------- one world size (every rank)
def run_world(shape_name: str, optimizers: list[str], out: Path) -> None:
    """Train every optimizer in turn under ``apollo_fsdp`` with ``LIGHTNING_MEMOPT_DEVICES`` ranks.

    Runs on every rank (Lightning re-runs this command for rank 1); each rank writes
    ``<out>/<optimizer>_rank<r>.json``.
    """
    import time
    from functools import partial

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    import lightning_memopt  # noqa: F401  (registers apollo_fsdp)
    from lightning_memopt.memory import breakdown
    from lightning_memopt.models import CausalLM
    from lightning_memopt.optim import APOLLO, APOLLOMini
    from lightning_memopt.optim.sharding import local_view

    shape = SHAPES[shape_name]
    warmup, timed = STEPS[shape_name]
    devices = int(os.environ["LIGHTNING_MEMOPT_DEVICES"])
    factories = {
        "apollo": partial(APOLLO, lr=1e-3, rank=max(1, shape["hidden"] // 4)),
        "apollo_mini": partial(APOLLOMini, lr=1e-3),
        "adamw": partial(torch.optim.AdamW, lr=1e-3, fused=True),
    }

    class RandomTokens(Dataset):
        def __len__(self) -> int:
            return shape["batch"] * (warmup + timed)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            generator = torch.Generator().manual_seed(index)
            return {"input_ids": torch.randint(0, shape["vocab"], (shape["seq"],), generator=generator)}

    class Measure(pl.Callback):
        def __init__(self) -> None:
            self.grads_bytes = 0
            self.step_times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.grads_bytes = max(self.grads_bytes, breakdown(pl_module).grads_bytes)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_times.append(time.perf_counter() - self._start)

    for name in optimizers:
        pl.seed_everything(0, verbose=False)  # every rank builds the same initial weights
        model = CausalLM(
            "tiny",
            optimizer=factories[name],
            vocab_size=shape["vocab"],
            model_overrides={
                "hidden_size": shape["hidden"],
                "intermediate_size": shape["intermediate"],
                "num_hidden_layers": shape["layers"],
                "num_attention_heads": shape["heads"],
                "num_key_value_heads": shape["heads"],
                "max_position_embeddings": shape["seq"],
            },
        )
        measure = Measure()
        trainer = pl.Trainer(
            strategy="apollo_fsdp",
            accelerator="cpu",
            devices=devices,
            max_steps=warmup + timed,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[measure],
        )
        data = DataLoader(RandomTokens(), batch_size=shape["batch"] // devices)
        trainer.fit(model, data)

        optimizer = trainer.optimizers[0]
        memory = breakdown(model, optimizer, grads=False)
        low_rank = [p for g in optimizer.param_groups if g.get("low_rank") for p in g["params"]]
        low_rank_state = sum(
            local_view(t).numel() * t.element_size()
            for p in low_rank
            for t in optimizer.state[p].values()
            if isinstance(t, torch.Tensor)
        )
        step_s = sorted(measure.step_times[warmup:])[len(measure.step_times[warmup:]) // 2]
        result = {
            "optimizer": name,
            "world_size": devices,
            "rank": trainer.global_rank,
            "params": sum(p.numel() for p in model.parameters()),
            "params_bytes": memory.params_bytes,
            "grads_bytes": measure.grads_bytes,
            "optimizer_state_bytes": memory.optimizer_state_bytes,
            "projection_cache_bytes": memory.projection_cache_bytes,
            "workspace_bytes": memory.workspace_bytes,
            "low_rank_state_bytes": low_rank_state,
            "low_rank_local_numel": sum(local_view(p).numel() for p in low_rank),
            "sharded": type(next(model.parameters())).__name__ == "DTensor",
            "step_s": step_s,
            "tokens_per_s": shape["batch"] * shape["seq"] / step_s,
        }
        (out / f"{name}_rank{trainer.global_rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------- the table (parent process)
def run_world_in_fresh_process(shape_name: str, optimizers: list[str], world_size: int, out: Path) -> list[dict]:
    command = [sys.executable, str(Path(__file__).resolve()), "--shape", shape_name, "--world", str(out)]
    command += ["--optimizers", ",".join(optimizers)]
    # A fresh launch: launcher variables inherited from the caller (LOCAL_RANK, ...) would make
    # Lightning take the child for an already launched rank and wait for ranks nobody starts.
    launched = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launched}
    env.update(LIGHTNING_MEMOPT_DEVICES=str(world_size), PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{world_size} rank(s) failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(path.read_text()) for path in sorted(out.glob("*_rank*.json"))]


def summarize(per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (optimizer, world size): the largest per-rank bytes, rank 0's speed."""
    rows = []
    for name in OPTIMIZERS:
        for world_size in WORLD_SIZES:
            ranks = [r for r in per_rank if r["optimizer"] == name and r["world_size"] == world_size]
            if not ranks:
                continue
            row = {"optimizer": name, "label": OPTIMIZERS[name], "world_size": world_size, "params": ranks[0]["params"]}
            for key in (
                "params_bytes",
                "grads_bytes",
                "optimizer_state_bytes",
                "projection_cache_bytes",
                "workspace_bytes",
            ):
                row[key] = max(r[key] for r in ranks)
            row["low_rank_state_bytes"] = max(r["low_rank_state_bytes"] for r in ranks)
            row["tokens_per_s"] = next(r["tokens_per_s"] for r in ranks if r["rank"] == 0)
            row["sharded"] = all(r["sharded"] for r in ranks)
            row["ranks"] = ranks
            rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def row(name: str, world_size: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["optimizer"] == name and r["world_size"] == world_size), None)

    result: dict[str, Any] = {}
    for name in ("apollo", "apollo_mini", "adamw"):
        one, two = row(name, 1), row(name, 2)
        if one and two:
            result[f"{name}_state_2_vs_1"] = two["optimizer_state_bytes"] / one["optimizer_state_bytes"]
    for world_size in WORLD_SIZES:
        mini, adamw = row("apollo_mini", world_size), row("adamw", world_size)
        if mini and adamw:
            result[f"mini_low_rank_vs_adamw_{world_size}"] = (
                mini["low_rank_state_bytes"] / adamw["low_rank_state_bytes"]
            )
    ratios = [v for k, v in result.items() if k.startswith(("apollo_state", "apollo_mini_state"))]
    minis = [v for k, v in result.items() if k.startswith("mini_low_rank")]
    result["met"] = all(v <= STATE_RATIO_TARGET for v in ratios) and all(v < MINI_LOW_RANK_TARGET for v in minis)
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    shape, rows, t = report["shape"], report["rows"], report["targets"]
    lines = [
        f"Model: LLaMA-shaped, {rows[0]['params'] / 1e6:.1f}M parameters (hidden {shape['hidden']}, "
        f"{shape['layers']} layers, vocab {shape['vocab']}), global batch {shape['batch']} x {shape['seq']} "
        f'tokens, fp32, `Trainer(strategy="apollo_fsdp", accelerator="cpu", devices=N)` (gloo), {report["device"]}.',
        "",
        "| optimizer | ranks | params / rank (MiB) | grads / rank (MiB) | optimizer state / rank (MiB) "
        "| low-rank matrices' state / rank (MiB) | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['world_size']} | {_mib(r['params_bytes'])} | {_mib(r['grads_bytes'])} | "
            f"{_mib(r['optimizer_state_bytes'])} | {_mib(r['low_rank_state_bytes'])} | {r['tokens_per_s']:,.0f} |"
        )
    lines.append("")
    for name, label in (("apollo", "APOLLO"), ("apollo_mini", "APOLLO-Mini"), ("adamw", "AdamW")):
        key = f"{name}_state_2_vs_1"
        if key in t:
            lines.append(f"- {label}: per-rank optimizer state, 2 ranks / 1 rank = {t[key]:.3f}")
    for world_size in WORLD_SIZES:
        key = f"mini_low_rank_vs_adamw_{world_size}"
        if key in t:
            lines.append(
                f"- APOLLO-Mini / AdamW, state of the low-rank matrices per rank ({world_size} rank(s)) = "
                f"{100 * t[key]:.2f}%"
            )
    lines.append(
        f"- targets (state ratio <= {STATE_RATIO_TARGET}, APOLLO-Mini < {100 * MINI_LOW_RANK_TARGET:.0f}% of "
        f"AdamW): {'met' if t['met'] else 'NOT met'}"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 timed steps (the test)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated: " + ",".join(OPTIMIZERS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--world", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one world size
    args = parser.parse_args(argv)
    shape_name = args.shape or ("smoke" if args.smoke else "60m")
    optimizers = [o for o in args.optimizers.split(",") if o]
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    if args.world is not None:
        run_world(shape_name, optimizers, args.world)
        return None

    per_rank: list[dict[str, Any]] = []
    for world_size in WORLD_SIZES:
        with tempfile.TemporaryDirectory() as folder:
            per_rank += run_world_in_fresh_process(shape_name, optimizers, world_size, Path(folder))
    rows = summarize(per_rank)
    report = {
        "benchmark": "fsdp_memory",
        "shape_name": shape_name,
        "shape": SHAPES[shape_name],
        "steps": dict(zip(("warmup", "timed"), STEPS[shape_name])),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "rows": rows,
        "targets": targets(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsdp_memory.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    (args.out / "fsdp_memory.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
