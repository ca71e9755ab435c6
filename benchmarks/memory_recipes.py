"""Memory recipes side by side: what each technique saves on one ~100M LLaMA, one batch.

Each row is a recipe, trained for a few steps on the same batch in a fresh Python process
(so that the whole-process peak resident set is that recipe's alone):

==========================  =====================================================================
fp32 AdamW                  ``torch.optim.AdamW(fused=True)``, fp32, nothing else (the baseline)
+ activation checkpointing  the same, every decoder block checkpointed (``policy="full"``)
APOLLO-Mini                 ``APOLLOMini`` (rank 1, tensor-wise scaling); embeddings/head on AdamW
+ layer-wise                APOLLO-Mini with in-backward updates (``LayerwiseOptimizer``)
+ INT8 weights              and the blocks' linear weights in INT8, trained with stochastic
                            rounding (``quantize_linear_weights``)
+ checkpointing, chunked    and every block checkpointed, and the LM head + loss computed 256
  loss                      tokens at a time (``chunked_causal_lm_loss``: no full logits)
all                         and the embeddings' and head's AdamW moments in 8 bits
                            (``APOLLOMini(adamw_8bit=True)``): every technique at once
==========================  =====================================================================

Columns: parameter bytes; gradients (the peak of the live ``.grad`` bytes during backward, from
post-accumulate-grad hooks that run before the optimizer's); optimizer state (after the steps,
:func:`lightning_memopt.memory.breakdown`); activations (bytes allocated by one forward pass and
still alive at its end: :func:`lightning_memopt.layers.checkpointing.measure_activation_bytes`);
the tensor peak (the most tensor bytes alive at once during one profiled training step: params,
optimizer state and everything the step allocates, temporaries inside ops included, from torch's
memory timeline; the CPU analogue of CUDA's ``max_memory_allocated``); the whole-process peak
resident set over the training steps (``VmHWM``, reset once the model is built and read before
the profiled step; glibc's mmap threshold fixed at 64 KiB so that freed tensors leave it), and
that peak minus the resident set before the model was built (the interpreter and libraries: the
same for every row); tokens/s over the timed
steps (after one warm-up step), and the speed ratio by the process's CPU time per step as well
(on a shared machine the wall time depends on the other processes). The target of the full
recipe: peak at most 1/4 of fp32 AdamW's, tokens/s at least 0.6x.

On a GPU (``--device cuda``) the model, batch and optimizer live on the device, the tensor peak is
``torch.cuda.max_memory_allocated`` over one training step, and a row with activation offloading
(``OffloadActivations``: saved activations to pinned host memory) is added beside fp32 AdamW.

Usage::

    python benchmarks/memory_recipes.py                 # ~100M LLaMA (hidden 640, 12 layers, vocab 32000)
    python benchmarks/memory_recipes.py --device cuda   # the same on a GPU, + activation offloading
    python benchmarks/memory_recipes.py --repeats 3     # each recipe in 3 fresh processes: tokens/s spread
    python benchmarks/memory_recipes.py --smoke --out /tmp/x   # a tiny model, seconds (the test)
    python benchmarks/memory_recipes.py --recipes adamw,all --batch 4 --seq 512

Writes ``<out>/memory_recipes.json`` and ``<out>/memory_recipes.md`` (default ``benchmarks/results``).
CPU timings on a shared machine are noisy; the byte columns are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from machine import describe_machine, machine_line, spread  # noqa: E402

PEAK_TARGET, SPEED_TARGET = 0.25, 0.6


@dataclass(frozen=True)
class Recipe:
    """One row: an optimizer (a registry name and its options) and the techniques switched on."""

    label: str
    optimizer: str
    options: str = ""
    layerwise: bool = False
    checkpointing: bool = False
    int8_weights: bool = False
    chunked_loss: bool = False
    offload: bool = False


RECIPES: dict[str, Recipe] = {
    # torch's fastest AdamW on the CPU (its default there is the slower per-tensor loop).
    "adamw": Recipe("fp32 AdamW", "adamw", "fused=true"),
    "adamw_ckpt": Recipe("+ activation checkpointing", "adamw", "fused=true", checkpointing=True),
    # Only where activations live on a GPU (on the CPU, offloading does nothing): --device cuda.
    "adamw_offload": Recipe("+ activation offloading", "adamw", "fused=true", offload=True),
    "apollo_mini": Recipe("APOLLO-Mini", "apollo_mini"),
    "apollo_mini_layerwise": Recipe("+ layer-wise", "apollo_mini", layerwise=True),
    "int8": Recipe("+ INT8 weights", "apollo_mini", layerwise=True, int8_weights=True),
    "int8_ckpt": Recipe(
        "+ checkpointing, chunked loss",
        "apollo_mini",
        layerwise=True,
        int8_weights=True,
        checkpointing=True,
        chunked_loss=True,
    ),
    "all": Recipe(
        "all (+ 8-bit embedding/head state)",
        "apollo_mini",
        "adamw_8bit=true",
        layerwise=True,
        int8_weights=True,
        checkpointing=True,
        chunked_loss=True,
    ),
}
CPU_ONLY_SKIPS = ("adamw_offload",)
# Tokens per chunk of the LM head + loss: 256 x 32000 fp32 logits are 31 MiB, against 250 MiB for
# the whole 8 x 256 batch.
LOSS_CHUNK_TOKENS = 256

SHAPES: dict[str, dict[str, int]] = {
    # ~100M parameters: 59.5M in the blocks, 41M in the embeddings and the untied LM head; a size
    # between the APOLLO paper's "60m" and "130m" (models/llama.py LLAMA_SIZES), 10 heads of 64.
    "100m": {
        "hidden": 640,
        "intermediate": 1728,
        "layers": 12,
        "heads": 10,
        "vocab": 32000,
        "seq": 256,
        "batch": 8,
        "steps": 2,
    },
    "smoke": {
        "hidden": 32,
        "intermediate": 64,
        "layers": 2,
        "heads": 2,
        "vocab": 64,
        "seq": 16,
        "batch": 2,
        "steps": 1,
    },
}


# ---------------------------------------------------------------------------- one recipe (child process)
def tensor_peak_during(fn: Any) -> int:
    """The most tensor bytes alive at once while ``fn()`` runs (CPU), every tensor it touches
    included (parameters, optimizer state, activations, gradients, temporaries).

    From torch's memory timeline (``torch.profiler`` with ``profile_memory``, ``record_shapes``
    and ``with_stack``; ``export_memory_timeline``), which follows every allocation and free,
    including the temporaries an op allocates and frees inside itself: the CPU analogue of
    ``torch.cuda.max_memory_allocated``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA in favour of snapshots
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(by_category) for by_category in sizes)


def tensor_peak_cuda_during(fn: Any, device: str) -> int:
    """``torch.cuda.max_memory_allocated`` while ``fn()`` runs: every tensor alive on the GPU."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def run_recipe(name: str, shape: dict[str, int], device: str = "cpu") -> dict[str, Any]:
    """Train ``shape["steps"]`` timed steps (after one warm-up) with recipe ``name`` on ``device``;
    measure it."""
    import bitsandbytes  # noqa: F401  (imported by every row, so that "before the model" is the same)
    import torch

    from lightning_memopt.layers import OffloadActivations, apply_activation_checkpointing, chunked_causal_lm_loss
    from lightning_memopt.layers.checkpointing import measure_activation_bytes
    from lightning_memopt.memory import PeakMemory, breakdown
    from lightning_memopt.memory.peak import current_rss_bytes
    from lightning_memopt.models import build_llama
    from lightning_memopt.optim import LayerwiseOptimizer, create_optimizer
    from lightning_memopt.quant import quantize_linear_weights

    rss_before_model = current_rss_bytes()  # the interpreter and every library this script loads

    recipe = RECIPES[name]
    torch.manual_seed(0)
    model = build_llama(
        "tiny",
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=shape["seq"],
    )
    model.to(device)
    if recipe.int8_weights:
        quantize_linear_weights(model)
    if recipe.checkpointing:
        apply_activation_checkpointing(model, policy="full")

    params = list(model.parameters())
    peak_grads = 0

    def track_live_grads(_: torch.Tensor) -> None:
        nonlocal peak_grads
        peak_grads = max(peak_grads, sum(p.grad.nbytes for p in params if p.grad is not None))

    for param in params:  # registered before the layer-wise driver's hooks: they see each gradient alive
        param.register_post_accumulate_grad_hook(track_live_grads)
    optimizer = create_optimizer(recipe.optimizer, model, recipe.options or None, lr=1e-4)
    if recipe.layerwise:
        optimizer = LayerwiseOptimizer(optimizer)

    tokens = torch.randint(
        0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(0)
    ).to(device)

    def forward_loss() -> torch.Tensor:
        if recipe.offload:
            with OffloadActivations():
                return model(input_ids=tokens, labels=tokens).loss
        if not recipe.chunked_loss:
            return model(input_ids=tokens, labels=tokens).loss
        return chunked_causal_lm_loss(model, tokens, chunk_size=LOSS_CHUNK_TOKENS)

    def synchronize() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def train_step() -> float:
        loss = forward_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    # The peak of building the model (INT8: built in fp32, then quantised) stays out of the
    # training peak; it is reported on its own.
    build_peak = PeakMemory("cpu").read()["peak_bytes"]  # not reset yet: the lifetime peak so far
    training_peak = PeakMemory("cpu")
    training_peak.reset()
    if not training_peak.read()["peak_resettable"]:
        raise RuntimeError("memory_recipes needs Linux's resettable peak resident set (/proc/self/clear_refs)")
    train_step()  # warm-up: builds the optimizer state
    times, cpu_times, losses = [], [], []
    for _ in range(shape["steps"]):
        synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(train_step())
        synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    # Read before the measurements below: the profiler's own records are not training memory.
    peak = training_peak.read()["peak_bytes"]

    memory = breakdown(model, optimizer, grads=False)
    if device.startswith("cuda"):
        tensor_peak = tensor_peak_cuda_during(train_step, device)
    else:
        tensor_peak = tensor_peak_during(train_step)
    output, activation_bytes = measure_activation_bytes(forward_loss)
    del output  # dropped without backward: the measurement is not a training step
    step_s, cpu_s = sorted(times)[len(times) // 2], sorted(cpu_times)[len(cpu_times) // 2]
    return {
        "recipe": name,
        "label": recipe.label,
        "device": device,
        "params": sum(p.numel() for p in params),
        "params_bytes": memory.params_bytes,
        "grads_peak_bytes": peak_grads,
        "optimizer_state_bytes": memory.optimizer_state_bytes,
        "activation_bytes": activation_bytes,
        "tensor_peak_bytes": tensor_peak,
        "process_peak_bytes": peak,
        "training_peak_bytes": peak - rss_before_model,
        "build_peak_bytes": build_peak,
        "rss_before_model_bytes": rss_before_model,
        "step_s": step_s,
        "tokens_per_s": shape["batch"] * shape["seq"] / step_s,
        # CPU time of the process per step: on a shared machine, less at the mercy of the others.
        "step_cpu_s": cpu_s,
        "tokens_per_cpu_s": shape["batch"] * shape["seq"] / cpu_s,
        "losses": losses,
    }


# ---------------------------------------------------------------------------- the table (parent process)
def run_in_fresh_process(name: str, shape_name: str, overrides: dict[str, int], device: str = "cpu") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--shape", shape_name]
        command += ["--device", device]
        command += ["--child-out", str(result_file), *(f"--{key}={value}" for key, value in overrides.items())]
        # glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its heap, so
        # the resident set's high-water mark would measure its cache, not the tensors alive at once:
        # a fixed 64 KiB threshold returns every freed tensor's pages (the same for every row).
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"recipe {name!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(result_file.read_text())


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _tokens_per_s(row: dict[str, Any]) -> str:
    between = row.get("tokens_per_s_spread")
    if not between or between["n"] < 2:
        return f"{row['tokens_per_s']:,.0f}"
    return f"{row['tokens_per_s']:,.0f} ({between['min']:,.0f}-{between['max']:,.0f})"


def render_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    base = next((r for r in rows if r.get("recipe") == "adamw"), None)
    lines = [
        f"Model: LLaMA-shaped, {report['shape']['params'] / 1e6:.1f}M parameters (hidden {report['shape']['hidden']}, "
        f"{report['shape']['layers']} layers, vocab {report['shape']['vocab']}), batch {report['shape']['batch']} x "
        f"{report['shape']['seq']} tokens, fp32, {report['device']}; each recipe in a fresh process"
        + (
            f" ({report['repeats']} processes each: tokens/s is their median, range in brackets)."
            if report.get("repeats", 1) > 1
            else "."
        )
        + (f" Machine: {machine_line(report['machine'])}." if "machine" in report else ""),
        "",
        "| recipe | params MiB | grads (peak live) MiB | optimizer state MiB | activations MiB | tensor peak MiB "
        "| vs AdamW | process peak MiB | training peak MiB | vs AdamW | tokens/s | speed vs AdamW "
        "| speed vs AdamW (CPU time) | model build peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        peak_ratio = f"{row['training_peak_bytes'] / base['training_peak_bytes']:.2f}x" if base else "-"
        tensor_ratio = f"{row['tensor_peak_bytes'] / base['tensor_peak_bytes']:.2f}x" if base else "-"
        speed_ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        cpu_ratio = f"{row['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x" if base else "-"
        lines.append(
            f"| {row['label']} | {_mib(row['params_bytes'])} | {_mib(row['grads_peak_bytes'])} "
            f"| {_mib(row['optimizer_state_bytes'])} | {_mib(row['activation_bytes'])} "
            f"| {_mib(row['tensor_peak_bytes'])} | {tensor_ratio} "
            f"| {_mib(row['process_peak_bytes'])} | {_mib(row['training_peak_bytes'])} | {peak_ratio} "
            f"| {_tokens_per_s(row)} | {speed_ratio} | {cpu_ratio} | {_mib(row['build_peak_bytes'])} |"
        )
    full = next((r for r in rows if r.get("recipe") == "all"), None)
    if base and full:
        verdict = report["target"]
        lines += [
            "",
            f"Full recipe vs fp32 AdamW: training peak (the process peak above the "
            f"{_mib(base['rss_before_model_bytes'])} MiB the interpreter and libraries hold) "
            f"{verdict['training_peak_ratio']:.2f}x and tensor peak {verdict['tensor_peak_ratio']:.2f}x "
            f"(target <= {PEAK_TARGET}); whole-process peak {verdict['peak_ratio']:.2f}x; tokens/s "
            f"{verdict['speed_ratio']:.2f}x ({verdict['cpu_speed_ratio']:.2f}x by CPU time; target >= {SPEED_TARGET}). "
            f"Target {'met' if verdict['met'] else 'MISSED'}.",
        ]
    return "\n".join(lines) + "\n"


def target_verdict(base: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """The full recipe against the issue's targets, from the rows of fp32 AdamW and ``all``.

    Peak memory is judged on what training holds: the training peak (the process's peak resident
    set above what the interpreter and libraries held before the model, the same 430 MiB or so in
    every row) and the tensor peak (the CPU analogue of CUDA's ``max_memory_allocated``, the
    figure a GPU user reads). Both must be at most a quarter of AdamW's. The whole-process peak
    is reported beside them: with that constant share of libraries in it, no recipe could halve
    it twice.
    """
    ratios = {
        "peak_ratio": full["process_peak_bytes"] / base["process_peak_bytes"],
        "tensor_peak_ratio": full["tensor_peak_bytes"] / base["tensor_peak_bytes"],
        "training_peak_ratio": full["training_peak_bytes"] / base["training_peak_bytes"],
        "speed_ratio": full["tokens_per_s"] / base["tokens_per_s"],
        "cpu_speed_ratio": full["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
        "peak_target": PEAK_TARGET,
        "speed_target": SPEED_TARGET,
    }
    # On a GPU the process's resident set is host memory (the CUDA context, mostly): the tensor
    # peak (max_memory_allocated) alone is the GPU figure.
    on_cuda = str(full.get("device", "cpu")).startswith("cuda")
    ratios["met"] = (
        (on_cuda or ratios["training_peak_ratio"] <= PEAK_TARGET)
        and ratios["tensor_peak_ratio"] <= PEAK_TARGET
        and ratios["speed_ratio"] >= SPEED_TARGET
    )
    return ratios


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one timed step (seconds)")
    parser.add_argument(
        "--recipes",
        default=None,
        help=f"comma-separated, from: {', '.join(RECIPES)} (default: all; {', '.join(CPU_ONLY_SKIPS)} on CUDA only)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument(
        "--repeats", type=int, default=1, help="fresh processes per recipe; tokens/s is their median (range beside)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown results")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default: the shape's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the shape's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default: the shape's)")
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    shape_name = args.shape or ("smoke" if args.smoke else "100m")
    overrides = {key: getattr(args, key) for key in ("batch", "seq", "steps") if getattr(args, key) is not None}
    shape = {**SHAPES[shape_name], **overrides}
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device}: expected cpu or cuda[:index]")
    if args.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; run with --device cpu")
    if args.child:
        result = run_recipe(args.child, shape, args.device)
        args.child_out.write_text(json.dumps(result))
        return result

    on_cuda = args.device.startswith("cuda")
    default = [n for n in RECIPES if on_cuda or n not in CPU_ONLY_SKIPS]
    names = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else default
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected at least 1")
    rows = []
    for name in names:
        repeats = [run_in_fresh_process(name, shape_name, overrides, args.device) for _ in range(args.repeats)]
        # Bytes are the same in every process; the speed varies with the machine.
        rows.append(
            {
                **repeats[0],
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in repeats),
                "tokens_per_s_spread": spread(r["tokens_per_s"] for r in repeats),
                "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in repeats),
            }
        )
        print(
            f"  {rows[-1]['label']}: peak {_mib(rows[-1]['process_peak_bytes'])} MiB, "
            f"{rows[-1]['tokens_per_s']:,.0f} tokens/s",
            flush=True,
        )

    measured = rows
    report: dict[str, Any] = {
        "benchmark": "memory_recipes",
        "shape": {**shape, "name": shape_name, "params": measured[0]["params"] if measured else 0},
        "device": (
            f"GPU {__import__('torch').cuda.get_device_name(args.device)}"
            if on_cuda
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{__import__('torch').get_num_threads()})"
        ),
        "python": platform.python_version(),
        "machine": describe_machine(args.device),
        "repeats": args.repeats,
        "rows": rows,
    }
    base = next((r for r in measured if r["recipe"] == "adamw"), None)
    full = next((r for r in measured if r["recipe"] == "all"), None)
    if base and full:
        report["target"] = target_verdict(base, full)
    markdown = render_markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_recipes.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "memory_recipes.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
