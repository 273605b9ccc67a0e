"""When ``import sparse_peft`` registers the mask method with PEFT: at once if PEFT is already imported, otherwise as
soon as it is.

So ``import sparse_peft`` itself loads neither torch nor PEFT (the command line parses its arguments, and answers
``--help``, before any model library is loaded), and ``import sparse_peft; from peft import PeftModel`` still
loads mask adapters. Registering imports :mod:`sparse_peft.registration` and with it the package's PEFT-based
modules, so it must not run while one of them is half-imported (``from sparse_peft.config import MaskConfig``
imports PEFT from inside ``config``): an import finder wraps the loaders of ``peft`` and of the package's
submodules, and registers once none of them is executing and PEFT is in ``sys.modules``. It then removes itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

__all__ = ["register_when_peft_is_imported"]


def register_when_peft_is_imported(package: str) -> None:
    """Run ``<package>.registration.register()`` now if PEFT is imported, else right after PEFT's import (and after
    the import of any ``<package>`` submodule that triggered it) finishes."""
    if "peft" in sys.modules:
        importlib.import_module(f"{package}.registration").register()
    elif not any(isinstance(finder, _RegisterAfterImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImports(package))


class _RegisterAfterImports(importlib.abc.MetaPathFinder):
    """Finds ``peft`` and ``<package>.*`` with the other finders and wraps their loaders in :class:`_Loader`."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.executing = 0  # modules of interest whose code is running now

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != "peft" and not fullname.startswith(f"{self.package}."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None

    def finished(self) -> None:
        """Called after each wrapped module's code ran: register once nothing is half-imported and PEFT is in."""
        if self.executing or "peft" not in sys.modules or self not in sys.meta_path:
            return
        sys.meta_path.remove(self)
        importlib.import_module(f"{self.package}.registration").register()


class _Loader(importlib.abc.Loader):
    """A module's own loader, counting while its code runs; every other attribute is the wrapped loader's."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterAfterImports) -> None:
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._finder.executing += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._finder.executing -= 1
        self._finder.finished()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)
