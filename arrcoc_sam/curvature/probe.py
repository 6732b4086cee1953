"""``probe_context``: run a curvature probe and leave the model exactly as found; probe samplers.

Saved and restored (in ``finally``): every module's train/eval flag, the ``.grad`` of every parameter and
probed tensor, the ``requires_grad`` flags of the probed tensors, the CPU and (if initialised) CUDA RNG
states, the HF attention implementation, and, with ``restore_values=True``, the values of the probed
tensors (bitwise, by copy; used by probes that perturb weights).

Inside the context the model is in eval mode (dropout off, so the curvature is of a deterministic
function), gradients are enabled (also when called under ``torch.no_grad()``; ``torch.inference_mode()`` is
refused, since its tensors cannot enter autograd), the probed tensors require grad, and PyTorch SDPA is
restricted to its math kernel (DESIGN §5 trap 11). HF attention that has no double backward (flash, flex, …)
is switched to ``"sdpa"`` (hence the exact math kernel) where the model supports it (``_supports_sdpa``), else
to ``"eager"``; ``"sdpa"`` is preferred because HF's eager attention upcasts the softmax to float32, which
gives NaN curvature for fully masked (left-padded) rows of float64 models.

Probe vectors: the stochastic estimators draw their Rademacher (±1) probes from a :class:`ProbeSampler`.
The default, :class:`GeneratorSampler`, is one ``torch.Generator`` stream (what passing ``generator=`` or
``seed=`` gives). :class:`BlockSampler` draws block b of every probe from its own generator b, so that when
the probed tensor and the outputs are stacked samples ``[B, ...]`` and the loss is a sum (or mean) of
per-sample losses, each sample's probes, and hence its block of the estimate, depend on its own generator
only, not on which samples share its batch (one batched product instead of one call per sample).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "probe_context",
    "check_params",
    "default_params",
    "ProbeSampler",
    "GeneratorSampler",
    "BlockSampler",
    "as_sampler",
]

_DOUBLE_BACKWARD_ATTENTION = ("eager", "sdpa")


def check_params(params: Sequence[Tensor]) -> None:
    """Refuse probed tensors that are not floating-point tensors, non-leaf tensors without grad, and the same
    tensor twice (tied weights listed under both names would count its curvature twice: trace and λ_max double)."""
    positions: dict[int, list[int]] = {}
    for index, tensor in enumerate(params):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"params[{index}] must be a floating-point tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(
                f"params[{index}] must be a floating-point tensor, got dtype {tensor.dtype} (shape {tuple(tensor.shape)}): "
                "curvature needs real-valued differentiable tensors"
            )
        if not tensor.requires_grad and not tensor.is_leaf:
            raise ValueError(f"params[{index}] is a non-leaf tensor without grad: probe a leaf tensor instead")
        positions.setdefault(id(tensor), []).append(index)
    repeated = [where for where in positions.values() if len(where) > 1]
    if repeated:
        listed = "; ".join(" and ".join(f"params[{i}]" for i in where) for where in repeated)
        raise ValueError(
            f"params holds the same tensor more than once ({listed}), e.g. tied weights listed under both names: "
            "its curvature would be counted twice; pass each tensor once"
        )


def default_params(model: nn.Module) -> list[Tensor]:
    """The trainable parameters of ``model`` (``requires_grad=True``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: pass params=[...] explicitly")
    return params


class ProbeSampler(Protocol):
    """Where the stochastic estimators' Rademacher probes come from. Each call draws the next probe."""

    def rademacher(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A tensor of ``shape`` with i.i.d. ±1 entries (each sign with probability 1/2), in ``dtype`` on ``device``."""
        ...


class GeneratorSampler:
    """One stream: every probe drawn from ``generator`` (the default of every estimator). ``generator`` also
    serves draws other than signs (sampled labels for the GGN with ``sampling="labels"``)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def rademacher(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        bits = torch.randint(0, 2, tuple(shape), generator=self.generator, device=device)
        return bits.to(dtype).mul_(2).sub_(1)


class BlockSampler:
    """One stream per block: the probe, flattened in row-major order, is split into ``len(generators)`` equal
    contiguous blocks and block b is drawn from ``generators[b]`` (as a flat vector).

    With a probed leaf ``[B, ...]`` (flat probes) and per-sample outputs ``[B, ...]`` (GGN factors in output
    space), block b is sample b's share of both, so sample b's probes depend on ``generators[b]`` alone: the
    same draws whether it is probed alone (one generator) or stacked with others. Block b's probes are i.i.d.
    across draws, and independent of the other blocks, so per-probe standard errors stay valid. Draws whose
    size is not a multiple of the number of blocks are refused (the blocks would not be whole samples); so
    are draws other than signs (``sampling="labels"`` for cross-entropy/BCE GGNs).
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        if not generators:
            raise ValueError("generators is empty: pass one generator per block")
        self.generators = list(generators)

    def rademacher(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        blocks = len(self.generators)
        if numel % blocks:
            raise ValueError(
                f"a probe of shape {tuple(shape)} ({numel} entries) does not split into {blocks} equal blocks: "
                "BlockSampler needs every block (sample) to own the same number of probed entries and outputs"
            )
        drawn = [GeneratorSampler(g).rademacher((numel // blocks,), dtype, device) for g in self.generators]
        return torch.cat(drawn).view(tuple(shape))


def as_sampler(probes: torch.Generator | ProbeSampler) -> ProbeSampler:
    """``probes`` itself when it is a sampler, else a :class:`GeneratorSampler` over the generator."""
    return GeneratorSampler(probes) if isinstance(probes, torch.Generator) else probes


def _attention_configs(model: nn.Module) -> list[tuple[object, bool]]:
    """Distinct HF configs (anything with ``_attn_implementation``) found on ``model`` and its submodules, each
    with whether SDPA is supported: some module holding it declares ``_supports_sdpa`` (HF models do; their
    layers, which share the config, do not) and none declares it False."""
    configs: dict[int, object] = {}
    support: dict[int, list[bool]] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs.setdefault(id(config), config)
            declared = getattr(module, "_supports_sdpa", None)
            support.setdefault(id(config), []).extend([] if declared is None else [bool(declared)])
    return [(config, bool(support[key]) and all(support[key])) for key, config in configs.items()]


@contextmanager
def probe_context(
    model: nn.Module, tensors: Sequence[Tensor], *, restore_values: bool = False, eval_mode: bool = True
) -> Iterator[None]:
    """Context for probing ``model`` w.r.t. ``tensors`` (parameters or leaf inputs); restores everything on exit."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "curvature probes need autograd, which torch.inference_mode() disables: call them outside the "
            "inference_mode block (torch.no_grad() is fine; the probe re-enables gradients itself)"
        )
    check_params(tensors)
    modes = [(module, module.training) for module in model.modules()]
    owners = {id(t): t for t in (*model.parameters(), *tensors)}
    grads = [(t, t.grad) for t in owners.values()]
    flags = [(t, t.requires_grad) for t in tensors]
    backups = [t.detach().clone() for t in tensors] if restore_values else []
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    configs = _attention_configs(model)
    attention = [(config, config._attn_implementation) for config, _ in configs]
    try:
        for config, sdpa in configs:
            if config._attn_implementation not in _DOUBLE_BACKWARD_ATTENTION:
                config._attn_implementation = "sdpa" if sdpa else "eager"
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
