"""SAMTrainer semantics on one CPU process, checked against a hand-written SAM/ASAM reference."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from arrcoc_sam import SAMTrainer, SAMTrainingArguments
from arrcoc_sam.sam import registry
from arrcoc_sam.sam.optimizer import SAM

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from trainer_common import flat_params, tiny_bert, token_dataset, token_sum_loss, trainer_kwargs  # noqa: E402

LR = 0.05



def _train(tmp_path, trainer_cls=SAMTrainer, args_cls=SAMTrainingArguments, model=None, data=None,
           trainer_extra=None, **overrides):
    model = tiny_bert() if model is None else model
    args = args_cls(**trainer_kwargs(str(tmp_path / "out"), **{"learning_rate": LR, **overrides}))
    extra = {"compute_loss_func": token_sum_loss, **(trainer_extra or {})}
    trainer = trainer_cls(model=model, args=args, train_dataset=token_dataset(24) if data is None else data, **extra)
    trainer.train()
    return trainer


def _reference_sam(model, windows, rho, adaptive, eta=0.01, microbatch=False):
    """Hand-written SAM / ASAM with plain SGD, one list of micro-batches per step (independent of the engine)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(micro, count):
        out = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"])
        return torch.autograd.grad(token_sum_loss(out, micro["labels"], count), params)

    def ascent(g):
        with torch.no_grad():
            t = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
            return [rho * ti * ti * gi / norm for ti, gi in zip(t, g, strict=True)]

    def at(eps, micro, count):
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        g = grads(micro, count)
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)
        return g

    for window in windows:
        count = sum(int(m["labels"].ne(-100).sum()) for m in window)
        if microbatch:
            g_sam = [sum(gs) for gs in zip(*(at(ascent(grads(m, count)), m, count) for m in window), strict=True)]
        else:
            g = [sum(gs) for gs in zip(*(grads(m, count) for m in window), strict=True)]
            eps = ascent(g)
            g_sam = [sum(gs) for gs in zip(*(at(eps, m, count) for m in window), strict=True)]
        with torch.no_grad():
            for p, gs in zip(params, g_sam, strict=True):
                p.sub_(LR * gs)
    return model


def _windows(data, micro_size, accumulation, steps):
    stacked = [{k: torch.stack([row[k] for row in data[i:i + micro_size]]) for k in data[0]}
               for i in range(0, len(data), micro_size)]
    return [stacked[s * accumulation:(s + 1) * accumulation] for s in range(steps)]


@pytest.mark.parametrize("method,rho", [("sam", 0.05), ("asam", 0.5)])
def test_accumulation_4x2_matches_1x8_and_reference(tmp_path, method, rho):
    data = token_dataset(24)
    full = _train(tmp_path / "a", optimizer=method, rho=rho, per_device_train_batch_size=8, max_steps=3)
    accumulated = _train(tmp_path / "b", optimizer=method, rho=rho, per_device_train_batch_size=2,
                         gradient_accumulation_steps=4, max_steps=3)
    reference = _reference_sam(tiny_bert(), _windows(data, 8, 1, 3), rho=rho, adaptive=method == "asam")
    assert (flat_params(full.model) - flat_params(accumulated.model)).abs().max() < 1e-6
    assert (flat_params(full.model) - flat_params(reference)).abs().max() < 1e-6
    assert (flat_params(full.model) - flat_params(tiny_bert())).abs().max() > 1e-3


def test_microbatch_scope_takes_one_ascent_per_micro_batch(tmp_path):
    data = token_dataset(24)
    trainer = _train(tmp_path, sam_scope="microbatch", rho=0.05, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, max_steps=3)
    reference = _reference_sam(tiny_bert(), _windows(data, 4, 2, 3), rho=0.05, adaptive=False, microbatch=True)
    window_reference = _reference_sam(tiny_bert(), _windows(data, 4, 2, 3), rho=0.05, adaptive=False)
    assert (flat_params(trainer.model) - flat_params(reference)).abs().max() < 1e-6
    assert (flat_params(trainer.model) - flat_params(window_reference)).abs().max() > 1e-5


def test_bf16_autocast_on_cpu_matches_the_reference_under_autocast_and_rho_zero_is_stock(tmp_path):
    """--bf16 on CPU: the Trainer runs forward and loss under torch.autocast(bfloat16) with fp32 weights; SAM
    perturbs the fp32 weights, so the run equals the hand-written reference with its forward under autocast."""
    data = token_dataset(24)
    run = _train(tmp_path / "bf16", rho=0.05, per_device_train_batch_size=8, max_steps=3, bf16=True)
    fp32 = _train(tmp_path / "fp32", rho=0.05, per_device_train_batch_size=8, max_steps=3)
    model = tiny_bert()
    forward = model.forward

    def forward_under_autocast(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = forward_under_autocast
    reference = _reference_sam(model, _windows(data, 8, 1, 3), rho=0.05, adaptive=False)
    gap = (flat_params(run.model) - flat_params(reference)).abs().max()
    assert gap < 1e-6 and (flat_params(run.model) - flat_params(fp32.model)).abs().max() > 100 * gap
    rho_zero = _train(tmp_path / "zero", rho=0.0, per_device_train_batch_size=8, max_steps=3, bf16=True)
    stock = _train(tmp_path / "stock", trainer_cls=Trainer, args_cls=TrainingArguments, per_device_train_batch_size=8,
                   max_steps=3, bf16=True)
    assert torch.equal(flat_params(rho_zero.model), flat_params(stock.model))


@pytest.mark.parametrize("sam_overrides", [{"optimizer": "none"}, {"optimizer": "sam", "rho": 0.0}])
def test_none_and_rho_zero_reproduce_stock_trainer_bitwise(tmp_path, sam_overrides):
    common = {"optim": "adamw_torch", "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
              "max_steps": 3, "max_grad_norm": 1.0}
    stock = _train(tmp_path / "stock", Trainer, TrainingArguments, model=tiny_bert(dropout=0.1), **common)
    sam = _train(tmp_path / "sam", model=tiny_bert(dropout=0.1), **common, **sam_overrides)
    for (name, p), (_, q) in zip(stock.model.named_parameters(), sam.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert [h.get("loss") for h in stock.state.log_history] == [h.get("loss") for h in sam.state.log_history]


@pytest.mark.parametrize("optim", ["adafactor", "adamw_torch_fused", "sgd"])
def test_rho_zero_reproduces_the_stock_trainer_bitwise_with_other_base_optimizers(tmp_path, optim):
    """HF's Adafactor (relative steps, no momentum), fused AdamW and SGD as the base: ρ = 0 is the stock run."""
    common = {"optim": optim, "learning_rate": 0.01, "per_device_train_batch_size": 8, "max_steps": 3}
    stock = _train(tmp_path / "stock", Trainer, TrainingArguments, **common)
    rho_zero = _train(tmp_path / "zero", rho=0.0, **common)
    sam = _train(tmp_path / "sam", rho=0.05, **common)
    assert torch.equal(flat_params(rho_zero.model), flat_params(stock.model))
    assert (flat_params(sam.model) - flat_params(stock.model)).abs().max() > 1e-3


@pytest.mark.skipif(Version(torch.__version__).release < (2, 7), reason="upstream: torch 2.6's dynamo cannot trace "
                    "transformers' capture_outputs wrapper (NameError: name 'torch' is not defined)")
def test_torch_compile_trains_the_same_weights_as_the_eager_model(tmp_path):
    """--torch_compile (dynamo with its eager backend: the same kernels) must not change a SAM step."""
    common = {"rho": 0.05, "per_device_train_batch_size": 8, "max_steps": 3}
    compiled = _train(tmp_path / "compiled", torch_compile=True, torch_compile_backend="eager", **common)
    eager = _train(tmp_path / "eager", **common)
    assert torch.equal(flat_params(compiled.model), flat_params(eager.model))
    assert hasattr(compiled.model_wrapped, "_orig_mod") or hasattr(compiled.model, "_orig_mod")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("method, knobs", [("sam", {}), ("esam", {"sam_args": "beta=0.5,gamma=0.5,seed=2"})])
def test_gradient_checkpointing_trains_bitwise_the_weights_of_a_run_without_it(tmp_path, method, knobs, reentrant):
    """--gradient_checkpointing recomputes each block in backward, in pass 1 and in the replay; ESAM keeps every
    pass-1 gradient there (a reentrant block tracks its inputs, not its weights)."""
    common = {"optimizer": method, "rho": 0.05, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
              "max_steps": 3, **knobs}
    checkpointed = _train(tmp_path / "checkpointed", gradient_checkpointing=True,
                          gradient_checkpointing_kwargs={"use_reentrant": reentrant}, **common)
    plain = _train(tmp_path / "plain", **common)
    assert torch.equal(flat_params(checkpointed.model), flat_params(plain.model))
    assert (flat_params(plain.model) - flat_params(tiny_bert())).abs().max() > 1e-3


def test_the_lr_schedule_steps_once_per_optimizer_step_and_gsam_rho_follows_it(tmp_path):
    """Cosine with warm-up, accumulation 2: every method logs the stock run's learning rates (one scheduler step
    per optimizer step, never one per pass), ρ = 0 trains the stock weights bitwise, and GSAM's ρ_t follows
    the schedule (ρ_t = ρ · lr_t / lr_max with the default rho_min = 0)."""
    common = {"optim": "adamw_torch", "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
              "max_steps": 6, "lr_scheduler_type": "cosine", "warmup_steps": 2, "logging_steps": 1}

    def learning_rates(trainer):
        return [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]

    stock = _train(tmp_path / "stock", Trainer, TrainingArguments, **common)
    assert len(set(learning_rates(stock))) == 5 and stock.lr_scheduler.last_epoch == 6
    assert torch.equal(flat_params(_train(tmp_path / "zero", rho=0.0, **common).model), flat_params(stock.model))
    for method in ("sam", "looksam", "msam", "gsam"):
        run = _train(tmp_path / method, optimizer=method, rho=0.05, **common)
        assert learning_rates(run) == learning_rates(stock) and run.lr_scheduler.last_epoch == 6, method
    rho_logs = [(h["learning_rate"], h["sam/rho"]) for h in run.state.log_history if "sam/rho" in h]
    assert len(rho_logs) == 5  # the first step's lr is 0 (warm-up), so is its ρ: no ascent, no figures
    assert all(rho == pytest.approx(0.05 * lr / LR) for lr, rho in rho_logs)


def test_sam_metrics_are_window_averages_and_clipping_sees_the_sam_gradient(tmp_path):
    kwargs = {"rho": 0.05, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4,
              "max_grad_norm": 1.0}
    per_step = [h for h in _train(tmp_path / "a", logging_steps=1, **kwargs).state.log_history if "loss" in h]
    windows = [h for h in _train(tmp_path / "b", logging_steps=2, **kwargs).state.log_history if "loss" in h]
    assert len(per_step) == 4 and len(windows) == 2
    for log in per_step:
        assert log["sam/sharpness"] == pytest.approx(log["sam/loss_perturbed"] - log["loss"], abs=1e-6)
        assert log["sam/sharpness"] > 0 and -1 <= log["sam/grad_cosine"] <= 1
        assert (log["sam/rho"], log["sam/skipped_steps"]) == (pytest.approx(0.05), 0)
        # The Trainer clips (and reports the pre-clip norm of) the second-pass gradient only.
        assert log["grad_norm"] == pytest.approx(log["sam/grad_norm_perturbed"], rel=1e-5)
    for window, pair in zip(windows, (per_step[:2], per_step[2:]), strict=True):
        for key in ("loss", "sam/loss_perturbed", "sam/sharpness", "sam/grad_norm", "sam/grad_cosine"):
            assert window[key] == pytest.approx((pair[0][key] + pair[1][key]) / 2, rel=1e-5), key


class _RecordingSAM(SAM):
    """SAM that records the hook calls, and ascends only on even optimizer steps (a periodic variant)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.count = [], 0

    def before_first_pass(self):
        self.calls.append("before_first_pass")
        super().before_first_pass()

    def ascent_this_step(self):
        self.calls.append("ascent_this_step")
        self.count += 1
        return self.count % 2 == 1

    def after_first_pass(self):
        self.calls.append("after_first_pass")

    def perturb(self):
        self.calls.append("perturb")
        return super().perturb()

    def restore(self):
        self.calls.append("restore")
        super().restore()

    def step(self, closure=None):
        self.calls.append("step")
        return super().step(closure)


_ASCENT = ["before_first_pass", "ascent_this_step", "after_first_pass", "perturb", "restore", "step"]
_MICROBATCH_ASCENT = ["before_first_pass", "ascent_this_step", "perturb", "restore", "after_first_pass", "perturb",
                      "restore", "step"]


@pytest.mark.parametrize("scope,ascent", [("global", _ASCENT), ("microbatch", _MICROBATCH_ASCENT)])
def test_registered_method_is_driven_only_through_hooks_in_order(tmp_path, monkeypatch, scope, ascent):
    built = {}

    def builder(params, base, **knobs):
        built["knobs"] = knobs
        built["optimizer"] = _RecordingSAM(params, base, rho=knobs["rho"])
        return built["optimizer"]

    monkeypatch.setitem(registry._BUILDERS, "recording", builder)
    _train(tmp_path, optimizer="recording", rho=0.05, sam_interval=2, sam_args="alpha=0.5,mode=fast",
           per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, sam_scope=scope)
    assert built["knobs"] == {"rho": 0.05, "interval": 2, "alpha": 0.5, "mode": "fast"}
    plain = ["before_first_pass", "ascent_this_step", "after_first_pass", "step"]
    assert built["optimizer"].calls == ascent + plain


@pytest.mark.parametrize(("scope", "refusing"), [("microbatch", "looksam"), ("per_device", "gsam")])
def test_a_scope_is_refused_only_for_methods_that_say_so(monkeypatch, scope, refusing):
    """An optimizer built by a registered method that does not declare ``supports_microbatch_scope`` /
    ``supports_per_device_scope`` is accepted."""
    from types import SimpleNamespace

    from arrcoc_sam.integrations._settings import SAMSettings

    monkeypatch.setitem(registry._BUILDERS, "undeclared", lambda params, base, **knobs: SimpleNamespace())
    base = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    assert SAMSettings(method="undeclared", scope=scope).build(base) is not None
    with pytest.raises(ValueError, match=f"--optimizer {refusing} .*sam_scope={scope}.* use sam_scope=global"):
        SAMSettings(method=refusing, scope=scope).build(base)


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.norm(self.embed(input_ids).mean(1))
        logits = self.head(hidden)
        loss = nn.functional.cross_entropy(logits, labels[:, 0].clamp_min(0))
        return {"loss": loss, "logits": logits}


def test_batchnorm_running_stats_move_once_per_micro_batch(tmp_path):
    kwargs = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 1}
    stock = _train(tmp_path / "stock", Trainer, TrainingArguments, model=_BatchNormNet(),
                   trainer_extra={"compute_loss_func": None}, **kwargs)
    sam = _train(tmp_path / "sam", model=_BatchNormNet(), trainer_extra={"compute_loss_func": None}, **kwargs)
    assert int(sam.model.norm.num_batches_tracked) == 2
    assert torch.equal(stock.model.norm.running_mean, sam.model.norm.running_mean)
    assert torch.equal(stock.model.norm.running_var, sam.model.norm.running_var)
    assert not torch.equal(stock.model.head.weight, sam.model.head.weight)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"optimizer": "sharp"}, "optimizer must be one of none, "),
        ({"sam_scope": "everywhere"}, "sam_scope must be one of"),
        ({"rho": -0.1}, "rho must be a finite number >= 0"),
        ({"sam_interval": 0}, "sam_interval must be >= 1"),
        ({"sam_args": "alpha"}, "sam_args must look like"),
        ({"sam_args": "1alpha=2"}, "sam_args must look like"),
        ({"rho": 0.05, "sam_args": "rho=0.1"}, r"rho is given twice, as rho=0.05 and in sam_args as rho=0.1"),
        ({"optimizer": "looksam", "sam_args": "alpha=0.7,bogus=1"},
         r"--optimizer looksam does not take bogus \(it takes adaptive, alpha, eta, interval, rho\)"),
        ({"optimizer": "sam", "sam_interval": 2}, r"--optimizer sam does not take interval \(it takes adaptive, eta, rho\)"),
        ({"rho": "0.05"}, r"rho must be a finite number >= 0, got '0.05' \(str\)"),
        ({"optimizer": "periodic", "sam_interval": "5"}, r"sam_interval must be an integer >= 1, got '5' \(str\)"),
        ({"sam_statistics": "false"}, "sam_statistics must be True or False, got 'false'"),
        ({"sam_args": 3}, "sam_args must be a string 'name=value,name=value' or a dict, got 3"),
        ({"sam_eta": 0.0, "sam_args": "eta=0.01"}, "eta is given twice"),
        ({"optimizer": "periodic", "sam_interval": 2, "sam_args": "interval=3"}, "interval is given twice"),
        ({"rho": float("inf")}, "rho must be a finite number >= 0"),
        ({"sam_eta": float("nan")}, "sam_eta must be a finite number >= 0"),
        ({"fsdp": "full_shard", "fsdp_config": {"min_num_params": 0}, "sam_scope": "per_device"},
         "sam_scope='per_device' has no meaning under FSDP"),
        ({"optim": "lomo"}, "--optim lomo updates the weights inside backward"),
        ({"optim": "galore_adamw_layerwise"}, "--optim galore_adamw_layerwise"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, r"DeepSpeed \(ZeRO stage 2\) cannot run"),
        ({"deepspeed": {"zero_optimization": {"stage": 1}}}, "steps the engine .* before the ascent"),
        ({"deepspeed": {"train_micro_batch_size_per_gpu": 4}}, r"DeepSpeed \(ZeRO stage 0\) cannot run"),
        ({"sam_scope": "microbatch"}, "gradient_accumulation_steps=1"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "FSDP1"),
        ({"fsdp": "full_shard", "sam_scope": "per_device"}, "sam_scope='per_device' has no meaning under FSDP"),
        # knob values the method itself refuses, at parse time rather than when train() builds the optimizer
        ({"optimizer": "looksam", "sam_args": "alpha=-1"},
         r"--optimizer looksam \(alpha=-1, sam_scope=global\): alpha must be a finite number >= 0, got -1"),
        ({"optimizer": "esam", "sam_args": "gamma=0"}, r"--optimizer esam \(gamma=0, .*gamma must be a number in \(0, 1\]"),
        ({"optimizer": "esam", "sam_args": "swp=bogus"}, "--optimizer esam .*swp must be one of"),
        ({"optimizer": "gsam", "rho": 0.05, "sam_args": "rho_min=0.1"}, "--optimizer gsam .*rho_min must be in"),
        ({"optimizer": "gsam", "sam_scope": "microbatch", "gradient_accumulation_steps": 2},
         "--optimizer gsam .*sam_scope=microbatch .*splits"),
        ({"optimizer": "msam", "optim": "sgd"}, r"--optimizer msam perturbs .* --optim sgd keeps none .* momentum=0.9"),
        ({"optimizer": "msam", "optim": "sgd", "optim_args": "momentum=0"}, "--optim sgd keeps none as configured"),
        # transformers builds its Adafactor without --optim_args: no beta1 can be given, so no advice to give one
        ({"optimizer": "msam", "optim": "adafactor", "optim_args": "beta1=0.9"},
         r"--optim adafactor keeps none as configured; add an Adam-family --optim"),
        ({"optimizer": "msam", "optim": "adagrad"}, "--optim adagrad keeps none"),
        # a rank-local clean gradient in the update or the kept state: the replicas would drift apart
        ({"optimizer": "gsam", "sam_scope": "per_device"}, "--optimizer gsam .*sam_scope=per_device .*leaves local"),
        ({"optimizer": "looksam", "sam_scope": "per_device"}, "--optimizer looksam .*use sam_scope=global"),
        ({"optimizer": "fsam", "sam_scope": "per_device"}, "--optimizer fsam .*only"),
    ],
)
def test_refuses_runs_sam_cannot_serve(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        SAMTrainingArguments(**trainer_kwargs(str(tmp_path), **overrides))


@pytest.mark.parametrize("method, knobs", [("gsam", {"alpha": 0.0}), ("looksam", {"interval": 1}), ("fsam", {"sigma": 0.0}),
                                           ("periodic", {}), ("esam", {}), ("msam", {})])
def test_per_device_scope_is_taken_where_no_rank_local_gradient_reaches_the_update(tmp_path, method, knobs):
    sam_args = ",".join(f"{key}={value}" for key, value in knobs.items()) or None
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer=method, sam_scope="per_device",
                                                 sam_args=sam_args, optim="adamw_torch"))
    assert args.sam_settings().scope == "per_device"


def test_msam_with_a_momentum_given_in_optim_args_is_taken(tmp_path):
    for optim, optim_args in (("sgd", "momentum=0.9"), ("rmsprop", "momentum=0.9"), ("adamw_torch", None)):
        args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="msam", optim=optim, optim_args=optim_args))
        assert args.sam_settings().method == "msam"


def test_sam_args_may_be_a_dict_in_code(tmp_path):
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="looksam", sam_args={"alpha": 0.5}))
    assert args.sam_settings().extra == {"alpha": 0.5}


@pytest.mark.parametrize("overrides", [{"sam_scope": "microbatch"}, {"optim": "lomo"}, {"optim": "galore_adamw_layerwise"}])
def test_optimizer_none_is_stock_training_and_refuses_nothing(tmp_path, overrides):
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="none", **overrides))
    assert not args.sam_settings().enabled


def test_optimizer_none_says_which_given_knobs_it_ignores(tmp_path):
    """A SAM recipe run as its own baseline (--optimizer none) kept --rho and --sam_args silently."""
    with pytest.warns(UserWarning, match="--optimizer none runs stock training: ignoring --rho, sam_args alpha"):
        args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="none", rho=0.1, sam_args="alpha=0.5"))
    assert not args.sam_settings().enabled
    with pytest.warns(UserWarning, match="ignoring --sam_scope, --sam_statistics"):
        SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="none", sam_scope="per_device",
                                              sam_statistics=False)).sam_settings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="none")).sam_settings()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"gradient_accumulation_steps": 2},
         "static_graph=True cannot run the unsynchronised backward passes that gradient_accumulation_steps=2 needs"),
        ({"gradient_accumulation_steps": 2, "sam_scope": "per_device"},
         "gradient_accumulation_steps=2 and sam_scope=per_device need"),
    ],
)
def test_a_static_ddp_graph_is_refused_in_a_launch_where_a_pass_must_not_synchronise(
        tmp_path, monkeypatch, overrides, match):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=match):
        SAMTrainingArguments(**trainer_kwargs(str(tmp_path), ddp_static_graph=True, **overrides))


def test_a_static_ddp_graph_is_refused_with_plain_training_arguments_too(tmp_path, monkeypatch):
    """The launcher builds plain TrainingArguments, which do not check it: torchrun died on torch's internal assert
    (expect_autograd_hooks_) at the first accumulated micro-batch."""
    from transformers import TrainingArguments

    from arrcoc_sam.integrations import trainer as trainer_module

    args = TrainingArguments(**trainer_kwargs(str(tmp_path), gradient_accumulation_steps=2))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8))
    args.ddp_static_graph = True
    monkeypatch.setattr(trainer_module, "launched_processes", lambda: 2)  # as under torchrun with 2 processes
    with pytest.raises(ValueError, match="static_graph=True cannot run .* gradient_accumulation_steps=2 needs"):
        trainer_module._run_settings(trainer)


def test_a_static_ddp_graph_is_accepted_where_every_pass_synchronises_or_without_ddp(tmp_path, monkeypatch):
    from arrcoc_sam.integrations._settings import check_static_graph

    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no DDP wrapper, the flag has no effect
    SAMTrainingArguments(**trainer_kwargs(str(tmp_path), ddp_static_graph=True, gradient_accumulation_steps=2))
    check_static_graph(True, "global", 1)  # every pass synchronises (the 2-process run is in test_trainer_ddp)
    check_static_graph(False, "per_device", 4)
    with pytest.raises(ValueError, match="sam_scope=microbatch needs"):
        check_static_graph(True, "microbatch", 1)


def test_a_knob_given_once_in_sam_args_reaches_the_builder(tmp_path):
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="periodic", sam_args="rho=0.1,interval=3"))
    assert args.sam_settings().knobs() == {"rho": 0.1, "interval": 3}


def test_sam_args_values_are_python_literals_or_else_strings():
    from arrcoc_sam.integrations._settings import parse_sam_args

    assert parse_sam_args(" alpha = 0.7,k=5,flag=True,items=[1],name=x,path=a/b,words=two words") == {
        "alpha": 0.7, "k": 5, "flag": True, "items": [1], "name": "x", "path": "a/b", "words": "two words"}


def test_a_scope_refused_after_the_method_is_built_leaves_the_base_optimizer_as_it_was():
    """gsam refuses sam_scope=per_device only once built around the base optimizer: the instance must go on as if
    it had never been wrapped (its groups without gsam's entries, free to be wrapped by another method)."""
    from arrcoc_sam.integrations._settings import SAMSettings

    base = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    before = [dict(group) for group in base.param_groups]
    with pytest.raises(ValueError, match="sam_scope=per_device"):
        SAMSettings(method="gsam", scope="per_device").build(base)
    assert [dict(group) for group in base.param_groups] == before
    assert SAMSettings(method="sam", rho=0.1).build(base).param_groups[0]["rho"] == 0.1


@pytest.mark.parametrize("optim", ["lomo", "galore_adamw_layerwise"])
def test_an_update_inside_backward_is_refused_with_plain_training_arguments_too(tmp_path, optim):
    """Plain TrainingArguments (the launcher's) hold --optim as an enum by the time SAMTrainer checks the run."""
    args = TrainingArguments(**trainer_kwargs(str(tmp_path), optim=optim))
    with pytest.raises(ValueError, match=f"--optim {optim} updates the weights inside backward"):
        SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8))


@pytest.mark.parametrize("fsdp", ["", [], False])
def test_an_empty_fsdp_option_is_no_fsdp_and_keeps_the_per_device_scope(tmp_path, fsdp):
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), fsdp=fsdp, sam_scope="per_device"))
    assert args.sam_settings().scope == "per_device"


def test_a_registered_method_that_needs_another_base_optimizer_than_sgd_parses(monkeypatch):
    """The parse-time knob check builds built-in methods around an SGD stand-in; a method a user registered may
    need the run's own --optim, so it is left to the Trainer's build."""
    from types import SimpleNamespace

    from arrcoc_sam.integrations._settings import SAMSettings, check_knob_values

    def adam_only(params, base, **knobs):
        if not isinstance(base, torch.optim.Adam):
            raise ValueError(f"adam_only wraps Adam, got {type(base).__name__}")
        return SimpleNamespace()

    monkeypatch.setitem(registry._BUILDERS, "adam_only", adam_only)
    check_knob_values(SAMSettings(method="adam_only"))
    base = torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    assert SAMSettings(method="adam_only").build(base) is not None


@pytest.mark.parametrize("knobs", [{"not a name": 1}, '{"rho-min": 0.1}', {1: 0.1}])
def test_sam_args_keys_given_as_a_mapping_must_be_knob_names(knobs):
    from arrcoc_sam.integrations._settings import parse_sam_args

    with pytest.raises(ValueError, match="sam_args keys must be knob names"):
        parse_sam_args(knobs)


@pytest.mark.parametrize(("settings", "match"), [
    ({"rho": math.inf}, "rho must be a finite number >= 0, got inf"),
    ({"method": "asam", "eta": math.inf}, "sam_eta must be a finite number >= 0, got inf"),
    ({"method": "periodic", "interval": True}, "sam_interval must be an integer >= 1, got True"),
])
def test_settings_refuse_an_infinite_radius_or_a_boolean_interval_naming_the_flag(settings, match):
    from arrcoc_sam.integrations._settings import SAMSettings

    with pytest.raises(ValueError, match=match):
        SAMSettings(**settings)


@pytest.mark.parametrize("text", ["alpha=0.1,k=5,alpha=0.2", '{"alpha": 0.1, "alpha": 0.2}'])
def test_a_knob_given_twice_in_sam_args_is_refused(text):
    """Both forms kept the last value silently."""
    from arrcoc_sam.integrations._settings import parse_sam_args

    with pytest.raises(ValueError, match="sam_args gives alpha twice"):
        parse_sam_args(text)


def test_grad_scaler_path_matches_unscaled_run_and_skips_overflow(tmp_path):
    kwargs = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2, "rho": 0.05}
    plain = _train(tmp_path / "plain", **kwargs)

    def scaled_trainer(path, init_scale, max_steps, loss_factor=1.0):
        args = SAMTrainingArguments(**trainer_kwargs(str(path), learning_rate=LR, **{**kwargs, "max_steps": max_steps}))
        trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(24),
                             compute_loss_func=lambda *a, **k: token_sum_loss(*a, **k) * loss_factor)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
        trainer.train()
        return trainer

    scaled = scaled_trainer(tmp_path / "scaled", 2.0**12, 2)
    assert (flat_params(plain.model) - flat_params(scaled.model)).abs().max() < 1e-6
    log = next(h for h in scaled.state.log_history if "loss" in h)
    plain_log = next(h for h in plain.state.log_history if "loss" in h)
    # norms are divided by the scale; ρ and the cosine are scale-free and must not be
    for key in ("sam/grad_norm", "sam/grad_norm_perturbed", "sam/grad_cosine", "sam/rho"):
        assert log[key] == pytest.approx(plain_log[key], rel=1e-5), key

    overflow = scaled_trainer(tmp_path / "overflow", 3e38, 2, loss_factor=1e3)  # inf in the pass-1 gradients
    assert torch.equal(flat_params(overflow.model), flat_params(tiny_bert()))
    assert overflow.accelerator.scaler.get_scale() < 3e38
    # each step's log counts the ascents skipped since the previous log, not the run's total
    assert [h["sam/skipped_steps"] for h in overflow.state.log_history if "loss" in h] == [1, 1]


def test_lora_perturbs_only_adapters_and_resume_continues_trajectory(tmp_path):
    peft = pytest.importorskip("peft")

    def lora_model():
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
        return peft.get_peft_model(tiny_bert(), config)

    kwargs = {"per_device_train_batch_size": 4, "max_steps": 4, "optim": "adamw_torch", "learning_rate": 0.02,
              "save_strategy": "steps", "save_steps": 2}
    full = _train(tmp_path / "full", model=lora_model(), **kwargs)
    base = tiny_bert()
    trained = dict(full.model.named_parameters())
    for name, p in base.named_parameters():
        peft_name = "base_model.model." + name.replace(".query.", ".query.base_layer.").replace(
            ".value.", ".value.base_layer.")
        assert torch.equal(trained[peft_name], p), name
    adapters = {n: p for n, p in trained.items() if "lora_" in n}
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in adapters.items())

    resumed_args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path / "full" / "out"), **kwargs))
    resumed = SAMTrainer(model=lora_model(), args=resumed_args, train_dataset=token_dataset(24),
                         compute_loss_func=token_sum_loss)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    again = dict(resumed.model.named_parameters())
    for name, p in adapters.items():
        assert torch.allclose(again[name], p, atol=1e-7, rtol=0), name


@pytest.mark.parametrize("method", [m for m in registry.available_methods() if m != "none"])
def test_every_registered_method_trains_through_the_trainer_hooks(tmp_path, method):
    trainer = _train(tmp_path, optimizer=method, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     max_steps=2, logging_steps=2, optim="adamw_torch")
    moved = flat_params(trainer.model) - flat_params(tiny_bert())
    assert torch.isfinite(moved).all() and moved.abs().max() > 0
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["sam/skipped_steps"] == 0
    ascends = getattr(trainer.optimizer.optimizer, "passes_per_step", 2.0) > 1
    assert ("sam/loss_perturbed" in log) == ascends


def test_sam_statistics_false_skips_the_pass_two_statistics_only(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SAMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path / "p"), "--sam_statistics", "false"]
    )
    assert args.sam_settings().statistics is False
    kwargs = {"rho": 0.05, "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "seed": 0}
    with_stats = _train(tmp_path / "a", **kwargs)
    without = _train(tmp_path / "b", sam_statistics=False, **kwargs)
    assert without.optimizer.optimizer.track_stats is False  # the SAM inside accelerate's wrapper
    logs = [h for h in without.state.log_history if "loss" in h]
    assert logs and all("sam/grad_cosine" not in h and "sam/grad_norm_perturbed" not in h for h in logs)
    assert all("sam/sharpness" in h and "sam/grad_norm" in h for h in logs)
    assert torch.equal(flat_params(with_stats.model), flat_params(without.model))  # the training is the same


# -- batches, stops and trials the stock Trainer accepts -----------------------------------------------
class _TupleRows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        x = torch.randn(4, generator=torch.Generator().manual_seed(index))
        return x, x.sum().reshape(1)


def _stack_tuples(rows):
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


class _TupleBatchTrainer(SAMTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        x, y = inputs
        loss = nn.functional.mse_loss(model(x), y)
        return (loss, None) if return_outputs else loss


def test_tuple_batches_with_a_custom_compute_loss_match_the_closure_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    reference = nn.Linear(4, 1)
    reference.load_state_dict(model.state_dict())
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                                 remove_unused_columns=False, rho=0.05))
    _TupleBatchTrainer(model=model, args=args, train_dataset=_TupleRows(), data_collator=_stack_tuples).train()
    opt = SAM(reference.parameters(), torch.optim.SGD, rho=0.05, lr=LR)
    rows = _TupleRows()
    for start in (0, 4):
        x, y = _stack_tuples([rows[i] for i in range(start, start + 4)])

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.mse_loss(reference(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    assert (flat_params(model) - flat_params(reference)).abs().max() < 1e-6
    assert (flat_params(model) - flat_params(nn.Linear(4, 1))).abs().max() > 1e-3


class _StopBetweenMicroBatches(TrainerCallback):
    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step >= 2:
            control.should_training_stop = True


def test_msam_run_stopped_between_micro_batches_returns_clean_weights(tmp_path):
    """A callback may stop training mid-window: the weights are those of the two completed steps, not w + ε."""
    common = {"optimizer": "msam", "rho": 0.5, "optim": "adamw_torch", "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 2}
    stopped = _train(tmp_path / "stopped", max_steps=6, trainer_extra={"callbacks": [_StopBetweenMicroBatches()]},
                     **common)
    assert stopped.state.global_step == 2 and not stopped.optimizer.optimizer.is_perturbed
    completed = _train(tmp_path / "completed", max_steps=2, **common)
    assert torch.equal(flat_params(stopped.model), flat_params(completed.model))


def test_hyper_parameter_trial_settings_on_args_reach_the_next_optimizer(tmp_path):
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), rho=0.05))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8), compute_loss_func=token_sum_loss)
    assert trainer.create_optimizer().param_groups[0]["rho"] == 0.05
    trainer.args.optimizer, trainer.args.rho = "asam", 0.8  # what Trainer._hp_search_setup does for a trial
    trainer.optimizer = None
    rebuilt = trainer.create_optimizer()
    assert registry.build_sam_optimizer("asam", [nn.Parameter(torch.zeros(1))], torch.optim.SGD, lr=0.1).__class__ \
        is type(rebuilt)
    assert rebuilt.param_groups[0]["rho"] == 0.8


def test_a_trial_that_sets_accumulation_to_one_under_microbatch_scope_is_refused(tmp_path):
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), sam_scope="microbatch", gradient_accumulation_steps=2))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8), compute_loss_func=token_sum_loss)
    trainer.args.gradient_accumulation_steps = 1  # a trial's setting: the run is checked again
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        trainer.create_optimizer()


def test_sam_eta_reaches_the_asam_optimizer(tmp_path):
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="asam", sam_eta=0.2))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8), compute_loss_func=token_sum_loss)
    group = trainer.create_optimizer().param_groups[0]
    assert (group["adaptive"], group["eta"]) == (True, 0.2)


def test_a_scope_set_on_args_between_trainings_reaches_the_window(tmp_path):
    common = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 1}
    trainer = _train(tmp_path / "switched", **common)
    trainer.args.sam_scope, trainer.optimizer = "microbatch", None
    trainer.train()
    first = _train(tmp_path / "first", **common)
    fresh = _train(tmp_path / "fresh", model=first.model, sam_scope="microbatch", **common)
    assert torch.equal(flat_params(trainer.model), flat_params(fresh.model))
    global_twice = _train(tmp_path / "global", model=first.model, **common)
    assert (flat_params(trainer.model) - flat_params(global_twice.model)).abs().max() > 1e-6


def test_an_optimizer_that_is_already_sharpness_aware_is_used_as_given(tmp_path):
    model = tiny_bert()
    own = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=LR)
    trainer = _train(tmp_path, model=model, trainer_extra={"optimizers": (own, None)}, max_steps=1,
                     per_device_train_batch_size=4)
    assert trainer.optimizer.optimizer is own  # not wrapped again in a second SAM with the default ρ
    assert next(h for h in trainer.state.log_history if "loss" in h)["sam/rho"] == pytest.approx(0.2)


def test_sam_trainer_with_plain_training_arguments_trains_sam_with_its_defaults(tmp_path):
    trainer = _train(tmp_path, args_cls=TrainingArguments, max_steps=1, per_device_train_batch_size=4)
    assert type(trainer.optimizer.optimizer) is SAM
    assert next(h for h in trainer.state.log_history if "loss" in h)["sam/rho"] == pytest.approx(0.05)


class _MarkingTrainer(SAMTrainer):
    """Adds a key to each pass's batch in place, as the stock step does under context parallelism (shift_labels)."""

    def _prepare_context_parallel_inputs(self, model, inputs):
        self.marked_on_entry = [*getattr(self, "marked_on_entry", []), "marked" in inputs]
        inputs["marked"] = True
        return super()._prepare_context_parallel_inputs(model, {k: v for k, v in inputs.items() if k != "marked"})


def test_every_pass_gets_the_micro_batch_as_loaded_even_when_the_stock_step_adds_keys(tmp_path):
    trainer = _train(tmp_path, trainer_cls=_MarkingTrainer, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, max_steps=1)
    assert trainer.marked_on_entry == [False] * 4  # pass 1 and the replay of both micro-batches


class _ModalSGD(torch.optim.SGD):
    """A base optimizer with train/eval modes that refuses to step in eval mode (as schedule-free ones do)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode = "train"

    def train(self):
        self.mode = "train"

    def eval(self):
        self.mode = "eval"

    def step(self, closure=None):
        if self.mode != "train":
            raise RuntimeError("stepped in eval mode")
        return super().step(closure)


def test_train_and_eval_modes_reach_a_modal_base_optimizer_through_the_trainer(tmp_path):
    model = tiny_bert()
    base = _ModalSGD(model.parameters(), lr=LR)
    base.eval()  # the Trainer must switch it to train mode through the SAM wrapper
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                                 eval_strategy="steps", eval_steps=2))
    trainer = SAMTrainer(model=model, args=args, train_dataset=token_dataset(16), eval_dataset=token_dataset(4),
                         compute_loss_func=token_sum_loss, optimizers=(base, None))
    trainer.train()
    assert trainer.state.global_step == 4
    trainer.optimizer.eval()
    assert base.mode == "eval"


class _NoLossKwargs(nn.Module):
    """forward without **kwargs: the Trainer divides its loss by the GA steps itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.lin(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _train_logging(tmp_path, **overrides):
    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=gen), "labels": torch.randint(0, 3, (), generator=gen)} for _ in range(16)]
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path / "out"), per_device_train_batch_size=4,
                                                 gradient_accumulation_steps=2, max_steps=2, logging_steps=1,
                                                 learning_rate=0.0, **overrides))
    trainer = SAMTrainer(model=_NoLossKwargs(), args=args, train_dataset=data)
    grab = _Logs()
    trainer.add_callback(grab)
    trainer.train()
    return grab.logs


def test_esam_selection_metrics_are_in_the_units_of_the_logged_loss(tmp_path):  # kills T1
    logs = _train_logging(tmp_path, optimizer="esam", rho=1e-6, sam_args="beta=1,gamma=0.5")
    log = next(entry for entry in logs if "sam/sharpness" in entry)
    assert abs(log["sam/sharpness"]) < 1e-3  # ρ ≈ 0: the perturbed loss is the clean one, not GA x it


def test_sam_metrics_are_only_read_by_training_loss_logs(tmp_path):  # kills T2
    logs = _train_logging(tmp_path, optimizer="sam", rho=0.05)
    assert any("sam/sharpness" in entry for entry in logs if "loss" in entry)
    assert not [entry for entry in logs if "loss" not in entry and any(k.startswith("sam/") for k in entry)]


class _OwnTrainingStep(SAMTrainer):
    """A subclass whose training_step does its own forward and backward, without super()."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        loss = self.compute_loss(model, self._prepare_inputs(inputs), num_items_in_batch=num_items_in_batch)
        self.accelerator.backward(loss)
        return loss.detach()


class _SuperTrainingStep(SAMTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, inputs, num_items_in_batch)


def test_a_training_step_override_that_bypasses_the_sam_passes_is_refused_at_the_first_step(tmp_path):
    with pytest.raises(RuntimeError, match="_OwnTrainingStep.training_step does not run SAMTrainer's"):
        _train(tmp_path / "own", trainer_cls=_OwnTrainingStep, rho=0.05, max_steps=2)
    calling_super = _train(tmp_path / "super", trainer_cls=_SuperTrainingStep, rho=0.05, max_steps=2)
    plain = _train(tmp_path / "plain", rho=0.05, max_steps=2)
    assert torch.equal(flat_params(calling_super.model), flat_params(plain.model))


@pytest.mark.parametrize("saved, resumed, expected", [
    ({"optimizer": "sam", "rho": 0.05}, {"optimizer": "sam", "rho": 0.2}, {"rho": 0.2, "adaptive": False}),
    ({"optimizer": "asam", "rho": 0.5}, {"optimizer": "sam", "rho": 0.05}, {"rho": 0.05, "adaptive": False}),
    # the checkpoint's ρ (0.05) is below the run's rho_min: only the run's own ρ makes the groups valid
    ({"optimizer": "sam", "rho": 0.05}, {"optimizer": "gsam", "rho": 0.2, "sam_args": "rho_min=0.1"},
     {"rho": 0.2, "rho_min": 0.1}),
])
def test_resuming_keeps_the_runs_own_sharpness_aware_settings_and_says_which_changed(tmp_path, caplog, saved,
                                                                                     resumed, expected):
    common = {"per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 2}
    _train(tmp_path / "first", max_steps=2, **common, **saved)
    checkpoint = next((tmp_path / "first" / "out").glob("checkpoint-*"))
    model = tiny_bert()
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path / "second"), learning_rate=LR, max_steps=3, **common,
                                                 **resumed))
    trainer = SAMTrainer(model=model, args=args, train_dataset=token_dataset(24), compute_loss_func=token_sum_loss)
    with caplog.at_level("WARNING", logger="arrcoc_sam.sam.optimizer"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    groups = trainer.optimizer.optimizer.param_groups
    assert all(group[key] == value for group in groups for key, value in expected.items())
    assert "this run keeps its own" in caplog.text and f"rho: {saved['rho']!r} -> {expected['rho']!r}" in caplog.text


class _StopAfterFirstMicroBatch(TrainerCallback):
    def __init__(self):
        self.armed = True

    def on_substep_end(self, args, state, control, **kwargs):
        if self.armed:
            self.armed = False
            control.should_training_stop = True


def test_a_window_an_earlier_train_left_open_is_not_replayed_by_the_next(tmp_path):
    """Training stopped after the first micro-batch of a window of 3; the next train() on the same trainer starts a
    fresh window: at a vanishing radius its perturbed loss is the clean loss of its own 3 micro-batches, not 4."""
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path / "out"), learning_rate=LR, max_steps=1,
                                                 per_device_train_batch_size=2, gradient_accumulation_steps=3,
                                                 logging_steps=1, rho=1e-9))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(24), compute_loss_func=token_sum_loss,
                         callbacks=[_StopAfterFirstMicroBatch()])
    trainer.train()
    assert trainer.state.global_step == 0
    grab = _Logs()
    trainer.add_callback(grab)
    trainer.train()
    log = next(entry for entry in grab.logs if "sam/loss_perturbed" in entry)
    assert log["sam/loss_perturbed"] == pytest.approx(log["loss"], rel=1e-4)


def test_seq2seq_trainer_with_sam_trains_like_sam_trainer_and_generates(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from arrcoc_sam import SAMSeq2SeqTrainer, SAMSeq2SeqTrainingArguments

    def t5():
        torch.manual_seed(0)
        return T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                   num_decoder_layers=1, num_heads=2, decoder_start_token_id=0,
                                                   pad_token_id=0, eos_token_id=1))

    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, 32, (6,), generator=gen), "labels": torch.randint(2, 32, (4,), generator=gen)}
            for _ in range(8)]
    common = trainer_kwargs(str(tmp_path / "out"), optimizer="sam", rho=0.05, max_steps=2, per_device_train_batch_size=4)
    seq2seq = SAMSeq2SeqTrainer(model=t5(), args=SAMSeq2SeqTrainingArguments(**common, predict_with_generate=True,
                                                                             generation_max_length=5),
                                train_dataset=data, eval_dataset=data[:4])
    seq2seq.train()
    plain = SAMTrainer(model=t5(), args=SAMTrainingArguments(**common), train_dataset=data)
    plain.train()
    assert torch.equal(flat_params(seq2seq.model), flat_params(plain.model))
    assert all("sam/rho" in h for h in seq2seq.state.log_history if "loss" in h)
    assert "eval_loss" in seq2seq.evaluate(max_length=5)


@pytest.mark.parametrize(("sam_args", "expected"), [(None, 7), ("seed=3", 3)])
def test_esam_masks_follow_the_run_seed_unless_given(tmp_path, sam_args, expected):
    """ESAM's SWP seed ignored --seed, so a seed sweep drew the same masks in every run."""
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="esam", seed=7, sam_args=sam_args))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8), compute_loss_func=token_sum_loss)
    assert trainer.create_optimizer().seed == expected


@pytest.mark.parametrize(("scope", "bad_call", "skipped"), [
    ("global", 1, [1, 0]), ("microbatch", 1, [1, 0]),  # infinite at w: the ascent skips
    ("global", 3, [0, 0]), ("microbatch", 2, [0, 0]),  # finite at w, infinite at w + ε: the ascent went ahead
])
def test_a_window_with_a_non_finite_loss_takes_no_step(tmp_path, scope, bad_call, skipped):
    """Call ``bad_call`` of the loss is infinite: the first micro-batch's pass 1, or pass 2 of the first window (the
    replay of its first micro-batch; in microbatch scope that micro-batch's own pass 2). Under sam_scope=microbatch
    each micro-batch's ascent started afresh and cleared the skip an earlier micro-batch's non-finite gradients had
    asked for, and a gradient finite at w but not at w + ε was never checked: either way the step applied it and
    every weight became NaN."""
    calls = []

    def loss_fn(outputs, labels, num_items_in_batch=None):
        calls.append(None)
        loss = token_sum_loss(outputs, labels, num_items_in_batch)
        return loss * float("inf") if len(calls) == bad_call else loss

    args = SAMTrainingArguments(**trainer_kwargs(
        str(tmp_path / "out"), optimizer="sam", rho=0.05, sam_scope=scope, learning_rate=LR, max_grad_norm=100.0,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(16), compute_loss_func=loss_fn)
    first_step = []
    trainer.add_callback(type("AfterStep", (TrainerCallback,), {
        "on_step_end": lambda self, a, state, control, model=None, **kw: first_step.append(flat_params(model))})())
    trainer.train()
    assert torch.equal(first_step[0], flat_params(tiny_bert()))  # the window with the non-finite loss
    final = flat_params(trainer.model)
    assert torch.isfinite(final).all() and not torch.equal(final, first_step[0])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["sam/skipped_steps"] for h in logs] == skipped
    # the Trainer's own grad_norm shows the overflow, as the stock Trainer's does (gradients are not dropped here)
    assert not math.isfinite(logs[0]["grad_norm"]) and math.isfinite(logs[1]["grad_norm"])


class _MeanSquaredModule(nn.Module):
    """A plain module whose loss is a batch mean the Trainer divides by the accumulation count itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x, labels=None):
        prediction = self.out(torch.tanh(self.hidden(x))).squeeze(-1)
        return {"loss": None if labels is None else ((prediction - labels) ** 2).mean(), "logits": prediction}


class _Rows(torch.utils.data.IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_a_micro_batch_carried_past_the_end_of_an_iterable_dataset_is_replayed_with_its_own_normalisation(tmp_path):
    """With an IterableDataset and max_steps, the stock loop carries the unfinished last window of the data (one
    micro-batch, divided by its own accumulation count 1) into the next pass's first window (two micro-batches,
    divided by 2). The replay at w + ε divided the carried one by 2: weights 0.12 (relative to the distance
    trained) from SAM on the stock window loss."""
    generator = torch.Generator().manual_seed(3)
    rows = [{"x": torch.randn(4, generator=generator, dtype=torch.float64),
             "labels": torch.randn((), generator=generator, dtype=torch.float64)} for _ in range(10)]
    b1, b2, b3, b4, b5 = ({key: torch.stack([row[key] for row in rows[i:i + 2]]) for key in rows[0]}
                          for i in range(0, 10, 2))

    def mse(model, batch):
        return ((model(batch["x"])["logits"] - batch["labels"]) ** 2).mean()

    stock_windows = [[(b1, 2), (b2, 2)], [(b3, 2), (b4, 2)], [(b5, 1), (b1, 2), (b2, 2)], [(b3, 2), (b4, 2)]]

    def reference(rho):
        model = _MeanSquaredModule().double()
        params = list(model.parameters())
        def loss(window):
            return sum(mse(model, batch) / count for batch, count in window)

        for window in stock_windows:
            grads = torch.autograd.grad(loss(window), params)
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            eps = [rho * g / norm for g in grads]
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.add_(e)
            grads = torch.autograd.grad(loss(window), params)
            with torch.no_grad():
                for p, e, g in zip(params, eps, grads):
                    p.sub_(e).sub_(0.1 * g)
        return flat_params(model)

    def train(rho):
        model = _MeanSquaredModule().double()
        args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path / f"rho{rho}"), learning_rate=0.1, rho=rho,
                                                     per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                     max_steps=4, logging_steps=10))
        SAMTrainer(model=model, args=args, train_dataset=_Rows(rows)).train()
        return flat_params(model)

    start = flat_params(_MeanSquaredModule().double())
    # the window definition above is the stock loop's: SGD on it equals a run without ascent
    assert torch.allclose(train(0.0), reference(0.0), rtol=0, atol=1e-12)
    expected = reference(0.05)
    assert float((train(0.05) - expected).norm() / (expected - start).norm()) < 1e-12


def test_esam_perturbed_loss_of_a_carried_micro_batch_keeps_its_own_normalisation(tmp_path):
    """ESAM's forwards at w + ε replay each micro-batch with its own pass-1 normalisation: at a vanishing radius
    sam/loss_perturbed is the logged loss of every step, also in the window that carries the unfinished last window
    of the data (one micro-batch divided by 1, then two divided by 2)."""
    generator = torch.Generator().manual_seed(3)
    rows = [{"x": torch.randn(4, generator=generator, dtype=torch.float64),
             "labels": torch.randn((), generator=generator, dtype=torch.float64)} for _ in range(10)]
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), learning_rate=0.1, optimizer="esam", rho=1e-9,
                                                 sam_args="gamma=0.5", per_device_train_batch_size=2,
                                                 gradient_accumulation_steps=2, max_steps=4))
    trainer = SAMTrainer(model=_MeanSquaredModule().double(), args=args, train_dataset=_Rows(rows),
                         per_example_loss_fn=lambda outputs, batch: (outputs["logits"] - batch["labels"]) ** 2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "sam/loss_perturbed" in entry]
    assert [entry["sam/loss_perturbed"] for entry in logs] == pytest.approx([entry["loss"] for entry in logs], rel=1e-6)
    assert len(logs) == 4


def test_a_replay_puts_the_trainers_accumulation_count_back_even_when_its_pass_raises():
    """A carried micro-batch's replay runs with its own accumulation count (test above) and must leave the
    Trainer's count as it found it, also when the pass raises (the error propagates out of train(), and a caller
    that catches it holds a Trainer whose count is the window's, not the carried micro-batch's)."""
    from types import SimpleNamespace

    from arrcoc_sam.integrations.trainer import _accumulation_steps

    trainer = SimpleNamespace(current_gradient_accumulation_steps=2)
    with pytest.raises(RuntimeError, match="the pass failed"), _accumulation_steps(trainer, 1):
        assert trainer.current_gradient_accumulation_steps == 1
        raise RuntimeError("the pass failed")
    assert trainer.current_gradient_accumulation_steps == 2
    with _accumulation_steps(trainer, None):  # no count of its own: the Trainer's stands
        assert trainer.current_gradient_accumulation_steps == 2


def test_a_window_serves_the_accelerator_a_hyperparameter_trial_rebuilt(tmp_path):
    """A hyper-parameter search rebuilds the Trainer's accelerator for each trial (create_accelerator_and_postprocess):
    the next train()'s window must read the new one (its GradScaler, backward and process count), not the first's."""
    trainer = _train(tmp_path, max_steps=1, per_device_train_batch_size=4)
    first = trainer.accelerator
    trainer.create_accelerator_and_postprocess()
    assert trainer.accelerator is not first
    trainer.train()
    assert trainer._sam_window.accelerator is trainer.accelerator


def test_a_static_graph_flag_without_a_launch_is_no_static_graph_for_plain_training_arguments(tmp_path):
    """--ddp_static_graph means nothing in one process (no DDP wrapper): plain TrainingArguments with it and
    accumulation train, as SAMTrainingArguments do, instead of being refused as a static DDP graph."""
    trainer = _train(tmp_path, args_cls=TrainingArguments, ddp_static_graph=True, gradient_accumulation_steps=2,
                     max_steps=1, per_device_train_batch_size=2)
    assert trainer.state.global_step == 1


def test_figures_an_earlier_train_left_unread_do_not_enter_the_next_trains_log(tmp_path):
    """train() #1 ends before its window's figures were logged (logging_steps beyond max_steps); train() #2 logs its
    own window only: at a vanishing radius its perturbed loss is its own logged loss, not a mean with #1's."""
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path / "out"), learning_rate=0.5, max_steps=1,
                                                 per_device_train_batch_size=4, logging_steps=10, rho=1e-9))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8), compute_loss_func=token_sum_loss)
    trainer.train()
    assert not any("sam/loss_perturbed" in entry for entry in trainer.state.log_history)
    trainer.args.logging_steps = 1
    grab = _Logs()
    trainer.add_callback(grab)
    trainer.train()
    log = next(entry for entry in grab.logs if "sam/loss_perturbed" in entry)
    assert log["sam/loss_perturbed"] == pytest.approx(log["loss"], rel=1e-4)
