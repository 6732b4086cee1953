"""Ascent directions and exact apply/restore, as pure functions over lists of tensors.

Every function batches its work with ``torch._foreach_*`` ops, one call per (device, dtype) group, and
never synchronises with the host. Notation (Foret et al. 2021; Kwon et al. 2021):

* SAM:   ε = ρ · g / ‖g‖
* ASAM:  ε = ρ · T² g / ‖T g‖ with the element-wise operator T = |w| + η

``‖·‖`` is one global L2 norm over every perturbed tensor, accumulated in float32 (or float64 when the
gradients are float64). η keeps zero-valued weights (LoRA's ``B``, zero-initialised biases) perturbable.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "accumulation_dtype",
    "ascent_norm",
    "ascent_sum_of_squares",
    "apply_ascent_",
    "copy_",
    "cosine",
    "dot",
    "group_by_device_and_dtype",
    "squared_norm",
    "sum_dtype",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are accumulated in: float32, or wider when ``dtype`` is wider."""
    return torch.promote_types(dtype, torch.float32)


def sum_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype of a sum over all ``tensors``: float32, or float64 when any of them is float64."""
    dtype = torch.float32
    for tensor_dtype in {t.dtype for t in tensors}:
        dtype = torch.promote_types(dtype, accumulation_dtype(tensor_dtype))
    return dtype


def group_by_device_and_dtype(*tensor_lists: Sequence[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel tensor lists into groups sharing (device, dtype) of the first list, order preserved.

    Uses torch's C++ grouping (the one its foreach optimizers use); lists whose tensors at one index differ
    in device or dtype (which it rejects) are grouped in Python.
    """
    try:
        grouped = _group_tensors_by_device_and_dtype([list(lst) for lst in tensor_lists], with_indices=False)
    except RuntimeError:
        return _group_in_python(*tensor_lists)
    return [tuple(lists) for lists, _ in grouped.values()]


def _group_in_python(*tensor_lists: Sequence[Tensor]) -> list[tuple[list[Tensor], ...]]:
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = defaultdict(
        lambda: tuple([] for _ in tensor_lists)
    )
    for items in zip(*tensor_lists, strict=True):
        key = (items[0].device, items[0].dtype)
        for bucket, tensor in zip(groups[key], items, strict=True):
            bucket.append(tensor)
    return list(groups.values())


# Upper bound on the elements of any temporary made while perturbing: ASAM's operator T is built chunk by
# chunk, so its memory stays far below one copy of the parameters.
_CHUNK_NUMEL = 1 << 22


def _chunks(*tensor_lists: list[Tensor]):
    """Yield slices of parallel tensor lists whose first list holds at most ~_CHUNK_NUMEL elements."""
    start, numel = 0, 0
    for index, tensor in enumerate(tensor_lists[0]):
        if numel and numel + tensor.numel() > _CHUNK_NUMEL:
            yield tuple(lst[start:index] for lst in tensor_lists)
            start, numel = index, 0
        numel += tensor.numel()
    if start < len(tensor_lists[0]):
        yield tuple(lst[start:] for lst in tensor_lists)


def _scaling_operator(params: list[Tensor], eta: float) -> list[Tensor]:
    """T = |w| + η, element-wise, as new tensors shaped like ``params``."""
    operator = torch._foreach_abs(params)
    torch._foreach_add_(operator, eta)
    return operator


def _bucket(params, grads, adaptive, eta, *extra):
    """Group tensor pairs by (adaptive, η, extra keys…), then by (device, dtype)."""
    buckets: dict[tuple, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    if all(len(set(values)) == 1 for values in (adaptive, eta, *extra)):  # the common case: one setting for all
        a, e, *rest = (values[0] for values in (adaptive, eta, *extra))
        buckets[(bool(a), float(e) if a else 0.0, *rest)] = (list(params), list(grads))
    else:
        for p, g, a, e, *rest in zip(params, grads, adaptive, eta, *extra, strict=True):
            key = (bool(a), float(e) if a else 0.0, *rest)
            buckets[key][0].append(p)
            buckets[key][1].append(g)
    for key, (bucket_params, bucket_grads) in buckets.items():
        for group_params, group_grads in group_by_device_and_dtype(bucket_params, bucket_grads):
            yield key, group_params, group_grads


def ascent_norm(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    adaptive: Sequence[bool],
    eta: Sequence[float],
) -> Tensor:
    """Global norm ‖T g‖ over all tensors (T = 1 where ``adaptive[i]`` is False). 0-dim tensor, no host sync.

    Args:
        params, grads: parallel lists of weights ``w_i`` and gradients ``g_i`` (any shapes, matching pairwise).
        adaptive, eta: per-tensor ASAM switch and η.
    Returns:
        A 0-dim tensor on ``grads[0].device`` in float32 (float64 if any gradient is float64).
    """
    return ascent_sum_of_squares(params, grads, adaptive, eta).sqrt()


def ascent_sum_of_squares(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    adaptive: Sequence[bool],
    eta: Sequence[float],
) -> Tensor:
    """‖T g‖², the square of :func:`ascent_norm` before its square root: the additive partial a shard contributes."""
    if not grads:
        raise ValueError("ascent_norm needs at least one gradient")
    out_dtype = sum_dtype(grads)
    device = grads[0].device
    squares: list[Tensor] = []
    for (is_adaptive, eta_value), group_params, group_grads in _bucket(params, grads, adaptive, eta):
        if not is_adaptive:
            squares.append(_sum_of_squares(group_grads, out_dtype, device))
            continue
        for chunk_params, chunk_grads in _chunks(group_params, group_grads):
            scaled = _scaling_operator(chunk_params, eta_value)
            torch._foreach_mul_(scaled, chunk_grads)
            squares.append(_sum_of_squares(scaled, out_dtype, device))
    return torch.stack(squares).sum()


def _sum_of_squares(tensors: list[Tensor], out_dtype: torch.dtype, device: torch.device) -> Tensor:
    norms = torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(tensors[0].dtype))
    return torch.stack(norms).to(device=device, dtype=out_dtype).square().sum()


def apply_ascent_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    step_size: Sequence[float],
    adaptive: Sequence[bool],
    eta: Sequence[float],
) -> None:
    """In place: w_i += step_size_i · T_i² g_i, with T_i = |w_i| + η_i (ASAM) or 1 (SAM).

    ``step_size_i`` is ρ_i / ‖T g‖ as a Python float. SAM tensors need no temporary at all; ASAM builds T
    in chunks of at most ~4M elements.
    """
    for (is_adaptive, eta_value, step), group_params, group_grads in _bucket(
        params, grads, adaptive, eta, [float(s) for s in step_size]
    ):
        if group_grads[0].dtype != group_params[0].dtype:
            group_grads = [g.to(group_params[0].dtype) for g in group_grads]
        if not is_adaptive:
            torch._foreach_add_(group_params, group_grads, alpha=step)
            continue
        for chunk_params, chunk_grads in _chunks(group_params, group_grads):
            direction = _scaling_operator(chunk_params, eta_value)
            torch._foreach_mul_(direction, direction)
            torch._foreach_mul_(direction, chunk_grads)
            torch._foreach_add_(chunk_params, direction, alpha=step)


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """Bitwise ``dst[i].copy_(src[i])`` for all i, batched per (device, dtype)."""
    for group_dst, group_src in group_by_device_and_dtype(dst, src):
        torch._foreach_copy_(group_dst, group_src)


def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Σ_i ‖t_i‖² as a 0-dim float32 (or wider) tensor on ``tensors[0].device``; one foreach norm per group."""
    out_dtype, device = sum_dtype(tensors), tensors[0].device
    return torch.stack(
        [_sum_of_squares(group, out_dtype, device) for (group,) in group_by_device_and_dtype(tensors)]
    ).sum()


def cosine(eps: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(cos(ε, g), ‖g‖) over all tensors as 0-dim tensors; no host sync, no temporaries.

    Reads each tensor twice (one foreach norm, one fused dot product per tensor) instead of forming ε·g.
    """
    grad_sq = squared_norm(grads)
    eps_sq = squared_norm(eps)
    tiny = torch.finfo(grad_sq.dtype).tiny
    cosine_value = dot(eps, grads) / (eps_sq * grad_sq).sqrt().clamp_min(tiny)
    return cosine_value.clamp(-1.0, 1.0), grad_sq.sqrt()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as a 0-dim float32 (or wider) tensor on ``a[0].device``; no host sync.

    One fused ``vdot`` per tensor pair (no temporaries); float16/bfloat16 pairs are upcast to float32 first.
    """
    if not a:
        raise ValueError("dot needs at least one tensor")
    out_dtype, device = sum_dtype(a), a[0].device
    partial: list[Tensor] = []
    for group_a, group_b in group_by_device_and_dtype(a, b):
        dtype = accumulation_dtype(group_a[0].dtype)
        products = [
            torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(group_a, group_b, strict=True)
        ]
        partial.append(torch.stack(products).to(device=device, dtype=out_dtype).sum())
    return torch.stack(partial).sum()
