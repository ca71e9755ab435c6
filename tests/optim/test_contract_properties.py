"""The optimizer contract as properties (hypothesis): random models, random resumes.

1. Any model (matrix and vector shapes, empty ones included; low-rank, AdamW and mixed groups;
   ranks, scale types, limiters, projection gaps; float32/float64/bfloat16, mixed) stepped,
   saved (``torch.save``, ``torch.load(weights_only=True)``), and resumed into a fresh optimizer
   continues bit for bit as the run that never stopped.
2. Any resume into another model (shapes changed, parameters reordered, dtypes changed, groups
   resized) either fits, and then loads and steps, or is refused with a ``ValueError`` that
   leaves the optimizer unchanged; never a crash. Whether it fits is decided here, independently,
   from the shapes alone.

The examples are drawn deterministically (``derandomize``), so CI runs the same cases every
time; ``pytest --hypothesis-show-statistics`` reports how many ran.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_memopt.optim import APOLLO, APOLLOMini, LayerwiseOptimizer

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:APOLLO. rank=.*is larger:UserWarning"),
]

CASES = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
MATRIX = st.tuples(st.integers(0, 9), st.integers(0, 9))  # a 0 makes an empty matrix
VECTOR = st.tuples(st.integers(0, 9))


@st.composite
def groups(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Param groups as data: shapes, dtypes and each group's options."""
    result = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["low_rank", "adamw", "auto"]))
        shape = {"low_rank": MATRIX, "adamw": st.one_of(VECTOR, MATRIX), "auto": st.one_of(VECTOR, MATRIX)}[kind]
        shapes = draw(st.lists(shape, min_size=1, max_size=3))
        group: dict[str, Any] = {
            "low_rank": {"low_rank": True, "adamw": False, "auto": None}[kind],
            "shapes": shapes,
            "dtypes": draw(st.lists(st.sampled_from(DTYPES), min_size=len(shapes), max_size=len(shapes))),
        }
        if kind != "adamw":
            group["rank"] = draw(st.integers(1, 5))
            group["scale_type"] = draw(st.sampled_from(["channel", "tensor"]))
            group["update_proj_gap"] = draw(st.integers(1, 3))
            group["norm_growth_limit"] = draw(st.sampled_from([None, 1.01, 1.5]))
        result.append(group)
    return result


@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "groups": draw(groups()),
        "cls": draw(st.sampled_from([APOLLO, APOLLOMini])),
        "layerwise": draw(st.booleans()),
        "projection_dtype": draw(st.sampled_from([None, "bfloat16"])),
        "cache_projection": draw(st.booleans()),
        "check_finite": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**20)),
        "data_seed": draw(st.integers(0, 2**16)),
    }


def build(model: dict[str, Any], seed: int | None = None) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    generator = torch.Generator().manual_seed(model["data_seed"])
    params, param_groups = [], []
    for group in model["groups"]:
        members = [
            nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
            for shape, dtype in zip(group["shapes"], group["dtypes"])
        ]
        params += members
        param_groups.append({"params": members, **{k: v for k, v in group.items() if k not in ("shapes", "dtypes")}})
    optimizer = model["cls"](
        param_groups,
        lr=1e-2,
        seed=model["seed"] if seed is None else seed,
        projection_dtype=model["projection_dtype"],
        cache_projection=model["cache_projection"],
        check_finite=model["check_finite"],
    )
    return params, (LayerwiseOptimizer(optimizer) if model["layerwise"] else optimizer)


def step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, t: int) -> None:
    """Step ``t``: the same gradients for the same shapes whatever the run (a layer-wise
    optimizer steps, in ``step()``, the parameters that hold a gradient)."""
    generator = torch.Generator().manual_seed(1000 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    optimizer.step()
    optimizer.zero_grad()


def through_disk(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def assert_same(a: Any, b: Any, where: str = "state dict") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@given(model=models(), before=st.integers(1, 3), after=st.integers(1, 3))
@CASES
def test_any_model_resumes_bit_for_bit(model, before, after):
    params, optimizer = build(model)
    for t in range(before + after):
        step(params, optimizer, t)

    first, optimizer_first = build(model)
    for t in range(before):
        step(first, optimizer_first, t)
    saved = through_disk({"params": [p.detach() for p in first], "optimizer": optimizer_first.state_dict()})
    resumed, optimizer_resumed = build(model, seed=model["seed"] + 12345)  # the seeds come from the state
    with torch.no_grad():
        for p, value in zip(resumed, saved["params"]):
            p.copy_(value)
    optimizer_resumed.load_state_dict(saved["optimizer"])
    for t in range(before, before + after):
        step(resumed, optimizer_resumed, t)

    for i, (p, q) in enumerate(zip(resumed, params)):
        assert p.dtype == q.dtype and torch.equal(p, q), f"parameter {i} of shape {tuple(p.shape)}"
    assert_same(optimizer_resumed.state_dict()["state"], optimizer.state_dict()["state"])
    event(f"{sum(len(g['shapes']) for g in model['groups'])} parameters")


@st.composite
def other_models(draw: st.DrawFn, model: dict[str, Any]) -> dict[str, Any]:
    """``model`` changed one of the ways a resume with another configuration changes it."""
    other = copy.deepcopy(model)
    change = draw(st.sampled_from(["dtypes and ranks", "order", "shapes", "sizes"]))
    event(f"changed: {change}")
    for group in other["groups"]:
        shapes, dtypes = group["shapes"], group["dtypes"]
        if change == "dtypes and ranks":  # torch casts to the new dtypes; the saved ranks win: fits
            group["dtypes"] = [draw(st.sampled_from(DTYPES)) for _ in dtypes]
            if "rank" in group:
                group["rank"] = draw(st.integers(1, 5))
        elif change == "order":
            order = draw(st.permutations(range(len(shapes))))
            group["shapes"], group["dtypes"] = [shapes[i] for i in order], [dtypes[i] for i in order]
        elif change == "shapes":  # another shape of the same kind, for some
            group["shapes"] = [draw(MATRIX if len(s) == 2 else VECTOR) if draw(st.booleans()) else s for s in shapes]
        elif draw(st.booleans()):  # a parameter more or fewer
            if len(shapes) > 1 and draw(st.booleans()):
                shapes.pop()
                dtypes.pop()
            else:
                shapes.append(draw(MATRIX))
                dtypes.append(torch.float32)
    return other


def _is_low_rank(group: dict[str, Any], shape: tuple[int, ...]) -> bool:
    return group["low_rank"] if group["low_rank"] is not None else len(shape) == 2


def _moments(group: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
    m, n = shape
    rank = min(group["rank"], m, n)
    return (m, rank) if m >= n else (rank, n)


def fits(saved: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether the state saved for ``saved`` fits ``other``, from the shapes alone: the loaded
    groups keep the saved options (rank, low_rank), as torch's loading does."""
    if len(saved["groups"]) != len(other["groups"]):
        return False
    for group, new in zip(saved["groups"], other["groups"]):
        if len(group["shapes"]) != len(new["shapes"]):
            return False
        for old_shape, new_shape in zip(group["shapes"], new["shapes"]):
            if group["low_rank"] and len(new_shape) != 2:
                return False  # a vector in a low-rank group: refused whatever its state
            if 0 in old_shape:
                continue  # an empty parameter is never stepped: it has no state to misfit
            old_low, new_low = _is_low_rank(group, old_shape), _is_low_rank(group, new_shape)
            if old_low != new_low:
                return False
            if old_low and (0 in new_shape or _moments(group, old_shape) != _moments(group, new_shape)):
                return False
            if not old_low and old_shape != new_shape:
                return False
    return True


@given(model=models(), data=st.data())
@CASES
def test_any_resume_into_another_model_fits_or_is_refused_unchanged(model, data):
    saved_params, saved_optimizer = build(model)
    step(saved_params, saved_optimizer, 0)
    saved = through_disk(saved_optimizer.state_dict())

    other = data.draw(other_models(model))
    params, optimizer = build(other)
    step(params, optimizer, 0)
    before = copy.deepcopy(optimizer.state_dict())
    expected = fits(model, other)
    try:
        optimizer.load_state_dict(saved)
        loaded = True
    except ValueError as err:
        assert "APOLLO" in str(err)
        loaded = False
    event("fits: loaded" if loaded else "does not fit: refused")
    assert loaded == expected, f"load {'accepted' if loaded else 'refused'}, but fits() says {expected}"
    if not loaded:
        assert_same(optimizer.state_dict(), before, "after a refused load")
    # Either way the optimizer steps on (no crash, finite weights).
    step(params, optimizer, 1)
    assert all(torch.isfinite(p).all() for p in params)
