"""Register our optimizer names with ``transformers``: the only module that touches its internals.

transformers (checked with 5.23) accepts ``TrainingArguments(optim=...)`` only for values of
the enum ``transformers.training_args.OptimizerNames`` (``__post_init__`` converts the string
with ``OptimizerNames(optim)``; ``HfArgumentParser`` offers the enum's values as the
``--optim`` choices), and ``Trainer.get_optimizer_cls_and_kwargs`` dispatches through the
dict ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` (enum member -> handler taking an
``OptimizerContext`` and returning ``(optimizer class, kwargs)``). Both are private, so:

- :func:`register` adds the members ``APOLLO = "apollo"``, ``APOLLO_MINI``,
  ``APOLLO_LAYERWISE`` and ``APOLLO_MINI_LAYERWISE`` to the enum and one handler per member to
  the table, once: calling it again changes nothing. The names are the registry's
  ``OptimizerSpec.hf_names`` (:func:`lightning_memopt.optim.registry.hf_optimizer_names`); a
  name registered later with ``register_optimizer(OptimizerSpec(..., hf_names=(...)))`` is added
  to transformers at once when the names are already registered there.
- It checks the internals first and raises :class:`TransformersInternalsChanged` (an
  ``ImportError``) naming the installed transformers version when they moved, or when
  transformers defines one of our names itself. The public fallback
  ``Trainer(optimizer_cls_and_kwargs=lightning_memopt.hf.optimizer_cls_and_kwargs(...))``
  keeps working then.
- ``import lightning_memopt`` calls :func:`register_on_transformers_import`: it registers at
  once when transformers' training arguments are already imported, and otherwise right after
  Python imports ``transformers.training_args`` / ``transformers.trainer_optimizer`` (an
  import hook, :mod:`lightning_memopt._after_import`), so importing lightning_memopt does not
  pay transformers' import time (about 4 s with peft installed) for users of the Lightning side.
  ``LIGHTNING_MEMOPT_HF_REGISTRATION=0`` turns the automatic registration off.
- Our enum members pickle by reference to :func:`optimizer_name`, so a ``TrainingArguments``
  pickled here unpickles in a process that has not imported lightning_memopt yet (spawned
  DDP workers) by importing and registering it first.

Example:
    >>> from lightning_memopt.hf.registration import register
    >>> register()  # idempotent; import lightning_memopt already did it
    >>> from transformers import TrainingArguments
    >>> TrainingArguments("out", optim="apollo_mini").optim.value
    'apollo_mini'
"""

from __future__ import annotations

import enum
import functools
import importlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from .._after_import import call_after_import
from ..optim.registry import OptimizerSpec, hf_optimizer_names, on_register
from .optimizers import optimizer_cls_and_kwargs

TRAINING_ARGS_MODULE = "transformers.training_args"
HANDLERS_MODULE = "transformers.trainer_optimizer"
# Set to 0 / false / no to keep `import lightning_memopt` from touching transformers.
ENV_SWITCH = "LIGHTNING_MEMOPT_HF_REGISTRATION"
# Marks enum members and handlers as ours (survives a reload of this module).
_MARK = "_lightning_memopt_"
_lock = threading.RLock()
# Which of register_names / register_handlers have run: a later registry entry is mirrored there.
_done: set[str] = set()


class TransformersInternalsChanged(ImportError):
    """transformers' optimizer enum or handler table is not where this version of lightning_memopt expects it."""


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # pragma: no cover - transformers is a dependency
        return "(unknown)"


def _internals_changed(what: str) -> TransformersInternalsChanged:
    return TransformersInternalsChanged(
        f"lightning_memopt cannot register its optimizer names ({', '.join(hf_optimizer_names())}) with "
        f"transformers {_transformers_version()}: {what}. It was written against transformers 5.23. "
        "Use the public route instead: Trainer(..., optimizer_cls_and_kwargs="
        "lightning_memopt.hf.optimizer_cls_and_kwargs('apollo', model, args=training_args)), and set "
        f"{ENV_SWITCH}=0 to skip the registration (or install a transformers version this release supports)."
    )


def member_name(name: str) -> str:
    """The enum member name for one of our optimizer names (``"apollo_mini"`` -> ``"APOLLO_MINI"``).

    Example:
        >>> member_name("apollo_mini_layerwise")
        'APOLLO_MINI_LAYERWISE'
    """
    return name.upper()


def optimizer_name(value: str) -> enum.Enum:
    """``OptimizerNames(value)``, registering our names first: how our enum members unpickle.

    Example:
        >>> optimizer_name("apollo").name
        'APOLLO'
    """
    register()
    from transformers.training_args import OptimizerNames

    return OptimizerNames(value)


def _reduce_member(value: str, protocol: int | None = None) -> tuple[Callable[[str], enum.Enum], tuple[str]]:
    return optimizer_name, (value,)


def _check_enum(optimizer_names: Any) -> None:
    required = ("_member_map_", "_value2member_map_", "_member_names_")
    if not (isinstance(optimizer_names, type) and issubclass(optimizer_names, enum.Enum)):
        raise _internals_changed(f"{TRAINING_ARGS_MODULE}.OptimizerNames is no longer an Enum")
    if not issubclass(optimizer_names, str) or not all(hasattr(optimizer_names, a) for a in required):
        raise _internals_changed(f"{TRAINING_ARGS_MODULE}.OptimizerNames is no longer a str Enum of the known layout")
    if not isinstance(optimizer_names._member_names_, list):
        raise _internals_changed(f"{TRAINING_ARGS_MODULE}.OptimizerNames._member_names_ is no longer a list")


def _add_member(optimizer_names: Any, name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to a str Enum as a real member (iteration, lookup, ``in`` all see it)."""
    existing = optimizer_names._value2member_map_.get(value)
    if existing is not None:
        if getattr(existing, _MARK, False):
            return existing
        raise _internals_changed(
            f"transformers now defines the optimizer name {value!r} itself ({optimizer_names.__name__}."
            f"{existing.name}); lightning_memopt will not replace it"
        )
    if name in optimizer_names._member_map_:
        raise _internals_changed(f"{optimizer_names.__name__}.{name} already exists with another value")
    member = str.__new__(optimizer_names, value)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(optimizer_names._member_names_)
    member.__objclass__ = optimizer_names
    setattr(member, _MARK, True)
    # Instance attribute: pickle looks __reduce_ex__ up on the object, so only our members change.
    member.__reduce_ex__ = functools.partial(_reduce_member, value)
    type.__setattr__(optimizer_names, name, member)
    optimizer_names._member_names_.append(name)
    optimizer_names._member_map_[name] = member
    optimizer_names._value2member_map_[value] = member
    return member


def _make_handler(name: str) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    def handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
        if ctx.model is None:
            raise ValueError(f"optim={name!r} needs the model to build its param groups; pass model= to the Trainer.")
        # Looked up per call: the registry may have given the name to another spec since.
        registry_name = hf_optimizer_names().get(name)
        if registry_name is None:
            raise ValueError(
                f"optim={name!r} is no longer a registered optimizer name; registered: "
                f"{', '.join(hf_optimizer_names())}."
            )
        return optimizer_cls_and_kwargs(registry_name, ctx.model, ctx.args.optim_args, args=ctx.args)

    handler.__name__ = handler.__qualname__ = f"lightning_memopt_{name}_handler"
    setattr(handler, _MARK, True)
    return handler


def register_names() -> None:
    """Add our names to ``transformers.training_args.OptimizerNames`` (idempotent).

    Example:
        >>> register_names()
        >>> from transformers.training_args import OptimizerNames
        >>> OptimizerNames("apollo_layerwise").name
        'APOLLO_LAYERWISE'
    """
    with _lock:
        try:
            training_args = importlib.import_module(TRAINING_ARGS_MODULE)
        except ImportError as err:
            raise _internals_changed(f"{TRAINING_ARGS_MODULE} cannot be imported ({err})") from err
        optimizer_names = getattr(training_args, "OptimizerNames", None)
        if optimizer_names is None:
            raise _internals_changed(f"{TRAINING_ARGS_MODULE}.OptimizerNames does not exist")
        _check_enum(optimizer_names)
        for name in hf_optimizer_names():
            _add_member(optimizer_names, member_name(name), name)
        _done.add("names")


def register_handlers() -> None:
    """Add one handler per name to ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` (idempotent).

    Example:
        >>> register_handlers()
        >>> from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
        >>> _OPTIMIZER_HANDLERS["apollo"].__name__
        'lightning_memopt_apollo_handler'
    """
    with _lock:
        register_names()
        try:
            module = importlib.import_module(HANDLERS_MODULE)
        except ImportError as err:
            raise _internals_changed(f"{HANDLERS_MODULE} cannot be imported ({err})") from err
        handlers = getattr(module, "_OPTIMIZER_HANDLERS", None)
        if not isinstance(handlers, dict):
            raise _internals_changed(f"{HANDLERS_MODULE}._OPTIMIZER_HANDLERS (the optimizer dispatch table) is gone")
        context = getattr(module, "OptimizerContext", None)
        fields = getattr(context, "__dataclass_fields__", {})
        if not {"args", "model"} <= set(fields):
            raise _internals_changed(f"{HANDLERS_MODULE}.OptimizerContext no longer carries 'args' and 'model'")
        from transformers.training_args import OptimizerNames

        for name in hf_optimizer_names():
            member = OptimizerNames(name)
            current = handlers.get(member)
            if current is None or getattr(current, _MARK, False):
                handlers[member] = _make_handler(name)
            else:  # pragma: no cover - guarded by _add_member's check
                raise _internals_changed(f"{HANDLERS_MODULE}._OPTIMIZER_HANDLERS already has a handler for {name!r}")
        _done.add("handlers")


def _mirror_new_spec(spec: OptimizerSpec) -> None:
    """A registry entry added after our names reached transformers: add its ``hf_names`` there too."""
    if not spec.hf_names:
        return
    with _lock:
        if "handlers" in _done:
            register_handlers()
        elif "names" in _done:
            register_names()


# Subscribed at import: whoever registers an optimizer with hf_names later gets the HF name too.
on_register(_mirror_new_spec)


def register() -> None:
    """Make ``TrainingArguments(optim="apollo")`` (and the other names) work; idempotent.

    Imports transformers' training arguments and optimizer table and registers there.

    Raises:
        TransformersInternalsChanged: transformers' internals are not what this release
            expects; the message names the installed version and the public fallback.

    Example:
        >>> register(); register()
        >>> from transformers.training_args import OptimizerNames
        >>> "apollo" in [m.value for m in OptimizerNames]
        True
    """
    register_handlers()


def is_registered() -> bool:
    """Whether our names are in transformers' enum and handler table (imports neither).

    Example:
        >>> register()
        >>> is_registered()
        True
    """
    training_args = sys.modules.get(TRAINING_ARGS_MODULE)
    handlers_module = sys.modules.get(HANDLERS_MODULE)
    if training_args is None or handlers_module is None:
        return False
    names = getattr(training_args, "OptimizerNames", None)
    handlers = getattr(handlers_module, "_OPTIMIZER_HANDLERS", {})
    value_map = getattr(names, "_value2member_map_", {})
    return all(
        getattr(value_map.get(name), _MARK, False) and getattr(handlers.get(value_map.get(name)), _MARK, False)
        for name in hf_optimizer_names()
    )


def _enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def register_on_transformers_import() -> None:
    """What ``import lightning_memopt`` calls: register now, or right after transformers loads.

    Adds the names when ``transformers.training_args`` is imported and the handlers when
    ``transformers.trainer_optimizer`` is: at once for a module already imported, otherwise
    right after Python imports it (:func:`lightning_memopt._after_import.call_after_import`).
    Does nothing when ``LIGHTNING_MEMOPT_HF_REGISTRATION=0``. Idempotent.

    Example:
        >>> register_on_transformers_import()
        >>> from transformers import TrainingArguments
        >>> TrainingArguments("out", optim="apollo").optim.name
        'APOLLO'
    """
    if not _enabled():
        return
    call_after_import(TRAINING_ARGS_MODULE, register_names)
    call_after_import(HANDLERS_MODULE, register_handlers)
