"""Overhead of the memory profiler: the same tiny-LLaMA training loop with it on and off.

One run trains one tiny LLaMA (``transformers.LlamaConfig``, random weights, random tokens)
and alternates segments of ``interval`` optimizer steps with the profiler on and off (the
order flips every repeat), so that the noise of a shared machine falls on both alike. With
the profiler on, the loop calls :class:`lightning_memopt.memory.MemoryTracker` exactly where
the Lightning and HF callbacks do (before the optimizer step and after it); a segment of
``interval`` steps holds one measurement, so the ratio is the overhead at that interval.

Two figures are reported:

- the end-to-end overhead: median on-segment time over median off-segment time, minus 1
  (what a user would see, but at the mercy of timing noise), with the spread of the
  off-segments for scale;
- the profiler's own share: the time spent inside the tracker's calls over the on-segment
  time (precise: the same work timed directly).

Usage::

    python benchmarks/profiler_overhead.py                     # interval 50 (the default), 5 repeats
    python benchmarks/profiler_overhead.py --interval 10 --repeats 11
    python benchmarks/profiler_overhead.py --smoke --out /tmp/x  # seconds, for the test

Writes ``<out>/profiler_overhead.json`` and ``<out>/profiler_overhead.md`` (default
``benchmarks/results``) and prints the table. The final report (JSON, PNG, table), written
once at the end of fit, is timed separately and not part of the per-step figure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_memopt.memory import MemoryTracker
from lightning_memopt.optim import create_optimizer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_INTERVAL = inspect.signature(MemoryTracker).parameters["interval"].default
TARGET = 0.01  # at most 1% of step time

SHAPES: dict[str, dict[str, int]] = {
    # Half the width of the package's "tiny" LLaMA (models/llama.py: hidden 256, MLP 688).
    "tiny": {"hidden": 128, "intermediate": 344, "layers": 4, "heads": 4, "vocab": 512, "seq": 64, "batch": 4},
    "smoke": {"hidden": 32, "intermediate": 64, "layers": 2, "heads": 2, "vocab": 64, "seq": 16, "batch": 2},
}


def build(shape: dict[str, int]) -> torch.nn.Module:
    from lightning_memopt.models import build_llama

    torch.manual_seed(0)
    # The package's LLaMA builder (untied head, no KV cache), resized to this benchmark's shape.
    return build_llama(
        "tiny",
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        max_position_embeddings=shape["seq"],
    )


class TimedTracker:
    """The tracker, with the time spent inside its calls summed up."""

    def __init__(self, tracker: MemoryTracker) -> None:
        self.tracker = tracker
        self.seconds = 0.0

    def call(self, method: str, *args: Any) -> Any:
        start = time.perf_counter()
        result = getattr(self.tracker, method)(*args)
        self.seconds += time.perf_counter() - start
        return result


def run_segment(model, optimizer, batches, steps: int, first_step: int, timed: TimedTracker | None) -> float:
    """``steps`` training steps; with ``timed``, the tracker's hooks as the callbacks call them."""
    start = time.perf_counter()
    for i in range(steps):
        step = first_step + i
        tokens = batches[step % len(batches)]
        model(input_ids=tokens, labels=tokens).loss.backward()
        if timed is not None:
            timed.call("on_gradients", model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if timed is not None:
            timed.call("on_step_end", model, optimizer, step)
    return time.perf_counter() - start


def measure(shape_name: str, interval: int, repeats: int, warmup: int, optimizer_name: str) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    model = build(shape)
    optimizer = create_optimizer(optimizer_name, model, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=generator) for _ in range(8)]
    run_segment(model, optimizer, batches, warmup, 0, None)  # builds the optimizer state, warms the caches

    with tempfile.TemporaryDirectory() as folder:
        tracker = MemoryTracker(interval=interval, report_path=Path(folder) / "memory.json", table=False)
        timed = TimedTracker(tracker)
        timed.call("start", model)
        on, off, hook_share = [], [], []
        on_steps = 0
        for repeat in range(repeats):
            for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                if mode == "on":
                    before = timed.seconds
                    elapsed = run_segment(model, optimizer, batches, interval, on_steps, timed)
                    on_steps += interval
                    on.append(elapsed)
                    hook_share.append((timed.seconds - before) / elapsed)
                else:
                    off.append(run_segment(model, optimizer, batches, interval, 0, None))
        start = time.perf_counter()
        tracker.finish(model, optimizer)
        finish_seconds = time.perf_counter() - start
    records = len(tracker.history)
    # One per on-segment, and finish() measures the last step seen when it was not measured.
    expected = repeats + (1 if interval > 1 else 0)
    assert records == expected, f"expected one measurement per on-segment and the last step, got {records}"

    on_median, off_median = statistics.median(on), statistics.median(off)
    end_to_end = on_median / off_median - 1.0
    share = statistics.median(hook_share)
    return {
        "shape": shape_name,
        "config": shape,
        "num_params": sum(p.numel() for p in model.parameters()),
        "optimizer": optimizer_name,
        "interval": interval,
        "repeats": repeats,
        "step_ms_off": off_median / interval * 1e3,
        "step_ms_on": on_median / interval * 1e3,
        "segment_s_on": on,
        "segment_s_off": off,
        "end_to_end_overhead": end_to_end,
        "off_spread": (max(off) - min(off)) / off_median,
        "profiler_share": share,
        "measurement_ms": share * on_median * 1e3,
        # the same measurement at every step: the worst case, interval 1
        "overhead_at_interval_1": share * on_median / (off_median / interval),
        "finish_s": finish_seconds,
        "target": TARGET,
        "target_met": share <= TARGET,
    }


def markdown(report: dict[str, Any]) -> str:
    r = report["result"]
    machine = report["machine"]
    return "\n".join(
        [
            "# Memory profiler overhead",
            "",
            f"Machine: {machine['cpu']} ({machine['threads']} threads), torch {machine['torch']}. "
            f"Tiny LLaMA ({r['num_params'] / 1e6:.2f}M parameters, batch {r['config']['batch']} x "
            f"{r['config']['seq']} tokens), `{r['optimizer']}`; {r['repeats']} interleaved repeats of "
            f"{r['interval']} steps with the profiler on and off; one measurement per on-segment "
            f"(interval {r['interval']}).",
            "",
            "| step, off (ms) | step, on (ms) | end-to-end overhead | spread of off-segments | "
            "profiler's own share | one measurement (ms) | at interval 1 | target |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {r['step_ms_off']:.2f} | {r['step_ms_on']:.2f} | {100 * r['end_to_end_overhead']:+.2f}% | "
            f"{100 * r['off_spread']:.2f}% | {100 * r['profiler_share']:.3f}% | {r['measurement_ms']:.2f} | "
            f"{100 * r['overhead_at_interval_1']:.2f}% | "
            f"<= {100 * r['target']:.0f}% (own share): {'met' if r['target_met'] else 'MISSED'} |",
            "",
            "End-to-end differences smaller than the spread of the off-segments are timing noise; the "
            "profiler's own share (time inside its calls over the on-segment time) is the precise figure. "
            "'At interval 1' is one measurement per step, the worst case.",
            "",
            f"The end-of-fit report (JSON, PNG) took {r['finish_s']:.2f} s once.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=DEFAULT_INTERVAL, help="steps between measurements")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--optimizer", default="adamw", help="a registry name (default: adamw)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, interval 2, 2 repeats (for the test)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for profiler_overhead.json and .md")
    args = parser.parse_args(argv)
    if args.smoke:
        shape, interval, repeats, warmup = "smoke", 2, 2, 1
    else:
        shape, interval, repeats, warmup = "tiny", args.interval, args.repeats, args.warmup
    report = {
        "benchmark": "profiler_overhead",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "device": "cpu",
        },
        "result": measure(shape, interval, repeats, warmup, args.optimizer),
    }
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profiler_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "profiler_overhead.md").write_text(text + "\n")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
