"""House style, checked: every public object has a docstring with a usage example, and the
examples in the pure-PyTorch core actually run."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import lightning_memopt

# The core's examples are cheap and self-contained: run them. Adapter examples need a
# trainer or a launcher and are exercised by the tests of each adapter instead.
DOCTESTED_PACKAGES = ("lightning_memopt.optim", "lightning_memopt.layers", "lightning_memopt.memory")


def _modules() -> list[str]:
    names = ["lightning_memopt"]
    for info in pkgutil.walk_packages(lightning_memopt.__path__, prefix="lightning_memopt."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def _public_objects(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    objects = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            objects.append((f"{module_name}.{name}", obj))
    return objects


@pytest.mark.parametrize("module_name", _modules())
def test_public_objects_have_an_example(module_name: str) -> None:
    missing = [
        qualname
        for qualname, obj in _public_objects(module_name)
        if "Example" not in (inspect.getdoc(obj) or "") and not issubclass_of_exception(obj)
    ]
    assert not missing, f"public objects without a docstring example: {missing}"


def issubclass_of_exception(obj: object) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException)


@pytest.mark.parametrize("module_name", [m for m in _modules() if m.startswith(DOCTESTED_PACKAGES)])
def test_core_examples_run(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
