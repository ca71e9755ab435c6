"""What the Trainer builds for optim="apollo" & co.: groups, options, target modules, the public fallback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hf_helpers import tiny_bert, training_args
from transformers import Trainer

from lightning_memopt.hf import HF_OPTIMIZER_NAMES, TrainerLayerwiseOptimizer, optimizer_cls_and_kwargs
from lightning_memopt.hf.layerwise import check_training_arguments
from lightning_memopt.hf.optimizers import decay_parameter_names
from lightning_memopt.optim import APOLLO, APOLLOMini

LAYER = "bert.encoder.layer."
BLOCK_LINEARS = {
    f"{LAYER}{i}.{name}.weight"
    for i in range(2)
    for name in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
}


def build(tmp_path: Path, model: torch.nn.Module | None = None, **overrides) -> tuple[torch.optim.Optimizer, dict]:
    """The optimizer Trainer.create_optimizer() builds, and the model's parameter names."""
    model = model or tiny_bert()
    overrides.setdefault("max_grad_norm", 0.0)
    trainer = Trainer(model=model, args=training_args(tmp_path, **overrides))
    optimizer = trainer.create_optimizer()
    return optimizer, {id(p): n for n, p in model.named_parameters()}


def low_rank_names(optimizer: torch.optim.Optimizer, names: dict) -> set[str]:
    return {names[id(p)] for g in optimizer.param_groups if g["low_rank"] for p in g["params"]}


@pytest.mark.parametrize("name", HF_OPTIMIZER_NAMES)
def test_every_group_honours_the_training_arguments(tmp_path: Path, name: str) -> None:
    model = tiny_bert()
    optimizer, names = build(
        tmp_path,
        model,
        optim=name,
        learning_rate=3e-4,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        weight_decay=0.05,
    )
    layerwise = name.endswith("layerwise")
    assert isinstance(optimizer, TrainerLayerwiseOptimizer) == layerwise
    inner = optimizer.optimizer if layerwise else optimizer
    assert type(inner) is (APOLLOMini if "mini" in name else APOLLO)

    decay = decay_parameter_names(model)
    assert decay == set(Trainer(model=model, args=training_args(tmp_path)).get_decay_parameter_names(model))
    seen = []
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-4 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
        group_names = {names[id(p)] for p in group["params"]}
        expected_decay = 0.05 if group_names <= decay else 0.0
        assert group_names <= decay or not (group_names & decay), "a group mixes decaying and non-decaying params"
        assert group["weight_decay"] == expected_decay
        seen += [names[id(p)] for p in group["params"]]
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert low_rank_names(optimizer, names) == BLOCK_LINEARS  # default: the linears of the repeated blocks
    assert any(g["weight_decay"] == 0.0 for g in optimizer.param_groups)  # biases and LayerNorms
    assert optimizer.param_groups[0]["rank"] == (1 if "mini" in name else 256)


def test_optim_args_are_typed_and_win_over_the_arguments(tmp_path: Path) -> None:
    optimizer, _ = build(
        tmp_path,
        optim="apollo",
        learning_rate=1e-3,
        weight_decay=0.01,
        optim_args="rank=3, scale=2, scale_type=tensor, update_proj_gap=7, norm_growth_limit=none, lr=0.5, "
        "beta2=0.9, weight_decay=0.2, seed=11",
    )
    low_rank = optimizer.param_groups[0]
    assert low_rank["low_rank"]
    assert (low_rank["rank"], low_rank["scale"], low_rank["scale_type"]) == (3, 2.0, "tensor")
    assert (low_rank["update_proj_gap"], low_rank["norm_growth_limit"]) == (7, None)
    assert isinstance(low_rank["rank"], int) and isinstance(low_rank["scale"], float)
    assert all(g["lr"] == 0.5 and g["betas"] == (0.9, 0.9) for g in optimizer.param_groups)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.2, 0.0}
    assert optimizer.seed == 11


@pytest.mark.parametrize(
    ("name", "optim_args", "message"),
    [
        ("apollo", "rank=4,ranks=5", r"has no option 'ranks'; valid options: .*rank.*update_proj_gap"),
        ("apollo_mini", "scale_typ=channel", r"has no option 'scale_typ'; valid options: .*scale_type"),
        ("apollo_layerwise", "gap=3", r"has no option 'gap'.*also take: layerwise_max_grad_norm"),
        ("apollo", "rank=four", r"rank='four' is not a valid int"),
        ("apollo", "scale_type=row", r"unknown scale_type='row'"),
        ("apollo_layerwise", "layerwise_max_grad_norm=-1", r"layerwise_max_grad_norm='-1': use a number > 0"),
    ],
)
def test_bad_optim_args_are_refused_with_the_valid_ones(tmp_path: Path, name: str, optim_args: str, message) -> None:
    with pytest.raises(ValueError, match=message):
        build(tmp_path, optim=name, optim_args=optim_args)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        # a list: exact names, parts of names, or full-match regexes (as transformers reads it)
        (["query", "value"], {f"{LAYER}{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")}),
        ([r"bert\.encoder\.layer\.0\.output\.dense"], {"bert.encoder.layer.0.output.dense"}),
        # a string: a regex matched against the whole module name
        (r".*\.self\.(query|key)", {f"{LAYER}{i}.attention.self.{m}" for i in range(2) for m in ("query", "key")}),
        # "all-linear": every linear layer but the output head (classifier stays AdamW)
        ("all-linear", {n.removesuffix(".weight") for n in BLOCK_LINEARS} | {"bert.pooler.dense"}),
        ("all_linear", {n.removesuffix(".weight") for n in BLOCK_LINEARS} | {"bert.pooler.dense"}),
    ],
)
def test_optim_target_modules(tmp_path: Path, targets, expected: set[str]) -> None:
    optimizer, names = build(tmp_path, optim="apollo_mini", optim_target_modules=targets)
    assert low_rank_names(optimizer, names) == {f"{m}.weight" for m in expected}


def test_optim_target_modules_that_match_nothing(tmp_path: Path) -> None:
    # a string must match the whole name, as in transformers: "query" alone names no module
    with pytest.raises(ValueError, match=r"matched no module with a 2-D weight. Module names look like: bert\."):
        build(tmp_path, optim="apollo", optim_target_modules="query")


def test_public_fallback_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    model = tiny_bert()
    args = training_args(tmp_path, learning_rate=2e-3, weight_decay=0.1, optim_target_modules=["intermediate"])
    trainer = Trainer(
        model=model, args=args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("apollo", model, "rank=4", args=args)
    )
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    assert type(optimizer) is APOLLO
    assert low_rank_names(optimizer, names) == {f"bert.encoder.layer.{i}.intermediate.dense.weight" for i in range(2)}
    assert all(g["lr"] == 2e-3 for g in optimizer.param_groups)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.1, 0.0}
    assert optimizer.param_groups[0]["rank"] == 4

    # keyword overrides win; no TrainingArguments needed for the non-layer-wise names
    cls, kwargs = optimizer_cls_and_kwargs("apollo_mini", model, lr=1e-4, target_modules="all-linear")
    assert cls is APOLLOMini and kwargs["lr"] == 1e-4 and kwargs["rank"] == 1

    # other registry names work too (plain decay / no-decay groups)
    cls, kwargs = optimizer_cls_and_kwargs("adamw", model, args=args)
    assert cls is torch.optim.AdamW and {g["weight_decay"] for g in kwargs["params"]} == {0.1, 0.0}

    with pytest.raises(ValueError, match="pass args=<your TrainingArguments>"):
        optimizer_cls_and_kwargs("apollo_layerwise", model)


def test_layerwise_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0; 1.0 is the TrainingArguments default\) cannot run"):
        build(tmp_path, optim="apollo_layerwise", max_grad_norm=1.0)
    base = {"max_grad_norm": 0.0, "fp16": False, "fsdp": [], "deepspeed": None}
    with pytest.raises(ValueError, match=r"cannot run with fp16=True.*Use bf16=True"):
        check_training_arguments("apollo_layerwise", SimpleNamespace(**{**base, "fp16": True}), {})
    with pytest.raises(ValueError, match=r"does not run under FSDP or DeepSpeed.*use optim='apollo'"):
        check_training_arguments("apollo_layerwise", SimpleNamespace(**{**base, "fsdp": ["full_shard"]}), {})
    # per-parameter clipping is opt-in through optim_args
    optimizer, _ = build(
        tmp_path, optim="apollo_mini_layerwise", max_grad_norm=1.0, optim_args="layerwise_max_grad_norm=0.5"
    )
    assert isinstance(optimizer, TrainerLayerwiseOptimizer) and optimizer.max_grad_norm == 0.5
