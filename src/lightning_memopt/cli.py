"""The ``lightning-memopt`` command: a LightningCLI over our models, data, optimizers,
strategies and callbacks.

With no arguments, ``lightning-memopt fit`` trains the embedded default (the quickstart): a
tiny LLaMA on the CPython documentation, with APOLLO-Mini and the memory profiler, on the CPU
in a few minutes, then prints the memory table and a one-screen summary. ``--config`` picks
another experiment (``configs/*.yaml``) and composes callback fragments onto it
(``callbacks/*.yaml``, which append with ``trainer.callbacks+``); any field can be overridden
(``--trainer.max_steps=50``). Our classes have short names in YAML (``class_path: CausalLM``,
``APOLLOMini``, ``MemoryProfiler``, ``ApolloFSDPStrategy``).

Example:
    $ lightning-memopt fit
    $ lightning-memopt fit --config configs/apollo.yaml --config callbacks/layerwise_updates.yaml
    $ python -m lightning_memopt fit --model.init_args.model_name=60m --trainer.max_steps=20
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
import warnings
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import lightning_memopt  # noqa: F401  (registers strategies and optimizer names)
from lightning_memopt.data import TextDataModule
from lightning_memopt.models import CausalLM, WarmupCosineLR
from lightning_memopt.optim import APOLLO, APOLLOMini

# Imported above so that their short names resolve in YAML (jsonargparse looks among the
# imported subclasses of each argument's type).
DEFAULT_CLASSES = (CausalLM, TextDataModule, WarmupCosineLR, APOLLO, APOLLOMini)

# Our callbacks and strategies, imported when present for the same reason.
_SHORT_NAME_PROVIDERS = (
    (
        "lightning_memopt.callbacks",
        (
            "MemoryProfiler",
            "LayerwiseUpdates",
            "ActivationCheckpointing",
            "ActivationOffloading",
            "UpcycleToMoE",
            "EarlyExit",
            "Int8Weights",
        ),
    ),
    ("lightning_memopt.strategies", ("ApolloFSDPStrategy",)),
)
MEMORY_PROFILER = "lightning_memopt.callbacks.MemoryProfiler"

# The quickstart, i.e. what ``lightning-memopt fit`` runs with no arguments. configs/quickstart.yaml
# spells out the same values with comments (tests/test_cli.py checks that the two agree).
QUICKSTART_MODEL: dict[str, Any] = {
    "class_path": "lightning_memopt.models.CausalLM",
    "init_args": {
        "model_name": "tiny",
        "optimizer": {
            "class_path": "lightning_memopt.optim.APOLLOMini",
            "init_args": {"lr": 0.01, "weight_decay": 0.0, "update_proj_gap": 100},
        },
        "lr_scheduler": {
            "class_path": "lightning_memopt.models.WarmupCosineLR",
            "init_args": {"warmup_steps": 0.1, "min_lr_ratio": 0.1},
        },
    },
}
QUICKSTART_DATA: dict[str, Any] = {
    "class_path": "lightning_memopt.data.TextDataModule",
    "init_args": {
        "sources": ["pydoc", "stdlib"],
        "tokenizer": "bpe",
        "bpe_vocab_size": 2048,
        "seq_len": 128,
        "batch_size": 16,
    },
}
QUICKSTART_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "max_steps": 300,
    "val_check_interval": 100,
    "check_val_every_n_epoch": None,
    "limit_val_batches": 20,
    "log_every_n_steps": 10,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": ".", "name": "lightning_logs"},
    },
}
QUICKSTART_CALLBACKS: list[dict[str, Any]] = [
    {"class_path": MEMORY_PROFILER, "init_args": {"interval": 50, "report_path": "memopt_reports/memory_report.json"}}
]


class ConfigError(ValueError):
    """A configuration that parses but cannot train as meant; the message names the field
    and says what to write instead.

    Example:
        >>> str(ConfigError("optimizer: use model.init_args.optimizer"))
        'optimizer: use model.init_args.optimizer'
    """


def import_short_names() -> list[str]:
    """Import our callbacks and strategies, so their short names resolve in YAML; returns the
    names that cannot be imported in this install.

    Example:
        >>> missing = import_short_names()
        >>> isinstance(missing, list)
        True
    """
    missing = []
    for module_name, names in _SHORT_NAME_PROVIDERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing += list(names)
            continue
        for name in names:
            try:
                getattr(module, name)
            except (AttributeError, ImportError):
                missing.append(name)
    return missing


def _takes_optimizer_callable(class_path: str | None) -> bool:
    if not class_path:
        return False
    try:
        module_name, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return "optimizer" in inspect.signature(cls.__init__).parameters


def _uses_fsdp(strategy: Any) -> bool:
    text = strategy.get("class_path", "") if isinstance(strategy, (dict, Namespace)) else str(strategy or "")
    return any(key in text.lower() for key in ("fsdp", "modelparallel", "model_parallel"))


def _yaml_snippet(spec: Any) -> str:
    class_path = spec.get("class_path", "APOLLOMini") if isinstance(spec, (dict, Namespace)) else "APOLLOMini"
    init_args = spec.get("init_args") if isinstance(spec, (dict, Namespace)) else None
    lr = getattr(init_args, "lr", None) if isinstance(init_args, Namespace) else (init_args or {}).get("lr")
    lines = ["  model:", "    init_args:", "      optimizer:", f"        class_path: {class_path}"]
    if lr is not None:
        lines += ["        init_args:", f"          lr: {lr}"]
    return "\n".join(lines)


def check_automatic_optimizer(config: Namespace) -> None:
    """Refuse LightningCLI's top-level ``optimizer:`` / ``lr_scheduler:`` keys where they would
    silently train the wrong thing.

    The CLI builds that optimizer from the model's parameters while it starts, before any
    strategy has sharded the model: under FSDP2 (``apollo_fsdp``) the optimizer then holds
    stale tensors and trains nothing, and for a model that takes its own ``optimizer`` (our
    ``CausalLM``) it would bypass the model's param groups (APOLLO's low-rank split).

    Raises:
        ConfigError: naming the key and showing the ``model.init_args.optimizer`` to write.

    Example:
        >>> check_automatic_optimizer(Namespace(optimizer=None, lr_scheduler=None))
    """
    optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
    if optimizer is None and scheduler is None:
        return
    model = config.get("model")
    model_path = model.get("class_path") if isinstance(model, Namespace) else None
    strategy = config.get("trainer.strategy")
    if not (_takes_optimizer_callable(model_path) or _uses_fsdp(strategy)):
        return  # a model of the user's own without an optimizer argument, unsharded: Lightning's way works
    key = "optimizer" if optimizer is not None else "lr_scheduler"
    example = (
        _yaml_snippet(optimizer)
        if optimizer is not None
        else "  model:\n    init_args:\n      lr_scheduler:\n        class_path: WarmupCosineLR"
    )
    raise ConfigError(
        f"the top-level `{key}:` key (LightningCLI's automatic {key}) is not supported here.\n"
        "The CLI would build it from the model's parameters at start-up, before the strategy shards the model "
        "(under apollo_fsdp / FSDP2 it would train nothing), and bypass the model's own param groups "
        "(APOLLO's low-rank split).\n"
        f"Give it to the model instead, as `model.init_args.{key}` (built in configure_optimizers):\n{example}"
    )


def dedupe_our_callbacks(callbacks: list[Any] | None) -> list[Any] | None:
    """Keep one callback of each of our classes, the last one given, in the first one's place.

    Composing ``--config callbacks/memory_profiler.yaml`` onto a config that already has a
    ``MemoryProfiler`` then re-configures it instead of running two (two layer-wise drivers or
    two checkpointing wrappers would break training). Other classes (two ``ModelCheckpoint``
    with different monitors, say) are left as given.

    Example:
        >>> cbs = [Namespace(class_path="lightning_memopt.callbacks.MemoryProfiler", init_args=Namespace(interval=1)),
        ...        Namespace(class_path="lightning_memopt.callbacks.MemoryProfiler", init_args=Namespace(interval=5))]
        >>> [c.init_args.interval for c in dedupe_our_callbacks(cbs)]
        [5]
    """
    if not callbacks:
        return callbacks
    last: dict[str, Any] = {}
    for callback in callbacks:
        path = callback.get("class_path") if isinstance(callback, (dict, Namespace)) else None
        if path and path.startswith("lightning_memopt."):
            last[path] = callback
    kept, placed = [], set()
    for callback in callbacks:
        path = callback.get("class_path") if isinstance(callback, (dict, Namespace)) else None
        if path in last:
            if path in placed:
                continue
            placed.add(path)
            kept.append(last[path])
        else:
            kept.append(callback)
    return kept


class MemoptCLI(LightningCLI):
    """The LightningCLI behind ``lightning-memopt``: quickstart defaults, short names for our
    classes, callback fragments that compose, a clear refusal of the automatic ``optimizer:``
    key, and a summary at the end of ``fit``.

    Example:
        >>> cli = MemoptCLI(args=["--trainer.max_steps=2"], run=False)  # doctest: +SKIP
        >>> cli.trainer.fit(cli.model, cli.datamodule)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Lightning 2.6 asks torch's pytree in a way torch 2.13 deprecates, once per run: noise
        # in the middle of the progress output that the user can do nothing about.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        self.missing_classes = import_short_names()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 1234)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", "lightning-memopt: memory-efficient training with Lightning.")
        self._fit_started: float | None = None
        model_class = kwargs.pop("model_class", LightningModule)
        datamodule_class = kwargs.pop("datamodule_class", LightningDataModule)
        super().__init__(model_class, datamodule_class, *args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        defaults: dict[str, Any] = {"model": QUICKSTART_MODEL, "data": QUICKSTART_DATA}
        defaults.update({f"trainer.{key}": value for key, value in QUICKSTART_TRAINER.items()})
        profiler = "MemoryProfiler" not in self.missing_classes
        defaults["trainer.callbacks"] = QUICKSTART_CALLBACKS if profiler else []
        parser.set_defaults(defaults)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_automatic_optimizer(config)
        config["trainer.callbacks"] = dedupe_our_callbacks(config.get("trainer.callbacks"))
        if "MemoryProfiler" in self.missing_classes and self.subcommand == "fit":
            rank_zero_info("lightning-memopt: MemoryProfiler is not available in this install; no memory report.")

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print_summary(self.trainer, self.model, self.datamodule, time.perf_counter() - (self._fit_started or 0.0))


def _memory_report(trainer: Any) -> tuple[dict[str, Any] | None, Any]:
    for callback in trainer.callbacks:
        if type(callback).__name__ == "MemoryProfiler":
            tracker = getattr(callback, "tracker", None)
            return getattr(callback, "report", None), getattr(tracker, "report_path", None)
    return None, None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def summary_lines(trainer: Any, model: Any, datamodule: Any, seconds: float) -> list[tuple[str, str]]:
    """The rows of the end-of-fit summary: (label, text).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> rows = summary_lines(Trainer(logger=False), None, None, 1.0)
        >>> [label for label, _ in rows][:2]
        ['steps', 'loss']
    """
    from lightning_memopt.memory import format_bytes

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    rows: list[tuple[str, str]] = []
    tokens_per_s = getattr(model, "tokens_per_second", 0.0)
    speed = f" · {tokens_per_s:,.0f} tokens/s (all devices)" if tokens_per_s else ""
    rows.append(("steps", f"{trainer.global_step} optimizer steps in {_duration(seconds)}{speed}"))
    loss = []
    if "train/loss" in metrics:
        loss.append(f"train {metrics['train/loss']:.3f}")
    if "val/loss" in metrics:
        loss.append(
            f"val {metrics['val/loss']:.3f}" + (f" (ppl {metrics['val/ppl']:.1f})" if "val/ppl" in metrics else "")
        )
    rows.append(("loss", " · ".join(loss) or "-"))
    inner = getattr(model, "model", None)
    if inner is not None:
        n_params = sum(p.numel() for p in inner.parameters())
        name = getattr(model, "model_name", type(inner).__name__)
        optimizer = type(trainer.optimizers[0]).__name__ if trainer.optimizers else "-"
        rows.append(
            (
                "model",
                f"{name} ({n_params / 1e6:.2f}M params) · {optimizer} · {trainer.strategy.__class__.__name__}"
                f" × {trainer.world_size}",
            )
        )
    if isinstance(datamodule, TextDataModule):
        sources = datamodule.sources if isinstance(datamodule.sources, str) else " + ".join(datamodule.sources)
        rows.append(
            (
                "data",
                f"{sources} · {datamodule.tokenizer_name} tokenizer ({datamodule.num_tokens} tokens) · "
                f"blocks of {datamodule.seq_len} × batch {datamodule.batch_size}",
            )
        )
    report, report_path = _memory_report(trainer)
    final = ((report or {}).get("ranks") or [{}])[0].get("final") or {}
    if final:
        opt, base_opt = final.get("optimizer_state_bytes"), final.get("adamw_baseline_optimizer_state_bytes")
        total, base_total = final.get("training_state_bytes"), final.get("adamw_baseline_bytes")
        ratio = final.get("saving_ratio")
        text = f"optimizer state {format_bytes(opt)} (fp32 AdamW: {format_bytes(base_opt)})"
        if total is not None:
            text += f" · params+grads+state {format_bytes(total)} vs {format_bytes(base_total)}"
        if ratio is not None:
            text += f" · saves {100 * ratio:.1f}%"
        rows.append(("memory", text + " per device (table above)"))
        if report_path is not None:
            rows.append(("report", f"{report_path} (+ {report_path.with_suffix('.png').name})"))
    elif report is None:
        rows.append(("memory", "no MemoryProfiler in this run (add --config callbacks/memory_profiler.yaml)"))
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None):
        root = getattr(logger, "root_dir", None) or logger.save_dir
        rows.append(("logs", f"{logger.log_dir}  (tensorboard --logdir {root})"))
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or getattr(
        trainer.checkpoint_callback, "last_model_path", ""
    )
    if checkpoint:
        rows.append(("checkpoint", checkpoint))
    return rows


def print_summary(trainer: Any, model: Any, datamodule: Any, seconds: float) -> None:
    """Print the one-screen summary at the end of ``fit`` (rank 0).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> print_summary(Trainer(logger=False), None, None, 1.0)  # doctest: +SKIP
    """
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, text in summary_lines(trainer, model, datamodule, seconds):
        grid.add_row(label, text)
    Console().print(Panel(grid, title="lightning-memopt: fit finished", expand=False))


def run_cli(args: list[str] | None = None, run: bool = True) -> MemoptCLI:
    """Build (and with ``run=True`` run) the CLI; a :class:`ConfigError` becomes the usual
    ``error:`` line and exit status 2, as jsonargparse does for a bad YAML.

    Example:
        >>> cli = run_cli(["fit", "--trainer.max_steps=2"])  # doctest: +SKIP
        >>> cli.trainer.global_step  # doctest: +SKIP
        2
    """
    try:
        return MemoptCLI(args=args, run=run)
    except ConfigError as err:
        print(f"lightning-memopt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def main(args: list[str] | None = None) -> None:
    """The ``lightning-memopt`` command (``args`` defaults to ``sys.argv[1:]``).

    Example:
        >>> main(["fit", "--config", "configs/apollo.yaml"])  # doctest: +SKIP
    """
    run_cli(args)


if __name__ == "__main__":
    main()
