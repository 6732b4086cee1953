"""Sharpness-aware minimisation in a plain Accelerate loop.

Prepare the base optimizer as usual, wrap it once, and let one call per micro-batch run both passes::

    model, optimizer, loader = accelerator.prepare(model, torch.optim.AdamW(model.parameters()), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.05)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = sam.backward(lambda m, b: m(**b).loss, batch)   # pass 1 (+ ascent, replay, restore)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

``backward`` runs the loss closure with ``accelerator.backward`` (so the GradScaler under fp16 and the
accumulation scaling apply). On the last micro-batch of an accumulation window
(``accelerator.sync_gradients``) it takes the ascent from the accumulated gradient, replays the window's
micro-batches at w + ε (``no_sync`` on all but the last, forward and backward), and copies the clean
weights back even if a pass raises. ``optimizer.step()`` then steps the base optimizer on the
sharpness-aware gradient; under fp16 the GradScaler unscales it and skips non-finite steps as usual.
The window keeps references to its micro-batches until the ascent (``global``/``per_device`` scopes).
Accumulate through Accelerate (``Accelerator(gradient_accumulation_steps=k)`` and ``accelerator.accumulate``):
the window ends where ``accelerator.sync_gradients`` says so. Several ``backward`` calls per optimizer step
without it would each be a whole window, and each replay would start from zeroed gradients.

ESAM's data selection (``method="esam"``, ``gamma < 1``) reads per-example losses from the outputs of the
model's forward inside ``loss_fn`` (:func:`~arrcoc_sam.sam.variants.esam.per_example_loss` by default, or
``per_example_loss_fn``); ``loss_fn`` must call the model exactly once. The replay runs ``loss_fn`` at
w + ε on the window under ``no_grad`` (replaying pass 1's dropout masks), then on the chosen examples only
(at least two under BatchNorm), back-propagating ESAM's mean over them, each micro-batch weighted as its own
loss is and put in pass 1's units, instead of ``loss_fn``'s (see ``arrcoc_sam.integrations._window``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import Tensor, nn

from arrcoc_sam.curvature._data import shifts_labels
from arrcoc_sam.integrations._settings import SAMSettings, check_launched_processes_join, check_run_compatible
from arrcoc_sam.integrations._window import ExampleLosses, SAMWindow, shallow_copy, uses_static_graph
from arrcoc_sam.sam.optimizer import was_wrapped
from arrcoc_sam.sam.sharding import check_model_supported, is_sharded
from arrcoc_sam.sam.variants.esam import per_example_loss

__all__ = ["AcceleratedSAM"]

LossFn = Callable[[nn.Module, Any], Tensor]


class AcceleratedSAM:
    """The two passes of a sharpness-aware step for a loop built on ``accelerate``.

    Args:
        accelerator: the ``Accelerator`` that prepared ``model`` and ``optimizer``.
        model: the prepared model (DDP-wrapped when distributed).
        optimizer: the prepared base optimizer (an ``AcceleratedOptimizer``) or a plain one; the user keeps
            calling its ``step()``/``zero_grad()``.
        method: any name from :func:`arrcoc_sam.sam.registry.available_methods` except ``"none"``.
        scope: ``global`` (ε from the all-reduced gradient), ``per_device`` (each rank's own, pass 1 under
            ``no_sync``) or ``microbatch`` (one ascent per micro-batch, needs gradient accumulation).
        rho, eta, interval: the method's knobs (``None``: its default); ``knobs``: any further ones.
        per_example_loss_fn: ``fn(outputs, batch) -> Tensor [B]`` for ESAM's data selection (default
            :func:`~arrcoc_sam.sam.variants.esam.per_example_loss`, on next-token labels for causal LMs).
        statistics: compute the pass-2 statistics (``sam/grad_norm_perturbed``, ``sam/grad_cosine``) each
            step, and without a GradScaler drop a window's non-finite sharpness-aware gradient so that the loop's
            step leaves the weights as they are (one host sync); ``False`` saves their three reductions and the
            check.
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        method: str = "sam",
        *,
        scope: str = "global",
        rho: float | None = None,
        eta: float | None = None,
        interval: int | None = None,
        per_example_loss_fn: Callable[[Any, Any], Tensor] | None = None,
        statistics: bool = True,
        **knobs: Any,
    ) -> None:
        _check_types(accelerator, model, optimizer, per_example_loss_fn)
        settings = SAMSettings(method=method, rho=rho, eta=eta, scope=scope, interval=interval, extra=knobs,
                               statistics=statistics)
        if not settings.enabled:
            raise ValueError("method='none' needs no AcceleratedSAM: call accelerator.backward(loss) directly")
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
        if accelerator.distributed_type == DistributedType.FSDP:
            fsdp_version = fsdp_plugin.fsdp_version
        else:  # a model sharded by hand with fully_shard never went through Accelerate's FSDP setup
            fsdp_version = 2 if is_sharded(model.parameters()) else None
        check_model_supported(model)
        _check_prepared(accelerator, model, optimizer, fsdp_version)
        check_launched_processes_join(accelerator.num_processes, f"the Accelerator's distributed type is "
                                      f"{accelerator.distributed_type.value}", "build Accelerator(cpu=True)")
        check_run_compatible(
            settings,
            gradient_accumulation_steps=accelerator.gradient_accumulation_steps,
            optim="",
            zero_stage=plugin.zero_stage if plugin is not None else None,
            fsdp_version=fsdp_version,
            ddp_static_graph=uses_static_graph(model),
        )
        self.accelerator = accelerator
        self.model = model
        base = getattr(optimizer, "optimizer", optimizer)
        _check_not_loaded_before(base)
        # the loop loads the base optimizer (accelerator.load_state), whose load hooks the wrapper owns: as in
        # SAMTrainer, the settings this run was started with win over a checkpoint's, with a warning
        self.sam_optimizer = settings.build(base).keep_settings_on_load()
        self.per_example_loss_fn = per_example_loss_fn or functools.partial(
            per_example_loss, shift_labels=shifts_labels(model)
        )
        self._window = SAMWindow(accelerator, settings.scope)
        if hasattr(self.sam_optimizer, "variant_state_dict") and fsdp_version is not None:
            # The variant's own state (periodic's step counter) rides in the base optimizer's state dict, which
            # the wrapper hooks; FSDP saves the optimizer through torch.distributed.checkpoint, which keeps only
            # "state" and "param_groups", so there it is saved as a custom checkpoint object instead.
            accelerator.register_for_checkpointing(self)

    def state_dict(self) -> dict[str, Any]:
        """The variant's own checkpoint state (empty for SAM/ASAM, whose state is the base optimizer's)."""
        return self.sam_optimizer.variant_state_dict() if hasattr(self.sam_optimizer, "variant_state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.sam_optimizer, "load_variant_state_dict"):
            self.sam_optimizer.load_variant_state_dict(state)

    def backward(self, loss_fn: LossFn, batch: Any) -> Tensor:
        """Pass 1 of ``loss_fn(model, batch)``; on the window's last micro-batch also ascent, replay, restore.

        Returns the clean loss (detached, as computed, before accumulation scaling).
        """

        def run_pass(micro_batch: Any) -> Tensor:
            loss = loss_fn(self.model, shallow_copy(micro_batch))  # the replay reuses the batch: keep it whole
            self.accelerator.backward(loss)
            return loss.detach()

        def forward(module: nn.Module, micro_batch: Any) -> Tensor:
            return loss_fn(module, shallow_copy(micro_batch)).detach()

        example_losses = ExampleLosses(forward, self.per_example_loss_fn)
        return self._window.micro_step(self.model, self.sam_optimizer, batch, run_pass, example_losses)

    def metrics(self) -> dict[str, float]:
        """``sam/*`` averages since the last call, pooled over ranks (all ranks must call it together)."""
        return self._window.metrics.read(self.accelerator)


def _check_types(accelerator: Any, model: Any, optimizer: Any, per_example_loss_fn: Any) -> None:
    """TypeError naming the argument for arguments of the wrong kind (swapped, or None)."""
    if not all(hasattr(accelerator, name) for name in ("backward", "sync_gradients", "no_sync")):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module accelerator.prepare returned, got {type(model).__name__}")
    if not isinstance(getattr(optimizer, "optimizer", optimizer), torch.optim.Optimizer):
        raise TypeError(f"optimizer must be the optimizer accelerator.prepare returned (or a torch.optim.Optimizer), "
                        f"got {type(optimizer).__name__}")
    if per_example_loss_fn is not None and not callable(per_example_loss_fn):
        raise TypeError(f"per_example_loss_fn must be callable fn(outputs, batch) -> Tensor [B], got {per_example_loss_fn!r}")


_DATA_PARALLEL = frozenset(kind for kind in DistributedType if kind.value.startswith("MULTI_"))


def _check_prepared(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer, fsdp_version: int | None) -> None:
    """Refuse a model that ``accelerator.prepare`` did not wrap in a multi-process data-parallel run (the helper
    runs the model itself, so a bare module would train one unsynchronised copy per process), and an optimizer
    that updates none of the model's parameters."""
    processes = int(getattr(accelerator, "num_processes", 1))
    wrapper = getattr(model, "_orig_mod", model)  # Accelerator(dynamo_backend=...) compiles the DDP wrapper
    if processes > 1 and accelerator.distributed_type in _DATA_PARALLEL and not isinstance(
        wrapper, nn.parallel.DistributedDataParallel
    ):
        raise ValueError(
            f"AcceleratedSAM got a {type(model).__name__} that is not wrapped in DistributedDataParallel, in a run "
            f"of {processes} processes: nothing would average the gradients across them. Pass the model that "
            "accelerator.prepare returned (not accelerator.unwrap_model(model), nor the model before prepare)"
        )
    if processes > 1 and fsdp_version == 2 and not is_sharded(model.parameters()):
        raise ValueError("AcceleratedSAM got a model whose parameters are not sharded in an FSDP run: pass the model "
                         "that accelerator.prepare returned")
    model_params = {id(p) for p in model.parameters()}
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    if model_params and optimized and not any(id(p) in model_params for p in optimized):
        raise ValueError(
            "the optimizer updates none of the model's parameters: build it over model.parameters() of the model "
            "passed to AcceleratedSAM (after accelerator.prepare, pass the prepared pair)"
        )


def _check_not_loaded_before(base: torch.optim.Optimizer) -> None:
    """Refuse a base optimizer into which a sharpness-aware checkpoint was loaded before any wrapper held it (it holds
    state, every group carries ρ, adaptive and η, and no wrapper wrote them): ``accelerator.load_state`` ran before the helper
    was built, so torch dropped the method's own state (step counters, LookSAM's direction, Friendly-SAM's
    average) and the checkpoint's ρ would pass for this run's own per-group setting."""
    if was_wrapped(base):
        return
    loaded = bool(base.state)  # a fresh optimizer whose groups carry the user's own ρ/adaptive/η holds no state yet
    if loaded and base.param_groups and all({"rho", "adaptive", "eta"} <= group.keys() for group in base.param_groups):
        raise ValueError(
            "the optimizer already holds a sharpness-aware checkpoint's settings (rho, adaptive, eta in every param "
            "group) although no AcceleratedSAM wrapped it: accelerator.load_state ran before AcceleratedSAM was "
            "built, so the method's own state in that checkpoint was dropped; build AcceleratedSAM(...) first, then "
            "call accelerator.load_state(...)")
