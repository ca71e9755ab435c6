"""Run a callback right after Python imports a module, without importing that module ourselves.

``import lightning_memopt`` registers names with frameworks it must not import eagerly
(Lightning costs seconds to import; a user of the HF side should not pay for it, and vice
versa). :func:`call_after_import` runs the registration at once when the framework is already
imported, and otherwise from a meta path finder that wraps the framework module's loader.

Example:
    >>> seen = []
    >>> call_after_import("json", lambda: seen.append("json"))   # json is imported: runs now
    >>> seen
    ['json']
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

_lock = threading.RLock()


class _LoaderWithCallback(importlib.abc.Loader):
    """Runs the real loader, then the callback."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Hand the module its real loader (source lookup, resources, reload).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the modules in ``callbacks``; removes itself once all ran."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[], None]]] = {}
        self._finding: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.callbacks or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _LoaderWithCallback(spec.loader, lambda: self._done(fullname))
        return spec

    def _done(self, fullname: str) -> None:
        with _lock:
            callbacks = self.callbacks.pop(fullname, [])
            if not self.callbacks and self in sys.meta_path:
                sys.meta_path.remove(self)
        for callback in callbacks:
            callback()


_finder = _AfterImportFinder()


def call_after_import(module_name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if ``module_name`` is imported, else right after it is.

    Example:
        >>> call_after_import("json", lambda: None)
    """
    with _lock:
        if module_name not in sys.modules:
            _finder.callbacks.setdefault(module_name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    callback()
