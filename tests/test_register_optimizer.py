"""Adding an optimizer is one ``register_optimizer`` call: Python, the HF Trainer, the memory
estimator and the CLI all know the name afterwards, with no other file touched."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_memopt  # noqa: F401  (subscribes the HF adapter to the registry)
from lightning_memopt.optim import APOLLO, OptimizerSpec, create_optimizer, register_optimizer
from lightning_memopt.optim import registry as registry_module

# Two kinds of newcomer: a plain torch optimizer with its own defaults, and an APOLLO preset.
NEWCOMERS = {
    "sgd_nesterov_test": dict(
        spec=OptimizerSpec(
            "sgd_nesterov_test",
            lambda: torch.optim.SGD,
            defaults={"momentum": 0.9, "nesterov": True},
            hf_names=("sgd_nesterov_test",),
            description="SGD with Nesterov momentum 0.9",
        ),
        cls=torch.optim.SGD,
        expected={"momentum": 0.9, "nesterov": True},
    ),
    "apollo_r4_test": dict(
        spec=OptimizerSpec(
            "apollo_r4_test",
            lambda: APOLLO,
            low_rank=True,
            defaults={"rank": 4, "scale_type": "tensor", "update_proj_gap": 50},
            hf_names=("apollo_r4_test",),
            description="APOLLO rank 4, tensor-wise scaling",
        ),
        cls=APOLLO,
        expected={"rank": 4, "scale_type": "tensor", "update_proj_gap": 50},
    ),
}


@pytest.fixture(params=list(NEWCOMERS))
def newcomer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict:
    # A copy of the registry: the name is gone again after the test (transformers' enum keeps
    # the member, whose handler then says the name is no longer registered).
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    entry = NEWCOMERS[request.param]
    register_optimizer(entry["spec"])
    return entry


class Blocks(nn.Module):
    """Embedding, two repeated blocks of two linears, a head: low-rank and AdamW parameters both."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(2))
        self.lm_head = nn.Linear(16, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(x)


def test_python_create_optimizer(newcomer: dict) -> None:
    spec = newcomer["spec"]
    optimizer = create_optimizer(spec.name, Blocks(), lr=0.01)
    assert type(optimizer) is newcomer["cls"]
    assert {k: optimizer.defaults[k] for k in newcomer["expected"]} == newcomer["expected"]
    assert optimizer.defaults["lr"] == 0.01
    assert spec.name in registry_module.available_optimizers()


def test_memory_estimator_equals_a_real_step(newcomer: dict) -> None:
    from lightning_memopt.memory import breakdown, estimate

    name = newcomer["spec"].name
    torch.manual_seed(0)
    model = Blocks()
    with torch.device("meta"):
        meta_model = Blocks()
    optimizer = create_optimizer(name, model, lr=1e-3)
    model(torch.randint(0, 64, (2, 5))).sum().backward()
    optimizer.step()
    real = breakdown(model, optimizer)
    est = estimate(meta_model, name)
    assert est.optimizer_state_bytes == real.optimizer_state_bytes > 0
    assert est.projection_cache_bytes == real.projection_cache_bytes
    assert (est.params_bytes, est.grads_bytes) == (real.params_bytes, real.grads_bytes)


def test_hf_training_arguments_build_it(newcomer: dict, tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from lightning_memopt.hf import is_registered

    spec = newcomer["spec"]
    assert is_registered()  # the new name reached transformers' enum and handler table
    model = Blocks()
    args = TrainingArguments(str(tmp_path), optim=spec.name, learning_rate=0.02, report_to=[], use_cpu=True)
    assert args.optim.value == spec.name
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    assert optimizer_cls is newcomer["cls"]
    params = kwargs.pop("params")
    optimizer = optimizer_cls(params, **kwargs)
    assert optimizer.defaults["lr"] == 0.02  # TrainingArguments' learning rate wins over the defaults
    assert {k: optimizer.defaults[k] for k in newcomer["expected"]} == newcomer["expected"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_hf_name_of_a_later_spec_clashing_with_a_taken_one_is_refused(newcomer: dict) -> None:
    with pytest.raises(ValueError, match="hf_names \\['apollo'\\] already belong to \\['apollo'\\]"):
        register_optimizer(OptimizerSpec("apollo_again_test", lambda: APOLLO, hf_names=("apollo",)))


def test_cli_resolves_the_name(newcomer: dict) -> None:
    from lightning_memopt.cli import reset_on_class_switch, run_cli

    spec = newcomer["spec"]
    (rewritten,) = reset_on_class_switch([f"--model.init_args.optimizer={spec.name}"])
    cls = newcomer["cls"]
    assert f'"class_path": "{cls.__module__}.{cls.__qualname__}"' in rewritten
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli([f"--model.init_args.optimizer={spec.name}", "--trainer.max_steps=1"], run=False)
    config = cli.config.model.init_args.optimizer
    module_name, _, class_name = config.class_path.rpartition(".")
    assert getattr(importlib.import_module(module_name), class_name) is cls  # jsonargparse may shorten the path
    assert {k: config.init_args[k] for k in newcomer["expected"]} == newcomer["expected"]
    optimizer = cli.model.optimizer(list(Blocks().parameters()))
    assert type(optimizer) is cls
