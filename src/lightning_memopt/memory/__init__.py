"""Memory accounting: exact bytes per category and per device, the AdamW baseline, reports.

Pure PyTorch: the Lightning callback (:class:`lightning_memopt.callbacks.MemoryProfiler`)
and the HF Trainer callback (:class:`lightning_memopt.hf.MemoryProfilerCallback`) are thin
adapters over :class:`MemoryTracker`.

Example:
    >>> import torch
    >>> from lightning_memopt.memory import breakdown, estimate
    >>> model = torch.nn.Linear(16, 16)
    >>> breakdown(model).params_bytes
    1088
    >>> with torch.device("meta"):  # no memory, whatever the size
    ...     big = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False))
    >>> estimate(big, "apollo_mini").parameters[0].state_elements  # 2n + 2
    8194
"""

from .accounting import MemoryBreakdown, ParamMemory, breakdown, gradient_bytes, unwrap_optimizer
from .baseline import AdamWBaseline, CategorySaving
from .estimate import estimate
from .peak import PeakMemory, current_rss_bytes, dump_cuda_snapshot, start_cuda_history
from .report import (
    METRIC_PREFIX,
    RECORD_KEYS,
    REPORT_SCHEMA,
    build_report,
    format_bytes,
    metrics_from_record,
    plot_report,
    print_table,
    render_table,
    write_report,
)
from .tracker import DEFAULT_REPORT_PATH, MemoryTracker

__all__ = [
    "DEFAULT_REPORT_PATH",
    "METRIC_PREFIX",
    "RECORD_KEYS",
    "REPORT_SCHEMA",
    "AdamWBaseline",
    "CategorySaving",
    "MemoryBreakdown",
    "MemoryTracker",
    "ParamMemory",
    "PeakMemory",
    "breakdown",
    "build_report",
    "current_rss_bytes",
    "dump_cuda_snapshot",
    "estimate",
    "format_bytes",
    "gradient_bytes",
    "metrics_from_record",
    "plot_report",
    "print_table",
    "render_table",
    "start_cuda_history",
    "unwrap_optimizer",
    "write_report",
]
