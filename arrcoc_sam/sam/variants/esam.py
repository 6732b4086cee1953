"""ESAM (Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural Networks", ICLR 2022)."""

from __future__ import annotations

import contextlib
import logging
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.optim import Optimizer

from arrcoc_sam.sam import perturbation
from arrcoc_sam.sam.norm_stats import fewest_examples_per_batch
from arrcoc_sam.sam.random_state import RandomState
from arrcoc_sam.sam.variants._base import (
    VariantSAM,
    check_fraction,
    gradients_only_for,
    uses_reentrant_checkpointing,
)

__all__ = ["ESAM", "PerExampleLossUnavailable", "label_counts", "per_example_loss", "select_at_least"]

logger = logging.getLogger(__name__)

# Mask seeds for step t are seed * _SEED_STRIDE + t: every rank draws the same masks without communicating.
_SEED_STRIDE = 1_000_003

PerExampleClosure = Callable[..., Tensor]
IGNORE_INDEX = -100
SWP_UNITS = ("coordinate", "tensor")


class PerExampleLossUnavailable(ValueError):
    """The default :func:`per_example_loss` cannot serve these outputs/batch (no ``logits`` or ``labels``)."""


def per_example_loss(outputs: Any, batch: Any, *, shift_labels: bool = False, label_smoothing: float = 0.0) -> Tensor:
    """Per-example cross-entropy ``[B]`` (float32 or wider) from HF-style ``outputs.logits`` and ``batch["labels"]``.

    - ``logits [B, C]``, integer ``labels [B]`` (sequence classification): ``CE(logits_i, y_i)``.
    - ``logits [B, T, C]``, integer ``labels [B, T]`` (token classification, masked LM): the mean CE over
      example i's tokens whose label is not -100 (0 for an example without any). ``shift_labels=True``
      (causal LM: ``functools.partial(per_example_loss, shift_labels=True)``) scores token t+1 from position t.
    - ``label_smoothing`` ε in [0, 1): (1 − ε)·CE + ε·mean over classes of −log p, per token, as
      ``F.cross_entropy`` and the HF Trainer's ``label_smoothing_factor`` define it.

    The Trainer's own token loss (``num_items_in_batch``) weights every *token* of the batch alike, this
    one every *example* alike, as ESAM's data selection and its pass-2 mean over the chosen examples do.

    Raises:
        PerExampleLossUnavailable: ``outputs`` has no ``logits``, ``batch`` no integer ``labels`` of a
            matching shape.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise PerExampleLossUnavailable(
            "per_example_loss needs outputs with `logits` and a batch dict with `labels`; pass per_example_loss_fn"
        )
    labels = labels.to(logits.device)
    if shift_labels and labels.dim() == 2 and logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif shift_labels:
        raise PerExampleLossUnavailable(
            f"shift_labels needs labels [B, T] and logits [B, T, C], got {tuple(labels.shape)} and {tuple(logits.shape)}"
        )
    if labels.is_floating_point() or labels.shape != logits.shape[:-1] or labels.dim() not in (1, 2):
        raise PerExampleLossUnavailable(
            f"per_example_loss handles integer labels [B] with logits [B, C] and labels [B, T] with logits "
            f"[B, T, C]; got labels {tuple(labels.shape)} ({labels.dtype}) and logits {tuple(logits.shape)}: "
            "pass per_example_loss_fn"
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    tokens = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing
    )
    counts = labels.ne(IGNORE_INDEX).sum(dim=1).clamp_min(1)
    return tokens.sum(dim=1) / counts


def label_counts(batch: Any, *, shift_labels: bool = False) -> Tensor | None:
    """The labelled items of each example in ``batch``, ``[B]`` float32: 1 for integer labels ``[B]``, the
    non-``-100`` tokens for integer labels ``[B, T]`` (from the second token on with ``shift_labels``, as
    :func:`per_example_loss` scores them). None where the batch has no such ``labels``."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dim() not in (1, 2):
        return None
    if labels.dim() == 1:
        return torch.ones(labels.shape[0], device=labels.device)
    return (labels[:, 1:] if shift_labels else labels).ne(IGNORE_INDEX).sum(dim=1).float()


def select_at_least(optimizer: Any, loss_clean: Tensor, loss_perturbed: Tensor, at_least: int) -> Tensor:
    """``optimizer.select_examples(loss_clean, loss_perturbed)``, choosing at least ``at_least`` examples; an
    optimizer's own two-argument ``select_examples`` is called as it is where one example may stand alone."""
    if at_least > 1:
        return optimizer.select_examples(loss_clean, loss_perturbed, at_least=at_least)
    return optimizer.select_examples(loss_clean, loss_perturbed)


def _one_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_world_size() == 1


class ESAM(VariantSAM):
    """Stochastic weight perturbation (SWP) and sharpness-sensitive data selection (SDS).

    SWP, ``swp="coordinate"`` (the paper's equation) — perturb a random β-fraction of the weight
    coordinates, rescaled by 1/β so E[ε̂] = ε::

        ε̂ = (ρ/β) · m ⊙ g/‖g‖,   m_i ~ Bernoulli(β) i.i.d.    (‖g‖ over all perturbed tensors)

    The masks of optimizer step t are ``U < β`` for uniforms U drawn coordinate by coordinate in parameter
    order (on CPU exactly ``torch.rand(p.shape, generator=G, dtype=torch.float32)`` per tensor; on accelerators one draw per run
    of ≤ 4M coordinates), with one ``torch.Generator`` per device seeded ``seed * 1_000_003 + t``:
    identical on every rank, and reproducible after a resume. ``beta=1`` switches SWP off (ε̂ = ε).

    SWP, ``swp="tensor"`` (the default; what the authors' released code does) — perturb a random
    β-fraction of the parameter *tensors* S, and take the norm over them::

        ε̂ = (ρ/β) · g_S/‖g_S‖,   j ∈ S with probability β, independently per tensor

    over the tensors of the groups with ρ > 0 that require grad (a frozen tensor has no gradient to ascend
    along), in ``param_groups`` order, from one CPU draw ``torch.rand(n, generator=G, dtype=torch.float32)``
    seeded as above (at least one tensor: where the draw picks none, the
    one with the smallest uniform). Pass 1 then needs no gradient outside S, so SAMTrainer, AcceleratedSAM and
    :meth:`step` run it with ``requires_grad`` off there (:meth:`first_pass_tensors`): autograd skips those
    weight gradients, about (1 − β)/3 of pass 1 on a transformer. The update is the same with or without
    that pruning (a manual loop that computes every pass-1 gradient gets it too). Since the pass-1 gradient
    of the others is then missing, a zero ‖g_S‖ still runs pass 2, at w (:meth:`perturb` returns True
    without perturbing), so every tensor gets its gradient. Pruning is unsafe under reentrant activation
    checkpointing (it tracks a block's inputs, not its weights, so a block whose inputs need no gradient
    would leave its chosen weights without one) and slow under ``torch.compile`` (it guards on
    ``requires_grad`` and would recompile for each new draw). So the first step that could prune runs pass 1
    in full and its graph is searched for reentrant checkpointing, which keeps every gradient from then on;
    the integrations also read the modules' checkpointing flags and skip compiled models (a ``step(closure)``
    loop over a compiled model should use ``swp="coordinate"``), and :meth:`step` prunes in one process only
    (a DDP reducer waits for every gradient; the integrations average the chosen ones themselves).

    SDS — pass 2 on the ⌈γ|B|⌉ examples whose loss rises most under the perturbation::

        B⁺ = top-⌈γ|B|⌉ of ℓ_i(w + ε̂) − ℓ_i(w);   update with ∇ mean_{i∈B⁺} ℓ_i(w + ε̂)

    ℓ_i(w + ε̂) comes from a no-grad forward that replays the random draws of pass 1's forward (its dropout
    masks), so the rise compares one sub-network at two points; with fresh masks, as the authors' code draws
    them, dropout noise dominates it (at p = 0.1 the chosen half overlapped the same-mask choice by 0.59, chance
    being 0.5). The chosen examples' forward + backward then draws new masks, as pass 2 of SAM does.

    SDS needs per-example losses: :meth:`step` takes them from a per-example closure (below); SAMTrainer
    and the Accelerate helper from :func:`per_example_loss` (or their ``per_example_loss_fn``) on the model
    outputs, selecting over each rank's accumulation window (see ``arrcoc_sam.integrations._window``); a
    custom loop calls :meth:`select_examples` inside :meth:`selection_provided`. Where no per-example
    losses exist, pass 2 runs on the whole batch and a one-time warning says so (SWP still applies);
    ``gamma=1`` switches SDS off everywhere.

    Cost (forward ≈ 1/3 of a forward+backward): ``1 + 1/3 + γ`` passes per step with SDS, 2 without.
    Coordinate SWP does not change the cost of a dense backward; tensor SWP takes about (1 − β)/3 off pass 1.
    Memory: SAM's backup plus, for coordinate SWP, transient masks of at most ~4M coordinates (or the
    largest tensor) while perturbing.

    Args:
        beta: β in (0, 1], the fraction of coordinates (or tensors) perturbed.
        gamma: γ in (0, 1], the fraction of examples in pass 2.
        seed: seed of the SWP masks.
        swp: ``"tensor"`` or ``"coordinate"``, the unit SWP draws (above).
        rho, adaptive, eta, base_kwargs: as for :class:`~arrcoc_sam.sam.optimizer.SAM`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        beta: float = 0.5,
        gamma: float = 0.5,
        seed: int = 0,
        swp: str = "tensor",
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        beta = check_fraction(beta, "beta")
        gamma = check_fraction(gamma, "gamma")
        try:
            seed = operator.index(seed)
        except TypeError:
            raise ValueError(f"seed must be an integer, got {seed!r}") from None
        if swp not in SWP_UNITS:
            raise ValueError(f"swp must be one of {SWP_UNITS}, got {swp!r}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        self.beta = beta
        self.gamma = gamma
        self.seed = int(seed)
        self.swp = swp
        self._selection_provided = False
        self._warned_no_sds = False
        self._prune_in_closure: bool | None = None  # step(closure) prunes pass 1; None until probed

    @property
    def passes_per_step(self) -> float:
        return 1.0 + 1.0 / 3.0 + self.gamma if self.gamma < 1 else 2.0

    @property
    def selects_examples(self) -> bool:
        """Whether SDS is on (``gamma < 1``): pass 2 should run on :meth:`select_examples`' subset."""
        return self.gamma < 1

    @contextlib.contextmanager
    def selection_provided(self) -> Iterator[None]:
        """Within the block the caller runs SDS itself, so :meth:`perturb` does not warn about its absence."""
        saved = self._selection_provided
        self._selection_provided = True
        try:
            yield
        finally:
            self._selection_provided = saved

    def mask_seed(self) -> int:
        """The seed of this step's SWP masks (see the class docstring)."""
        return self.seed * _SEED_STRIDE + self.optimizer_steps

    def swp_tensors(self) -> list[Tensor]:
        """Tensor SWP: this step's perturbed tensors S (class docstring), in ``param_groups`` order."""
        candidates = [p for group in self.param_groups if group["rho"] != 0 for p in group["params"] if p.requires_grad]
        if self.beta == 1 or not candidates:
            return candidates
        generator = torch.Generator().manual_seed(self.mask_seed())
        draw = torch.rand(len(candidates), generator=generator, dtype=torch.float32)
        chosen = draw < self.beta
        if not bool(chosen.any()):
            chosen[int(draw.argmin())] = True
        return [p for p, keep in zip(candidates, chosen.tolist(), strict=True) if keep]

    def first_pass_tensors(self) -> list[Tensor] | None:
        """Tensor SWP: :meth:`swp_tensors`, the only pass-1 gradients the ascent reads; otherwise, and where no
        group has ρ > 0 (pass 1's gradient is then the update), ``None`` (all)."""
        if self.swp != "tensor" or self.beta == 1:
            return None
        return self.swp_tensors() or None

    def _ascent_directions(self) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        params, grads, groups = super()._ascent_directions()
        needed = self.first_pass_tensors()
        if needed is None:
            return params, grads, groups
        chosen = {id(p) for p in needed}
        kept = [i for i, p in enumerate(params) if id(p) in chosen]
        return [params[i] for i in kept], [grads[i] for i in kept], [groups[i] for i in kept]

    def select_examples(self, loss_clean: Tensor, loss_perturbed: Tensor, at_least: int = 1) -> Tensor:
        """SDS: indices (``[max(⌈γB⌉, at_least)]``, at most B; int64) of the examples with the largest
        ``loss_perturbed − loss_clean``. ⌈γB⌉ is exact for γ as written (the shortest decimal of the float):
        γ = 0.14, B = 50 keeps 7, where the float product 7.000000000000001 would round up to 8.

        Args:
            loss_clean, loss_perturbed: per-example losses ``[B]`` at w and at w + ε̂.
            at_least: the fewest examples to choose (2 for a model with BatchNorm in training mode, which
                cannot normalise a lone example; the integrations pass it).
        """
        if loss_clean.shape != loss_perturbed.shape or loss_clean.dim() != 1:
            raise ValueError(
                f"select_examples needs two per-example loss vectors [B] of one shape, got "
                f"{tuple(loss_clean.shape)} and {tuple(loss_perturbed.shape)}"
            )
        keep = min(max(1, at_least, math.ceil(Fraction(str(self.gamma)) * loss_clean.numel())), loss_clean.numel())
        rise = loss_perturbed.detach() - loss_clean.detach()
        return torch.topk(-rise if self._maximizes() else rise, keep, sorted=False).indices

    def _maximizes(self) -> bool:
        """Whether the perturbed groups' base optimizer maximises (the objective is −loss, so the sharpest
        examples are those whose loss falls most at w + ε̂). Groups that disagree are refused."""
        flags = {index: bool(group.get("maximize")) for index, group in enumerate(self.param_groups) if group["rho"] != 0}
        if len(set(flags.values())) > 1:
            raise ValueError(f"esam's data selection ranks examples by one objective, but the perturbed param groups "
                             f"disagree on maximize (group: maximize {flags})")
        return set(flags.values()) == {True}

    @torch.no_grad()
    def perturb(self) -> bool:
        """SAM's ascent with ρ/β; coordinate SWP then puts back the coordinates outside this step's masks,
        tensor SWP ascends on :meth:`swp_tensors` only. Tensor SWP returns True unless the norm is non-finite
        (pass 2 then runs at w after a zero norm, see the class docstring, and :meth:`restore` puts back the
        running statistics of :meth:`hold_running_stats`'s model as after an ascent)."""
        self._check_groups()
        if self.gamma < 1 and not self._selection_provided and not self._warned_no_sds:
            self._warned_no_sds = True
            logger.warning(
                "esam: sharpness-sensitive data selection needs per-example losses, which this loop does not "
                "provide; pass 2 runs on the whole batch (SWP still applies). SAMTrainer and AcceleratedSAM "
                "provide them for outputs with `logits` and batches with `labels` (or with per_example_loss_fn) "
                "in the global and per_device scopes; ESAM.step takes a per-example closure; gamma=1 silences this."
            )
        if self.beta == 1:
            return super().perturb()
        radii = [group["rho"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["rho"] = group["rho"] / self.beta
            ok = super().perturb()
        finally:
            for group, rho in zip(self.param_groups, radii, strict=True):
                group["rho"] = rho
        if self.swp == "tensor":  # pass 1 may have left the others without gradient: pass 2 must run
            if ok or self.first_pass_tensors() is None or self._skip_next_step:
                return ok
            self._snapshot_running_stats()  # pass 2 runs at w: restore() puts the statistics back all the same
            return True
        if ok:
            self._mask_perturbation()
        return ok

    def _mask_perturbation(self) -> None:
        """Put back the coordinates outside this step's masks: w_i ← lerp(w_i + ε_i, w_i, 1 − m_i), bitwise w_i.

        The uniforms are drawn for runs of consecutive perturbed tensors sharing device and dtype, at most
        ~4M coordinates per draw; on CPU this equals one float32 ``torch.rand(p.shape)`` per tensor in order.
        """
        generators: dict[torch.device, torch.Generator] = {}
        for chunk_params, chunk_backup in perturbation.chunks(self._perturbed, self._backup):
            device = chunk_params[0].device
            if device not in generators:
                generators[device] = torch.Generator(device=device).manual_seed(self.mask_seed())
            numels = [p.numel() for p in chunk_params]
            draw = torch.rand(sum(numels), generator=generators[device], device=device, dtype=torch.float32)
            keep_clean = draw.ge_(self.beta).to(chunk_params[0].dtype)  # 1 − m
            weights = [w.view(p.shape) for w, p in zip(keep_clean.split(numels), chunk_params, strict=True)]
            torch._foreach_lerp_(chunk_params, chunk_backup, weights)

    def step(self, closure: PerExampleClosure | None = None) -> Tensor | None:  # type: ignore[override]
        """Without a closure: the base step. With one: a full ESAM step; returns the clean mean loss.

        Per-example closure (enables SDS): ``closure(indices=None)`` runs the forward on the batch (or on
        ``batch[indices]``) and returns the un-reduced per-example losses ``[B]`` (``[len(indices)]``) with
        their graph, *without* calling backward; ESAM zeroes the gradients and back-propagates the means.
        A SAM-style closure (zero_grad + forward + backward, returns a 0-dim loss) also works, with
        ``gamma=1`` only.
        """
        if closure is None:
            return super().step()
        with self.selection_provided():
            return self._closure_step(closure)

    def _closure_step(self, closure: PerExampleClosure) -> Tensor:
        with self.closure_window():
            first = self.param_groups[0]["params"][0]
            random_state = RandomState.capture(first.device) if self.gamma < 1 else None
            losses, per_example = self._first_pass(closure, self._closure_first_pass_tensors())
            self._probe_pruning(losses)
            self.after_first_pass()
            with self.perturbed() as ok:
                if ok:
                    self._second_pass(closure, losses.detach(), per_example, random_state)
        self.step()
        return losses.detach().mean()

    def _first_pass(self, closure: PerExampleClosure, needed: list[Tensor] | None) -> tuple[Tensor, bool]:
        """Pass 1 at w, with gradients for ``needed`` only (None: all); (losses, whether per example)."""
        self.zero_grad()
        with gradients_only_for(self._all_params(), needed), torch.enable_grad():
            losses = closure()
            per_example = losses.dim() > 0
            if not per_example and self.gamma < 1:
                raise ValueError(
                    f"esam with gamma={self.gamma} selects examples, so its closure must return per-example "
                    "losses [B] without calling backward; this closure returned a 0-dim loss (set gamma=1 "
                    "to use it)"
                )
            if per_example:
                self.zero_grad()
                if losses.requires_grad or needed is None:  # a pruned pass may reach none of the chosen tensors
                    losses.mean().backward()
        return losses, per_example

    def _closure_first_pass_tensors(self) -> list[Tensor] | None:
        """:meth:`first_pass_tensors` where :meth:`step` may prune pass 1: in one process (a DDP model's reducer
        waits for every gradient, and this optimizer cannot see the model to average them itself; SAMTrainer and
        AcceleratedSAM can, and prune there), once the first such step ran in full and its graph showed no
        reentrant activation checkpointing (:meth:`_probe_pruning`)."""
        return self.first_pass_tensors() if self._prune_in_closure and _one_process() else None

    def _probe_pruning(self, losses: Tensor) -> None:
        """After the first step that could have pruned pass 1 (it ran in full): prune from now on unless the graph
        of the closure's loss holds reentrant activation checkpointing, which tracks a block's inputs and not its
        weights, so a pruned pass could leave chosen weights without gradient, or the loss has no graph to
        search (a SAM-style closure that returned it detached)."""
        if self._prune_in_closure is not None or self.first_pass_tensors() is None or not _one_process():
            return
        if losses.grad_fn is None:
            self._prune_in_closure = False
            logger.info("esam: the closure's loss has no graph to search for reentrant activation checkpointing "
                        "(return it undetached to let pass 1 skip unchosen gradients); pass 1 keeps every gradient")
            return
        self._prune_in_closure = not uses_reentrant_checkpointing([losses])
        if not self._prune_in_closure:
            logger.info("esam: the model uses reentrant activation checkpointing; pass 1 keeps every gradient")

    def _second_pass(self, closure: PerExampleClosure, clean: Tensor, per_example: bool,
                     random_state: RandomState | None) -> None:
        if not per_example:
            self.zero_grad()
            with torch.enable_grad():
                closure()
            return
        if self.gamma < 1:
            replay = random_state.replayed() if random_state is not None else contextlib.nullcontext()
            with torch.no_grad(), replay:  # pass 1's dropout masks: the rise, not their noise
                perturbed = closure()
            with torch.enable_grad():
                at_least = fewest_examples_per_batch(self._stats_model)
                losses = closure(select_at_least(self, clean, perturbed, at_least))
        else:
            with torch.enable_grad():
                losses = closure()
        self.zero_grad()
        losses.mean().backward()
