"""The raw optimizer API against torch.optim conventions: copies with a scheduler attached, base optimizers whose
hyperparameters clash or that need a closure, per-group settings with an instance, ``maximize=True``, argument
types, refused checkpoints, and closures that do not zero the gradients."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from test_sam_engine import (
    bitwise_equal,
    make_batches,
    make_mlp,
    max_abs_diff,
    mse,
    reference_epsilon,
    reference_sam_step,
)
from torch import nn

from arrcoc_sam.sam import build_sam_optimizer
from arrcoc_sam.sam.optimizer import SAM


def _closure(model, opt, batch, sign: float = 1.0):
    def closure():
        opt.zero_grad()
        loss = sign * mse(model, batch)
        loss.backward()
        return loss

    return closure


def test_a_copy_made_after_a_scheduler_is_attached_steps_its_own_model_and_pickles():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # puts a step wrapper on the optimizer instance
    twin_model, twin_opt = copy.deepcopy((model, opt))
    before = copy.deepcopy(model)
    batch = make_batches(1)[0]
    twin_opt.step(_closure(twin_model, twin_opt, batch))
    assert bitwise_equal(model, before)  # the original did not move
    assert max_abs_diff(twin_model, before) > 1e-4  # the copy did
    restored = pickle.loads(pickle.dumps(opt))
    assert isinstance(restored, SAM)


def test_a_pickled_optimizer_neither_carries_a_pending_update_check_nor_needs_one_from_an_older_pickle():
    """update_non_finite()'s record of the last restore is transient: a copy made between restore() and step()
    steps normally, and a pickle from before the check existed (no ``_update_check``) still steps."""
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    batch = make_batches(1)[0]
    _closure(model, opt, batch)()
    with opt.perturbed():
        _closure(model, opt, batch)()
        model[0].weight.grad[0, 0] = math.nan  # the original's pending check would skip its step
    twin_model, twin_opt = copy.deepcopy((model, opt))
    _closure(twin_model, twin_opt, batch)()  # finite gradients for the copy's own step
    before = copy.deepcopy(twin_model)
    twin_opt.step()
    assert max_abs_diff(twin_model, before) > 0
    old_state = opt.__getstate__()
    del old_state["_update_check"]
    old = SAM.__new__(SAM)
    old.__setstate__(old_state)
    assert not old.update_non_finite()


def test_a_base_optimizer_whose_hyperparameter_shares_a_sam_setting_name_is_refused():
    model = make_mlp()
    with pytest.raises(ValueError, match=r"Adadelta has its own hyperparameter\(s\) rho=0.9"):
        SAM(model.parameters(), torch.optim.Adadelta, rho=0.05)
    with pytest.raises(ValueError, match="rho=0.95"):
        SAM(model.parameters(), torch.optim.Adadelta(model.parameters(), rho=0.95))
    with pytest.raises(ValueError, match="Adadelta has its own"):
        build_sam_optimizer("periodic", model.parameters(), torch.optim.Adadelta, interval=5)


def test_an_optimizer_that_needs_a_closure_is_refused_at_construction():
    model = make_mlp()
    with pytest.raises(TypeError, match="LBFGS cannot step without a closure"):
        SAM(model.parameters(), torch.optim.LBFGS)


def test_group_settings_given_with_an_optimizer_instance_reach_its_groups():
    model, reference = make_mlp(), make_mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    base = torch.optim.SGD([{"params": first}, {"params": second}], lr=0.1)
    opt = SAM([{"params": first, "rho": 0.0}, {"params": iter(second), "rho": 0.2, "adaptive": True}], base)
    assert [(g["rho"], g["adaptive"]) for g in opt.param_groups] == [(0.0, False), (0.2, True)]
    ref_first, ref_second = list(reference[0].parameters()), list(reference[2].parameters())
    ref = SAM([{"params": ref_first, "rho": 0.0}, {"params": ref_second, "rho": 0.2, "adaptive": True}],
              torch.optim.SGD, lr=0.1)
    batch = make_batches(1)[0]
    opt.zero_grad()
    mse(model, batch).backward()
    clean = [p.detach().clone() for p in first]
    assert opt.perturb()
    assert all(torch.equal(p, c) for p, c in zip(first, clean))  # the rho=0 group stayed put
    opt.restore()
    opt.step(_closure(model, opt, batch))
    ref.step(_closure(reference, ref, batch))
    assert bitwise_equal(model, reference)


def test_group_settings_an_instance_cannot_honour_are_refused():
    model = make_mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="param group 0 sets \\['rho'\\], but no group of the base_optimizer"):
        SAM([{"params": first, "rho": 0.0}, {"params": second}], base)
    with pytest.raises(ValueError, match="param group 0 sets lr=0.5, but the base_optimizer instance's group holds lr=0.1"):
        SAM([{"params": list(model.parameters()), "lr": 0.5}], base)


@pytest.mark.parametrize("method, knobs", [
    ("sam", {}), ("asam", {}), ("gsam", {"alpha": 0.3}), ("fsam", {}), ("looksam", {"interval": 2}),
    ("periodic", {"interval": 2}), ("esam", {"swp": "coordinate", "beta": 0.5, "gamma": 1.0}),
    ("esam", {"beta": 0.5, "gamma": 1.0}), ("msam", {}),
])
@pytest.mark.parametrize("base_cls, base_kwargs", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.01}),
])
def test_maximize_equals_the_same_method_minimising_the_negated_loss(method, knobs, base_cls, base_kwargs):
    """A maximising base optimizer's objective is −loss: the ascent must be that of −loss (ε = −ρ g/‖g‖), so
    the run equals the same method with maximize=False on −loss."""
    maximizing, reference = make_mlp(), make_mlp()
    opt = build_sam_optimizer(method, maximizing.parameters(), base_cls, maximize=True, **base_kwargs, **knobs)
    ref = build_sam_optimizer(method, reference.parameters(), base_cls, **base_kwargs, **knobs)
    for batch in make_batches(4):
        opt.step(_closure(maximizing, opt, batch))
        ref.step(_closure(reference, ref, batch, sign=-1.0))
    assert max_abs_diff(maximizing, reference) < 1e-12
    unperturbed = make_mlp()
    plain = base_cls(unperturbed.parameters(), maximize=True, **base_kwargs)
    for batch in make_batches(4):
        plain.zero_grad()
        mse(unperturbed, batch).backward()
        plain.step()
    assert max_abs_diff(maximizing, unperturbed) > 1e-6  # the test can tell SAM from the base step


def test_esam_selects_the_examples_whose_objective_rises_most_when_maximizing():
    model = make_mlp()
    opt = build_sam_optimizer("esam", model.parameters(), torch.optim.SGD, lr=0.1, maximize=True, gamma=0.5)
    clean, perturbed = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.5, 0.2, 1.1, 0.9])
    assert sorted(opt.select_examples(clean, perturbed).tolist()) == [1, 3]  # −loss rises most there
    minimizing = build_sam_optimizer("esam", make_mlp().parameters(), torch.optim.SGD, lr=0.1, gamma=0.5)
    assert sorted(minimizing.select_examples(clean, perturbed).tolist()) == [0, 2]


def test_numpy_settings_are_accepted_and_stored_as_python_numbers():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=np.float32(0.05), eta=np.float64(0.02),
              adaptive=np.bool_(True), lr=0.1)
    group = opt.param_groups[0]
    assert (type(group["rho"]), type(group["eta"]), type(group["adaptive"])) == (float, float, bool)
    assert group["rho"] == pytest.approx(0.05)


@pytest.mark.parametrize("bad", ["false", "no", 2, None])
def test_adaptive_must_be_a_boolean(bad):
    model = make_mlp()
    with pytest.raises(ValueError, match=f"adaptive must be True or False, got {bad!r}"):
        SAM(model.parameters(), torch.optim.SGD, adaptive=bad, lr=0.1)
    with pytest.raises(ValueError, match="param group 0: adaptive must be True or False"):
        SAM([{"params": list(model.parameters()), "adaptive": bad}], torch.optim.SGD, lr=0.1)


def test_a_refused_checkpoint_leaves_the_optimizer_as_it_was():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    state = opt.state_dict()
    state["param_groups"][0].update(rho=-0.3, lr=7.0)
    with pytest.raises(ValueError, match="loaded param group 0: rho must be a finite number >= 0, got -0.3"):
        opt.load_state_dict(state)
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["lr"]) == (0.05, 0.1)


def test_a_closure_that_does_not_zero_the_gradients_takes_the_sam_step():
    """davda54's closure (backward only, one backward already done before step) gives the SAM step."""
    model, reference = make_mlp(), make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in make_batches(3):
        def closure(batch=batch):
            loss = mse(model, batch)
            loss.backward()
            return loss

        mse(model, batch).backward()
        opt.step(closure)
        opt.zero_grad()
        reference_sam_step(reference, ref_opt, batch, rho=0.05)
    assert max_abs_diff(model, reference) < 1e-12


def test_variant_closure_steps_also_zero_the_gradients_between_passes():
    model, reference = make_mlp(), make_mlp()
    opt = build_sam_optimizer("gsam", model.parameters(), torch.optim.SGD, lr=0.1, alpha=0.2)
    ref = build_sam_optimizer("gsam", reference.parameters(), torch.optim.SGD, lr=0.1, alpha=0.2)
    for batch in make_batches(3):
        def closure(batch=batch):
            loss = mse(model, batch)
            loss.backward()
            return loss

        mse(model, batch).backward()  # stale: must not enter either pass
        opt.step(closure)
        ref.step(_closure(reference, ref, batch))
    assert max_abs_diff(model, reference) < 1e-12


def test_sam_settings_clash_check_leaves_ordinary_optimizers_alone():
    model = make_mlp()
    for base in (torch.optim.SGD, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.NAdam):
        SAM(model.parameters(), base, lr=0.01)
    SAM(model.parameters(), torch.optim.SGD(nn.ModuleList([model]).parameters(), lr=0.1))


@pytest.mark.parametrize("scale", [1e22, 1e-27], ids=["overflow", "underflow"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_a_float32_norm_out_of_range_with_finite_gradients_still_ascends(scale, adaptive):
    """Gradients of float32 weights scaled by 1e22 (a GradScaler's scale after long growth) overflow the float32
    sum of squares, by 1e-27 underflow it to zero; every element is finite and non-zero, so ε must still be the
    formula's (the direction is scale-free), and the step must not be skipped."""
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1)
    batch = make_batches(1, dtype=torch.float32)[0]
    mse(model, batch).backward()
    params = list(model.parameters())
    grads = [p.grad.double() for p in params]
    with torch.no_grad():
        for p in params:
            p.grad.mul_(scale)
    assert all(torch.isfinite(p.grad).all() for p in params)
    clean = [p.detach().double() for p in params]
    assert opt.perturb()
    eps = reference_epsilon([c for c in clean], grads, 0.05, adaptive, 0.01)
    for p, c, e in zip(params, clean, eps):
        torch.testing.assert_close(p.detach().double() - c, e.view_as(c), rtol=1e-3, atol=1e-7)
    opt.restore()
    assert opt.skipped_steps == 0
    assert 0 < float(opt.stats["grad_norm"]) < math.inf


def test_gradients_with_an_inf_are_still_skipped():
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    mse(model, make_batches(1, dtype=torch.float32)[0]).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    assert not opt.perturb() and opt.skipped_steps == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_half_precision_weights_take_the_float32_ascent_rounded_once(dtype, adaptive):
    """ε for float16/bfloat16 weights is ρ T²g/‖T g‖ formed in float32 and rounded once: neither the step size ρ/‖g‖
    (below float16's range for ‖g‖ > 1.7e6) nor T²g (above it for |g|(|w|+η)² > 65504) is formed in half precision."""
    if adaptive:  # T²g ≈ 9·3e4 at w = 3: beyond float16
        weight = nn.Parameter(torch.tensor([3.0, -2.0, 0.5, 0.0], dtype=dtype))
        grad = torch.tensor([3e4, -4e4, 1e3, 2e4], dtype=dtype)
    else:  # ‖g‖ ≈ 1.9e6: ρ/‖g‖ ≈ 2.6e-8 rounds to zero in float16
        weight = nn.Parameter(torch.linspace(0.5, 1.0, 1024, dtype=dtype))
        grad = torch.full((1024,), 6e4, dtype=dtype) * torch.tensor([1.0, -1.0], dtype=dtype).repeat(512)
    opt = SAM([weight], torch.optim.SGD, rho=0.5 if adaptive else 0.05, adaptive=adaptive, lr=0.1)
    weight.grad = grad
    clean = weight.detach().clone()
    with pytest.warns(UserWarning, match="float16/bfloat16"):
        assert opt.perturb()
    expected = reference_epsilon([clean.double()], [grad.double()], opt.param_groups[0]["rho"], adaptive, 0.01)[0]
    exact = clean.double() + expected
    assert torch.isfinite(weight).all() and not torch.equal(weight.detach(), clean)
    # one rounding of w + ε: within a unit in the last place of the weight's precision (subnormals included)
    info = torch.finfo(dtype)
    torch.testing.assert_close(weight.detach().double(), exact, rtol=info.eps, atol=info.tiny * info.eps)
    opt.restore()
    assert torch.equal(weight.detach(), clean)


def test_the_two_call_api_keeps_running_stats_to_one_update_when_the_ascent_is_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1).hold_running_stats(model)
    x = torch.randn(8, 3)
    model(x).sum().mul(0).backward()  # a zero gradient: the ascent is skipped
    assert not opt.first_step(zero_grad=True)
    after_pass_one = model[1].running_mean.clone()
    model(x).sum().mul(0).backward()  # the davda54 loop runs pass 2 anyway
    opt.second_step(zero_grad=True)
    assert torch.equal(model[1].running_mean, after_pass_one) and int(model[1].num_batches_tracked) == 1


def test_a_parameter_given_twice_is_refused():
    model = make_mlp()
    weight = model[0].weight
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(7, 5\)\) is given twice"):
        SAM([weight, weight], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="is given twice"):
        SAM([{"params": [weight]}, {"params": [model[0].bias, weight]}], torch.optim.SGD, lr=0.1)
    opt = SAM([weight], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="is given twice"):
        opt.add_param_group({"params": [model[2].weight, model[2].weight]})


def test_a_module_or_a_single_tensor_as_params_is_refused_by_name():
    model = make_mlp()
    with pytest.raises(TypeError, match="got a Sequential$"):
        SAM(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="got a Parameter: wrap it in a list"):
        SAM(model[0].weight, torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_float16_ascent_of_a_tensor_larger_than_a_chunk_is_taken_in_slices(monkeypatch, adaptive):
    """The float32 temporaries of the float16 ascent stay within CHUNK_NUMEL elements: a tensor of 100 elements
    under a 16-element chunk is taken in slices, with the same ε as in one piece."""
    from arrcoc_sam.sam import perturbation

    def perturbed(chunk: int) -> torch.Tensor:
        monkeypatch.setattr(perturbation, "CHUNK_NUMEL", chunk)
        weight = nn.Parameter(torch.linspace(-1.0, 1.0, 100, dtype=torch.float16).view(10, 10))
        weight.grad = torch.linspace(-3e4, 5e4, 100).to(torch.float16).view(10, 10)
        opt = SAM([weight], torch.optim.SGD, rho=0.5, adaptive=adaptive, lr=0.1)
        with pytest.warns(UserWarning, match="float16/bfloat16"):
            assert opt.perturb()
        return weight.detach().clone()

    whole, sliced = perturbed(1 << 22), perturbed(16)
    assert torch.isfinite(whole).all() and torch.equal(whole, sliced)


def test_the_callers_group_dicts_are_the_optimizers_groups_as_in_torch():
    model = make_mlp()
    groups = [{"params": model[0].parameters(), "rho": 0.1}, {"params": model[2].weight}]
    opt = SAM(groups, torch.optim.SGD, lr=0.1)
    assert opt.param_groups[0] is groups[0] and opt.param_groups[1] is groups[1]
    groups[0]["rho"] = 0.0  # editing one's own dict reaches the optimizer, as with torch.optim
    assert opt.param_groups[0]["rho"] == 0.0


def test_keep_settings_on_load_keeps_the_current_settings_over_the_checkpoints(caplog):
    model = make_mlp()
    saved = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1).state_dict()
    resumed = build_sam_optimizer("gsam", model.parameters(), torch.optim.SGD, lr=0.1, rho=0.2, rho_min=0.1)
    with pytest.raises(ValueError, match="rho_min must be in"):  # the checkpoint's ρ is below this run's rho_min
        resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["rho"] == 0.2  # refused before anything loaded
    with caplog.at_level("WARNING", logger="arrcoc_sam.sam.optimizer"):
        resumed.keep_settings_on_load().load_state_dict(saved)
    assert resumed.param_groups[0]["rho"] == 0.2 and "rho: 0.05 -> 0.2" in caplog.text


def test_a_new_wrapper_over_a_held_instance_replaces_the_earlier_wrappers_settings_and_keeps_the_users():
    """The first wrapper's defaults sat in the instance's groups, so a second wrapper (ASAM at ρ=0.5) kept
    training plain SAM at 0.05, and periodic's ρ scaling compounded (0.1 x4 -> 0.4 -> 1.6)."""
    model = make_mlp()
    base = torch.optim.SGD([{"params": [model[0].weight, model[2].weight]},
                            {"params": [model[0].bias, model[2].bias], "rho": 0.0}], lr=0.1)
    SAM(model.parameters(), base, rho=0.05)
    asam = build_sam_optimizer("asam", model.parameters(), base, rho=0.5, eta=0.02)
    assert [(g["rho"], g["adaptive"], g["eta"]) for g in asam.param_groups] == [(0.5, True, 0.02), (0.0, True, 0.02)]
    for _ in range(2):
        periodic = build_sam_optimizer("periodic", model.parameters(), base, rho=0.1, interval=4, rho_scaling="linear")
        assert [g["rho"] for g in periodic.param_groups] == [0.4, 0.0]
    # per-group settings given to a wrapper are that wrapper's: the next one starts from the base's groups
    groups = [{"params": base.param_groups[0]["params"], "rho": 0.3}, {"params": base.param_groups[1]["params"]}]
    assert [g["rho"] for g in SAM(groups, base, rho=0.05).param_groups] == [0.3, 0.0]
    gsam = build_sam_optimizer("gsam", model.parameters(), base, rho=0.2, rho_min=0.1)
    assert [g["rho"] for g in gsam.param_groups] == [0.2, 0.0]
    plain = SAM(model.parameters(), base, rho=0.05)
    assert [g["rho"] for g in plain.param_groups] == [0.05, 0.0]
    assert all(key not in group for group in plain.param_groups for key in ("rho_min", "lr_min", "lr_max"))


def test_loading_the_base_optimizer_directly_goes_through_the_wrappers_checks_and_kept_settings(caplog):
    """Accelerate's load_state loads the base optimizer: the checkpoint's ρ/adaptive silently won, and a plain
    AdamW checkpoint dropped `rho` (KeyError at the next ascent)."""
    model = make_mlp()
    saved_asam = build_sam_optimizer("asam", model.parameters(), torch.optim.SGD, lr=0.1, rho=0.5).state_dict()
    saved_plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = SAM(model.parameters(), base, rho=0.05)
    base.load_state_dict(saved_plain)
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["adaptive"] is False
    with caplog.at_level("WARNING", logger="arrcoc_sam.sam.optimizer"):
        opt.keep_settings_on_load()
        base.load_state_dict(saved_asam)
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["adaptive"]) == (0.05, False)
    assert "adaptive: True -> False" in caplog.text and "rho: 0.5 -> 0.05" in caplog.text
    bad = copy.deepcopy(saved_plain)
    bad["param_groups"][0]["rho"] = -1.0
    twin = copy.deepcopy(opt)  # a copy routes its base's loads through itself, not through the original
    twin._kept_settings = None
    with pytest.raises(ValueError, match=r"loaded param group 0: rho must be"):
        twin.base_optimizer.load_state_dict(bad)
    assert twin.param_groups[0]["rho"] == 0.05


def test_step_inside_the_perturbed_block_is_refused_instead_of_losing_the_update():
    """`scaler.step(opt)` indented into `with opt.perturbed():` stepped at w + ε, and the restore then copied the
    clean weights back over the update: nothing trained, silently."""
    model = make_mlp()
    for opt in (SAM(model.parameters(), torch.optim.SGD, lr=0.1),
                build_sam_optimizer("looksam", model.parameters(), torch.optim.SGD, lr=0.1, interval=2)):
        mse(model, make_batches(1)[0]).backward()
        steps = getattr(opt, "optimizer_steps", None)
        with opt.perturbed() as ok:
            assert ok
            with pytest.raises(RuntimeError, match=r"step\(\) while the weights are perturbed"):
                opt.step()
        assert getattr(opt, "optimizer_steps", None) == steps
        opt.zero_grad()


def test_named_parameters_are_checked_for_duplicates_and_match_an_instance():
    model = make_mlp()
    weight = model[0].weight
    with pytest.raises(ValueError, match="is given twice"):
        SAM([("a", weight), ("b", weight)], torch.optim.SGD, lr=0.1)
    opt = SAM(model.named_parameters(), torch.optim.AdamW(model.named_parameters(), lr=0.1))
    assert opt.param_groups[0]["param_names"][0] == "0.weight"


def test_sparse_adam_is_refused_at_construction():
    with pytest.raises(TypeError, match="SparseAdam steps on sparse gradients only"):
        SAM(make_mlp().parameters(), torch.optim.SparseAdam, lr=0.1)


@pytest.mark.parametrize("bad", [-0.05, math.nan, math.inf, "0.05", None])
def test_rho_set_in_place_is_checked_at_the_next_ascent(bad):
    """A hand-written ρ schedule wrote a bad value: a negative one silently descended, NaN/inf made the weights
    NaN, and the run's checkpoint could not be loaded afterwards."""
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    mse(model, make_batches(1)[0]).backward()
    opt.param_groups[0]["rho"] = bad
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param group 0: rho must be a finite number >= 0"):
        opt.perturb()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_tiny_gradients_give_the_formulas_epsilon(adaptive):
    """float32 gradients of 1e-41 (subnormal): ρ/‖g‖ exceeds float32's range (perturb raised); float32 and
    float64 tensors with gradients of 1e-30: the float32 share of the norm underflowed (ε 41 % off)."""
    for dtypes, scale in (((torch.float32, torch.float32), 1e-41), ((torch.float64, torch.float32), 1e-30)):
        params = [nn.Parameter(torch.linspace(-1, 1, 6, dtype=dtype) + index) for index, dtype in enumerate(dtypes)]
        for p in params:
            p.grad = torch.full_like(p, scale)
        clean = [p.detach().double().clone() for p in params]
        opt = SAM(params, torch.optim.SGD, lr=0.1, rho=0.05, adaptive=adaptive)
        assert opt.perturb()
        grads = [p.grad.double() for p in params]
        expected = reference_epsilon(clean, grads, 0.05, adaptive, 0.01)
        for p, c, e in zip(params, clean, expected):
            assert torch.allclose(p.detach().double() - c, e, rtol=1e-5, atol=1e-8)
        opt.restore()


def test_zero_size_parameters_do_not_break_a_skipped_ascent():
    """A zero-element tensor made the float64 check of a zero or infinite norm raise (`_foreach_norm cannot
    compute the infinity norm on an empty tensor`)."""
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(0))]
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    for fill in (0.0, math.inf):
        for p in params:
            p.grad = torch.full_like(p, fill)
        assert opt.perturb() is False
    assert opt.skipped_steps == 2


class _HooklessSGD(torch.optim.SGD):
    """A base optimizer whose load_state_dict skips torch's load hooks (as bitsandbytes' 8-bit ones do)."""

    def load_state_dict(self, state_dict):
        hooks = (self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks


def test_the_wrappers_own_load_checks_and_keeps_settings_without_the_base_optimizers_hooks():
    model = make_mlp()
    saved_asam = build_sam_optimizer("asam", model.parameters(), torch.optim.SGD, lr=0.1, rho=0.5).state_dict()
    opt = SAM(model.parameters(), _HooklessSGD, lr=0.1, rho=0.05).keep_settings_on_load()
    opt.load_state_dict(saved_asam)
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["adaptive"]) == (0.05, False)
    plain = SAM(model.parameters(), _HooklessSGD, lr=0.1, rho=0.05)
    plain.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    assert plain.param_groups[0]["rho"] == 0.05


def test_a_refused_new_wrapper_leaves_the_earlier_one_working():
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    first = SAM(model.parameters(), base, rho=0.05)
    with pytest.raises(ValueError, match="rho_min must be in"):
        build_sam_optimizer("gsam", model.parameters(), base, rho=0.2, rho_min=0.5)
    assert first.param_groups[0]["rho"] == 0.05 and "rho_min" not in first.param_groups[0]
    with pytest.raises(ValueError, match="loaded param group 0: rho must be"):  # its load hooks are back
        bad = base.state_dict()
        bad["param_groups"][0]["rho"] = -1.0
        base.load_state_dict(bad)


def test_a_refused_param_group_is_not_recorded_and_named_groups_match_an_instance():
    model = make_mlp()
    base = torch.optim.SGD([{"params": [model[0].weight]}], lr=0.1)
    opt = SAM([{"params": [model[0].weight]}], base, rho=0.05)
    with pytest.raises(ValueError, match="new param group: rho must be"):
        opt.add_param_group({"params": [model[0].bias], "rho": -1.0})
    opt.add_param_group({"params": [model[2].weight], "rho": 0.1})
    again = SAM([model[0].weight, model[2].weight], base, rho=0.2)
    assert [group["rho"] for group in again.param_groups] == [0.2, 0.1]
    named = torch.optim.SGD([{"params": list(model.named_parameters())}], lr=0.1)
    SAM([{"params": list(model.named_parameters()), "rho": 0.1}], named)
    assert named.param_groups[0]["rho"] == 0.1


def test_a_refused_wrapper_leaves_no_settings_on_the_instance_even_after_construction():
    """A refused first wrapper left ρ/η and GSAM's keys in the base's groups (the next SAM then ran at the refused
    ρ), and a refusal after construction (SAMSettings' scope check) left the refused wrapper's settings and took
    the earlier wrapper's hooks."""
    from arrcoc_sam.integrations._settings import SAMSettings

    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rho_min must be in"):
        build_sam_optimizer("gsam", model.parameters(), base, rho=0.01, rho_min=0.5)
    assert set(base.param_groups[0]) == set(torch.optim.SGD(model.parameters(), lr=0.1).param_groups[0])
    first = SAM(model.parameters(), base, rho=0.2)
    with pytest.raises(ValueError, match="sam_scope=per_device"):
        SAMSettings(method="looksam", rho=0.5, scope="per_device").build(base)
    assert first.param_groups[0]["rho"] == 0.2 and "sam_variant" not in base.state_dict()
    bad = base.state_dict()
    bad["param_groups"][0]["rho"] = -1.0
    with pytest.raises(ValueError, match="loaded param group 0: rho must be"):  # the first wrapper's hooks
        base.load_state_dict(bad)


def _embedding_model(sparse: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"embed": nn.Embedding(10, 4, sparse=sparse), "head": nn.Linear(4, 1)})


def _embedding_loss(model: nn.Module) -> torch.Tensor:
    tokens = torch.tensor([[1, 2, 2], [3, 1, 4]])
    return model["head"](model["embed"](tokens).mean(dim=1)).square().mean()


@pytest.mark.parametrize("head_rho", [0.05, 0.0])
def test_a_sparse_gradient_in_a_rho_zero_group_steps_as_the_bare_optimizer_does_with_sam_on_the_rest(head_rho):
    """A sparse embedding put in a ρ = 0 group (what the sparse refusal suggests) made the pass-2 update check die
    on ``reshape`` of its sparse gradient; with ρ = 0 everywhere it died too. Its step must equal plain SGD's on the
    gradient at w + ε (at w where nothing is perturbed), and the rest SAM's."""
    model, reference = _embedding_model(sparse=True), _embedding_model(sparse=False)
    opt = SAM([{"params": model["embed"].parameters(), "rho": 0.0}, {"params": model["head"].parameters(),
               "rho": head_rho}], torch.optim.SGD, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = _embedding_loss(model)
        loss.backward()
        return loss

    opt.step(closure)
    assert model["embed"].weight.grad.is_sparse and opt.skipped_steps == 0
    head = list(reference["head"].parameters())
    grads = torch.autograd.grad(_embedding_loss(reference), head)
    eps = reference_epsilon(head, grads, head_rho, False, 0.0) if head_rho else [torch.zeros_like(p) for p in head]
    with torch.no_grad():
        for p, e in zip(head, eps):
            p.add_(e.view_as(p))
    grads_at_eps = torch.autograd.grad(_embedding_loss(reference), list(reference.parameters()))
    with torch.no_grad():
        for p, e in zip(head, eps):
            p.sub_(e.view_as(p))
        for p, g in zip(reference.parameters(), grads_at_eps):
            p.sub_(0.1 * g)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_a_nan_in_a_sparse_or_complex_rho_zero_gradient_skips_the_step_with_the_weights_unchanged():
    """The update check read a complex NaN gradient through a cast to float that raised instead of skipping."""
    model = _embedding_model(sparse=True)
    weight = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = SAM([{"params": [model["embed"].weight, weight], "rho": 0.0},
               {"params": model["head"].parameters()}], torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in (model["embed"].weight, weight, *model["head"].parameters())]

    def closure(poison: str):
        def run():
            opt.zero_grad()
            loss = _embedding_loss(model) + (weight.abs() ** 2).sum()
            loss.backward()
            if poison == "complex":
                weight.grad[0] = complex(math.nan, 0.0)
            elif poison == "sparse":
                model["embed"].weight.grad = model["embed"].weight.grad * math.inf
            return loss
        return run

    for poison in ("complex", "sparse"):
        opt.step(closure(poison))
        after = (model["embed"].weight, weight, *model["head"].parameters())
        assert all(torch.equal(a, b) for a, b in zip(after, before)), poison
    opt.step(closure("none"))
    assert not torch.equal(weight, before[1]) and not torch.equal(model["embed"].weight, before[0])


@pytest.mark.parametrize("how", ["base.add_param_group", "param_groups.append"])
def test_a_group_added_to_the_base_optimizer_directly_gets_the_wrappers_defaults(how):
    """A group added behind the wrapper's back made the next perturb() die with a bare KeyError('rho'); it now
    gets what SAM.add_param_group gives (the wrapper's ρ/adaptive/η), and the ascent norm covers it."""
    model = make_mlp()
    base = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)
    opt = SAM(base.param_groups[0]["params"], base, rho=0.07)
    rest = {"params": [model[2].weight, model[2].bias]}
    if how == "base.add_param_group":
        base.add_param_group(rest)
    else:
        rest.update({key: value for key, value in base.defaults.items() if key not in rest})
        opt.param_groups.append(rest)
    batch = make_batches(1)[0]
    params = list(model.parameters())
    grads = torch.autograd.grad(mse(model, batch), params)
    expected = reference_epsilon(params, grads, 0.07, False, 0.0)
    clean = [p.detach().clone() for p in params]
    _closure(model, opt, batch)()
    assert opt.perturb()
    assert {key: opt.param_groups[1][key] for key in ("rho", "adaptive", "eta")} == {
        "rho": 0.07, "adaptive": False, "eta": 0.01}
    for p, c, e in zip(params, clean, expected):
        torch.testing.assert_close(p - c, e.view_as(p), rtol=1e-10, atol=1e-12)
    opt.restore()
    assert all(torch.equal(p, c) for p, c in zip(params, clean))


def test_a_bad_setting_in_a_group_added_to_the_base_directly_is_named():
    model = make_mlp()
    base = torch.optim.SGD([model[0].weight], lr=0.1)
    opt = SAM([model[0].weight], base, rho=0.05)
    base.add_param_group({"params": [model[2].weight], "eta": -1.0})
    _closure(model, opt, make_batches(1)[0])()
    with pytest.raises(ValueError, match=r"param group 1 \(added to the base optimizer directly\): eta"):
        opt.perturb()
    assert not opt.is_perturbed


def test_skipped_updates_counts_the_base_steps_left_out_and_skipped_steps_the_ascents():
    """A step skipped for a NaN at w + ε was counted nowhere; a zero-norm ascent still steps the base."""
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    batch = make_batches(1)[0]

    def closure(poison_pass: int | None, zero: bool = False):
        calls = []

        def run():
            opt.zero_grad()
            loss = mse(model, batch) * (0.0 if zero else 1.0)
            loss.backward()
            calls.append(None)
            if len(calls) == poison_pass:
                model[2].bias.grad[0] = math.nan
            return loss
        return run

    counts = []
    for poison_pass, zero in ((2, False), (1, False), (None, True), (None, False)):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure(poison_pass, zero))
        moved = not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        counts.append((opt.skipped_steps, opt.skipped_updates, moved))
    # NaN at w + ε: update skipped; NaN at w: ascent and update skipped; zero loss: ascent skipped, the base
    # step runs (SGD on a zero gradient leaves the weights); then a normal step
    assert counts == [(0, 1, False), (1, 2, False), (2, 2, False), (2, 2, True)]


def test_loading_a_checkpoint_with_other_settings_says_which_ones_replace_the_optimizers(caplog):
    """The checkpoint's ρ/adaptive win on load (documented); it used to happen without a word."""
    model = make_mlp()
    saved = SAM(model.parameters(), torch.optim.SGD, rho=1.0, adaptive=True, lr=0.1)
    _closure(model, saved, make_batches(1)[0])()
    saved.step()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with caplog.at_level("INFO", logger="arrcoc_sam.sam.optimizer"):
        opt.load_state_dict(opt.state_dict())
        assert "replace this optimizer's" not in caplog.text
        opt.load_state_dict(saved.state_dict())
    assert (opt.param_groups[0]["rho"], opt.param_groups[0]["adaptive"]) == (1.0, True)
    assert "group 0 rho: 0.05 -> 1.0" in caplog.text and "group 0 adaptive: False -> True" in caplog.text


@pytest.mark.parametrize("method, knobs", [
    ("sam", {}), ("gsam", {}), ("fsam", {}), ("looksam", {"interval": 2}), ("periodic", {"interval": 2}),
    ("msam", {}), ("esam", {"gamma": 1.0}),
])
def test_every_method_takes_a_group_added_to_the_base_directly_with_the_wrappers_defaults(method, knobs):
    """The defaults were filled in SAM.perturb only; fsam, gsam, looksam and esam read ρ before it and died with
    KeyError('rho')."""
    model = make_mlp()
    base = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1, momentum=0.9)
    opt = build_sam_optimizer(method, base.param_groups[0]["params"], base, rho=0.07, **knobs)
    base.add_param_group({"params": [model[2].weight, model[2].bias]})
    batch = make_batches(1)[0]
    before = model[2].weight.detach().clone()
    for _ in range(3):
        opt.step(_closure(model, opt, batch))
    assert opt.param_groups[1]["rho"] == opt.param_groups[0]["rho"] and opt.param_groups[1]["eta"] == 0.01
    assert not torch.equal(model[2].weight, before)


def test_periodic_scales_the_explicit_rho_of_a_group_added_to_the_base_directly():
    model = make_mlp()
    base = torch.optim.SGD([model[0].weight], lr=0.1)
    opt = build_sam_optimizer("periodic", [model[0].weight], base, rho=0.05, interval=4, rho_scaling="sqrt")
    base.add_param_group({"params": [model[2].weight], "rho": 0.1})
    _closure(model, opt, make_batches(1)[0])()
    opt.before_first_pass()
    assert opt.param_groups[1]["rho"] == pytest.approx(0.2)  # 0.1 · 4^½, as add_param_group scales it


def test_a_group_added_directly_and_then_one_through_the_wrapper_keep_the_undo_record_in_step():
    """A later wrapper of the instance puts back each group's own entries from the record, in group order; the
    wrapper's add_param_group recorded its group at the place of the one added directly before it."""
    model = make_mlp()
    base = torch.optim.SGD([model[0].weight], lr=0.1)
    opt = SAM([model[0].weight], base, rho=0.05)
    base.add_param_group({"params": [model[0].bias]})
    opt.add_param_group({"params": [model[2].weight], "rho": 0.3})
    again = SAM([model[0].weight, model[0].bias, model[2].weight], base, rho=0.02)
    assert [group["rho"] for group in again.param_groups] == [0.02, 0.02, 0.3]


# -- mutation round 26 (engine core): each test below failed on a surviving mutant ------------------------------
@pytest.mark.parametrize("eta", [math.inf, math.nan])
def test_a_non_finite_eta_is_refused_at_construction_and_when_set_in_place(eta):
    model = make_mlp()
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0"):
        SAM(model.parameters(), torch.optim.SGD, eta=eta, lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, adaptive=True, lr=0.1)
    mse(model, make_batches(1)[0]).backward()
    opt.param_groups[0]["eta"] = eta
    with pytest.raises(ValueError, match=r"param group 0: eta must be a finite number >= 0"):
        opt.perturb()


def test_base_kwargs_beside_an_optimizer_instance_are_refused():
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"base_kwargs \['lr'\] were given with an optimizer instance"):
        SAM(model.parameters(), base, lr=0.5)
    assert base.param_groups[0]["lr"] == 0.1 and "rho" not in base.param_groups[0]


def test_params_naming_a_tensor_of_the_instance_twice_are_refused():
    weight = nn.Parameter(torch.ones(2))
    base = torch.optim.SGD([weight], lr=0.1)
    with pytest.raises(ValueError, match="holds 1 tensors that differ from the 2 tensors"):
        SAM([weight, weight], base)


def test_per_group_numpy_settings_are_stored_as_python_numbers_and_load_with_weights_only(tmp_path):
    """The constructor's own arguments are converted anyway; a group dict's are converted by the group check."""
    model = make_mlp()
    opt = SAM([{"params": model.parameters(), "rho": np.float32(0.25), "eta": np.float64(0.5),
                "adaptive": np.bool_(True)}], torch.optim.SGD, lr=0.1)
    group = opt.param_groups[0]
    assert (type(group["rho"]), type(group["eta"]), type(group["adaptive"])) == (float, float, bool)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["param_groups"][0]["rho"] == 0.25 and loaded["param_groups"][0]["adaptive"] is True


def test_a_sparse_gradient_in_a_perturbed_group_is_refused_by_name():
    torch.manual_seed(0)
    embed = nn.Embedding(10, 4, sparse=True)
    opt = SAM(embed.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    embed(torch.tensor([1, 2])).sum().backward()
    before = embed.weight.detach().clone()
    with pytest.raises(RuntimeError, match="SAM does not support sparse gradients"):
        opt.perturb()
    assert torch.equal(embed.weight, before) and not opt.is_perturbed


def test_a_group_added_through_the_wrapper_takes_the_next_wrappers_defaults():
    """add_param_group records the group's own entries, so a later wrapper of the instance puts them back instead
    of keeping the earlier wrapper's default ρ."""
    model = make_mlp()
    base = torch.optim.SGD([model[0].weight], lr=0.1)
    first = SAM([model[0].weight], base, rho=0.1)
    first.add_param_group({"params": [model[2].weight]})
    assert [g["rho"] for g in base.param_groups] == [0.1, 0.1]
    second = SAM([model[0].weight, model[2].weight], base, rho=0.3)
    assert [g["rho"] for g in second.param_groups] == [0.3, 0.3]


def test_a_wrapper_refused_before_it_touches_the_instance_leaves_its_hooks_as_they_were():
    """The refused wrapper put the earlier wrapper's load hooks back a second time: each load then ran the
    wrapper's checks twice, and the second run dropped a variant's own state (taken out by the first)."""
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    looksam = build_sam_optimizer("looksam", model.parameters(), base, rho=0.05)
    hooks = [len(base._optimizer_load_state_dict_pre_hooks), len(base._optimizer_load_state_dict_post_hooks),
             len(base._optimizer_state_dict_post_hooks)]
    looksam.optimizer_steps = 3
    saved = base.state_dict()
    with pytest.raises(ValueError, match="rho must be a finite number"):
        SAM(model.parameters(), base, rho=-1.0)
    assert [len(base._optimizer_load_state_dict_pre_hooks), len(base._optimizer_load_state_dict_post_hooks),
            len(base._optimizer_state_dict_post_hooks)] == hooks
    looksam.optimizer_steps = 0
    base.load_state_dict(saved)
    assert looksam.optimizer_steps == 3


def test_putting_back_a_snapshot_removes_the_hooks_of_the_wrapper_built_since():
    from arrcoc_sam.sam.optimizer import snapshot_wrapping

    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    first = SAM(model.parameters(), base, rho=0.2)
    restore = snapshot_wrapping(base)
    later = build_sam_optimizer("looksam", model.parameters(), base, rho=0.5)  # kept alive: its hooks could act
    restore()
    assert later.param_groups[0]["rho"] == 0.2  # the groups are the instance's, as they were
    assert "sam_variant" not in base.state_dict()  # looksam's state hook is gone
    assert first.state_dict()["param_groups"][0]["rho"] == 0.2


def test_an_earlier_variant_wrappers_user_set_keys_come_back_for_the_next_wrapper():
    """A group key of a variant (GSAM's rho_min) that the user set on the instance belongs to the user: a later
    wrapper puts it back as it was, it does not drop it."""
    model = make_mlp()
    base = torch.optim.SGD([{"params": list(model.parameters()), "rho_min": 0.01}], lr=0.1)
    gsam = build_sam_optimizer("gsam", model.parameters(), base, rho=0.2, rho_min=0.1)
    assert gsam.param_groups[0]["rho_min"] == 0.01
    SAM(model.parameters(), base, rho=0.05)
    assert base.param_groups[0]["rho_min"] == 0.01


def test_a_step_skipped_for_a_non_finite_ascent_leaves_no_update_check_behind():
    """The skip already covers the step: the restore takes no ‖g‖ for it, so none is pending after that step."""
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    batch = make_batches(1)[0]
    mse(model, batch).backward()
    model[0].weight.grad[0, 0] = math.inf
    assert not opt.perturb() and opt.next_step_skipped
    opt.zero_grad()
    mse(model, batch).backward()  # pass 2, at w: finite
    opt.restore()
    opt.step()
    assert opt.skipped_updates == 1 and opt.take_update_norm() is None


def test_abort_after_a_skipped_two_call_ascent_puts_the_running_stats_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1).hold_running_stats(model)
    x = torch.randn(16, 4)
    model(x).sum().backward()
    for p in model.parameters():
        p.grad.zero_()  # a zero norm: no ascent
    before = [b.clone() for b in model[1].buffers()]
    assert not opt.first_step()
    model(x + 3.0)  # pass 2 moves the running statistics, then the loop fails
    opt.abort_perturbation()
    assert all(torch.equal(a, b) for a, b in zip(model[1].buffers(), before, strict=True))


def test_a_closure_that_does_not_zero_ignores_a_stale_gradient_of_another_batch():
    """step(closure) zeroes first: a gradient left from an earlier batch must not bend the ascent direction."""
    model, reference = make_mlp(), make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    stale, batch = make_batches(2)

    def closure():
        loss = mse(model, batch)
        loss.backward()
        return loss

    mse(model, stale).backward()
    opt.step(closure)
    reference_sam_step(reference, ref_opt, batch, rho=0.05)
    assert max_abs_diff(model, reference) < 1e-12


def test_step_with_a_closure_returns_the_loss_at_the_clean_weights():
    model = make_mlp()
    batch = make_batches(1)[0]
    clean = mse(model, batch).item()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    loss = opt.step(_closure(model, opt, batch))
    assert loss.item() == clean


def test_zero_grad_passes_set_to_none_to_the_base_optimizer():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    mse(model, make_batches(1)[0]).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_train_and_eval_reach_the_base_optimizers_own_modes():
    class Moded(torch.optim.SGD):
        mode = None

        def train(self):
            self.mode = "train"

        def eval(self):
            self.mode = "eval"

    model = make_mlp()
    opt = SAM(model.parameters(), Moded, lr=0.1)
    opt.eval()
    assert opt.base_optimizer.mode == "eval"
    opt.train()
    assert opt.base_optimizer.mode == "train"


def test_loading_a_checkpoint_drops_the_update_check_of_the_run_before():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    saved = opt.state_dict()
    mse(model, make_batches(1)[0]).backward()
    with opt.perturbed():
        model[0].weight.grad[0, 0] = math.nan
    opt.load_state_dict(saved)
    assert opt.take_update_norm() is None


def test_a_load_the_base_refuses_leaves_the_wrappers_hooks_on_the_base_acting():
    """The wrapper's hooks stand down only while its own load_state_dict runs, also when that load raises."""
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    base = opt.base_optimizer
    wrong = opt.state_dict()
    wrong["param_groups"] = wrong["param_groups"] * 2
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(wrong)
    bad = opt.state_dict()
    bad["param_groups"][0]["rho"] = -1.0
    with pytest.raises(ValueError, match="loaded param group 0: rho must be"):
        base.load_state_dict(bad)


@pytest.mark.parametrize("name", ["MySAM", "none", ""])
def test_a_method_name_that_is_not_lower_case_or_is_none_cannot_be_registered(name):
    from arrcoc_sam.sam.registry import available_methods, register_method

    with pytest.raises(ValueError, match="method name must be a non-empty lower-case string other than 'none'"):
        register_method(name, SAM)
    assert name not in available_methods()[1:]


def test_none_is_listed_first_and_the_methods_after_it_in_order():
    from arrcoc_sam.sam.registry import available_methods

    names = available_methods()
    assert names[0] == "none" and list(names[1:]) == sorted(names[1:]) and {"asam", "sam"} <= set(names)


def test_a_provider_that_fails_on_a_missing_dependency_raises_and_a_missing_provider_is_skipped(monkeypatch, tmp_path):
    from arrcoc_sam.sam import registry

    (tmp_path / "arrcoc_broken_provider.py").write_text("import arrcoc_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PROVIDERS", ("arrcoc_no_such_provider",))
    monkeypatch.setattr(registry, "_providers_loaded", False)
    assert "sam" in registry.available_methods()  # a provider that is not installed is left out
    monkeypatch.setattr(registry, "_PROVIDERS", ("arrcoc_broken_provider",))
    monkeypatch.setattr(registry, "_providers_loaded", False)
    with pytest.raises(ModuleNotFoundError, match="arrcoc_no_such_dependency"):
        registry.available_methods()


def test_a_builder_from_a_module_that_only_starts_like_the_package_is_not_builtin(monkeypatch):
    from arrcoc_sam.sam import registry

    def builder(params, base_optimizer, **knobs):
        return SAM(params, base_optimizer, **knobs)

    builder.__module__ = "arrcoc_sam_plugins.methods"
    monkeypatch.setitem(registry._BUILDERS, "plugin_sam", builder)
    assert not registry.is_builtin_method("plugin_sam") and registry.is_builtin_method("sam")


class _StateHooklessSGD(torch.optim.SGD):
    """A base optimizer whose state_dict skips torch's state-dict hooks (as some third-party optimizers do)."""

    def state_dict(self):
        hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = {}
        try:
            return super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = hooks


def test_a_variants_own_state_is_saved_also_with_a_base_that_skips_the_state_dict_hooks():
    model = make_mlp()
    opt = build_sam_optimizer("looksam", model.parameters(), _StateHooklessSGD, rho=0.05, lr=0.1)
    opt.optimizer_steps = 4
    assert "sam_variant" not in opt.base_optimizer.state_dict()
    assert opt.state_dict()["sam_variant"]["optimizer_steps"] == 4


def test_a_copy_of_a_wrapper_hands_its_instance_back_to_the_next_wrapper_as_the_user_built_it():
    """The copy carries the record of what the wrapper changed on the instance, so a later wrapper of the copy's
    instance starts from the user's groups (no ρ), not from the first wrapper's ρ."""
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    clone = copy.deepcopy(SAM(model.parameters(), base, rho=0.1))
    params = [p for group in clone.param_groups for p in group["params"]]
    assert SAM(params, clone.base_optimizer, rho=0.3).param_groups[0]["rho"] == 0.3


def test_float16_asam_forms_its_scaling_in_float32_so_w_plus_epsilon_is_the_rounded_exact_value():
    """T = |w| + η is not a float16 number for η = 0.05; formed in float16, it moved about half of these 64 weights
    (ε of a few units, ρ = 20) by an ulp against float64's formula rounded once."""
    gen = torch.Generator().manual_seed(0)
    clean = (torch.rand(64, generator=gen, dtype=torch.float64) * 2 + 0.5).half()
    grad = torch.randn(64, generator=gen, dtype=torch.float64).half()
    weight = nn.Parameter(clean.clone())
    opt = SAM([weight], torch.optim.SGD, rho=20.0, adaptive=True, eta=0.05, lr=0.1)
    weight.grad = grad
    with pytest.warns(UserWarning, match="float16/bfloat16"):
        assert opt.perturb()
    t = clean.double().abs() + 0.05
    exact = clean.double() + 20.0 * t * t * grad.double() / (t * grad.double()).norm()
    assert torch.equal(weight.detach(), exact.half())


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_bfloat16_weights_with_subnormal_gradients_take_the_float64_ascent(adaptive):
    """‖g‖ ≈ 1.4e-40 (bfloat16 reaches below float32's normal range): ρ/‖g‖ ≈ 3.5e39 exceeds float32, so ε is formed
    in float64 for bfloat16 weights too, and lands finite and exact up to one rounding."""
    weight = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    grad = torch.tensor([1e-40, -1e-40], dtype=torch.bfloat16)
    opt = SAM([weight], torch.optim.SGD, rho=0.5, adaptive=adaptive, eta=0.01, lr=0.1)
    weight.grad = grad
    clean = weight.detach().clone()
    with pytest.warns(UserWarning, match="float16/bfloat16"):
        assert opt.perturb()
    expected = clean.double() + reference_epsilon([clean.double()], [grad.double()], 0.5, adaptive, 0.01)[0]
    assert torch.equal(weight.detach(), expected.to(torch.bfloat16))
