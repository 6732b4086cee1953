"""Ascent directions and exact apply/restore, as pure functions over lists of tensors.

Every function batches its work with ``torch._foreach_*`` ops, one call per (device, dtype) group, and
never synchronises with the host. Reductions (norms, dot products) run over flattened chunks of at most
``CHUNK_NUMEL`` elements for the tensors :func:`_flatten_limit` names small (all of them on accelerators, those
of at most ``CPU_FLATTEN_NUMEL`` elements on CPU) and one tensor at a time for the rest.
Notation (Foret et al. 2021; Kwon et al. 2021):

* SAM:   ε = ρ · g / ‖g‖
* ASAM:  ε = ρ · T² g / ‖T g‖ with the element-wise operator T = |w| + η

``‖·‖`` is one global L2 norm over every perturbed tensor, accumulated in float32 (or float64 when the
gradients are float64). η keeps zero-valued weights (LoRA's ``B``, zero-initialised biases) perturbable.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "accumulation_dtype",
    "apply_ascent_",
    "apply_groups_",
    "ascent_groups",
    "ascent_norm",
    "ascent_sum_of_squares",
    "AscentGroup",
    "AscentPlans",
    "check_real",
    "chunks",
    "clone_all",
    "copy_",
    "cosine",
    "dot",
    "dot_and_squared_norms",
    "group_by_device_and_dtype",
    "groups_sum_of_squares",
    "largest_magnitude",
    "norm_in_float64",
    "squared_norm",
    "sum_dtype",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are accumulated in: float32, or wider when ``dtype`` is wider."""
    return torch.promote_types(dtype, torch.float32)


def _reduction_dtype(dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm of ``dtype`` tensors is reduced in: its accumulation dtype, or ``out_dtype`` where that is
    wider (float32 gradients beside float64 ones, whose squares could underflow in float32)."""
    return torch.promote_types(accumulation_dtype(dtype), out_dtype)


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
    """Parallel lists split by the (device, dtype) of the first list's tensors, order preserved; the other lists
    may hold anything (tensors of other dtypes, indices)."""
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

_DEVICE = operator.attrgetter("device")
_DTYPE = operator.attrgetter("dtype")


def chunks(*tensor_lists: Sequence[Tensor]):
    """Yield consecutive slices of parallel tensor lists in which the first list's tensors share device and
    dtype and hold at most ~CHUNK_NUMEL elements together (a single larger tensor forms its own slice)."""
    first_list = tensor_lists[0]
    kinds = list(zip(map(_DEVICE, first_list), map(_DTYPE, first_list)))
    start = 0
    for _, run in itertools.groupby(kinds):
        stop = start + sum(1 for _ in run)
        yield from _size_chunks(*(lst[start:stop] for lst in tensor_lists))
        start = stop



def _size_chunks(*tensor_lists: Sequence[Tensor]):
    """:func:`chunks` for lists whose first list's tensors already share one device and dtype."""
    for start, stop in _chunk_ranges(list(map(Tensor.numel, tensor_lists[0]))):
        yield tuple(list(lst[start:stop]) for lst in tensor_lists)


def _chunk_ranges(sizes: list[int], limit: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges over consecutive tensors of these sizes (elements) holding at most ~``limit``
    (default CHUNK_NUMEL) elements together (a single larger tensor forms its own range)."""
    limit = CHUNK_NUMEL if limit is None else limit
    if sum(sizes) <= limit:
        return [(0, len(sizes))] if sizes else []
    ranges, start, numel = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and numel + size > limit:
            ranges.append((start, index))
            start, numel = index, 0
        numel += size
    ranges.append((start, len(sizes)))
    return ranges


def _scaling_operator(params: list[Tensor], eta: float) -> list[Tensor]:
    """T = |w| + η, element-wise, as new tensors shaped like ``params``."""
    operator = torch._foreach_abs(params)
    torch._foreach_add_(operator, eta)
    return operator


@dataclass(slots=True)
class AscentGroup:
    """Parallel tensors that take one set of foreach calls: one ASAM setting, one radius, one device and dtype.

    Attributes:
        adaptive, eta: ASAM's switch and η (η is 0.0 when ``adaptive`` is False).
        rho: the radius ρ; :func:`apply_groups_` moves these tensors by ρ/‖T g‖ along T²g.
        params, grads: the weights and their ascent directions (gradients), pairwise of one shape.
        indices: the positions of these tensors in the lists they were split from.
        sizes: the split of these tensors for reductions (:class:`SizeSplit`), when already known (an
            :class:`AscentPlans` group); None: computed from the tensors when needed.
        maximize: the group's base optimizer maximises (``maximize=True``): the objective is −loss, so
            :func:`apply_groups_` moves against the gradient of the loss (unless told the directions already
            carry that sign).
    """

    adaptive: bool
    eta: float
    rho: float
    params: list[Tensor]
    grads: list[Tensor]
    indices: list[int]
    sizes: SizeSplit | None = None
    maximize: bool = False


def ascent_groups(
    params: Sequence[Tensor], grads: Sequence[Tensor], settings: Sequence[Mapping[str, Any]]
) -> list[AscentGroup]:
    """Split parallel lists into :class:`AscentGroup` s by setting (``adaptive``, ``eta``, ``rho``) and by
    (device, dtype). ``settings[i]`` is the param-group dict of tensor ``i``; one shared dict (the usual
    case) costs a single grouping call whatever the number of tensors."""
    first = settings[0]
    if all(map(operator.is_, settings, itertools.repeat(first))):
        return _split(params, grads, [_setting_key(first)], None)
    keys_by_id: dict[int, tuple[bool, float, float]] = {}
    keys = [keys_by_id.setdefault(id(setting), _setting_key(setting)) for setting in settings]
    return _split(params, grads, list(dict.fromkeys(keys)), keys)


def _setting_key(setting: Mapping[str, Any]) -> tuple[bool, float, float, bool]:
    """(adaptive, eta, rho, maximize) of a param group (η is 0.0 when not adaptive)."""
    adaptive = bool(setting["adaptive"])
    return adaptive, float(setting["eta"]) if adaptive else 0.0, float(setting["rho"]), bool(setting.get("maximize"))


def _split(params, grads, distinct_keys, keys) -> list[AscentGroup]:
    """Groups for every key in ``distinct_keys``; ``keys`` gives each tensor's key (None: all share the one)."""
    groups: list[AscentGroup] = []
    for key in distinct_keys:
        if keys is None:
            positions, key_params, key_grads = None, list(params), list(grads)
        else:
            positions = [i for i, k in enumerate(keys) if k == key]
            key_params, key_grads = [params[i] for i in positions], [grads[i] for i in positions]
        for group_params, group_grads, indices in _group_with_indices(key_params, key_grads):
            if positions is not None:
                indices = [positions[i] for i in indices]
            adaptive, eta, rho, maximize = key
            groups.append(AscentGroup(adaptive, eta, rho, group_params, group_grads, indices, maximize=maximize))
    return groups


def _group_with_indices(params: list[Tensor], grads: list[Tensor]):
    """(params, grads, indices) per (device, dtype) of the parameters, order preserved within each group."""
    try:
        grouped = _group_tensors_by_device_and_dtype([params], with_indices=True)
    except RuntimeError:  # not a dense strided tensor list torch can group
        return _group_in_python(params, grads, range(len(params)))
    if len(grouped) == 1:
        ((group_params,), indices), = grouped.values()
        return [(group_params, list(grads), list(range(len(params))))]
    return [(group_params, [grads[i] for i in indices], list(indices))
            for (group_params,), indices in grouped.values()]


def _runs_key(settings: Sequence[Mapping[str, Any]]) -> tuple:
    """(identity, length, setting) of each run of consecutive tensors that share one param-group dict."""
    key = []
    for _, run in itertools.groupby(settings, key=id):
        members = list(run)
        key.append((id(members[0]), len(members), _setting_key(members[0])))
    return tuple(key)


def check_real(dtypes: Iterable[torch.dtype]) -> None:
    """Raise TypeError if any of ``dtypes`` is complex (the ascent's norms and products assume real tensors)."""
    if any(dtype.is_complex for dtype in dtypes):
        raise TypeError("SAM does not support complex parameters: optimise torch.view_as_real views of them instead")


@dataclass(frozen=True, slots=True)
class SizeSplit:
    """Which tensors of one (device, dtype) group :func:`_flatten_limit` calls small, and how those split into
    flattened chunks: ``small``/``large`` are masks over the group (None: all small), ``small_chunks`` the
    ``[start, stop)`` ranges of the chunks over the small tensors."""

    small: list[bool] | None
    large: list[bool] | None
    small_chunks: list[tuple[int, int]]

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> SizeSplit:
        limit = _flatten_limit(tensors[0].device)
        sizes = list(map(Tensor.numel, tensors))
        small = None if limit == math.inf else [size <= limit for size in sizes]
        if small is not None and all(small):
            small = None
        small_sizes = sizes if small is None else list(itertools.compress(sizes, small))
        return cls(small, None if small is None else [not flag for flag in small],
                   _chunk_ranges(small_sizes, flat_chunk_numel(tensors[0].device)))

    def split(self, *tensor_lists: Sequence[Tensor]) -> tuple[tuple[list[Tensor], ...], tuple[list[Tensor], ...]]:
        """Parallel lists over the group split into (small, large) parts, as :func:`_split_by_size` does."""
        if self.small is None:
            return tuple(list(lst) for lst in tensor_lists), tuple([] for _ in tensor_lists)
        return (tuple(list(itertools.compress(lst, self.small)) for lst in tensor_lists),
                tuple(list(itertools.compress(lst, self.large)) for lst in tensor_lists))

    def flat_chunks(self, *small_lists: Sequence[Tensor], dtype: torch.dtype | None = None):
        """:func:`_flat_chunks` over the small parts, along the precomputed ranges."""
        return _flat_ranges(small_lists, self.small_chunks, dtype)


@dataclass(frozen=True, slots=True)
class _GroupPlan:
    setting: Mapping[str, Any] | None  # the one param group every tensor belongs to (ρ read each step), or None
    adaptive: bool
    eta: float
    rho: float
    maximize: bool
    params: list[Tensor]
    indices: list[int]
    identity: bool  # indices are 0..n-1: the group takes the gradient list as it is
    sizes: SizeSplit


class AscentPlans:
    """:func:`ascent_groups` that remembers its grouping (and each group's :class:`SizeSplit`) for the last list
    of tensors, so a step over the same tensors, dtypes, devices and settings only slots in its new gradients.

    The cache key holds the tensors' identities, storage addresses (new whenever ``.data``, the device, dtype
    or size of a tensor changes) and dtypes, and their settings (the param-group dict and its
    ``adaptive``/``eta`` when one group holds every tensor, whose ``rho`` is then read each step; every
    setting otherwise). One entry: the last list. Tensors without storage (DTensor) are not grouped here.
    """

    __slots__ = ("_key", "_plans")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._plans: list[_GroupPlan] | None = []

    def groups(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        settings: Sequence[Mapping[str, Any]],
        admit: Callable[[], bool] | None = None,
    ) -> list[AscentGroup] | None:
        """:func:`ascent_groups` of these lists. ``admit`` is asked once per new key whether the lists may be
        grouped here at all (e.g. not sharded); where it says no, and for tensors without storage, this
        returns None."""
        first = settings[0]
        shared = all(map(operator.is_, settings, itertools.repeat(first)))
        setting_key = ((id(first), bool(first["adaptive"]), float(first["eta"]), bool(first.get("maximize")))
                       if shared else _runs_key(settings))
        try:
            storages = tuple(map(Tensor.data_ptr, params))
        except RuntimeError:  # a tensor subclass without storage (a DTensor): nothing to key on
            return None
        dtypes = tuple(map(_DTYPE, params))
        key = (tuple(map(id, params)), storages, dtypes, setting_key, _flatten_limit(params[0].device))
        if key != self._key:
            self._key, self._plans = key, None
            check_real(set(dtypes))  # a gradient has its parameter's dtype (autograd checks every assignment)
            if admit is not None and not admit():
                return None
            self._plans = [
                _GroupPlan(first if shared else None, g.adaptive, g.eta, g.rho, g.maximize, g.params, g.indices,
                           g.indices == list(range(len(params))), SizeSplit.of(g.params))
                for g in ascent_groups(params, grads, settings)
            ]
        if self._plans is None:
            return None
        groups = []
        for plan in self._plans:
            rho = plan.rho if plan.setting is None else float(plan.setting["rho"])
            group_grads = list(grads) if plan.identity else [grads[i] for i in plan.indices]
            groups.append(AscentGroup(plan.adaptive, plan.eta, rho, plan.params, group_grads, plan.indices, plan.sizes,
                                      plan.maximize))
        return groups


def groups_sum_of_squares(groups: Sequence[AscentGroup], device: torch.device | None = None) -> Tensor:
    """‖T g‖² over all groups: a 0-dim float32 (float64 if any gradient is) tensor on ``device`` (default:
    that of the first group's gradients). A SAM group costs one reduction per flattened chunk of small tensors
    and per large tensor (see :func:`_flatten_limit`), a stack and a dot product."""
    out_dtype = torch.float32
    for group in groups:
        out_dtype = torch.promote_types(out_dtype, accumulation_dtype(group.grads[0].dtype))
    device = groups[0].grads[0].device if device is None else device
    norms: list[Tensor] = []
    for group in groups:
        sizes = group.sizes or SizeSplit.of(group.params)
        if not group.adaptive:
            norms.append(_tensor_norms(group.grads, out_dtype, device, sizes))
            continue
        (small_params, small_grads), (large_params, large_grads) = sizes.split(group.params, group.grads)
        if small_params:
            norms.append(_flat_scaled_norms(small_params, small_grads, group.eta, out_dtype, device, sizes))
        for chunk_params, chunk_grads in _size_chunks(large_params, large_grads):
            # T g in float32 (float64 beside float64 groups), as the flattened path
            accumulate = _reduction_dtype(chunk_grads[0].dtype, out_dtype)
            chunk_params, chunk_grads = _in_dtype(chunk_params, accumulate), _in_dtype(chunk_grads, accumulate)
            scaled = _scaling_operator(chunk_params, group.eta)
            torch._foreach_mul_(scaled, chunk_grads)
            norms.append(_per_tensor_norms(scaled, out_dtype, device))
    return _sum_of_squares(norms)


def _flat_scaled_norms(
    params: list[Tensor], grads: list[Tensor], eta: float, out_dtype: torch.dtype, device: torch.device,
    sizes: SizeSplit,
) -> Tensor:
    """‖T g‖ per flattened chunk of the small ASAM tensors of a group split by ``sizes`` (T g formed in the
    accumulation dtype, or ``out_dtype`` if wider), as a 1-D ``out_dtype`` tensor on ``device``."""
    accumulate = _reduction_dtype(grads[0].dtype, out_dtype)
    norms = []
    for flat_params, flat_grads in sizes.flat_chunks(params, grads, dtype=accumulate):
        scaled = flat_params.abs().add_(eta).mul_(flat_grads)
        norms.append(torch.linalg.vector_norm(scaled))
    return torch.stack(norms).to(device=device, dtype=out_dtype)


def apply_groups_(groups: Sequence[AscentGroup], norm: float, sign: float = 1.0, follow_maximize: bool = True) -> None:
    """In place: w += sign · (ρ/norm) · T² g for every group (T = |w| + η for ASAM groups, 1 for SAM groups).

    ``sign`` is +1 for an ascent along g and −1 for a move against it. With ``follow_maximize`` a group whose
    base optimizer maximises moves the other way (its objective is −loss, whose ascent is −g); directions that
    already carry the objective's sign (a maximising optimizer's momentum) pass False. SAM groups need no
    temporary at all; ASAM builds T in chunks of at most ~4M elements.
    """
    for group in groups:
        step = (-sign if follow_maximize and group.maximize else sign) * group.rho / norm
        params, grads = group.params, group.grads
        if abs(step) > _FLOAT32_MAX and params[0].dtype != torch.float64:  # ‖g‖ subnormal: ρ/‖g‖ > float32's range
            _apply_widened_(group, step, torch.float64)
            continue
        if params[0].dtype == torch.float16:
            _apply_widened_(group, step, torch.float32)
            continue
        grads = _in_dtype(grads, params[0].dtype)
        if not group.adaptive:
            torch._foreach_add_(params, grads, alpha=step)
            continue
        for chunk_params, chunk_grads in _size_chunks(params, grads):
            direction = _scaling_operator(chunk_params, group.eta)
            torch._foreach_mul_(direction, direction)
            torch._foreach_mul_(direction, chunk_grads)
            torch._foreach_add_(chunk_params, direction, alpha=step)


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _apply_widened_(group: AscentGroup, step: float, wide: torch.dtype) -> None:
    """:func:`apply_groups_` with ``step`` · T²g formed in the ``wide`` dtype and rounded once into the weights:
    float32 for float16 weights, where the scalar ``step`` itself can round to zero (ρ/‖g‖ below ~6e-8) and
    T²g overflow (above 65504); float64 where ``step`` exceeds float32's range (a subnormal ‖g‖). bfloat16 has
    float32's range and otherwise takes the plain path. Temporaries hold at most ~CHUNK_NUMEL ``wide``
    elements: larger contiguous tensors are taken in slices."""
    for chunk_params, chunk_grads in _bounded_slices(group.params, group.grads):
        direction = [g.to(wide, copy=True) for g in chunk_grads]
        if group.adaptive:
            scaling = _scaling_operator(_in_dtype(chunk_params, wide), group.eta)
            torch._foreach_mul_(scaling, scaling)
            torch._foreach_mul_(direction, scaling)
        torch._foreach_mul_(direction, step)
        torch._foreach_add_(chunk_params, direction)


def largest_magnitude(tensors: Sequence[Tensor]) -> float:
    """max |t| over all elements of ``tensors`` (nan if any is nan, inf if any is infinite, 0.0 for none): one
    foreach max-norm per (device, dtype), one host sync. Tensors without elements are left out (their max-norm
    is undefined)."""
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return 0.0
    peaks = [torch.stack(torch._foreach_norm(group, math.inf)).amax().float()
             for (group,) in group_by_device_and_dtype(tensors)]
    device = peaks[0].device
    return float(torch.stack([peak.to(device) for peak in peaks]).amax())


def _bounded_slices(params: list[Tensor], grads: list[Tensor]):
    """Parallel lists of (views of) ``params`` and ``grads`` holding at most ~CHUNK_NUMEL elements together: a
    contiguous tensor larger than that is cut into flat slices of it (a non-contiguous one stays whole)."""
    pieces: list[tuple[Tensor, Tensor]] = []
    for param, grad in zip(params, grads, strict=True):
        if param.numel() <= CHUNK_NUMEL or not param.is_contiguous():
            pieces.append((param, grad))
            continue
        flat_param, flat_grad = param.view(-1), grad.reshape(-1)
        pieces.extend((flat_param[start:start + CHUNK_NUMEL], flat_grad[start:start + CHUNK_NUMEL])
                      for start in range(0, param.numel(), CHUNK_NUMEL))
    yield from _size_chunks([p for p, _ in pieces], [g for _, g in pieces])


def norm_in_float64(groups: Sequence[AscentGroup]) -> float:
    """‖T g‖ over all groups accumulated in float64, tensor by tensor: the slow, range-safe recomputation for a
    float32 norm that overflowed (a global norm above ~1.8e19, e.g. gradients under a large GradScaler scale) or
    underflowed to zero (elements below ~1e-23) while every element is finite. Non-finite gradients give a
    non-finite result. One float64 temporary of one tensor at a time; one host sync."""
    total = None
    for group in groups:
        for param, grad in zip(group.params, group.grads, strict=True):
            value = grad.detach().to(torch.float64)
            if group.adaptive:
                value = value * (param.detach().to(torch.float64).abs() + group.eta)
            square = torch.linalg.vecdot(value.reshape(-1), value.reshape(-1))
            total = square if total is None else total + square.to(total.device)
    return math.sqrt(float(total)) if total is not None else 0.0


def _tensor_norms(
    tensors: list[Tensor], out_dtype: torch.dtype, device: torch.device, sizes: SizeSplit | None = None
) -> Tensor:
    """L2 norms of pieces that cover one (device, dtype) group, whose squares sum to Σ_i ‖t_i‖²: one per
    flattened chunk of small tensors and one per large tensor (see :func:`_flatten_limit`; ``sizes``: that
    split, if known). A 1-D ``out_dtype`` tensor on ``device``. Reduced in ``out_dtype`` where that is wider
    than the tensors' accumulation dtype (float32 gradients beside float64 ones), so that float32 gradients
    below ~1e-19, whose squares underflow in float32, still count."""
    sizes = sizes or SizeSplit.of(tensors)
    (small,), (large,) = sizes.split(tensors)
    accumulate = _reduction_dtype(tensors[0].dtype, out_dtype)
    norms = [torch.linalg.vector_norm(flat, dtype=accumulate) for (flat,) in sizes.flat_chunks(small)]
    if large:
        norms.extend(torch._foreach_norm(large, 2, dtype=accumulate))
    return torch.stack(norms).to(device=device, dtype=out_dtype)


def _per_tensor_norms(tensors: list[Tensor], out_dtype: torch.dtype, device: torch.device) -> Tensor:
    """‖t_i‖ for every tensor, one foreach call: a 1-D ``out_dtype`` tensor on ``device`` (reduced in
    ``out_dtype`` where that is wider than the tensors' accumulation dtype)."""
    norms = torch._foreach_norm(tensors, 2, dtype=_reduction_dtype(tensors[0].dtype, out_dtype))
    return torch.stack(norms).to(device=device, dtype=out_dtype)


# On CPU, reductions flatten tensors of at most this many elements and reduce larger ones one by one. Measured
# on the project's 2-core CPU: a norm costs ~1.1-1.2 µs per tensor of ≤ 1024 elements through
# ``_foreach_norm`` and ~0.5-0.7 µs as its share of one flattened norm; from ~4096 elements on, the copy into
# the flat buffer costs more than the per-tensor call it saves (``scripts/bench/sam_step.py`` times this
# default against all-per-tensor and all-flattened reductions).
CPU_FLATTEN_NUMEL = 1024


# Accelerators flatten every tensor for a reduction, in chunks of up to this many elements (32 MB in float32;
# a dot product holds two). Each chunk costs a few launches of host time, and the host bounds a SAM step on a
# model of small tensors: on an H200 (2026-11-28), perturb+restore with statistics on MiniLM took ~2.57 ms of
# host time with 8M-element chunks against ~2.68 ms with CHUNK_NUMEL's 4M.
ACCELERATOR_FLAT_CHUNK_NUMEL = 1 << 23


def flat_chunk_numel(device: torch.device) -> int:
    """The most elements one flattened reduction chunk holds on ``device``: CHUNK_NUMEL on CPU (which flattens
    only tensors of at most ``CPU_FLATTEN_NUMEL`` elements), ``ACCELERATOR_FLAT_CHUNK_NUMEL`` elsewhere."""
    return CHUNK_NUMEL if device.type == "cpu" else ACCELERATOR_FLAT_CHUNK_NUMEL


def _flatten_limit(device: torch.device) -> float:
    """The largest tensor (in elements) whose reductions on ``device`` run over a flattened chunk.

    Accelerators flatten every tensor: ``_foreach_norm`` allocates one 0-dim output per tensor and ``stack``
    collects them again, a few µs of host time per tensor, and a SAM step on a model of many small tensors is
    host-bound, while flattening costs one view per tensor and one copy kernel. CPU foreach ops loop per tensor
    anyway, so only tensors small enough that their per-call overhead exceeds the copy are flattened there.
    """
    return CPU_FLATTEN_NUMEL if device.type == "cpu" else math.inf


def _split_by_size(*tensor_lists: Sequence[Tensor]) -> tuple[tuple[list[Tensor], ...], tuple[list[Tensor], ...]]:
    """Parallel lists split into (small, large) by the first list's tensors against :func:`_flatten_limit`,
    order preserved within each part."""
    return SizeSplit.of(tensor_lists[0]).split(*tensor_lists)


def _flat_chunks(*tensor_lists: Sequence[Tensor], dtype: torch.dtype | None = None):
    """Per chunk of parallel lists of one device and dtype (see :func:`chunks`), one 1-D tensor per list holding
    the chunk's elements in order, cast to ``dtype`` if given: a new buffer of at most ~CHUNK_NUMEL elements, or
    a view of a single contiguous tensor."""
    first = tensor_lists[0]
    return _flat_ranges(tensor_lists, _chunk_ranges(list(map(Tensor.numel, first)), flat_chunk_numel(first[0].device)),
                        dtype)


def _flat_ranges(tensor_lists: Sequence[Sequence[Tensor]], ranges: list[tuple[int, int]], dtype: torch.dtype | None):
    """Per ``[start, stop)`` range, one 1-D tensor per list holding those tensors' elements in order, cast to
    ``dtype`` if given: a view of a single contiguous tensor, or a new flattened buffer."""
    for start, stop in ranges:
        flats = (lst[start].reshape(-1) if stop - start == 1 else _flatten_dense_tensors(lst[start:stop])
                 for lst in tensor_lists)
        yield tuple(flat if dtype is None else flat.to(dtype) for flat in flats)


def _sum_of_squares(norms: list[Tensor]) -> Tensor:
    """Σ of the squares of all entries of a list of 1-D tensors, as one dot product."""
    flat = norms[0] if len(norms) == 1 else torch.cat(norms)
    return torch.linalg.vecdot(flat, flat)


def _per_tensor_groups(params, grads, adaptive, eta, radius) -> list[AscentGroup]:
    keys = [(bool(a), float(e) if a else 0.0, float(r), False) for a, e, r in zip(adaptive, eta, radius, strict=True)]
    distinct = list(dict.fromkeys(keys))
    return _split(params, grads, distinct, None if len(distinct) == 1 else keys)


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
    groups = _per_tensor_groups(params, grads, adaptive, eta, [0.0] * len(grads))
    return groups_sum_of_squares(groups, grads[0].device)


def apply_ascent_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    step_size: Sequence[float],
    adaptive: Sequence[bool],
    eta: Sequence[float],
) -> None:
    """In place: w_i += step_size_i · T_i² g_i, with T_i = |w_i| + η_i (ASAM) or 1 (SAM).

    ``step_size_i`` is ρ_i / ‖T g‖ as a Python float.
    """
    if params:
        apply_groups_(_per_tensor_groups(params, grads, adaptive, eta, step_size), 1.0)


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
    """Σ_i ‖t_i‖² as a 0-dim float32 (or wider) tensor on ``tensors[0].device``; no host sync."""
    out_dtype, device = sum_dtype(tensors), tensors[0].device
    return _sum_of_squares([_tensor_norms(group, out_dtype, device) for (group,) in group_by_device_and_dtype(tensors)])


def cosine(eps: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(cos(ε, g), ‖g‖) over all tensors as 0-dim tensors; no host sync, no parameter-sized temporaries."""
    sums = dot_and_squared_norms(eps, grads)
    norms = sums[1:].sqrt()  # ‖ε‖, ‖g‖
    product = norms.prod().clamp_min(torch.finfo(sums.dtype).tiny)  # product of the norms: no underflow
    return (sums[0] / product).clamp(-1.0, 1.0), norms[1]


def dot_and_squared_norms(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``[⟨a, b⟩, ‖a‖², ‖b‖²]`` over all tensor pairs: a 1-D float32 (or wider) tensor on ``a[0].device``.

    Per (device, dtype) group: one ``dot`` and one two-row norm per flattened chunk of small tensors (see
    :func:`_flatten_limit`), and for the large ones one foreach norm over both lists and one ``vdot`` per pair.
    The three sums are additive, so shards can all-reduce them as one vector.
    """
    if not a:
        raise ValueError("dot_and_squared_norms needs at least one tensor")
    out_dtype, device = sum_dtype(a), a[0].device
    rows: list[Tensor] = []
    for group_a, group_b in group_by_device_and_dtype(a, b):
        (small_a, small_b), (large_a, large_b) = _split_by_size(group_a, group_b)
        if small_a:
            rows.append(_flat_dot_and_squares(small_a, small_b).to(device=device, dtype=out_dtype))
        if large_a:
            norms = _per_tensor_norms(large_a + large_b, out_dtype, device).view(2, -1)
            rows.append(torch.cat([_dot_per_tensor(large_a, large_b).to(device=device, dtype=out_dtype).reshape(1),
                                   torch.linalg.vecdot(norms, norms)]))
    return rows[0] if len(rows) == 1 else torch.stack(rows).sum(dim=0)


def _flat_dot_and_squares(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``[⟨a, b⟩, ‖a‖², ‖b‖²]`` over one (device, dtype) group, in the accumulation dtype.

    Per chunk of several tensors, one buffer holds the chunk of ``a`` and then that of ``b`` (one copy), and a
    dot product and one two-row norm reduce it; a tensor forming a chunk on its own is reduced in place.
    """
    dtype = accumulation_dtype(a[0].dtype)
    dots, norm_pairs = [], []
    for start, stop in _chunk_ranges(list(map(Tensor.numel, a)), flat_chunk_numel(a[0].device)):
        if stop - start == 1:
            flat_a, flat_b = a[start].reshape(-1).to(dtype), b[start].reshape(-1).to(dtype)
            dots.append(torch.dot(flat_a, flat_b))
            norm_pairs.append(torch.stack(torch._foreach_norm([flat_a, flat_b])))
            continue
        pair = _flatten_dense_tensors(a[start:stop] + b[start:stop]).to(dtype).view(2, -1)
        dots.append(torch.dot(pair[0], pair[1]))
        norm_pairs.append(torch.linalg.vector_norm(pair, dim=1))
    dot_value = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
    squares = norm_pairs[0].square() if len(norm_pairs) == 1 else torch.stack(norm_pairs).square().sum(dim=0)
    return torch.cat([dot_value.reshape(1), squares])


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ as a 0-dim float32 (or wider) tensor on ``a[0].device``; no host sync.

    Accumulated in float32 (float64 for float64 tensors); float16/bfloat16 pairs are upcast first. One ``dot``
    per flattened chunk of at most ~``CHUNK_NUMEL`` elements of small tensors (all of them on accelerators, see
    :func:`_flatten_limit` and :func:`_dot_flat`) and one fused ``vdot`` per pair of large ones.
    """
    if not a:
        raise ValueError("dot needs at least one tensor")
    out_dtype, device = sum_dtype(a), a[0].device
    partial = [_group_dot(group_a, group_b).to(device=device, dtype=out_dtype)
               for group_a, group_b in group_by_device_and_dtype(a, b)]
    return partial[0] if len(partial) == 1 else torch.stack(partial).sum()


def _group_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    (small_a, small_b), (large_a, large_b) = _split_by_size(a, b)
    partial = []
    if small_a:
        partial.append(_dot_flat(small_a, small_b))
    if large_a:
        partial.append(_dot_per_tensor(large_a, large_b))
    return partial[0] if len(partial) == 1 else torch.stack(partial).sum()


def _dot_per_tensor(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ ⟨a_i, b_i⟩ over one (device, dtype) group, one ``vdot`` per pair."""
    dtype = accumulation_dtype(a[0].dtype)
    a, b = _in_dtype(a, dtype), _in_dtype(b, dtype)
    products = [torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]
    return torch.stack(products).sum()


def _in_dtype(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``tensors`` cast to ``dtype``; the list itself when all of them are already of it (no per-tensor call)."""
    if all(map(operator.is_, map(_DTYPE, tensors), itertools.repeat(dtype))):
        return tensors
    return [t.to(dtype) for t in tensors]


def _dot_flat(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ ⟨a_i, b_i⟩ over one (device, dtype) group: one ``dot`` per flattened chunk, in the accumulation dtype.

    The temporaries are two chunk buffers of at most ~``CHUNK_NUMEL`` elements (none for a tensor that forms a
    chunk on its own), so peak memory stays bounded whatever the model size.
    """
    partial = [torch.dot(flat_a, flat_b) for flat_a, flat_b in _flat_chunks(a, b, dtype=accumulation_dtype(a[0].dtype))]
    return partial[0] if len(partial) == 1 else torch.stack(partial).sum()
