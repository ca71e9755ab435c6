"""The optimizer name registry: names, typed option strings, and building optimizers."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from lightning_memopt.optim import (
    APOLLO,
    APOLLOMini,
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_optimizer_spec,
    parse_options,
    register_optimizer,
)
from lightning_memopt.optim import registry as registry_module

# Tiny tensors: one thread is as fast, and robust on a shared machine (see conftest).
pytestmark = pytest.mark.usefixtures("single_thread")


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, 2 * width)
        self.out = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)


class TinyLM(nn.Module):
    def __init__(self, width: int = 8, vocab: int = 20) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([Block(width), Block(width)])
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.layers:
            h = block.norm(h + block.out(torch.relu(block.mlp(block.attn(h)))))
        return self.lm_head(h)


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randint(0, 20, (4, 5))).logsumexp(-1).mean().backward()
    optimizer.step()


# ----------------------------------------------------------------------------- names
def test_builtin_names():
    names = set(available_optimizers())
    assert {"apollo", "apollo_mini", "apollo_layerwise", "apollo_mini_layerwise", "adamw", "adamw8bit"} <= names
    assert available_optimizers() == sorted(available_optimizers())
    assert get_optimizer_spec("apollo").low_rank and not get_optimizer_spec("adamw").low_rank
    layerwise = get_optimizer_spec("apollo_mini_layerwise")
    assert layerwise.layerwise and layerwise.factory is APOLLOMini
    assert dict(layerwise.defaults) == dict(get_optimizer_spec("apollo_mini").defaults)
    assert not get_optimizer_spec("apollo").layerwise


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer name 'apolo'.*apollo, apollo_layerwise"):
        get_optimizer_spec("apolo")
    with pytest.raises(ValueError, match="unknown optimizer name"):
        create_optimizer("apolo", nn.Linear(2, 2))


def test_register_refuses_duplicates_unless_overwrite(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    spec = OptimizerSpec("sgd_test", lambda: torch.optim.SGD, description="SGD")
    register_optimizer(spec)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(spec)
    register_optimizer(OptimizerSpec("sgd_test", lambda: torch.optim.SGD, defaults={"momentum": 0.9}), overwrite=True)
    optimizer = create_optimizer("sgd_test", nn.Linear(2, 2), "lr=0.5,nesterov=true")
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True


def test_each_fact_of_a_builtin_lives_in_its_spec():
    from lightning_memopt.optim.registry import hf_optimizer_names

    assert hf_optimizer_names() == {
        "apollo": "apollo",
        "apollo_mini": "apollo_mini",
        "apollo_layerwise": "apollo_layerwise",
        "apollo_mini_layerwise": "apollo_mini_layerwise",
    }
    layouts = {
        name: get_optimizer_spec(name).layout() for name in ("apollo", "apollo_mini_layerwise", "adamw", "adamw8bit")
    }
    assert layouts == {
        "apollo": "apollo",
        "apollo_mini_layerwise": "apollo",
        "adamw": "adamw",
        "adamw8bit": "adamw8bit",
    }
    defaults = get_optimizer_spec("apollo_mini").option_defaults()
    assert (defaults["rank"], defaults["scale_type"], defaults["lr"]) == (1, "tensor", 1e-3)
    assert "params" not in defaults


def test_constructor_options_is_the_one_signature_reader():
    from lightning_memopt.optim.registry import constructor_options

    options = constructor_options(APOLLO)
    assert "self" not in options and options["params"].default is inspect.Parameter.empty
    assert options["rank"].annotation is int and options["rank"].default == 256
    assert constructor_options(lambda params, lr=0.1, *args, **kwargs: None) == {
        "params": (inspect.Parameter.empty, inspect.Parameter.empty),
        "lr": (inspect.Parameter.empty, 0.1),
    }


def test_spec_checks_its_hf_names_and_state_layout(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    assert OptimizerSpec("sgd_one_hf_name", lambda: torch.optim.SGD, hf_names="sgd_x").hf_names == ("sgd_x",)
    with pytest.raises(ValueError, match="hf_names \\['not a name'\\] must be identifiers"):
        OptimizerSpec("sgd_bad_hf_name", lambda: torch.optim.SGD, hf_names=("not a name",))
    with pytest.raises(ValueError, match="state_layout='lion' is not one the memory estimator knows"):
        OptimizerSpec("lion", lambda: torch.optim.SGD, state_layout="lion")
    with pytest.raises(ValueError, match="already belong to \\['apollo_mini'\\]"):
        register_optimizer(OptimizerSpec("mini_again", lambda: APOLLOMini, hf_names=("apollo_mini",)))
    # Overwriting a name keeps its own HF name.
    register_optimizer(get_optimizer_spec("apollo_mini"), overwrite=True)


def test_find_optimizer_class_by_short_name():
    from lightning_memopt.optim.registry import find_optimizer_class

    assert find_optimizer_class("APOLLO") is APOLLO and find_optimizer_class("APOLLOMini") is APOLLOMini
    assert find_optimizer_class("AdamW") is torch.optim.AdamW
    assert find_optimizer_class("Nope") is None


# ----------------------------------------------------------------------------- options
def test_parse_options_converts_types():
    assert parse_options("apollo", "rank=256,scale=1,scale_type=channel,update_proj_gap=200") == {
        "rank": 256,
        "scale": 1.0,
        "scale_type": "channel",
        "update_proj_gap": 200,
    }
    parsed = parse_options("apollo", " lr = 1e-3 , norm_growth_limit=None, check_finite=false, cache_projection=1,")
    assert parsed == {"lr": 1e-3, "norm_growth_limit": None, "check_finite": False, "cache_projection": True}
    assert isinstance(parse_options("apollo", "scale=2")["scale"], float)
    assert parse_options("apollo", "norm_growth_limit=1.05") == {"norm_growth_limit": 1.05}
    assert parse_options("apollo", "projection_dtype=bfloat16") == {"projection_dtype": "bfloat16"}
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert create_optimizer("apollo", model, "rank=4,projection_dtype=bf16").projection_dtype == torch.bfloat16
    assert parse_options("apollo", None) == {} and parse_options("apollo", "") == {}
    # torch's AdamW annotates lr as `float | Tensor` and fused as `bool | None`
    assert parse_options("adamw", "lr=0.01,fused=true,foreach=none") == {"lr": 0.01, "fused": True, "foreach": None}
    assert parse_options("adamw8bit", "min_8bit_size=16,is_paged=no") == {"min_8bit_size": 16, "is_paged": False}


def test_parse_options_betas():
    assert parse_options("apollo", "beta2=0.95") == {"betas": (0.9, 0.95)}
    assert parse_options("apollo", "beta1=0.8,beta2=0.99") == {"betas": (0.8, 0.99)}
    assert parse_options("adamw", "beta1=0.5") == {"betas": (0.5, 0.999)}
    assert parse_options("apollo", {"beta1": 0.7}) == {"betas": (0.7, 0.999)}
    with pytest.raises(ValueError, match=r"beta1=\.\.\.,beta2=\.\.\."):
        parse_options("apollo", "betas=0.9")


def test_parse_options_rejects_unknown_keys_with_the_valid_ones():
    with pytest.raises(ValueError, match="has no option 'rnak'") as info:
        parse_options("apollo", "rnak=4")
    for valid in ("rank", "scale", "scale_type", "update_proj_gap", "beta1", "beta2", "lr"):
        assert valid in str(info.value)
    with pytest.raises(ValueError, match="has no option 'rank'"):
        parse_options("adamw", {"rank": 4})
    with pytest.raises(ValueError, match="has no option 'params'"):
        parse_options("apollo", "params=1")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ("rank=four", "rank='four' is not a valid int"),
        ("rank=2.5", "not a valid int"),
        ("scale=big", "not a valid float"),
        ("check_finite=maybe", "not a valid bool"),
        ("norm_growth_limit=x", "not a valid float"),
        ("rank", "not of the form key=value"),
    ],
)
def test_parse_options_rejects_bad_values(options, match):
    with pytest.raises(ValueError, match=match):
        parse_options("apollo", options)


def test_parse_options_rejects_bad_value_of_union_annotation():
    with pytest.raises(ValueError, match="lr='abc' is not a valid float"):
        parse_options("adamw", "lr=abc")


# ----------------------------------------------------------------------------- create
def test_create_apollo_from_a_model():
    model = TinyLM()
    optimizer = create_optimizer("apollo", model, "rank=4,scale_type=tensor,update_proj_gap=50", lr=1e-2)
    assert isinstance(optimizer, APOLLO)
    low, rest = optimizer.param_groups
    assert low["low_rank"] is True and rest["low_rank"] is False
    block_weights = {id(m.weight) for b in model.layers for m in (b.attn, b.mlp, b.out)}
    assert {id(p) for p in low["params"]} == block_weights
    assert (low["rank"], low["scale_type"], low["update_proj_gap"], low["lr"]) == (4, "tensor", 50, 1e-2)
    one_step(model, optimizer)


def test_create_apollo_mini_uses_its_presets_and_accepts_overrides():
    optimizer = create_optimizer("apollo_mini", TinyLM(), lr=1e-3)
    assert isinstance(optimizer, APOLLOMini)
    assert (optimizer.defaults["rank"], optimizer.defaults["scale_type"], optimizer.defaults["scale"]) == (
        1,
        "tensor",
        128.0,
    )
    optimizer = create_optimizer("apollo_mini", TinyLM(), "rank=2,scale=64")
    assert (optimizer.defaults["rank"], optimizer.defaults["scale"]) == (2, 64.0)


def test_keyword_options_win_over_the_option_string():
    optimizer = create_optimizer("apollo", TinyLM(), "rank=4,lr=0.1", rank=2)
    assert optimizer.defaults["rank"] == 2 and optimizer.defaults["lr"] == 0.1
    with pytest.raises(ValueError, match="has no option 'rnak'"):
        create_optimizer("apollo", TinyLM(), rnak=2)


def test_create_from_params_and_groups():
    model = TinyLM()
    optimizer = create_optimizer("apollo", model.parameters(), "rank=2")
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["low_rank"] is None
    one_step(model, optimizer)
    # 2-D tensors of an unsaid group get APOLLO (the embedding too), the rest AdamW
    assert optimizer.state[model.embed.weight]["exp_avg"].shape == (20, 2)
    assert optimizer.state[model.layers[0].norm.weight]["exp_avg"].shape == (8,)
    groups = [{"params": [model.lm_head.weight], "low_rank": True, "rank": 3}]
    assert create_optimizer("apollo", groups).param_groups[0]["rank"] == 3
    with pytest.raises(ValueError, match="target_modules needs a model"):
        create_optimizer("apollo", model.parameters(), target_modules="all-linear")


def test_create_with_target_modules():
    model = TinyLM()
    optimizer = create_optimizer("apollo", model, "rank=2", target_modules="all-linear")
    low = optimizer.param_groups[0]["params"]
    assert len(low) == 6 and all(p is not model.lm_head.weight for p in low)
    optimizer = create_optimizer("apollo", model, target_modules=["mlp"], rank=2)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(b.mlp.weight) for b in model.layers}


def test_create_adamw_skips_frozen_params():
    model = TinyLM()
    model.embed.weight.requires_grad_(False)
    optimizer = create_optimizer("adamw", model, "lr=0.01,beta2=0.95,fused=true")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["fused"] is True
    assert all(p is not model.embed.weight for p in optimizer.param_groups[0]["params"])
    one_step(model, optimizer)


def test_create_adamw8bit_runs_on_the_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    optimizer = create_optimizer("adamw8bit", model, "lr=1e-2,min_8bit_size=1024")
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(32, 64)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert losses[-1] < losses[0]
    # 8-bit states for the two large matrices (>= min_8bit_size elements)
    assert optimizer.state[model[0].weight]["state1"].dtype == torch.uint8


def test_adamw8bit_without_bitsandbytes_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("no bitsandbytes here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        create_optimizer("adamw8bit", nn.Linear(4, 4))
