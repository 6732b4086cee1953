"""SAM on sharded parameters: DTensor local shards (FSDP2 ``fully_shard``) and one all-reduce per global sum.

Under FSDP2 every parameter ``w`` and its gradient ``g`` are DTensors whose local tensors hold one rank's
shard. SAM's ascent needs sums over the *full* tensors, ``‖T g‖² = Σ_ranks Σ_local (T g)²`` (and, for the
statistics, ⟨ε, g_SAM⟩, ‖ε‖², ‖g_SAM‖²), while ε itself is element-wise, so it is applied to the local
shards as they are and restore copies the local shards back. A :class:`ShardLayout` maps parameters to their
local tensors and sums per-rank partials with ONE ``all_reduce`` over the device mesh, however many
tensors there are.

Counting rule: a rank's local piece is added to a global sum iff it is a distinct part of the full tensor,
i.e. the rank's mesh coordinate is 0 on every mesh dimension the tensor is *not* sharded on (``Replicate``
placements, HSDP's replica dimension; ``Shard`` and FSDP2's ``_StridedShard`` over a tensor-parallel shard both
shard). Plain (non-DTensor) tensors next to DTensors are treated as replicated over the mesh: counted once, on
the rank at mesh coordinate 0.

Several meshes (FSDP × tensor parallelism: the tensor-parallel weights on the 2-D mesh, the others on its FSDP
slice) must be slices of one mesh over all ranks: a slice's copies along the other dimensions then hold the
same pieces, and the copy that holds global rank 0 counts them; the sums run over all ranks (plain tensors
count on global rank 0). A gradient laid out otherwise than its parameter (tensor parallelism's embedding:
``Replicate`` gradient, ``Shard`` weight) is redistributed to the parameter's layout first
(:func:`align_gradients`).

FSDP1 (``FullyShardedDataParallel``) is refused, with ``use_orig_params`` True or False: its parameters
are slices of each rank's flat shard that do not record the process group they are sharded over. Use FSDP2
(``fully_shard``, or ``fsdp_version: 2`` in an Accelerate config).

Nothing here imports ``torch.distributed.tensor`` or ``fsdp``: a DTensor (or an FSDP1 parameter) cannot exist unless its module
was imported already. An unsharded model pays one set of its parameters' types per step (measured: ~13 µs
for 200 tensors; ~45 µs once ``torch.distributed.fsdp`` is imported, for the FSDP1 check), and no collective.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterable, Sequence
from itertools import repeat

import torch
from torch import Tensor, nn

from arrcoc_sam.sam import perturbation

__all__ = ["ShardLayout", "align_gradients", "check_fsdp_run", "check_model_supported", "is_sharded"]

_FSDP1_HINT = (
    "FSDP1 (FullyShardedDataParallel) is not supported by SAM: its parameters are flat shards that do not "
    "record the process group they are sharded over, so SAM cannot form the full gradient norm. Use FSDP2: "
    "torch.distributed.fsdp.fully_shard, or `fsdp_version: 2` in the Accelerate config "
    "(fsdp_config={'fsdp_version': 2} for the Trainer)"
)


def _dtensor_type() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` was imported (else no DTensor can exist), otherwise None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _has_dtensor(types: set[type]) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(issubclass(t, dtensor) for t in types)


_INSTANCE_DICT = operator.attrgetter("__dict__")


def _has_fsdp1(params: Sequence[Tensor], types: set[type]) -> bool:
    """Any FSDP1 ``FlatParameter``, or original parameter FSDP1 flattened (``use_orig_params=True``)."""
    flat = getattr(sys.modules.get("torch.distributed.fsdp._flat_param"), "FlatParameter", None)
    if flat is None:
        return False
    if any(issubclass(t, flat) for t in types):
        return True
    return any(map(operator.contains, map(_INSTANCE_DICT, params), repeat("_fsdp_flattened")))


def _types(params: Sequence[Tensor]) -> set[type]:
    return set(map(type, params))


def is_sharded(params: Iterable[Tensor]) -> bool:
    """True if any tensor is a DTensor (FSDP2, tensor parallel) or an FSDP1 parameter (flat or flattened)."""
    params = list(params)
    types = _types(params)
    return _has_dtensor(types) or _has_fsdp1(params, types)


def align_gradients(params: Iterable[Tensor]) -> bool:
    """Give every DTensor parameter's gradient the parameter's placements where they differ and the gradient is
    reduced (no ``Partial``): ``p.grad`` is replaced by its redistribution (``Replicate`` → ``Shard`` is a local
    slice; ``Shard`` → ``Replicate`` an all-gather, which every rank makes alike). The values are the same
    tensor's; SAM reads local pieces, which must line up with the parameter's. Returns whether any gradient was
    replaced (False without DTensors)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    replaced = False
    for p in params:
        grad = p.grad
        if (isinstance(p, dtensor) and isinstance(grad, dtensor) and grad.placements != p.placements
                and grad.device_mesh == p.device_mesh and not any(pl.is_partial() for pl in grad.placements)):
            p.grad = grad.redistribute(p.device_mesh, p.placements)
            replaced = True
    return replaced


def check_model_supported(model: nn.Module) -> None:
    """Raise if ``model`` holds FSDP1 parameters (any ``FullyShardedDataParallel`` wrap); FSDP2 and plain pass.

    Raises:
        ValueError: naming FSDP2 as the supported alternative.
    """
    params = list(model.parameters())
    if _has_fsdp1(params, _types(params)):
        raise ValueError(_FSDP1_HINT)


def check_fsdp_run(scope: str, fsdp_version: int | None) -> None:
    """Refuse sharpness-aware settings that have no meaning under FSDP (for SAMTrainer / the Accelerate helper).

    Args:
        scope: the ``sam_scope`` (``global`` | ``per_device`` | ``microbatch``).
        fsdp_version: 1 or 2 when the run uses FSDP, None without FSDP.
    Raises:
        ValueError: FSDP1, or a scope other than ``global`` under FSDP.
    """
    if fsdp_version is None:
        return
    if fsdp_version != 2:
        raise ValueError(f"fsdp_version={fsdp_version!r}: " + _FSDP1_HINT)
    if scope != "global":
        raise ValueError(
            f"sam_scope={scope!r} has no meaning under FSDP (or on a model sharded at load time): gradients are "
            "reduced as they are sharded, so no rank holds its own full (per-device or per-micro-batch) gradient. "
            "Use sam_scope=global, which takes the ascent from the full, synchronised gradient"
        )


class ShardLayout:
    """Where the local pieces of a list of (DTensor) parameters sit, and how to sum over them globally.

    Build it with :meth:`of`; it is None for unsharded tensors. ``counted[i]`` says whether this rank's
    local piece of tensor ``i`` enters global sums (see the module docstring).
    """

    def __init__(
        self,
        counted: list[bool],
        device: torch.device,
        group: object,
        group_size: int,
        collective_device: torch.device | None = None,
    ) -> None:
        self.counted = counted
        self._device = device
        self.group = group
        self.group_size = group_size
        self.collective_device = device if collective_device is None else collective_device

    @classmethod
    def of(cls, params: Sequence[Tensor], grads: Sequence[Tensor]) -> ShardLayout | None:
        """The layout of ``params`` (with their ``grads``), or None when none of them is a DTensor.

        Raises:
            ValueError: an FSDP1 parameter; a gradient whose placements differ from its parameter's (see
                :func:`align_gradients`), or that is ``Partial`` (not yet reduced).
            NotImplementedError: several device meshes none of which spans all ranks, or a multi-dimensional
                mesh that spans only part of the world.
        """
        types = _types(params)
        if _has_fsdp1(params, types):
            raise ValueError(_FSDP1_HINT)
        if not _has_dtensor(types):
            return None
        dtensor = _dtensor_type()
        meshes: list = []  # distinct by equality (a slice taken twice is two equal objects)
        slot: dict[int, int] = {}  # id of a parameter's mesh -> its index in meshes
        for p in params:
            if isinstance(p, dtensor) and id(p.device_mesh) not in slot:
                index = next((i for i, m in enumerate(meshes) if p.device_mesh == m), len(meshes))
                if index == len(meshes):
                    meshes.append(p.device_mesh)
                slot[id(p.device_mesh)] = index
        mesh = meshes[0]
        if len(meshes) == 1:  # sums over the mesh's own group
            counts_here = [True]
            at_origin = all(c == 0 for c in mesh.get_coordinate())
            group = _mesh_group(mesh)
        else:
            world = torch.distributed.get_world_size()
            if all(m.size() != world for m in meshes):
                raise NotImplementedError(
                    f"SAM on DTensors over several device meshes ({', '.join(map(str, meshes))}) needs them to be "
                    f"slices of one mesh over all {world} ranks"
                )
            # sums over all ranks: the copy of each slice that holds global rank 0 counts its pieces; plain
            # tensors count on rank 0
            counts_here = [bool((m.mesh == 0).any()) for m in meshes]
            at_origin = torch.distributed.get_rank() == 0
            group = (None, world)
        coordinates = [m.get_coordinate() for m in meshes]
        counted = []
        for index, (p, g) in enumerate(zip(params, grads, strict=True)):
            if not isinstance(p, dtensor):
                counted.append(at_origin)
                continue
            if not isinstance(g, dtensor) or g.placements != p.placements:
                placements = g.placements if isinstance(g, dtensor) else "a plain tensor"
                raise ValueError(
                    f"the gradient of sharded tensor {index} has placements {placements}, its parameter "
                    f"{p.placements}: SAM needs gradients sharded like their parameters (synchronise them first)"
                )
            if any(pl.is_partial() for pl in p.placements):
                raise ValueError(
                    f"sharded tensor {index} has Partial placements {p.placements}: reduce it first"
                )
            which = slot[id(p.device_mesh)]
            counted.append(counts_here[which] and all(
                not pl.is_replicate() or c == 0 for pl, c in zip(p.placements, coordinates[which], strict=True)))
        device = grads[0]._local_tensor.device if isinstance(grads[0], dtensor) else grads[0].device
        return cls(counted, device, *group, collective_device=mesh_device(mesh.device_type))

    def local(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """This rank's local tensors: a DTensor's local shard (the live storage, not a copy), others as they are."""
        dtensor = _dtensor_type()
        return [t._local_tensor if isinstance(t, dtensor) else t for t in tensors]

    def counted_only(self, *tensor_lists: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
        """The entries of parallel lists whose local piece this rank counts in global sums."""
        return tuple([t for t, keep in zip(lst, self.counted, strict=True) if keep] for lst in tensor_lists)

    def sum_over_ranks(self, partials: Tensor) -> Tensor:
        """Σ over the mesh's ranks of a 1-D tensor of per-rank partial sums: one ``all_reduce`` (none for 1 rank).

        The sum runs on the mesh's device and comes back on the partials' device: with FSDP2's
        ``CPUOffloadPolicy`` the shards and their gradients live on the CPU while an NCCL group only reduces
        GPU tensors.
        """
        if self.group_size > 1:
            on_mesh = partials.to(self.collective_device)
            torch.distributed.all_reduce(on_mesh, group=self.group)
            partials = on_mesh.to(partials.device)
        return partials

    def ascent_norm(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        adaptive: Sequence[bool],
        eta: Sequence[float],
    ) -> Tensor:
        """‖T g‖ of the full tensors from the local ``params``/``grads``: a 0-dim tensor, one ``all_reduce``.

        Same dtype and device as :func:`perturbation.ascent_norm` on the local tensors; a rank that counts
        none of its pieces contributes zeros.
        """
        dtype = perturbation.sum_dtype(grads)
        params, grads, adaptive, eta = self.counted_only(params, grads, adaptive, eta)
        if grads:
            partial = perturbation.ascent_sum_of_squares(params, grads, adaptive, eta).to(dtype).reshape(1)
        else:
            partial = torch.zeros(1, dtype=dtype, device=self._device)
        return self.sum_over_ranks(partial)[0].sqrt()

    def dots(self, eps: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(⟨ε, g⟩, ‖ε‖², ‖g‖²) of the full tensors from the local pieces, with one ``all_reduce``."""
        dtype = perturbation.sum_dtype(eps)
        eps, grads = self.counted_only(eps, grads)
        if eps:
            partials = perturbation.dot_and_squared_norms(eps, grads).to(dtype)
        else:
            partials = torch.zeros(3, dtype=dtype, device=self._device)
        total = self.sum_over_ranks(partials)
        return total[0], total[1], total[2]


def mesh_device(device_type: str) -> torch.device:
    """The device a collective over a mesh of ``device_type`` runs on: this rank's current accelerator
    (``cuda:<current>``, …), or the CPU."""
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, torch.get_device_module(device_type).current_device())


def _mesh_group(mesh) -> tuple[object, int]:
    """The process group spanning every rank of ``mesh`` and its size."""
    if mesh.ndim == 1:
        return mesh.get_group(), mesh.size()
    world = torch.distributed.get_world_size()
    if mesh.size() == world:
        return None, world
    raise NotImplementedError(
        f"SAM on a {mesh.ndim}-D device mesh spanning {mesh.size()} of {world} ranks is not supported: "
        "use a 1-D mesh or a mesh over all ranks"
    )
