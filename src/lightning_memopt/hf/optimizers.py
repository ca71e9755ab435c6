"""Our optimizers for ``transformers.Trainer``: param groups that honour ``TrainingArguments``.

This is the one place that turns a name (``"apollo"``), an option string and a model into
what the Trainer instantiates. Both routes go through it:

- by name, after ``import lightning_memopt``: ``TrainingArguments(optim="apollo", ...)``
  (the handler registered by :mod:`.registration` calls :func:`optimizer_cls_and_kwargs`);
- the public fallback, which needs no transformers internals:
  ``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("apollo", model, args=args))``.

What the Trainer gets, for every group:

- ``learning_rate``, ``adam_beta1``/``adam_beta2`` and ``adam_epsilon`` of the arguments (those
  the optimizer's constructor takes: a registered SGD gets the learning rate and weight decay);
- ``weight_decay`` on every weight, and ``0`` on biases and normalisation weights, the rule
  the Trainer applies to its built-in optimizers (HF's own ``apollo_adamw`` drops weight decay
  altogether);
- ``optim_args`` parsed by :func:`lightning_memopt.optim.parse_options` (typed values; an
  unknown key raises a ``ValueError`` that lists the valid ones). They win over the
  ``TrainingArguments`` fields they name (``lr``, ``weight_decay``, ``beta1``, ``beta2``, ``eps``).

``optim_target_modules`` is read as transformers reads it for its own GaLore/APOLLO: a string
is a regular expression that must match a module's whole name (``re.fullmatch``); a list
matches a module whose name equals an entry, contains an entry, or fully matches an entry
read as a regular expression. Two deliberate differences: ``"all-linear"`` (or
``"all_linear"``) leaves the output head (``lm_head``, ``classifier``, ``score``...) to AdamW,
as the APOLLO paper and peft's ``"all-linear"`` do, where HF's ``apollo_adamw`` projects it
too; and ``None`` (the default) picks the linear layers inside the model's repeated blocks
(attention and MLP) instead of raising.

Example:
    >>> import torch, lightning_memopt
    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from lightning_memopt.hf import optimizer_cls_and_kwargs
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> args = TrainingArguments("out", learning_rate=1e-3, weight_decay=0.01, report_to=[])
    >>> trainer = Trainer(model=model, args=args,
    ...     optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("apollo", model, "rank=8", args=args))
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..optim import apollo_param_groups, get_optimizer_spec, parse_options
from ..optim.param_groups import TargetModules
from ..optim.registry import hf_optimizer_names

# The TrainingArguments(optim=...) names when lightning_memopt is imported (the built-ins), read
# from the registry's hf_names; hf_optimizer_names() also sees names registered later.
HF_OPTIMIZER_NAMES = tuple(hf_optimizer_names())

# The Trainer's rule for parameters without weight decay (Trainer.get_decay_parameter_names,
# transformers 5.23): LayerNorm modules, and names that say bias or norm.
_NO_DECAY_LAYER_TYPES = (nn.LayerNorm,)
_NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay, by the Trainer's rule.

    Everything except the parameters of ``nn.LayerNorm`` modules and parameters whose name
    contains ``bias`` or a norm (``layernorm``, ``rmsnorm``, ``.norm.``, ``_norm``).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> sorted(decay_parameter_names(model))
        ['0.weight']
    """
    from transformers.trainer_pt_utils import get_parameter_names

    return set(get_parameter_names(model, list(_NO_DECAY_LAYER_TYPES), list(_NO_DECAY_NAME_PATTERNS)))


def _candidate_modules(model: nn.Module) -> list[str]:
    """Modules that can be low-rank: a 2-D ``weight`` that is not an embedding."""
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            name
            and isinstance(weight, nn.Parameter)
            and weight.dim() == 2
            and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        ):
            names.append(name)
    return names


def resolve_target_modules(model: nn.Module, optim_target_modules: str | list[str] | None) -> TargetModules:
    """Translate ``TrainingArguments.optim_target_modules`` into our ``target_modules``.

    Regular expressions and lists are matched the way transformers matches them for its
    own GaLore/APOLLO (``transformers.trainer_utils.check_target_module_exists``); the result
    is an exact pattern of the matched module names. ``None`` and ``"all-linear"`` keep our
    meaning (see the module docstring).

    Raises:
        ValueError: when nothing matches; the message shows module names to pick from.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> resolve_target_modules(model, ["0"])
        '^(?:0)$'
        >>> resolve_target_modules(model, "all_linear")
        'all-linear'
    """
    if optim_target_modules is None:
        return None
    if isinstance(optim_target_modules, str) and optim_target_modules.replace("_", "-") == "all-linear":
        return "all-linear"
    if not isinstance(optim_target_modules, (str, list, tuple)) or (
        not isinstance(optim_target_modules, str) and not all(isinstance(t, str) for t in optim_target_modules)
    ):
        raise ValueError(
            f"optim_target_modules={optim_target_modules!r} must be a regular expression, a list of module "
            "names (or regexes), or 'all-linear'."
        )
    from transformers.trainer_utils import check_target_module_exists

    targets = optim_target_modules if isinstance(optim_target_modules, str) else list(optim_target_modules)
    candidates = _candidate_modules(model)
    try:
        matched = [name for name in candidates if check_target_module_exists(targets, name)]
    except re.error as err:
        raise ValueError(
            f"optim_target_modules={optim_target_modules!r} holds an invalid regular expression ({err})."
        ) from err
    if not matched:
        examples = ", ".join(candidates[:8]) or "(the model has no 2-D weights)"
        raise ValueError(
            f"optim_target_modules={optim_target_modules!r} matched no module with a 2-D weight. Module names "
            f"look like: {examples}. A string must match a whole name (e.g. r'.*\\.(query|key|value)'); a list "
            "entry may also be a part of a name (e.g. ['attention', 'intermediate']); or pass 'all-linear'."
        )
    return "^(?:" + "|".join(re.escape(name) for name in matched) + ")$"


def param_groups(
    model: nn.Module,
    name: str = "apollo",
    *,
    target_modules: TargetModules = None,
    weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """The Trainer's param groups for optimizer ``name``: low-rank / AdamW, each split by decay.

    For the APOLLO family the low-rank matrices (:func:`lightning_memopt.optim.apollo_param_groups`)
    get ``low_rank=True``, everything else ``low_rank=False``; each of those is split into
    weights that decay (``weight_decay``) and biases/norm weights that do not (``0.0``).
    ``weight_decay=None`` leaves decaying groups at the optimizer's default. Frozen parameters
    are left out; empty groups are dropped.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        >>> groups = param_groups(model, "apollo", target_modules="^0$", weight_decay=0.1)
        >>> [(g["low_rank"], g["weight_decay"], len(g["params"])) for g in groups]
        [(True, 0.1, 1), (False, 0.1, 1), (False, 0.0, 2)]
    """
    spec = get_optimizer_spec(name)
    if spec.low_rank:
        base = apollo_param_groups(model, target_modules)
    else:
        if target_modules is not None:
            raise ValueError(f"optimizer {name!r} has no low-rank update; target_modules does not apply to it.")
        base = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay = decay_parameter_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[dict[str, Any]] = []
    for group in base:
        decaying = [p for p in group["params"] if names.get(id(p)) in decay]
        constant = [p for p in group["params"] if names.get(id(p)) not in decay]
        if decaying:
            groups.append(
                {**group, "params": decaying, **({} if weight_decay is None else {"weight_decay": weight_decay})}
            )
        if constant:
            groups.append({**group, "params": constant, "weight_decay": 0.0})
    return groups


def training_arguments_options(args: Any) -> dict[str, Any]:
    """The optimizer options a ``TrainingArguments`` sets: lr, betas, eps and weight decay.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-6,
        ...                        weight_decay=0.1)
        >>> training_arguments_options(args)
        {'lr': 0.001, 'betas': (0.9, 0.95), 'eps': 1e-06, 'weight_decay': 0.1}
    """
    return {
        "lr": float(args.learning_rate),
        "betas": (float(args.adam_beta1), float(args.adam_beta2)),
        "eps": float(args.adam_epsilon),
        "weight_decay": float(args.weight_decay),
    }


def _option_string(options: Any) -> str | Mapping[str, Any] | None:
    if options is None or isinstance(options, (str, Mapping)):
        return options
    raise ValueError(f"optimizer options must be a 'key=value,...' string or a mapping, not {options!r}.")


def optimizer_cls_and_kwargs(
    name: str,
    model: nn.Module,
    options: str | Mapping[str, Any] | None = None,
    *,
    args: Any = None,
    target_modules: str | list[str] | None = None,
    **overrides: Any,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``(optimizer class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The public route to our optimizers, independent of transformers' internals (the
    ``optim="apollo"`` names use it too). ``kwargs["params"]`` holds the param groups; the
    Trainer pops it and calls ``cls(params, **kwargs)``.

    Args:
        name: an optimizer registry name: ``"apollo"``, ``"apollo_mini"``, ``"apollo_layerwise"``,
            ``"apollo_mini_layerwise"`` (or any other registered name, e.g. ``"adamw"``).
        model: the model the Trainer trains (the same object you pass to the Trainer).
        options: the option string (``"rank=128,scale=1,update_proj_gap=200"``) or a mapping,
            typed and checked by :func:`lightning_memopt.optim.parse_options`.
        args: a ``TrainingArguments``; its ``learning_rate``, ``adam_beta1/2``,
            ``adam_epsilon``, ``weight_decay`` and ``optim_target_modules`` are used (and, for
            the layer-wise names, checked against ``max_grad_norm``, ``fp16``, FSDP...).
        target_modules: which modules are low-rank; overrides ``args.optim_target_modules``
            (see :func:`resolve_target_modules`).
        overrides: further options (``lr=...``); they win over everything else.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> cls, kwargs = optimizer_cls_and_kwargs("apollo_mini", model, "update_proj_gap=50", lr=1e-3)
        >>> cls.__name__, kwargs["rank"], kwargs["update_proj_gap"], len(kwargs["params"])
        ('APOLLOMini', 1, 50, 2)
    """
    spec = get_optimizer_spec(name)
    options = _option_string(options)
    if not spec.low_rank and target_modules is not None:
        raise ValueError(f"optimizer {name!r} has no low-rank update; target_modules does not apply to it.")
    resolved: dict[str, Any] = dict(spec.defaults)
    option_types = spec.option_types()
    if args is not None:
        from .checks import check_trainer_setup

        check_trainer_setup(model, args)  # INT8 / chunked loss with FSDP: refused before training
        # Only the fields the optimizer takes: a registered SGD has no betas or eps.
        resolved.update({k: v for k, v in training_arguments_options(args).items() if k in option_types})
        if target_modules is None and spec.low_rank:
            target_modules = getattr(args, "optim_target_modules", None)
    layerwise_options: dict[str, Any] = {}
    if spec.layerwise:
        from .layerwise import split_layerwise_options

        options, layerwise_options = split_layerwise_options(options)
        overrides, more = split_layerwise_options(overrides)
        layerwise_options.update(more)
    try:
        resolved.update(parse_options(name, options))
        resolved.update(parse_options(name, overrides))
    except ValueError as err:
        if spec.layerwise and "valid options" in str(err):
            raise ValueError(f"{err} Layer-wise names also take: layerwise_max_grad_norm.") from None
        raise
    low_rank_targets = resolve_target_modules(model, target_modules) if spec.low_rank else None
    weight_decay = resolved.pop("weight_decay", None)
    if weight_decay is None:
        weight_decay = spec.option_defaults().get("weight_decay")
    groups = param_groups(model, name, target_modules=low_rank_targets, weight_decay=weight_decay)
    kwargs = {**resolved, "weight_decay": weight_decay} if "weight_decay" in option_types else resolved
    if spec.layerwise:
        from .layerwise import layerwise_optimizer_cls_and_kwargs

        return layerwise_optimizer_cls_and_kwargs(spec, groups, kwargs, layerwise_options, args=args)
    return spec.factory, {"params": groups, **kwargs}


def build_optimizer(
    name: str,
    model: nn.Module,
    options: str | Mapping[str, Any] | None = None,
    *,
    args: Any = None,
    target_modules: str | list[str] | None = None,
    **overrides: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer the Trainer would build from :func:`optimizer_cls_and_kwargs`.

    Handy to inspect the groups, or to use our optimizer in a custom training loop with
    ``TrainingArguments`` semantics.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 2))
        >>> opt = build_optimizer("apollo", model, "rank=4", target_modules=["0"], weight_decay=0.1)
        >>> [(g["low_rank"], g["weight_decay"]) for g in opt.param_groups]
        [(True, 0.1), (False, 0.1), (False, 0.0)]
    """
    cls, kwargs = optimizer_cls_and_kwargs(name, model, options, args=args, target_modules=target_modules, **overrides)
    kwargs = dict(kwargs)
    params = kwargs.pop("params")
    return cls(params, **kwargs)
