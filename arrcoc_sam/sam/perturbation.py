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
    "chunks",
    "clone_all",
    "copy_",
    "cosine",
    "dot",
    "dot_and_squared_norms",
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
CHUNK_NUMEL = 1 << 22


def chunks(*tensor_lists: Sequence[Tensor]):
    """Yield consecutive slices of parallel tensor lists in which the first list's tensors share device and
    dtype and hold at most ~CHUNK_NUMEL elements together (a single larger tensor forms its own slice)."""
    first_list = tensor_lists[0]
    start, numel = 0, 0
    for index, tensor in enumerate(first_list):
        first = first_list[start]
        same_kind = tensor.device == first.device and tensor.dtype == first.dtype
        if index > start and (not same_kind or numel + tensor.numel() > CHUNK_NUMEL):
            yield tuple(list(lst[start:index]) for lst in tensor_lists)
            start, numel = index, 0
        numel += tensor.numel()
    if start < len(first_list):
        yield tuple(list(lst[start:]) for lst in tensor_lists)


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
    """‖T g‖², the square of :func:`ascent_norm` before its square root: the additive partial a shard contributes.

    SAM tensors of one (device, dtype) group cost one foreach norm, a stack and a dot product of the
    per-tensor norms, whatever their number.
    """
    if not grads:
        raise ValueError("ascent_norm needs at least one gradient")
    out_dtype = sum_dtype(grads)
    device = grads[0].device
    norms: list[Tensor] = []
    for (is_adaptive, eta_value), group_params, group_grads in _bucket(params, grads, adaptive, eta):
        if not is_adaptive:
            norms.append(_tensor_norms(group_grads, out_dtype, device))
            continue
        for chunk_params, chunk_grads in chunks(group_params, group_grads):
            scaled = _scaling_operator(chunk_params, eta_value)
            torch._foreach_mul_(scaled, chunk_grads)
            norms.append(_tensor_norms(scaled, out_dtype, device))
    return _sum_of_squares(norms)


def _tensor_norms(tensors: list[Tensor], out_dtype: torch.dtype, device: torch.device) -> Tensor:
    """The L2 norm of each tensor of one (device, dtype) group, as a 1-D ``out_dtype`` tensor on ``device``."""
    norms = torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(tensors[0].dtype))
    return torch.stack(norms).to(device=device, dtype=out_dtype)


def _sum_of_squares(norms: list[Tensor]) -> Tensor:
    """Σ of the squares of all entries of a list of 1-D tensors, as one dot product."""
    flat = norms[0] if len(norms) == 1 else torch.cat(norms)
    return torch.linalg.vecdot(flat, flat)


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
        for chunk_params, chunk_grads in chunks(group_params, group_grads):
            direction = _scaling_operator(chunk_params, eta_value)
            torch._foreach_mul_(direction, direction)
            torch._foreach_mul_(direction, chunk_grads)
            torch._foreach_add_(chunk_params, direction, alpha=step)


_FOREACH_CLONE = getattr(torch, "_foreach_clone", None)


def clone_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Bitwise copies of ``tensors`` in new memory, with a constant number of dispatches.

    One ``_foreach_clone`` where torch has it (one multi-tensor kernel per group on CUDA); on older torch
    ``_foreach_mul(·, 1)``, which reproduces every value bit for bit (−0.0, ±inf and subnormals included;
    a NaN stays a NaN), and plain clones for non-floating tensors.
    """
    tensors = list(tensors)
    if not tensors:
        return []
    if _FOREACH_CLONE is not None:
        return list(_FOREACH_CLONE(tensors))
    if all(t.is_floating_point() for t in tensors):
        return list(torch._foreach_mul(tensors, 1.0))
    return [t.clone() for t in tensors]


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """Bitwise ``dst[i].copy_(src[i])`` for all i, batched per (device, dtype)."""
    for group_dst, group_src in group_by_device_and_dtype(dst, src):
        torch._foreach_copy_(group_dst, group_src)


def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Σ_i ‖t_i‖² as a 0-dim float32 (or wider) tensor on ``tensors[0].device``; one foreach norm per group."""
    out_dtype, device = sum_dtype(tensors), tensors[0].device
    return _sum_of_squares([_tensor_norms(group, out_dtype, device) for (group,) in group_by_device_and_dtype(tensors)])


def cosine(eps: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(cos(ε, g), ‖g‖) over all tensors as 0-dim tensors; no host sync, no parameter-sized temporaries."""
    dot_value, eps_sq, grad_sq = dot_and_squared_norms(eps, grads)
    tiny = torch.finfo(grad_sq.dtype).tiny
    cosine_value = dot_value / (eps_sq * grad_sq).sqrt().clamp_min(tiny)
    return cosine_value.clamp(-1.0, 1.0), grad_sq.sqrt()


def dot_and_squared_norms(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``[⟨a, b⟩, ‖a‖², ‖b‖²]`` over all tensor pairs: a 1-D float32 (or wider) tensor on ``a[0].device``.

    Per (device, dtype) group: one foreach norm over both lists and the dot product of :func:`dot`; the
    three sums are additive, so shards can all-reduce them as one vector.
    """
    if not a:
        raise ValueError("dot_and_squared_norms needs at least one tensor")
    out_dtype, device = sum_dtype(a), a[0].device
    rows: list[Tensor] = []
    for group_a, group_b in group_by_device_and_dtype(a, b):
        norms = _tensor_norms(group_a + group_b, out_dtype, device).view(2, -1)
        squares = torch.linalg.vecdot(norms, norms)
        rows.append(torch.cat([_group_dot(group_a, group_b).to(device=device, dtype=out_dtype).reshape(1), squares]))
    return rows[0] if len(rows) == 1 else torch.stack(rows).sum(dim=0)


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as a 0-dim float32 (or wider) tensor on ``a[0].device``; no host sync.

    Accumulated in float32 (float64 for float64 tensors); float16/bfloat16 pairs are upcast first. On CPU
    one fused ``vdot`` per pair (no temporaries; CPU foreach ops loop per tensor anyway); on accelerators
    a constant number of multi-tensor kernels per (device, dtype) group and chunk of tensors (see
    :func:`_dot_foreach`), so the cost does not grow with the number of tensors.
    """
    if not a:
        raise ValueError("dot needs at least one tensor")
    out_dtype, device = sum_dtype(a), a[0].device
    partial = [_group_dot(group_a, group_b).to(device=device, dtype=out_dtype)
               for group_a, group_b in group_by_device_and_dtype(a, b)]
    return partial[0] if len(partial) == 1 else torch.stack(partial).sum()


def _group_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return _dot_per_tensor(a, b) if a[0].device.type == "cpu" else _dot_foreach(a, b)


def _dot_per_tensor(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ ⟨a_i, b_i⟩ over one (device, dtype) group, one ``vdot`` per pair."""
    dtype = accumulation_dtype(a[0].dtype)
    products = [torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b, strict=True)]
    return torch.stack(products).sum()


def _dot_foreach(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ ⟨a_i, b_i⟩ over one (device, dtype) group with multi-tensor kernels.

    With p = a ⊙ b: Σ p = Σ|p| − 2 Σ|min(p, 0)|, two foreach L1 norms around one in-place clamp. The
    product is a temporary of at most ~``CHUNK_NUMEL`` elements (tensors above that go through ``vdot``,
    which needs none), so peak memory stays bounded. The result is within float32 rounding of Σ|p| of the
    exact sum, as any float32 dot product is.
    """
    dtype = accumulation_dtype(a[0].dtype)
    if a[0].dtype != dtype:  # float16/bfloat16: products in float32
        a, b = [x.to(dtype) for x in a], [y.to(dtype) for y in b]
    partial: list[Tensor] = []
    if any(x.numel() > CHUNK_NUMEL for x in a):
        large = [i for i, x in enumerate(a) if x.numel() > CHUNK_NUMEL]
        partial = [torch.vdot(a[i].reshape(-1), b[i].reshape(-1)).reshape(1) for i in large]
        keep = set(large)
        a = [x for i, x in enumerate(a) if i not in keep]
        b = [y for i, y in enumerate(b) if i not in keep]
    for chunk_a, chunk_b in chunks(a, b):
        products = torch._foreach_mul(chunk_a, chunk_b)
        absolute = torch._foreach_norm(products, 1)
        torch._foreach_clamp_max_(products, 0.0)
        negative = torch._foreach_norm(products, 1)
        sums = torch.stack(absolute + negative).view(2, -1).sum(dim=1)
        partial.append(sums[0:1].sub(sums[1:2], alpha=2.0))
    return partial[0].reshape(()) if len(partial) == 1 else torch.cat(partial).sum()
