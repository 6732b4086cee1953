"""ARR-COC relevance models, data, robustness evaluation and precision-aware token allocation."""

from arrcoc_sam._lazy import lazy_exports

# name -> module. Each module's owner adds its public names here.
_EXPORTS: dict[str, str] = {
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
