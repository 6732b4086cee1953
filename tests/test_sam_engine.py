"""The SAM/ASAM engine against references written from the formulas (float64), plus its guarantees."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from arrcoc_sam.sam import perturbation
from arrcoc_sam.sam.norm_stats import fewest_examples_per_batch, preserve_running_stats
from arrcoc_sam.sam.optimizer import ASAM, SAM
from arrcoc_sam.sam.random_state import RandomState


def make_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def make_batches(n_steps: int, seed: int = 1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 5, generator=gen, dtype=dtype), torch.randn(8, 3, generator=gen, dtype=dtype))
        for _ in range(n_steps)
    ]


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def reference_epsilon(params, grads, rho, adaptive, eta):
    """ε from the paper formulas on flattened vectors: ρ g/‖g‖ or ρ T²g/‖Tg‖ with T = |w| + η."""
    w = torch.cat([p.detach().reshape(-1) for p in params])
    g = torch.cat([gr.reshape(-1) for gr in grads])
    t = w.abs() + eta if adaptive else torch.ones_like(w)
    eps = rho * t * t * g / torch.linalg.vector_norm(t * g)
    return list(torch.split(eps, [p.numel() for p in params]))


def reference_sam_step(model, base_opt, batch, rho, adaptive=False, eta=0.01):
    params = list(model.parameters())
    grads = torch.autograd.grad(mse(model, batch), params)
    eps = reference_epsilon(params, grads, rho, adaptive, eta)
    with torch.no_grad():
        clean = [p.detach().clone() for p in params]
        for p, e in zip(params, eps):
            p.add_(e.view_as(p))
    sam_grads = torch.autograd.grad(mse(model, batch), params)
    with torch.no_grad():
        for p, c, g in zip(params, clean, sam_grads):
            p.copy_(c)
            p.grad = g.clone()
    base_opt.step()
    base_opt.zero_grad()


def sam_closure_step(model, opt, batch):
    def closure():
        opt.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        return loss

    return opt.step(closure)


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def bitwise_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("reductions", ["native", "flat", "per_tensor", "split_by_size"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_single_step_matches_formula_reference_float64(request, monkeypatch, adaptive, reductions):
    """``flat`` forces the accelerator path of the norms and statistics (flattened chunks) on CPU, ``per_tensor``
    one reduction per tensor, ``split_by_size`` the CPU default's split with a limit that puts this model's
    tensors on both sides (its real limit flattens them all, as ``native`` runs)."""
    from arrcoc_sam.sam import perturbation

    if reductions in ("flat", "per_tensor"):
        request.getfixturevalue(f"{reductions}_reductions")
    if reductions == "flat":
        monkeypatch.setattr(perturbation, "CHUNK_NUMEL", 16)  # several chunks and a tensor larger than one
    if reductions == "split_by_size":
        monkeypatch.setattr(perturbation, "_flatten_limit", lambda device: 10)  # biases flattened, weights not
    model, ref = make_mlp(), make_mlp()
    batch = make_batches(1)[0]
    rho = 0.5 if adaptive else 0.05
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=rho, adaptive=adaptive, eta=0.01)
    sam_closure_step(model, opt, batch)
    reference_sam_step(ref, torch.optim.SGD(ref.parameters(), lr=0.1), batch, rho, adaptive, 0.01)
    assert max_abs_diff(model, ref) <= 1e-12


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize(
    "base_cls, base_kwargs",
    [
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
    ids=["sgd_momentum", "adamw"],
)
def test_twenty_step_trajectory_matches_reference(adaptive, base_cls, base_kwargs):
    model, ref = make_mlp(), make_mlp()
    rho = 0.5 if adaptive else 0.05
    opt = SAM(model.parameters(), base_cls, rho=rho, adaptive=adaptive, **base_kwargs)
    ref_opt = base_cls(ref.parameters(), **base_kwargs)
    for batch in make_batches(20):
        sam_closure_step(model, opt, batch)
        reference_sam_step(ref, ref_opt, batch, rho, adaptive, 0.01)
    assert max_abs_diff(model, ref) <= 1e-10


def test_first_and_second_step_api_equals_closure_step():
    model, twin = make_mlp(), make_mlp()
    batch = make_batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    twin_opt = SAM(twin.parameters(), torch.optim.SGD, lr=0.1)
    mse(model, batch).backward()
    opt.first_step(zero_grad=True)
    mse(model, batch).backward()
    opt.second_step(zero_grad=True)
    sam_closure_step(twin, twin_opt, batch)
    assert bitwise_equal(model, twin)


@pytest.mark.parametrize("base_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_rho_zero_matches_base_optimizer_bitwise(base_cls):
    model, ref = make_mlp(), make_mlp()
    opt = SAM(model.parameters(), base_cls, rho=0.0, lr=0.01)
    ref_opt = base_cls(ref.parameters(), lr=0.01)
    for batch in make_batches(10):
        sam_closure_step(model, opt, batch)
        ref_opt.zero_grad()
        mse(ref, batch).backward()
        ref_opt.step()
    assert bitwise_equal(model, ref)


class SwitchingModel(nn.Module):
    """A model whose ``extra`` branch is used only on odd calls: it gets no gradient in SAM's second pass."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 3)
        self.extra = nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.body(x)
        return out + self.extra(x) if self.calls % 2 == 1 else out


def test_lr_zero_leaves_weights_bitwise_unchanged_including_params_without_second_pass_grad():
    torch.manual_seed(0)
    model = SwitchingModel()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0, rho=0.3, momentum=0.9)
    for x, y in make_batches(10, dtype=torch.float32):

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        assert model.extra.weight.grad is None  # second pass used no `extra`: it was restored without a grad
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip_continues_bitwise_and_holds_base_moments():
    batches = make_batches(10, seed=3)
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=1e-2, rho=0.1)
    for batch in batches[:5]:
        sam_closure_step(model, opt, batch)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved_opt["state"][0])
    assert saved_opt["param_groups"][0]["rho"] == 0.1

    for batch in batches[5:]:
        sam_closure_step(model, opt, batch)

    resumed = make_mlp(seed=99)
    resumed.load_state_dict(saved_model)
    resumed_opt = SAM(resumed.parameters(), torch.optim.AdamW, lr=1e-2, rho=0.7)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["rho"] == 0.1
    for batch in batches[5:]:
        sam_closure_step(resumed, resumed_opt, batch)
    assert bitwise_equal(model, resumed)


def test_state_dict_never_contains_the_transient_backup():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    batch = make_batches(1)[0]
    mse(model, batch).backward()
    assert opt.perturb()
    with pytest.raises(RuntimeError, match="restore"):
        opt.state_dict()
    opt.restore()
    assert opt.state_dict()["state"] == {}  # SGD momentum buffers appear only after a base step


def test_asam_perturbs_zero_initialised_tensor_when_eta_positive():
    torch.manual_seed(0)
    lora_a = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    lora_b = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    x = torch.randn(10, 6, dtype=torch.float64)

    def perturbation_of_b(eta: float) -> torch.Tensor:
        opt = ASAM([lora_a, lora_b], torch.optim.SGD, lr=0.1, eta=eta)
        opt.zero_grad()
        (x @ lora_a.T @ lora_b.T).square().sum().add((x @ lora_a.T).sum()).backward()
        lora_b.grad.add_(1.0)
        with opt.perturbed() as ok:
            assert ok
            return lora_b.detach().clone()

    assert perturbation_of_b(0.01).abs().sum() > 0
    assert perturbation_of_b(0.0).abs().sum() == 0  # the trap η > 0 avoids
    assert torch.count_nonzero(lora_b) == 0  # restored


def test_groups_with_rho_zero_are_not_perturbed():
    model = make_mlp()
    first, second = model[0], model[2]
    opt = SAM(
        [{"params": first.parameters(), "rho": 0.0}, {"params": second.parameters()}],
        torch.optim.SGD,
        lr=0.1,
        rho=0.2,
    )
    clean = copy.deepcopy(model.state_dict())
    mse(model, make_batches(1)[0]).backward()
    with opt.perturbed():
        assert torch.equal(first.weight, clean["0.weight"])
        assert not torch.equal(second.weight, clean["2.weight"])


def test_batchnorm_running_stats_updated_once_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    ((model(x) - y) ** 2).mean().backward()
    with opt.perturbed() as ok, preserve_running_stats(model):
        assert ok
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
    opt.step()
    twin(x)  # one plain training-mode forward on the same batch
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(twin[1], name)), name


def _bn_model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
    return model, (torch.randn(16, 4), torch.randn(16, 1))


def _one_step(opt, model, batch, entry: str) -> None:
    if entry == "closure":

        def closure():
            opt.zero_grad()
            loss = mse(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
    else:
        mse(model, batch).backward()
        opt.first_step(zero_grad=True)
        mse(model, batch).backward()
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize(
    ("method", "entry"), [("sam", "closure"), ("sam", "two_call"), ("gsam", "closure"), ("looksam", "closure")]
)
def test_hold_running_stats_updates_batchnorm_once_per_step(method, entry):
    from arrcoc_sam.sam.registry import build_sam_optimizer

    model, batch = _bn_model_and_batch()
    twin, unheld = copy.deepcopy(model), copy.deepcopy(model)
    opt = build_sam_optimizer(method, model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    assert opt.hold_running_stats(model) is opt
    _one_step(opt, model, batch, entry)
    twin(batch[0])  # one plain training-mode forward on the same batch
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(twin[1], name)), name

    # without it the second pass moves them again, from the perturbed network
    _one_step(build_sam_optimizer(method, unheld.parameters(), torch.optim.SGD, rho=0.05, lr=0.1), unheld, batch, entry)
    assert int(unheld[1].num_batches_tracked) == 2
    assert not torch.equal(unheld[1].running_mean, twin[1].running_mean)


def test_hold_running_stats_restores_them_when_the_second_pass_raises():
    model, batch = _bn_model_and_batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1).hold_running_stats(model)
    mse(model, batch).backward()
    before = [b.clone() for b in model[1].buffers()]
    with pytest.raises(RuntimeError, match="boom"), opt.perturbed():
        model(batch[0] + 3.0)  # moves the running statistics, then fails
        raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(model[1].buffers(), before, strict=True))
    assert not opt.is_perturbed


def test_hold_running_stats_checks_its_argument_and_can_be_turned_off():
    model, batch = _bn_model_and_batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="nn.Module or None, got list"):
        opt.hold_running_stats([model])
    opt.hold_running_stats(model)
    mse(model, batch).backward()
    assert opt.perturb()
    with pytest.raises(RuntimeError, match="while perturbed"):
        opt.hold_running_stats(None)
    opt.restore()
    opt.hold_running_stats(None)
    _one_step(opt, model, batch, "closure")
    assert int(model[1].num_batches_tracked) == 3  # pass 1 of the first step (held), both passes of the second


def test_nonfinite_first_pass_gradient_skips_step_and_keeps_weights(caplog):
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = mse(model, make_batches(1)[0])
        loss.backward()
        model[0].weight.grad[0, 0] = float("inf")
        return loss

    with caplog.at_level("WARNING"):
        opt.step(closure)
    assert len(calls) == 1
    assert opt.skipped_steps == 1
    assert "non-finite" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_second_pass_gradient_skips_the_step_and_keeps_weights(caplog, bad):
    """A loss finite at w that blows up at w + ε: the ascent saw finite gradients, so the step applied the
    non-finite sharpness-aware gradient and every weight became NaN. The step is now skipped, with a warning,
    and the base optimizer's state stays empty; the next step trains."""
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=0.1)
    batch = make_batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = mse(model, batch)
        (loss * bad if len(calls) == 2 else loss).backward()
        return loss

    with caplog.at_level("WARNING"):
        opt.step(closure)
    assert len(calls) == 2 and opt.skipped_steps == 0  # the ascent itself went ahead
    assert "non-finite gradients at w + ε" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.state_dict()["state"] == {}
    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["rho_zero_group", "perturbed_tensor_without_pass_two_gradient"])
def test_the_update_check_covers_gradients_outside_the_ascent(case):
    """NaN at w + ε in a ρ = 0 group's gradient, or while a perturbed tensor got no pass-2 gradient (no statistics
    then): the check read only the perturbed tensors' norm, or nothing, and the step made the weights NaN."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    calls = [0]

    def closure():
        calls[0] += 1
        second = calls[0] == 2
        if case == "rho_zero_group":
            loss = (a * a).sum() + (b * b).sum() * (math.nan if second else 1.0)
        else:
            loss = (a * a).sum() + ((a * math.nan).sum() if second else (b * b).sum())
        loss.backward()
        return loss

    groups = [{"params": [a]}, {"params": [b], "rho": 0.0}] if case == "rho_zero_group" else [a, b]
    opt = SAM(groups, torch.optim.SGD, lr=0.1)
    opt.step(closure)
    assert calls[0] == 2 and torch.equal(a, torch.ones(3)) and torch.equal(b, torch.ones(3))


def test_the_second_pass_check_is_answered_once_and_ignores_a_norm_that_only_overflowed():
    """update_non_finite() reads the gradient recorded by the last restore once; finite gradients whose float32
    norm overflows (elements ~1e20) are not skipped, and without statistics there is nothing to check."""
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=1e-30)
    mse(model, make_batches(1, dtype=torch.float32)[0]).backward()
    with opt.perturbed():
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e20)
    assert math.isinf(float(opt.stats["grad_norm_perturbed"]))
    assert not opt.update_non_finite()
    with opt.perturbed():
        model[0].weight.grad[0, 0] = math.nan
    assert opt.update_non_finite() and not opt.update_non_finite()
    opt.track_stats = False
    with opt.perturbed():
        model[0].weight.grad[0, 0] = math.nan
    assert not opt.update_non_finite()


def test_a_check_left_by_a_step_the_grad_scaler_skipped_does_not_skip_a_later_finite_step():
    """A GradScaler skips opt.step() after a pass 2 that overflowed, so the update check was never read; it
    survived into the next (finite, ascent-free) step and skipped it. zero_grad() now drops it."""
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    batch = make_batches(1, dtype=torch.float32)[0]
    scaler.scale(mse(model, batch)).backward()
    with opt.perturbed():
        opt.zero_grad()
        scaler.scale(mse(model, batch) * math.inf).backward()
    scaler.step(opt)  # finds the inf and skips opt.step()
    scaler.update()
    opt.zero_grad()
    before = copy.deepcopy(model.state_dict())
    scaler.scale(mse(model, batch)).backward()
    scaler.step(opt)  # a step without an ascent
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_exception_in_second_pass_leaves_weights_restored():
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    mse(model, make_batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="boom"), opt.perturbed() as ok:
        assert ok
        raise RuntimeError("boom")
    assert not opt.is_perturbed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grad_scaler_loop_matches_fp32_reference():
    batches = make_batches(6, dtype=torch.float32)
    model, ref = make_mlp(dtype=torch.float32), make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.1)
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for batch in batches:
        scaler.scale(mse(model, batch)).backward()
        with opt.perturbed() as ok:
            assert ok
            opt.zero_grad()
            scaler.scale(mse(model, batch)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sam_closure_step(ref, ref_opt, batch)
    assert max_abs_diff(model, ref) <= 1e-6


def test_grad_scaler_overflow_skips_step_and_lowers_scale():
    model = make_mlp(dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(mse(model, make_batches(1, dtype=torch.float32)[0])).backward()
    model[2].bias.grad[0] = float("nan")
    with opt.perturbed() as ok:
        assert not ok
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stats_report_norms_and_cosine():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=1e-6)
    batch = make_batches(1)[0]
    sam_closure_step(model, opt, batch)
    # With a tiny ρ the perturbed gradient is the clean one: cosine 1, equal norms.
    assert opt.stats["grad_cosine"].item() == pytest.approx(1.0, abs=1e-5)
    assert opt.stats["grad_norm_perturbed"].item() == pytest.approx(opt.stats["grad_norm"].item(), rel=1e-4)
    opt.track_stats = False  # switched off: the pass-2 figures are dropped, not left stale
    sam_closure_step(model, opt, batch)
    assert "grad_cosine" not in opt.stats and "grad_norm_perturbed" not in opt.stats
    assert "grad_norm" in opt.stats


def test_low_precision_parameters_warn_once():
    model = nn.Linear(4, 2).to(torch.bfloat16)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.warns(UserWarning, match="float16/bfloat16"):
        for _ in range(2):
            model(torch.randn(3, 4, dtype=torch.bfloat16)).sum().backward()
            with opt.perturbed():
                pass


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rho": -0.1}, ValueError, "rho must be a finite number >= 0, got -0.1"),
        ({"rho": math.nan}, ValueError, "rho must be"),
        ({"rho": math.inf}, ValueError, "rho must be"),
        ({"eta": -1.0}, ValueError, "eta must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_constructor_inputs_fail_clearly():
    model = make_mlp()
    with pytest.raises(ValueError, match="empty parameter list"):
        SAM([], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer must be"):
        SAM(model.parameters(), "adamw")
    with pytest.raises(ValueError, match="differ"):
        SAM(model.parameters(), torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="param group 0: rho"):
        SAM([{"params": model.parameters(), "rho": -1}], torch.optim.SGD, lr=0.1)


def test_instance_base_optimizer_is_shared_live_with_schedulers():
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = SAM(model.parameters(), base)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sam_closure_step(model, opt, make_batches(1)[0])
    scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_asam_defaults_to_adaptive_with_rho_half():
    opt = ASAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1)
    assert opt.param_groups[0]["adaptive"] is True and opt.param_groups[0]["rho"] == 0.5


@pytest.mark.parametrize("eps_scale", [1e-6, 0.05, 30.0])
def test_cosine_statistic_matches_float64_dot_product_at_any_scale_ratio(eps_scale):
    from arrcoc_sam.sam.perturbation import cosine

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) for shape in [(7, 3), (5,), (4, 4, 2)]]
    eps = [eps_scale * (0.6 * g + torch.randn(g.shape, generator=gen)) for g in grads]
    flat_e = torch.cat([e.double().reshape(-1) for e in eps])
    flat_g = torch.cat([g.double().reshape(-1) for g in grads])
    expected = (flat_e @ flat_g / (flat_e.norm() * flat_g.norm())).item()
    cosine_value, grad_norm = cosine(eps, grads)
    assert cosine_value.item() == pytest.approx(expected, abs=1e-6)
    assert grad_norm.item() == pytest.approx(flat_g.norm().item(), rel=1e-6)


def test_logged_cosine_equals_cosine_of_clean_and_perturbed_gradients():
    model = make_mlp()
    batch = make_batches(1)[0]
    params = list(model.parameters())
    clean = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mse(model, batch), params)])
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0, rho=0.5)
    mse(model, batch).backward()
    with opt.perturbed():
        opt.zero_grad()
        mse(model, batch).backward()
        perturbed = torch.cat([p.grad.reshape(-1) for p in params])
    expected = (clean @ perturbed / (clean.norm() * perturbed.norm())).item()
    assert opt.stats["grad_cosine"].item() == pytest.approx(expected, abs=1e-6)
    assert opt.stats["grad_norm_perturbed"].item() == pytest.approx(perturbed.norm().item(), rel=1e-6)
    assert opt.stats["grad_norm"].item() == pytest.approx(clean.norm().item(), rel=1e-6)


@pytest.mark.parametrize("grouping", ["torch", "python"])
def test_interleaved_groups_and_dtypes_match_the_formula_and_restore_bitwise(monkeypatch, grouping):
    """Same-shaped tensors in three groups (SAM, two ASAM settings), listed out of group order and mixing
    float32 with float64: ε_i = ρ_i T_i² g_i / ‖T g‖ with one global norm; the pass-2 statistics pair each
    tensor with its own backup; restore is bitwise. ``python``: the fallback for lists torch cannot group."""
    if grouping == "python":
        from arrcoc_sam.sam import perturbation

        def refuse(*args, **kwargs):
            raise RuntimeError("not groupable here")

        monkeypatch.setattr(perturbation, "_group_tensors_by_device_and_dtype", refuse)
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float64, torch.float32, torch.float64, torch.float32, torch.float64, torch.float64]
    params = [nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64).to(d)) for d in dtypes]
    settings = [
        {"params": [params[3], params[0]], "rho": 0.1},
        {"params": [params[1], params[4]], "rho": 0.3, "adaptive": True, "eta": 0.02},
        {"params": [params[5], params[2]], "rho": 0.2, "adaptive": True, "eta": 0.0},
    ]
    opt = SAM(settings, torch.optim.SGD, lr=0.1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    clean = [p.detach().clone() for p in params]

    scaled, expected_eps = [], {}
    for group in settings:
        for p in group["params"]:
            w, g = p.detach().double(), p.grad.double()
            t = w.abs() + group["eta"] if group.get("adaptive") else torch.ones_like(w)
            scaled.append((p, group["rho"] * t * t * g, t * g))
    norm = torch.sqrt(sum((tg * tg).sum() for _, _, tg in scaled))
    for p, direction, _ in scaled:
        expected_eps[p] = direction / norm

    assert opt.perturb()
    for p, c in zip(params, clean):
        # the float32 tensors' share of ‖T g‖ is accumulated in float32, so every ε carries ~1e-7 relative error
        atol = 1e-12 if p.dtype == torch.float64 else 1e-7
        torch.testing.assert_close(p.detach().double() - c.double(), expected_eps[p], rtol=1e-6, atol=atol)
    applied = [p.detach().double() - c.double() for p, c in zip(params, clean)]
    second = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    for p, g in zip(params, second):
        p.grad = g.to(p.dtype)
    opt.restore()

    assert all(torch.equal(p, c) for p, c in zip(params, clean))
    flat_eps = torch.cat([e.reshape(-1) for e in applied])
    flat_second = torch.cat([p.grad.double().reshape(-1) for p in params])
    expected_cosine = flat_eps @ flat_second / (flat_eps.norm() * flat_second.norm())
    assert opt.stats["grad_cosine"].item() == pytest.approx(expected_cosine.item(), abs=1e-6)
    assert opt.stats["grad_norm_perturbed"].item() == pytest.approx(flat_second.norm().item(), rel=1e-6)
    assert opt.stats["grad_norm"].item() == pytest.approx(norm.item(), rel=1e-6)


def test_optimizer_hooks_fire_once_per_step_with_the_wrapper_and_the_wrapper_copies():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    seen = []
    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o))),
        opt.register_state_dict_pre_hook(lambda o: seen.append(("save", o))),
        opt.register_load_state_dict_post_hook(lambda o: seen.append(("load", o))),
    ]
    for batch in make_batches(2):
        sam_closure_step(model, opt, batch)
    opt.load_state_dict(opt.state_dict())
    assert seen == [("pre", opt), ("post", opt)] * 2 + [("save", opt), ("load", opt)]
    for handle in handles:
        handle.remove()
    sam_closure_step(model, opt, make_batches(1)[0])
    assert len(seen) == 6
    twin = copy.deepcopy(opt)
    assert twin.base_optimizer is not opt.base_optimizer and twin.param_groups[0]["rho"] == opt.param_groups[0]["rho"]
    assert torch.equal(twin.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])


def test_a_failure_while_applying_the_ascent_leaves_clean_weights_and_a_usable_optimizer(monkeypatch):
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, dtype=torch.float64))]
    opt = SAM(params, torch.optim.SGD, lr=0.1, rho=0.1, adaptive=True)  # two (dtype) groups
    clean = [p.detach().clone() for p in params]
    sum(p.pow(2).sum().double() for p in params).backward()
    calls, build = [0], perturbation._scaling_operator

    def out_of_memory_on_the_second_group(group_params, eta):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("simulated out of memory")
        return build(group_params, eta)

    monkeypatch.setattr(perturbation, "_scaling_operator", out_of_memory_on_the_second_group)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        opt.perturb()
    assert calls[0] == 2 and not opt.is_perturbed
    assert all(torch.equal(p, c) for p, c in zip(params, clean, strict=True))
    monkeypatch.undo()
    assert opt.perturb()
    opt.restore()
    assert all(torch.equal(p, c) for p, c in zip(params, clean, strict=True))


def test_a_skipped_ascent_reports_no_pass_two_statistics_of_the_previous_step():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sam_closure_step(model, opt, make_batches(1)[0])
    assert {"grad_norm_perturbed", "grad_cosine"} <= set(opt.stats)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert not opt.perturb()
    assert float(opt.stats["grad_norm"]) == 0.0
    assert not {"grad_norm_perturbed", "grad_cosine"} & set(opt.stats)


def test_complex_parameters_are_refused_by_name():
    weight = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = SAM([weight], torch.optim.SGD, lr=0.1)
    weight.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex parameters: optimise torch.view_as_real"):
        opt.perturb()


def test_running_stats_of_a_lazy_norm_layer_are_kept_once_materialised():
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d())
    with preserve_running_stats(model):  # before the first forward: nothing to keep yet, no error
        model(torch.randn(6, 3))
    with torch.no_grad():
        model(torch.randn(6, 3))
    before = model[1].running_mean.clone()
    with preserve_running_stats(model):
        model(torch.randn(6, 3) + 5.0)
    assert torch.equal(model[1].running_mean, before)


def test_groups_with_rho_zero_do_not_enter_the_ascent_norm():  # kills O4
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    opt = SAM([{"params": [a], "rho": 0.0}, {"params": [b]}], torch.optim.SGD, lr=0.1, rho=0.2)
    a.grad, b.grad = torch.full((3,), 10.0), torch.tensor([3.0, 0.0, 4.0, 0.0])
    clean = b.detach().clone()
    with opt.perturbed():
        eps = b.detach() - clean
    torch.testing.assert_close(eps, 0.2 * b.grad / 5.0)
    assert float(opt.stats["grad_norm"]) == 5.0


def test_stats_rho_is_the_largest_group_radius():  # kills O3
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = SAM([{"params": [a], "rho": 0.1}, {"params": [b], "rho": 0.3}], torch.optim.SGD, lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with opt.perturbed():
        pass
    assert float(opt.stats["rho"]) == torch.tensor(0.3).item()


def test_a_non_finite_ascent_skips_exactly_one_base_step():  # kills O5
    w = nn.Parameter(torch.ones(3))
    opt = SAM([w], torch.optim.SGD, lr=0.1)
    w.grad = torch.tensor([math.inf, 1.0, 1.0])
    assert opt.perturb() is False
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3))
    w.grad = torch.ones(3)
    opt.step()  # a plain step without ascent (warm-up, periodic off-step) runs again
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.9))


def test_preserve_running_stats_restores_them_when_the_block_raises():  # kills N1
    bn = nn.BatchNorm1d(3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    try:
        with preserve_running_stats(bn):
            bn(torch.randn(8, 3))
            raise RuntimeError("pass 2 failed")
    except RuntimeError:
        pass
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())


def test_dot_over_small_and_large_cpu_tensors_matches_float64():  # kills P4
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(10, generator=gen), torch.randn(40, 40, generator=gen)]  # <= and > CPU_FLATTEN_NUMEL
    b = [torch.randn(10, generator=gen), torch.randn(40, 40, generator=gen)]
    reference = sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))
    assert abs(float(perturbation.dot(a, b)) - float(reference)) < 1e-4


def test_cosine_statistic_stays_exact_for_a_tiny_second_pass_gradient():
    """‖ε‖²·‖g‖² underflows float32 for ‖g‖ ≈ 1e-19 although both norms are representable: take the product of
    the norms instead."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(100, generator=gen) * 1e-4
    grad = torch.randn(100, generator=gen) * 1e-20
    e64, g64 = eps.double(), grad.double()
    reference = float(e64 @ g64 / (e64.norm() * g64.norm()))
    got, norm = perturbation.cosine([eps], [grad])
    assert abs(float(got) - reference) < 1e-5
    assert float(norm) == pytest.approx(float(g64.norm()), rel=1e-5)


def _perturbed_weights(opt: SAM, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """w + ε as ``opt`` perturbs from the current gradients, the weights restored afterwards."""
    assert opt.perturb()
    moved = [p.detach().clone() for p in params]
    opt.restore()
    return moved


def test_the_remembered_grouping_follows_every_change_of_tensors_dtypes_and_settings():
    """perturb() reuses the last step's grouping of its tensors; each change below must regroup, so that ε
    equals, bitwise, the one a new optimizer over the same groups computes from scratch."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(40, 40)), nn.Parameter(torch.randn(2000)), nn.Parameter(torch.randn(7))]
    opt = SAM([{"params": params[:2]}, {"params": params[2:], "adaptive": True}], torch.optim.SGD, lr=0.1, rho=0.1)

    def set_grads(present=(0, 1, 2)):
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p) if i in present else None

    def check():
        fresh = SAM(opt.param_groups, opt.base_optimizer)  # shares the groups live, no remembered grouping
        assert all(torch.equal(a, b) for a, b in zip(_perturbed_weights(opt, params),
                                                     _perturbed_weights(fresh, params), strict=True))

    set_grads()
    check()
    check()  # the remembered grouping
    set_grads(present=(0, 2))  # a tensor without gradient this step
    check()
    opt.param_groups[0]["rho"] = 0.3  # a new radius for a group
    set_grads()
    check()
    opt.param_groups[1]["eta"] = 0.5  # a new ASAM η
    check()
    with torch.no_grad():  # tensors change dtype in place (as module.double() does), size class, storage
        params[1].data = params[1].data.double()  # now its own (device, dtype) group
        set_grads()
        check()
        params[2].data = torch.randn(3000, dtype=torch.float64)  # a large tensor now: reduced on its own
        set_grads()
        check()
    assert opt._plans._key is not None and opt._plans._plans is not None
    twin = copy.deepcopy(opt)  # the remembered grouping is not part of the optimizer's state
    assert twin._plans._key is None


def test_one_group_takes_an_in_place_change_of_eta_adaptive_maximize_or_rho_at_the_next_perturb():
    """With one param group (the usual case) the remembered grouping is keyed on that group's dict and settings:
    each setting edited in place between steps must give ε = ±ρ T²g/‖Tg‖ with the new value."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), nn.Parameter(torch.randn(5, dtype=torch.float64))]
    grads = [torch.linspace(-1, 1, 12, dtype=torch.float64).view(4, 3), torch.linspace(2, -0.5, 5, dtype=torch.float64)]
    opt = SAM(params, torch.optim.SGD, lr=0.1, rho=0.1, adaptive=True, eta=0.01)
    group = opt.param_groups[0]

    def check(sign=1.0):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        clean = [p.detach().clone() for p in params]
        got = [moved - c for moved, c in zip(_perturbed_weights(opt, params), clean)]
        expected = reference_epsilon(params, grads, group["rho"], group["adaptive"], group["eta"])
        for e, r, p in zip(got, expected, params):
            torch.testing.assert_close(e, sign * r.view_as(p), rtol=0, atol=1e-12)

    check()
    check()  # the remembered grouping
    group["eta"] = 0.5
    check()
    group["adaptive"] = False  # plain SAM: T = 1
    check()
    group["rho"] = 0.3
    check()
    group["maximize"] = True  # the base optimizer maximises: the ascent is on −loss
    check(sign=-1.0)


# -- boundaries and transients that the formula references above do not reach -------------------------


def test_float16_weights_round_w_plus_epsilon_once_across_a_half_ulp_tie():
    """ε = ρ g/‖g‖ = ρ for g = e₀; with ρ = 2⁻¹¹ + 2⁻²³ (exact in float32) the float16 weight 1.0 must become
    round₁₆(1 + 2⁻¹¹ + 2⁻²³) = 1 + 2⁻¹⁰. Rounding ε to float16 first (2⁻¹¹) and then w + ε (a tie, to even)
    would leave 1.0."""
    rho = 2.0**-11 + 2.0**-23
    weight = nn.Parameter(torch.ones(2, dtype=torch.float16))
    opt = SAM([weight], torch.optim.SGD, rho=rho, lr=0.1)
    weight.grad = torch.tensor([1.0, 0.0], dtype=torch.float16)
    with pytest.warns(UserWarning, match="float16/bfloat16"):
        assert opt.perturb()
    exact = torch.tensor([1.0 + rho, 1.0], dtype=torch.float64)  # w + ε in float64, rounded once below
    assert torch.equal(weight.detach(), exact.to(torch.float16))
    assert weight[0].item() == 1.0 + 2.0**-10
    opt.restore()
    assert torch.equal(weight.detach(), torch.ones(2, dtype=torch.float16))


def test_cpu_reductions_flatten_tensors_of_at_most_cpu_flatten_numel_elements():
    """The documented split: on CPU a tensor of exactly CPU_FLATTEN_NUMEL elements is small, one more is large."""
    limit = perturbation.CPU_FLATTEN_NUMEL
    split = perturbation.SizeSplit.of([torch.zeros(limit), torch.zeros(limit + 1), torch.zeros(3)])
    assert split.small == [True, False, True] and split.large == [False, True, False]
    assert split.small_chunks == [(0, 2)]  # the two small tensors form one flattened chunk
    assert perturbation.SizeSplit.of([torch.zeros(limit), torch.zeros(limit)]).small is None  # all small


def test_chunk_ranges_fill_each_chunk_up_to_exactly_the_limit():
    """[start, stop) ranges hold at most ``limit`` elements, a chunk reaching the limit exactly included; a
    tensor larger than the limit forms its own range (hand-derived partitions)."""
    ranges = perturbation._chunk_ranges
    assert ranges([2, 2, 2, 2, 3], limit=4) == [(0, 2), (2, 4), (4, 5)]
    assert ranges([1, 3, 4, 9, 1], limit=4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert ranges([4, 4], limit=8) == [(0, 2)]
    assert ranges([], limit=8) == []


def test_cosine_of_parallel_vectors_never_exceeds_one():
    """cos(c·g, g) = sign(c) exactly; rounding of the dot product and norms (float32, 1000 elements) must not
    push the statistic outside [−1, 1]."""
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for c, expected in ((3.0, 1.0), (-3.0, -1.0), (0.1, 1.0), (7.3, 1.0)):
        cos, grad_norm = perturbation.cosine([g * c], [g])
        assert -1.0 <= cos.item() <= 1.0
        assert math.isclose(cos.item(), expected, abs_tol=1e-6)
        assert math.isclose(grad_norm.item(), math.sqrt(sum(v * v for v in g.double().tolist())), rel_tol=1e-6)


def _skipping_optimizer():
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = SAM([weight], torch.optim.SGD, rho=0.1, lr=1.0)
    weight.grad = torch.tensor([math.inf, 1.0])
    assert not opt.perturb() and opt.next_step_skipped  # a non-finite ascent: the next step is skipped
    return weight, opt


def test_before_first_pass_clears_a_skip_left_by_a_non_finite_ascent():
    """A GradScaler skipped that step, so the skip must not carry into the next window."""
    weight, opt = _skipping_optimizer()
    opt.before_first_pass()
    assert not opt.next_step_skipped
    weight.grad = torch.tensor([0.5, -1.0])
    opt.step()  # plain SGD at lr 1: w − g
    assert weight.detach().tolist() == [0.5, 3.0]


def test_a_finite_ascent_clears_a_skip_left_by_a_non_finite_one():
    weight, opt = _skipping_optimizer()
    weight.grad = torch.tensor([3.0, 4.0])
    assert opt.perturb() and not opt.next_step_skipped
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0 + 0.1 * 0.6, 2.0 + 0.1 * 0.8]))
    opt.restore()
    assert weight.detach().tolist() == [1.0, 2.0]


def test_a_copy_of_the_optimizer_does_not_carry_the_pending_update_check():
    """The check describes the original's gradients; a deep copy (or pickle) starts without one."""
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = SAM([weight], torch.optim.SGD, rho=0.1, lr=1.0)
    weight.grad = torch.tensor([3.0, 4.0])
    assert opt.perturb()
    weight.grad = torch.tensor([6.0, 8.0])  # pass 2
    opt.restore()
    clone = copy.deepcopy(opt)
    assert clone.take_update_norm() is None
    assert opt.take_update_norm().item() == 10.0  # ‖(6, 8)‖


def test_random_state_replays_the_cpu_draws_and_then_leaves_the_generator_as_before():
    """Independent reference: the draws of a freshly seeded generator."""
    torch.manual_seed(123)
    first, second = torch.rand(5), torch.rand(5)
    torch.manual_seed(123)
    state = RandomState.capture(torch.device("cpu"))
    assert torch.equal(torch.rand(5), first)
    with state.replayed():
        assert torch.equal(torch.rand(5), first)
    assert torch.equal(torch.rand(5), second)


def test_only_a_batchnorm_layer_in_training_mode_needs_two_examples_per_batch():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert fewest_examples_per_batch(model) == 2
    model.eval()  # normalises with the running statistics: one example is fine
    assert fewest_examples_per_batch(model) == 1
    assert fewest_examples_per_batch(nn.Linear(3, 4)) == 1 and fewest_examples_per_batch(None) == 1


# -- mutation round 26 (engine core): each test below failed on a surviving mutant ------------------------------
def test_random_state_leaves_the_generator_where_it_was_before_the_block_not_where_the_replay_ended():
    torch.manual_seed(7)
    draws = [torch.rand(3) for _ in range(4)]
    torch.manual_seed(7)
    state = RandomState.capture(torch.device("cpu"))
    torch.rand(3), torch.rand(3), torch.rand(3)  # three draws past the captured state
    with state.replayed():
        assert torch.equal(torch.rand(3), draws[0])
    assert torch.equal(torch.rand(3), draws[3])


def test_instance_norm_running_stats_are_kept_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.InstanceNorm1d(3, track_running_stats=True))
    model(torch.randn(4, 2, 5))
    before = [b.clone() for b in model[1].buffers()]
    assert len(before) == 3
    with preserve_running_stats(model):
        model(torch.randn(4, 2, 5) + 3.0)
    assert all(torch.equal(a, b) for a, b in zip(model[1].buffers(), before, strict=True))


def _three_weights_in_two_groups(rho_a: float, rho_b: float):
    gen = torch.Generator().manual_seed(4)
    weights = [nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64)) for _ in range(3)]
    opt = SAM([{"params": weights[:2], "rho": rho_a}, {"params": weights[2:], "rho": rho_b}], torch.optim.SGD, lr=0.1)
    for w in weights:
        w.grad = torch.randn(3, generator=gen, dtype=torch.float64)
    return opt, weights


def _assert_epsilon_uses(opt, weights, radii) -> None:
    """ε_i = ρ_i g_i / ‖g‖ (one global norm), then a bitwise restore."""
    clean = [w.detach().clone() for w in weights]
    norm = torch.sqrt(sum((w.grad**2).sum() for w in weights))
    assert opt.perturb()
    for w, c, rho in zip(weights, clean, radii, strict=True):
        torch.testing.assert_close(w.detach() - c, rho * w.grad / norm, rtol=1e-12, atol=1e-15)
    opt.restore()


def test_a_rho_set_in_place_on_one_of_several_groups_applies_at_the_next_perturb():
    opt, weights = _three_weights_in_two_groups(0.1, 0.2)
    _assert_epsilon_uses(opt, weights, [0.1, 0.1, 0.2])
    opt.param_groups[1]["rho"] = 0.5
    _assert_epsilon_uses(opt, weights, [0.1, 0.1, 0.5])


def test_a_tensor_moved_to_the_next_group_takes_that_groups_rho_at_the_next_perturb():
    """The tensors keep their order ([w0, w1, w2]) and each group its dict; only the split between them changes."""
    opt, weights = _three_weights_in_two_groups(0.1, 0.2)
    _assert_epsilon_uses(opt, weights, [0.1, 0.1, 0.2])
    first, second = opt.param_groups
    first["params"], second["params"] = weights[:1], weights[1:]
    _assert_epsilon_uses(opt, weights, [0.1, 0.2, 0.2])


def test_a_failure_while_restore_takes_its_statistics_still_puts_the_clean_weights_back(monkeypatch):
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    batch = make_batches(1)[0]
    clean = copy.deepcopy(model)
    mse(model, batch).backward()
    assert opt.perturb()
    opt.zero_grad()
    mse(model, batch).backward()

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(perturbation, "cosine", fail)
    with pytest.raises(RuntimeError, match="boom"):
        opt.restore()
    assert bitwise_equal(model, clean) and not opt.is_perturbed


def test_half_precision_tensors_beside_float32_ones_still_warn():
    low, full = nn.Parameter(torch.ones(4, dtype=torch.float16)), nn.Parameter(torch.ones(4))
    opt = SAM([full, low], torch.optim.SGD, lr=0.1)
    full.grad, low.grad = torch.ones(4), torch.ones(4, dtype=torch.float16)
    with pytest.warns(UserWarning, match="float16/bfloat16"):
        assert opt.perturb()
    opt.restore()


def test_the_update_norm_joins_the_perturbed_and_the_other_gradients_as_one_l2_norm():
    """‖g_SAM‖ over (3, 4) in the ascent and (12,) in a ρ = 0 group: √(25 + 144) = 13."""
    moved, fixed = nn.Parameter(torch.zeros(2, dtype=torch.float64)), nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = SAM([{"params": [moved]}, {"params": [fixed], "rho": 0.0}], torch.optim.SGD, lr=0.1)
    moved.grad, fixed.grad = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64)
    assert opt.perturb()
    moved.grad, fixed.grad = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([12.0], dtype=torch.float64)
    opt.restore()
    assert opt.take_update_norm().item() == 13.0

