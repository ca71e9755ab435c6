"""The training objective inside the model's own ``forward``: one mechanism for every trainer.

Model surgery that changes *what is trained* (the chunked loss, and, later, early exits and
MoE auxiliary losses) installs itself here instead of asking each trainer for a custom loss:
after it, ``model(input_ids, labels=labels).loss`` **is** the training objective in training
mode, so the stock ``transformers.Trainer``, TRL's trainers built on it, a plain PyTorch loop
and Lightning's ``CausalLM`` all optimise the same thing with no subclass (as transformers'
own Mixtral adds its router loss to the loss its ``forward`` returns). In eval mode, or
without ``labels``, the model's forward runs untouched, so eval loss and perplexity stay
comparable with a plain model.

Pieces:

- a **main loss** (:func:`set_main_loss`, at most one): replaces how the forward computes the
  loss, e.g. :func:`~lightning_memopt.layers.use_chunked_loss` runs the decoder and a chunked
  LM head + cross-entropy instead of the full logits. It receives the model, the model's
  original forward and the call's keyword arguments, and returns the model output.
- **loss terms** (:func:`add_loss_term`, any number, by name): called after the forward
  with an :class:`ObjectiveStep`; a term adds to (or replaces) ``step.loss`` and records
  the parts it wants logged in ``step.parts`` (detached scalars such as ``moe_aux_loss``).
  A term may also wrap the forward (:meth:`LossTerm.around_forward`), e.g. to capture the
  hidden states of some blocks.

The objective is installed as an instance attribute ``forward`` that wraps the class's (or an
earlier instance) forward, with the same signature (``inspect.signature`` reports it, so the
Trainer's column filtering and ``num_items_in_batch`` detection are unchanged). It is removed
when the last piece is. The parts of the latest training forward are in
:func:`last_loss_parts`; :class:`lightning_memopt.hf.LayerMetricsCallback` logs them.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                                      num_hidden_layers=1, num_attention_heads=2))
    >>> class L2(LossTerm):
    ...     def __call__(self, step):
    ...         penalty = sum(p.square().sum() for p in step.model.parameters())
    ...         step.parts["l2"] = penalty.detach()
    ...         step.loss = step.loss + 1e-4 * penalty
    >>> add_loss_term(model, "l2", L2())
    >>> ids = torch.randint(0, 64, (2, 8))
    >>> loss = model(ids, labels=ids).loss   # training mode: cross-entropy + 1e-4 * L2
    >>> sorted(last_loss_parts(model))
    ['l2']
    >>> remove_loss_term(model, "l2"); get_objective(model) is None
    True
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "LossTerm",
    "MainLoss",
    "ObjectiveStep",
    "TrainingObjective",
    "add_loss_term",
    "get_objective",
    "last_loss_parts",
    "last_model_loss",
    "remove_loss_term",
    "set_main_loss",
    "set_training_step",
]

_ATTRIBUTE = "_memopt_objective"

#: ``main_loss(model, forward, kwargs) -> output``: compute the output (with ``.loss``) of one
#: training call; ``forward`` is the model's original forward, ``kwargs`` the call's arguments.
MainLoss = Callable[[nn.Module, Callable[..., Any], dict[str, Any]], Any]


@dataclass
class ObjectiveStep:
    """One training forward, as the loss terms see it.

    Attributes:
        model: the model whose forward runs.
        inputs: the call's keyword arguments (``input_ids``, ``labels``, ``num_items_in_batch`` ...).
        output: the model output of the main loss (or the original forward).
        loss: the objective so far; a term adds to it or replaces it.
        parts: detached scalars to log, by metric name (e.g. ``exit_2_loss``).
        state: per-term scratch space, by term name (what :meth:`LossTerm.around_forward` captured).

    Example:
        >>> step = ObjectiveStep(torch.nn.Linear(2, 2), {"labels": None}, loss=torch.tensor(1.0))
        >>> step.loss = step.loss + 0.5; step.parts["bonus"] = torch.tensor(0.5)
        >>> float(step.loss)
        1.5
    """

    model: nn.Module
    inputs: dict[str, Any]
    output: Any = None
    loss: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


class LossTerm:
    """A training-objective term that surgery registers with :func:`add_loss_term`.

    Override ``__call__`` (required) and, when the term needs something from inside the
    forward, :meth:`around_forward`.

    Example:
        >>> class Zero(LossTerm):
        ...     def __call__(self, step: ObjectiveStep) -> None:
        ...         step.parts["zero"] = torch.zeros(())
    """

    def around_forward(self, step: ObjectiveStep, name: str) -> contextlib.AbstractContextManager[Any]:
        """A context entered around the forward (default: nothing); what it yields is stored in
        ``step.state[name]``."""
        return contextlib.nullcontext()

    def __call__(self, step: ObjectiveStep) -> None:
        """Add to ``step.loss`` and record parts in ``step.parts``."""
        raise NotImplementedError(f"{type(self).__name__} must define __call__(self, step).")

    def set_training_step(self, step: int) -> None:
        """Told the optimizer step about to run (for schedules such as an exit curriculum); the
        trainer adapters call it through :func:`set_training_step`. Default: ignored."""


@dataclass
class TrainingObjective:
    """What :func:`get_objective` returns: the pieces installed on a model.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> add_loss_term(model, "zero", LossTerm())
        >>> objective = get_objective(model)
        >>> objective.main_loss is None, list(objective.terms), objective.empty
        (True, ['zero'], False)
    """

    main_loss: MainLoss | None = None
    main_loss_name: str | None = None
    terms: dict[str, LossTerm] = field(default_factory=dict)
    #: detached parts of the latest training forward (see :func:`last_loss_parts`).
    last_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the model's own loss (before the terms) of the latest training forward (see :func:`last_model_loss`).
    last_model_loss: torch.Tensor | None = None
    #: the instance ``forward`` the model had before (``None``: the class's).
    previous_forward: Any = None

    @property
    def empty(self) -> bool:
        return self.main_loss is None and not self.terms


def get_objective(model: nn.Module) -> TrainingObjective | None:
    """The objective installed on ``model``, or ``None``.

    Example:
        >>> get_objective(torch.nn.Linear(2, 2)) is None
        True
    """
    return model.__dict__.get(_ATTRIBUTE)


def last_loss_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The detached loss parts (by metric name) of the model's latest training forward; empty
    when no objective is installed or no training forward with labels ran yet.

    Example:
        >>> last_loss_parts(torch.nn.Linear(2, 2))
        {}
    """
    objective = get_objective(model)
    return dict(objective.last_parts) if objective is not None else {}


def last_model_loss(model: nn.Module) -> torch.Tensor | None:
    """The model's own loss (its main loss, before the loss terms), detached, of its latest
    training forward with labels; ``None`` when no objective is installed or no such forward ran
    since the last call of the model. Lightning's ``CausalLM`` logs it as ``train/loss``, so that
    it stays comparable with a model without surgery while the objective trains.

    Example:
        >>> last_model_loss(torch.nn.Linear(2, 2)) is None
        True
    """
    objective = get_objective(model)
    return objective.last_model_loss if objective is not None else None


def _original_forward(model: nn.Module, objective: TrainingObjective) -> Callable[..., Any]:
    if objective.previous_forward is not None:
        return objective.previous_forward
    return types.MethodType(type(model).forward, model)


def _objective_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    objective = get_objective(self)
    objective.last_parts = {}  # parts belong to one forward: none for eval or label-less calls
    objective.last_model_loss = None
    forward = _original_forward(self, objective)
    if args:
        # Positional arguments: bind them to names, so that pieces read ``labels`` & co. by name.
        bound = inspect.signature(forward).bind_partial(*args, **kwargs)
        kwargs = dict(bound.arguments)
        extra = kwargs.pop("kwargs", None)
        if isinstance(extra, dict):
            kwargs.update(extra)
    if not self.training or kwargs.get("labels") is None:
        return forward(**kwargs)
    step = ObjectiveStep(self, kwargs)
    with contextlib.ExitStack() as stack:
        for name, term in objective.terms.items():
            step.state[name] = stack.enter_context(term.around_forward(step, name))
        if objective.main_loss is not None:
            step.output = objective.main_loss(self, forward, kwargs)
        else:
            step.output = forward(**kwargs)
    step.loss = model_loss = step.output["loss"]
    for term in objective.terms.values():
        term(step)
    step.output["loss"] = step.loss
    objective.last_parts = {k: v.detach() for k, v in step.parts.items()}
    objective.last_model_loss = model_loss.detach() if isinstance(model_loss, torch.Tensor) else None
    return step.output


def _install(model: nn.Module) -> TrainingObjective:
    objective = get_objective(model)
    if objective is None:
        objective = TrainingObjective(previous_forward=model.__dict__.get("forward"))
        model.__dict__[_ATTRIBUTE] = objective
        wrapped = getattr(objective.previous_forward, "__func__", None) or type(model).forward

        # A fresh function per model carrying the original's signature (``__signature__``, not
        # ``__wrapped__``: accelerate's unwrap_model follows ``__wrapped__`` chains and would
        # bind the bare class forward, dropping the objective). Bound to the model,
        # inspect.signature(model.forward) is the original's: the Trainer reads it to drop dataset
        # columns and to pass num_items_in_batch. A bound method, not a closure over the model,
        # so that deepcopy rebinds it to the copy.
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return _objective_forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(wrapped)  # type: ignore[attr-defined]
        for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(forward, attribute, getattr(wrapped, attribute, getattr(forward, attribute)))
        model.__dict__["forward"] = types.MethodType(forward, model)
    return objective


def _uninstall_if_empty(model: nn.Module) -> None:
    objective = get_objective(model)
    if objective is not None and objective.empty:
        del model.__dict__[_ATTRIBUTE]
        if objective.previous_forward is not None:
            model.__dict__["forward"] = objective.previous_forward
        else:
            model.__dict__.pop("forward", None)


def set_main_loss(model: nn.Module, main_loss: MainLoss | None, name: str = "main") -> None:
    """Install (or with ``None`` remove) the function that computes the model's training loss.

    At most one main loss: a second one is refused, naming the first (remove it first).

    Raises:
        ValueError: when another main loss is installed.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> set_main_loss(model, lambda m, forward, kw: {"loss": forward(kw["input"]).sum()}, "sum")
        >>> set_main_loss(model, None); get_objective(model) is None
        True
    """
    if main_loss is None:
        objective = get_objective(model)
        if objective is not None:
            objective.main_loss = objective.main_loss_name = None
            _uninstall_if_empty(model)
        return
    objective = _install(model)
    if objective.main_loss is not None and objective.main_loss_name != name:
        raise ValueError(
            f"{type(model).__name__} already computes its training loss with {objective.main_loss_name!r}; "
            f"remove it before installing {name!r} (the two replace the same loss)."
        )
    objective.main_loss, objective.main_loss_name = main_loss, name


def set_training_step(model: nn.Module, step: int) -> None:
    """Tell every loss term installed on ``model`` or its submodules the optimizer step about to
    run (a forward cannot know it under gradient accumulation). The HF
    :class:`~lightning_memopt.hf.LayerMetricsCallback` calls it at each step's start.

    Example:
        >>> set_training_step(torch.nn.Linear(2, 2), 10)  # no objective: nothing to do
    """
    for module in model.modules():
        objective = get_objective(module)
        if objective is not None:
            for term in objective.terms.values():
                term.set_training_step(step)


def add_loss_term(model: nn.Module, name: str, term: LossTerm) -> None:
    """Register a training-objective term under ``name`` (replacing one of that name).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> add_loss_term(model, "zero", LossTerm())
        >>> list(get_objective(model).terms)
        ['zero']
    """
    if not isinstance(term, LossTerm):
        raise TypeError(f"add_loss_term({name!r}, ...): {term!r} is not a LossTerm; subclass LossTerm.")
    _install(model).terms[name] = term


def remove_loss_term(model: nn.Module, name: str) -> None:
    """Remove the term ``name`` (nothing when absent); the objective goes when it is empty.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> add_loss_term(model, "zero", LossTerm()); remove_loss_term(model, "zero")
        >>> get_objective(model) is None
        True
    """
    objective = get_objective(model)
    if objective is not None:
        objective.terms.pop(name, None)
        _uninstall_if_empty(model)
