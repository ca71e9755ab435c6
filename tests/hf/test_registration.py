"""TrainingArguments(optim="apollo") & co.: registration with transformers' private enum and handler table."""

from __future__ import annotations

import copy
import enum
import json
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
from transformers.training_args import OptimizerNames

import lightning_memopt
from lightning_memopt.hf import HF_OPTIMIZER_NAMES, is_registered, register
from lightning_memopt.hf import registration as reg

ROOT = Path(__file__).resolve().parents[2]


def test_names_are_registered_after_import(tmp_path: Path) -> None:
    assert is_registered()
    for name in HF_OPTIMIZER_NAMES:
        args = TrainingArguments(str(tmp_path), optim=name, report_to=[])
        assert args.optim is OptimizerNames(name)
        assert args.optim.value == name and args.optim.name == name.upper()
        assert args.optim in list(OptimizerNames)
        assert getattr(OptimizerNames, name.upper()) is args.optim
        assert _OPTIMIZER_HANDLERS[args.optim].__name__ == f"lightning_memopt_{name}_handler"
    # transformers' own names are untouched
    assert OptimizerNames("adamw_torch") is OptimizerNames.ADAMW_TORCH
    assert TrainingArguments(str(tmp_path), report_to=[]).optim.value.startswith("adamw_torch")


def test_registration_is_idempotent() -> None:
    members = list(OptimizerNames)
    handlers = dict(_OPTIMIZER_HANDLERS)
    register()
    register()
    lightning_memopt.hf.register_on_transformers_import()
    assert list(OptimizerNames) == members
    assert len(OptimizerNames._value2member_map_) == len(members)
    assert set(_OPTIMIZER_HANDLERS) == set(handlers)
    assert OptimizerNames._member_names_.count("APOLLO") == 1


def test_trainer_dispatches_to_our_handler(tmp_path: Path) -> None:
    from hf_helpers import tiny_bert

    from lightning_memopt.optim import APOLLO, APOLLOMini

    model = tiny_bert()
    for name, cls in (("apollo", APOLLO), ("apollo_mini", APOLLOMini)):
        args = TrainingArguments(str(tmp_path), optim=name, report_to=[])
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        assert optimizer_cls is cls and "params" in kwargs


def test_hf_argument_parser_command_line_json_and_yaml(tmp_path: Path) -> None:
    parser = HfArgumentParser(TrainingArguments)
    optim_action = next(a for a in parser._actions if a.dest == "optim")
    assert set(HF_OPTIMIZER_NAMES) <= set(optim_action.choices)

    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "apollo", "--optim_args", "rank=64", "--report_to", "none"]
    )
    assert args.optim is OptimizerNames.APOLLO and args.optim_args == "rank=64"

    settings = {"output_dir": str(tmp_path), "optim": "apollo_mini_layerwise", "optim_args": "update_proj_gap=50"}
    json_file = tmp_path / "args.json"
    json_file.write_text(json.dumps(settings))
    (from_json,) = parser.parse_json_file(str(json_file))
    assert from_json.optim is OptimizerNames.APOLLO_MINI_LAYERWISE

    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text("".join(f"{k}: {v}\n" for k, v in {**settings, "optim": "apollo_layerwise"}.items()))
    (from_yaml,) = parser.parse_yaml_file(str(yaml_file))
    assert from_yaml.optim is OptimizerNames.APOLLO_LAYERWISE

    # and back: to_dict / to_json_string write the plain name, which parses again
    assert json.loads(from_json.to_json_string())["optim"] == "apollo_mini_layerwise"


def test_deepcopy_and_pickle_keep_the_name(tmp_path: Path) -> None:
    args = TrainingArguments(str(tmp_path), optim="apollo_mini", optim_args="rank=2", report_to=[])
    assert copy.deepcopy(args).optim is OptimizerNames.APOLLO_MINI
    restored = pickle.loads(pickle.dumps(args))
    assert restored.optim is OptimizerNames.APOLLO_MINI and restored.optim_args == "rank=2"
    # transformers' own members pickle as before
    assert pickle.loads(pickle.dumps(OptimizerNames.ADAMW_TORCH)) is OptimizerNames.ADAMW_TORCH


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_fresh_processes_both_import_orders_and_unpickling(tmp_path: Path) -> None:
    """Two fresh interpreters, run side by side."""
    blob = pickle.dumps(TrainingArguments(str(tmp_path), optim="apollo_layerwise", report_to=[]))
    jobs = {
        # lightning_memopt first: transformers is not imported until the user imports it
        "lightning_memopt first": _python(
            """
            import sys, lightning_memopt
            assert "transformers.training_args" not in sys.modules, (
                "import lightning_memopt imported transformers.training_args (about 4 s): keep it lazy"
            )
            from transformers import HfArgumentParser, TrainingArguments
            assert TrainingArguments("o", optim="apollo", report_to=[]).optim.value == "apollo"
            from transformers import Trainer  # the handler table loads with the Trainer
            from lightning_memopt.hf import is_registered
            assert is_registered()
            """
        ),
        # transformers first; then a pickled TrainingArguments unpickles although lightning_memopt
        # was never imported (spawned workers): unpickling imports and registers it
        "transformers first, unpickle": _python(
            """
            import pickle, sys
            from transformers import TrainingArguments
            args = pickle.loads(sys.stdin.buffer.read())
            assert args.optim.value == "apollo_layerwise" and "lightning_memopt" in sys.modules
            from lightning_memopt.hf import is_registered
            assert is_registered()
            assert TrainingArguments("o", optim="apollo_mini", report_to=[]).optim.value == "apollo_mini"
            """
        ),
    }
    jobs["transformers first, unpickle"].stdin.write(blob)
    for job in jobs.values():
        job.stdin.close()
    failures = {}
    for label, job in jobs.items():
        job.wait(timeout=240)
        if job.returncode != 0:
            failures[label] = job.stderr.read().decode()[-2000:]
    assert not failures, failures


def test_the_switch_turns_automatic_registration_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_register() -> None:
        raise AssertionError("registered although the switch is off")

    monkeypatch.setattr(reg, "register_names", must_not_register)
    monkeypatch.setattr(reg, "register_handlers", must_not_register)
    finders = list(sys.meta_path)
    for off in ("0", "false", "no", "off"):
        monkeypatch.setenv(reg.ENV_SWITCH, off)
        reg.register_on_transformers_import()
    assert sys.meta_path == finders
    monkeypatch.setenv(reg.ENV_SWITCH, "1")
    with pytest.raises(AssertionError, match="switch is off"):
        reg.register_on_transformers_import()  # transformers is imported here: it registers at once


# --------------------------------------------------------------------------- internals moved
def _fake_transformers(monkeypatch: pytest.MonkeyPatch, training_args: object, trainer_optimizer: object) -> None:
    monkeypatch.setitem(sys.modules, reg.TRAINING_ARGS_MODULE, training_args)
    monkeypatch.setitem(sys.modules, reg.HANDLERS_MODULE, trainer_optimizer)


def test_moved_enum_fails_with_version_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_transformers(monkeypatch, types.ModuleType("transformers.training_args"), types.ModuleType("x"))
    with pytest.raises(reg.TransformersInternalsChanged) as info:
        register()
    message = str(info.value)
    assert f"transformers {transformers.__version__}" in message
    assert "OptimizerNames does not exist" in message
    assert "optimizer_cls_and_kwargs" in message and reg.ENV_SWITCH in message
    assert isinstance(info.value, ImportError)


def test_moved_handler_table_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeNames(str, enum.Enum):
        ADAMW = "adamw_torch"

    training_args = types.ModuleType("transformers.training_args")
    training_args.OptimizerNames = FakeNames
    _fake_transformers(monkeypatch, training_args, types.ModuleType("transformers.trainer_optimizer"))
    with pytest.raises(reg.TransformersInternalsChanged, match="_OPTIMIZER_HANDLERS"):
        register()
    # the names themselves went in, once, as real members
    assert FakeNames("apollo").name == "APOLLO" and [m.value for m in FakeNames][-4:] == list(HF_OPTIMIZER_NAMES)


def test_name_clash_with_transformers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class FutureNames(str, enum.Enum):
        ADAMW = "adamw_torch"
        APOLLO = "apollo"  # a future transformers with its own "apollo"

    training_args = types.ModuleType("transformers.training_args")
    training_args.OptimizerNames = FutureNames
    _fake_transformers(monkeypatch, training_args, types.ModuleType("transformers.trainer_optimizer"))
    with pytest.raises(reg.TransformersInternalsChanged, match="now defines the optimizer name 'apollo' itself"):
        register()


def test_enum_that_is_not_an_enum_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    training_args = types.ModuleType("transformers.training_args")
    training_args.OptimizerNames = type("OptimizerNames", (), {})
    _fake_transformers(monkeypatch, training_args, types.ModuleType("x"))
    with pytest.raises(reg.TransformersInternalsChanged, match="no longer an Enum"):
        register()
