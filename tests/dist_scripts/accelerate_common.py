"""A tiny regression problem and a hand-written SAM reference for the Accelerate helper tests."""

from __future__ import annotations

import torch
from torch import nn

LR = 0.1


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def regression_data(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def batches(rows: list[dict[str, torch.Tensor]], size: int) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.stack([r[k] for r in rows[i:i + size]]) for k in rows[0]} for i in range(0, len(rows), size)]


def mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def reference_sam(model: nn.Module, full_batches: list[dict[str, torch.Tensor]], rho: float) -> nn.Module:
    """Plain SAM + SGD on one full batch per step: ε = ρ g/‖g‖, g_SAM at w + ε, w -= lr g_SAM."""
    params = list(model.parameters())
    for batch in full_batches:
        g = torch.autograd.grad(mse(model, batch), params)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        eps = [rho * gi / norm for gi in g]
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        g_sam = torch.autograd.grad(mse(model, batch), params)
        with torch.no_grad():
            for p, e, gs in zip(params, eps, g_sam, strict=True):
                p.sub_(e).sub_(LR * gs)
    return model


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
