"""Two-process checks of AcceleratedSAM in a plain Accelerate loop (run inside dist_scripts/trainer_ddp.py).

Global scope with 2 × (GA 2 × batch 2) must match one full-batch SAM reference of 8; per_device scope must
keep the replicas bitwise identical. Every cheaper variant (SGD with momentum, global scope) must keep the
replicas bitwise identical and match its own ``step(closure)`` on each global batch of 8 in one process
(ESAM with both SWP units and γ = 1: data selection is per rank by design). Under DDP with
``static_graph=True`` (GA 1, global scope: 2 × batch 2) SAM and every variant (ESAM's tensor SWP then keeps every
pass-1 gradient) must match their references on each global batch of 4, and ``per_device`` must be refused.
ESAM's own ``step(closure)`` on a DDP model (tensor SWP, which prunes pass 1 in one process only) must match
the closure step on the global batch too.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accelerate_common import LR, batches, flat, mse, reference_sam, regression_data, tiny_mlp  # noqa: E402

from arrcoc_sam.integrations.accelerate import AcceleratedSAM  # noqa: E402
from arrcoc_sam.sam.optimizer import SAM  # noqa: E402
from arrcoc_sam.sam.registry import build_sam_optimizer  # noqa: E402

torch.set_num_threads(1)
STEPS = 5
MOMENTUM, RHO = 0.9, 0.1
# run name -> (method, knobs)
VARIANT_RUNS = {
    "periodic": ("periodic", {"interval": 2}),
    "looksam": ("looksam", {"interval": 2, "alpha": 0.5}),
    "esam": ("esam", {"beta": 0.5, "gamma": 1.0, "seed": 3}),  # tensor SWP: pass 1 pruned and averaged by hand
    "esam-coordinate": ("esam", {"beta": 0.5, "gamma": 1.0, "seed": 3, "swp": "coordinate"}),
    "gsam": ("gsam", {"alpha": 0.3}),
    "fsam": ("fsam", {"sigma": 1.0}),
    "msam": ("msam", {}),
}


def _run(accelerator: Accelerator, method: str = "sam", momentum: float = 0.0, **knobs) -> torch.nn.Module:
    """The tiny MLP trained by ``method`` through AcceleratedSAM, SGD with ``momentum``, ρ = RHO."""
    return accelerator.unwrap_model(_train(accelerator, tiny_mlp(), method, momentum, **knobs).model)


def _train(accelerator: Accelerator, model: torch.nn.Module, method: str, momentum: float, **knobs) -> AcceleratedSAM:
    """``model`` trained by ``method`` through AcceleratedSAM on the sharded regression data; the helper."""
    loader = DataLoader(regression_data(8 * STEPS), batch_size=2)  # sharded: rank r gets batches r, r + 2, ...
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    model, optimizer, loader = accelerator.prepare(model, base, loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method=method, rho=RHO, **knobs)
    for batch in loader:
        with accelerator.accumulate(model):
            sam.backward(mse, batch)
            optimizer.step()
            optimizer.zero_grad()
    sam.metrics()
    return sam


def _variant_reference(method: str, knobs: dict, rho: float, global_batch: int = 8) -> torch.nn.Module:
    """The variant's own step(closure) on each global batch of ``global_batch``, in this process."""
    model = tiny_mlp()
    opt = build_sam_optimizer(method, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=rho, **knobs)
    _closure_steps(opt, model, batches(regression_data(8 * STEPS), global_batch))
    return model


def _closure_steps(opt: torch.optim.Optimizer, model: torch.nn.Module, step_batches: list) -> None:
    """``opt.step(closure)`` on each batch, the closure back-propagating the MSE of ``model``."""
    for batch in step_batches:

        def closure(batch=batch):
            opt.zero_grad()
            loss = mse(model, batch)
            loss.backward()
            return loss

        opt.step(closure)


def variant_checks(accelerator: Accelerator) -> dict:
    result = {}
    for name, (method, knobs) in VARIANT_RUNS.items():
        got = flat(_run(accelerator, method, MOMENTUM, **knobs))
        no_ascent = {"rho_min": 0.0} if method == "gsam" else {}
        result[name] = {
            "reference_diff": float((got - flat(_variant_reference(method, knobs, RHO))).abs().max()),
            "rho0_diff": float((got - flat(_variant_reference(method, knobs | no_ascent, 0.0))).abs().max()),
            "replicas_equal": _same_on_all_ranks(got),
        }
    return result


def static_graph_checks() -> dict:
    """SAM and every variant under DDP(static_graph=True), GA 1 (ESAM's tensor SWP then keeps every pass-1
    gradient); per_device scope refused at construction."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(static_graph=True)])
    sam_model = flat(_run(accelerator, scope="global"))
    reference = reference_sam(tiny_mlp(), batches(regression_data(8 * STEPS), 4), rho=RHO)
    diffs = {"sam": float((sam_model - flat(reference)).abs().max())}
    replicas_equal = _same_on_all_ranks(sam_model)
    for name, (method, knobs) in VARIANT_RUNS.items():
        got = flat(_run(accelerator, method, MOMENTUM, **knobs))
        diffs[name] = float((got - flat(_variant_reference(method, knobs, RHO, 4))).abs().max())
        replicas_equal = replicas_equal and _same_on_all_ranks(got)
    result = {"reference_diffs": diffs, "replicas_equal": replicas_equal}
    try:
        _run(accelerator, scope="per_device")
        result["per_device_refused"] = ""
    except ValueError as error:
        result["per_device_refused"] = str(error)
    return result


def ddp_closure_checks() -> dict:
    """ESAM.step(closure) on a DDP-wrapped model, each rank on its half of every global batch of 4."""
    model = tiny_mlp()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    method, knobs = VARIANT_RUNS["esam"]
    opt = build_sam_optimizer(method, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO, **knobs)
    _closure_steps(opt, wrapped, batches(regression_data(8 * STEPS), 2)[dist.get_rank()::2])
    got = flat(model)
    return {
        "reference_diff": float((got - flat(_variant_reference(method, knobs, RHO, 4))).abs().max()),
        "replicas_equal": _same_on_all_ranks(got),
    }


class _CheckpointedTinyMLP(torch.nn.Module):
    """tiny_mlp with its output layer under reentrant activation checkpointing (a pruned pass 1 whose chosen
    tensors leave the layer's input without gradient loses the layer's gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x):
        hidden = self.net[1](self.net[0](x))
        return torch.utils.checkpoint.checkpoint(self.net[2], hidden, use_reentrant=True)


def checkpointed_checks() -> dict:
    """Tensor-SWP ESAM through AcceleratedSAM on the checkpointed MLP (GA 2): the first window runs pass 1 in full,
    both ranks find the checkpointing in its graph and never prune, and the run matches the closure step (with a
    step-1 draw that a pruned pass 1 would have broken: the output layer chosen, the layer before it not)."""
    draws = lambda seed: (torch.rand(4, generator=torch.Generator().manual_seed(seed * 1_000_003 + 1)) < 0.5).tolist()  # noqa: E731
    seed = next(s for s in range(200) if not any(draws(s)[:2]) and any(draws(s)[2:]))
    knobs = {"beta": 0.5, "gamma": 1.0, "seed": seed}
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)  # (a later Accelerator resets the shared GA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # checkpoint: "None of the inputs have requires_grad"
        sam = _train(accelerator, _CheckpointedTinyMLP(), "esam", MOMENTUM, **knobs)
    got = flat(accelerator.unwrap_model(sam.model))
    return {
        "reference_diff": float((got - flat(_variant_reference("esam", knobs, RHO))).abs().max()),
        "replicas_equal": _same_on_all_ranks(got),
        "pruning_off": sam._window._may_prune_first_pass is False,
    }


def _same_on_all_ranks(vector: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return all(torch.equal(gathered[0], other) for other in gathered)


def accelerate_checks() -> dict:
    """This rank's measurements (every rank must call it)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    global_model = _run(accelerator, scope="global")
    reference = reference_sam(tiny_mlp(), batches(regression_data(8 * STEPS), 8), rho=RHO)
    result = {
        "global_reference_diff": float((flat(global_model) - flat(reference)).abs().max()),
        "global_replicas_equal": _same_on_all_ranks(flat(global_model)),
    }
    local_model = _run(accelerator, scope="per_device")
    result["per_device_replicas_equal"] = _same_on_all_ranks(flat(local_model))
    result["per_device_differs_from_global"] = float((flat(local_model) - flat(global_model)).abs().max())
    result["variants"] = variant_checks(accelerator)
    result["static_graph"] = static_graph_checks()
    result["esam_closure_step_ddp"] = ddp_closure_checks()
    result["esam_checkpointed"] = checkpointed_checks()
    result["esam_selection"] = sds_checks()
    result["asam_and_microbatch"] = scope_and_asam_checks()
    result["unwrapped_model_refusals"] = unwrapped_model_refusals(accelerator)
    return result


def unwrapped_model_refusals(accelerator: Accelerator) -> list[str]:
    """The messages of AcceleratedSAM given, in a 2-process run, the module inside the DDP wrapper and a model
    that never went through prepare (each would train an unsynchronised copy per process). The prepared model
    compiled (as Accelerator(dynamo_backend=...) returns it) is accepted."""
    model = tiny_mlp()
    prepared, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    AcceleratedSAM(accelerator, torch.compile(prepared, backend="eager"), optimizer, method="sam")
    messages = []
    for candidate in (accelerator.unwrap_model(prepared), tiny_mlp()):
        try:
            AcceleratedSAM(accelerator, candidate, torch.optim.SGD(candidate.parameters(), lr=LR), method="sam")
        except ValueError as error:
            messages.append(str(error))
    return messages


def _per_example_mse(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((outputs - batch["y"]) ** 2).mean(dim=1)


def sds_checks() -> dict:
    """ESAM with data selection (γ = 0.5, tensor SWP) through AcceleratedSAM, GA 2 under DDP: each rank picks the
    top half of its own window of 4 by loss rise at w + ε (ε from the global gradient), and DDP averages the
    ranks' gradients over their chosen examples. Compared with that computed by hand in one process."""
    knobs = {"beta": 0.5, "gamma": 0.5, "seed": 3}
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    sam = _train(accelerator, tiny_mlp(), "esam", MOMENTUM, per_example_loss_fn=_per_example_mse, **knobs)
    got = flat(accelerator.unwrap_model(sam.model))
    return {
        "reference_diff": float((got - flat(_sds_reference(knobs))).abs().max()),
        "whole_window_diff": float((got - flat(_sds_reference(knobs | {"gamma": 1.0}))).abs().max()),
        "replicas_equal": _same_on_all_ranks(got),
    }


def _sds_reference(knobs: dict) -> torch.nn.Module:
    """The window's ESAM step by hand: pass 1 on the global batch of 8, the ascent, then per rank (rows 0,1,4,5
    and 2,3,6,7 of each global batch: its two micro-batches) the selection and the mean gradient of its chosen
    examples, averaged over the two ranks."""
    model = tiny_mlp()
    opt = build_sam_optimizer("esam", model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO, **knobs)

    def per_example(batch):
        return _per_example_mse(model(batch["x"]), batch)

    for batch in batches(regression_data(8 * STEPS), 8):
        opt.before_first_pass()
        opt.zero_grad()
        clean = per_example(batch)
        clean.mean().backward()
        opt.after_first_pass()
        with opt.selection_provided():
            assert opt.perturb()
        with torch.no_grad():
            perturbed = per_example(batch)
        opt.zero_grad()
        for rows in ([0, 1, 4, 5], [2, 3, 6, 7]):
            rows = torch.tensor(rows)
            chosen = rows[opt.select_examples(clean.detach()[rows], perturbed[rows])]
            (per_example({k: v[chosen] for k, v in batch.items()}).mean() / 2).backward()
        opt.restore()
        opt.base_optimizer.step()
    return model


def scope_and_asam_checks() -> dict:
    """ASAM (global scope) and SAM with ``microbatch`` scope (mSAM: each rank's micro-batch its own ascent, the
    pass-2 gradients summed over the window and averaged by DDP) through AcceleratedSAM, GA 2."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    asam = flat(_run(accelerator, "asam", MOMENTUM))
    msam_scope = flat(_run(accelerator, scope="microbatch"))
    return {
        "asam_reference_diff": float((asam - flat(_variant_reference("asam", {}, RHO))).abs().max()),
        "asam_plain_sam_diff": float((asam - flat(_variant_reference("sam", {}, RHO))).abs().max()),
        "microbatch_reference_diff": float((msam_scope - flat(_microbatch_reference())).abs().max()),
        "microbatch_global_diff": float((msam_scope - flat(_run(accelerator, scope="global"))).abs().max()),
        "replicas_equal": _same_on_all_ranks(asam) and _same_on_all_ranks(msam_scope),
    }


def _microbatch_reference() -> torch.nn.Module:
    """mSAM by hand in one process: an ascent per micro-batch of 2 from its own gradient, the four micro-batches'
    pass-2 gradients (two per rank) summed, divided by the accumulation steps and averaged over the two ranks."""
    model = tiny_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO)
    params = list(model.parameters())
    for batch in batches(regression_data(8 * STEPS), 8):
        window = [torch.zeros_like(p) for p in params]
        for rows in ([0, 1], [4, 5], [2, 3], [6, 7]):
            micro = {k: v[rows] for k, v in batch.items()}
            opt.zero_grad()
            mse(model, micro).backward()
            with opt.perturbed():
                opt.zero_grad()
                mse(model, micro).backward()
            for total, p in zip(window, params, strict=True):
                total.add_(p.grad / 4)
        for total, p in zip(window, params, strict=True):
            p.grad = total
        opt.base_optimizer.step()
    return model
