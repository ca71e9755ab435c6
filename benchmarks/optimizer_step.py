"""Optimizer step time and state memory on the APOLLO paper's LLaMA shapes, side by side.

One run measures, on one LLaMA-shaped parameter set with random gradients, torch AdamW
(fused and foreach), our APOLLO (rank 128 and 256, with the projection in float32 and in
bfloat16: ``projection_dtype``) and APOLLO-Mini, bitsandbytes AdamW8bit,
and, when they are installed (``pip install apollo-torch galore-torch``; both optional, the
first is licensed non-commercial and never a dependency of the package), the reference
``apollo_torch.APOLLOAdamW`` and ``galore_torch.GaLoreAdamW``.

All optimizers step the *same* parameter tensors with the same gradients, one step of each in
turn per repeat (round robin), so that the noise of a shared machine falls on all of them
alike; the reported time is the median over repeats, after warm-up steps that are not timed
(the first step builds the state; later warm-up steps settle the caches). Ratios are to
``AdamW(fused=True)`` of the same run, by wall time and by the process's CPU time per step
(which other processes on a shared machine do not inflate). The low-rank methods use the
paper's split (:func:`apollo_param_groups` on the model built by
:func:`lightning_memopt.models.build_llama`): the attention and MLP matrices are low-rank,
embeddings, norms and the LM head get AdamW.

Every ratio comes with its spread: the median and range of the per-round ratios in one process,
or, with ``--processes N``, of the medians of N fresh processes (whose first-touch page costs
differ), with the machine named in the table.

Usage::

    python benchmarks/optimizer_step.py                      # 60m and 130m, 10 repeats
    python benchmarks/optimizer_step.py --processes 5        # the same in 5 fresh processes
    python benchmarks/optimizer_step.py --shapes 60m --repeats 20 --warmup 3
    python benchmarks/optimizer_step.py --smoke --out /tmp/x # tiny shapes, 2 repeats (the test)
    python benchmarks/optimizer_step.py --device cuda        # on a GPU (the step timed between
                                                             # two torch.cuda.synchronize())

Writes ``<out>/optimizer_step.json`` and ``<out>/optimizer_step.md`` (default
``benchmarks/results``) and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_memopt.models import LLAMA_SIZES, build_llama
from lightning_memopt.optim import APOLLO, APOLLOMini, apollo_param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from machine import describe_machine, format_spread, machine_line, spread

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Sizes of lightning_memopt.models (the APOLLO / GaLore paper's LLaMA configurations, untied
# head, 32000-token vocabulary), and a tiny one for --smoke (the test that runs the script).
SIZES: dict[str, tuple[str, dict[str, int]]] = {
    "60m": ("60m", {}),
    "130m": ("130m", {}),
    "smoke": (
        "tiny",
        dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    ),
}


@dataclass
class ParamSet:
    """A LLaMA-shaped parameter set: low-rank matrices (attention, MLP) and the rest."""

    low_rank: list[torch.nn.Parameter]
    rest: list[torch.nn.Parameter]

    @property
    def all(self) -> list[torch.nn.Parameter]:
        return self.low_rank + self.rest

    def numel(self) -> int:
        return sum(p.numel() for p in self.all)


def llama_param_shapes(shape_name: str) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of the model's parameters, split as :func:`apollo_param_groups` splits them (the
    blocks' attention and MLP matrices low-rank; embeddings, norms and the LM head not). The
    model is built on the meta device, so this costs no memory."""
    size, overrides = SIZES[shape_name]
    with torch.device("meta"):
        model = build_llama(size, **overrides)
    groups = apollo_param_groups(model)
    return {
        "low_rank": [tuple(p.shape) for g in groups if g["low_rank"] for p in g["params"]],
        "rest": [tuple(p.shape) for g in groups if not g["low_rank"] for p in g["params"]],
    }


def make_param_set(shape_name: str, seed: int = 0, device: str = "cpu") -> ParamSet:
    """The shape's parameters with random gradients, drawn on the CPU (the same values on every
    device) and moved to ``device``."""
    shapes = llama_param_shapes(shape_name)
    generator = torch.Generator().manual_seed(seed)

    def make(shape: tuple[int, ...]) -> torch.nn.Parameter:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device)
        return p

    return ParamSet([make(s) for s in shapes["low_rank"]], [make(s) for s in shapes["rest"]])


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (its state, also inside objects
    such as the reference's projector), each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(value: Any, depth: int = 0) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth)
        elif depth < 2 and hasattr(value, "__dict__"):
            for v in vars(value).values():
                visit(v, depth + 1)

    for state in optimizer.state.values():
        visit(state)
    return total


def extra_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Memory an optimizer holds outside its state dict: our cached projections."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return optimizer.projection_cache_bytes() if isinstance(optimizer, APOLLO) else 0


def workspace_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Scratch memory an optimizer keeps between steps: our step workspace (CPU only)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return optimizer.workspace_bytes() if isinstance(optimizer, APOLLO) else 0


# ----------------------------------------------------------------------------- contenders
Builder = Callable[[ParamSet], torch.optim.Optimizer]
LR, WEIGHT_DECAY = 1e-3, 0.0
BF16 = "bfloat16"


def _apollo(rank: int, **kwargs: Any) -> Builder:
    def build(ps: ParamSet) -> torch.optim.Optimizer:
        groups = [{"params": ps.low_rank, "low_rank": True}, {"params": ps.rest, "low_rank": False}]
        return APOLLO(groups, lr=LR, weight_decay=WEIGHT_DECAY, rank=rank, **kwargs)

    return build


def _apollo_mini(**kwargs: Any) -> Builder:
    def build(ps: ParamSet) -> torch.optim.Optimizer:
        groups = [{"params": ps.low_rank, "low_rank": True}, {"params": ps.rest, "low_rank": False}]
        return APOLLOMini(groups, lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)

    return build


def _reference_apollo(rank: int, scale_type: str, scale: float) -> Builder:
    def build(ps: ParamSet) -> torch.optim.Optimizer:
        from apollo_torch import APOLLOAdamW

        low_rank = {
            "params": ps.low_rank,
            "rank": rank,
            "proj": "random",
            "scale_type": scale_type,
            "scale": scale,
            "update_proj_gap": 200,
            "proj_type": "std",
        }
        return APOLLOAdamW([low_rank, {"params": ps.rest}], lr=LR, weight_decay=WEIGHT_DECAY)

    return build


def _reference_galore(rank: int) -> Builder:
    def build(ps: ParamSet) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        low_rank = {"params": ps.low_rank, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
        return GaLoreAdamW([low_rank, {"params": ps.rest}], lr=LR, weight_decay=WEIGHT_DECAY)

    return build


def _adamw(**kwargs: Any) -> Builder:
    return lambda ps: torch.optim.AdamW(ps.all, lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)


def _adamw8bit(ps: ParamSet) -> torch.optim.Optimizer:
    from bitsandbytes.optim import AdamW8bit

    return AdamW8bit(ps.all, lr=LR, weight_decay=WEIGHT_DECAY)


def contenders() -> list[tuple[str, str, Builder]]:
    """(name, description, builder) of everything that can run here; the first is the baseline."""
    rows: list[tuple[str, str, Builder]] = [
        ("adamw_fused", "torch AdamW(fused=True)", _adamw(fused=True)),
        ("adamw_foreach", "torch AdamW(foreach=True)", _adamw(foreach=True)),
        ("apollo_r256", "ours: APOLLO rank 256, channel", _apollo(256)),
        ("apollo_r128", "ours: APOLLO rank 128, channel", _apollo(128)),
        ("apollo_mini", "ours: APOLLO-Mini (rank 1, tensor, scale 128)", _apollo_mini()),
        ("apollo_r256_nocheck", "ours: APOLLO rank 256, check_finite=False", _apollo(256, check_finite=False)),
        ("apollo_mini_nocheck", "ours: APOLLO-Mini, check_finite=False", _apollo_mini(check_finite=False)),
        ("apollo_r256_bf16", "ours: APOLLO rank 256, projection_dtype=bfloat16", _apollo(256, projection_dtype=BF16)),
        ("apollo_r128_bf16", "ours: APOLLO rank 128, projection_dtype=bfloat16", _apollo(128, projection_dtype=BF16)),
    ]
    if importlib.util.find_spec("bitsandbytes") is not None:
        rows.append(("adamw8bit", "bitsandbytes AdamW8bit", _adamw8bit))
    if importlib.util.find_spec("apollo_torch") is not None:
        rows.append(("ref_apollo_r256", "apollo-torch APOLLOAdamW rank 256", _reference_apollo(256, "channel", 1.0)))
        rows.append(("ref_apollo_r128", "apollo-torch APOLLOAdamW rank 128", _reference_apollo(128, "channel", 1.0)))
        mini = _reference_apollo(1, "tensor", 128.0)
        rows.append(("ref_apollo_mini", "apollo-torch APOLLOAdamW rank 1, tensor, scale 128", mini))
    if importlib.util.find_spec("galore_torch") is not None:
        rows.append(("ref_galore_r256", "galore-torch GaLoreAdamW rank 256", _reference_galore(256)))
    return rows


# ----------------------------------------------------------------------------- measurement
def _synchronize(device: str) -> None:
    """Wait for the device's queued kernels, so that a step's time is its whole work (a CUDA
    step returns as soon as its kernels are queued)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure(
    shape_name: str, repeats: int, warmup: int, only: Iterable[str] | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Time every contender on one parameter set, round robin; return the shape's result record."""
    ps = make_param_set(shape_name, device=device)
    chosen = [c for c in contenders() if only is None or c[0] in set(only)]
    optimizers: dict[str, torch.optim.Optimizer] = {}
    descriptions: dict[str, str] = {}
    times: dict[str, list[float]] = {}
    cpu_times: dict[str, list[float]] = {}
    # The peers' deprecation chatter, and rank clamping on the --smoke shapes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, description, build in chosen:
            optimizers[name] = build(ps)
            descriptions[name] = description
            times[name] = []
            cpu_times[name] = []
        for i in range(warmup + repeats):
            for name, optimizer in optimizers.items():
                _synchronize(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                optimizer.step()
                _synchronize(device)
                elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
                if i >= warmup:
                    times[name].append(elapsed)
                    cpu_times[name].append(cpu_elapsed)
    base_name = chosen[0][0]
    base = statistics.median(times[base_name])
    cpu_base = statistics.median(cpu_times[base_name])
    base_state = state_bytes(optimizers[chosen[0][0]])
    rows = []
    for name, optimizer in optimizers.items():
        median = statistics.median(times[name])
        nbytes = state_bytes(optimizer)
        rows.append(
            {
                "name": name,
                "description": descriptions[name],
                "step_ms_median": median * 1e3,
                "step_ms_min": min(times[name]) * 1e3,
                "step_ms_all": [t * 1e3 for t in times[name]],
                "ratio_to_adamw_fused": median / base,
                # Each round steps every contender once, so a round's ratio shares its noise.
                "ratio_spread": spread(t / b for t, b in zip(times[name], times[base_name])),
                # CPU time of the process (all threads): less sensitive than wall time to other
                # processes on a shared machine, which delay a step without adding to its work.
                "step_cpu_ms_median": statistics.median(cpu_times[name]) * 1e3,
                "cpu_ratio_to_adamw_fused": statistics.median(cpu_times[name]) / cpu_base,
                "state_bytes": nbytes,
                "state_ratio_to_adamw_fused": nbytes / base_state,
                "extra_bytes": extra_bytes(optimizer),
                "workspace_bytes": workspace_bytes(optimizer),
            }
        )
    low_rank_numel = sum(p.numel() for p in ps.low_rank)
    return {
        "shape": shape_name,
        "config": {**LLAMA_SIZES[SIZES[shape_name][0]], **SIZES[shape_name][1]},
        "num_params": ps.numel(),
        "low_rank_params": low_rank_numel,
        "repeats": repeats,
        "warmup": warmup,
        "results": rows,
    }


def targets(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for one shape: (value, bound, met) for each that can be checked."""
    by_name = {r["name"]: r for r in record["results"]}
    out: dict[str, Any] = {}

    def add(key: str, num: str, den: str, bound: float, at_most: bool) -> None:
        if num in by_name and den in by_name:
            value = by_name[num]["step_ms_median"] / by_name[den]["step_ms_median"]
            cpu_value = by_name[num]["step_cpu_ms_median"] / by_name[den]["step_cpu_ms_median"]
            met = value <= bound if at_most else value >= bound
            out[key] = {"value": value, "cpu_value": cpu_value, "bound": bound, "met": met}

    add("apollo_mini / adamw_fused <= 1.0", "apollo_mini", "adamw_fused", 1.0, True)
    add("apollo_r256 / adamw_fused <= 1.5", "apollo_r256", "adamw_fused", 1.5, True)
    add("apollo_r256_bf16 / adamw_fused <= 1.5", "apollo_r256_bf16", "adamw_fused", 1.5, True)
    add("ref_apollo_r256 / apollo_r256 >= 2", "ref_apollo_r256", "apollo_r256", 2.0, False)
    add("ref_apollo_r256 / apollo_r256_bf16 >= 2", "ref_apollo_r256", "apollo_r256_bf16", 2.0, False)
    add("ref_apollo_mini / apollo_mini >= 2", "ref_apollo_mini", "apollo_mini", 2.0, False)
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Optimizer step: time and state memory",
        "",
        f"Machine: {machine_line(report['machine'])}. Median over {report['records'][0]['repeats']} repeats "
        f"after {report['records'][0]['warmup']} warm-up steps; random gradients; ratios to "
        "`AdamW(fused=True)` of the same run, as median (min-max) "
        + (
            f"over {report['processes']} fresh processes' medians."
            if report.get("processes", 1) > 1
            else "over the rounds (one step of each optimizer per round)."
        ),
        "",
    ]
    for record in report["records"]:
        lines += [
            f"## {record['shape']} ({record['num_params'] / 1e6:.1f}M parameters, "
            f"{record['low_rank_params'] / 1e6:.1f}M in low-rank matrices)",
            "",
            "| optimizer | step (ms) | x fused AdamW | CPU time x fused AdamW | state (MiB) | x fused AdamW "
            "| projection cache (MiB) | step workspace (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in record["results"]:
            lines.append(
                f"| {r['description']} | {r['step_ms_median']:.1f} | {format_spread(r['ratio_spread'])} | "
                f"{r['cpu_ratio_to_adamw_fused']:.2f} | "
                f"{r['state_bytes'] / 2**20:.1f} | {r['state_ratio_to_adamw_fused']:.3f} | "
                f"{r['extra_bytes'] / 2**20:.1f} | {r['workspace_bytes'] / 2**20:.1f} |"
            )
        checks = targets(record)
        if checks:
            lines += [
                "",
                "Targets: "
                + "; ".join(
                    f"{k}: {v['value']:.3f} ({'met' if v['met'] else 'MISSED'}; by CPU time {v['cpu_value']:.3f})"
                    for k, v in checks.items()
                ),
            ]
        lines.append("")
    return "\n".join(lines)


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (either ``--option N`` or ``--option=N``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def across_processes(argv: list[str], processes: int) -> list[dict[str, Any]]:
    """Run the measurement ``processes`` times, each in a fresh interpreter, and merge: each
    contender's ratio is the median of the processes' medians, with their range as its spread."""
    child_args = _without_option(_without_option(argv, "--processes"), "--out")
    runs: list[dict[str, Any]] = []
    for index in range(processes):
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, str(Path(__file__).resolve()), *child_args, "--out", folder]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"process {index + 1}/{processes} failed:\n{done.stderr[-4000:]}")
            runs.append(json.loads((Path(folder) / "optimizer_step.json").read_text()))
        print(f"  process {index + 1}/{processes} done", flush=True)
    merged = []
    for position, record in enumerate(runs[0]["records"]):
        same_shape = [run["records"][position] for run in runs]
        rows = []
        for row_index, row in enumerate(record["results"]):
            per_process = [r["results"][row_index] for r in same_shape]
            rows.append(
                {
                    **row,
                    "step_ms_median": statistics.median(r["step_ms_median"] for r in per_process),
                    "step_ms_all": [t for r in per_process for t in r["step_ms_all"]],
                    "ratio_to_adamw_fused": statistics.median(r["ratio_to_adamw_fused"] for r in per_process),
                    "ratio_spread": spread(r["ratio_to_adamw_fused"] for r in per_process),
                    "step_cpu_ms_median": statistics.median(r["step_cpu_ms_median"] for r in per_process),
                    "cpu_ratio_to_adamw_fused": statistics.median(r["cpu_ratio_to_adamw_fused"] for r in per_process),
                    "cpu_ratio_spread": spread(r["cpu_ratio_to_adamw_fused"] for r in per_process),
                }
            )
        merged_record = {**record, "results": rows, "processes": processes}
        merged_record["targets"] = targets(merged_record)
        merged.append(merged_record)
    return merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["60m", "130m"], choices=[s for s in SIZES if s != "smoke"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=None, help="measure only these contenders (the first is the base)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats, 1 warm-up step (for the test)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for optimizer_step.json and .md")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the parameters live: cpu (default), cuda, cuda:1 ...")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="repeat the whole measurement in N fresh processes (spread across them)",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes {args.processes}: expected at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; run with --device cpu")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device {args.device}: expected cpu or cuda[:index]")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, repeats, warmup = (["smoke"], 2, 1) if args.smoke else (args.shapes, args.repeats, args.warmup)

    report: dict[str, Any] = {
        "benchmark": "optimizer_step",
        "machine": describe_machine(args.device),
        "processes": args.processes,
        "records": [],
    }
    if args.processes > 1:
        report["records"] = across_processes(argv or sys.argv[1:], args.processes)
    else:
        for shape in shapes:
            record = measure(shape, repeats, warmup, args.only, args.device)
            record["targets"] = targets(record)
            report["records"].append(record)
            print(markdown({**report, "records": [record]}), flush=True)
    text = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer_step.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "optimizer_step.md").write_text(text + "\n")
    if args.processes > 1:
        print(text, flush=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
