"""Replay the random draws of a forward pass (dropout masks) in a later forward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RandomState"]


@dataclass(frozen=True)
class RandomState:
    """The states of the CPU generator and of the default generator of ``device``'s accelerator (if any)."""

    device: torch.device
    cpu: Tensor
    accelerator: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        module = getattr(torch, device.type, None) if device.type != "cpu" else None
        getter = getattr(module, "get_rng_state", None)
        return cls(device, torch.get_rng_state(), getter(device) if callable(getter) else None)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Within the block the generators start from these states; afterwards they are as before the block."""
        accelerated = self.accelerator is not None
        devices = [self.device] if accelerated else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if accelerated else "cuda"):
            torch.set_rng_state(self.cpu)
            if accelerated:
                getattr(torch, self.device.type).set_rng_state(self.accelerator, self.device)
            yield
