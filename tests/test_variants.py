"""The cheaper sharpness-aware variants against float64 references written from each paper's formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_sam_engine import bitwise_equal, make_batches, make_mlp, max_abs_diff
from torch import nn
from torch.func import functional_call

from arrcoc_sam.sam.registry import available_methods, build_sam_optimizer
from arrcoc_sam.sam.variants import ESAM, GSAM, VARIANTS, FriendlySAM, LookSAM, MomentumSAM, PeriodicSAM

LR, MOMENTUM, RHO = 0.05, 0.9, 0.1


# -- a functional float64 reference: weights as one flat vector ---------------------------------------
class Flat:
    """The model as a function of one flat weight vector w (float64), with hand-written SGD / AdamW."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.named = [(n, p.shape) for n, p in model.named_parameters()]
        self.w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        self.buf = None
        self.adam = (torch.zeros_like(self.w), torch.zeros_like(self.w), 0)

    def per_example(self, w, batch, idx=None):
        x, y = batch
        if idx is not None:
            x, y = x[idx], y[idx]
        params, start = {}, 0
        for name, shape in self.named:
            n = math.prod(shape)
            params[name] = w[start : start + n].view(shape)
            start += n
        return ((functional_call(self.model, params, (x,)) - y) ** 2).mean(dim=1)

    def grad(self, w, batch, idx=None):
        w = w.detach().requires_grad_(True)
        return torch.autograd.grad(self.per_example(w, batch, idx).mean(), w)[0]

    def sgd(self, g, lr=LR):
        self.buf = g.clone() if self.buf is None else MOMENTUM * self.buf + g
        self.w = self.w - lr * self.buf

    def adamw(self, g, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.1):
        m, v, t = self.adam
        t += 1
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        self.adam = (m, v, t)
        self.w = self.w * (1 - lr * wd)
        self.w = self.w - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)

    def assert_matches(self, model, tol=1e-10):
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert (got - self.w).abs().max().item() <= tol


def unit(v):
    return v / torch.linalg.vector_norm(v)


def per_example_closure(model, opt, batch):
    """ESAM's per-example protocol: losses [B] (or [len(indices)]) with graph, no backward."""
    x, y = batch

    def closure(indices=None):
        xs, ys = (x, y) if indices is None else (x[indices], y[indices])
        return ((model(xs) - ys) ** 2).mean(dim=1)

    return closure


def sam_closure(model, opt, batch):
    x, y = batch

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def sgd_variant(cls, model, **knobs):
    return cls(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **knobs)


# -- each variant against its paper's update, 12 steps, SGD with momentum -----------------------------
@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("sqrt", math.sqrt(3)), ("linear", 3.0)])
def test_periodic_sams_every_kth_step_with_scaled_rho_matches_reference(scaling, factor):
    model = make_mlp()
    ref = Flat(make_mlp())
    opt = sgd_variant(PeriodicSAM, model, rho=RHO, interval=3, rho_scaling=scaling)
    for t, batch in enumerate(make_batches(12)):
        opt.step(sam_closure(model, opt, batch))
        g = ref.grad(ref.w, batch)
        if t % 3 == 0:
            g = ref.grad(ref.w + RHO * factor * unit(g), batch)
        ref.sgd(g)
    ref.assert_matches(model)


def test_looksam_reuses_global_orthogonal_direction_matches_reference():
    model = make_mlp()
    ref = Flat(make_mlp())
    alpha = 0.7
    opt = sgd_variant(LookSAM, model, rho=RHO, interval=3, alpha=alpha)
    g_v = None
    for t, batch in enumerate(make_batches(12)):
        opt.step(sam_closure(model, opt, batch))
        g = ref.grad(ref.w, batch)
        if t % 3 == 0:
            g_s = ref.grad(ref.w + RHO * unit(g), batch)
            cos = torch.dot(g, g_s) / (g.norm() * g_s.norm())
            g_v = g_s - g_s.norm() * cos * unit(g)
            update = g_s
        else:
            update = g + alpha * (g.norm() / g_v.norm()) * g_v
        ref.sgd(update)
    ref.assert_matches(model)


@pytest.mark.parametrize("beta, gamma", [(0.5, 0.5), (1.0, 0.5), (0.5, 1.0)], ids=["swp+sds", "sds", "swp"])
def test_esam_weight_masks_and_data_selection_match_reference(beta, gamma):
    model = make_mlp()
    ref = Flat(make_mlp())
    opt = sgd_variant(ESAM, model, rho=RHO, beta=beta, gamma=gamma, seed=7)
    for t, batch in enumerate(make_batches(10)):
        opt.step(per_example_closure(model, opt, batch))
        g = ref.grad(ref.w, batch)
        gen = torch.Generator().manual_seed(7 * 1_000_003 + t)
        mask = torch.cat([(torch.rand(s, generator=gen) < beta).reshape(-1) for _, s in ref.named]).double()
        w_adv = ref.w + (RHO / beta) * mask * unit(g)
        idx = None
        if gamma < 1:
            rise = ref.per_example(w_adv, batch) - ref.per_example(ref.w, batch)
            idx = torch.topk(rise.detach(), math.ceil(gamma * len(rise))).indices
        ref.sgd(ref.grad(w_adv, batch, idx))
    ref.assert_matches(model)


def test_gsam_surrogate_gap_update_with_rho_following_lr_schedule_matches_reference():
    model = make_mlp()
    ref = Flat(make_mlp())
    alpha, rho_min, steps = 0.3, 0.02, 12
    opt = sgd_variant(GSAM, model, rho=RHO, alpha=alpha, rho_min=rho_min)
    decay = lambda t: 1 - t / steps  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    for t, batch in enumerate(make_batches(steps)):
        opt.step(sam_closure(model, opt, batch))
        scheduler.step()
        lr = LR * decay(t)
        rho_t = rho_min + (RHO - rho_min) * lr / LR
        g = ref.grad(ref.w, batch)
        g_p = ref.grad(ref.w + rho_t * unit(g), batch)
        g_perp = g - torch.dot(g, g_p) / torch.dot(g_p, g_p) * g_p
        ref.sgd(g_p - alpha * g_perp, lr=lr)
    ref.assert_matches(model)


def test_friendly_sam_ascends_along_gradient_minus_ema_matches_reference():
    model = make_mlp()
    ref = Flat(make_mlp())
    sigma, lam = 0.8, 0.6
    opt = sgd_variant(FriendlySAM, model, rho=RHO, sigma=sigma, ema_decay=lam)
    m = torch.zeros_like(ref.w)
    for batch in make_batches(12):
        opt.step(sam_closure(model, opt, batch))
        g = ref.grad(ref.w, batch)
        m = lam * m + (1 - lam) * g
        ref.sgd(ref.grad(ref.w + RHO * unit(g - sigma * m), batch))
    ref.assert_matches(model)


@pytest.mark.parametrize("base", ["sgd_momentum", "adamw"])
def test_momentum_sam_perturbs_along_base_momentum_matches_reference(base):
    model = make_mlp()
    ref = Flat(make_mlp())
    if base == "adamw":
        opt = MomentumSAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=1e-2, weight_decay=0.1)
    else:
        opt = sgd_variant(MomentumSAM, model, rho=RHO)
    for t, batch in enumerate(make_batches(12)):
        opt.step(sam_closure(model, opt, batch))
        momentum = ref.adam[0] if base == "adamw" else ref.buf
        w_eval = ref.w if t == 0 else ref.w + RHO * unit(momentum)
        g = ref.grad(w_eval, batch)
        ref.adamw(g) if base == "adamw" else ref.sgd(g)
    ref.assert_matches(model)


# -- promised cost: forward passes per optimizer step, counted with a forward hook --------------------
VARIANT_KNOBS = {
    "periodic": {"interval": 3},
    "looksam": {"interval": 3},
    "esam": {"beta": 0.5, "gamma": 0.25},
    "gsam": {"alpha": 0.2},
    "fsam": {},
    "msam": {},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_forward_passes_per_step_are_what_the_variant_promises(name):
    model = make_mlp()
    opt = build_sam_optimizer(name, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **VARIANT_KNOBS[name])
    batch_size = 8
    passes: list[float] = []
    # a forward with autograd counts as one forward+backward pass, a no-grad forward as 1/3 of one
    hook = model.register_forward_hook(
        lambda m, inp, out: passes.append(inp[0].shape[0] / batch_size * (1.0 if torch.is_grad_enabled() else 1 / 3))
    )
    per_step = []
    for batch in make_batches(6):
        passes.clear()
        make = per_example_closure if name == "esam" else sam_closure
        opt.step(make(model, opt, batch))
        per_step.append(sum(passes))
    hook.remove()
    if name in ("periodic", "looksam"):
        assert per_step == [2.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    elif name == "msam":
        assert per_step == [1.0] * 6
    assert sum(per_step) / len(per_step) == pytest.approx(opt.passes_per_step, abs=1e-12)


# -- checkpoints: the persistent state round-trips, transient state never appears ---------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_state_dict_round_trip_resumes_onto_the_same_trajectory_bitwise(name):
    batches = make_batches(10, seed=3)
    knobs = VARIANT_KNOBS[name] | ({"gamma": 1.0} if name == "esam" else {})

    def build(model):
        return build_sam_optimizer(name, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **knobs)

    model = make_mlp()
    opt = build(model)
    for batch in batches[:4]:
        opt.step(sam_closure(model, opt, batch))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for batch in batches[4:]:
        opt.step(sam_closure(model, opt, batch))

    resumed = make_mlp(seed=5)
    resumed.load_state_dict(saved_model)
    resumed_opt = build(resumed)
    resumed_opt.load_state_dict(saved_opt)
    for batch in batches[4:]:
        resumed_opt.step(sam_closure(resumed, resumed_opt, batch))
    assert bitwise_equal(model, resumed)


@pytest.mark.parametrize("name, buffer", [("looksam", "direction"), ("fsam", "ema")])
def test_checkpoint_holds_persistent_buffer_but_not_backup_or_stash(name, buffer):
    model = make_mlp()
    opt = build_sam_optimizer(name, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    batch = make_batches(1)[0]
    opt.step(sam_closure(model, opt, batch))
    saved = opt.state_dict()["sam_variant"]
    n_params = len(list(model.parameters()))
    assert saved["optimizer_steps"] == 1
    assert sorted(saved["buffers"][buffer]) == list(range(n_params))
    assert list(saved["buffers"]) == [buffer]
    sam_closure(model, opt, batch)()
    assert opt.perturb()
    with pytest.raises(RuntimeError, match="restore"):
        opt.state_dict()
    opt.restore()


def test_looksam_stored_direction_is_unit_and_orthogonal_to_clean_gradient():
    model = make_mlp()
    opt = sgd_variant(LookSAM, model, rho=RHO, interval=4)
    batch = make_batches(1)[0]
    clean = [g.clone() for g in torch.autograd.grad(((model(batch[0]) - batch[1]) ** 2).mean(), list(model.parameters()))]
    opt.step(sam_closure(model, opt, batch))
    direction = [opt.buffers["direction"][p] for p in model.parameters()]
    flat_dir = torch.cat([d.reshape(-1) for d in direction])
    flat_g = torch.cat([g.reshape(-1) for g in clean])
    assert flat_dir.norm().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.dot(flat_dir, flat_g).abs().item() <= 1e-12 * flat_g.norm().item()


def test_loading_a_checkpoint_of_another_method_fails_clearly():
    model = make_mlp()
    fsam = sgd_variant(FriendlySAM, model)
    fsam.step(sam_closure(model, fsam, make_batches(1)[0]))
    with pytest.raises(ValueError, match="buffers \\['ema'\\]"):
        sgd_variant(LookSAM, model).load_state_dict(fsam.state_dict())


# -- msam: the weights outside a window are always the clean ones -------------------------------------
def test_msam_window_hooks_leave_clean_weights_and_eval_train_toggle_perturbation():
    model = make_mlp()
    opt = sgd_variant(MomentumSAM, model, rho=RHO)
    batches = make_batches(3)
    opt.step(sam_closure(model, opt, batches[0]))  # first step: plain (no momentum yet) and builds it
    clean = copy.deepcopy(model.state_dict())
    opt.before_first_pass()
    assert opt.is_perturbed and not bitwise_equal(model, _with_state(clean))
    with pytest.raises(RuntimeError, match="restore"):
        opt.state_dict()
    opt.eval()
    assert not opt.is_perturbed and bitwise_equal(model, _with_state(clean))
    opt.train()
    assert opt.is_perturbed
    sam_closure(model, opt, batches[1])()
    opt.after_first_pass()
    assert bitwise_equal(model, _with_state(clean))
    opt.step()
    assert not opt.is_perturbed and "momentum_buffer" in opt.state_dict()["state"][0]


def _with_state(state):
    model = make_mlp(seed=11)
    model.load_state_dict(state)
    return model


def test_msam_rejects_base_without_momentum():
    with pytest.raises(ValueError, match="momentum=0"):
        MomentumSAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1)


def test_esam_without_per_example_losses_on_hook_path_warns_once_and_uses_whole_batch(caplog):
    model = make_mlp()
    opt = sgd_variant(ESAM, model, beta=1.0, gamma=0.5)
    twin = make_mlp()
    twin_opt = sgd_variant(ESAM, twin, beta=1.0, gamma=1.0)
    with caplog.at_level("WARNING"):
        for batch in make_batches(3):
            for o, m in ((opt, model), (twin_opt, twin)):
                o.before_first_pass()
                sam_closure(m, o, batch)()
                o.after_first_pass()
                with o.perturbed():
                    sam_closure(m, o, batch)()
                o.step()
    assert caplog.text.count("sharpness-sensitive data selection") == 1
    assert bitwise_equal(model, twin)
    with pytest.raises(ValueError, match="per-example losses"):
        opt.step(sam_closure(model, opt, make_batches(1)[0]))


def test_variants_are_registered_and_knobs_validated():
    assert set(VARIANTS) <= set(available_methods())
    params = list(make_mlp().parameters())
    for cls, kwargs, match in [
        (PeriodicSAM, {"interval": 0}, "interval must be an integer >= 1, got 0"),
        (PeriodicSAM, {"rho_scaling": "cube"}, "rho_scaling must be one of"),
        (LookSAM, {"alpha": -1.0}, "alpha must be a number >= 0"),
        (ESAM, {"beta": 0.0}, r"beta must be a number in \(0, 1\], got 0.0"),
        (ESAM, {"gamma": 1.5}, "gamma must be"),
        (ESAM, {"beta": "half"}, "beta must be a number in"),  # a non-number is a ValueError too
        (GSAM, {"alpha": True}, "alpha must be a number >= 0, got True"),
        (FriendlySAM, {"sigma": -0.5}, "sigma must be a number >= 0"),
        (GSAM, {"rho_min": 1.0}, "rho_min must be in"),
        (FriendlySAM, {"ema_decay": 1.0}, "ema_decay must be < 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)


def test_every_variant_with_rho_zero_is_the_base_optimizer():
    batches = make_batches(6)
    ref = make_mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM)
    for batch in batches:
        ref_opt.zero_grad()
        ((ref(batch[0]) - batch[1]) ** 2).mean().backward()
        ref_opt.step()
    for name in sorted(set(VARIANTS) - {"gsam", "looksam"}):  # gsam/looksam reshape the gradient itself
        model = make_mlp()
        knobs = {"gamma": 1.0} if name == "esam" else {}
        opt = build_sam_optimizer(name, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=0.0, **knobs)
        for batch in batches:
            opt.step(sam_closure(model, opt, batch))
        assert max_abs_diff(model, ref) == 0.0, name
