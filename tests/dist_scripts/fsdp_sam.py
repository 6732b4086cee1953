"""SAM on FSDP2 (``fully_shard``) across torchrun ranks on CPU/gloo; writes its measurements to a JSON file.

Usage (under torchrun, 2 processes): ``fsdp_sam.py OUT.json``. One launch measures, in order:

* 10 SAM / ASAM steps sharded on a 1-D mesh and on an HSDP mesh vs one unsharded replica fed the global
  batch (parameter and statistic differences, collectives inside ``perturb()`` and ``restore()``);
* a bf16-compute / fp32-shard ``MixedPrecisionPolicy`` step (ε measured on the fp32 shards);
* a DCP checkpoint after 5 steps, resumed into fresh objects (with and without the optimizer state);
* what ``is_sharded``, ``check_model_supported`` and ``SAM.perturb`` say about FSDP2, FSDP1 and plain parameters;
* ε, the statistics and restore over FSDP × tensor-parallel layouts on ('fsdp', 'tp') meshes of shape 2×1 and 1×2.

The model is a small transformer: two ``nn.TransformerEncoderLayer`` (width 16) and a width-1 linear head,
whose weight ``[1, 16]`` shards unevenly (rank 1 holds an empty shard). GELU, not ReLU: with a kink, a
pre-activation within rounding of 0 may land on either side in the two runs and make the gradients jump.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.debug import CommDebugMode

from arrcoc_sam.integrations.launch import shutdown_process_group
from arrcoc_sam.sam.optimizer import SAM
from arrcoc_sam.sam.registry import build_sam_optimizer
from arrcoc_sam.sam.sharding import check_model_supported, is_sharded

GLOBAL_BATCH, SEQ, WIDTH, STEPS = 8, 5, 16, 10
HYPER = {"lr": 0.1, "momentum": 0.9, "rho": 0.05}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = [
        nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, activation="gelu", batch_first=True)
        for _ in range(2)
    ]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 1))


def shard(model: nn.Module, mesh, **fsdp_kwargs) -> nn.Module:
    for layer in model[:2]:
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, SEQ, WIDTH, generator=gen), torch.randn(
        GLOBAL_BATCH, SEQ, 1, generator=gen
    )


def local_rows(batch, rank: int, world: int):
    per_rank = GLOBAL_BATCH // world
    return tuple(t[rank * per_rank : (rank + 1) * per_rank] for t in batch)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x).float() - y) ** 2).mean()


def backward(model: nn.Module, opt: SAM, batch) -> torch.Tensor:
    opt.zero_grad()
    loss = mse(model, batch)
    loss.backward()
    return loss.detach()


class AllReduceCounter:
    """Counts ``torch.distributed.all_reduce`` calls (wraps the module attribute that SAM calls)."""

    def __init__(self) -> None:
        self.calls = 0
        self._original = dist.all_reduce

    def __enter__(self) -> AllReduceCounter:
        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._original


def sam_step(model: nn.Module, opt: SAM, batch) -> dict[str, int]:
    """One SAM step through the hooks, counting the collectives of perturb() and restore()."""
    backward(model, opt, batch)
    with AllReduceCounter() as perturb_count, CommDebugMode() as perturb_comms:
        assert opt.perturb()
    backward(model, opt, batch)
    with AllReduceCounter() as restore_count, CommDebugMode() as restore_comms:
        opt.restore()
    opt.step()
    return {
        "perturb_all_reduce": perturb_count.calls,
        "perturb_collectives": perturb_comms.get_total_counts(),
        "restore_all_reduce": restore_count.calls,
        "restore_collectives": restore_comms.get_total_counts(),
    }


def nan_outside_the_ascent(mesh) -> dict[str, object]:
    """A NaN pass-2 gradient on one rank in a rho = 0 group (never perturbed): the update check must see it on every
    rank, so both skip the step and keep their weights bitwise (it used to check the perturbed tensors only)."""
    model = shard(make_model(0), mesh)
    head = list(model[2].parameters())
    body = [p for layer in model[:2] for p in layer.parameters()]
    opt = SAM([{"params": body}, {"params": head, "rho": 0.0}], torch.optim.SGD, **HYPER)
    batch = local_rows(global_batch(0), dist.get_rank(), dist.get_world_size())
    backward(model, opt, batch)
    before = full_params(model)
    assert opt.perturb()
    backward(model, opt, batch)
    poisoned = False
    for p in head:
        local = p.grad._local_tensor
        if local.numel() and not poisoned:  # the first rank-local piece there is
            local.view(-1)[0] = float("nan")
            poisoned = True
    opt.restore()
    opt.step()
    after = full_params(model)
    return {"poisoned_here": poisoned, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
            "finite": all(bool(torch.isfinite(a).all()) for a in after)}


def tensor_parallel_layouts(shape: tuple[int, int]) -> dict[str, object]:
    """SAM over DTensors laid out as FSDP × tensor parallelism lays them out, on a ``shape`` ('fsdp', 'tp') mesh
    over the 2 ranks, against ε = ρ g/‖g‖ of the full tensors: a tensor-parallel weight whose FSDP placement is
    ``_StridedShard`` (not a ``Shard``: counted on one FSDP coordinate only, ‖g‖ too small), a tensor on the
    'fsdp' slice (a second mesh: refused), a ``Replicate`` gradient of a ``Shard`` weight (tensor parallelism's
    embedding: refused), a replicated weight and a plain tensor beside them."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("fsdp", "tp"))
    generator = torch.Generator().manual_seed(7)
    fulls = [torch.randn(6, 4, generator=generator, dtype=torch.float64) for _ in range(5)]
    grads = [torch.randn(6, 4, generator=generator, dtype=torch.float64) for _ in range(5)]
    layouts = [  # (mesh, parameter placements, gradient placements); None: a plain tensor
        (mesh, [_StridedShard(0, split_factor=shape[1]), Shard(0)], None),
        (mesh, [Shard(0), Shard(1)], None),
        (mesh["fsdp"], [Shard(0)], None),
        (mesh, [Replicate(), Shard(0)], [Replicate(), Replicate()]),
        (None, None, None),
    ]
    params = []
    for full, grad, (on, placements, grad_placements) in zip(fulls, grads, layouts, strict=True):
        if on is None:
            param = nn.Parameter(full.clone())
            param.grad = grad.clone()
        else:
            # copies: a local piece may be the very tensor handed in (Replicate, a one-rank mesh)
            param = nn.Parameter(distribute_tensor(full.clone(), on, placements))
            param.grad = distribute_tensor(grad.clone(), on, grad_placements or placements)
        params.append(param)
    opt = SAM(params, torch.optim.SGD, lr=0.1, rho=0.05)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    expected = [w + 0.05 * g / norm for w, g in zip(fulls, grads, strict=True)]
    try:
        opt.perturb()
    except Exception as error:  # noqa: BLE001 - the old code refuses these layouts; the test reads the message
        return {"error": f"{type(error).__name__}: {error}"}
    perturbed = [full_tensor(p) for p in params]
    opt.restore()
    restored = [full_tensor(p) for p in params]
    return {
        "error": None,
        "eps_max_error": max_diff(perturbed, expected),
        "grad_norm_rel_error": abs(float(opt.stats["grad_norm"]) - float(norm)) / float(norm),
        "grad_norm_perturbed_rel_error": abs(float(opt.stats["grad_norm_perturbed"]) - float(norm)) / float(norm),
        "restored_bitwise": all(torch.equal(a, b) for a, b in zip(restored, fulls, strict=True)),
    }


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """A copy of the whole of ``param`` (gathered where it is a DTensor), detached: ``full_tensor()`` of a
    replicated piece is that piece itself."""
    param = param.detach()
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).clone()


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def compare_to_unsharded(mesh, adaptive: bool) -> dict[str, object]:
    """10 SAM steps sharded on ``mesh`` vs 10 on one unsharded replica fed the whole global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    reference, sharded = make_model(0), shard(make_model(0), mesh)
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, adaptive=adaptive, **HYPER)
    opt = SAM(sharded.parameters(), torch.optim.SGD, adaptive=adaptive, **HYPER)
    record: dict[str, list] = {"param_diff": [], "stat_rel_diff": [], "counts": []}
    for step in range(STEPS):
        batch = global_batch(step)
        record["counts"].append(sam_step(sharded, opt, local_rows(batch, rank, world)))
        sam_step(reference, ref_opt, batch)
        record["param_diff"].append(max_diff(full_params(sharded), full_params(reference)))
        record["stat_rel_diff"].append(
            max(
                abs(float(opt.stats[k]) / float(ref_opt.stats[k]) - 1)
                for k in ("grad_norm", "grad_norm_perturbed", "grad_cosine")
            )
        )
    # How far off the norm of a single rank's shard alone is: the comparison above can tell them apart.
    backward(sharded, opt, local_rows(global_batch(0), rank, world))
    local_only = torch.cat([p.grad.to_local().reshape(-1) for p in sharded.parameters()]).norm()
    full = torch.cat([p.grad.full_tensor().reshape(-1) for p in sharded.parameters()]).norm()
    record["local_only_norm_rel_error"] = abs(float(local_only) / float(full) - 1)
    return record


def mixed_precision_check(mesh) -> dict[str, object]:
    """bf16 compute, fp32 shards: ε lands on the fp32 shards exactly as ρ g/‖g‖ of the full fp32 gradient."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(make_model(0), mesh, mp_policy=policy)
    opt = SAM(model.parameters(), torch.optim.SGD, **HYPER)
    batch = local_rows(global_batch(0), dist.get_rank(), dist.get_world_size())
    clean_loss = backward(model, opt, batch)
    before = full_params(model)
    grads = [p.grad.full_tensor().double() for p in model.parameters()]
    norm = torch.cat([g.reshape(-1) for g in grads]).norm()
    assert opt.perturb()
    eps_applied = [(after - b).double() for after, b in zip(full_params(model), before, strict=True)]
    eps_reference = [HYPER["rho"] * g / norm for g in grads]
    perturbed_loss = backward(model, opt, batch)
    opt.restore()
    return {
        "shard_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
        "eps_max_error": max_diff(eps_applied, eps_reference),
        "eps_max": max(e.abs().max().item() for e in eps_reference),
        "perturbed_minus_clean_loss": float(perturbed_loss - clean_loss),
        "restored_bitwise": all(torch.equal(a, b) for a, b in zip(full_params(model), before, strict=True)),
    }


def sharded_run(seed: int):
    model = shard(make_model(seed), init_device_mesh("cpu", (dist.get_world_size(),)))
    return model, SAM(model.parameters(), torch.optim.SGD, **HYPER)


def train(model: nn.Module, opt: SAM, steps: range) -> None:
    for step in steps:
        sam_step(model, opt, local_rows(global_batch(step), dist.get_rank(), dist.get_world_size()))


def resume(directory: Path, load_optimizer: bool) -> list[torch.Tensor]:
    """A fresh model and optimizer (other initial weights, a step of their own), loaded, then steps 5..9."""
    model, opt = sharded_run(seed=123)
    train(model, opt, range(1))
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state} if load_optimizer else {"model": model_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, opt, model_state_dict=state["model"], optim_state_dict=state.get("optim", optim_state)
    )
    train(model, opt, range(STEPS // 2, STEPS))
    return full_params(model)


def checkpoint_resume(directory: Path) -> dict[str, object]:
    """10 uninterrupted steps vs 5 steps, a DCP save, and a resume into fresh objects for the last 5."""
    model, opt = sharded_run(seed=0)
    train(model, opt, range(STEPS // 2))
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
    train(model, opt, range(STEPS // 2, STEPS))
    uninterrupted = full_params(model)
    resumed = resume(directory, load_optimizer=True)
    without_optimizer = resume(directory, load_optimizer=False)
    return {
        "resumed_bitwise": all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted, strict=True)),
        "resumed_max_diff": max_diff(resumed, uninterrupted),
        "without_optimizer_state_max_diff": max_diff(without_optimizer, uninterrupted),
    }


def refusal_message(action) -> str:
    """The ValueError message ``action()`` raises, or "" if it raises none."""
    try:
        action()
    except ValueError as error:
        return str(error)
    return ""


def detection() -> dict[str, object]:
    """What the helpers for the integrations, and SAM itself, say about FSDP2, FSDP1 and plain parameters."""
    sharded_model = sharded_run(seed=0)[0]
    result: dict[str, object] = {
        "is_sharded_fsdp2": is_sharded(sharded_model.parameters()),
        "is_sharded_plain": is_sharded(make_model(0).parameters()),
        "variants": {},
    }
    for method in ("periodic", "looksam", "esam", "gsam", "fsam", "msam"):
        try:
            build_sam_optimizer(method, sharded_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
            result["variants"][method] = "built"
        except NotImplementedError as error:
            result["variants"][method] = str(error)
    for use_orig_params in (False, True):
        model = FullyShardedDataParallel(
            make_model(0), use_orig_params=use_orig_params, device_id=torch.device("cpu")
        )
        opt = SAM(model.parameters(), torch.optim.SGD, **HYPER)
        backward(model, opt, local_rows(global_batch(0), dist.get_rank(), dist.get_world_size()))
        result[f"fsdp1_orig_{use_orig_params}"] = {
            "is_sharded": is_sharded(model.parameters()),
            "check_model_supported": refusal_message(lambda m=model: check_model_supported(m)),
            "perturb": refusal_message(opt.perturb),
            "perturbed": opt.is_perturbed,
        }
    return result


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.use_deterministic_algorithms(True)
    try:
        world = dist.get_world_size()
        flat_mesh = init_device_mesh("cpu", (world,))
        hsdp_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
        checkpoint_dir = out.parent / "checkpoint"
        result = {
            "sam": compare_to_unsharded(flat_mesh, adaptive=False),
            "asam": compare_to_unsharded(flat_mesh, adaptive=True),
            "hsdp_sam": compare_to_unsharded(hsdp_mesh, adaptive=False),
            "mixed_precision": mixed_precision_check(flat_mesh),
            "checkpoint": checkpoint_resume(checkpoint_dir),
            "detection": detection(),
            "nan_outside_the_ascent": nan_outside_the_ascent(flat_mesh),
            "tensor_parallel_2x1": tensor_parallel_layouts((world, 1)),
            "tensor_parallel_1x2": tensor_parallel_layouts((1, world)),
        }
        if dist.get_rank() == 0:
            out.write_text(json.dumps(result))
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other rank may never reach it
        raise
    shutdown_process_group()  # barrier first: a rank that exits while gloo still talks to it aborts the run


if __name__ == "__main__":
    main()
