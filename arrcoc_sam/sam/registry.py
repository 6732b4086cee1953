"""Sharpness-aware methods selectable by name (``--optimizer NAME`` everywhere).

A builder takes ``(params, base_optimizer, **knobs)`` — with ``base_optimizer`` a class or an instance,
as for :class:`~arrcoc_sam.sam.optimizer.SAM` — and returns an optimizer implementing SAM's hooks
(``ascent_this_step``, ``before_first_pass``, ``after_first_pass``, ``perturb``, ``restore``). ``"none"``
has no builder: callers use the base optimizer unchanged.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

__all__ = ["available_methods", "build_sam_optimizer", "is_builtin_method", "method_knobs", "register_method"]

Builder = Callable[..., Optimizer]

_BUILDERS: dict[str, Builder] = {}
# Modules that register methods when imported; loaded on first lookup so the registry has no import cycle.
_PROVIDERS = ("arrcoc_sam.sam.optimizer", "arrcoc_sam.sam.variants")
_providers_loaded = False


def register_method(name: str, builder: Builder) -> None:
    """Register ``builder`` under ``name`` (lower-case); re-registering a name replaces it."""
    if not name or name != name.lower() or name == "none":
        raise ValueError(f"method name must be a non-empty lower-case string other than 'none', got {name!r}")
    _BUILDERS[name] = builder


def _load_providers() -> None:
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def available_methods() -> tuple[str, ...]:
    """All selectable names, ``"none"`` first."""
    _load_providers()
    return ("none", *sorted(_BUILDERS))


def build_sam_optimizer(name: str, params: Any, base_optimizer: Any, **knobs: Any) -> Optimizer:
    """Build the sharpness-aware optimizer ``name`` around ``base_optimizer``.

    Raises:
        ValueError: ``name`` is unknown (the message lists the known ones) or is ``"none"``.
    """
    _load_providers()
    if name not in _BUILDERS:
        raise ValueError(
            f"unknown sharpness-aware method {name!r}; choose one of {', '.join(available_methods())}"
        )
    return _BUILDERS[name](params, base_optimizer, **knobs)


def is_builtin_method(name: str) -> bool:
    """Whether ``name`` is one of this package's methods (its builder is defined in ``arrcoc_sam``), not one a
    user registered."""
    _load_providers()
    return getattr(_BUILDERS.get(name), "__module__", "").startswith("arrcoc_sam.")


def method_knobs(name: str) -> frozenset[str] | None:
    """The knobs method ``name`` takes: its builder's keyword parameters after the first two (the parameters
    and the base optimizer). A class's ``**base_kwargs`` catch-all is not counted (it only reaches a base
    optimizer given as a class); a function builder with ``**kwargs`` takes anything, so its knobs are
    unknown. None when they are unknown, or ``name`` is not registered."""
    _load_providers()
    builder = _BUILDERS.get(name)
    if builder is None:
        return None
    try:
        parameters = list(inspect.signature(builder).parameters.values())[2:]
    except (TypeError, ValueError):
        return None
    if not isinstance(builder, type) and any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
