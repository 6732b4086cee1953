"""SAMTrainer and SAMTrainingArguments: sharpness-aware training inside the stock ``transformers.Trainer`` loop.

Only ``training_step``, ``create_optimizer`` and ``log`` change. Micro-batches of an accumulation window
run the stock ``training_step`` unchanged (pass 1, the logged loss); on the last one
(``accelerator.sync_gradients``) the optimizer takes its ascent from the accumulated gradient, every
micro-batch of the window is replayed at w + ε with its own pass-1 ``num_items_in_batch`` and accumulation
count (``no_sync`` on all but the last), and the clean weights are copied back in ``finally``. The Trainer's own clip → optimizer
step (with its GradScaler) → scheduler path then runs once, on the sharpness-aware gradient. Because both
passes go through the stock ``training_step``, every loss normalisation the Trainer applies (including
transformers issue 47688's scaling by GA steps / world size) applies to both passes alike.

ESAM's data selection (``--optimizer esam`` with ``gamma < 1``) needs per-example losses: by default
:func:`~arrcoc_sam.sam.variants.esam.per_example_loss` on the model outputs' ``logits`` and the batch's
``labels``, or ``SAMTrainer(per_example_loss_fn=...)``. Pass 1 stays the stock ``training_step``; the replay
runs ``compute_loss`` at w + ε on the window under ``no_grad``, then forward + backward on the chosen
examples only, with ESAM's mean of their losses; with the stock (token-mean) loss each is weighted by its
labelled tokens, so choosing every example trains on the stock loss (see ``arrcoc_sam.integrations._window``).

The sharpness-aware optimizer wraps the base optimizer that ``--optim`` (or ``optimizers=``) builds; its
``state_dict`` is the base optimizer's, so checkpoints and ``resume_from_checkpoint`` work unchanged.
Methods are driven only through their hooks (``before_first_pass``, ``ascent_this_step``,
``after_first_pass``, ``perturb``, ``restore``), so every method registered in
:mod:`arrcoc_sam.sam.registry` works with ``--optimizer NAME``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from arrcoc_sam.curvature._data import shifts_labels
from arrcoc_sam.integrations._settings import (
    SCOPES,
    SAMSettings,
    check_knob_values,
    check_launched_processes_join,
    check_run_compatible,
    deepspeed_zero_stage,
    fsdp_version_of,
    launched_processes,
    parse_sam_args,
)
from arrcoc_sam.integrations._window import ExampleLosses, SAMWindow, shallow_copy
from arrcoc_sam.sam.optimizer import SAM
from arrcoc_sam.sam.sharding import is_sharded
from arrcoc_sam.sam.variants.esam import label_counts, per_example_loss

__all__ = [
    "SAMArguments",
    "SAMSeq2SeqTrainer",
    "SAMSeq2SeqTrainingArguments",
    "SAMTrainer",
    "SAMTrainingArguments",
    "patched_trainer",
]

# The stock implementations, captured before any patching; SAM code calls these, never super(), so the
# same functions serve SAMTrainer and a patched transformers.Trainer.
_STOCK_TRAINING_STEP = Trainer.training_step
_STOCK_CREATE_OPTIMIZER = Trainer.create_optimizer
_STOCK_LOG = Trainer.log
_PATCHED_METHODS = ("training_step", "create_optimizer", "log")
_launch_settings: SAMSettings | None = None
_launch_explicit = False  # whether _launch_settings came from flags given to the launcher (not its defaults)

logger = logging.getLogger(__name__)


@dataclass
class SAMArguments:
    """The sharpness-aware flags (also parsed alone by ``python -m arrcoc_sam.launch``)."""

    optimizer: str = field(
        default="sam",
        metadata={"help": "Sharpness-aware method: none, sam, asam, periodic, looksam, esam, gsam, fsam (Friendly-SAM), "
                  "msam (Momentum-SAM), or any method registered with arrcoc_sam.sam.register_method. "
                  "HF's --optim stays the base optimizer."},
    )
    rho: float | None = field(
        default=None, metadata={"help": "Neighbourhood radius rho (default: the method's, 0.05 SAM, 0.5 ASAM)."}
    )
    sam_eta: float | None = field(default=None, metadata={"help": "ASAM's eta (default 0.01)."})
    sam_scope: str = field(
        default="global",
        metadata={"help": "Gradient the ascent comes from: global (all-reduced), per_device (own shard, "
                  "no_sync) or microbatch (mSAM, one ascent per micro-batch).", "choices": list(SCOPES)},
    )
    sam_interval: int | None = field(
        default=None, metadata={"help": "Ascent every N optimizer steps, for methods that take it."}
    )
    sam_args: str | None = field(
        default=None,
        metadata={"help": "Further knobs for the method's builder, 'name=value,name=value' (e.g. 'alpha=0.7')."},
    )
    sam_statistics: bool = field(
        default=True,
        metadata={"help": "Compute and log sam/grad_norm_perturbed and sam/grad_cosine (three reductions over "
                  "the parameters per step), and skip a step whose sharpness-aware gradient is non-finite; false "
                  "skips both."},
    )

    def sam_settings(self) -> SAMSettings:
        """The validated settings; raises ValueError naming the bad flag."""
        return SAMSettings(
            method=self.optimizer,
            rho=self.rho,
            eta=self.sam_eta,
            scope=self.sam_scope,
            interval=self.sam_interval,
            extra=parse_sam_args(self.sam_args),
            statistics=self.sam_statistics,
        )


@dataclass
class SAMTrainingArguments(TrainingArguments, SAMArguments):
    """``TrainingArguments`` plus ``--optimizer``, ``--rho``, ``--sam_eta``, ``--sam_scope``, ``--sam_interval``,
    ``--sam_args`` (knobs of variants, forwarded to the registry builder) and ``--sam_statistics``. Parsed by
    ``HfArgumentParser``.

    Refuses (ValueError) unknown methods and runs SAM cannot serve: LOMO/AdaLomo/layer-wise ``--optim``,
    DeepSpeed (any ZeRO stage), FSDP1 or a non-global scope under FSDP2, ``sam_scope=microbatch`` with
    ``gradient_accumulation_steps=1``, and, in a launch of several processes, ``--ddp_static_graph`` with
    accumulation or a non-global scope.
    """

    def __post_init__(self) -> None:
        settings = self.sam_settings()
        check_knob_values(settings)
        _check_momentum_for_msam(settings, self.optim, self.optim_args)
        check_run_compatible(
            settings,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            optim=self.optim,
            zero_stage=deepspeed_zero_stage(self.deepspeed),
            fsdp_version=fsdp_version_of(self.fsdp, self.fsdp_config),
            # only a launch of several processes wraps the model in DDP (the window checks the model itself too)
            ddp_static_graph=bool(getattr(self, "ddp_static_graph", None)) and launched_processes() > 1,
        )
        super().__post_init__()


# HF --optim values whose optimizer keeps no running mean of the gradients unless --optim_args asks for one
# (None: no --optim_args can; transformers builds its Adafactor without passing --optim_args on)
_WITHOUT_MOMENTUM = {"sgd": "momentum", "rmsprop": "momentum", "adagrad": None, "adafactor": None}


def _check_momentum_for_msam(settings: SAMSettings, optim: Any, optim_args: str | None) -> None:
    """Refuse msam with an ``--optim`` that keeps no momentum for it to perturb along (SGD and RMSprop without
    ``--optim_args momentum=...``, Adafactor and Adagrad), when the arguments are parsed."""
    name = str(getattr(optim, "value", optim))
    if settings.method != "msam" or name not in _WITHOUT_MOMENTUM:
        return
    key = _WITHOUT_MOMENTUM[name]
    given = dict(item.split("=", 1) for item in (optim_args or "").replace(" ", "").split(",") if "=" in item)
    if key is not None and given.get(key) not in (None, "0", "0.0", "None"):
        return
    fix = f"--optim_args {key}=0.9" if key else "an Adam-family --optim"
    raise ValueError(f"--optimizer msam perturbs along the base optimizer's momentum, but --optim {name} keeps none "
                     f"as configured; add {fix} (or use an Adam-family --optim such as adamw_torch)")


class _SAMTrainerMethods:
    """The overrides, written against ``Trainer``'s stock functions so they can also be set on ``Trainer`` itself."""

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the base optimizer as the stock Trainer does (``--optim``), then wrap it in the chosen method."""
        optimizer = _STOCK_CREATE_OPTIMIZER(self, model)
        settings = _run_settings(self)
        if settings.method == "esam" and "seed" not in settings.extra:  # a seed sweep draws other SWP masks too
            settings = replace(settings, extra={**settings.extra, "seed": int(self.args.seed)})
        if settings.enabled and _sam_inside(optimizer) is None:
            self.optimizer = settings.build(optimizer)
            if hasattr(self.optimizer, "keep_settings_on_load"):  # on resume the run's flags win over the checkpoint's
                self.optimizer.keep_settings_on_load()
            _require_windows(self, self.optimizer)
        window = self.__dict__.get("_sam_window")
        if window is not None:  # every train() starts here: nothing of a window an earlier train() left open
            window.discard(_sam_inside(self.optimizer))
        return self.optimizer

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Stock pass 1 on this micro-batch; on the window's last one, the ascent, the replay and the restore."""
        settings = _run_settings(self)
        if not settings.enabled:
            return _STOCK_TRAINING_STEP(self, model, inputs, num_items_in_batch)
        window = self.__dict__.get("_sam_window")
        if window is None or window.accelerator is not self.accelerator or window.scope != settings.scope:
            window = self._sam_window = SAMWindow(self.accelerator, settings.scope, loop_steps_base=False,
                                                  no_sync=functools.partial(_held_reduction, self))

        # A replay at w + ε normalises each micro-batch as its pass 1 did: with its own num_items_in_batch and
        # accumulation count (the stock loop carries an unfinished window, e.g. at the end of an IterableDataset,
        # into the next one, whose count and tokens differ)
        steps = getattr(self, "current_gradient_accumulation_steps", None)

        def run_pass(batch: Any) -> torch.Tensor:
            with _accumulation_steps(self, steps):
                return _STOCK_TRAINING_STEP(self, model, shallow_copy(batch), num_items_in_batch)

        def forward(module: nn.Module, batch: Any) -> torch.Tensor:
            with _accumulation_steps(self, steps):
                inputs_ = self._prepare_inputs(shallow_copy(batch))
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(module, inputs_, num_items_in_batch=num_items_in_batch)
                return _in_training_step_units(self, loss, num_items_in_batch)

        optimizer = _sam_optimizer(self.optimizer)
        own = self.__dict__.get("_sam_per_example_loss_fn")
        per_example = own or _default_per_example_loss(self, model, optimizer)
        # the stock loss is a token mean (over the window, or over each micro-batch where the model ignores
        # num_items_in_batch: the window calibrates which): weight each example by its labelled tokens
        weights = None if own is not None or _custom_loss(self) else functools.partial(
            label_counts, shift_labels=shifts_labels(model)
        )
        last = bool(self.accelerator.sync_gradients)
        loss = window.micro_step(model, optimizer, shallow_copy(inputs), run_pass, ExampleLosses(forward, per_example, weights))
        if last:
            self._sam_windows = self.__dict__.get("_sam_windows", 0) + 1
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the ``sam/*`` averages of the logging window to the training log (all ranks call this together), and
        count (with a warning) the steps a fused base optimizer skipped on the device since the last look."""
        window = self.__dict__.get("_sam_window")
        if window is not None and "loss" in logs:
            logs = {**logs, **window.metrics.read(self.accelerator)}
            optimizer = _sam_inside(self.optimizer)
            if isinstance(optimizer, SAM):
                optimizer.skipped_updates  # noqa: B018 (reading it counts, and warns of, steps skipped on the device)
        _STOCK_LOG(self, logs, start_time)


class SAMTrainer(_SAMTrainerMethods, Trainer):
    """``transformers.Trainer`` with sharpness-aware minimisation.

    Settings come from ``args`` when it is a :class:`SAMTrainingArguments`; with plain ``TrainingArguments``
    from ``python -m arrcoc_sam.launch`` flags if launched that way, else SAM with its defaults.
    Extra log keys (averaged over the logging window, pooled over ranks): ``sam/loss_perturbed``,
    ``sam/sharpness`` (perturbed − clean loss), ``sam/grad_norm``, ``sam/grad_norm_perturbed``,
    ``sam/grad_cosine``, ``sam/rho``, ``sam/skipped_steps`` (ascents skipped in the window).

    Args:
        per_example_loss_fn: ``fn(outputs, batch) -> Tensor [B]``, the per-example losses ESAM's data
            selection ranks and trains on (keyword only; default
            :func:`~arrcoc_sam.sam.variants.esam.per_example_loss` on next-token labels for causal LMs, with
            the run's ``label_smoothing_factor``). Unused by the other methods.
        *args, **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(
        self, *args: Any, per_example_loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._sam_per_example_loss_fn = per_example_loss_fn
        _run_settings(self)


@dataclass
class SAMSeq2SeqTrainingArguments(SAMTrainingArguments, Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` (``--predict_with_generate``, ``--generation_*``) plus the flags of
    :class:`SAMTrainingArguments`, for :class:`SAMSeq2SeqTrainer`."""


class SAMSeq2SeqTrainer(SAMTrainer, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with sharpness-aware minimisation (:class:`SAMTrainer`); takes
    :class:`SAMSeq2SeqTrainingArguments`."""


def _require_windows(trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Raise at an optimizer step that no sharpness-aware window preceded: a ``training_step`` override that does
    not call ``super().training_step()`` would otherwise train with the base optimizer alone, silently."""
    stepped_after, at_step = [0], [None]

    def check(*_: Any) -> None:
        if trainer.state.global_step == at_step[0]:  # a base optimizer whose step calls its parent's: hooks run twice
            return
        windows = trainer.__dict__.get("_sam_windows", 0)
        if windows == stepped_after[0]:
            raise RuntimeError(
                f"the optimizer stepped without a sharpness-aware window: {type(trainer).__name__}.training_step "
                "does not run SAMTrainer's (call super().training_step(model, inputs, num_items_in_batch) in the "
                "override, which runs both passes), so this run would train with the base optimizer alone"
            )
        stepped_after[0], at_step[0] = windows, trainer.state.global_step

    optimizer.register_step_pre_hook(check)


@contextlib.contextmanager
def _accumulation_steps(trainer: Trainer, steps: int | None) -> Iterator[None]:
    """``trainer.current_gradient_accumulation_steps`` set to ``steps`` (unchanged for None), put back after."""
    if steps is None:
        yield
        return
    current = trainer.current_gradient_accumulation_steps
    trainer.current_gradient_accumulation_steps = steps
    try:
        yield
    finally:
        trainer.current_gradient_accumulation_steps = current


def _held_reduction(trainer: Trainer, model: nn.Module) -> contextlib.AbstractContextManager:
    """What holds back a replayed micro-batch's gradient reduction, as the stock loop holds an inner one's: the
    Trainer's own deferral for a model transformers sharded with FSDP at load time (Accelerate's ``no_sync`` does
    nothing there), else ``accelerator.no_sync``."""
    defer = getattr(trainer, "_defer_fsdp_gradient_reduction", None)
    if defer is not None and getattr(trainer, "is_distributed_loading_by_transformers", False):
        from transformers.distributed.fsdp import is_fsdp_managed_module

        if is_fsdp_managed_module(trainer.model):
            return defer()
    return trainer.accelerator.no_sync(model)


def _custom_loss(trainer: Trainer) -> bool:
    return trainer.compute_loss_func is not None or type(trainer).compute_loss is not Trainer.compute_loss


def _default_per_example_loss(trainer: Trainer, model: nn.Module, optimizer: Any) -> Callable[[Any, Any], torch.Tensor]:
    """:func:`per_example_loss` scoring examples as the stock loss does: next-token labels for causal LMs, the
    run's ``label_smoothing_factor``. Warns once where ``compute_loss`` is customised, which it cannot follow."""
    if _custom_loss(trainer) and getattr(optimizer, "selects_examples", False) and not trainer.__dict__.get("_sam_warned_loss"):
        trainer._sam_warned_loss = True
        logger.warning(
            "ESAM's data selection ranks and trains on per_example_loss (cross-entropy of logits and labels), "
            "not on the customised compute_loss / compute_loss_func of this Trainer (whose weighting pass 2 then "
            "drops): pass SAMTrainer(per_example_loss_fn=...) that computes your loss per example, or, where the "
            "Trainer is not yours to build (python -m arrcoc_sam.launch), --sam_args gamma=1 (no data selection)"
        )
    return functools.partial(
        per_example_loss, shift_labels=shifts_labels(model), label_smoothing=trainer.args.label_smoothing_factor
    )


def _in_training_step_units(trainer: Trainer, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """``compute_loss``'s value normalised as the stock ``training_step`` returns it (multi-GPU mean, GA)."""
    if trainer.args.n_gpu > 1:
        loss = loss.mean()
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    if not scaled:
        loss = loss / trainer.current_gradient_accumulation_steps
    return loss.detach()


def _settings_for(trainer: Trainer) -> SAMSettings:
    if isinstance(trainer.args, SAMArguments):
        settings = trainer.args.sam_settings()
        if _launch_settings is not None and _launch_explicit and _launch_settings != settings:
            raise ValueError(
                f"the script builds SAMTrainingArguments ({settings.method}, rho={settings.rho}) while "
                f"arrcoc_sam.launch took its own SAM flags ({_launch_settings.method}, rho={_launch_settings.rho}) "
                "off the command line, so the script never saw them: run a script that parses the SAM flags "
                "itself directly, without the launcher"
            )
        return settings
    if _launch_settings is not None:
        return _launch_settings
    return SAMSettings() if isinstance(trainer, SAMTrainer) else SAMSettings(method="none")


def _run_settings(trainer: Trainer) -> SAMSettings:
    """The trainer's settings, checked against its run once per configuration (cached on the trainer; a
    hyper-parameter search that sets ``rho`` or ``optimizer`` on ``trainer.args`` per trial gets new ones)."""
    settings = _settings_for(trainer)
    # SAMTrainingArguments checks this itself; plain TrainingArguments (the launcher, SAMTrainer(args=...)) do not
    static_graph = bool(getattr(trainer.args, "ddp_static_graph", None)) and launched_processes() > 1
    key = (settings, trainer.args.gradient_accumulation_steps, str(trainer.args.optim), static_graph)
    cached = trainer.__dict__.get("_sam_settings")
    if cached is not None and cached[0] == key:
        return cached[1]
    check_processes_train_together(trainer.args)
    zero_stage = fsdp_version = None
    if getattr(trainer, "is_deepspeed_enabled", False):
        zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
    if getattr(trainer, "is_fsdp_enabled", False):
        fsdp_version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
    elif getattr(trainer, "is_distributed_loading_by_transformers", False) and is_sharded(trainer.model.parameters()):
        fsdp_version = 2  # sharded at load time (from_pretrained(distributed_config=...)): FSDP2 / tensor parallel
    check_run_compatible(
        settings,
        gradient_accumulation_steps=trainer.args.gradient_accumulation_steps,
        optim=trainer.args.optim,
        zero_stage=zero_stage,
        fsdp_version=fsdp_version,
        ddp_static_graph=static_graph,
    )
    trainer._sam_settings = (key, settings)
    return settings


def check_processes_train_together(args: TrainingArguments) -> None:
    """:func:`~arrcoc_sam.integrations._settings.check_launched_processes_join` for a Trainer run: without
    GPUs, ``torchrun``/``accelerate launch`` need ``--use_cpu`` for the processes to form a gloo group."""
    check_launched_processes_join(
        args.world_size, f"TrainingArguments see parallel mode {args.parallel_mode.value}",
        "pass --use_cpu true (torchrun) or use_cpu: true in the accelerate config (or ACCELERATE_USE_CPU=true)",
    )


def _sam_inside(optimizer: Any) -> torch.optim.Optimizer | None:
    """The optimizer with sharpness-aware hooks in ``optimizer``'s ``.optimizer`` chain (Accelerate wrappers), if any."""
    inner = optimizer
    while inner is not None:
        if all(hasattr(inner, hook) for hook in ("perturb", "restore", "ascent_this_step")):
            return inner
        inner = getattr(inner, "optimizer", None)
    return None


def _sam_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The sharpness-aware optimizer inside Accelerate's wrapper(s)."""
    inner = _sam_inside(optimizer)
    if inner is None:
        raise TypeError(
            f"the Trainer's optimizer {type(optimizer).__name__} has no sharpness-aware hooks: SAMTrainer (and every "
            "Trainer under python -m arrcoc_sam.launch) wraps it in create_optimizer, so a subclass overriding "
            "create_optimizer must call super().create_optimizer() (which wraps an optimizer it set on "
            "self.optimizer first) or hand its optimizer in as Trainer(optimizers=(optimizer, scheduler))"
        )
    return inner


@contextlib.contextmanager
def patched_trainer(settings: SAMSettings, *, explicit: bool = True) -> Iterator[None]:
    """Within the block, every ``transformers.Trainer`` (and subclass, e.g. ``Seq2SeqTrainer``) trains with ``settings``.

    Patches ``training_step``, ``create_optimizer`` and ``log`` on the ``Trainer`` class object and
    restores the originals on exit. A subclass that overrides ``training_step`` must call
    ``super().training_step(...)``, which runs both passes; one that does not is refused at its first optimizer
    step.
    A Trainer whose ``args`` are :class:`SAMTrainingArguments` keeps their settings; with ``explicit``
    (``settings`` came from flags the user gave) one that differs from ``settings`` is refused.
    """
    global _launch_settings, _launch_explicit
    originals = {name: Trainer.__dict__[name] for name in _PATCHED_METHODS}
    _launch_settings, _launch_explicit = settings, explicit
    for name in _PATCHED_METHODS:
        setattr(Trainer, name, _SAMTrainerMethods.__dict__[name])
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(Trainer, name, function)
        _launch_settings, _launch_explicit = None, False
