"""Sharpness-logging ``TrainerCallback``: periodic curvature probes on a fixed held-out batch set.

Logging path: the callback holds a reference to its Trainer (``SharpnessCallback(..., trainer=trainer)`` or
``callback.bind(trainer)``) and calls ``trainer.log(metrics)`` itself, so every reporting integration
(TensorBoard, W&B, …) and ``state.log_history`` receive the figures through the Trainer's own ``log``.
``Trainer.log`` runs no collective, so calling it on one rank is safe, but it resets ``control.should_log``:
the callback restores the control flags afterwards, or rank 0 would skip the Trainer's loss gather (a
collective) that the other ranks enter, and the run would desynchronise. (For the same reason the callback
never *sets* ``should_log`` itself.)

Distributed training: probes run on the world-process-zero only, on the unwrapped module (no DDP hooks,
``torch.autograd.grad`` never fills ``.grad``), with no collective inside; the other ranks go on and simply
wait for rank 0 at the next gradient all-reduce. Sharded-parameter setups (FSDP, DeepSpeed ZeRO-3) are
refused, because there rank 0 alone cannot run the full model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from arrcoc_sam.curvature import hessian_trace, probe_context, sam_sharpness, top_eigenvalues
from arrcoc_sam.curvature._checks import check_positive
from arrcoc_sam.curvature._data import LossFn, default_loss

__all__ = ["SharpnessCallback", "PROBE_KEYS", "SECONDS_KEY", "CONVERGED_KEY", "TRACE_STDERR_KEY"]

PROBE_KEYS = {
    "top_eigenvalue": "sharpness/top_eigenvalue",
    "trace": "sharpness/trace",
    "sam_sharpness": "sharpness/sam",
    "adaptive_sharpness": "sharpness/adaptive",
}
SECONDS_KEY = "sharpness/probe_seconds"
CONVERGED_KEY = "sharpness/top_eigenvalue_converged"
TRACE_STDERR_KEY = "sharpness/trace_stderr"


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


class SharpnessCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, measure ``probes`` on ``eval_batches`` and log them.

    Args:
        every_n_steps: probe interval in optimizer steps (``state.global_step``), > 0.
        probes: any of ``"top_eigenvalue"`` (Lanczos, at most ``max_iter`` products per run; stops once the
            residual test at ``tol`` passes), ``"trace"`` (Hutchinson, ``num_probes`` products),
            ``"sam_sharpness"`` (first-order, radius ``rho``), ``"adaptive_sharpness"`` (ASAM, η = 0, radius
            ``adaptive_rho``); a single name is accepted as a string. Logged as ``PROBE_KEYS[probe]``, plus
            ``sharpness/probe_seconds`` (wall time of all probes of that step), and with the top eigenvalue
            ``sharpness/top_eigenvalue_converged`` (1.0 when Lanczos met its residual test, else 0.0: raise
            ``max_iter``), with the trace ``sharpness/trace_stderr`` (its Monte Carlo standard error).
        eval_batches: a fixed, non-empty list of held-out batches (dicts for HF models), moved to the model's
            device at each probe. The same batches every time, so the figures are comparable over training.
            Checked when training begins (each must give a scalar loss), not first at the first probe.
        trainer: the Trainer to log through (or call :meth:`bind` after building the Trainer).
        loss_fn: ``loss_fn(model, batch) -> scalar``; None means ``model(**batch).loss``.
        rho, adaptive_rho, num_probes, tol, max_iter, seed: probe settings (see ``arrcoc_sam.curvature``).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        probes: Sequence[str] = ("top_eigenvalue", "trace", "sam_sharpness"),
        eval_batches: Sequence[Any] = (),
        *,
        trainer: Any = None,
        loss_fn: LossFn | None = None,
        rho: float = 0.05,
        adaptive_rho: float = 0.5,
        num_probes: int = 8,
        tol: float = 1e-3,
        max_iter: int = 64,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if isinstance(probes, str):
            probes = (probes,)
        check_positive("rho", rho)
        check_positive("adaptive_rho", adaptive_rho)
        check_positive("tol", tol)
        if num_probes < 2:
            raise ValueError(f"num_probes must be >= 2 (the trace's standard error needs two probes), got {num_probes}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        unknown = [probe for probe in probes if probe not in PROBE_KEYS]
        if unknown or not probes:
            raise ValueError(f"probes must be a non-empty subset of {tuple(PROBE_KEYS)}, got {tuple(probes)}")
        self.eval_batches = list(eval_batches)
        if not self.eval_batches:
            raise ValueError("eval_batches must hold at least one held-out batch")
        self.every_n_steps = every_n_steps
        self.probes = tuple(probes)
        self.loss_fn = loss_fn
        self.rho, self.adaptive_rho = rho, adaptive_rho
        self.num_probes, self.tol, self.max_iter, self.seed = num_probes, tol, max_iter, seed
        self.trainer = trainer

    def bind(self, trainer: Any) -> SharpnessCallback:
        """Log through ``trainer`` (its ``log`` method); returns self, for ``trainer.add_callback(cb.bind(trainer))``."""
        self.trainer = trainer
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "SharpnessCallback is not bound to a Trainer: pass trainer=... or call callback.bind(trainer) "
                "before trainer.train(), so the probes can be logged through trainer.log"
            )
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise ValueError("SharpnessCallback needs the full model on rank 0: FSDP/DeepSpeed sharding is not supported")
        if state.is_world_process_zero and model is not None:
            self.check_batches(model)

    def check_batches(self, model: nn.Module) -> None:
        """One no-grad forward per eval batch (eval mode; mode, grads and RNG restored): each must give a scalar
        loss, so a batch without labels fails before training rather than at the first probe."""
        model = _unwrap(model)
        device = next(model.parameters()).device
        loss_fn = self.loss_fn or default_loss
        with probe_context(model, []), torch.no_grad():
            for index, batch in enumerate(self.eval_batches):
                try:
                    loss = loss_fn(model, _to_device(batch, device))
                except (TypeError, ValueError, KeyError) as err:
                    raise ValueError(f"SharpnessCallback: eval_batches[{index}] gives no loss: {err}") from err
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(
                        f"SharpnessCallback: eval_batches[{index}]: loss_fn must return a scalar tensor, got "
                        f"{getattr(loss, 'shape', type(loss).__name__)}"
                    )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps or not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("SharpnessCallback.on_step_end needs the model (the Trainer passes model=...)")
        metrics = self.measure(model)
        flags = dataclasses.asdict(control)
        self.trainer.log(metrics)
        for name, value in flags.items():  # Trainer.log resets control.should_log; the Trainer's own loss
            setattr(control, name, value)  # logging (a collective) must still run on this rank this step

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Run the configured probes now; returns ``{PROBE_KEYS[probe]: value, "sharpness/probe_seconds": s}``
        plus ``CONVERGED_KEY`` / ``TRACE_STDERR_KEY`` with the top eigenvalue / trace."""
        model = _unwrap(model)
        device = next(model.parameters()).device
        batches = [_to_device(batch, device) for batch in self.eval_batches]
        # each probe gets an iterator: a plain list of tensors would be read as one batch of several tensors
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        for probe in self.probes:
            if probe == "top_eigenvalue":
                result = top_eigenvalues(model, self.loss_fn, iter(batches), tol=self.tol, max_iter=self.max_iter, seed=self.seed)
                value = float(result.values[0])
                metrics[CONVERGED_KEY] = float(result.converged)
            elif probe == "trace":
                trace = hessian_trace(model, self.loss_fn, iter(batches), num_probes=self.num_probes, seed=self.seed)
                value = trace.value
                metrics[TRACE_STDERR_KEY] = trace.stderr
            elif probe == "sam_sharpness":
                value = sam_sharpness(model, self.loss_fn, iter(batches), rho=self.rho, seed=self.seed)
            else:
                value = sam_sharpness(model, self.loss_fn, iter(batches), rho=self.adaptive_rho, adaptive=True, eta=0.0, seed=self.seed)
            metrics[PROBE_KEYS[probe]] = value
        metrics[SECONDS_KEY] = time.perf_counter() - start
        return metrics
