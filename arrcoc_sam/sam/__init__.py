"""The sharpness-aware engine. No Hugging Face imports in this package."""

from arrcoc_sam._lazy import lazy_exports

_EXPORTS = {
    "SAM": "arrcoc_sam.sam.optimizer",
    "ASAM": "arrcoc_sam.sam.optimizer",
    "preserve_running_stats": "arrcoc_sam.sam.norm_stats",
    "available_methods": "arrcoc_sam.sam.registry",
    "build_sam_optimizer": "arrcoc_sam.sam.registry",
    "register_method": "arrcoc_sam.sam.registry",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
