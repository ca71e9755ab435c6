"""Optimizers by name, with typed option strings: the one registry every adapter uses.

The Lightning strategies and callbacks, the CLI, the HF ``TrainingArguments(optim=...)`` names and
the memory estimator all resolve optimizer names here, so a name means the same everywhere. One
:class:`OptimizerSpec` holds every fact about an optimizer: its registry name (Python, YAML and the
CLI's ``--model.init_args.optimizer=NAME``), its ``TrainingArguments(optim=...)`` names
(``hf_names``), its defaults, and its state layout for the memory estimator (``state_layout``).
The constructor's signature is read in one place, :func:`constructor_options`. Adding an optimizer
is one :func:`register_optimizer` call.

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
from typing import Any, NamedTuple

import torch
from torch import nn

from .apollo import APOLLO, APOLLOMini
from .param_groups import TargetModules, apollo_param_groups

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# Constructor arguments that are not options a user sets by name.
_NOT_OPTIONS = {"params", "self", "args", "kwargs", "optim_bits"}
# Option strings cannot hold a tuple; "beta1"/"beta2" set the two halves of "betas".
_BETA_KEYS = ("beta1", "beta2")
# The optimizer-state layouts the memory estimator (lightning_memopt.memory.estimate) can count:
# APOLLO's projected moments, AdamW's two full moments, bitsandbytes' blockwise 8-bit AdamW, and
# SGD's momentum buffer.
STATE_LAYOUTS = ("apollo", "adamw", "adamw8bit", "sgd")
_BNB_8BIT_CLASSES = {"Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"}
_EMPTY = inspect.Parameter.empty


class ConstructorOption(NamedTuple):
    """One named argument of an optimizer's constructor.

    ``annotation`` is the resolved type hint (``inspect.Parameter.empty`` when there is none);
    ``default`` is the default value (``inspect.Parameter.empty`` when the argument is required).

    Example:
        >>> constructor_options(APOLLO)["rank"]
        ConstructorOption(annotation=<class 'int'>, default=256)
    """

    annotation: Any
    default: Any


def constructor_options(factory: Callable[..., Any]) -> dict[str, ConstructorOption]:
    """Every named argument of ``factory``'s constructor (or signature): ``name -> (annotation, default)``.

    The one place that reads an optimizer's signature: option types for option strings, the
    defaults the memory estimator and the HF adapter fill in, and the defaults the CLI spells
    out all come from here. ``self``, ``*args`` and ``**kwargs`` are left out; ``params`` is
    kept (with no default), so callers decide what counts as an option.

    Example:
        >>> options = constructor_options(torch.optim.SGD)
        >>> options["momentum"].default, options["params"].default is inspect.Parameter.empty
        (0, True)
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # third-party code with unresolvable annotations
        hints = {}
    return {
        name: ConstructorOption(hints.get(name, _EMPTY), parameter.default)
        for name, parameter in inspect.signature(target).parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def _infer_state_layout(factory: Any) -> str | None:
    """The state layout of a known optimizer class, for specs that do not declare one."""
    if not inspect.isclass(factory):
        return None
    if issubclass(factory, APOLLO):
        return "apollo"
    if factory in (torch.optim.AdamW, torch.optim.Adam):
        return "adamw"
    if factory is torch.optim.SGD:
        return "sgd"
    if getattr(factory, "__module__", "").startswith("bitsandbytes") and factory.__name__ in _BNB_8BIT_CLASSES:
        return "adamw8bit"
    return None


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
        hf_names: the names ``TrainingArguments(optim=...)`` accepts for it once
            ``lightning_memopt`` is imported (``("apollo",)``); empty: not an HF name.
        state_layout: how the memory estimator counts its state, one of
            :data:`STATE_LAYOUTS`; ``None`` infers it from the optimizer class (APOLLO
            subclasses, torch ``AdamW``/``Adam``/``SGD``, bitsandbytes 8-bit Adam).

    Example:
        >>> spec = OptimizerSpec("my_sgd", lambda: torch.optim.SGD, description="SGD")
        >>> spec.factory is torch.optim.SGD, "momentum" in spec.option_types(), spec.layout()
        (True, True, 'sgd')
    """

    name: str
    loader: Callable[[], OptimizerFactory]
    low_rank: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    layerwise: bool = False
    hf_names: tuple[str, ...] = ()
    state_layout: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "," in self.name:
            raise ValueError(f"OptimizerSpec name {self.name!r} must be a non-empty string without commas.")
        if isinstance(self.hf_names, str):  # a bare string would register each of its letters
            object.__setattr__(self, "hf_names", (self.hf_names,))
        bad = [n for n in self.hf_names if not isinstance(n, str) or not n.isidentifier()]
        if bad:
            raise ValueError(
                f"OptimizerSpec {self.name!r}: hf_names {bad!r} must be identifiers (they become enum members "
                "of transformers' OptimizerNames), e.g. hf_names=('my_opt',)."
            )
        if self.state_layout is not None and self.state_layout not in STATE_LAYOUTS:
            raise ValueError(
                f"OptimizerSpec {self.name!r}: state_layout={self.state_layout!r} is not one the memory estimator "
                f"knows; pick one of {', '.join(STATE_LAYOUTS)}, or leave it None."
            )

    @property
    def factory(self) -> OptimizerFactory:
        return self.loader()

    def option_types(self) -> dict[str, Any]:
        """Option name -> annotated type (or the default's type) from the constructor."""
        types_: dict[str, Any] = {}
        for name, option in constructor_options(self.factory).items():
            if name in _NOT_OPTIONS:
                continue
            if option.annotation is not _EMPTY:
                types_[name] = option.annotation
            elif option.default is not _EMPTY and option.default is not None:
                types_[name] = type(option.default)
            else:
                types_[name] = Any
        return types_

    def option_defaults(self) -> dict[str, Any]:
        """The value of every option when the user sets none: the constructor's defaults, then ``defaults``.

        Example:
            >>> get_optimizer_spec("apollo_mini").option_defaults()["rank"]
            1
        """
        constructor = {
            name: option.default
            for name, option in constructor_options(self.factory).items()
            if name not in _NOT_OPTIONS and option.default is not _EMPTY
        }
        return {**constructor, **self.defaults}

    def layout(self) -> str:
        """The state layout the memory estimator counts: ``state_layout``, or the one the class implies.

        Raises:
            ValueError: when neither says (the message says what to do).

        Example:
            >>> get_optimizer_spec("apollo_mini").layout(), get_optimizer_spec("adamw").layout()
            ('apollo', 'adamw')
        """
        if self.state_layout is not None:
            return self.state_layout
        factory = self.factory
        inferred = _infer_state_layout(factory)
        if inferred is None:
            raise ValueError(
                f"optimizer {self.name!r} ({getattr(factory, '__qualname__', factory)!r}) has no known state "
                f"layout: the estimator knows APOLLO/APOLLO-Mini, torch AdamW/Adam/SGD and bitsandbytes 8-bit Adam. "
                f"Register it with OptimizerSpec(..., state_layout=one of {', '.join(STATE_LAYOUTS)}) if its state "
                "is laid out like one of those; otherwise build the optimizer for real and use "
                "breakdown(model, optimizer) after one step instead."
            )
        return inferred


_REGISTRY: dict[str, OptimizerSpec] = {}
# Adapters that mirror the registry elsewhere (the HF adapter adds hf_names to transformers'
# enum) subscribe here: the core calls them and never imports them.
_LISTENERS: list[Callable[[OptimizerSpec], None]] = []


def register_optimizer(spec: OptimizerSpec, *, overwrite: bool = False) -> None:
    """Add a name to the registry: the one call that makes an optimizer usable everywhere.

    After it, ``create_optimizer(spec.name, ...)``, the CLI's ``--model.init_args.optimizer=NAME``,
    ``estimate(model, NAME)`` and, for each of ``spec.hf_names``, ``TrainingArguments(optim=...)``
    (once ``lightning_memopt`` is imported) all know the name.

    Example:
        >>> register_optimizer(OptimizerSpec("sgd_demo", lambda: torch.optim.SGD), overwrite=True)
        >>> "sgd_demo" in available_optimizers()
        True
    """
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"optimizer name {spec.name!r} is already registered; pass overwrite=True to replace it.")
    taken = {hf: other.name for other in _REGISTRY.values() if other.name != spec.name for hf in other.hf_names}
    clashes = {hf: taken[hf] for hf in spec.hf_names if hf in taken}
    if clashes:
        raise ValueError(
            f"optimizer {spec.name!r}: hf_names {sorted(clashes)} already belong to {sorted(set(clashes.values()))}; "
            "pick other names."
        )
    _REGISTRY[spec.name] = spec
    for listener in list(_LISTENERS):
        listener(spec)


def on_register(listener: Callable[[OptimizerSpec], None]) -> None:
    """Call ``listener(spec)`` after every later :func:`register_optimizer` (once per listener).

    How an adapter mirrors the registry without the core importing it: the HF adapter adds a
    new spec's ``hf_names`` to ``TrainingArguments(optim=...)``.

    Example:
        >>> seen: list[OptimizerSpec] = []
        >>> on_register(seen.append)
        >>> register_optimizer(OptimizerSpec("sgd_seen", lambda: torch.optim.SGD), overwrite=True)
        >>> seen[-1].name
        'sgd_seen'
    """
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def hf_optimizer_names() -> dict[str, str]:
    """The ``TrainingArguments(optim=...)`` names, each to its registry name, in registration order.

    Example:
        >>> list(hf_optimizer_names())[:4]
        ['apollo', 'apollo_mini', 'apollo_layerwise', 'apollo_mini_layerwise']
    """
    return {hf: spec.name for spec in _REGISTRY.values() for hf in spec.hf_names}


def find_optimizer_class(class_name: str) -> type[torch.optim.Optimizer] | None:
    """The registered optimizer class whose ``__name__`` is ``class_name`` (``"APOLLOMini"``), or None.

    How the CLI resolves a class's short name; factories that fail to load (a missing
    package, a broken third-party loader) are skipped: they are not the class asked for.

    Example:
        >>> find_optimizer_class("APOLLOMini").__name__, find_optimizer_class("NoSuchOptimizer")
        ('APOLLOMini', None)
    """
    for spec in _REGISTRY.values():
        try:
            factory = spec.factory
        except Exception:  # any failure means "not this one"; create_optimizer reports it
            continue
        if inspect.isclass(factory) and factory.__name__ == class_name:
            return factory
    return None


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
    return tuple(spec.option_defaults()["betas"])


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
            hf_names=("apollo",),
            description="APOLLO: rank-256 random projection, channel-wise scaling (arXiv 2412.05270)",
        )
    )
    register_optimizer(
        OptimizerSpec(
            "apollo_mini",
            lambda: APOLLOMini,
            low_rank=True,
            defaults={"rank": 1, "scale_type": "tensor", "scale": 128.0},
            hf_names=("apollo_mini",),
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
                hf_names=(f"{base}_layerwise",),
            )
        )
    register_optimizer(OptimizerSpec("adamw", lambda: torch.optim.AdamW, description="torch.optim.AdamW"))
    register_optimizer(
        OptimizerSpec("adamw8bit", _bitsandbytes_adamw8bit, description="bitsandbytes AdamW8bit (8-bit states)")
    )


_register_builtins()
