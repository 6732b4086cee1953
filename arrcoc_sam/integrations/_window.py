"""One accumulation window of a sharpness-aware step, shared by SAMTrainer and the Accelerate helper.

The caller feeds micro-batches one at a time through :meth:`SAMWindow.micro_step` with ``run_pass``, a
function that runs forward + backward for one micro-batch exactly as the stock loop does (same loss
normalisation, same ``accelerator.backward``) and returns the detached loss. Gradients are synchronised
by DDP exactly when ``accelerator.sync_gradients`` is true on entry; ``no_sync`` always wraps the forward
and the backward. The optimizer is driven only through its hooks, in this order per window::

    before_first_pass() ; ascent_this_step()            # first micro-batch
    pass 1 over the window                               # clean loss, returned to the caller
    after_first_pass() ; perturb() ; replay ; restore()  # last micro-batch (``sync_gradients``)

Scopes (the ascent direction): ``global`` takes ε from the all-reduced window gradient; ``per_device``
from each rank's own window gradient (pass 1 of the last micro-batch runs under ``no_sync`` too);
``microbatch`` (mSAM) from each micro-batch's own gradient, with its own second pass right away.
The replay runs under :func:`preserve_running_stats`, so BatchNorm-style statistics move once per step.

Metrics (:class:`SAMMetrics`): ``loss_perturbed`` and ``sharpness`` are per-window sums in the units of the
clean loss the loop logs; ``grad_norm``/``grad_norm_perturbed``/``grad_cosine``/``rho`` are the optimizer's
``stats`` after each ascent (gradient norms divided by the GradScaler scale). Under ``microbatch`` the
second-pass figures are measured on the gradient accumulated so far in the window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from arrcoc_sam.sam.norm_stats import preserve_running_stats

__all__ = ["SAMMetrics", "SAMWindow"]

RunPass = Callable[[Any], Tensor]
_STAT_KEYS = ("grad_norm", "grad_norm_perturbed", "grad_cosine", "rho")
_SCALED_STATS = ("grad_norm", "grad_norm_perturbed")
METRIC_KEYS = ("loss_perturbed", "sharpness", *_STAT_KEYS)


class SAMMetrics:
    """On-device running sums of the ``sam/*`` figures between two reads; no host sync until :meth:`read`."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = dict.fromkeys(METRIC_KEYS, 0)
        self._skipped = 0

    def add(self, key: str, value: Tensor) -> None:
        """Add one observation (a 0-dim tensor on any device) of ``key``."""
        value = value.detach().float()
        if key in self._sums:
            self._sums[key] = self._sums[key] + value.to(self._sums[key].device, non_blocking=True)
        else:
            self._sums[key] = value.clone()
        self._counts[key] += 1

    def add_skipped(self, count: int) -> None:
        self._skipped += count

    def read(self, accelerator: Any) -> dict[str, float]:
        """``{"sam/KEY": mean}`` over the observations since the last read, pooled over ranks; then reset.

        Every rank must call it together (one all-reduce, one host sync). ``sam/skipped_steps`` is the
        number of skipped ascents since the last read, averaged over ranks. Keys without any observation
        on any rank are left out.
        """
        device = next((t.device for t in self._sums.values()), accelerator.device)
        sums = [self._sums.get(k, torch.zeros((), device=device)).to(device) for k in METRIC_KEYS]
        counts = [float(self._counts[k]) for k in METRIC_KEYS]
        packed = torch.cat([torch.stack(sums), torch.tensor([*counts, float(self._skipped)], device=device)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()
        n = len(METRIC_KEYS)
        out = {f"sam/{k}": values[i] / values[n + i] for i, k in enumerate(METRIC_KEYS) if values[n + i] > 0}
        out["sam/skipped_steps"] = values[-1] / accelerator.num_processes
        self._sums, self._counts, self._skipped = {}, dict.fromkeys(METRIC_KEYS, 0), 0
        return out


class SAMWindow:
    """Runs the two passes of a sharpness-aware step over one gradient-accumulation window.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (``sync_gradients``, ``no_sync``, ``scaler``).
        scope: ``global`` | ``per_device`` | ``microbatch``.
    """

    def __init__(self, accelerator: Any, scope: str) -> None:
        self.accelerator = accelerator
        self.scope = scope
        self.metrics = SAMMetrics()
        self._open = False
        self._ascend = False
        self._batches: list[Any] = []
        self._clean: Tensor | None = None
        self._perturbed_sum: Tensor | None = None  # microbatch scope: Σ pass-2 losses (clean ones where skipped)
        self._any_ascent = False

    def micro_step(self, model: nn.Module, optimizer: Optimizer, batch: Any, run_pass: RunPass) -> Tensor:
        """Pass 1 on ``batch``; on the last micro-batch of the window also the ascent, the replay and the restore.

        Returns the clean (pass-1) loss of ``batch`` as ``run_pass`` returned it. Afterwards ``p.grad``
        holds the sharpness-aware gradient of the window (on its last micro-batch) and the weights are
        bitwise the clean ones, even when a pass raises.
        """
        last = bool(self.accelerator.sync_gradients)
        try:
            if not self._open:
                optimizer.before_first_pass()
                self._ascend = bool(optimizer.ascent_this_step())
                self._open = True
            if self._ascend and self.scope == "microbatch":
                loss = self._microbatch_step(model, optimizer, batch, run_pass, last)
                if last and self._any_ascent:
                    self._record_losses(clean=self._clean, perturbed=self._perturbed_sum)
            else:
                if self._ascend:
                    self._batches.append(batch)
                local = self._ascend and self.scope == "per_device" and last
                with self._no_sync(model) if local else contextlib.nullcontext():
                    loss = run_pass(batch)
                self._clean = loss if self._clean is None else self._clean + loss
                if last:
                    optimizer.after_first_pass()
                    if self._ascend:
                        self._ascend_and_replay(model, optimizer, run_pass)
        except BaseException:
            self._close()
            raise
        if last:
            self._close()
        return loss

    # -- global / per_device: one ascent from the window gradient, then replay the window -------------
    def _ascend_and_replay(self, model: nn.Module, optimizer: Optimizer, run_pass: RunPass) -> None:
        skipped_before = getattr(optimizer, "skipped_steps", 0)
        perturbed = None
        with preserve_running_stats(model):
            try:
                ok = optimizer.perturb()
                scale = self._grad_scale() if ok else 1.0
                # With a rank-local ascent every rank must still join the replay's all-reduce.
                if ok or (self.scope != "global" and self.accelerator.num_processes > 1):
                    model.zero_grad(set_to_none=True)
                    for index, batch in enumerate(self._batches):
                        inner = index < len(self._batches) - 1
                        with self._no_sync(model) if inner else contextlib.nullcontext():
                            loss = run_pass(batch)
                        perturbed = loss if perturbed is None else perturbed + loss
            finally:
                optimizer.restore()
        self.metrics.add_skipped(getattr(optimizer, "skipped_steps", 0) - skipped_before)
        if ok:
            self._record_losses(clean=self._clean, perturbed=perturbed)
            self._record_stats(optimizer, scale)

    # -- microbatch (mSAM): an ascent per micro-batch from its own gradient ---------------------------
    def _microbatch_step(
        self, model: nn.Module, optimizer: Optimizer, batch: Any, run_pass: RunPass, last: bool
    ) -> Tensor:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        with self._no_sync(model):
            loss = run_pass(batch)
        if last:
            optimizer.after_first_pass()
        skipped_before = getattr(optimizer, "skipped_steps", 0)
        perturbed = None
        with preserve_running_stats(model):
            try:
                ok = optimizer.perturb()
                scale = self._grad_scale() if ok else 1.0
                if ok or (last and self.accelerator.num_processes > 1):
                    for p, grad in zip(params, accumulated, strict=True):
                        p.grad = grad  # pass 2 accumulates onto the window's sum (and syncs it when last)
                    perturbed = run_pass(batch)
                else:
                    _add_grads_(params, accumulated)
            finally:
                optimizer.restore()
        self.metrics.add_skipped(getattr(optimizer, "skipped_steps", 0) - skipped_before)
        if ok:
            self._record_stats(optimizer, scale)
        # Window sums, comparable with the logged loss; a micro-batch without ascent contributes its clean loss.
        contribution = perturbed if ok else loss
        self._clean = loss if self._clean is None else self._clean + loss
        self._perturbed_sum = contribution if self._perturbed_sum is None else self._perturbed_sum + contribution
        self._any_ascent = self._any_ascent or ok
        return loss

    # -- helpers ---------------------------------------------------------------------------------------
    def _no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.accelerator.no_sync(model)

    def _grad_scale(self) -> float:
        """The GradScaler's current scale (1.0 without one): pass-1/2 gradients carry it."""
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _record_losses(self, *, clean: Tensor, perturbed: Tensor) -> None:
        self.metrics.add("loss_perturbed", perturbed)
        self.metrics.add("sharpness", perturbed - clean)

    def _record_stats(self, optimizer: Optimizer, scale: float) -> None:
        stats = getattr(optimizer, "stats", {})
        for key in _STAT_KEYS:
            if key in stats:
                value = stats[key]
                self.metrics.add(key, value / scale if key in _SCALED_STATS else value)

    def _close(self) -> None:
        self._open = False
        self._batches = []
        self._clean = self._perturbed_sum = None
        self._any_ascent = False


@torch.no_grad()
def _add_grads_(params: list[Tensor], grads: list[Tensor | None]) -> None:
    """``p.grad += g`` for every saved ``g`` (``p.grad = g`` where the pass left none), foreach-batched."""
    dst, src = [], []
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            dst.append(p.grad)
            src.append(g)
    if dst:
        torch._foreach_add_(dst, src)
