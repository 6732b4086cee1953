"""Momentum-SAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead", 2024)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from arrcoc_sam.sam.variants._base import VariantSAM

__all__ = ["MomentumSAM"]

# Where torch's optimizers keep the running mean of the gradients (SGD with momentum; Adam, AdamW, NAdam, …).
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")
# torch optimizers that keep no such mean, whatever their settings.
_WITHOUT_MOMENTUM = (torch.optim.Adagrad, torch.optim.Adafactor, torch.optim.ASGD, torch.optim.Rprop)


class MomentumSAM(VariantSAM):
    """Perturb against the base optimizer's momentum before the forward pass: one pass per step.

    With m the base optimizer's momentum (SGD's ``momentum_buffer`` or Adam/AdamW's first moment
    ``exp_avg``, both running means of +gradients), as in Becker et al.'s Algorithm 1::

        ε = −ρ m / ‖m‖  (global norm over the perturbed tensors; −ρ T²m/‖Tm‖ with ``adaptive=True``)
        g = ∇L(w + ε)  — the window's only forward+backward pass(es)
        w = base_step(w, g) after restoring w by copy

    −m is the direction the optimizer has been descending: w + ε lies ahead on its own trajectory, where
    Nesterov momentum evaluates its gradient, but at the fixed radius ρ instead of an lr-sized step. That is
    the sign of the paper's Algorithm 1; it is not SAM's direction (+g) with g swapped for m. RMSprop with
    momentum keeps the *preconditioned* step (μ·buf + g/√v) in its ``momentum_buffer``; msam then moves against
    that, the direction RMSprop descends, rather than against a plain mean of gradients.

    ``before_first_pass`` perturbs and ``after_first_pass`` restores, so outside an accumulation window
    (evaluation, checkpointing, logging) the weights are always the clean ones; :meth:`eval` restores and
    :meth:`train` re-applies ε if called inside a window. The first step (no momentum yet) is a plain step.

    Cost: one forward+backward pass per step; no memory beyond SAM's backup (the momentum already exists).

    Args:
        rho, adaptive, eta, base_kwargs: as for :class:`~arrcoc_sam.sam.optimizer.SAM` (the paper tunes ρ
            larger than SAM's, since ‖m‖ carries no batch noise).
    """

    _direction_sign = -1.0
    _ascent_follows_maximize = False  # a maximising optimizer's momentum already averages −∇loss

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        self._suspended = False
        # No second pass, so the integrations never report SAM's pass-2 statistics: skip their reductions.
        self.track_stats = False

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        """SAM's checks, and a momentum to perturb along for ρ > 0 (a new group's own, else the base default): not
        one of torch's optimizers that keep none (Adagrad, Adafactor, ASGD, Rprop)."""
        super()._check_group(group, where)
        if group["rho"] > 0 and isinstance(self.base_optimizer, _WITHOUT_MOMENTUM):
            raise ValueError(
                f"{where}msam takes its perturbation from the base optimizer's momentum, but "
                f"{type(self.base_optimizer).__name__} keeps none; use SGD with momentum > 0 or an Adam-family "
                "optimizer (whose first moment msam uses)"
            )
        momentum = group.get("momentum", self.base_optimizer.defaults.get("momentum"))
        if group["rho"] > 0 and "beta1" in group and group["beta1"] is None:
            raise ValueError(
                f"{where}msam takes its perturbation from the first moment, but the base optimizer "
                f"{type(self.base_optimizer).__name__} runs with beta1=None and keeps none; set beta1 (e.g. 0.9) "
                "or use SGD with momentum or an Adam-family optimizer"
            )
        if group["rho"] > 0 and momentum is not None and not momentum and "betas" not in group:
            raise ValueError(
                f"{where}msam takes its perturbation from the momentum buffer, but the base optimizer "
                f"{type(self.base_optimizer).__name__} runs with momentum=0; set momentum > 0 (with the Trainer: "
                "--optim sgd --optim_args momentum=0.9, or an Adam-family --optim, whose first moment msam uses)"
            )

    @property
    def needs_window_hooks(self) -> bool:
        return True

    @property
    def passes_per_step(self) -> float:
        return 1.0

    def ascent_this_step(self) -> bool:
        return False

    def before_first_pass(self) -> None:
        super().before_first_pass()
        self.abort_perturbation()  # a window that raised before after_first_pass may have left ε applied
        self._suspended = False
        self.perturb()

    def after_first_pass(self) -> None:
        super().after_first_pass()
        self.restore()

    def _snapshot_running_stats(self) -> None:
        """Nothing to keep: msam's one pass per step runs at w + ε, and it is the pass the running statistics of
        :meth:`hold_running_stats`'s model follow (copying them back at :meth:`restore` would freeze them)."""

    def _missing_momentum(self, state: dict[str, Any]) -> TypeError:
        return TypeError(
            f"msam found no momentum in the state of {type(self.base_optimizer).__name__} (keys "
            f"{sorted(state)}); it needs SGD with momentum > 0 or an Adam-family optimizer (exp_avg)"
        )

    def _ascent_directions(self) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
        """What :meth:`perturb` moves against (w ← w − ρ m/‖m‖): the tensors of ρ > 0 groups that require grad
        and have a momentum, their momenta and their groups; none before the first step. (A tensor frozen
        after some steps keeps a momentum its base optimizer no longer updates: it is not perturbed, as SAM
        perturbs no tensor without gradient.)"""
        params: list[Tensor] = []
        momenta: list[Tensor] = []
        groups: list[dict[str, Any]] = []
        states = self.state
        first_key, second_key = _MOMENTUM_KEYS
        for group in self.param_groups:
            if group["rho"] == 0:
                continue
            for p in group["params"]:
                state = states.get(p)
                if not state or not p.requires_grad:
                    continue
                momentum = state.get(first_key)
                if momentum is None:
                    momentum = state.get(second_key)
                    if momentum is None:
                        raise self._missing_momentum(state)
                params.append(p)
                momenta.append(momentum)
            groups.extend([group] * (len(params) - len(groups)))
        return params, momenta, groups

    def eval(self) -> None:
        """Put the clean weights back if called inside a window, then the base optimizer's ``eval()``."""
        if self.is_perturbed:
            self.restore()
            self._suspended = True
        super().eval()

    def train(self) -> None:
        """The base optimizer's ``train()``, then ε again if :meth:`eval` took it off inside a window (the
        momentum has not moved since)."""
        super().train()
        if self._suspended:
            self._suspended = False
            self.perturb()
