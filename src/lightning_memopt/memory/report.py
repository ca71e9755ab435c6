"""The memory report: a JSON document (one entry per rank), a terminal table and a PNG plot.

JSON layout (``schema`` = :data:`REPORT_SCHEMA`)::

    {"schema": "lightning_memopt.memory_report/1", "interval": 50, "world_size": 2,
     "ranks": [{"rank": 0, "world_size": 2, "host": "node-a", "device": "cuda:0",
                "peak_source": "cuda_allocator", "peak_resettable": true, "notes": [...],
                "final": {<record>}, "breakdown": {<MemoryBreakdown.to_dict()>},
                "history": [{<record>}, ...]}, ...]}

A record is one measurement, with the keys of :data:`RECORD_KEYS` (all integers but the
ratios, which are floats or null); the logged metric names are the same keys prefixed with
``memory/`` (``step`` is not a metric). ``training_state_bytes`` is params + grads +
optimizer state + projection cache + step workspace (APOLLO's scratch buffers kept between
steps, on the CPU only), what ``adamw_baseline_bytes`` is compared with
(``saving_bytes``, ``saving_ratio`` = saving / baseline); ``static_bytes`` adds the buffers;
``activations_estimate_bytes`` is the interval's peak minus the counted tensors on that
device (and, on the CPU, minus what the process held before training). On CUDA a record also
has ``peak_reserved_bytes``.

Example:
    >>> format_bytes(3 * 1024**2)
    '3.00 MiB'
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPORT_SCHEMA = "lightning_memopt.memory_report/1"
METRIC_PREFIX = "memory/"
# The keys of a record, in the order the table shows them.
RECORD_KEYS = (
    "step",
    "params_bytes",
    "grads_bytes",
    "optimizer_state_bytes",
    "projection_cache_bytes",
    "workspace_bytes",
    "buffers_bytes",
    "static_bytes",
    "training_state_bytes",
    "peak_bytes",
    "cpu_peak_rss_bytes",
    "activations_estimate_bytes",
    "adamw_baseline_bytes",
    "adamw_baseline_params_bytes",
    "adamw_baseline_grads_bytes",
    "adamw_baseline_optimizer_state_bytes",
    "saving_bytes",
    "saving_ratio",
    "params_saving_ratio",
    "grads_saving_ratio",
    "optimizer_state_saving_ratio",
)
_PEAK_LABELS = {"cpu_rss": "process RSS", "cuda_allocator": "CUDA"}
# Stacked in the plot, bottom to top.
_PLOT_CATEGORIES = (
    ("params_bytes", "parameters"),
    ("grads_bytes", "gradients"),
    ("optimizer_state_bytes", "optimizer state"),
    ("projection_cache_bytes", "projection cache"),
    ("workspace_bytes", "step workspace"),
    ("buffers_bytes", "buffers"),
    ("activations_estimate_bytes", "activations (estimate)"),
)


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.50 KiB"``; ``None`` -> ``"-"``.

    Example:
        >>> format_bytes(512), format_bytes(None)
        ('512 B', '-')
    """
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def metrics_from_record(record: Mapping[str, Any], prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """The loggable metrics of a record: numeric values under ``memory/<key>``, nulls left out.

    Example:
        >>> metrics_from_record({"step": 3, "params_bytes": 40, "saving_ratio": None})
        {'memory/params_bytes': 40}
    """
    return {
        prefix + key: value
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def build_report(entries: Sequence[Mapping[str, Any]], interval: int) -> dict[str, Any]:
    """The JSON document from the per-rank entries (sorted by rank).

    Example:
        >>> build_report([{"rank": 0, "history": []}], interval=10)["world_size"]
        1
    """
    ranks = sorted(entries, key=lambda e: e.get("rank", 0))
    return {"schema": REPORT_SCHEMA, "interval": interval, "world_size": len(ranks), "ranks": list(ranks)}


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Write ``report`` as JSON; on failure warn (with the path and the reason) and return ``None``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_report(build_report([], 1), Path(d) / "r.json").name
        'r.json'
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=False))
        tmp.replace(target)
    except (OSError, TypeError, ValueError) as err:
        warnings.warn(
            f"MemoryProfiler: could not write the memory report to {str(target)!r} ({err}); training goes on. "
            "Pass a writable report_path (or report_path=None to turn the files off).",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return target


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render_table(report: Mapping[str, Any]) -> Any:
    """A ``rich.table.Table`` of rank 0's final record against the fp32 AdamW baseline (with a
    column summing all ranks when there are several).

    Example:
        >>> record = {"params_bytes": 40, "adamw_baseline_params_bytes": 40}
        >>> table = render_table(build_report([{"rank": 0, "final": record, "history": []}], 1))
        >>> table.row_count > 0
        True
    """
    from rich import box
    from rich.table import Table

    ranks = list(report.get("ranks", []))
    final = dict(ranks[0].get("final") or {}) if ranks else {}
    several = len(ranks) > 1
    title = f"Memory per device (rank 0 of {len(ranks)})" if several else "Memory per device"
    if final.get("step") is not None:
        # Records count steps from 0 (the first optimizer step); people count from 1.
        title += f", after step {final['step'] + 1}"
    source = ranks[0].get("peak_source", "") if ranks else ""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        caption="AdamW fp32: params and grads in fp32, two fp32 moments per trainable element. "
        "total: params + grads + optimizer state + projection cache + step workspace. "
        "activations: the interval's peak minus the counted tensors.",
    )
    table.add_column("category", no_wrap=True)
    for name in ("measured", "AdamW fp32", "saving", "saved") + (("all ranks",) if several else ()):
        table.add_column(name, justify="right", no_wrap=True)

    # label, measured key, baseline key, saved-ratio key
    rows: list[tuple[str, str, str | None, str | None]] = [
        ("parameters", "params_bytes", "adamw_baseline_params_bytes", "params_saving_ratio"),
        ("gradients", "grads_bytes", "adamw_baseline_grads_bytes", "grads_saving_ratio"),
        (
            "optimizer state",
            "optimizer_state_bytes",
            "adamw_baseline_optimizer_state_bytes",
            "optimizer_state_saving_ratio",
        ),
        ("projection cache", "projection_cache_bytes", None, None),
        ("step workspace", "workspace_bytes", None, None),
        ("buffers", "buffers_bytes", None, None),
        ("total", "training_state_bytes", "adamw_baseline_bytes", "saving_ratio"),
        (f"peak ({_PEAK_LABELS.get(source, source)})", "peak_bytes", None, None),
        ("activations (est.)", "activations_estimate_bytes", None, None),
    ]
    for label, key, base_key, ratio_key in rows:
        measured = final.get(key)
        baseline = final.get(base_key) if base_key else None
        saving = None if measured is None or baseline is None else baseline - measured
        cells = [label, format_bytes(measured)]
        cells += (
            [format_bytes(baseline), format_bytes(saving), _ratio(final.get(ratio_key))] if base_key else ["", "", ""]
        )
        if several:
            cells.append(format_bytes(sum((r.get("final") or {}).get(key) or 0 for r in ranks)))
        if label == "total":
            table.add_section()
        table.add_row(*cells)
    return table


def print_table(report: Mapping[str, Any]) -> None:
    """Print :func:`render_table` to the terminal (rich).

    Example:
        >>> print_table(build_report([], 1))  # doctest: +SKIP
    """
    from rich.console import Console

    Console().print(render_table(report))


def plot_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """A PNG of rank 0's memory by category over steps (stacked, activations on top), with the
    AdamW baseline as a line; on failure warn and return ``None``.

    Example:
        >>> import tempfile
        >>> history = [{"step": s, "params_bytes": 40, "adamw_baseline_bytes": 160} for s in (0, 10)]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     plot_report(build_report([{"rank": 0, "history": history}], 10), Path(d) / "m.png").name
        'm.png'
    """
    ranks = list(report.get("ranks", []))
    history = list(ranks[0].get("history") or []) if ranks else []
    target = Path(path)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(8, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        steps = [r.get("step", i) for i, r in enumerate(history)]
        mib = 1024**2
        layers = [([(r.get(key) or 0) / mib for r in history], label) for key, label in _PLOT_CATEGORIES]
        layers = [(values, label) for values, label in layers if any(values)]
        if steps and layers:
            axes.stackplot(
                steps, *[v for v, _ in layers], labels=[label for _, label in layers], alpha=0.8, step="post"
            )
        if steps:
            # The top of the stack is the peak (less, on the CPU, what the process held before
            # training), so the peak needs no line of its own.
            baseline = [(r.get("adamw_baseline_bytes") or 0) / mib for r in history]
            axes.step(
                steps,
                baseline,
                where="post",
                color="black",
                linestyle="--",
                label="AdamW fp32 baseline (params + grads + state)",
            )
        suffix = f" (rank 0 of {len(ranks)})" if len(ranks) > 1 else ""
        axes.set_title("Memory by category" + suffix)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("MiB")
        axes.grid(alpha=0.3)
        if steps:
            axes.legend(loc="upper left", fontsize="small")
        figure.tight_layout()
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, format="png")
    except Exception as err:  # a plot must never stop training
        warnings.warn(
            f"MemoryProfiler: could not write the memory plot to {str(target)!r} ({err}).", RuntimeWarning, stacklevel=2
        )
        return None
    return target
