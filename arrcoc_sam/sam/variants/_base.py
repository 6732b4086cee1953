"""What every cheaper sharpness-aware variant shares: a step counter, the hook-ordered closure step, and
persistent per-parameter buffers that ride in the checkpoint.

A variant is a :class:`~arrcoc_sam.sam.optimizer.SAM` subclass that overrides the hooks SAMTrainer and the
Accelerate helper call (``before_first_pass``, ``ascent_this_step``, ``after_first_pass``, ``perturb``,
``restore``, ``step``). :meth:`VariantSAM.step` with a closure calls the same hooks in the same order as
those integrations, so a variant behaves identically on the three entry points::

    before_first_pass(); ascend = ascent_this_step()
    loss = closure()                          # pass 1 (at w, or at w + ε for msam)
    after_first_pass()
    if ascend: perturb(); closure(); restore()  # pass 2 at w + ε
    step()                                    # base optimizer step; optimizer_steps += 1
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from arrcoc_sam.sam import perturbation
from arrcoc_sam.sam.optimizer import SAM, is_real, snapshot_wrapping
from arrcoc_sam.sam.sharding import is_sharded

__all__ = ["VariantSAM", "grads_replaced", "gradients_only_for", "uses_reentrant_checkpointing"]

logger = logging.getLogger(__name__)



@contextlib.contextmanager
def grads_replaced(params: Sequence[Tensor], replacements: Sequence[Tensor]) -> Iterator[None]:
    """Within the block ``params[i].grad`` is ``replacements[i]`` (same shape/dtype); the originals come back in finally.

    Lets a variant run SAM's own ascent (norm, finiteness check, backup, apply) along another direction.
    """
    saved = [p.grad for p in params]
    try:
        for p, r in zip(params, replacements, strict=True):
            p.grad = r
        yield
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


@contextlib.contextmanager
def gradients_only_for(params: Sequence[Tensor], needed: Sequence[Tensor] | None) -> Iterator[None]:
    """Within the block, the tensors of ``params`` outside ``needed`` that require grad do not (``None``: all keep it).

    Autograd then skips their weight-gradient computation in the passes run inside the block; their
    ``requires_grad`` comes back in finally.
    """
    if needed is None:
        yield
        return
    keep = {id(p) for p in needed}
    frozen = [p for p in params if p.requires_grad and id(p) not in keep]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def uses_reentrant_checkpointing(roots: Iterable[Any]) -> bool:
    """Whether the autograd graph behind the tensors in ``roots`` holds a reentrant activation-checkpoint node.

    Such a node (``torch.utils.checkpoint.checkpoint(use_reentrant=True)``, and wrappers built the same way,
    whose backward node names contain "Checkpoint") recomputes a block in backward and tracks the block's
    inputs, not its weights: under :func:`gradients_only_for`, a block whose inputs need no gradient leaves its
    chosen weights without one. The graph is walked once through ``next_functions`` (it survives backward).
    Non-tensors in ``roots`` and tensors without a graph are ignored.
    """
    stack = [t.grad_fn for t in roots if isinstance(t, Tensor) and t.grad_fn is not None]
    # Each visited node is held: torch may hand out a fresh Python wrapper per access and free it once
    # unreferenced (2.11 does), and the next wrapper can take a freed one's id and be wrongly "seen".
    seen: dict[int, Any] = {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        if "Checkpoint" in type(node).__name__:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _as_written(value: Any) -> float:
    """A real number as a Python float; a NumPy scalar through its shortest decimal, so ``np.float32(0.14)``
    gives 0.14 (its own binary value is 0.14000000059604645)."""
    return float(value) if type(value) in (int, float) else float(str(value))


def check_fraction(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a ``float``; ValueError unless it is a real number (Python or NumPy) in (0, 1] (or [0, 1] with
    ``allow_zero``)."""
    if not is_real(value) or not ((value >= 0 if allow_zero else value > 0) and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return _as_written(value)


def check_nonnegative(value: Any, name: str) -> float:
    """``value`` as a ``float``; ValueError unless it is a finite real number (Python or NumPy) >= 0."""
    if not is_real(value) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return _as_written(value)


def check_interval(interval: Any) -> int:
    """``interval`` as an ``int``; ValueError unless it is an integer (Python or NumPy, not a bool) >= 1."""
    if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
        raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
    return int(interval)


class VariantSAM(SAM):
    """SAM plus an optimizer-step counter and checkpointed per-parameter buffers.

    Attributes:
        optimizer_steps: optimizer steps completed so far, which schedules periodic ascents and seeds ESAM's
            masks. It advances once per step: at :meth:`step` (including steps skipped after a non-finite
            ascent), or — in loops that step the *base* optimizer directly, like the Accelerate helper — at
            the next window's :meth:`before_first_pass`. Saved in the checkpoint.
        buffers: ``{name: {param: tensor}}`` — persistent state a variant keeps beside the base optimizer's
            (LookSAM's direction, Friendly-SAM's EMA). Saved under ``state_dict()["sam_variant"]``, keyed by
            the parameter's index in ``param_groups`` order, exactly like torch's own optimizer state.
    """

    #: names of the persistent per-parameter buffers of the subclass
    buffer_names: tuple[str, ...] = ()
    #: whether the variant's own math (beyond SAM's) is correct on FSDP2/DTensor shards
    supports_sharding: bool = False
    #: whether :meth:`perturb` keeps a copy of the clean (pass-1) gradient for :meth:`restore_with_clean_gradient`
    stashes_clean_gradient: bool = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        restore = snapshot_wrapping(base_optimizer) if isinstance(base_optimizer, Optimizer) else None
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        if not self.supports_sharding and is_sharded(self._all_params()):
            if restore is not None:  # the instance (and an earlier wrapper of it) as they were
                restore()
            raise NotImplementedError(
                f"{type(self).__name__} does not support sharded (FSDP2/DTensor) parameters yet: "
                "use sam, asam or periodic"
            )
        self._clean_grads: list[Tensor] = []
        self.optimizer_steps = 0
        self.buffers: dict[str, dict[Tensor, Tensor]] = {name: {} for name in self.buffer_names}
        # a window reached its last micro-batch (after_first_pass) and its step() has not been seen: the next
        # window counts that step (a loop that steps the base optimizer itself). A window stopped before its
        # last micro-batch is not counted (its checkpoint would otherwise resume one step out of phase).
        self._window_open = False

    @property
    def needs_window_hooks(self) -> bool:
        """Whether the method's schedule lives in the window hooks (periodic and LookSAM with k > 1, msam), so
        the two-call ``first_step``/``second_step`` API, which cannot call them, would silently be another method."""
        return False

    def first_step(self, zero_grad: bool = False) -> bool:
        """SAM's two-call API; refused (RuntimeError) where :attr:`needs_window_hooks`."""
        if self.needs_window_hooks:
            raise RuntimeError(
                f"{type(self).__name__} schedules its ascents through the window hooks, which first_step()/"
                "second_step() bypass (every step would be a full SAM step, or msam's perturbation would come "
                "after the forward pass): use step(closure), SAMTrainer or AcceleratedSAM, or call the hooks "
                "before_first_pass / ascent_this_step / after_first_pass / perturb / restore yourself"
            )
        return super().first_step(zero_grad)

    def before_first_pass(self) -> None:
        """Start a window; if the previous window's step bypassed :meth:`step`, count that step now."""
        super().before_first_pass()
        if self._window_open:
            self.optimizer_steps += 1
        self._window_open = False

    def after_first_pass(self) -> None:
        """The window reached its last micro-batch: its step counts from here on, also where the loop steps the
        base optimizer itself (a subclass's override is wrapped to do so too, whether or not it calls super())."""
        super().after_first_pass()
        self._window_open = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("after_first_pass")
        if own is None or getattr(own, "_marks_window_complete", False):
            return

        @functools.wraps(own)
        def after_first_pass(self: VariantSAM) -> None:
            own(self)
            self._window_open = True

        after_first_pass._marks_window_complete = True  # type: ignore[attr-defined]
        cls.after_first_pass = after_first_pass  # type: ignore[method-assign]

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Without a closure: the base step (counted). With one: the hook-ordered step in the module docstring."""
        self._check_not_perturbed("step()")
        if closure is None:
            self.optimizer_steps += 1
            self._window_open = False
            return super().step()
        with self.closure_window():
            ascend = self.ascent_this_step()
            self.zero_grad()  # as SAM.step: a closure that does not zero the gradients sees one pass's
            with torch.enable_grad():
                loss = closure()
            self.after_first_pass()
            if ascend:
                with self.perturbed() as ok:
                    if ok:
                        self.zero_grad()
                        with torch.enable_grad():
                            closure()
        self.step()
        return loss

    @contextlib.contextmanager
    def closure_window(self) -> Iterator[None]:
        """:meth:`before_first_pass` on entry. If the block raises, :meth:`abort_window`: the clean weights
        back and the window closed without counting a step, so the schedule and the stored state continue as
        if the failed step had never started."""
        self.before_first_pass()
        try:
            yield
        except BaseException:
            self.abort_window()
            raise

    @torch.no_grad()
    def abort_perturbation(self) -> None:
        """SAM's error path; also drops the stashed clean gradient."""
        self._clean_grads = []
        super().abort_perturbation()

    def abort_window(self) -> None:
        """SAM's; and the window is closed without counting a step (the schedule goes on as if it never began)."""
        super().abort_window()
        self._window_open = False

    @torch.no_grad()
    def perturb(self) -> bool:
        """SAM's ascent; with ``stashes_clean_gradient`` also keeps a copy of the clean gradient g (transient)."""
        self._check_groups()
        stash = perturbation.clone_all(self._ascent_candidates()[1]) if self.stashes_clean_gradient else []
        ok = super().perturb()
        self._clean_grads = stash if ok else []
        return ok

    @torch.no_grad()
    def restore_with_clean_gradient(self) -> tuple[list[Tensor], list[Tensor]]:
        """Restore the weights (SAM); returns the tensors that were perturbed and the stashed clean gradients
        (empty when nothing was perturbed), leaving the pass-2 gradients in ``.grad`` for the caller to combine."""
        params = list(self._perturbed)
        clean, self._clean_grads = self._clean_grads, []
        super().restore()
        return params, clean

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _extra_state(self) -> dict[str, Any]:
        return self.variant_state_dict()

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.load_variant_state_dict(extra)

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        unknown = set(extra.get("buffers", {})) - set(self.buffer_names)
        if unknown and self._kept_settings is None:
            raise ValueError(
                f"checkpoint holds buffers {sorted(unknown)} that {type(self).__name__} does not keep "
                f"(it keeps {list(self.buffer_names)}): was it saved by another method?"
            )

    def variant_state_dict(self) -> dict[str, Any]:
        """The variant's own checkpoint state (step counter, buffers), without the base optimizer's."""
        index = {p: i for i, p in enumerate(self._all_params())}
        return {
            "optimizer_steps": self.optimizer_steps,
            "window_open": self._window_open,
            "buffers": {
                name: {index[p]: t for p, t in by_param.items()} for name, by_param in self.buffers.items()
            },
        }

    def load_variant_state_dict(self, extra: dict[str, Any]) -> None:
        """Load what :meth:`variant_state_dict` returned."""
        params = self._all_params()
        unknown = set(extra["buffers"]) - set(self.buffer_names)
        if unknown and self._kept_settings is not None:  # the run's own method wins (keep_settings_on_load)
            logger.warning("the checkpoint holds state of another sharpness-aware method (%s) that %s does not "
                           "keep; this run drops it", ", ".join(sorted(unknown)), type(self).__name__)
            extra = {**extra, "buffers": {k: v for k, v in extra["buffers"].items() if k not in unknown}}
        else:
            self._check_extra_state(extra)
        self.optimizer_steps = int(extra["optimizer_steps"])
        self._window_open = bool(extra.get("window_open", False))
        for name, by_index in extra["buffers"].items():
            loaded = {}
            for i, tensor in by_index.items():
                if not 0 <= int(i) < len(params):
                    raise ValueError(f"checkpoint buffer {name!r} names parameter {i}, but there are {len(params)}")
                p = params[int(i)]
                loaded[p] = tensor.to(device=p.device, dtype=p.dtype, copy=True)
            self.buffers[name] = loaded
