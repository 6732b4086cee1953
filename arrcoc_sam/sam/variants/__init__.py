"""Cheaper sharpness-aware methods, selectable by name (``--optimizer NAME``): registered on import.

=========  ========================================  ===================================
name       class                                     forward+backward passes per step
=========  ========================================  ===================================
periodic   :class:`PeriodicSAM` (``interval`` k)     1 + 1/k
looksam    :class:`LookSAM` (``interval`` k)         1 + 1/k
esam       :class:`ESAM`                             1 + 1/3 + γ with SDS, else 2
gsam       :class:`GSAM`                             2
fsam       :class:`FriendlySAM`                      2
msam       :class:`MomentumSAM`                      1
=========  ========================================  ===================================
"""

from arrcoc_sam.sam.registry import register_method
from arrcoc_sam.sam.variants._base import VariantSAM, gradients_only_for
from arrcoc_sam.sam.variants.esam import ESAM
from arrcoc_sam.sam.variants.fsam import FriendlySAM
from arrcoc_sam.sam.variants.gsam import GSAM
from arrcoc_sam.sam.variants.looksam import LookSAM
from arrcoc_sam.sam.variants.msam import MomentumSAM
from arrcoc_sam.sam.variants.periodic import PeriodicSAM

__all__ = ["ESAM", "GSAM", "FriendlySAM", "LookSAM", "MomentumSAM", "PeriodicSAM", "VariantSAM", "VARIANTS", "gradients_only_for"]

VARIANTS = {
    "periodic": PeriodicSAM,
    "looksam": LookSAM,
    "esam": ESAM,
    "gsam": GSAM,
    "fsam": FriendlySAM,
    "msam": MomentumSAM,
}

for _name, _cls in VARIANTS.items():
    register_method(_name, _cls)
