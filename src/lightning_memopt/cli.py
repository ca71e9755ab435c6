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

import argparse
import difflib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryBase
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import lightning_memopt  # noqa: F401  (registers strategies and optimizer names)
from lightning_memopt.data import TextDataModule
from lightning_memopt.models import CausalLM, WarmupCosineLR
from lightning_memopt.optim.registry import constructor_options, find_optimizer_class

# Imported above so that their short names resolve in YAML (jsonargparse looks among the
# imported subclasses of each argument's type). Optimizer classes' short names (APOLLO,
# APOLLOMini) come from the optimizer registry.
DEFAULT_CLASSES = (CausalLM, TextDataModule, WarmupCosineLR)

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
            "CheckpointOnStop",
            "StepProgressBar",
        ),
    ),
    ("lightning_memopt.strategies", ("ApolloFSDPStrategy",)),
)
# The quickstart, i.e. what ``lightning-memopt fit`` runs with no arguments: the YAML shipped in the
# package (configs/quickstart.yaml in the repository links to it), read once as the parser's defaults.
QUICKSTART_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


def quickstart_defaults() -> dict[str, Any]:
    """The quickstart YAML as parser defaults (``seed_everything``, ``model``, ``data``, ``trainer.<key>``).

    Example:
        >>> quickstart_defaults()["trainer.max_steps"]
        300
    """
    config = yaml.safe_load(QUICKSTART_CONFIG.read_text())
    defaults: dict[str, Any] = {"model": config["model"], "data": config["data"]}
    if "seed_everything" in config:
        defaults["seed_everything"] = config["seed_everything"]
    defaults.update({f"trainer.{key}": value for key, value in config["trainer"].items()})
    return defaults


# Where an option naming a class switches it: jsonargparse keeps the old class's init_args that
# the new class also takes (APOLLO-Mini's rank 1 would stay with APOLLO); see reset_on_class_switch.
CLASS_SWITCH_KEYS = (
    "model.init_args.optimizer",
    "model.init_args.lr_scheduler",
    "model.optimizer",
    "model.lr_scheduler",
)
PROG = "lightning-memopt"


class ConfigError(ValueError):
    """A configuration that parses but cannot train as meant; the message names the field
    and says what to write instead.

    Example:
        >>> str(ConfigError("optimizer: use model.init_args.optimizer"))
        'optimizer: use model.init_args.optimizer'
    """


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(self.starts)


def quiet_known_noise() -> None:
    """Silence the start-up lines a user of the command cannot act on, each at its source;
    every other warning stays visible.

    - Lightning's "Tip: litlogger / litmodels" advertisements (its rank-zero logger).
    - bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community": on CPUs
      with AVX512-BF16 it tries to fetch an optional 4-bit kernel from the Hugging Face hub at
      import; offline it falls back to its own CPU kernel, which is what runs anyway.
    - torch 2.13's deprecation of ``LeafSpec``, which Lightning 2.6 constructs for every
      dataloader (in ``CombinedLoader``); nothing in a user's code causes it.
    - ModelCheckpoint's "The dirpath has changed" on a resume (see the comment below).

    Example:
        >>> quiet_known_noise()
    """
    tips = _DropMessages("\N{ELECTRIC LIGHT BULB} Tip:", "Tip:")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(tips)
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessages) for f in bnb.filters):
        bnb.addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # A bare name that is not a class (a typo such as `optimizer=APOLO`) reaches the model,
    # which refuses it in one line listing the valid names; jsonargparse's warning before it
    # ("Unable to serialize instance APOLO") only repeats the name.
    warnings.filterwarnings("ignore", message=r"\s*Unable to serialize instance [A-Za-z_][\w.]*\s*$")
    # On resume and predict: every run has a folder of its own, so the ModelCheckpoint's
    # folder always "changes"; what it then skips (its top-k bookkeeping) does not matter here.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


def _class_from_name(value: str) -> type | None:
    short = {cls.__name__: cls for cls in DEFAULT_CLASSES}
    if value in short:
        return short[value]
    module_name, _, name = value.rpartition(".")
    if not module_name:
        return None
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if inspect.isclass(found) else None


def _registry_spec(value: str) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` for an optimizer registry name (``apollo_mini``: APOLLOMini
    with the registry's defaults), or None for anything else (layer-wise names included: the
    model explains that a callback drives those)."""
    from lightning_memopt.optim import available_optimizers, get_optimizer_spec

    if value not in available_optimizers():
        return None
    spec = get_optimizer_spec(value)
    if spec.layerwise:
        return None
    try:
        factory = spec.factory
    except ImportError:
        return None  # e.g. bitsandbytes missing: the model reports it with the fix
    if not inspect.isclass(factory):
        return None
    init_args = _default_init_args(factory)
    init_args.update({k: list(v) if isinstance(v, tuple) else v for k, v in spec.defaults.items()})
    return {"class_path": f"{factory.__module__}.{factory.__qualname__}", "init_args": init_args}


def _default_init_args(cls: type) -> dict[str, Any]:
    """The constructor defaults of ``cls`` that a config can hold (JSON values)."""
    defaults: dict[str, Any] = {}
    for name, option in constructor_options(cls).items():
        if name in ("params", "optimizer") or option.default is inspect.Parameter.empty:
            continue
        value = list(option.default) if isinstance(option.default, tuple) else option.default
        try:
            json.dumps(value)
        except TypeError:
            continue
        defaults[name] = value
    return defaults


def reset_on_class_switch(args: list[str]) -> list[str]:
    """Make ``--model.init_args.optimizer=APOLLO`` (and the LR scheduler's) give the new
    class's defaults.

    jsonargparse keeps, on a class change, every init arg of the previous class that the new
    one also accepts: on the quickstart, APOLLO would silently keep APOLLO-Mini's ``rank: 1,
    scale_type: tensor, scale: 128``. Each such option naming a class is rewritten to the class
    with all its constructor defaults spelled out, so nothing carries over; options after it
    (``--model.init_args.optimizer.init_args.rank=64``) still apply. An optimizer registry name
    (``apollo``, ``apollo_mini``, ``adamw``, ``adamw8bit``) becomes its class with the
    registry's defaults, so the saved config names a class; anything else passes through.

    Example:
        >>> out = reset_on_class_switch(["--model.init_args.optimizer=APOLLO", "--trainer.max_steps=5"])
        >>> json.loads(out[0].split("=", 1)[1])["init_args"]["rank"], out[1]
        (256, '--trainer.max_steps=5')
    """
    out: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        key, value = [*arg.split("=", 1), None][:2] if arg.startswith("--") else (arg, None)
        take_next = value is None and key.lstrip("-") in CLASS_SWITCH_KEYS and index + 1 < len(args)
        if take_next:
            value = args[index + 1]
        spec: dict[str, Any] | None = None
        if key.lstrip("-") in CLASS_SWITCH_KEYS and value:
            cls = _class_from_name(value)
            if cls is None and key.lstrip("-").endswith("optimizer") and value[:1].isupper():
                # An optimizer class's short name (APOLLOMini), from the registry. Class names
                # only: a miss loads every registered optimizer, bitsandbytes included (seconds).
                cls = find_optimizer_class(value)
            if cls is not None:
                spec = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _default_init_args(cls)}
            elif key.lstrip("-").endswith("optimizer"):
                spec = _registry_spec(value)
        if spec is None:
            out.append(arg)
            index += 1
            continue
        out.append(f"{key}={json.dumps(spec)}")
        index += 2 if take_next else 1
    return out


def import_short_names() -> None:
    """Import our callbacks and strategies, so that their short names resolve in YAML
    (jsonargparse looks among the imported subclasses of each argument's type).

    Example:
        >>> import_short_names()
    """
    for module_name, names in _SHORT_NAME_PROVIDERS:
        module = importlib.import_module(module_name)
        for name in names:
            getattr(module, name)


def _takes_optimizer_callable(class_path: str | None) -> bool:
    if not class_path:
        return False
    try:
        module_name, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return "optimizer" in constructor_options(cls)


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


def drop_checkpoint_io_for_apollo_fsdp(strategy: Any, plugins: Any) -> Any:
    """``plugins`` without our default ``AtomicCheckpointIO`` when the strategy is ``apollo_fsdp`` /
    ``apollo_hsdp`` (by name or class), which writes atomically itself and which Lightning refuses to
    combine with a checkpoint-IO plugin ("checkpoint_io set through both strategy class and plugins").

    Example:
        >>> atomic = {"class_path": "lightning_memopt.strategies.AtomicCheckpointIO"}
        >>> drop_checkpoint_io_for_apollo_fsdp("apollo_fsdp", [atomic])
        []
        >>> drop_checkpoint_io_for_apollo_fsdp("auto", [atomic]) == [atomic]
        True
    """
    name = strategy if isinstance(strategy, str) else (getattr(strategy, "class_path", None) or "")
    if not (name.startswith(("apollo_fsdp", "apollo_hsdp")) or name.endswith("ApolloFSDPStrategy")):
        return plugins
    if not isinstance(plugins, list):
        return plugins

    def is_atomic(plugin: Any) -> bool:
        class_path = plugin.get("class_path") if isinstance(plugin, dict) else getattr(plugin, "class_path", None)
        return isinstance(class_path, str) and class_path.endswith("AtomicCheckpointIO")

    return [p for p in plugins if not is_atomic(p)]


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
        quiet_known_noise()
        import_short_names()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 1234)
        # Each run writes its own folder (lightning_logs/version_N); refuse to overwrite a
        # config.yaml that is there, i.e. a fixed logger version used twice.
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", "lightning-memopt: memory-efficient training with Lightning.")
        parser_kwargs.setdefault("prog", PROG)
        self._fit_started: float | None = None
        self.exit_code = 0
        model_class = kwargs.pop("model_class", LightningModule)
        datamodule_class = kwargs.pop("datamodule_class", LightningDataModule)
        super().__init__(model_class, datamodule_class, *args, **kwargs)

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # LightningCLI's automatic optimizer / lr_scheduler keys: still parsed (to be refused with
        # the fix, see check_automatic_optimizer), no longer offered in --help.
        for parser in [self.parser, *getattr(self, "_subcommand_parsers", {}).values()]:
            for action in parser._actions:
                if action.dest.split(".")[0] in ("optimizer", "lr_scheduler"):
                    action.help = argparse.SUPPRESS

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults(quickstart_defaults())

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_automatic_optimizer(config)
        config["trainer.callbacks"] = dedupe_our_callbacks(config.get("trainer.callbacks"))
        config["trainer.plugins"] = drop_checkpoint_io_for_apollo_fsdp(
            config.get("trainer.strategy"), config.get("trainer.plugins")
        )
        # A registry name given in a YAML file (the command line's are rewritten before parsing):
        # its class with the registry's defaults, so that the saved config.yaml names a class.
        name = config.get("model.init_args.optimizer")
        spec = _registry_spec(name) if isinstance(name, str) else None
        if spec is not None:
            config["model.init_args.optimizer"] = Namespace(
                class_path=spec["class_path"], init_args=Namespace(**spec["init_args"])
            )

    def instantiate_classes(self) -> None:
        # A value a class refuses (rank=-3, an unknown optimizer name) is a configuration error:
        # one line naming the field, before any log folder exists, not a traceback.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigError(_root_message(err)) from err

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        from lightning.pytorch.callbacks import ModelSummary, ProgressBar

        from lightning_memopt.callbacks import CheckpointOnStop, StepProgressBar

        given = [*(config.get("callbacks") or []), *callbacks]
        ours: list[Any] = []
        if self.subcommand in (None, "fit") and not any(isinstance(c, CheckpointOnStop) for c in given):
            ours.append(CheckpointOnStop())
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            ours.append(StepProgressBar())
        if config.get("enable_model_summary", True) is not False and not any(
            isinstance(c, ModelSummary) for c in given
        ):
            ours.append(CompactModelSummary())
            config["enable_model_summary"] = False  # else Lightning says it skips its own default
        return super()._instantiate_trainer(config, [*callbacks, *ours])

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        stop = _callback(self.trainer, "CheckpointOnStop")
        if self.trainer.is_global_zero:
            print_summary(self.trainer, self.model, self.datamodule, time.perf_counter() - (self._fit_started or 0.0))
        signame = getattr(stop, "stop_signal", None)
        if signame in ("SIGINT", "SIGTERM"):
            # The shell and schedulers read an interrupted run from the exit status (130 / 143).
            self.exit_code = 128 + int(getattr(signal, signame))

    def _warn_without_checkpoint(self) -> None:
        config = self.config[self.subcommand]
        if config.get("ckpt_path") or not self.trainer.is_global_zero:
            return
        model_name = getattr(self.model, "model_name", None)
        if isinstance(model_name, str) and Path(model_name).expanduser().is_dir():
            return  # pretrained weights from a local checkpoint folder
        latest = _latest_checkpoint()
        hint = f" The newest here: --ckpt_path {latest}" if latest else ""
        print(
            f"{PROG}: warning: {self.subcommand} without --ckpt_path runs a freshly initialised model "
            f"(random weights), so its numbers and text mean nothing. Give the checkpoint of a run.{hint}",
            file=sys.stderr,
            flush=True,
        )

    def before_validate(self) -> None:
        self._warn_without_checkpoint()

    def before_test(self) -> None:
        self._warn_without_checkpoint()

    def before_predict(self) -> None:
        self._warn_without_checkpoint()

    def after_predict(self) -> None:
        if self.trainer.is_global_zero:
            write_predictions(self.trainer)


def _root_message(err: BaseException) -> str:
    """The refusal itself, out of jsonargparse's wrapping ("Does not validate against any of the
    Union subtypes ... Errors: - model.optimizer (...): <the refusal>")."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    if "\n" not in text:
        return text
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line:
            return line[2:].split("): ", 1)[-1]
    return text.splitlines()[0]


class CompactModelSummary(ModelSummaryBase):
    """Lightning's model summary in two lines: module, parameters, size, (FLOPs when known).

    Lightning's table prints "FLOPs 0" / "Total FLOPs: 0" for a model without an
    ``example_input_array`` (ours: the input length is the data's), and eleven lines for one
    module; the end-of-fit summary says the rest.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[CompactModelSummary()], accelerator="cpu")
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

        columns = dict(summary_data)
        modules = ", ".join(f"{n} ({t})" for n, t in zip(columns.get("Name", []), columns.get("Type", [])))
        text = (
            f"{modules}: {get_human_readable_count(total_parameters)} params "
            f"({get_human_readable_count(trainable_parameters)} trainable), {model_size:.1f} MB"
        )
        if total_flops:
            text += f", {get_human_readable_count(total_flops)} FLOPs"
        rank_zero_info(text)


def _callback(trainer: Any, name: str) -> Any:
    return next((c for c in trainer.callbacks if type(c).__name__ == name), None)


def _latest_checkpoint(root: str | os.PathLike[str] = "lightning_logs") -> Path | None:
    found = list(Path(root).glob("**/checkpoints/*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def write_predictions(trainer: Any, shown: int = 3) -> Path | None:
    """Write ``predict``'s outputs to ``predictions.jsonl`` in the run's log directory (the
    working directory without a logger), one JSON object per prompt, and print the first few.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> write_predictions(Trainer(logger=False))  # doctest: +SKIP
    """
    rows: list[dict[str, Any]] = []
    pending = list(trainer.predict_loop.predictions or [])  # per batch (per dataloader: a list)
    while pending:
        item = pending.pop(0)
        if isinstance(item, list):
            pending[:0] = item
        elif isinstance(item, dict):
            rows.append(item)
    if not rows:
        return None
    folder = Path(trainer.log_dir) if trainer.loggers and trainer.log_dir else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predictions.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    for row in rows[:shown]:
        text = " ".join(str(row.get("text") or "").split())
        line = f"> {row.get('prompt')}  ->  {text}"
        print(line if len(line) <= 400 else line[:397] + "...")
        if "mean_blocks" in row:
            print(f"  early exits: {row['mean_blocks']} blocks per token on average; exits {row['exits'][:16]}")
    print(f"{PROG}: {len(rows)} predictions in {path}")
    return path


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
    stop = _callback(trainer, "CheckpointOnStop")
    start_step = getattr(stop, "start_step", 0) or 0
    steps = f"{trainer.global_step - start_step} optimizer steps in {_duration(seconds)}{speed}"
    if start_step:
        steps += f" · resumed from step {start_step}, now at {trainer.global_step}"
    rows.append(("steps", steps))
    signame = getattr(stop, "stop_signal", None)
    if signame:
        rows.append(("stopped", f"by {signame} after step {trainer.global_step}"))
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
        if report_path is not None and Path(report_path).exists():
            rows.append(("report", f"{report_path} (+ {Path(report_path).with_suffix('.png').name})"))
    elif report is None:
        rows.append(("memory", "no MemoryProfiler in this run (add --config callbacks/memory_profiler.yaml)"))
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None):
        root = getattr(logger, "root_dir", None) or logger.save_dir
        rows.append(("logs", f"{logger.log_dir}  (tensorboard --logdir {root})"))
    checkpoint = _newest_checkpoint(trainer, stop)
    if checkpoint:
        rows.append(("checkpoint", checkpoint))
        config = (
            Path(logger.log_dir) / "config.yaml" if logger is not None and getattr(logger, "log_dir", None) else None
        )
        again = f"--config {config} " if config is not None and config.exists() else ""
        rows.append(("resume", f"{PROG} fit {again}--ckpt_path {checkpoint}"))
    return rows


def _newest_checkpoint(trainer: Any, stop: Any) -> str:
    """The checkpoint of the latest step this fit saved (ModelCheckpoint's or CheckpointOnStop's)."""
    candidates: list[tuple[int, str]] = []
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path:
            candidates.append((getattr(callback, "_last_global_step_saved", -1), path))
    if getattr(stop, "checkpoint_path", None):
        candidates.append((stop.checkpoint_step, stop.checkpoint_path))
    return max(candidates)[1] if candidates else ""


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
    rows = summary_lines(trainer, model, datamodule, seconds)
    for label, text in rows:
        if label != "resume":
            grid.add_row(label, text)
    Console().print(Panel(grid, title="lightning-memopt: fit finished", expand=False))
    for label, text in rows:
        if label == "resume":
            # Outside the panel and unwrapped, so that it copies as one command.
            print(f"To resume or train on: {text}", flush=True)


def run_cli(args: list[str] | None = None, run: bool = True) -> MemoptCLI:
    """Build (and with ``run=True`` run) the CLI; a :class:`ConfigError` (a value a class
    refuses included) becomes one ``error:`` line and exit status 2, as jsonargparse does for a
    bad YAML, before any log folder is created.

    Example:
        >>> cli = run_cli(["fit", "--trainer.max_steps=2"])  # doctest: +SKIP
        >>> cli.trainer.global_step  # doctest: +SKIP
        2
    """
    if args is None:
        # From the command line: rewritten in place, as LightningCLI warns when it is given
        # both `args` and a command line.
        sys.argv[1:] = reset_on_class_switch(sys.argv[1:])
    else:
        args = reset_on_class_switch(list(args))
    try:
        return MemoptCLI(args=args, run=run)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


SHORT_HELP = """\
usage: lightning-memopt {sub} [--config FILE] [--ckpt_path CKPT] [--KEY=V]

{what}

Options used most (every field of the config can be set the same way):
  --config FILE          an experiment (configs/*.yaml) or a callback fragment
                         (callbacks/*.yaml); repeat it to compose
  --ckpt_path CKPT       {ckpt}
  --print_config         print the whole configuration and exit
  --trainer.accelerator=gpu --trainer.devices=N --trainer.precision=bf16-mixed
  --model.init_args.model_name=NAME
                         tiny, 60m, 130m, 350m, 1b, 7b, or a local HF folder
  --data.init_args.sources=PATH   your own text (a file, folder or dataset)
  --data.init_args.seq_len=N --data.init_args.batch_size=N
{extra}
All options of one class:   --model.help CausalLM     --data.help TextDataModule
                            --model.init_args.optimizer.help APOLLO
All options of {sub} (Lightning's Trainer's included, ~500 lines):
                            lightning-memopt {sub} --help-all
"""
_WHAT = {
    "fit": "Train. With no option: the quickstart (a tiny LLaMA pre-trained with APOLLO-Mini\n"
    "on the CPython docs and standard library; memory report and summary at the end).",
    "validate": "Validation loss of a trained model (give its --ckpt_path).",
    "test": "Test loss of a trained model (give its --ckpt_path).",
    "predict": "Generate text from prompts with a trained model (give its --ckpt_path); writes\n"
    "predictions.jsonl into the run's log folder.",
}
_FIT_EXTRA = """\
  --trainer.max_steps=N  optimizer steps (quickstart: 300)
  --model.init_args.optimizer=NAME
                         apollo, apollo_mini, adamw, adamw8bit (the registry's
                         defaults), or a class with its own defaults: APOLLO,
                         APOLLOMini, torch.optim.AdamW
  --model.init_args.optimizer.init_args.rank=N   (lr, scale, update_proj_gap)
"""
_PREDICT_EXTRA = """\
  --data.init_args.prompts=FILE
                         one prompt per line (or a JSON list of prompts);
                         default: held-out lines of the corpus
  --model.init_args.max_new_tokens=N --model.init_args.temperature=T (0: greedy)
  --model.init_args.top_k=K --model.init_args.exit_threshold=P (early exits)
"""


def short_help(subcommand: str) -> str:
    """The help ``lightning-memopt <subcommand> --help`` prints: our options first, in 80
    columns (``--help-all`` prints jsonargparse's full list).

    Example:
        >>> "--model.help CausalLM" in short_help("fit")
        True
    """
    ckpt = "resume training from a checkpoint" if subcommand == "fit" else "the trained model's checkpoint"
    extra = {"fit": _FIT_EXTRA, "predict": _PREDICT_EXTRA}.get(subcommand, "")
    return SHORT_HELP.format(sub=subcommand, what=_WHAT[subcommand], ckpt=ckpt, extra=extra)


# Every subcommand: LightningCLI's four and our own `estimate` (dispatched in main()).
SUBCOMMANDS = (*_WHAT, "estimate")


def unknown_subcommand_message(name: str) -> str:
    """The error for a mistyped subcommand (80 columns wide), with the closest name and every choice.

    Example:
        >>> print(unknown_subcommand_message("fitt"))
        lightning-memopt: unknown subcommand 'fitt'; did you mean 'fit'? Choose from:
        fit, validate, test, predict, estimate.
    """
    close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return textwrap.fill(f"{PROG}: unknown subcommand '{name}'{hint} Choose from: {', '.join(SUBCOMMANDS)}.", 80)


def main(args: list[str] | None = None) -> None:
    """The ``lightning-memopt`` command (``args`` defaults to ``sys.argv[1:]``).

    Example:
        >>> main(["fit", "--config", "configs/apollo.yaml"])  # doctest: +SKIP
    """
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    # Subcommands of our own (e.g. `estimate`) are dispatched here, before the LightningCLI.
    if args and args[0] == "estimate":
        from lightning_memopt import planner_cli

        code = planner_cli.main(args[1:])
        if code:
            raise SystemExit(code)
        return
    if args and not args[0].startswith("-") and args[0] not in SUBCOMMANDS:
        print(unknown_subcommand_message(args[0]), file=sys.stderr)
        raise SystemExit(2)  # argparse's status for a usage error
    if args and args[0] in ("-h", "--help"):
        print("estimate: memory per device of a run before it runs (lightning-memopt estimate --help)\n")
    if len(args) >= 2 and args[0] in _WHAT and args[1] in ("-h", "--help"):
        print(short_help(args[0]), end="")
        return
    args = ["--help" if arg == "--help-all" else arg for arg in args]
    if from_command_line:
        sys.argv[1:] = args
    cli = run_cli(None if from_command_line else args)
    if cli.exit_code:
        raise SystemExit(cli.exit_code)


if __name__ == "__main__":
    main()
