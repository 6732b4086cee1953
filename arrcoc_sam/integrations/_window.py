"""One accumulation window of a sharpness-aware step, shared by SAMTrainer and the Accelerate helper.

The caller feeds micro-batches one at a time through :meth:`SAMWindow.micro_step` with ``run_pass``, a
function that runs forward + backward for one micro-batch exactly as the stock loop does (same loss
normalisation, same ``accelerator.backward``) and returns the detached loss. Gradients are synchronised
by DDP exactly when ``accelerator.sync_gradients`` is true on entry; ``no_sync`` always wraps the forward
and the backward. The optimizer is driven only through its hooks, in this order per window::

    before_first_pass() ; ascent_this_step()            # first micro-batch
    pass 1 over the window                               # clean loss, returned to the caller
    after_first_pass() ; perturb() ; replay ; restore()  # last micro-batch (``sync_gradients``)

Between micro-batches the weights are the clean ones: a method that perturbs for pass 1 (msam, from
``before_first_pass``) is restored after each micro-batch that does not end the window and perturbed again,
with the same ε, before the next. If a pass raises, ``abort_window()`` replaces the rest: the clean weights are copied back, nothing is taken
from the partial gradients and the window counts as no optimizer step; the error propagates.

Scopes (the ascent direction): ``global`` takes ε from the all-reduced window gradient; ``per_device``
from each rank's own window gradient (pass 1 of the last micro-batch runs under ``no_sync`` too);
``microbatch`` (mSAM) from each micro-batch's own gradient, with its own second pass right away.
The replay runs under :func:`preserve_running_stats`, so BatchNorm-style statistics move once per step.

Data selection (ESAM's SDS, an optimizer with ``selects_examples`` true, given :class:`ExampleLosses`, in
the ``global``/``per_device`` scopes): pass 1 also records the clean per-example losses of each micro-batch
from its own forward (a forward hook, no extra pass). The replay then runs, per micro-batch, one forward at
w + ε under ``no_grad`` for the perturbed per-example losses (replaying that micro-batch's pass-1 random draws, so
its dropout masks); ``select_examples`` picks the top ⌈γ·B⌉ rises (at least two under BatchNorm in training mode)
over the rank's whole window (B examples, as ESAM's closure step selects over its batch); and only the chosen
examples run forward + backward, regrouped into as few sub-batches of at most one micro-batch's size as hold
them where the micro-batches can be concatenated (otherwise micro-batch by micro-batch), with the loss
``Σ_{i∈chosen} w_i ℓ_i / Σ_{i∈chosen} w_i`` in the units of pass 1's loss, with each micro-batch's weights
(:class:`ExampleLosses`, ones by default) scaled so that its Σ w_i ℓ_i is the loss its pass returned: with equal
micro-batches and a mean loss, exactly ESAM's ``∇ mean_{i∈B⁺} ℓ_i(w + ε)``, and choosing every example gives the
stock window gradient. Under DDP each rank selects from its own
window and DDP averages the ranks' gradients. All these forwards go through the unwrapped module except the
one that back-propagates last, which goes through the DDP wrapper and syncs (a sub-batch with no chosen
example is skipped; every rank makes exactly one DDP forward in the replay). Cost: one forward over the
window plus forward + backward over ⌈γ·B⌉ examples. Where the per-example losses are unavailable
(:class:`~arrcoc_sam.sam.variants.esam.PerExampleLossUnavailable`) or under ``microbatch`` scope, the
replay is the whole window and the optimizer warns once.

Pruned pass 1 (an optimizer whose ``first_pass_tensors()`` names a subset, ESAM's tensor SWP, in the
``global``/``per_device`` scopes, on a plain or DDP-wrapped model without activation checkpointing or ``torch.compile``): pass 1 runs with ``requires_grad`` off on
the other tensors, so autograd skips their weight gradients. Under DDP with ``global`` scope it runs under
``no_sync`` and the window averages the chosen gradients over the ranks itself (one all-reduce per dtype),
because DDP's buckets expect every gradient; DDP with ``static_graph`` cannot run that, so there pass 1 keeps every
gradient. The first window that could prune runs pass 1 in full instead and searches its graph for reentrant
activation checkpointing (which tracks a block's inputs, not its weights, so pruning could leave chosen weights
without gradient); where any rank finds it, or finds no output with a graph to search, pass 1 keeps every
gradient from then on. The replay computes every
gradient as usual.

Metrics (:class:`SAMMetrics`): ``loss_perturbed`` and ``sharpness`` are per-window sums in the units of the
clean loss the loop logs; ``grad_norm``/``grad_norm_perturbed``/``grad_cosine``/``rho`` are the optimizer's
``stats`` after each ascent (gradient norms divided by the GradScaler scale, and in the global and per_device
scopes by the share of a short last window's mean gradient its ``.grad`` holds). Under ``microbatch`` the
second-pass figures are measured on the gradient accumulated so far in the window, and a window one of whose
micro-batches met non-finite gradients records none. A window whose ascent meets non-finite (pass-1) gradients,
or whose sharpness-aware gradient is non-finite (read from the largest gradient norm its restores recorded; not without
the pass-2 statistics), takes no step, on every rank: the optimizer skips it, and without a GradScaler its
gradients are dropped for loops that step the base optimizer directly. Windows without an ascent are not checked
(a GradScaler checks them under fp16).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import UserDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.optim import Optimizer

from arrcoc_sam.integrations._settings import check_static_graph
from arrcoc_sam.sam.norm_stats import fewest_examples_per_batch, preserve_running_stats
from arrcoc_sam.sam.perturbation import largest_magnitude
from arrcoc_sam.sam.random_state import RandomState
from arrcoc_sam.sam.variants._base import gradients_only_for, uses_reentrant_checkpointing
from arrcoc_sam.sam.variants.esam import PerExampleLossUnavailable, select_at_least

__all__ = ["ExampleLosses", "SAMMetrics", "SAMWindow", "shallow_copy"]

logger = logging.getLogger(__name__)

RunPass = Callable[[Any], Tensor]


@dataclass
class ExampleLosses:
    """What data selection needs from an integration.

    Attributes:
        forward: ``forward(module, batch) -> loss`` runs ``module`` on ``batch`` exactly as the loop's pass
            does (input preparation, autocast), without backward, and returns the loss in the units
            ``run_pass`` returns (for the ``sam/*`` metrics).
        per_example: ``per_example(outputs, batch) -> [B]`` per-example losses from the module's outputs.
        weights: ``weights(micro_batch) -> [B] | None``, each example's share within its micro-batch of the loss
            the loop's pass takes (its labelled tokens for a token-mean loss). Pass 1 scales them per micro-batch
            so that Σ wᵢ ℓᵢ is the loss that micro-batch's pass returned (which also settles whether the loss is a
            mean over the window or over each micro-batch); pass 2 trains on the chosen examples' Σ wᵢ ℓᵢ, scaled
            to the window, so choosing every example gives the stock loss. None (the function, or its value):
            every example of a micro-batch alike (scaled the same way).
    """

    forward: Callable[[nn.Module, Any], Tensor]
    per_example: Callable[[Any, Any], Tensor]
    weights: Callable[[Any], Tensor] | None = None


_STAT_KEYS = ("grad_norm", "grad_norm_perturbed", "grad_cosine", "rho")
_SCALED_STATS = ("grad_norm", "grad_norm_perturbed")
METRIC_KEYS = ("loss_perturbed", "sharpness", *_STAT_KEYS)


class SAMMetrics:
    """On-device running sums of the ``sam/*`` figures between two reads; no host sync until :meth:`read`.

    A non-finite observation (a pass that overflowed under an fp16 GradScaler, whose step is skipped) is left out
    of its mean, on the device, as the Trainer leaves non-finite losses out of its logged ``loss``."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}
        self._skipped = 0

    def add(self, key: str, value: Tensor) -> None:
        """Add one observation (a 0-dim tensor on any device) of ``key``."""
        value = value.detach().float()
        finite = torch.isfinite(value)
        value = torch.where(finite, value, torch.zeros_like(value))
        if key in self._sums:
            device = self._sums[key].device
            self._sums[key] = self._sums[key] + value.to(device, non_blocking=True)
            self._counts[key] = self._counts[key] + finite.to(device, non_blocking=True)
        else:
            self._sums[key], self._counts[key] = value, finite.float()

    def add_skipped(self, count: int) -> None:
        self._skipped += count

    def read(self, accelerator: Any) -> dict[str, float]:
        """``{"sam/KEY": mean}`` over the observations since the last read, pooled over ranks; then reset.

        Every rank must call it together (one all-reduce, one host sync). ``sam/skipped_steps`` is the
        number of skipped ascents since the last read, averaged over ranks. Keys without any observation
        on any rank are left out.
        """
        device = next((t.device for t in self._sums.values()), accelerator.device)
        zero = torch.zeros((), device=device)
        sums = [self._sums.get(k, zero).to(device) for k in METRIC_KEYS]
        counts = [self._counts.get(k, zero).to(device) for k in METRIC_KEYS]
        packed = torch.cat([torch.stack(sums), torch.stack(counts), torch.tensor([float(self._skipped)], device=device)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()
        n = len(METRIC_KEYS)
        out = {f"sam/{k}": values[i] / values[n + i] for i, k in enumerate(METRIC_KEYS) if values[n + i] > 0}
        out["sam/skipped_steps"] = values[-1] / accelerator.num_processes
        self._sums, self._counts, self._skipped = {}, {}, 0
        return out


class SAMWindow:
    """Runs the two passes of a sharpness-aware step over one gradient-accumulation window.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (``sync_gradients``, ``no_sync``, ``scaler``).
        scope: ``global`` | ``per_device`` | ``microbatch``.
        loop_steps_base: the loop steps the base optimizer itself (AcceleratedSAM), so a window that met
            non-finite gradients (in its ascent or its sharpness-aware gradient) drops them (without a GradScaler)
            for that step to change nothing; False where the step goes through the sharpness-aware optimizer
            (SAMTrainer), which the window asks to skip it.
        no_sync: ``no_sync(model)``, the context that holds back a pass's gradient reduction (default:
            ``accelerator.no_sync``; SAMTrainer passes the Trainer's own for models sharded at load time).
    """

    def __init__(
        self,
        accelerator: Any,
        scope: str,
        loop_steps_base: bool = True,
        no_sync: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self._hold_reduction = no_sync
        self.scope = scope
        self.loop_steps_base = loop_steps_base
        self.metrics = SAMMetrics()
        self._open = False
        self._ascend = False
        self._batches: list[Any] = []
        # each stored micro-batch's own run_pass and forward: the loop's normalisation of that pass (a micro-batch
        # carried over from an unfinished window, e.g. at the end of an IterableDataset, has its own)
        self._replays: list[RunPass] = []
        self._forwards: list[Callable[[nn.Module, Any], Tensor]] = []
        self._clean: Tensor | None = None
        self._perturbed_sum: Tensor | None = None  # microbatch scope: Σ pass-2 losses (clean ones where skipped)
        self._any_ascent = False
        self._pending_stats: list[tuple[dict[str, Tensor], float]] = []  # microbatch scope: recorded at window end
        self._non_finite = False  # an ascent of this window met non-finite gradients: its step is skipped
        self._update_norm: Tensor | None = None  # the largest gradient norm the window's restores recorded
        self._select = False  # this window runs data selection
        self._selection_unavailable = False  # the per-example losses raised PerExampleLossUnavailable once
        self._clean_examples: list[Tensor] = []  # [B_m] clean per-example losses of each micro-batch
        self._clean_weights: list[Tensor] = []  # [B_m] their weights in the loss (ExampleLosses.weights)
        self._random_states: list[RandomState] = []  # the generators before each micro-batch's pass 1
        self._reapply = False  # the optimizer perturbs for pass 1 (msam) and was restored after a micro-batch
        self._first_pass_tensors: list[Tensor] | None = None  # pass 1 computes gradients for these only
        self._average_by_hand = False  # pass 1 runs under no_sync and the window all-reduces those gradients
        self._may_prune_first_pass: bool | None = None  # None until a probe window has run pass 1 in full
        self._probe: _CheckpointProbe | None = None  # this window's pass 1 is that probe
        self._micro_batches = 0  # micro-batches of the open window so far

    def micro_step(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        batch: Any,
        run_pass: RunPass,
        example_losses: ExampleLosses | None = None,
    ) -> Tensor:
        """Pass 1 on ``batch``; on the last micro-batch of the window also the ascent, the replay and the restore.

        Returns the clean (pass-1) loss of ``batch`` as ``run_pass`` returned it. Afterwards ``p.grad``
        holds the sharpness-aware gradient of the window (on its last micro-batch) and the weights are
        bitwise the clean ones, even when a pass raises. ``example_losses`` enables data selection for
        optimizers that select examples (module docstring).
        """
        last = bool(self.accelerator.sync_gradients)
        try:
            if self._reapply:
                self._reapply = False
                optimizer.perturb()  # the same ε again: nothing it depends on moves within a window
            if not self._open:
                steps = int(getattr(self.accelerator, "gradient_accumulation_steps", 1))
                check_static_graph(uses_static_graph(model), self.scope, steps)
                optimizer.before_first_pass()
                self._ascend = bool(optimizer.ascent_this_step())
                if self._ascend and self.scope != "microbatch":
                    _check_no_earlier_gradients(optimizer)
                self._select = self._ascend and self._can_select(optimizer, example_losses)
                self._plan_first_pass(model, optimizer)
                self._open = True
            self._micro_batches += 1
            if self._ascend and self.scope == "microbatch":
                loss = self._microbatch_step(model, optimizer, batch, run_pass, last)
                if last:
                    self._end_microbatch_window(optimizer)
            else:
                if self._ascend:
                    self._batches.append(batch)
                    self._replays.append(run_pass)
                    if example_losses is not None:
                        self._forwards.append(example_losses.forward)
                # every pass-1 micro-batch, also under Accelerate's sync_each_batch: ε from this rank's own window
                # (per_device), or from gradients this window averages by hand (a pruned pass 1 under DDP)
                local = self._ascend and (self.scope == "per_device" or self._average_by_hand)
                needed = self._first_pass_tensors
                pruned = _pruned_first_pass(self.accelerator, _params_of(optimizer), needed)
                probe = self._probe.watching(_unwrapped(model)) if self._probe else contextlib.nullcontext()
                with self._no_sync(model) if local else contextlib.nullcontext(), pruned, probe:
                    if self._select:
                        loss = self._pass_recording_examples(model, batch, run_pass, example_losses)
                    else:
                        loss = run_pass(batch)
                self._clean = loss if self._clean is None else self._clean + loss
                if last:
                    if self._probe is not None:
                        self._decide_pruning(self._probe.unsafe, _params_of(optimizer)[0].device)
                    if self._average_by_hand:
                        _average_across_processes(self._first_pass_tensors)
                    optimizer.after_first_pass()
                    if self._ascend:
                        self._ascend_and_replay(model, optimizer, example_losses)
        except BaseException:
            optimizer.abort_window()  # clean weights (msam perturbs before pass 1); the step is not counted
            self._close()
            raise
        if last:
            self._close()
        elif optimizer.is_perturbed:  # msam: between micro-batches the weights are the clean ones, so a loop
            optimizer.restore()  # that stops mid-window (should_training_stop) returns and saves clean weights
            self._reapply = True
        return loss

    def discard(self, optimizer: Optimizer | None) -> None:
        """Forget a window left open (a run stopped between its micro-batches: the optimizer's
        ``abort_window()`` puts back clean weights and counts no step) and the figures not yet read."""
        if self._open and optimizer is not None:
            optimizer.abort_window()
        self._close()
        self.metrics = SAMMetrics()

    # -- global / per_device: one ascent from the window gradient, then replay the window -------------
    def _ascend_and_replay(self, model: nn.Module, optimizer: Optimizer, example_losses: ExampleLosses | None) -> None:
        skipped_before = getattr(optimizer, "skipped_steps", 0)
        perturbed = None
        if hasattr(optimizer, "gradient_units"):  # Friendly-SAM compares g with an average of past windows' g
            optimizer.gradient_units = self._grad_scale() * self._window_fraction()
        with preserve_running_stats(model):  # a pass that raises reaches micro_step's abort_window()
            with optimizer.selection_provided() if self._select else contextlib.nullcontext():
                ok = optimizer.perturb()
            self._non_finite = optimizer.next_step_skipped
            # ESAM's tensor SWP asks for pass 2 although its drawn tensors had no gradient to ascend along
            ascended = ok and optimizer.is_perturbed
            units = self._grad_scale() * self._window_fraction() if ascended else 1.0
            # With a rank-local ascent every rank must still join the replay's all-reduce (and, with data
            # selection, make the same single DDP forward: a skipped rank selects at w).
            must_join = self.scope != "global" and self.accelerator.num_processes > 1
            if self._select and (ok or must_join):
                perturbed = self._selective_replay(model, optimizer, example_losses)
            elif ok or must_join:
                model.zero_grad(set_to_none=True)
                for index, (batch, replay) in enumerate(zip(self._batches, self._replays, strict=True)):
                    inner = index < len(self._batches) - 1
                    with self._no_sync(model) if inner else contextlib.nullcontext():
                        loss = replay(batch)
                    perturbed = loss if perturbed is None else perturbed + loss
            optimizer.restore()
        self.metrics.add_skipped(getattr(optimizer, "skipped_steps", 0) - skipped_before)
        if ascended:
            self._record_losses(clean=self._clean, perturbed=perturbed)
            self._record_stats(optimizer.stats, units)
        self._take_update_norm(optimizer)
        self._non_finite = self._non_finite or self._update_non_finite(optimizer)
        self._skip_step_if_non_finite(optimizer, agree=self.scope == "per_device")

    def _plan_first_pass(self, model: nn.Module, optimizer: Optimizer) -> None:
        """Which tensors pass 1 computes gradients for (``first_pass_tensors``; ``None``: all), and whether the
        window then averages them over the processes itself. Pruning needs a plain or DDP-wrapped model (other
        wrappers keep every gradient) and the ``global``/``per_device`` scopes; under DDP with ``global``
        scope, pass 1 runs under ``no_sync`` and the chosen gradients are averaged by one all-reduce per
        dtype, since DDP's own buckets expect every gradient. A model with activation checkpointing or
        ``torch.compile`` keeps every gradient (:func:`_may_prune`), and so does DDP with ``static_graph``, which
        cannot run pass 1 under ``no_sync`` (:func:`~arrcoc_sam.integrations._settings.check_static_graph`)."""
        needed = optimizer.first_pass_tensors() if self._ascend and self.scope != "microbatch" else None
        processes = int(getattr(self.accelerator, "num_processes", 1))
        wrapped = isinstance(model, nn.parallel.DistributedDataParallel)
        if needed is not None and (  # (only then: _may_prune walks every module)
            (processes > 1 and not wrapped)
            or self._may_prune_first_pass is False
            or not _may_prune(model)
            or uses_static_graph(model)
        ):
            needed = None
        if needed is not None and self._may_prune_first_pass is None:
            self._probe, needed = _CheckpointProbe(), None
        self._first_pass_tensors = needed
        self._average_by_hand = needed is not None and processes > 1 and self.scope == "global"

    def _on_any_rank(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any process (one all-reduce of a flag and a host sync when there are several)."""
        if int(getattr(self.accelerator, "num_processes", 1)) <= 1:
            return flag
        tensor = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())

    def _decide_pruning(self, unsafe: bool, device: torch.device) -> None:
        """After the probe window: prune pass 1 from now on unless the probe found it unsafe on any rank (one
        all-reduce of a flag across processes, once per run)."""
        unsafe = self._on_any_rank(unsafe, device)
        self._may_prune_first_pass = not unsafe
        if unsafe:
            logger.info("the model uses reentrant activation checkpointing (or its outputs carry no graph to search "
                        "for it): pass 1 keeps every gradient")

    # -- data selection (ESAM's SDS) over the window ----------------------------------------------------
    def _can_select(self, optimizer: Optimizer, example_losses: ExampleLosses | None) -> bool:
        return (
            example_losses is not None
            and bool(getattr(optimizer, "selects_examples", False))
            and self.scope != "microbatch"
            and not self._selection_unavailable
        )

    def _pass_recording_examples(
        self, model: nn.Module, batch: Any, run_pass: RunPass, example_losses: ExampleLosses
    ) -> Tensor:
        """``run_pass(batch)``, keeping the clean per-example losses of its forward (no_grad, no extra pass) and
        the random generators' states it started from."""
        random_state = RandomState.capture(_params_device(model))
        with _ExampleCapture(_unwrapped(model), example_losses.per_example, batch, keep_graph=False) as capture:
            loss = run_pass(batch)
        try:
            losses = capture.losses()
        except PerExampleLossUnavailable:
            self._select = False
            self._selection_unavailable = True
            return loss
        self._clean_examples.append(losses)
        self._clean_weights.append(_example_weights(example_losses, batch, losses, loss))
        self._random_states.append(random_state)
        return loss

    def _selective_replay(self, model: nn.Module, optimizer: Any, example_losses: ExampleLosses) -> Tensor:
        """At w + ε: the perturbed losses of the window, the selection, and backward on the chosen examples.

        Returns the window's perturbed loss (sum of ``forward``'s losses) for the metrics.
        """
        inner = _unwrapped(model)
        perturbed, perturbed_examples = None, []
        with torch.no_grad():
            # each forward replays the random draws of its pass 1 (dropout masks): the rise ℓ(w + ε) − ℓ(w) then
            # compares the same sub-network, not two dropout samples (whose noise swamps it at p = 0.1)
            for batch, random_state, forward in zip(self._batches, self._random_states, self._forwards, strict=True):
                with random_state.replayed(), _ExampleCapture(
                    inner, example_losses.per_example, batch, keep_graph=False
                ) as capture:
                    loss = forward(inner, batch)
                perturbed_examples.append(capture.losses())
                perturbed = loss if perturbed is None else perturbed + loss
        at_least = fewest_examples_per_batch(inner)  # BatchNorm cannot normalise a lone example
        chosen = select_at_least(optimizer, torch.cat(self._clean_examples), torch.cat(perturbed_examples), at_least)
        choices, offset = [], 0
        for batch, clean in zip(self._batches, self._clean_examples, strict=True):
            size = clean.numel()
            local = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
            if local.numel() > 0:
                choices.append((batch, local, size, offset))
            offset += size
        picks = _chosen_sub_batches(choices, max(clean.numel() for clean in self._clean_examples), at_least)
        # In the units of the window's pass 1: each micro-batch's weights are scaled so that its Σ wᵢ ℓᵢ is the loss
        # its pass back-propagated, so Σ of all weights is the window's loss in units of the weighted mean clean
        # per-example loss (the micro-batches under Accelerate, whose backward divides by k again; about 1 for a
        # Trainer loss over num_items_in_batch). The chosen examples' weighted mean gets that factor: γ < 1 keeps
        # the scale of γ = 1 whatever the losses, and choosing every example trains on the stock loss itself.
        clean_examples = torch.cat(self._clean_examples)
        dtype = torch.promote_types(torch.promote_types(self._clean.dtype, clean_examples.dtype), torch.float32)
        weights = torch.cat(self._clean_weights).to(device=clean_examples.device, dtype=dtype)
        units = weights.sum()
        fallback = float(getattr(self.accelerator, "gradient_accumulation_steps", 1))
        chosen_weight = weights[chosen.to(weights.device)].sum().clamp_min(torch.finfo(dtype).tiny)
        factor = torch.where(torch.isfinite(units) & (units != 0), units, fallback).detach() / chosen_weight
        model.zero_grad(set_to_none=True)
        for index, (subset, size, rows) in enumerate(picks):
            module = model if index == len(picks) - 1 else inner  # only the last backward goes through DDP
            with torch.enable_grad():
                with _ExampleCapture(inner, example_losses.per_example, subset, keep_graph=True) as capture:
                    example_losses.forward(module, subset)
                losses = capture.losses()
                if losses.numel() != size:
                    raise ValueError(f"per_example_loss_fn returned {losses.numel()} losses for {size} examples")
                subset_weights = weights[rows.to(weights.device)].to(device=losses.device, dtype=losses.dtype)
                self.accelerator.backward((subset_weights * losses).sum() * factor.to(losses.device))
        return perturbed

    # -- microbatch (mSAM): an ascent per micro-batch from its own gradient ---------------------------
    def _microbatch_step(
        self, model: nn.Module, optimizer: Optimizer, batch: Any, run_pass: RunPass, last: bool
    ) -> Tensor:
        params = _params_of(optimizer)
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        with self._no_sync(model):
            loss = run_pass(batch)
        if last:
            optimizer.after_first_pass()
        skipped_before = getattr(optimizer, "skipped_steps", 0)
        perturbed = None
        with preserve_running_stats(model):  # a pass that raises reaches micro_step's abort_window()
            ok = optimizer.perturb()
            self._non_finite = self._non_finite or optimizer.next_step_skipped
            ascended = ok and optimizer.is_perturbed
            scale = self._grad_scale() if ascended else 1.0
            if ok or (last and self.accelerator.num_processes > 1):
                for p, grad in zip(params, accumulated, strict=True):
                    p.grad = grad  # pass 2 accumulates onto the window's sum (and syncs it when last)
                perturbed = run_pass(batch)
            else:
                _add_grads_(params, accumulated)
            optimizer.restore()
        self._take_update_norm(optimizer)  # every micro-batch's: a later one may skip its ascent (zero norm)
        self.metrics.add_skipped(getattr(optimizer, "skipped_steps", 0) - skipped_before)
        if ascended:
            self._pending_stats.append((dict(optimizer.stats), scale))
        # Window sums, comparable with the logged loss; a micro-batch without ascent contributes its clean loss.
        contribution = perturbed if ok else loss
        self._clean = loss if self._clean is None else self._clean + loss
        self._perturbed_sum = contribution if self._perturbed_sum is None else self._perturbed_sum + contribution
        self._any_ascent = self._any_ascent or ascended
        return loss

    # -- helpers ---------------------------------------------------------------------------------------
    def _no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        if self._hold_reduction is not None:
            return self._hold_reduction(model)
        return self.accelerator.no_sync(model)

    def _grad_scale(self) -> float:
        """The GradScaler's current scale (1.0 without one): pass-1/2 gradients carry it."""
        return float(self.accelerator.scaler.get_scale()) if self._scaled() else 1.0

    def _window_fraction(self) -> float:
        """The window's gradient per unit of its mean gradient, GradScaler aside: m/k for a plain Accelerate loop
        whose window closed after m < k micro-batches (its backward divides every loss by k), else 1 (the
        Trainer's losses are normalised over the window; its accelerator accumulates over 1)."""
        steps = int(getattr(self.accelerator, "gradient_accumulation_steps", 1))
        return min(steps, max(self._micro_batches, 1)) / steps

    def _record_losses(self, *, clean: Tensor, perturbed: Tensor) -> None:
        """Window sums of the pass losses, in the units of one micro-batch's loss as the loop sees it: the
        Trainer's per-micro-batch losses are already divided by the accumulation steps (its accelerator
        accumulates over 1); a plain Accelerate loop's are not, and are averaged over the window's micro-batches
        (fewer than the accumulation steps in a window the end of the data closed early)."""
        steps = min(int(getattr(self.accelerator, "gradient_accumulation_steps", 1)), max(self._micro_batches, 1))
        self.metrics.add("loss_perturbed", perturbed / steps)
        self.metrics.add("sharpness", (perturbed - clean) / steps)

    def _end_microbatch_window(self, optimizer: Optimizer) -> None:
        """The window's figures, unless one of its micro-batches met non-finite gradients: its gradient sum is then
        non-finite, every later figure was measured on it, and the step is skipped (each micro-batch's ascent
        starts afresh, so the skip is asked for again here)."""
        self._non_finite = self._non_finite or self._update_non_finite(optimizer)
        if self._skip_step_if_non_finite(optimizer, agree=True):
            return
        if self._any_ascent:
            self._record_losses(clean=self._clean, perturbed=self._perturbed_sum)
        for stats, scale in self._pending_stats:
            self._record_stats(stats, scale)

    def _skip_step_if_non_finite(self, optimizer: Optimizer, agree: bool) -> bool:
        """Whether this window met non-finite gradients; if so, the optimizer skips its step and, where the loop
        steps the base optimizer itself, the gradients are dropped. ``agree``: the ranks ascended from their own
        gradients (per_device, microbatch), so all of them skip if any must (one all-reduce of a flag)."""
        if agree:
            self._non_finite = self._on_any_rank(self._non_finite, _params_of(optimizer)[0].device)
        if self._non_finite:
            optimizer.skip_next_step()
            self._drop_gradients_unless_scaled(optimizer)
        return self._non_finite

    def _take_update_norm(self, optimizer: Optimizer) -> None:
        """Keep the gradient norm the last restore recorded (the largest over the window's restores; NaN wins), taking
        the check over from the optimizer's ``step()``, so that it is made once per window and agreed across ranks."""
        norm = optimizer.take_update_norm()
        if norm is not None:
            self._update_norm = norm if self._update_norm is None else torch.maximum(self._update_norm, norm)

    def _update_non_finite(self, optimizer: Optimizer) -> bool:
        """Whether the window's sharpness-aware gradient holds inf/NaN (the optimizer's ``update_non_finite`` on
        the window's largest recorded gradient norm: one host sync). Under a GradScaler, which checks it itself,
        not asked."""
        norm, self._update_norm = self._update_norm, None
        if norm is None or self._scaled():
            return False
        return optimizer.update_non_finite(norm)

    def _scaled(self) -> bool:
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler is not None and scaler.is_enabled()

    def _drop_gradients_unless_scaled(self, optimizer: Optimizer) -> None:
        """A window that met non-finite gradients takes no step. A GradScaler finds them itself and skips its
        step (and must see them to lower its scale), and SAMTrainer's step goes through the optimizer, which skips
        it; without either, a loop that steps the base optimizer directly (AcceleratedSAM) would apply them, so the
        gradients are dropped (``None``: every torch optimizer then leaves the weights and its state as they are)."""
        if not self.loop_steps_base or self._scaled():
            return
        logger.warning("non-finite gradients: this step is skipped (its gradients are dropped)")
        for p in _params_of(optimizer):
            p.grad = None

    def _record_stats(self, stats: dict[str, Tensor], units: float) -> None:
        """An ascent's figures (the optimizer's ``stats``); the gradient norms divided by ``units``, what ``.grad``
        holds per unit of the gradient they are reported in (the GradScaler's scale; in the global and per_device
        scopes times :meth:`_window_fraction`, so a short last window reports its mean gradient, as the Trainer
        does)."""
        for key in _STAT_KEYS:
            if key in stats:
                value = stats[key]
                self.metrics.add(key, value / units if key in _SCALED_STATS else value)

    def _close(self) -> None:
        self._open = False
        self._batches = []
        self._replays = []
        self._forwards = []
        self._clean = self._perturbed_sum = None
        self._any_ascent = False
        self._pending_stats = []
        self._update_norm = None
        self._non_finite = False
        self._select = False
        self._clean_examples = []
        self._clean_weights = []
        self._random_states = []
        self._reapply = False
        self._first_pass_tensors = None
        self._average_by_hand = False
        self._probe = None
        self._micro_batches = 0


class _CheckpointProbe:
    """Whether pruning pass 1 is unsafe for a watched module: one of its forwards returned a tensor whose graph
    holds reentrant activation checkpointing (:func:`~arrcoc_sam.sam.variants.uses_reentrant_checkpointing`), or
    none returned a tensor with a graph to search. Watches the window that would first have pruned pass 1 and
    ran it in full instead."""

    def __init__(self) -> None:
        self.found = False
        self.saw_graph = False

    @property
    def unsafe(self) -> bool:
        return self.found or not self.saw_graph

    @contextlib.contextmanager
    def watching(self, module: nn.Module):
        def inspect_output(_module: nn.Module, _args: Any, output: Any) -> None:
            tensors = [t for t in _tensors_in(output) if t.grad_fn is not None]
            self.saw_graph = self.saw_graph or bool(tensors)
            if not self.found:
                self.found = uses_reentrant_checkpointing(tensors)

        handle = module.register_forward_hook(inspect_output)
        try:
            yield
        finally:
            handle.remove()


def _tensors_in(value: Any) -> list[Tensor]:
    """The tensors in a model output: a tensor, or mappings/sequences (ModelOutput included) of them, nested."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    return []


class _ExampleCapture:
    """Within the block, per-example losses of every forward of ``module`` (computed in a forward hook)."""

    def __init__(self, module: nn.Module, per_example: Callable[[Any, Any], Tensor], batch: Any, *, keep_graph: bool):
        self.module, self.per_example, self.batch, self.keep_graph = module, per_example, batch, keep_graph
        self._results: list[Tensor | Exception] = []
        self._handle: Any = None

    def __enter__(self) -> _ExampleCapture:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: Any, outputs: Any) -> None:
        try:
            with contextlib.nullcontext() if self.keep_graph else torch.no_grad():
                self._results.append(self.per_example(outputs, self.batch))
        except PerExampleLossUnavailable as error:
            self._results.append(error)

    def losses(self) -> Tensor:
        """The ``[B]`` losses of the block's single forward (detached unless ``keep_graph``)."""
        if len(self._results) != 1:
            raise ValueError(
                f"data selection needs exactly one forward of the model per pass to read per-example losses "
                f"from, this pass made {len(self._results)}"
            )
        result = self._results[0]
        if isinstance(result, Exception):
            raise result
        if result.dim() != 1:
            raise ValueError(f"per-example losses must be a vector [B], got shape {tuple(result.shape)}")
        return result if self.keep_graph else result.detach()


def _may_prune(model: nn.Module) -> bool:
    """Whether pass 1 may run with some weights' ``requires_grad`` off. Not under reentrant activation
    checkpointing, which tracks a block's inputs and not its weights (a block whose inputs need no gradient
    would leave its chosen weights without one; transformers marks such submodules ``gradient_checkpointing``),
    and not under ``torch.compile``, which guards on ``requires_grad`` and would recompile for every new draw."""
    if hasattr(model, "_orig_mod"):  # torch.compile(model)
        return False
    for module in _unwrapped(model).modules():
        if getattr(module, "gradient_checkpointing", False) is True or hasattr(module, "_orig_mod"):
            return False
        if getattr(module, "_compiled_call_impl", None) is not None:  # module.compile()
            return False
    return True


def _check_no_earlier_gradients(optimizer: Optimizer) -> None:
    """Raise if a window that replays its micro-batches opens with non-zero gradients: they came from a backward
    outside the window (accumulation by hand, without ``accelerator.accumulate``), would enter the ascent and be
    dropped by the replay. Gradients that are all zero (``zero_grad(set_to_none=False)``) pass; telling them
    apart costs one foreach max-norm per (device, dtype) and one host sync, paid only by loops that leave
    gradients allocated."""
    grads = [p.grad for p in _params_of(optimizer) if p.grad is not None]
    local = [grad.to_local() if hasattr(grad, "to_local") else grad for grad in grads]
    if largest_magnitude(local) != 0.0:  # nan compares unequal too
        raise RuntimeError(
            "a sharpness-aware accumulation window opened with gradients already in .grad (a backward outside "
            "it, e.g. accumulating by hand over several calls): the ascent would mix them in and the replay at "
            "w + ε would drop them. Accumulate with Accelerator(gradient_accumulation_steps=k) and "
            "`with accelerator.accumulate(model):`, and call optimizer.zero_grad() after each optimizer.step()"
        )


def _params_of(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _params_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def _pruned_first_pass(accelerator: Any, params: list[Tensor], needed: list[Tensor] | None) -> Iterator[None]:
    """Pass 1 with gradients for ``needed`` only (``None``: all, and nothing changes). A micro-batch whose forward
    reaches none of them (a branch it does not take) then returns a loss without graph: the accelerator's
    backward skips it, and those tensors get no gradient from it, as a full pass would give them."""
    if not needed:
        yield
        return
    own = accelerator.__dict__.get("backward")  # an attribute set on the instance, put back afterwards
    backward = accelerator.backward

    def backward_where_graph(loss: Any, **kwargs: Any) -> Any:
        if isinstance(loss, Tensor) and not loss.requires_grad:
            return None
        return backward(loss, **kwargs)

    accelerator.backward = backward_where_graph
    try:
        with gradients_only_for(params, needed):
            yield
    finally:
        if own is None:
            del accelerator.backward
        else:
            accelerator.backward = own


@torch.no_grad()
def _average_across_processes(params: list[Tensor]) -> None:
    """``p.grad`` ← its mean over the processes (DDP's reduction), one all-reduce per (device, dtype); a rank
    whose pass left a tensor without gradient contributes zeros."""
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    world = torch.distributed.get_world_size()
    for grads in buckets.values():
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))


def shallow_copy(batch: Any) -> Any:
    """A new container for a mapping or list batch holding the same tensors (a ``UserDict`` such as a
    ``BatchEncoding`` keeps its type; other mappings become a ``dict``): a loss function or the stock
    ``training_step`` may pop or add keys, and the replay at w + ε reuses the batch. Other batches (tensors,
    tuples) as they are."""
    if isinstance(batch, UserDict):  # its copy copies the data dict too
        return copy.copy(batch)
    if isinstance(batch, Mapping):
        return dict(batch)
    return list(batch) if isinstance(batch, list) else batch


def uses_static_graph(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in DDP with ``static_graph=True``."""
    return isinstance(model, nn.parallel.DistributedDataParallel) and bool(getattr(model, "static_graph", False))


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (calling it directly neither syncs gradients nor buffers)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _take(batch: Any, index: Tensor, size: int) -> Any:
    """``batch`` restricted to the examples ``index`` (every tensor whose first dimension is ``size``)."""
    if isinstance(batch, Tensor):
        return batch[index.to(batch.device)] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {key: _take(value, index, size) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_take(value, index, size) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take(value, index, size) for value in batch)
    return batch


def _chosen_sub_batches(
    choices: list[tuple[Any, Tensor, int, int]], limit: int, at_least: int = 1
) -> list[tuple[Any, int, Tensor]]:
    """``(sub-batch, examples, window rows)`` triples holding the chosen examples of the window (``window rows``:
    their positions in the window, in the sub-batch's order): ``choices`` gives each micro-batch with chosen
    examples as ``(micro-batch, chosen rows, its size, its first row in the window)``. Regrouped into as few
    sub-batches of at most ``limit`` examples (the largest micro-batch) as hold them all, of sizes that differ by
    at most one: fewer forwards. None holds fewer than ``at_least`` examples where the window chose that many
    (2 where a BatchNorm layer in training mode could not normalise a lone example; a sub-batch may then
    exceed ``limit``: 3 chosen from micro-batches of 2 run together). Where the micro-batches cannot be
    concatenated (tensors padded to other lengths, per-batch values that differ), one sub-batch per
    micro-batch."""
    per_micro_batch = [(_take(batch, rows, size), rows.numel(), rows + offset) for batch, rows, size, offset in choices]
    if len(choices) < 2:
        return per_micro_batch
    merged = _concatenated([subset for subset, _, _ in per_micro_batch], [choice[0] for choice in choices])
    if merged is _UNMERGEABLE:
        return per_micro_batch
    total = sum(size for _, size, _ in per_micro_batch)
    count = max(1, min(-(-total // limit), total // at_least))
    if count == 1:  # all of them in one sub-batch: the concatenation just made
        return [(merged, total, torch.cat([rows for _, _, rows in per_micro_batch]))]
    # (micro-batch, row) of every chosen example in window order, cut into balanced runs
    flat = [(position, row) for position, (_, rows, _, _) in enumerate(choices) for row in rows.tolist()]
    grouped, start = [], 0
    for index in range(count):
        stop = start + len(flat) // count + (index < len(flat) % count)
        run = flat[start:stop]
        positions = sorted({position for position, _ in run})
        rows = {p: [row for q, row in run if q == p] for p in positions}
        parts = [_take(choices[p][0], torch.tensor(rows[p]), choices[p][2]) for p in positions]
        window_rows = torch.tensor([choices[p][3] + row for p in positions for row in rows[p]])
        merged = parts[0] if len(parts) == 1 else _concatenated(parts, [choices[p][0] for p in positions])
        grouped.append((merged, stop - start, window_rows))
        start = stop
    return grouped


def _example_weights(example_losses: ExampleLosses, batch: Any, losses: Tensor, loss: Tensor) -> Tensor:
    """The weights of a micro-batch's examples in pass 2's loss: :attr:`ExampleLosses.weights` (ones without
    them: the examples of a micro-batch alike), scaled so that Σ wᵢ ℓᵢ equals ``loss``, the loss the micro-batch's
    pass returned (left as they are where that sum is 0 or the scale not finite). So micro-batches weigh as the
    loop's own losses do (a short one's mean counts like a full one's). float32 (float64 for float64 losses)."""
    dtype = torch.promote_types(losses.dtype, torch.float32)
    weights = None if example_losses.weights is None else example_losses.weights(batch)
    if weights is None:
        weights = torch.ones_like(losses, dtype=dtype)
    weights = torch.as_tensor(weights).to(device=losses.device, dtype=dtype)
    if weights.shape != losses.shape:
        raise ValueError(f"example weights must be a vector [{losses.numel()}], got shape {tuple(weights.shape)}")
    scale = loss.detach().to(device=losses.device, dtype=dtype) / (weights * losses.detach().to(dtype)).sum()
    return weights * torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


_UNMERGEABLE = object()


def _concatenated(parts: list[Any], originals: list[Any]) -> Any:
    """``parts`` (sub-batches :func:`_take` cut from the micro-batches ``originals``) as one batch: the tensors it
    indexed (per-example ones) concatenated along the first dimension; the others (per-batch values it kept as
    they were) kept where every micro-batch holds the same one; ``_UNMERGEABLE`` where the parts disagree (other
    shapes, keys or per-batch values)."""
    first = parts[0]
    if isinstance(first, Tensor):
        indexed = [p is not o for p, o in zip(parts, originals, strict=True)]
        if all(indexed):
            if all(isinstance(p, Tensor) and p.shape[1:] == first.shape[1:] and p.dtype == first.dtype
                   and p.device == first.device for p in parts):
                return torch.cat(parts)
            return _UNMERGEABLE
        if not any(indexed) and all(isinstance(p, Tensor) and p.shape == first.shape and p.dtype == first.dtype
                                    and (p is first or torch.equal(p, first)) for p in parts):
            return first
        return _UNMERGEABLE
    if isinstance(first, Mapping):
        if not all(isinstance(p, Mapping) and p.keys() == first.keys() for p in parts):
            return _UNMERGEABLE
        merged = {key: _concatenated([p[key] for p in parts], [o[key] for o in originals]) for key in first}
        return _UNMERGEABLE if any(v is _UNMERGEABLE for v in merged.values()) else merged
    if isinstance(first, (list, tuple)):
        if not all(type(p) is type(first) and len(p) == len(first) for p in parts):
            return _UNMERGEABLE
        items = [_concatenated([p[i] for p in parts], [o[i] for o in originals]) for i in range(len(first))]
        if any(item is _UNMERGEABLE for item in items):
            return _UNMERGEABLE
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    try:
        same = all(p is first or bool(p == first) for p in parts)
    except Exception:  # noqa: BLE001 - values that cannot be compared cannot be shared either
        same = False
    return first if same else _UNMERGEABLE


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
