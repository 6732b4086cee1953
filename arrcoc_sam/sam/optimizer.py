"""The SAM / ASAM optimizer wrapper: a thin, torch.optim-compatible shell around any base optimizer.

One SAM step (Foret et al. 2021), with ε from :mod:`arrcoc_sam.sam.perturbation`::

    g     = ∇L(w)                      # pass 1, at the clean weights
    ε     = ρ g/‖g‖   or   ρ T²g/‖Tg‖  # SAM / ASAM (Kwon et al. 2021), T = |w| + η
    g_SAM = ∇L(w + ε)                  # pass 2, at the perturbed weights
    w     = base_step(w, g_SAM)        # after restoring w by copy

The wrapper owns no optimizer state: ``param_groups`` and ``state`` are the base optimizer's own objects,
so schedulers, checkpoints and ``GradScaler`` all see the base optimizer. Only the backup of the perturbed
weights is transient; it lives between :meth:`SAM.perturb` and :meth:`SAM.restore` and is never saved.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import numbers
import operator
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from arrcoc_sam.sam import device_check, perturbation
from arrcoc_sam.sam.norm_stats import running_stat_buffers
from arrcoc_sam.sam.sharding import ShardLayout, align_gradients, is_sharded

__all__ = ["SAM", "ASAM"]

logger = logging.getLogger(__name__)

_SAM_GROUP_KEYS = ("rho", "adaptive", "eta")
# On a base optimizer: what the SAM wrapper around it changed (_Wrapping), so that a later wrapper can undo it.
_WRAPPING_ATTR = "_arrcoc_sam_wrapping"
# In a state dict: the method's own state beyond the base optimizer's (a variant's step counter and buffers).
EXTRA_STATE_KEY = "sam_variant"
_IS_SPARSE = operator.attrgetter("is_sparse")
_DTYPE = operator.attrgetter("dtype")
_GRAD = operator.attrgetter("grad")
_LOW_PRECISION = frozenset((torch.float16, torch.bfloat16))


def is_real(value: Any) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rho(rho: Any, where: str) -> None:
    if not is_real(rho) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"{where}rho must be a finite number >= 0, got {rho!r}")


def check_eta(eta: Any, where: str) -> None:
    if not is_real(eta) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"{where}eta must be a finite number >= 0, got {eta!r}")


def check_adaptive(adaptive: Any, where: str) -> None:
    if isinstance(adaptive, str) or adaptive not in (True, False):
        raise ValueError(f"{where}adaptive must be True or False, got {adaptive!r}")


def _requires_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` cannot run without a closure (LBFGS and the like)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


class SAM(Optimizer):
    """Sharpness-Aware Minimization around a base optimizer.

    Args:
        params: parameters or param-group dicts, as for any ``torch.optim`` optimizer. A group may set its
            own ``rho``, ``adaptive`` and ``eta``; a group with ``rho=0`` is never perturbed (e.g. norm-only
            or LoRA-only SAM).
        base_optimizer: an optimizer class, built as ``base_optimizer(groups, **base_kwargs)``
            (``SAM(model.parameters(), torch.optim.SGD, lr=0.1)``), or an optimizer instance over exactly
            the tensors in ``params``.
        rho: neighbourhood radius ρ (≥ 0). Typical: 0.05 (SAM), 0.5–2.0 (ASAM).
        adaptive: ASAM's scale-invariant ascent, ε = ρ T²g/‖Tg‖ with T = |w| + η, applied element-wise to
            every tensor of the group, biases and normalisation weights included (Kwon et al. apply T to
            weight matrices only and leave biases with T = 1; to reproduce that, put biases in a group with
            ``adaptive=False``).
        eta: η ≥ 0 of ASAM's operator T. The default 0.01 keeps zero-initialised weights perturbable.
        base_kwargs: forwarded to ``base_optimizer`` when it is a class.

    The hot path costs two foreach passes over the perturbed tensors (norm, apply) plus one copy each way,
    and one host synchronisation per ascent (to decide whether it is finite), and one more per step when the
    pass-2 statistics are on (to skip a non-finite sharpness-aware gradient, :meth:`update_non_finite`), except
    with torch's fused Adam/AdamW as the base, whose step makes that check on the device (every step, no sync).

    Sharded parameters (DTensors, e.g. FSDP2 ``fully_shard``) are perturbed and restored shard-locally; the
    norm is that of the full gradient, from one all-reduce per ascent (:mod:`arrcoc_sam.sam.sharding`).
    FSDP1 parameters are refused.
    """

    #: +1: :meth:`perturb` moves along the direction of :meth:`_ascent_directions` (the gradient); −1: against it
    _direction_sign: float = 1.0
    #: whether a group whose base optimizer maximises (``maximize=True``, objective −loss) ascends against the
    #: directions of :meth:`_ascent_directions`: True for gradients of the loss; False for directions that already
    #: carry the objective's sign (msam's momentum)
    _ascent_follows_maximize: bool = True
    #: whether the integrations' ``sam_scope=microbatch`` (one ascent and pass 2 per micro-batch, onto the
    #: window's accumulated gradient) gives this method's update
    supports_microbatch_scope: bool = True
    #: the per-group settings this wrapper adds to the base optimizer's groups (kept by :meth:`load_state_dict`)
    _group_keys: tuple[str, ...] = _SAM_GROUP_KEYS
    #: further per-group entries the method writes and reads (bookkeeping, not settings)
    _bookkeeping_keys: tuple[str, ...] = ()

    @property
    def supports_per_device_scope(self) -> bool:
        """Whether the integrations' ``sam_scope=per_device`` (each rank's ascent from its own pass-1 gradient,
        pass 2 all-reduced) keeps the replicas equal and the checkpoint complete: not where the method combines
        the rank's own clean gradient into the update or into state it keeps (GSAM, LookSAM, Friendly-SAM)."""
        return True

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
        try:
            self._build(params, base_optimizer, rho, adaptive, eta, base_kwargs)
        except BaseException:
            if restore is not None:  # a refused wrapper leaves the instance (and an earlier wrapper) as they were
                restore()
            raise

    def _build(self, params: Any, base_optimizer: Any, rho: float, adaptive: bool, eta: float,
               base_kwargs: dict[str, Any]) -> None:
        check_rho(rho, "")
        check_eta(eta, "")
        check_adaptive(adaptive, "")
        if isinstance(params, (Tensor, nn.Module)):
            raise TypeError(
                f"params must be an iterable of tensors or param-group dicts, e.g. model.parameters(); got a "
                f"{type(params).__name__}" + (": wrap it in a list" if isinstance(params, Tensor) else "")
            )
        param_list = [_listed(item) if isinstance(item, dict) else item for item in params]
        if not param_list:
            raise ValueError("SAM got an empty parameter list: pass the model's (trainable) parameters")

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_kwargs {sorted(base_kwargs)} were given with an optimizer instance; "
                    "set them on the instance instead"
                )
            self._check_instance_params(param_list, base_optimizer)
            self._check_clashes(base_optimizer)
            _undo_earlier_wrapper(base_optimizer)
            unwrapped = _Wrapping.of(base_optimizer)
            self._take_group_settings(param_list, base_optimizer)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            groups = param_list if isinstance(param_list[0], dict) else [{"params": param_list}]
            _check_no_duplicates([p for group in groups for p in group["params"]])
            self.base_optimizer = base_optimizer(groups, **base_kwargs)
            self._check_clashes(self.base_optimizer)
            unwrapped = _Wrapping.of(self.base_optimizer)
        else:
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass or instance, got {base_optimizer!r}"
            )

        if _requires_closure(self.base_optimizer):
            raise TypeError(
                f"{type(self.base_optimizer).__name__} cannot step without a closure, and a sharpness-aware step "
                "calls the base step once, on the gradient at w + ε: use a first-order optimizer such as SGD or AdamW"
            )
        if isinstance(self.base_optimizer, torch.optim.SparseAdam):
            raise TypeError(
                "SparseAdam steps on sparse gradients only, and a sharpness-aware ascent needs dense ones (the "
                "norm over all of them): use a dense optimizer such as AdamW, or leave the sparse embedding out"
            )
        sam_defaults = {"rho": float(rho), "adaptive": bool(adaptive), "eta": float(eta)}
        for index, group in enumerate(self.base_optimizer.param_groups):
            for key, value in sam_defaults.items():
                group.setdefault(key, value)
            self._check_group(group, f"param group {index}: ")
        self.defaults = {**self.base_optimizer.defaults, **sam_defaults}
        # Deliberately not calling Optimizer.__init__: it would build a second set of groups and state. Hooks
        # go to the base optimizer (see register_step_pre_hook), so these stay empty.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

        self.skipped_steps = 0
        self._skipped_updates = 0  # base steps step() left out for non-finite gradients, as the host knows them
        self._device_skips = device_check.SkipCounter()  # fused steps skipped on the device, not yet read
        self.stats: dict[str, Tensor] = {}
        self.track_stats = True
        self._perturbed: list[Tensor] = []
        self._targets: list[Tensor] = []  # what perturb() changed in place: the params, or their local shards
        self._backup: list[Tensor] = []  # clean copies of _targets, in the same order
        self._restore_pairs: list[tuple[list[Tensor], list[Tensor]]] = []  # (targets, backup) per foreach group
        self._layout: ShardLayout | None = None
        self._skip_next_step = False
        self._update_check: Tensor | None = None  # ‖g_SAM‖ from the last restore(), for update_non_finite()
        self._warned_low_precision = False
        self._stats_model: nn.Module | None = None
        self._stats_snapshot: tuple[list[Tensor], list[Tensor]] = ([], [])  # (buffers, clean copies)
        self._plans = perturbation.AscentPlans()  # the grouping of the last ascent's tensors, reused while valid
        self._kept_settings: list[dict[str, Any]] | None = None  # per group, kept over a checkpoint's on load
        self._settings_before_load: list[dict[str, Any]] = []  # between the base optimizer's load hooks
        self._extra_before_load: dict[str, Any] | None = None  # the method's state, between those hooks
        self._own_call = False  # this wrapper's load_state_dict runs: its hooks on the base stand down
        unwrapped.own_loading(self)

    def _check_clashes(self, base: Optimizer) -> None:
        """Refuse a base optimizer that has a hyperparameter of the same name as one of this wrapper's per-group
        settings (Adadelta's ``rho``): both would read and write the one entry of each param group."""
        clashes = [key for key in self._group_keys if key in base.defaults]
        if clashes:
            own = ", ".join(f"{key}={base.defaults[key]!r}" for key in clashes)
            raise ValueError(
                f"{type(base).__name__} has its own hyperparameter(s) {own}, named like {type(self).__name__}'s "
                f"per-group setting(s) {clashes}; the two cannot be told apart in a param group: use another base "
                "optimizer"
            )

    def _take_group_settings(self, params: list[Any], base: Optimizer) -> None:
        """With a base optimizer instance: copy the per-group settings of the given group dicts (``rho``,
        ``adaptive``, ``eta``, ...) onto the instance's group holding exactly the same tensors. A dict whose
        tensors match no group, or that sets a base hyperparameter to another value than the instance holds,
        is refused: the instance's groups are the ones that run."""
        by_tensors = {frozenset(map(id, group["params"])): group for group in base.param_groups}
        for index, given in enumerate(params):
            settings = {key: value for key, value in given.items() if key != "params"} if isinstance(given, dict) else {}
            if not settings:
                continue
            target = by_tensors.get(frozenset(id(_tensor_of(p)) for p in given["params"]))
            if target is None:
                raise ValueError(
                    f"param group {index} sets {sorted(settings)}, but no group of the base_optimizer instance holds "
                    "exactly its tensors: build the instance over the same groups, or pass the class instead"
                )
            for key, value in settings.items():
                if key in self._group_keys:
                    target[key] = value
                elif key not in target or not _equal(target[key], value):
                    raise ValueError(
                        f"param group {index} sets {key}={value!r}, but the base_optimizer instance's group holds "
                        f"{key}={target.get(key)!r}: set base-optimizer hyperparameters on the instance"
                    )

    @staticmethod
    def _check_instance_params(params: list[Any], base: Optimizer) -> None:
        given = []
        for item in params:
            given.extend(item["params"] if isinstance(item, dict) else [item])
        given = [_tensor_of(item) for item in given]  # (name, tensor) pairs, also inside group dicts
        wrapped = [p for group in base.param_groups for p in group["params"]]
        _check_no_duplicates(wrapped)
        if {id(p) for p in given} != {id(p) for p in wrapped} or len(given) != len(wrapped):
            raise ValueError(
                f"the base_optimizer instance holds {len(wrapped)} tensors that differ from the {len(given)} "
                "tensors passed as params: build it over the same parameters"
            )

    # -- the shared, live views of the base optimizer ------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.base_optimizer.state = value

    @property
    def is_perturbed(self) -> bool:
        """True between a successful :meth:`perturb` and its :meth:`restore`."""
        return bool(self._perturbed)

    @property
    def passes_per_step(self) -> float:
        """Forward+backward passes per optimizer step: two for SAM and ASAM."""
        return 2.0

    def hold_running_stats(self, model: nn.Module | None) -> SAM:
        """Keep ``model``'s BatchNorm-style running statistics to one update per step, on every entry point.

        From now on each successful :meth:`perturb` snapshots the running statistics of ``model``'s
        normalisation layers and :meth:`restore` (or :meth:`abort_perturbation`) copies them back, so the
        second pass at w + ε leaves them as the clean pass left them. ``step(closure)`` and
        ``first_step``/``second_step`` need this on BatchNorm models; a loop that wraps pass 2 in
        :func:`~arrcoc_sam.sam.preserve_running_stats` does not. msam has no clean pass: its one pass per step
        runs at w + ε, and the statistics follow that pass (it keeps no snapshot). ``None`` stops it. Returns
        ``self``.
        """
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"hold_running_stats takes an nn.Module or None, got {type(model).__name__}")
        if self._perturbed:
            raise RuntimeError("hold_running_stats() called while perturbed: call it before perturb() or after restore()")
        self._stats_model = model
        return self

    # -- hooks the Trainer and the Accelerate helper call (variants override them) -------------------
    def ascent_this_step(self) -> bool:
        """Whether the coming optimizer step runs a perturbed second pass."""
        return True

    def before_first_pass(self) -> None:
        """Called before the first micro-batch forward of an accumulation window.

        Clears a pending skip left by a non-finite ascent whose step a GradScaler already skipped, and the
        last restore's gradient check (:meth:`update_non_finite`). Overrides must call
        ``super().before_first_pass()``.
        """
        self._skip_next_step = False
        self._update_check = None
        self._check_groups()

    def after_first_pass(self) -> None:
        """Called after the last micro-batch backward of a window, before :meth:`perturb`."""

    @property
    def next_step_skipped(self) -> bool:
        """Whether the next :meth:`step` skips the base update (the last ascent met non-finite gradients)."""
        return self._skip_next_step

    def skip_next_step(self) -> None:
        """Make the next :meth:`step` skip the base update: a window whose earlier micro-batch met non-finite
        gradients (``sam_scope=microbatch``, where each micro-batch's :meth:`perturb` starts afresh)."""
        self._skip_next_step = True

    def first_pass_tensors(self) -> list[Tensor] | None:
        """The tensors whose pass-1 gradient the coming ascent reads (valid after :meth:`before_first_pass`),
        or ``None`` for all of them (SAM). A loop may run pass 1 with ``requires_grad`` off on the others
        (:func:`~arrcoc_sam.sam.variants.gradients_only_for`) to skip their weight gradients; the result is
        the same either way, since the ascent ignores them and pass 2 recomputes every gradient."""
        return None

    # -- the ascent ----------------------------------------------------------------------------------
    def _ascent_directions(self) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        """(params, directions, groups) that :meth:`perturb` ascends along: the gradients, for SAM/ASAM."""
        return self._ascent_candidates()

    def _ascent_candidates(self) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        """(params, grads, param group of each) over the groups with ρ > 0 and the tensors that have a grad.
        (Complex tensors are refused where the ascent groups them: :func:`perturbation.check_real`.)"""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        groups: list[dict[str, Any]] = []
        for group in self.param_groups:
            if group["rho"] == 0:
                continue
            group_params = group["params"]
            group_grads = list(map(_GRAD, group_params))
            if not all(map(operator.is_not, group_grads, itertools.repeat(None))):
                kept = [i for i, g in enumerate(group_grads) if g is not None]
                group_params, group_grads = [group_params[i] for i in kept], [group_grads[i] for i in kept]
            if any(map(_IS_SPARSE, group_grads)):
                raise RuntimeError("SAM does not support sparse gradients")
            params.extend(group_params)
            grads.extend(group_grads)
            groups.extend([group] * len(group_params))
        return params, grads, groups

    def _warn_low_precision(self, groups: list[perturbation.AscentGroup]) -> None:
        if self._warned_low_precision or all(g.params[0].dtype not in _LOW_PRECISION for g in groups):
            return
        self._warned_low_precision = True
        warnings.warn(
            "SAM is perturbing float16/bfloat16 parameters: most of ε rounds away at that precision. "
            "Keep fp32 master weights (e.g. torch.autocast or mixed precision) and perturb those.",
            stacklevel=3,
        )

    @torch.no_grad()
    def perturb(self) -> bool:
        """w ← w + ε from the current ``.grad`` fields; returns False (and perturbs nothing) if skipped.

        The ascent is skipped when the gradient norm is zero or non-finite; a non-finite norm also makes
        the next :meth:`step` skip the base update. Gradients may be scaled (GradScaler): ε is scale-free.
        """
        if self._perturbed:
            raise RuntimeError("perturb() called twice without restore(): the weights are already at w + ε")
        self._skip_next_step = False
        self._update_check = None
        self._check_groups()
        for key in ("grad_norm", "rho", "grad_norm_perturbed", "grad_cosine"):  # the previous ascent's
            self.stats.pop(key, None)
        params, grads, settings = self._ascent_directions()
        if not params:
            return False
        groups = self._plans.groups(params, grads, settings, admit=lambda: not is_sharded(params))
        layout = None
        if groups is None:  # not remembered (the plans check dtypes themselves): sharded, or without storage
            if align_gradients(p for group in self.param_groups for p in group["params"]):
                params, grads, settings = self._ascent_directions()  # the gradients laid out as their tensors
            perturbation.check_real({g.dtype for g in grads})
            layout = ShardLayout.of(params, grads)
        if layout is None:
            targets = params
            if groups is None:
                groups = perturbation.ascent_groups(params, grads, settings)
            norm = perturbation.groups_sum_of_squares(groups, grads[0].device).sqrt()
        else:  # DTensor shards (FSDP2): local pieces, one all-reduce for the full-gradient norm
            targets, grads = layout.local(params), layout.local(grads)
            groups = perturbation.ascent_groups(targets, grads, settings)
            norm = layout.ascent_norm(targets, grads, [s["adaptive"] for s in settings], [s["eta"] for s in settings])
        self.stats["grad_norm"] = norm.detach().float()
        self.stats["rho"] = torch.tensor(max(g["rho"] for g in self.param_groups), dtype=torch.float32)
        # The copies are dispatched before the host waits for the norm, so on an accelerator the host queues
        # them while the device still finishes the backward pass; a skipped ascent drops them unused.
        backups = [perturbation.clone_all(group.params) for group in groups]
        norm_value, device_skips = self._device_skips.read_with(norm)  # the ascent's one host sync
        self._count_device_skips(device_skips)
        if layout is None and (math.isinf(norm_value) or norm_value == 0.0):
            norm_value = self._norm_out_of_float32_range(groups, norm_value, norm.device)
        if not math.isfinite(norm_value) or norm_value == 0.0:
            self.skipped_steps += 1
            if not math.isfinite(norm_value):
                self._skip_next_step = True
                logger.warning(
                    "SAM: non-finite gradient norm (%s); skipping the ascent and the optimizer step "
                    "(%d skipped so far)",
                    norm_value,
                    self.skipped_steps,
                )
            else:
                logger.info("SAM: zero gradient norm; no ascent this step")
            return False
        self._warn_low_precision(groups)
        self._restore_pairs = [(group.params, backup) for group, backup in zip(groups, backups, strict=True)]
        self._backup = _in_original_order(groups, backups, len(targets))
        self._perturbed, self._targets, self._layout = params, targets, layout
        try:
            perturbation.apply_groups_(groups, norm_value, self._direction_sign, self._ascent_follows_maximize)
            self._snapshot_running_stats()
        except BaseException:  # e.g. out of memory while ASAM builds T for a later chunk: undo the part applied
            self._copy_back_clean_weights()
            raise
        return True

    def _norm_out_of_float32_range(self, groups: list[perturbation.AscentGroup], norm_value: float,
                                   device: torch.device) -> float:
        """The ascent norm where the float32 one came out inf or 0 although every gradient element is finite and
        not all are zero: its sum of squares left float32's range (a norm above ~1.8e19, e.g. gradients under a
        large GradScaler scale, or elements below ~1e-23). Recomputed in float64; ``norm_value`` unchanged where
        the gradients are non-finite or all zero (one foreach max-norm and one host sync decide)."""
        largest = perturbation.largest_magnitude([grad for group in groups for grad in group.grads])
        if not math.isfinite(largest) or largest == 0.0:
            return norm_value
        norm_value = perturbation.norm_in_float64(groups)
        self.stats["grad_norm"] = torch.tensor(norm_value, dtype=torch.float32, device=device)
        return norm_value

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the clean weights back into exactly the perturbed tensors, bitwise; free the backup.

        Before restoring, records ``stats["grad_norm_perturbed"]`` = ‖g_SAM‖ and ``stats["grad_cosine"]`` =
        cos(ε, g_SAM) from the current gradients (pass 2), when every perturbed tensor has one and
        ``track_stats`` is True (the default; three reductions over the perturbed tensors, and on sharded
        parameters one all-reduce), and, with ``track_stats``, the norm of every current gradient for
        :meth:`update_non_finite` (one more reduction where tensors outside the ascent have gradients).
        Sharded (DTensor) parameters are restored shard by shard, locally.
        """
        if not self._perturbed:  # no ascent (or ESAM's tensor SWP with a zero norm over S): check what pass 2 left
            self._put_back_running_stats()  # where a pass 2 ran at w all the same (first_step, ESAM's tensor SWP)
            if self.track_stats and not self._skip_next_step:  # a non-finite ascent already skips the step
                self._update_check = self._norm_of_gradients_besides([])
            return
        targets, backup, layout = self._targets, self._backup, self._layout
        try:  # perturb() dropped the previous step's figures, so a step without them reports none
            if layout is not None and self.track_stats:
                align_gradients(self._perturbed)
            grads = [p.grad for p in self._perturbed] if self.track_stats else []
            if grads and all(g is not None for g in grads):
                norm = self._record_second_pass_stats(targets, backup, grads if layout is None else layout.local(grads))
                rest = self._norm_of_gradients_besides(self._perturbed)
                if rest is not None:
                    norm = torch.hypot(norm, rest.to(device=norm.device, dtype=norm.dtype))
                self._update_check = norm
            elif grads:  # a perturbed tensor without a pass-2 gradient: no statistics, the update is still checked
                self._update_check = self._norm_of_gradients_besides([])
        finally:
            self._copy_back_clean_weights()

    def _norm_of_gradients_besides(self, skip: list[Tensor]) -> Tensor | None:
        """‖g‖ over the current gradients of every parameter not in ``skip`` (ρ = 0 groups, tensors the ascent left
        alone), as a 0-dim tensor, no host sync; None if there are none. Sharded (DTensor) gradients count whole:
        one ``all_reduce`` of the local pieces' sum (every rank holds gradients for the same tensors under FSDP2,
        so every rank joins it)."""
        skipped = set(map(id, skip))
        pairs = [(p, p.grad) for group in self.param_groups for p in group["params"]
                 if p.grad is not None and id(p) not in skipped]
        if not pairs:
            return None
        params, grads = [p for p, _ in pairs], [g for _, g in pairs]
        layout = None
        if is_sharded(grads):
            if align_gradients(params):
                grads = [p.grad for p in params]
            layout = ShardLayout.of(params, grads)
        if layout is None:
            if any(map(_IS_SPARSE, grads)) or any(dtype.is_complex for dtype in set(map(_DTYPE, grads))):
                grads = list(map(_dense_real, grads))  # (only then: a Python call per gradient)
            return perturbation.squared_norm(grads).sqrt()
        plain = [False] * len(params)  # ‖g‖: the ascent norm without ASAM's scaling
        return layout.ascent_norm(layout.local(params), layout.local(grads), plain, [0.0] * len(params))

    @torch.no_grad()
    def abort_perturbation(self) -> None:
        """The error path of :meth:`restore`: the clean weights back bitwise, the backup freed, and nothing
        computed from the (possibly partial) pass-2 gradients — no statistics, and no variant updates its
        stored state (LookSAM's direction, GSAM's combination). Where nothing is perturbed, only the running
        statistics a pass 2 at w was to leave alone come back (:meth:`hold_running_stats`)."""
        if self._perturbed:
            self._copy_back_clean_weights()
        else:
            self._put_back_running_stats()

    def abort_window(self) -> None:
        """The error path of a whole accumulation window (the integrations call it when a pass raises):
        :meth:`abort_perturbation`; variants also forget the window, so it counts as no optimizer step."""
        self.abort_perturbation()

    def _copy_back_clean_weights(self) -> None:
        for group_targets, group_backup in self._restore_pairs:
            torch._foreach_copy_(group_targets, group_backup)
        self._put_back_running_stats()
        self._perturbed, self._targets, self._backup, self._layout = [], [], [], None
        self._restore_pairs = []

    def _snapshot_running_stats(self) -> None:
        """Keep clean copies of :meth:`hold_running_stats`'s model's running statistics (none without one)."""
        if self._stats_model is not None:
            buffers = running_stat_buffers(self._stats_model)
            self._stats_snapshot = (buffers, perturbation.clone_all(buffers))

    def _put_back_running_stats(self) -> None:
        """Copy :meth:`_snapshot_running_stats`' copies back, bitwise, and drop them."""
        if self._stats_snapshot[0]:
            perturbation.copy_(*self._stats_snapshot)
        self._stats_snapshot = ([], [])

    def _record_second_pass_stats(self, params: list[Tensor], backup: list[Tensor], grads: list[Tensor]) -> Tensor:
        """``stats["grad_norm_perturbed"]`` and ``stats["grad_cosine"]`` from the perturbed tensors' pass-2
        gradients; returns ‖g_SAM‖ (0-dim, in the gradients' accumulation dtype)."""
        torch._foreach_sub_(params, backup)  # params now hold ε exactly as applied; restored right after
        if self._layout is None:
            cosine, grad_norm = perturbation.cosine(params, grads)
        else:
            eps_dot_grad, eps_sq, grad_sq = self._layout.dots(params, grads)
            grad_norm = grad_sq.sqrt()
            cosine = eps_dot_grad / (eps_sq.sqrt() * grad_norm).clamp_min(1e-30)
        self.stats["grad_norm_perturbed"] = grad_norm.float()
        self.stats["grad_cosine"] = cosine.float()
        return grad_norm

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[bool]:
        """``with opt.perturbed() as ok:`` — perturb, run the second pass inside, then :meth:`restore`; if the
        block raises, :meth:`abort_perturbation` puts the clean weights back instead and the error propagates."""
        ok = self.perturb()
        try:
            yield ok
        except BaseException:
            self.abort_perturbation()
            raise
        self.restore()

    # -- the torch.optim surface ---------------------------------------------------------------------
    def first_step(self, zero_grad: bool = False) -> bool:
        """Ascent from the current gradients (davda54-style API). Returns whether it perturbed.

        A skipped ascent under :meth:`hold_running_stats` still snapshots the running statistics: a loop of this
        API runs pass 2 anyway, and :meth:`second_step` puts them back, so they move once per step."""
        ok = self.perturb()
        if not ok:
            self._snapshot_running_stats()
        if zero_grad:
            self.zero_grad()
        return ok

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the clean weights and take the base step with the current (perturbed-point) gradients."""
        self.restore()  # also puts the running statistics back where first_step skipped its ascent
        self.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Without a closure: the base optimizer's step, skipped after a non-finite ascent and when the
        sharpness-aware gradient holds inf/NaN (:meth:`update_non_finite`; with a fused Adam/AdamW base, any
        current gradient, checked on the device: :meth:`_step_with_device_check`).

        With a closure (zero_grad + forward + backward, returning the loss): a full SAM step — the closure
        at w, the ascent, the closure at w + ε, restore, base step. Returns the loss at the clean weights.
        Never route a closure through ``GradScaler.step``: it would skip unscaling; use the
        :meth:`perturbed` loop shown in the README instead.

        Raises:
            RuntimeError: the weights are perturbed (a step inside a ``perturbed()`` block, or between
                ``perturb()`` and ``restore()``): the restore would overwrite the update.
        """
        self._check_not_perturbed("step()")
        if closure is None:
            if not self._skip_next_step and self._step_with_device_check():
                return None
            if self._skip_next_step or self.update_non_finite():
                self._skip_next_step = False
                self._skipped_updates += 1
                return None
            self.base_optimizer.step()
            return None
        self.zero_grad()  # also a closure that does not zero them itself (davda54's) then sees one pass's gradient
        with torch.enable_grad():
            loss = closure()
        if not self.ascent_this_step():
            self.step()
            return loss
        with self.perturbed() as ok:
            if ok:
                self.zero_grad()
                with torch.enable_grad():
                    closure()
        self.step()
        return loss

    def _step_with_device_check(self) -> bool:
        """The base step with the update check made on the device (:mod:`~arrcoc_sam.sam.device_check`), where the
        base optimizer is torch's fused Adam/AdamW and every current gradient a plain dense tensor: no host sync, and
        every step checked, with or without an ascent or ``track_stats``. Returns False (nothing done) otherwise."""
        if not device_check.skips_on_device(self.base_optimizer):
            return False
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads or not device_check.checkable_on_device(grads):
            return False
        try:
            found = device_check.non_finite_flag(grads)
        except RuntimeError:  # a gradient whose elements share memory (expanded by hand): the host check reads it
            return False
        self._update_check = None  # superseded: the flag covers every gradient the step reads
        device_check.step_with_flag(self.base_optimizer, found)
        self._device_skips.add(found)
        return True

    def _count_device_skips(self, count: int) -> None:
        """Add ``count`` steps skipped on the device to :attr:`skipped_updates`, with a warning where it is not 0."""
        if count:
            self._skipped_updates += count
            logger.warning(
                "SAM: %d optimizer step(s) skipped on the device for inf/NaN gradients (%s's fused step; %d "
                "skipped so far)", count, type(self.base_optimizer).__name__, self._skipped_updates,
            )

    @property
    def skipped_updates(self) -> int:
        """Base steps :meth:`step` left out for non-finite gradients (not a GradScaler's own skips). Reading it
        also counts, with a warning, the steps a fused base optimizer skipped on the device since the last ascent
        (one host sync)."""
        self._count_device_skips(self._device_skips.read())
        return self._skipped_updates

    @skipped_updates.setter
    def skipped_updates(self, value: int) -> None:
        self._count_device_skips(self._device_skips.read())
        self._skipped_updates = value

    def take_update_norm(self) -> Tensor | None:
        """‖g_SAM‖ (a 0-dim tensor) that the last :meth:`restore` recorded for the update check, handed over once
        and without a host sync; None when no restore recorded one since the last :meth:`step`, :meth:`zero_grad`,
        :meth:`perturb` or :meth:`before_first_pass` (``track_stats`` off, or a perturbed tensor without a pass-2
        gradient). A loop that reads it takes over the check from :meth:`step` (see :meth:`update_non_finite`)."""
        norm, self._update_check = self._update_check, None
        return norm

    def update_non_finite(self, norm: Tensor | None = None) -> bool:
        """Whether the sharpness-aware gradient holds inf/NaN, with a warning when it does.

        ``norm``: a ‖g_SAM‖ taken with :meth:`take_update_norm` (or the largest of several, e.g. one per
        micro-batch); by default the pending one, which this takes. One host sync, and one more when the norm
        is inf: a float32 norm that overflowed although every element of the current gradients is finite (above
        ~1.8e19, e.g. under a large GradScaler scale) does not count, except for sharded (FSDP2) parameters.
        :meth:`step` calls it and skips the base update when it says so; the pass-1 check in :meth:`perturb`
        cannot see a loss that is finite at w and blows up at w + ε. The norm covers every gradient present at the
        restore (sharded ones whole, through one more all-reduce where gradients outside the ascent exist).
        """
        if norm is None:
            norm = self.take_update_norm()
            if norm is None:
                return False
        value = float(norm)
        if math.isfinite(value):
            return False
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [_dense_real(p.grad) for p in params if p.grad is not None]
        if math.isinf(value) and grads and not is_sharded(params) and math.isfinite(perturbation.largest_magnitude(grads)):
            return False
        logger.warning("SAM: non-finite gradients at w + ε (‖g_SAM‖ = %s); skipping the optimizer step", value)
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's; also drops a pending update check (the gradients it describes are gone)."""
        self._update_check = None
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def _check_not_perturbed(self, call: str) -> None:
        if self._perturbed:
            raise RuntimeError(
                f"{call} while the weights are perturbed: restore() first (step after the `with opt.perturbed()` "
                "block, not inside it), or the restore would overwrite the update"
            )

    def train(self) -> None:
        """The base optimizer's ``train()`` where it has one (schedule-free optimizers; Accelerate and the HF
        Trainer call it around evaluation)."""
        mode = getattr(self.base_optimizer, "train", None)
        if callable(mode):
            mode()

    def eval(self) -> None:
        """The base optimizer's ``eval()`` where it has one (see :meth:`train`)."""
        mode = getattr(self.base_optimizer, "eval", None)
        if callable(mode):
            mode()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (SAM's ρ/η/adaptive ride along in its param groups), plus the method's
        own state under ``"sam_variant"`` where it keeps any (the variants). The same holds for the base
        optimizer's own ``state_dict()`` (``accelerator.save_state``), which this wrapper hooks."""
        self._check_not_perturbed("state_dict()")
        state = self.base_optimizer.state_dict()  # the hook adds the method's state, before hooks registered later
        return state if EXTRA_STATE_KEY in state else self._with_extra_state(state)  # a base that skips hooks

    def _with_extra_state(self, state: dict[str, Any]) -> dict[str, Any]:
        extra = self._extra_state()
        if extra is not None:
            state[EXTRA_STATE_KEY] = extra
        return state

    def _extra_state(self) -> dict[str, Any] | None:
        """The method's own checkpoint state beyond the base optimizer's (None: none; SAM and ASAM)."""
        return None

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        """Load what :meth:`_extra_state` returned (checked by :meth:`_check_extra_state` before the base optimizer
        loaded); SAM keeps none, so another method's is dropped."""
        logger.warning("the checkpoint holds the state of another sharpness-aware method (%s) that %s does not keep; "
                       "it is dropped", ", ".join(sorted(extra.get("buffers", {}))) or "its step counter",
                       type(self).__name__)

    def _check_extra_state(self, extra: dict[str, Any]) -> None:
        """Raise before anything loads if the method cannot take ``extra`` (SAM drops any)."""

    @contextlib.contextmanager
    def _hooks_standing_down(self) -> Iterator[None]:
        """Within the block this wrapper's hooks on the base optimizer do nothing: the wrapper's own
        load_state_dict does their work itself (so it also happens with a base optimizer whose overridden
        load_state_dict never runs torch's hooks, e.g. bitsandbytes' 8-bit ones)."""
        saved, self._own_call = self._own_call, True
        try:
            yield
        finally:
            self._own_call = saved

    def keep_settings_on_load(self) -> SAM:
        """From now on :meth:`load_state_dict` keeps this optimizer's current per-group settings (``rho``,
        ``adaptive``, ``eta`` and the method's own, e.g. GSAM's schedule) over those a checkpoint holds, and logs a
        warning naming each that differs: the settings a run starts with win over those of the run it resumes
        (SAMTrainer and the launcher call this). Returns ``self``."""
        self._kept_settings = [{key: group[key] for key in self._group_keys if key in group}
                               for group in self.param_groups]
        return self

    def _with_kept_settings(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with :meth:`keep_settings_on_load`'s settings in place of its groups' own (a copy)."""
        changed, groups = set(), []
        for index, group in enumerate(state_dict.get("param_groups", [])):
            kept = self._kept_settings[index] if index < len(self._kept_settings) else {}
            changed.update(f"{key}: {group[key]!r} -> {value!r}" for key, value in kept.items()
                           if key in group and not _equal(group[key], value))
            groups.append({**group, **kept})
        if changed:
            logger.warning("the checkpoint's optimizer state was saved with other sharpness-aware settings; this "
                           "run keeps its own (%s)", ", ".join(sorted(changed)))
        return {**state_dict, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimizer's state dict. Each group takes the checkpoint's settings (unless
        :meth:`keep_settings_on_load` was called); a setting of this wrapper that the checkpoint lacks (e.g.
        ``rho`` when resuming a plain AdamW run with SAM) keeps its current value. The loaded settings are
        validated like constructor arguments, before anything loads. The same holds when a loop loads the base
        optimizer itself (``accelerator.load_state``): the wrapper does this in the base's load hooks."""
        state_dict = self._before_base_load(state_dict)
        try:
            with self._hooks_standing_down():
                self.base_optimizer.load_state_dict(state_dict)
        except BaseException:
            self._settings_before_load, self._extra_before_load = [], None  # keep no checkpoint tensors alive
            raise
        self._after_base_load()

    def _before_base_load(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Before the base optimizer loads: the method's own state taken out, the kept settings put in, then every
        group's settings validated."""
        self._update_check = None  # a gradient check of the run before the load means nothing after it
        state_dict = dict(state_dict)
        extra = state_dict.pop(EXTRA_STATE_KEY, None)
        if extra is not None:
            self._check_extra_state(extra)
        self._extra_before_load = extra
        if self._kept_settings is not None:
            state_dict = self._with_kept_settings(state_dict)
        own = [{key: group[key] for key in self._group_keys if key in group} for group in self.param_groups]
        for index, (group, settings) in enumerate(zip(state_dict.get("param_groups", []), own)):
            # validated before anything loads, so a refused checkpoint leaves this optimizer as it was
            self._check_group({**settings, **{k: v for k, v in group.items() if k != "params"}},
                              f"loaded param group {index}: ")
        self._settings_before_load = own
        return state_dict

    def _after_base_load(self) -> None:
        """After the base optimizer loaded: settings the checkpoint lacked keep their values; then the method's
        own state loads."""
        own, self._settings_before_load = self._settings_before_load, []
        extra, self._extra_before_load = self._extra_before_load, None
        replaced = []
        for index, (group, settings) in enumerate(zip(self.param_groups, own)):
            for key, value in settings.items():
                group.setdefault(key, value)
            self._check_group(group, f"loaded param group {index}: ")
            replaced.extend(f"group {index} {key}: {value!r} -> {group[key]!r}" for key, value in settings.items()
                            if not _equal(group[key], value))
        if replaced:
            logger.info("the checkpoint's sharpness-aware settings replace this optimizer's (%s); "
                        "keep_settings_on_load() keeps the optimizer's own", ", ".join(replaced))
        if extra is not None:
            self._load_extra_state(extra)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_groups()  # groups added to the base directly first, so the undo record stays in step
        _check_no_duplicates(_listed(param_group)["params"])
        before = _owned_entries(param_group)
        for key in _SAM_GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        self._check_group(param_group, "new param group: ")
        self.base_optimizer.add_param_group(param_group)
        _Wrapping.of(self.base_optimizer).before.append(before)

    def _check_groups(self) -> None:
        """Every group's settings checked where they are not plainly valid (a ρ schedule may set them in place); a
        group added to the base optimizer directly first gets this wrapper's defaults (:meth:`_adopt_group`). Runs
        where a window or an ascent starts, before anything reads the settings."""
        for index, group in enumerate(self.param_groups):
            if not _plainly_valid(group):
                if any(key not in group for key in self._group_keys):
                    self._adopt_group(group, index)
                SAM._check_group(self, group, f"param group {index}: ")

    def _adopt_group(self, group: dict[str, Any], index: int) -> None:
        """Give a group added behind the wrapper's back (``base.add_param_group``, ``param_groups.append``) the
        settings :meth:`add_param_group` would have given it: this wrapper's defaults where it has none."""
        record = _Wrapping.of(self.base_optimizer)
        if len(record.before) == index:  # appended after the others: its own entries, for a later wrapper's undo
            record.before.append(_owned_entries(group))
        for key in _SAM_GROUP_KEYS:
            group.setdefault(key, self.defaults[key])
        self._check_group(group, f"param group {index} (added to the base optimizer directly): ")

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        """Raise ValueError naming ``where`` and the setting if a group's SAM settings are invalid; otherwise
        store them as plain ``float``/``bool`` (a NumPy scalar would not load with ``weights_only=True``)."""
        check_rho(group["rho"], where)
        check_eta(group["eta"], where)
        check_adaptive(group["adaptive"], where)
        group["rho"], group["eta"], group["adaptive"] = float(group["rho"]), float(group["eta"]), bool(group["adaptive"])

    # -- hooks: registered on the base optimizer, whose step and state_dict are the ones that run -------
    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """``hook(sam, args, kwargs)`` before every base-optimizer step (once per SAM step; not on steps skipped on the
        host, but on those a fused Adam/AdamW base skips on the device, whose step runs and changes nothing)."""
        return self._register_on_base("register_step_pre_hook", hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """``hook(sam, args, kwargs)`` after every base-optimizer step (once per SAM step; not on steps skipped on the
        host, but on those a fused Adam/AdamW base skips on the device, whose step runs and changes nothing)."""
        return self._register_on_base("register_step_post_hook", hook)

    def register_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> RemovableHandle:
        return self._register_on_base("register_state_dict_pre_hook", hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> RemovableHandle:
        return self._register_on_base("register_state_dict_post_hook", hook, prepend=prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> RemovableHandle:
        return self._register_on_base("register_load_state_dict_pre_hook", hook, prepend=prepend)

    def register_load_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> RemovableHandle:
        return self._register_on_base("register_load_state_dict_post_hook", hook, prepend=prepend)

    def _register_on_base(self, method: str, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        """Register ``hook`` with the base optimizer's ``method``; the hook receives this wrapper, not the base."""

        def on_wrapper(_base: Optimizer, *args: Any) -> Any:
            return hook(self, *args)

        return getattr(self.base_optimizer, method)(on_wrapper, **kwargs)

    # torch.optim.Optimizer pickles only defaults/state/param_groups, which here live on the base optimizer.
    # An LR scheduler puts a ``step`` wrapper bound to this very object (and ``_opt_called``) on the instance;
    # a copy must not carry them, or its step() would step the original.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_plans", "step", "_opt_called"):  # _plans: a cache keyed on identities, rebuilt on demand
            state.pop(key, None)
        state["_update_check"] = None  # transient: the last restore's gradient check
        state["_skipped_updates"], state["_device_skips"] = self.skipped_updates, device_check.SkipCounter()
        # the base optimizer pickles its groups and state only: carry what this wrapper changed on it
        record = self.base_optimizer.__dict__.get(_WRAPPING_ATTR)
        state["_base_before_wrapping"] = record.before if record is not None else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {"_own_call": False, "_extra_before_load": None, "_settings_before_load": [], "_update_check": None,
                 "_skipped_updates": state.pop("skipped_updates", 0), "_device_skips": device_check.SkipCounter(),
                 **state}  # older pickles
        before = state.pop("_base_before_wrapping", None)
        self.__dict__.update(state)
        self._plans = perturbation.AscentPlans()
        record = _Wrapping.of(self.base_optimizer)
        if before is not None:
            record.before = before
        record.own_loading(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rho={self.defaults['rho']}, adaptive={self.defaults['adaptive']}, base={self.base_optimizer!r})"


class _Wrapping:
    """What a SAM wrapper changed on its base optimizer: the wrapper-owned entries of each param group as they
    were before (``before``, absent keys left out), the keys the wrapper owns, and its load hooks on the base.

    A later wrapper over the same instance (a method switched mid-run, a notebook cell run again) first puts
    those entries back (:func:`_undo_earlier_wrapper`), so it starts from the user's groups, not from the earlier
    wrapper's defaults (which it could not tell from per-group settings, and periodic's ρ scaling would compound).
    """

    def __init__(self, before: list[dict[str, Any]]) -> None:
        self.before = before
        self.owner: weakref.ref[SAM] = lambda: None  # the wrapper whose hooks these are
        self.keys: tuple[str, ...] = ()
        self.hooks: list[RemovableHandle] = []

    @classmethod
    def of(cls, base: Optimizer) -> _Wrapping:
        """The record on ``base``; a new one (the groups' entries as they are now) where none is there yet."""
        record = base.__dict__.get(_WRAPPING_ATTR)
        if record is None:
            record = cls([_owned_entries(group) for group in base.param_groups])
            setattr(base, _WRAPPING_ATTR, record)
        return record

    def own_loading(self, wrapper: SAM) -> None:
        """Make ``wrapper`` (held weakly) the owner of the record: its keys are the ones a later wrapper puts
        back, and every save and load of the base optimizer's state goes through it, so its checks, kept
        settings, defaults and the method's own state apply also where a loop saves or loads the base itself
        (``accelerator.save_state``/``load_state``)."""
        for handle in self.hooks:
            handle.remove()
        self.keys = (*wrapper._group_keys, *wrapper._bookkeeping_keys)
        reference = self.owner = weakref.ref(wrapper)

        def acting() -> SAM | None:
            owner = reference()
            return owner if owner is not None and not owner._own_call else None

        def after_state_dict(_base: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
            owner = acting()
            return owner._with_extra_state(state_dict) if owner is not None else None

        def before_load(_base: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
            owner = acting()
            return owner._before_base_load(state_dict) if owner is not None else None

        def after_load(_base: Optimizer) -> None:
            owner = acting()
            if owner is not None:
                owner._after_base_load()

        base = wrapper.base_optimizer
        self.hooks = [base.register_state_dict_post_hook(after_state_dict),
                      base.register_load_state_dict_pre_hook(before_load),
                      base.register_load_state_dict_post_hook(after_load)]


def _owned_entries(group: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``group`` that any SAM wrapper could own (every method's group keys)."""
    owned = _all_owned_keys()
    return {key: value for key, value in group.items() if key in owned}


def _all_owned_keys() -> frozenset[str]:
    classes, keys = [SAM], set()
    while classes:
        cls = classes.pop()
        keys.update(cls._group_keys, cls._bookkeeping_keys)
        classes.extend(cls.__subclasses__())
    return frozenset(keys)


def _undo_earlier_wrapper(base: Optimizer) -> None:
    """Put back the group entries an earlier SAM wrapper of ``base`` wrote (see :class:`_Wrapping`); drop its
    hooks and its record. A no-op for an instance no wrapper has held."""
    record = base.__dict__.pop(_WRAPPING_ATTR, None)
    if record is None:
        return
    for handle in record.hooks:
        handle.remove()
    for group, before in zip(base.param_groups, record.before):
        for key in record.keys:
            if key in before:
                group[key] = before[key]
            else:
                group.pop(key, None)


def was_wrapped(base: Optimizer) -> bool:
    """Whether a SAM wrapper has held ``base`` (it leaves a record on the instance, see :class:`_Wrapping`)."""
    return base.__dict__.get(_WRAPPING_ATTR) is not None


def snapshot_wrapping(base: Optimizer) -> Callable[[], None]:
    """A function that puts ``base`` back as it is now: its groups' entries, the wrapper record and the hooks of
    the wrapper that holds it. For a new wrapper that is refused (during or after its construction): the
    instance and an earlier wrapper then go on as if it had never been built."""
    entries = [dict(group) for group in base.param_groups]
    record = base.__dict__.get(_WRAPPING_ATTR)
    owner = record.owner() if record is not None else None

    def restore() -> None:
        current = base.__dict__.get(_WRAPPING_ATTR)
        if current is not None and current is not record:
            for handle in current.hooks:
                handle.remove()
        for group, saved in zip(base.param_groups, entries):
            group.clear()
            group.update(saved)
        if record is None:
            base.__dict__.pop(_WRAPPING_ATTR, None)
            return
        setattr(base, _WRAPPING_ATTR, record)
        if owner is not None:
            record.own_loading(owner)

    return restore


def _plainly_valid(group: dict[str, Any]) -> bool:
    """The common case of a group's SAM settings, checked in a few comparisons: float ρ and η in [0, inf), a bool
    adaptive (anything else goes through the full check, which names what is wrong)."""
    rho, eta, adaptive = group.get("rho"), group.get("eta"), group.get("adaptive")
    return (type(rho) is float and 0.0 <= rho < math.inf and type(eta) is float and 0.0 <= eta < math.inf
            and (adaptive is True or adaptive is False))


def _dense_real(grad: Tensor) -> Tensor:
    """The elements of a gradient as a dense real tensor with its L2 norm and finiteness: the stored values of a
    sparse (COO) one (coalesced, so duplicates add up first), a complex one viewed as (real, imaginary) pairs. Only ρ = 0
    groups hold such gradients; the update check reads them."""
    if grad.is_sparse:
        grad = grad.coalesce().values()
    return torch.view_as_real(grad) if grad.is_complex() else grad


def _tensor_of(param: Any) -> Any:
    """The tensor of a ``(name, tensor)`` pair (torch optimizers take named parameters), else ``param``."""
    return param[1] if isinstance(param, tuple) and len(param) == 2 and isinstance(param[0], str) else param


def _check_no_duplicates(params: list[Any]) -> None:
    """Refuse a tensor given twice (torch only warns): the ascent would count and move it twice."""
    seen: set[int] = set()
    for index, param in enumerate(map(_tensor_of, params)):
        if id(param) in seen:
            raise ValueError(f"parameter {index} (shape {tuple(getattr(param, 'shape', ()))}) is given twice; the "
                             "ascent would count and perturb it twice: pass each tensor once")
        seen.add(id(param))


def _listed(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` (the caller's own dict, as torch.optim keeps it) with its ``params`` made a list (torch also takes
    one tensor or a generator)."""
    params = group["params"]
    group["params"] = [params] if isinstance(params, Tensor) else list(params)
    return group


def _equal(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # tensors of several elements, incomparable objects
        return False


def _in_original_order(
    groups: list[perturbation.AscentGroup], per_group: list[list[Tensor]], length: int
) -> list[Tensor]:
    """Flatten per-group lists back into the order of the tensors the groups were split from."""
    if len(groups) == 1:
        return per_group[0]
    flat: list[Tensor] = [None] * length  # type: ignore[list-item]
    for group, tensors in zip(groups, per_group, strict=True):
        for index, tensor in zip(group.indices, tensors, strict=True):
            flat[index] = tensor
    return flat


class ASAM(SAM):
    """Adaptive SAM (Kwon et al. 2021): ``SAM(..., adaptive=True)`` with the ASAM default ρ = 0.5.

    ρ is larger than SAM's because the ascent is measured in the scale-invariant metric T⁻¹; the useful
    range reported for ASAM is 0.5–2.0.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.5,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **base_kwargs)


def _register() -> None:
    from arrcoc_sam.sam.registry import register_method

    register_method("sam", SAM)
    register_method("asam", ASAM)


_register()
