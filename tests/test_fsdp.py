"""SAM on FSDP2-sharded models (DTensor parameters), and the refusals the integrations rely on.

The multiprocess tests share ONE torchrun launch of ``dist_scripts/fsdp_sam.py`` (2 gloo processes, ~15 s
of CPU), which measures everything and writes a JSON file; each test asserts one property of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn

from arrcoc_sam.sam.sharding import (
    ShardLayout,
    align_gradients,
    check_fsdp_run,
    check_model_supported,
    is_sharded,
    mesh_device,
)

SCRIPT = Path(__file__).parent / "dist_scripts" / "fsdp_sam.py"
STEPS = 10
_launch: dict[str, dict] = {}
# upstream, CPU/gloo only: FSDP2 has no CPU streams before torch 2.7 ("'Stream' object has no attribute
# 'record_event'"), HSDP asks gloo for ReduceOp.AVG in 2.7, and 2.8 sums the gradients instead of averaging them
# (pytorch#162338)
FSDP2_ON_GLOO = Version(torch.__version__).release >= (2, 9)


@pytest.fixture
def fsdp_run(run_torchrun, tmp_path) -> dict:
    """The measurements of the (cached) two-rank launch."""
    if not FSDP2_ON_GLOO:
        pytest.skip(f"FSDP2 on CPU/gloo needs torch >= 2.9 (torch {torch.__version__})")
    if "result" not in _launch:
        out = tmp_path / "fsdp_sam.json"
        run_torchrun(SCRIPT, str(out))
        _launch["result"] = json.loads(out.read_text())
    return _launch["result"]


# -- two gloo ranks, raw fully_shard ------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case", ["sam", "asam", "hsdp_sam"])
def test_sharded_sam_matches_unsharded_single_process_over_10_steps(fsdp_run, case):
    record = fsdp_run[case]
    assert len(record["param_diff"]) == STEPS
    assert max(record["param_diff"]) <= 1e-6
    # ‖g‖, ‖g_SAM‖ and cos(ε, g_SAM) are those of the full tensors, to float32 rounding.
    assert max(record["stat_rel_diff"]) <= 2e-6


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_shard_local_norm_would_be_caught_by_the_comparison(fsdp_run):
    # A rank's own shard gives a norm >1% off on the 1-D mesh: the 1e-6 agreement above needs the all-reduce.
    assert fsdp_run["sam"]["local_only_norm_rel_error"] > 1e-2
    assert fsdp_run["asam"]["local_only_norm_rel_error"] > 1e-2


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case", ["sam", "asam", "hsdp_sam"])
def test_gradient_norm_takes_exactly_one_all_reduce_per_step(fsdp_run, case):
    for counts in fsdp_run[case]["counts"]:
        assert counts["perturb_all_reduce"] == 1
        assert counts["perturb_collectives"] == 1  # no all-gather, no per-tensor reduction besides it


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_nan_gradient_outside_the_ascent_skips_the_step_on_every_rank(fsdp_run):
    """A rho = 0 group's NaN pass-2 gradient reached the weights: the sharded check covered perturbed tensors only."""
    result = fsdp_run["nan_outside_the_ascent"]
    assert result["poisoned_here"] and result["unchanged"] and result["finite"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_restore_statistics_take_at_most_one_collective(fsdp_run):
    for counts in fsdp_run["sam"]["counts"]:
        assert counts["restore_all_reduce"] == 1
        assert counts["restore_collectives"] == 1


@pytest.mark.multiprocess
@pytest.mark.slow
def test_mixed_precision_policy_perturbs_fp32_shards(fsdp_run):
    record = fsdp_run["mixed_precision"]
    assert record["shard_dtypes"] == ["torch.float32"]
    assert record["grad_dtypes"] == ["torch.float32"]
    # ε = ρ g/‖g‖ of the full fp32 gradient, to fp32 rounding; bf16 rounding would be ~4e-3 relative.
    assert record["eps_max_error"] <= 1e-5 * record["eps_max"]
    assert record["perturbed_minus_clean_loss"] > 0  # the bf16 all-gather of pass 2 saw w + ε
    assert record["restored_bitwise"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_dcp_checkpoint_resume_continues_the_trajectory_bitwise(fsdp_run):
    record = fsdp_run["checkpoint"]
    assert record["resumed_bitwise"], record["resumed_max_diff"]
    # Control: resuming with a foreign optimizer state (momentum) leaves the trajectory.
    assert record["without_optimizer_state_max_diff"] > 1e-3


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp2_parameters_are_detected_as_sharded(fsdp_run):
    assert fsdp_run["detection"]["is_sharded_fsdp2"] is True
    assert fsdp_run["detection"]["is_sharded_plain"] is False


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_is_refused_before_anything_is_perturbed(fsdp_run, use_orig_params):
    record = fsdp_run["detection"][f"fsdp1_orig_{use_orig_params}"]
    assert record["is_sharded"] is True
    for message in (record["check_model_supported"], record["perturb"]):
        assert "FSDP1" in message and "fully_shard" in message and "fsdp_version: 2" in message
    assert record["perturbed"] is False


@pytest.mark.multiprocess
@pytest.mark.slow
def test_variants_without_sharded_math_refuse_fsdp2_parameters_at_construction(fsdp_run):
    variants = fsdp_run["detection"]["variants"]
    assert variants.pop("periodic") == "built"
    for method, message in variants.items():
        assert "does not support sharded" in message and "use sam, asam or periodic" in message, method


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("shape", ["2x1", "1x2"])
def test_fsdp_by_tensor_parallel_layouts_take_the_norm_of_the_full_gradient(fsdp_run, shape):
    """FSDP2's _StridedShard over a tensor-parallel weight was counted on one FSDP coordinate only (ε 1.3× too
    large under FSDP × TP); a tensor on the FSDP slice of the mesh (a second mesh) and a Replicate gradient of a
    Shard weight (TP's embedding) were refused. ε, ‖g‖, ‖g_SAM‖ and restore against the full tensors."""
    record = fsdp_run[f"tensor_parallel_{shape}"]
    assert record["error"] is None, record["error"]
    assert record["eps_max_error"] <= 1e-15
    assert record["grad_norm_rel_error"] <= 1e-6 and record["grad_norm_perturbed_rel_error"] <= 1e-6
    assert record["restored_bitwise"]


# -- single process -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["per_device", "microbatch"])
def test_non_global_scope_is_refused_under_fsdp2_naming_global(scope):
    with pytest.raises(ValueError, match=f"sam_scope='{scope}'.*Use sam_scope=global"):
        check_fsdp_run(scope, fsdp_version=2)


def test_fsdp1_run_is_refused_naming_fsdp_version_2():
    with pytest.raises(ValueError, match="fsdp_version=1.*fsdp_version: 2"):
        check_fsdp_run("global", fsdp_version=1)


@pytest.mark.parametrize(
    ("scope", "fsdp_version"), [("global", 2), ("per_device", None), ("microbatch", None)]
)
def test_supported_runs_pass_the_fsdp_check(scope, fsdp_version):
    check_fsdp_run(scope, fsdp_version)


def test_plain_parameters_have_no_shard_layout_and_pass_the_model_check():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    assert not is_sharded(params)
    assert ShardLayout.of(params, [torch.ones_like(p) for p in params]) is None
    check_model_supported(model)


def test_collectives_run_on_the_mesh_device():
    """CPU-offloaded shards (FSDP2 CPUOffloadPolicy) sum on the mesh's device: NCCL reduces GPU tensors only."""
    assert mesh_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert mesh_device("cuda") == torch.device("cuda", torch.cuda.current_device())


# -- the counting rule on stand-in meshes (one process; any rank's view) --------------------------------
class _Mesh:
    """A stand-in DeviceMesh: ``ranks`` laid out as the mesh, seen from the rank at ``coordinate``."""

    def __init__(self, ranks: list, coordinate: tuple[int, ...], group: object = "mesh group") -> None:
        self.mesh = torch.tensor(ranks)
        self.ndim = self.mesh.dim()
        self.device_type = "cpu"
        self._coordinate, self._group = list(coordinate), group

    def get_coordinate(self) -> list[int]:
        return self._coordinate

    def size(self) -> int:
        return self.mesh.numel()

    def get_group(self) -> object:
        return self._group

    def __eq__(self, other: object) -> bool:  # a slice taken twice: two equal objects
        return isinstance(other, _Mesh) and torch.equal(self.mesh, other.mesh)

    def __hash__(self) -> int:
        return hash(tuple(self.mesh.flatten().tolist()))


class _Sharded:
    """A stand-in DTensor: placements on a mesh and this rank's local piece."""

    def __init__(self, mesh: _Mesh, placements: tuple, local: torch.Tensor) -> None:
        self.device_mesh, self.placements, self._local_tensor = mesh, placements, local


@pytest.fixture
def stand_in_dtensors(monkeypatch):
    """ShardLayout sees _Sharded as the DTensor type, in a world of ``world`` ranks seen from ``rank``."""
    from arrcoc_sam.sam import sharding

    monkeypatch.setattr(sharding, "_dtensor_type", lambda: _Sharded)

    def world(size: int, rank: int) -> None:
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: size)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)

    return world


def _counted(params: list) -> list[bool]:
    grads = [_Sharded(p.device_mesh, p.placements, torch.ones(2)) if isinstance(p, _Sharded) else torch.ones(2)
             for p in params]
    return ShardLayout.of(params, grads).counted


@pytest.mark.parametrize(("coordinate", "expected"), [((0,), [True, True, True]), ((1,), [True, False, False])])
def test_one_mesh_counts_shards_on_every_rank_and_replicated_or_plain_tensors_at_its_origin(
        stand_in_dtensors, coordinate, expected):
    from torch.distributed.tensor import Replicate, Shard

    stand_in_dtensors(2, coordinate[0])
    mesh = _Mesh([0, 1], coordinate)
    params = [_Sharded(mesh, (Shard(0),), torch.ones(2)), _Sharded(mesh, (Replicate(),), torch.ones(2)), torch.ones(2)]
    assert _counted(params) == expected
    layout = ShardLayout.of(params, [_Sharded(mesh, p.placements, torch.ones(2)) if isinstance(p, _Sharded)
                                     else torch.ones(2) for p in params])
    assert (layout.group, layout.group_size) == ("mesh group", 2)


@pytest.mark.parametrize(("coordinate", "expected"), [((0, 1), True), ((1, 0), False), ((1, 1), False)])
def test_hsdp_counts_a_shard_on_the_first_replica_only(stand_in_dtensors, coordinate, expected):
    from torch.distributed.tensor import Replicate, Shard

    stand_in_dtensors(4, 2 * coordinate[0] + coordinate[1])
    mesh = _Mesh([[0, 1], [2, 3]], coordinate)  # (replicate, shard)
    layout = ShardLayout.of([_Sharded(mesh, (Replicate(), Shard(0)), torch.ones(2))],
                            [_Sharded(mesh, (Replicate(), Shard(0)), torch.ones(2))])
    assert layout.counted == [expected]
    assert (layout.group, layout.group_size) == (None, 4)  # a 2-D mesh over the world sums over the world


@pytest.mark.parametrize(("rank", "expected"), [(0, [True, True, True]), (1, [False, True, False]),
                                                (2, [True, True, False]), (3, [False, True, False])])
def test_fsdp_by_tensor_parallel_counts_a_slices_pieces_on_the_copy_that_holds_rank_0(stand_in_dtensors, rank, expected):
    """Four ranks on an ('fsdp', 'tp') 2×2 mesh: a tensor on the FSDP slice (ranks of this rank's tp column) is
    held alike by both tp columns and counted on the one holding rank 0; plain tensors count on rank 0 only."""
    from torch.distributed.tensor import Shard

    stand_in_dtensors(4, rank)
    fsdp, tp = divmod(rank, 2)
    world_mesh = _Mesh([[0, 1], [2, 3]], (fsdp, tp))
    fsdp_slice = _Mesh([tp, 2 + tp], (fsdp,))
    params = [_Sharded(fsdp_slice, (Shard(0),), torch.ones(2)),  # the slice first: meshes[0] is not the world mesh
              _Sharded(world_mesh, (Shard(0), Shard(1)), torch.ones(2)), torch.ones(2)]
    assert _counted(params) == expected


def test_a_mesh_seen_through_two_equal_objects_sums_over_its_own_group(stand_in_dtensors):
    """Two parameters on equal copies of a 1-D mesh over 2 of 4 ranks: one mesh, summed over its group."""
    from torch.distributed.tensor import Shard

    stand_in_dtensors(4, 1)
    first, second = _Mesh([0, 1], (1,), group="pair"), _Mesh([0, 1], (1,), group="pair")
    params = [_Sharded(first, (Shard(0),), torch.ones(2)), _Sharded(second, (Shard(0),), torch.ones(2))]
    layout = ShardLayout.of(params, [_Sharded(p.device_mesh, p.placements, torch.ones(2)) for p in params])
    assert (layout.group, layout.group_size, layout.counted) == ("pair", 2, [True, True])


@pytest.mark.parametrize("case", ["placements differ", "not sharded", "partial"])
def test_gradients_laid_out_otherwise_than_their_parameters_are_refused(stand_in_dtensors, case):
    from torch.distributed.tensor import Partial, Replicate, Shard

    stand_in_dtensors(2, 0)
    mesh = _Mesh([0, 1], (0,))
    placements = (Partial(),) if case == "partial" else (Shard(0),)
    param = _Sharded(mesh, placements, torch.ones(2))
    grad = {"placements differ": _Sharded(mesh, (Replicate(),), torch.ones(2)), "not sharded": torch.ones(2),
            "partial": _Sharded(mesh, placements, torch.ones(2))}[case]
    with pytest.raises(ValueError, match="Partial placements" if case == "partial" else "sharded like their parameters"):
        ShardLayout.of([param], [grad])


def test_global_sums_add_this_ranks_counted_pieces_to_the_other_ranks_partials(monkeypatch):
    """A stand-in all_reduce adds the other rank's partials (11 for ‖g‖², (1, 2, 3) for the dots) to this rank's,
    which are the counted tensors' only: [3, 4] counted, [100] (a replica held elsewhere too) not."""
    others = {1: [11.0], 3: [1.0, 2.0, 3.0]}
    calls = []

    def all_reduce(tensor, group=None):
        calls.append(group)
        tensor.add_(torch.tensor(others[tensor.numel()], dtype=tensor.dtype))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    grads, eps = [torch.tensor([3.0, 4.0]), torch.tensor([100.0])], [torch.tensor([1.0, 2.0]), torch.tensor([50.0])]
    layout = ShardLayout([True, False], torch.device("cpu"), "group", 2)
    assert float(layout.ascent_norm(grads, grads, [False, False], [0.0, 0.0])) == 6.0  # √(3² + 4² + 11)
    assert [float(v) for v in layout.dots(eps, grads)] == [11.0 + 1.0, 5.0 + 2.0, 25.0 + 3.0]
    counts_nothing = ShardLayout([False, False], torch.device("cpu"), "group", 2)
    assert float(counts_nothing.ascent_norm(grads, grads, [False, False], [0.0, 0.0])) == float(torch.tensor(11.0).sqrt())
    assert [float(v) for v in counts_nothing.dots(eps, grads)] == [1.0, 2.0, 3.0]
    assert calls == ["group"] * 4  # one all_reduce per sum, over the layout's group
    alone = ShardLayout([True, False], torch.device("cpu"), "group", 1)
    assert float(alone.ascent_norm(grads, grads, [False, False], [0.0, 0.0])) == 5.0 and len(calls) == 4


def test_collectives_on_an_accelerator_mesh_run_on_the_current_device(monkeypatch):
    """NCCL reduces GPU tensors only: a CUDA mesh's sums run on this rank's current CUDA device (not the CPU)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert mesh_device("cuda") == torch.device("cuda", 3)


class _Gradient(_Sharded):
    def redistribute(self, mesh: _Mesh, placements: tuple) -> _Sharded:
        return _Sharded(mesh, placements, self._local_tensor)


def test_only_gradients_laid_out_otherwise_than_their_reduced_parameters_are_redistributed(stand_in_dtensors):
    """align_gradients replaces a Replicate gradient of a Shard weight (tensor parallelism's embedding), reports it,
    and leaves alone gradients already laid out like their parameters, Partial (unreduced) ones and plain tensors."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = _Mesh([0, 1], (0,))
    params = [_Sharded(mesh, (Shard(0),), torch.ones(2)) for _ in range(3)] + [nn.Parameter(torch.ones(2))]
    grads = [_Gradient(mesh, (Shard(0),), torch.ones(2)), _Gradient(mesh, (Partial(),), torch.ones(2)),
             _Gradient(mesh, (Replicate(),), torch.ones(2)), torch.ones(2)]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    assert not align_gradients(params[:2] + params[3:])
    assert [p.grad for p in params] == grads  # the same objects: nothing redistributed
    assert align_gradients(params)
    assert params[2].grad is not grads[2] and params[2].grad.placements == (Shard(0),)
    assert [params[i].grad for i in (0, 1, 3)] == [grads[i] for i in (0, 1, 3)]


def test_the_model_check_passes_fsdp2_parameters(stand_in_dtensors):
    """Only FSDP1 is refused: a model whose parameters are DTensors (FSDP2, tensor parallel) passes."""
    from torch.distributed.tensor import Shard

    class Sharded(nn.Module):
        def parameters(self, recurse: bool = True):
            return iter([_Sharded(_Mesh([0, 1], (0,)), (Shard(0),), torch.ones(2))])

    assert is_sharded(Sharded().parameters())
    check_model_supported(Sharded())
