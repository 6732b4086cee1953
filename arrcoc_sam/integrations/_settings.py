"""The sharpness-aware settings shared by SAMTrainingArguments, the launcher and the Accelerate helper.

A run's SAM configuration is a method name from :func:`arrcoc_sam.sam.registry.available_methods` plus
knobs for that method's builder. ``rho``, ``eta`` and ``interval`` are forwarded only when set (``None``
keeps the method's own default: ρ = 0.05 for SAM, 0.5 for ASAM); any other knob travels in ``extra``,
parsed from ``--sam_args "name=value,name=value"``.
"""

from __future__ import annotations

import ast
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from arrcoc_sam.sam.optimizer import is_real, snapshot_wrapping
from arrcoc_sam.sam.registry import available_methods, build_sam_optimizer, is_builtin_method, method_knobs
from arrcoc_sam.sam.sharding import check_fsdp_run

__all__ = [
    "SCOPES",
    "SAMSettings",
    "check_knob_values",
    "check_launched_processes_join",
    "check_run_compatible",
    "check_static_graph",
    "launched_processes",
    "deepspeed_zero_stage",
    "fsdp_version_of",
    "parse_sam_args",
]

SCOPES = ("global", "per_device", "microbatch")
# HF `--optim` values whose update happens inside backward (no p.grad survives for an ascent).
_FUSED_BACKWARD_OPTIMS = ("lomo", "adalomo")


def parse_sam_args(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """``"alpha=0.7,k=5,name=x"`` -> ``{"alpha": 0.7, "k": 5, "name": "x"}`` (values are Python literals or strings).
    A dict (``SAMTrainingArguments(sam_args={"alpha": 0.7})`` in code) is taken as it is, and so is a JSON object
    (``'{"alpha": 0.7}'``: how a recipe's ``sam_args:`` mapping reaches the command line)."""
    if isinstance(text, str) and text.lstrip().startswith("{"):
        try:
            text = json.loads(text, object_pairs_hook=_without_repeated_keys)
        except json.JSONDecodeError as error:
            raise ValueError(f"sam_args looks like a JSON object but is not valid JSON ({error}): {text!r}") from error
    if isinstance(text, dict):
        if not all(isinstance(key, str) and key.isidentifier() for key in text):
            raise ValueError(f"sam_args keys must be knob names, got {sorted(map(repr, text))}")
        return dict(text)
    if not text:
        return {}
    if not isinstance(text, str):
        raise ValueError(f"sam_args must be a string 'name=value,name=value' or a dict, got {text!r}")
    knobs: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"sam_args must look like 'name=value,name=value', got the item {item!r} in {text!r}")
        if key in knobs:
            raise ValueError(f"sam_args gives {key} twice, in {text!r}")
        try:
            knobs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            knobs[key] = raw
    return knobs


def _without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; ValueError for a key given twice (json keeps the last one silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"sam_args gives {key} twice (in a JSON object, whose last value would silently win)")
        seen[key] = value
    return seen


# SAMSettings' fields as the command line names them -> as AcceleratedSAM's keyword arguments do, where they differ.
_ACCELERATED_NAMES = {"optimizer": "method", "sam_scope": "scope", "sam_eta": "eta", "sam_interval": "interval",
                      "sam_statistics": "statistics"}


def _accelerated_name(flag: str) -> str:
    """`` (AcceleratedSAM's NAME=)`` for a flag that AcceleratedSAM calls otherwise, for the end of a message."""
    name = _ACCELERATED_NAMES.get(flag)
    return f" (AcceleratedSAM's {name}=)" if name else ""


@dataclass(frozen=True)
class SAMSettings:
    """Which sharpness-aware method to run, with which knobs, over which gradient.

    Attributes:
        method: a registered method name, or ``"none"`` (stock training).
        rho: neighbourhood radius ρ ≥ 0; ``None`` keeps the method's default.
        eta: ASAM's η ≥ 0; ``None`` keeps the method's default.
        scope: ``global`` (ε from the all-reduced gradient), ``per_device`` (ε from each rank's own
            gradient; the first pass runs under ``no_sync``) or ``microbatch`` (ε per micro-batch, mSAM).
        interval: ascent every ``interval`` optimizer steps, for methods that take it; ``None``: default.
        extra: further knobs for the method's builder.
        statistics: whether the optimizer computes the pass-2 statistics ‖g_SAM‖ and cos(ε, g_SAM) each
            step (three reductions over the parameters; ``False`` sets its ``track_stats`` off).
    """

    method: str = "sam"
    rho: float | None = None
    eta: float | None = None
    scope: str = "global"
    interval: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    statistics: bool = True

    def __post_init__(self) -> None:
        # Each message names the command-line flag and, where it is called otherwise, AcceleratedSAM's argument.
        for name, value in (("rho", self.rho), ("sam_eta", self.eta)):
            if value is not None and not is_real(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r} ({type(value).__name__})"
                                 + _accelerated_name(name))
        if self.interval is not None and (isinstance(self.interval, bool) or not isinstance(self.interval, numbers.Integral)):
            raise ValueError(f"sam_interval must be an integer >= 1, got {self.interval!r} "
                             f"({type(self.interval).__name__}){_accelerated_name('sam_interval')}")
        if not isinstance(self.statistics, bool):
            raise ValueError(f"sam_statistics must be True or False, got {self.statistics!r}"
                             + _accelerated_name("sam_statistics"))
        methods = available_methods()
        if self.method not in methods:
            raise ValueError(f"optimizer must be one of {', '.join(methods)}; got {self.method!r}"
                             + _accelerated_name("optimizer"))
        if self.scope not in SCOPES:
            raise ValueError(f"sam_scope must be one of {', '.join(SCOPES)}; got {self.scope!r}"
                             + _accelerated_name("sam_scope"))
        for name, value in (("rho", self.rho), ("sam_eta", self.eta)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}" + _accelerated_name(name))
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"sam_interval must be >= 1, got {self.interval!r}" + _accelerated_name("sam_interval"))
        self._check_knobs_taken()
        for key, flag, value in self._flag_knobs():
            if value is not None and key in self.extra:
                raise ValueError(f"{key} is given twice, as {flag}={value!r} and in sam_args as {key}="
                                 f"{self.extra[key]!r}; give it once")

    def _flag_knobs(self) -> tuple[tuple[str, str, Any], ...]:
        """(knob, command-line flag, value) of the knobs that have flags of their own."""
        return ("rho", "rho", self.rho), ("eta", "sam_eta", self.eta), ("interval", "sam_interval", self.interval)

    def _check_knobs_taken(self) -> None:
        """ValueError naming the knobs (``sam_args`` keys, ``--rho``, ``--sam_eta``, ``--sam_interval``) the method
        does not take, at parse time instead of when the Trainer builds its optimizer."""
        if not self.enabled:
            given = [f"--{flag}" for _, flag, value in self._flag_knobs() if value is not None]
            given += ["--sam_scope"] * (self.scope != "global") + ["--sam_statistics"] * (not self.statistics)
            given += [f"sam_args {key}" for key in sorted(self.extra)]
            if given:  # e.g. a SAM recipe run as its baseline with --optimizer none: allowed, but said
                warnings.warn(f"--optimizer none runs stock training: ignoring {', '.join(given)}", stacklevel=2)
            return
        accepted = method_knobs(self.method)
        if accepted is None:
            return
        unknown = sorted(set(self.extra) - accepted) + [
            key for key, _, value in self._flag_knobs() if value is not None and key not in accepted
        ]
        if unknown:
            raise ValueError(
                f"--optimizer {self.method} does not take {', '.join(unknown)} (it takes {', '.join(sorted(accepted))}); "
                "drop the others from sam_args / sam_interval / sam_eta (AcceleratedSAM's keyword arguments)"
            )

    @property
    def enabled(self) -> bool:
        """False for ``method="none"``: the run is stock training."""
        return self.method != "none"

    def knobs(self) -> dict[str, Any]:
        """The keyword arguments for the method's builder: the set ones among rho/eta/interval, then ``extra``."""
        named = {"rho": self.rho, "eta": self.eta, "interval": self.interval}
        return {**{k: v for k, v in named.items() if v is not None}, **self.extra}

    def build(self, base_optimizer: Optimizer) -> Optimizer:
        """Wrap an existing optimizer instance in the configured sharpness-aware method."""
        params = [p for group in base_optimizer.param_groups for p in group["params"]]
        knobs = self.knobs()
        restore = snapshot_wrapping(base_optimizer)  # a refusal below leaves the instance as it was
        try:
            optimizer = build_sam_optimizer(self.method, params, base_optimizer, **knobs)
        except TypeError as error:  # a builder whose signature _check_knobs_taken could not read
            raise ValueError(f"--optimizer {self.method} refused the knobs {sorted(knobs)}: {error}") from error
        try:
            self._check_scope_supported(optimizer)
        except ValueError:
            restore()
            raise
        if not self.statistics:
            optimizer.track_stats = False
        return optimizer

    def _check_scope_supported(self, optimizer: Optimizer) -> None:
        if self.scope == "microbatch" and not getattr(optimizer, "supports_microbatch_scope", True):
            raise ValueError(
                f"--optimizer {self.method} (AcceleratedSAM's method=) combines each step's clean and perturbed "
                "gradients (or keeps an average of them) over the whole window, which sam_scope=microbatch "
                "(AcceleratedSAM's scope=) splits into per-micro-batch ascents; use sam_scope=global"
            )
        if self.scope == "per_device" and not getattr(optimizer, "supports_per_device_scope", True):
            raise ValueError(
                f"--optimizer {self.method} (AcceleratedSAM's method=) builds its update or its kept state from each "
                "step's clean gradient, which sam_scope=per_device (AcceleratedSAM's scope=) leaves local to each "
                "rank: the replicas would drift apart (or a checkpoint would keep rank 0's state only); use "
                "sam_scope=global"
            )


# The stand-in optimizer's learning rate: large, so a knob bounded by the run's peak learning rate (GSAM's lr_min,
# with lr_max defaulting to that peak) is not refused for the stand-in's sake.
_STAND_IN_LR = 1e30


def check_knob_values(settings: SAMSettings) -> None:
    """Refuse knob values the method's constructor would refuse (``--sam_args alpha=-1``, ESAM's ``gamma=0``,
    GSAM's ``rho_min`` above ρ, a method that cannot serve ``sam_scope=microbatch``) when the arguments are parsed,
    instead of when ``train()`` builds the optimizer after loading the model and data. Builds the method once
    around SGD with momentum over a one-element stand-in parameter; what depends on the run's own ``--optim``
    (msam's momentum) is still checked when the optimizer is built. Methods a user registered are left to that
    build too (they may need another base optimizer than the stand-in)."""
    if not settings.enabled or not is_builtin_method(settings.method):
        return
    stand_in = torch.nn.Parameter(torch.zeros(1))
    try:
        settings.build(torch.optim.SGD([stand_in], lr=_STAND_IN_LR, momentum=0.9))
    except (TypeError, ValueError) as error:
        knobs = ", ".join(f"{key}={value!r}" for key, value in settings.knobs().items())
        raise ValueError(f"--optimizer {settings.method} ({knobs or 'its defaults'}, sam_scope={settings.scope}): "
                         f"{error}") from error


def _load_config(config: dict | str) -> dict:
    if isinstance(config, str):
        with open(config, encoding="utf-8") as handle:
            return json.load(handle)
    return config


def deepspeed_zero_stage(config: dict | str | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config (dict or JSON file path; 0 when it names none), or None without DeepSpeed."""
    if not config:
        return None
    stage = _load_config(config).get("zero_optimization", {}).get("stage", 0)
    return stage if isinstance(stage, int) else 0


def fsdp_version_of(fsdp: Any, fsdp_config: dict | str | None) -> int | None:
    """The FSDP version a ``TrainingArguments`` run will use (transformers' default: 2), or None without FSDP."""
    if not fsdp:
        return None
    return int(_load_config(fsdp_config).get("version", 2)) if fsdp_config else 2


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 outside ``torchrun``/``accelerate launch``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launched_processes_join(num_processes: int, seen_as: str, fix: str) -> None:
    """Refuse a launch of several processes (``WORLD_SIZE`` > 1) that the run sees as ``num_processes`` == 1:
    each process would train its own copy of the model (and write to the same output). On a machine without
    GPUs this is what ``torchrun``/``accelerate launch`` give unless the run is told to use the CPU.

    Args:
        num_processes: how many processes the run's process group holds.
        seen_as: how the run sees itself, for the message (e.g. the Trainer's parallel mode).
        fix: what to pass so the processes train together, for the message.
    """
    launched = launched_processes()
    if launched > 1 and num_processes == 1:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but each trains on its own ({seen_as}, "
            f"1 process), so they would train separate copies into the same output; without GPUs {fix} so "
            "they train one model together"
        )


def check_run_compatible(
    settings: SAMSettings,
    *,
    gradient_accumulation_steps: int,
    optim: Any,
    zero_stage: int | None,
    fsdp_version: int | None,
    ddp_static_graph: bool | None = None,
) -> None:
    """Refuse runs where the ascent cannot be computed correctly, naming the argument to change.

    Raises:
        ValueError: LOMO/AdaLomo or a layer-wise ``--optim`` (the update happens inside backward),
            DeepSpeed at any ZeRO stage (Accelerate steps its engine inside backward; ZeRO >= 2 also keeps
            gradients outside ``p.grad``), FSDP1 or a non-global scope under FSDP2
            (:func:`arrcoc_sam.sam.sharding.check_fsdp_run`; ``fsdp_version`` is None without FSDP), or
            ``sam_scope=microbatch`` with ``gradient_accumulation_steps=1``, or DDP with ``static_graph``
            where a pass must run unsynchronised (:func:`check_static_graph`).
    """
    if not settings.enabled:
        return
    optim_name = str(getattr(optim, "value", optim))
    if optim_name in _FUSED_BACKWARD_OPTIMS or optim_name.endswith("_layerwise"):
        raise ValueError(
            f"--optim {optim_name} updates the weights inside backward, so no gradient is left for the "
            f"sharpness-aware ascent; choose another --optim (e.g. adamw_torch) or --optimizer none"
        )
    if zero_stage is not None:
        raise ValueError(
            f"DeepSpeed (ZeRO stage {zero_stage}) cannot run a sharpness-aware step: Accelerate's DeepSpeed "
            "backward steps the engine (optimizer step, then zero_grad) at the end of every accumulation window, "
            "before the ascent could read the gradient, and ZeRO >= 2 keeps gradients outside p.grad as well; "
            "use plain DDP, FSDP2, or --optimizer none"
        )
    check_fsdp_run(settings.scope, fsdp_version)
    if settings.scope == "microbatch" and gradient_accumulation_steps == 1:
        raise ValueError(
            "sam_scope=microbatch takes one ascent per micro-batch of an accumulation window, but "
            "gradient_accumulation_steps=1 (then it is plain SAM): raise gradient_accumulation_steps or use sam_scope=global"
        )
    check_static_graph(ddp_static_graph, settings.scope, gradient_accumulation_steps)


def check_static_graph(static_graph: bool | None, scope: str, gradient_accumulation_steps: int) -> None:
    """Refuse DDP with ``static_graph=True`` where the window needs a backward pass that does not synchronise.

    Such a DDP cannot run one: under ``no_sync`` torch fails with an internal assert
    (``expect_autograd_hooks_``), and a backward through the unwrapped module leaves wrong gradients.
    Gradient accumulation needs one for every micro-batch but the last (plain training fails the same way),
    and the ``per_device``/``microbatch`` scopes for their rank-local pass 1. ``global`` scope with
    ``gradient_accumulation_steps=1`` synchronises every pass and runs under a static graph (ESAM's tensor SWP
    then keeps every pass-1 gradient, see :class:`~arrcoc_sam.integrations._window.SAMWindow`).
    """
    if not static_graph:
        return
    needs_local_pass = []
    if gradient_accumulation_steps > 1:
        needs_local_pass.append(f"gradient_accumulation_steps={gradient_accumulation_steps}")
    if scope != "global":
        needs_local_pass.append(f"sam_scope={scope}")
    if needs_local_pass:
        raise ValueError(
            f"DDP with static_graph=True cannot run the unsynchronised backward passes that "
            f"{' and '.join(needs_local_pass)} need{'' if len(needs_local_pass) > 1 else 's'} (under no_sync torch "
            "fails with an internal assert); set "
            "ddp_static_graph=False (DistributedDataParallelKwargs(static_graph=False)), or use "
            "gradient_accumulation_steps=1 with sam_scope=global"
        )
