"""Lazy attribute exports, so `import arrcoc_sam` stays cheap and the engine never pulls in transformers."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]):
    """Return a module-level ``__getattr__`` resolving ``name`` from ``exports[name]`` (a module path) on first use."""

    def __getattr__(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module_name), name)

    return __getattr__
