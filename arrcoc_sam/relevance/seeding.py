"""Per-sample random streams: a sample's noise depends on (seed, stream, its global index) only.

Drawing one batch's noise from one generator makes a sample's draws depend on which samples share its batch;
seeding one generator per sample from a hash of (seed, stream name, global sample index) does not.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["sample_generator", "sample_seed"]


def sample_seed(seed: int, stream: str, index: int) -> int:
    """A 56-bit seed for sample ``index`` (global, 0-based) of stream ``stream`` under ``seed`` (SHA-256 based)."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def sample_generator(seed: int, stream: str, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with :func:`sample_seed` (draws are made where they are used)."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, stream, index))
