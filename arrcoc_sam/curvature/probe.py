"""``probe_context``: run a curvature probe and leave the model exactly as found.

Saved and restored (in ``finally``): every module's train/eval flag, the ``.grad`` of every parameter and
probed tensor, the ``requires_grad`` flags of the probed tensors, the CPU and (if initialised) CUDA RNG
states, the HF attention implementation, and, with ``restore_values=True``, the values of the probed
tensors (bitwise, by copy; used by probes that perturb weights).

Inside the context the model is in eval mode (dropout off, so the curvature is of a deterministic
function), gradients are enabled (also when called under ``torch.no_grad()``), the probed tensors require grad, HF attention that has no double backward (flash, flex, …)
is switched to ``"eager"``, and PyTorch SDPA is restricted to its math kernel (DESIGN §5 trap 11).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["probe_context", "default_params"]

_DOUBLE_BACKWARD_ATTENTION = ("eager", "sdpa")


def default_params(model: nn.Module) -> list[Tensor]:
    """The trainable parameters of ``model`` (``requires_grad=True``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: pass params=[...] explicitly")
    return params


def _attention_configs(model: nn.Module) -> list[object]:
    """Distinct HF configs (anything with ``_attn_implementation``) found on ``model`` and its submodules."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def probe_context(
    model: nn.Module, tensors: Sequence[Tensor], *, restore_values: bool = False, eval_mode: bool = True
) -> Iterator[None]:
    """Context for probing ``model`` w.r.t. ``tensors`` (parameters or leaf inputs); restores everything on exit."""
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise TypeError(f"params[{index}] must be a floating-point tensor, got {type(tensor).__name__}")
        if not tensor.requires_grad and not tensor.is_leaf:
            raise ValueError(f"params[{index}] is a non-leaf tensor without grad: probe a leaf tensor instead")
    modes = [(module, module.training) for module in model.modules()]
    owners = {id(t): t for t in (*model.parameters(), *tensors)}
    grads = [(t, t.grad) for t in owners.values()]
    flags = [(t, t.requires_grad) for t in tensors]
    backups = [t.detach().clone() for t in tensors] if restore_values else []
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    attention = [(config, config._attn_implementation) for config in _attention_configs(model)]
    try:
        for config, implementation in attention:
            if implementation not in _DOUBLE_BACKWARD_ATTENTION:
                config._attn_implementation = "eager"
        if eval_mode:
            model.eval()
        for tensor in tensors:
            if tensor.is_leaf:
                tensor.requires_grad_(True)
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        with torch.no_grad():
            for tensor, backup in zip(tensors, backups, strict=False):
                tensor.copy_(backup)
        for tensor, flag in flags:
            if tensor.is_leaf:
                tensor.requires_grad_(flag)
        for tensor, grad in grads:
            tensor.grad = grad
        for module, training in modes:
            module.training = training
        for config, implementation in attention:
            if config._attn_implementation != implementation:
                config._attn_implementation = implementation
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
