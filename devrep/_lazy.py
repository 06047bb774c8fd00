"""Lazy attributes for packages (CuPy's ``cupy/cuda/__init__.py`` model): a package lists which module defines each
public name, and the module loads on first access. A leaf: standard library only.

Why: ``import devrep`` and ``import devrep.client`` must not pay for numpy-heavy or optional modules, and the sync
fault helper must import the Linux layer alone, while users still write ``devrep.Replicator`` or
``devrep.tracking.SyncTracker``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str], namespace: dict[str, Any], *,
                 submodules: bool = False) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``table`` maps a public name to the module (absolute, or relative to
    ``package``) that defines it; the value is cached in ``namespace`` (the package's ``globals()``), so later
    accesses skip the hook. ``submodules`` also resolves ``package.<name>`` submodules not in the table."""

    def __getattr__(name: str) -> object:
        module = table.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
            namespace[name] = value
            return value
        if submodules and not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
