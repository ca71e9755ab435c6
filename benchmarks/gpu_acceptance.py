"""GPU acceptance in one command: the CUDA paths that a CPU machine cannot exercise, in ~8 minutes.

On a machine with one CUDA GPU this runs, each step in its own process with its own time limit:

1. every test marked ``gpu`` (CUDA memory stats and snapshots, activation offloading, the HF
   Trainer with accelerate's FSDP2, optimizer state on the device);
2. ``optimizer_step.py --device cuda`` on the 60M and 130M shapes: fused AdamW against APOLLO
   rank 256 and APOLLO-Mini;
3. ``memory_recipes.py --device cuda``: fp32 AdamW, checkpointing, activation offloading on vs
   off, APOLLO-Mini and the full recipe, the tensor peak from ``torch.cuda.max_memory_allocated``;
4. ``lightning-memopt fit`` with ``apollo_fsdp`` on one GPU in bf16-mixed;
5. the HF Trainer example (APOLLO-Mini by name) on the GPU in bf16;

then checks the expectations below against what the steps measured and writes one JSON and one
markdown summary. ``--dry-run`` lists the steps and exits (this is what the CPU test runs).

Expectations (a GPU's memory traffic, not its arithmetic, bounds an optimizer step there):

* APOLLO rank 256 step at most 1.5x fused AdamW (60M and 130M);
* APOLLO-Mini step at most 1.0x fused AdamW;
* the full memory recipe's tensor peak at most 1/4 of fp32 AdamW's;
* activation offloading lowers the tensor peak below plain fp32 AdamW's.

Usage::

    python benchmarks/gpu_acceptance.py                 # on a CUDA machine; writes benchmarks/results/gpu_acceptance/
    python benchmarks/gpu_acceptance.py --dry-run       # anywhere: list the steps
    python benchmarks/gpu_acceptance.py --only optimizer_step,memory_recipes --out /tmp/acceptance
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS_DIR = BENCHMARKS / "results" / "gpu_acceptance"
sys.path.insert(0, str(BENCHMARKS))  # the benchmarks' shared helpers
from machine import describe_machine, machine_line  # noqa: E402


@dataclass(frozen=True)
class Step:
    """One command of the acceptance run, with the wall-clock seconds it may take."""

    name: str
    description: str
    command: Callable[[Path], list[str]]
    timeout_s: int
    cwd_is_out: bool = False  # run inside the step's output folder (logs and checkpoints land there)
    env: dict[str, str] = field(default_factory=dict)


def _python(*args: str) -> Callable[[Path], list[str]]:
    return lambda out: [sys.executable, *[a.replace("{out}", str(out)) for a in args]]


STEPS: tuple[Step, ...] = (
    Step(
        "gpu_tests",
        "pytest -m gpu: the tests that need CUDA",
        _python("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")),
        120,
    ),
    Step(
        "optimizer_step",
        "optimizer_step.py --device cuda: fused AdamW vs APOLLO rank 256 and APOLLO-Mini, 60M and 130M",
        _python(
            str(BENCHMARKS / "optimizer_step.py"),
            "--device",
            "cuda",
            "--shapes",
            "60m",
            "130m",
            "--only",
            "adamw_fused",
            "apollo_r256",
            "apollo_mini",
            "--repeats",
            "20",
            "--warmup",
            "3",
            "--out",
            "{out}",
        ),
        75,
    ),
    Step(
        "memory_recipes",
        "memory_recipes.py --device cuda: tensor peak (max_memory_allocated) per recipe, offloading on vs off",
        _python(
            str(BENCHMARKS / "memory_recipes.py"),
            "--device",
            "cuda",
            "--recipes",
            "adamw,adamw_ckpt,adamw_offload,apollo_mini,all",
            "--out",
            "{out}",
        ),
        120,
    ),
    Step(
        "apollo_fsdp_fit",
        "lightning-memopt fit with apollo_fsdp on one GPU, bf16-mixed, 30 steps",
        _python(
            "-m",
            "lightning_memopt",
            "fit",
            "--config",
            str(ROOT / "configs" / "apollo_fsdp.yaml"),
            "--trainer.accelerator=gpu",
            "--trainer.devices=1",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_steps=30",
            "--trainer.val_check_interval=30",
            "--trainer.limit_val_batches=2",
        ),
        90,
        cwd_is_out=True,
    ),
    Step(
        "hf_trainer",
        "HF Trainer example: optim='apollo_mini' on MiniLM, bf16, 20 steps",
        _python(str(ROOT / "examples" / "hf_trainer_apollo.py"), "--steps", "20", "--bf16", "--output-dir", "{out}"),
        75,
    ),
)


def _ratio(record: dict[str, Any], name: str) -> float | None:
    rows = {r["name"]: r for r in record["results"]}
    return rows[name]["ratio_to_adamw_fused"] if name in rows and "adamw_fused" in rows else None


def expectations(out: Path) -> list[dict[str, Any]]:
    """Each expectation with the value measured, its bound and whether it held (``None``: not measured)."""
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float) -> None:
        checks.append(
            {"expectation": name, "value": value, "bound": bound, "met": None if value is None else value <= bound}
        )

    step_file = out / "optimizer_step" / "optimizer_step.json"
    records = json.loads(step_file.read_text())["records"] if step_file.exists() else []
    for shape in ("60m", "130m"):
        record = next((r for r in records if r["shape"] == shape), None)
        add(f"{shape}: APOLLO rank 256 step / fused AdamW <= 1.5", record and _ratio(record, "apollo_r256"), 1.5)
        add(f"{shape}: APOLLO-Mini step / fused AdamW <= 1.0", record and _ratio(record, "apollo_mini"), 1.0)

    recipes_file = out / "memory_recipes" / "memory_recipes.json"
    rows = {r["recipe"]: r for r in json.loads(recipes_file.read_text())["rows"]} if recipes_file.exists() else {}
    base = rows.get("adamw")

    def peak_ratio(recipe: str) -> float | None:
        return rows[recipe]["tensor_peak_bytes"] / base["tensor_peak_bytes"] if base and recipe in rows else None

    add("full recipe tensor peak / fp32 AdamW <= 0.25", peak_ratio("all"), 0.25)
    # Strictly below 1: offloading must move some activations off the GPU.
    add("activation offloading tensor peak / fp32 AdamW < 1", peak_ratio("adamw_offload"), 0.999)
    return checks


def run_step(step: Step, out: Path) -> dict[str, Any]:
    """Run one step to completion or its time limit; keep its output in ``<out>/<step>.log``."""
    folder = out / step.name
    folder.mkdir(parents=True, exist_ok=True)
    log = out / f"{step.name}.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        try:
            done = subprocess.run(
                step.command(folder),
                cwd=folder if step.cwd_is_out else ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=step.timeout_s,
                env={**os.environ, **step.env},
            )
            status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {step.timeout_s} s"
    seconds = time.perf_counter() - start
    print(f"  {step.name}: {status} in {seconds:.0f} s (log: {log})", flush=True)
    return {"step": step.name, "status": status, "seconds": seconds, "log": str(log)}


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# GPU acceptance",
        "",
        f"Machine: {machine_line(report['machine'])}. Total {report['seconds']:.0f} s.",
        "",
        "| step | status | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} |" for s in report["steps"]]
    lines += ["", "| expectation | measured | verdict |", "|---|---:|---|"]
    for check in report["expectations"]:
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        verdict = {None: "not measured", True: "met", False: "MISSED"}[check["met"]]
        lines.append(f"| {check['expectation']} | {value} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit (works without a GPU)")
    names = [s.name for s in STEPS]
    parser.add_argument("--only", default=None, help=f"comma-separated steps, from: {', '.join(names)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the summary, logs and results")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; choose from {', '.join(names)}")
    steps = [s for s in STEPS if s.name in chosen]

    if args.dry_run:
        total = sum(s.timeout_s for s in steps)
        print(f"GPU acceptance: {len(steps)} steps, at most {total} s in all; results in {args.out}")
        for index, step in enumerate(steps, 1):
            print(f"{index}. {step.name} (<= {step.timeout_s} s): {step.description}")
            print("   $ " + " ".join(step.command(args.out / step.name)))
        return 0

    import torch

    if not torch.cuda.is_available():
        parser.error("torch sees no CUDA device here: run this on a GPU machine, or --dry-run to list the steps")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = [run_step(step, args.out) for step in steps]
    report = {
        "benchmark": "gpu_acceptance",
        "machine": describe_machine("cuda"),
        "seconds": time.perf_counter() - start,
        "steps": results,
        "expectations": expectations(args.out),
    }
    (args.out / "gpu_acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render_markdown(report)
    (args.out / "gpu_acceptance.md").write_text(text)
    print(text)
    failed = [s for s in results if s["status"] != "passed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
