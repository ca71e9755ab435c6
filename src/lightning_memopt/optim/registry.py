"""Optimizers by name, with typed option strings: the one registry every adapter uses.

The Lightning strategies and callbacks, the HF ``TrainingArguments(optim=...)`` names and the
memory estimator all resolve optimizer names here, so a name means the same everywhere.

Example:
    >>> import torch
    >>> from lightning_memopt.optim import create_optimizer, parse_options
    >>> parse_options("apollo", "rank=128,scale=1,scale_type=channel,update_proj_gap=200")
    {'rank': 128, 'scale': 1.0, 'scale_type': 'channel', 'update_proj_gap': 200}
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    >>> create_optimizer("apollo_mini", model, "update_proj_gap=50", lr=1e-3).defaults["rank"]
    1
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .apollo import APOLLO, APOLLOMini
from .param_groups import TargetModules, apollo_param_groups

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# Constructor arguments that are not options a user sets by name.
_NOT_OPTIONS = {"params", "self", "args", "kwargs", "optim_bits"}
# Option strings cannot hold a tuple; "beta1"/"beta2" set the two halves of "betas".
_BETA_KEYS = ("beta1", "beta2")


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry.

    Attributes:
        name: the registry name (``"apollo"``).
        factory: builds the optimizer from params or param groups and keyword options;
            imported lazily when ``factory`` is a zero-argument loader (see ``loader``).
        low_rank: whether a model should be split into low-rank and AdamW groups with
            :func:`apollo_param_groups` (``True`` for the APOLLO family).
        defaults: options this name fixes unless the user overrides them.
        description: one line for listings and error messages.
        layerwise: whether the name asks for layer-wise (in-backward) updates; the
            adapters read it, the optimizer itself is the same class.

    Example:
        >>> spec = OptimizerSpec("my_sgd", lambda: torch.optim.SGD, description="SGD")
        >>> spec.factory is torch.optim.SGD, "momentum" in spec.option_types()
        (True, True)
    """

    name: str
    loader: Callable[[], OptimizerFactory]
    low_rank: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    layerwise: bool = False

    @property
    def factory(self) -> OptimizerFactory:
        return self.loader()

    def option_types(self) -> dict[str, Any]:
        """Option name -> annotated type (or the default's type) from the constructor."""
        factory = self.factory
        target = factory.__init__ if inspect.isclass(factory) else factory
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # third-party code with unresolvable annotations
            hints = {}
        types_: dict[str, Any] = {}
        for name, parameter in inspect.signature(target).parameters.items():
            if name in _NOT_OPTIONS or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if name in hints:
                types_[name] = hints[name]
            elif parameter.default is not inspect.Parameter.empty and parameter.default is not None:
                types_[name] = type(parameter.default)
            else:
                types_[name] = Any
        return types_


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, overwrite: bool = False) -> None:
    """Add a name to the registry.

    Example:
        >>> register_optimizer(OptimizerSpec("sgd_demo", lambda: torch.optim.SGD), overwrite=True)
        >>> "sgd_demo" in available_optimizers()
        True
    """
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"optimizer name {spec.name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[spec.name] = spec


def available_optimizers() -> list[str]:
    """The registered names, sorted.

    Example:
        >>> {"apollo", "apollo_mini", "adamw", "adamw8bit"} <= set(available_optimizers())
        True
    """
    return sorted(_REGISTRY)


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The registry entry for ``name``; a ``ValueError`` listing the valid names otherwise.

    Example:
        >>> get_optimizer_spec("apollo_mini").defaults["rank"]
        1
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer name {name!r}; registered names: {', '.join(available_optimizers())}."
        ) from None


_SCALARS = (bool, int, float)


def _convert(name: str, key: str, raw: str, annotation: Any) -> Any:
    text = raw.strip()
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(annotation) if m is not type(None)]
        if len(members) < len(typing.get_args(annotation)) and text.lower() in ("none", "null"):
            return None
        # Only the members a string can become; `float | Tensor` means a float here.
        scalars = [m for m in members if m in _SCALARS or m is str or m is Any]
        errors = []
        for member in scalars:
            try:
                return _convert(name, key, text, member)
            except ValueError as err:
                errors.append(str(err))
        if errors:
            raise ValueError(errors[0])
        raise ValueError(f"optimizer {name!r}: option {key}={raw!r} cannot be given in an option string.")
    if origin is tuple or annotation is tuple:
        hint = " Set betas with beta1=...,beta2=... instead." if key == "betas" else ""
        raise ValueError(
            f"optimizer {name!r}: option {key}={raw!r} takes a tuple, which an option string cannot hold.{hint}"
        )
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
    except ValueError:
        raise ValueError(f"optimizer {name!r}: option {key}={raw!r} is not a valid {annotation.__name__}.") from None
    return text


def parse_options(name: str, options: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse ``"key=value,key=value"`` (or check a mapping) against ``name``'s options.

    Values are converted to the constructor's types (``int``, ``float``, ``bool``, ``None``);
    ``beta1``/``beta2`` set ``betas``. Unknown keys raise a ``ValueError`` listing the valid ones.

    Example:
        >>> parse_options("apollo", "rank=64, norm_growth_limit=none, beta2=0.95")
        {'rank': 64, 'norm_growth_limit': None, 'betas': (0.9, 0.95)}
    """
    spec = get_optimizer_spec(name)
    if options is None or options == "":
        return {}
    option_types = spec.option_types()
    if isinstance(options, str):
        pairs: list[tuple[str, Any]] = []
        for item in options.split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise ValueError(
                    f"optimizer {name!r}: option {item.strip()!r} is not of the form key=value "
                    "(e.g. 'rank=256,scale=1')."
                )
            key, raw = item.split("=", 1)
            pairs.append((key.strip(), raw))
    else:
        pairs = list(options.items())
    parsed: dict[str, Any] = {}
    betas: list[float] | None = None
    valid = sorted(set(option_types) | ({"beta1", "beta2"} if "betas" in option_types else set()))
    for key, raw in pairs:
        if key in _BETA_KEYS and "betas" in option_types:
            if betas is None:
                betas = list(parsed.get("betas", _default_betas(spec)))
            betas[_BETA_KEYS.index(key)] = _convert(name, key, raw, float) if isinstance(raw, str) else float(raw)
            continue
        if key not in option_types:
            raise ValueError(f"optimizer {name!r} has no option {key!r}; valid options: {', '.join(valid)}.")
        parsed[key] = _convert(name, key, raw, option_types[key]) if isinstance(raw, str) else raw
    if betas is not None:
        parsed["betas"] = tuple(betas)
    return parsed


def _default_betas(spec: OptimizerSpec) -> tuple[float, float]:
    if "betas" in spec.defaults:
        return tuple(spec.defaults["betas"])
    factory = spec.factory
    target = factory.__init__ if inspect.isclass(factory) else factory
    default = inspect.signature(target).parameters["betas"].default
    return tuple(default)


def create_optimizer(
    name: str,
    params_or_model: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    options: str | Mapping[str, Any] | None = None,
    *,
    target_modules: TargetModules = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        name: a registry name (:func:`available_optimizers`).
        params_or_model: a model (split into low-rank and AdamW groups for the APOLLO family
            with :func:`apollo_param_groups`), or parameters / param groups.
        options: an option string (``"rank=256,scale=1"``) or mapping, checked and typed by
            :func:`parse_options`.
        target_modules: for the APOLLO family given a model: which modules are low-rank.
        kwargs: further options (``lr=...``); they win over ``options``.

    Example:
        >>> model = torch.nn.Linear(8, 8)
        >>> type(create_optimizer("adamw", model, lr=1e-3)).__name__
        'AdamW'
    """
    spec = get_optimizer_spec(name)
    merged = {**spec.defaults, **parse_options(name, options), **parse_options(name, kwargs)}
    if isinstance(params_or_model, nn.Module):
        if spec.low_rank:
            params: Any = apollo_param_groups(params_or_model, target_modules)
        else:
            params = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        if target_modules is not None:
            raise ValueError("create_optimizer: target_modules needs a model (nn.Module), not a list of parameters.")
        params = params_or_model
    return spec.factory(params, **merged)


def _bitsandbytes_adamw8bit() -> OptimizerFactory:
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from err
    return AdamW8bit


def _register_builtins() -> None:
    register_optimizer(
        OptimizerSpec(
            "apollo",
            lambda: APOLLO,
            low_rank=True,
            description="APOLLO: rank-256 random projection, channel-wise scaling (arXiv 2412.05270)",
        )
    )
    register_optimizer(
        OptimizerSpec(
            "apollo_mini",
            lambda: APOLLOMini,
            low_rank=True,
            defaults={"rank": 1, "scale_type": "tensor", "scale": 128.0},
            description="APOLLO-Mini: rank 1, tensor-wise scaling, scale 128",
        )
    )
    for base in ("apollo", "apollo_mini"):
        original = _REGISTRY[base]
        register_optimizer(
            OptimizerSpec(
                f"{base}_layerwise",
                original.loader,
                low_rank=True,
                defaults=original.defaults,
                description=f"{original.description}; layer-wise (in-backward) updates",
                layerwise=True,
            )
        )
    register_optimizer(OptimizerSpec("adamw", lambda: torch.optim.AdamW, description="torch.optim.AdamW"))
    register_optimizer(
        OptimizerSpec("adamw8bit", _bitsandbytes_adamw8bit, description="bitsandbytes AdamW8bit (8-bit states)")
    )


_register_builtins()
