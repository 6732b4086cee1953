"""The cheaper sharpness-aware variants against float64 references written from each paper's formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_sam_engine import bitwise_equal, make_batches, make_mlp, max_abs_diff
from torch import nn
from torch.func import functional_call

from arrcoc_sam.sam import SAM
from arrcoc_sam.sam.registry import available_methods, build_sam_optimizer
from arrcoc_sam.sam.variants import ESAM, GSAM, VARIANTS, FriendlySAM, LookSAM, MomentumSAM, PeriodicSAM
from arrcoc_sam.sam.variants._base import uses_reentrant_checkpointing

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


def test_closure_steps_zero_the_gradients_for_a_closure_that_does_not():
    """VariantSAM.step zeroes the gradients before each pass, as SAM.step does: a closure that only runs forward +
    backward sees one pass's gradient, so pass 1 does not add the previous step's and pass 2 does not add pass 1's."""
    model = make_mlp()
    ref = Flat(make_mlp())
    opt = sgd_variant(PeriodicSAM, model, rho=RHO, interval=2)
    for t, (x, y) in enumerate(make_batches(4)):
        def closure(x=x, y=y):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        g = ref.grad(ref.w, (x, y))
        ref.sgd(ref.grad(ref.w + RHO * unit(g), (x, y)) if t % 2 == 0 else g)
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
def test_esam_coordinate_weight_masks_and_data_selection_match_reference(beta, gamma):
    model = make_mlp()
    ref = Flat(make_mlp())
    opt = sgd_variant(ESAM, model, rho=RHO, beta=beta, gamma=gamma, seed=7, swp="coordinate")
    for t, batch in enumerate(make_batches(10)):
        opt.step(per_example_closure(model, opt, batch))
        g = ref.grad(ref.w, batch)
        gen = torch.Generator().manual_seed(7 * 1_000_003 + t)
        mask = torch.cat([(torch.rand(s, generator=gen) < beta).reshape(-1) for _, s in ref.named]).double()
        ref.sgd(selected_gradient(ref, ref.w + (RHO / beta) * mask * unit(g), batch, gamma))
    ref.assert_matches(model)


def selected_gradient(ref: Flat, w_adv: torch.Tensor, batch, gamma: float) -> torch.Tensor:
    """ESAM's pass 2: the gradient at w_adv of the mean loss over the ⌈γB⌉ examples whose loss rose most."""
    idx = None
    if gamma < 1:
        rise = ref.per_example(w_adv, batch) - ref.per_example(ref.w, batch)
        idx = torch.topk(rise.detach(), math.ceil(gamma * len(rise))).indices
    return ref.grad(w_adv, batch, idx)


def tensor_swp_mask(ref: Flat, beta: float, seed: int, t: int) -> torch.Tensor:
    """Tensor SWP's coordinate mask at step t, from its per-tensor draw (the smallest uniform if none is kept)."""
    draw = torch.rand(len(ref.named), generator=torch.Generator().manual_seed(seed * 1_000_003 + t))
    chosen = draw < beta
    if not chosen.any():
        chosen[draw.argmin()] = True
    return torch.cat([torch.full((math.prod(s),), float(c), dtype=torch.float64) for c, (_, s) in zip(chosen, ref.named)])


@pytest.mark.parametrize("beta, gamma", [(0.5, 0.5), (0.5, 1.0), (0.2, 1.0)], ids=["swp+sds", "swp", "one-tensor"])
def test_esam_tensor_swp_perturbs_whole_tensors_with_their_own_norm_matches_reference(beta, gamma):
    model = make_mlp()
    ref = Flat(make_mlp())
    opt = sgd_variant(ESAM, model, rho=RHO, beta=beta, gamma=gamma, seed=7, swp="tensor")
    kept = []
    for t, batch in enumerate(make_batches(10)):
        opt.step(per_example_closure(model, opt, batch))
        mask = tensor_swp_mask(ref, beta, 7, t)
        kept.append(int(mask.sum()))
        g_s = mask * ref.grad(ref.w, batch)
        ref.sgd(selected_gradient(ref, ref.w + (RHO / beta) * unit(g_s), batch, gamma))
    ref.assert_matches(model)
    assert min(kept) > 0 and len(set(kept)) > 1  # the draw varies by step and never keeps nothing


def test_esam_tensor_swp_computes_pass_one_gradients_of_the_chosen_tensors_only_and_the_update_is_unchanged():
    model, manual = make_mlp(), make_mlp()
    opt = sgd_variant(ESAM, model, rho=RHO, beta=0.5, gamma=0.5, seed=2, swp="tensor")
    manual_opt = sgd_variant(ESAM, manual, rho=RHO, beta=0.5, gamma=0.5, seed=2, swp="tensor")
    names = [n for n, _ in model.named_parameters()]
    accumulated: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: accumulated.append(name))
    for t, batch in enumerate(make_batches(6)):
        accumulated.clear()
        chosen = [names[i] for i, p in enumerate(model.parameters()) if any(p is q for q in opt.swp_tensors())]
        opt.step(per_example_closure(model, opt, batch))
        # pass 1: the chosen tensors (all at step 0, which probes for checkpointing); pass 2: all
        assert sorted(accumulated) == sorted((chosen if t > 0 else names) + names)
        assert all(p.requires_grad for p in model.parameters())
        # the same step from a loop that computes every pass-1 gradient (the ascent ignores the others)
        x, y = batch
        manual_opt.before_first_pass()
        manual_opt.zero_grad()
        clean = ((manual(x) - y) ** 2).mean(dim=1)
        clean.mean().backward()
        assert all(p.grad is not None for p in manual.parameters())
        with manual_opt.perturbed() as ok:
            assert ok
            with torch.no_grad():
                rise = ((manual(x) - y) ** 2).mean(dim=1) - clean.detach()
            idx = manual_opt.select_examples(torch.zeros_like(rise), rise)
            manual_opt.zero_grad()
            ((manual(x[idx]) - y[idx]) ** 2).mean(dim=1).mean().backward()
        manual_opt.step()
    assert max_abs_diff(model, manual) <= 1e-12


class _DeadTensor(nn.Module):
    """y = x·a, plus a tensor b whose gradient is always zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.5, -0.5], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))

    def forward(self, x):
        return x * self.a + 0.0 * self.b


def test_esam_tensor_swp_with_a_zero_norm_still_runs_pass_two_so_unchosen_tensors_get_their_update():
    x, y = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    # beta so small that no tensor is drawn: the smallest uniform picks one; a seed whose draw picks b
    seed = next(s for s in range(50) if torch.rand(2, generator=torch.Generator().manual_seed(s * 1_000_003)).argmin() == 1)
    model, plain = _DeadTensor(), _DeadTensor()
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=RHO, beta=1e-9, gamma=1.0, seed=seed, swp="tensor")
    assert [p is model.b for p in opt.swp_tensors()] == [True]
    passes = []
    model.register_forward_hook(lambda *args: passes.append(1))

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(passes) == 2 and opt.skipped_steps == 1 and not opt.is_perturbed
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    ((plain(x) - y) ** 2).mean().backward()
    plain_opt.step()
    assert bitwise_equal(model, plain)  # a moved with its full gradient at w


def test_esam_tensor_swp_gives_requires_grad_back_when_pass_one_raises_or_is_not_finite():
    model = make_mlp()
    opt = sgd_variant(ESAM, model, rho=RHO, beta=0.5, gamma=1.0, seed=4, swp="tensor")
    x, y = make_batches(1)[0]
    opt.step(per_example_closure(model, opt, (x, y)))  # step 0 runs pass 1 in full (the checkpointing probe)
    clean = copy.deepcopy(model)

    def failing(indices=None):
        assert not all(p.requires_grad for p in model.parameters())  # pass 1 runs pruned
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(failing)
    assert all(p.requires_grad for p in model.parameters())

    def infinite(indices=None):
        return ((model(x) - y) ** 2).mean(dim=1) * math.inf

    opt.step(infinite)
    assert all(p.requires_grad for p in model.parameters()) and opt.skipped_steps == 1
    assert bitwise_equal(model, clean)


class CheckpointedMLP(nn.Module):
    """make_mlp's shape with a middle layer under reentrant activation checkpointing, which tracks the block's
    input and not its weights: pass 1 pruned to tensors that leave that input without gradient loses theirs."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.block, self.head = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)
        self.to(torch.float64)
        self.checkpointed = checkpointed

    def forward(self, x):
        h = torch.tanh(self.first(x))
        block = lambda t: torch.tanh(self.block(t))  # noqa: E731
        h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True) if self.checkpointed else block(h)
        return self.head(h)


def swp_draw(seed: int, t: int, n: int, beta: float = 0.5) -> list[bool]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + t)
    return (torch.rand(n, generator=generator, dtype=torch.float32) < beta).tolist()


def test_esam_closure_step_probes_its_first_step_for_reentrant_checkpointing_that_pruning_would_break(caplog):
    # a seed whose step-1 draw takes the checkpointed block's tensors but neither of the layer before it
    seed = next(s for s in range(200) if (d := swp_draw(s, 1, 6)) and not any(d[:2]) and any(d[2:4]))
    models = {flag: CheckpointedMLP(checkpointed=flag) for flag in (True, False)}
    opts = {flag: sgd_variant(ESAM, m, rho=RHO, beta=0.5, gamma=0.5, seed=seed) for flag, m in models.items()}
    pruned_passes = {True: [], False: []}
    for flag, model in models.items():
        def record(module, args, flag=flag):
            if torch.is_grad_enabled():
                pruned_passes[flag].append(not all(p.requires_grad for p in module.parameters()))
        model.register_forward_pre_hook(record)
    with caplog.at_level("INFO", logger="arrcoc_sam.sam.variants.esam"):
        for batch in make_batches(6):
            for flag, model in models.items():
                opts[flag].step(per_example_closure(model, opts[flag], batch))
    assert max_abs_diff(models[True], models[False]) <= 1e-12  # the same steps as without checkpointing
    assert len([r for r in caplog.records if "reentrant activation checkpointing" in r.message]) == 1
    assert not any(pruned_passes[True])  # step 0 found the checkpointing: pass 1 in full throughout
    # without: step 0 is the probe, then each pass 1 (every other forward with grad) is pruned to its draw
    assert pruned_passes[False][::2] == [False] + [not all(swp_draw(seed, t, 6)) for t in range(1, 6)]


class _FreshWrapperNode:
    """A graph node whose ``next_functions`` hands out a new wrapper on each access, as torch 2.11 does: a wrapper
    nobody holds is freed, and the next one created can take its id."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    @property
    def next_functions(self):
        child = CheckpointFunctionBackward(0) if self.depth == 1 else _FreshWrapperNode(self.depth - 1)
        return ((child, 0),)


class CheckpointFunctionBackward(_FreshWrapperNode):
    @property
    def next_functions(self):
        return ()


class _FreshWrapperRoot(torch.Tensor):
    @property
    def grad_fn(self):
        return _FreshWrapperNode(4)


def test_reentrant_checkpoint_search_reaches_the_node_when_each_visited_wrapper_would_be_freed():
    root = torch.Tensor._make_subclass(_FreshWrapperRoot, torch.zeros(1))
    assert uses_reentrant_checkpointing([root])


def test_esam_closure_step_keeps_every_gradient_when_the_closure_returns_a_loss_without_graph(caplog):
    """A SAM-style closure that returns its loss detached leaves no graph to search for checkpointing."""
    model = make_mlp()
    opt = sgd_variant(ESAM, model, rho=RHO, beta=0.5, gamma=1.0, seed=5)
    pruned = []
    model.register_forward_pre_hook(lambda module, args: pruned.append(
        not all(p.requires_grad for p in module.parameters())) if torch.is_grad_enabled() else None)

    def detached_closure(batch):
        def closure():
            opt.zero_grad()
            loss = ((model(batch[0]) - batch[1]) ** 2).mean()
            loss.backward()
            return loss.detach()
        return closure

    with caplog.at_level("INFO", logger="arrcoc_sam.sam.variants.esam"):
        for batch in make_batches(4):
            opt.step(detached_closure(batch))
    assert len(pruned) == 8 and not any(pruned)
    assert any("no graph to search" in r.message for r in caplog.records)
    reference = make_mlp()
    ref_opt = sgd_variant(ESAM, reference, rho=RHO, beta=0.5, gamma=1.0, seed=5)
    for batch in make_batches(4):
        ref_opt.step(sam_closure(reference, ref_opt, batch))  # returns its loss with graph: pruned from step 1
    assert max_abs_diff(model, reference) <= 1e-12  # the same update either way


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
def test_momentum_sam_perturbs_against_base_momentum_matches_reference(base):
    model = make_mlp()
    ref = Flat(make_mlp())
    if base == "adamw":
        opt = MomentumSAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=1e-2, weight_decay=0.1)
    else:
        opt = sgd_variant(MomentumSAM, model, rho=RHO)
    for t, batch in enumerate(make_batches(12)):
        opt.step(sam_closure(model, opt, batch))
        momentum = ref.adam[0] if base == "adamw" else ref.buf
        w_eval = ref.w if t == 0 else ref.w - RHO * unit(momentum)  # Becker et al., Algorithm 1: w̃ = w − ρ v/‖v‖
        g = ref.grad(w_eval, batch)
        ref.adamw(g) if base == "adamw" else ref.sgd(g)
    ref.assert_matches(model)


def test_momentum_sam_maximizing_the_negated_loss_follows_the_minimizing_reference():
    """A maximising base optimizer's momentum averages −∇(objective) = +∇loss here, which already carries the
    objective's sign: ε = −ρ m/‖m‖ must not be flipped again, so maximising −loss is the reference's minimisation."""
    model = make_mlp()
    ref = Flat(make_mlp())
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, maximize=True)
    for t, (x, y) in enumerate(make_batches(6)):
        def closure(x=x, y=y):
            opt.zero_grad()
            objective = -((model(x) - y) ** 2).mean()
            objective.backward()
            return objective

        opt.step(closure)
        g = ref.grad(ref.w if t == 0 else ref.w - RHO * unit(ref.buf), (x, y))
        ref.sgd(g)
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
    from transformers.optimization import Adafactor

    with pytest.raises(ValueError, match="Adafactor runs with beta1=None"):
        MomentumSAM(make_mlp().parameters(), Adafactor, lr=0.1, relative_step=False, scale_parameter=False)
    models = {}
    for rho in (0.0, RHO):  # with beta1 Adafactor keeps a first moment (exp_avg), and msam perturbs along it
        model = models[rho] = make_mlp()
        opt = MomentumSAM(model.parameters(), Adafactor, lr=0.1, rho=rho, beta1=0.9, relative_step=False,
                          scale_parameter=False)
        for batch in make_batches(3):
            opt.step(sam_closure(model, opt, batch))
        assert not opt.is_perturbed
    assert max_abs_diff(models[0.0], models[RHO]) > 1e-4


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
        (LookSAM, {"alpha": -1.0}, "alpha must be a finite number >= 0"),
        (LookSAM, {"alpha": math.inf}, "alpha must be a finite number >= 0, got inf"),
        (ESAM, {"beta": 0.0}, r"beta must be a number in \(0, 1\], got 0.0"),
        (ESAM, {"gamma": 1.5}, "gamma must be"),
        (ESAM, {"beta": "half"}, "beta must be a number in"),  # a non-number is a ValueError too
        (ESAM, {"seed": 1.7}, "seed must be an integer, got 1.7"),
        (ESAM, {"swp": "layer"}, r"swp must be one of \('coordinate', 'tensor'\), got 'layer'"),
        (GSAM, {"alpha": True}, "alpha must be a finite number >= 0, got True"),
        (GSAM, {"alpha": math.inf}, "alpha must be a finite number >= 0, got inf"),
        (FriendlySAM, {"sigma": -0.5}, "sigma must be a finite number >= 0"),
        (FriendlySAM, {"sigma": math.nan}, "sigma must be a finite number >= 0, got nan"),
        (GSAM, {"rho_min": 1.0}, "rho_min must be in"),
        (GSAM, {"lr_min": math.nan}, "lr_min must be a finite number, got nan"),
        (GSAM, {"lr_min": -1.0}, r"need 0 <= lr_min <= lr_max, got lr_min=-1.0"),
        (GSAM, {"lr_max": math.inf}, "lr_max must be a finite number, got inf"),
        (FriendlySAM, {"ema_decay": 1.0}, "ema_decay must be < 1"),
        (FriendlySAM, {"ema_decay": 0.0, "sigma": 1.0}, r"sigma=1.0 leaves an ascent direction of \(1 − sigma\)·g"),
        (GSAM, {"lr_min": 0.5, "lr_max": 0.1}, r"need 0 <= lr_min <= lr_max, got lr_min=0.5, lr_max=0.1"),
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
    runs = [(name, {}) for name in sorted(set(VARIANTS) - {"gsam", "looksam"})]  # these reshape the gradient
    runs += [("esam", {"swp": "tensor", "beta": 0.5})]  # no tensor to ascend: pass 1 is not pruned
    for name, knobs in runs:
        model = make_mlp()
        knobs = knobs | ({"gamma": 1.0} if name == "esam" else {})
        opt = build_sam_optimizer(name, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=0.0, **knobs)
        for batch in batches:
            opt.step(sam_closure(model, opt, batch))
        assert max_abs_diff(model, ref) == 0.0, (name, knobs)


# -- failures, checkpoints of other optimizers, API misuse ---------------------------------------------
def failing_closure(model, opt, batch, fail_on_call):
    """A SAM closure that raises on its ``fail_on_call``-th call (1-based), after its forward pass."""
    calls = [0]
    inner = sam_closure(model, opt, batch)

    def closure():
        calls[0] += 1
        if calls[0] == fail_on_call:
            model(batch[0])
            raise RuntimeError("boom")
        return inner()

    return closure


def test_msam_exception_in_its_only_pass_leaves_clean_weights_and_the_next_step_runs():
    model = make_mlp()
    opt = sgd_variant(MomentumSAM, model, rho=RHO)
    batches = make_batches(3)
    opt.step(sam_closure(model, opt, batches[0]))  # builds the momentum: the next pass runs perturbed
    clean = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing_closure(model, opt, batches[1], fail_on_call=1))
    assert not opt.is_perturbed and bitwise_equal(model, _with_state(clean))
    assert opt.optimizer_steps == 1
    opt.state_dict()  # not refused: nothing is perturbed
    opt.step(sam_closure(model, opt, batches[1]))
    assert opt.optimizer_steps == 2 and not opt.is_perturbed


def test_msam_window_left_perturbed_by_a_failed_loop_is_cleaned_up_by_the_next_window():
    model = make_mlp()
    opt = sgd_variant(MomentumSAM, model, rho=RHO)
    batches = make_batches(3)
    opt.step(sam_closure(model, opt, batches[0]))
    clean = copy.deepcopy(model.state_dict())
    opt.before_first_pass()  # a hand-written loop whose pass 1 then died without after_first_pass
    assert opt.is_perturbed
    opt.before_first_pass()  # the next window starts from the clean weights, perturbed once
    opt.after_first_pass()
    assert bitwise_equal(model, _with_state(clean))


def looksam_after_two_steps(batches):
    """LookSAM (k = 2) after one ascent step and one reuse step on ``batches[:2]``, and a copy of its direction."""
    model = make_mlp()
    opt = sgd_variant(LookSAM, model, rho=RHO, interval=2)
    for batch in batches[:2]:
        opt.step(sam_closure(model, opt, batch))
    return model, opt, {p: d.clone() for p, d in opt.buffers["direction"].items()}


def test_looksam_failed_second_pass_keeps_direction_and_schedule():
    batches = make_batches(3)
    model, opt, direction = looksam_after_two_steps(batches)
    clean = copy.deepcopy(model.state_dict())
    assert opt.ascent_this_step()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing_closure(model, opt, batches[2], fail_on_call=2))  # pass 2 at w + ε raises
    assert not opt.is_perturbed and bitwise_equal(model, _with_state(clean))
    assert opt.optimizer_steps == 2 and opt.ascent_this_step()
    assert all(torch.equal(direction[p], d) for p, d in opt.buffers["direction"].items())


def test_looksam_non_finite_second_pass_keeps_the_previous_direction(caplog):
    batches = make_batches(3)
    model, opt, direction = looksam_after_two_steps(batches)
    x, y = batches[2]
    calls = [0]

    def overflowing_second_pass():  # what an fp16 pass 2 under a GradScaler produces on overflow
        calls[0] += 1
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() * (math.inf if calls[0] == 2 else 1.0)
        loss.backward()
        return loss

    opt.before_first_pass()
    overflowing_second_pass()
    opt.after_first_pass()
    with opt.perturbed():
        overflowing_second_pass()
    assert "non-finite pass-2 gradient" in caplog.text
    assert all(torch.equal(direction[p], d) for p, d in opt.buffers["direction"].items())


@pytest.mark.parametrize("name", ["periodic", "looksam", "esam", "gsam", "fsam"])
def test_a_non_finite_second_pass_skips_the_step_of_every_method_with_one(name, caplog):
    """A loss that is finite at w and infinite at w + ε: each method's closure step leaves the weights and the base
    optimizer's state as they were (the ascent itself went ahead), and the next step trains."""
    model = make_mlp()
    clean = copy.deepcopy(model.state_dict())
    knobs = {"interval": 1} if name in ("periodic", "looksam") else {"gamma": 1.0} if name == "esam" else {}
    opt = build_sam_optimizer(name, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO, **knobs)
    x, y = make_batches(1)[0]
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        (loss * (math.inf if calls[0] == 2 else 1.0)).backward()
        return loss

    with caplog.at_level("WARNING"):
        opt.step(closure)
    assert calls[0] == 2 and "non-finite gradients at w + ε" in caplog.text
    assert bitwise_equal(model, _with_state(clean)) and opt.base_optimizer.state_dict()["state"] == {}
    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters()) and not bitwise_equal(model, _with_state(clean))


@pytest.mark.parametrize("case", ["nan_outside_the_drawn_tensors", "zero_norm_over_the_drawn_tensors"])
def test_esam_tensor_swp_checks_the_whole_update(case):
    """ESAM's tensor SWP perturbs the drawn tensors S only: NaN at w + ε in a tensor outside S was not checked, nor
    was any pass 2 after an ascent with a zero norm over S (perturb() True, nothing perturbed)."""
    params = [nn.Parameter(torch.ones(3)) for _ in range(8)]
    opt = ESAM(params, torch.optim.SGD, lr=0.1, beta=0.25, gamma=1.0, swp="tensor")
    drawn = {id(p) for p in opt.swp_tensors()}
    outside = [p for p in params if id(p) not in drawn]
    calls = [0]

    def closure():
        calls[0] += 1
        nan = math.nan if calls[0] == 2 else 1.0
        opt.zero_grad()
        if case == "nan_outside_the_drawn_tensors":
            loss = sum((p * p).sum() for p in params) + (outside[0] * (nan - 1.0)).sum()
        else:
            loss = sum((p * p).sum() for p in outside) * nan + sum((p * 0).sum() for p in params if id(p) in drawn)
        loss.backward()
        return loss

    opt.step(closure)
    assert calls[0] == 2 and all(torch.equal(p, torch.ones(3)) for p in params)


def test_gsam_add_param_group_gets_the_schedule_keys_and_is_validated():
    model, extra = make_mlp(), nn.Linear(3, 2, dtype=torch.float64)
    opt = GSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO, rho_min=0.01, lr_min=0.001)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.2})
    group = opt.param_groups[-1]
    assert (group["rho_min"], group["lr_min"], group["lr_max"], GSAM.lr_max_of(group)) == (0.01, 0.001, None, 0.2)
    opt.step(sam_closure(model, opt, make_batches(1)[0]))  # the new group has no grad: no KeyError, nothing perturbed
    with pytest.raises(ValueError, match="new param group: rho_min must be in"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": 0.01, "rho_min": 0.5})


def test_loaded_checkpoint_without_sam_settings_keeps_them_and_bad_ones_fail_at_load():
    model = make_mlp()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = make_batches(1)[0]
    ((model(x) - y) ** 2).mean().backward()
    plain.step()
    sam = SAM(model.parameters(), torch.optim.AdamW, lr=1e-2, rho=0.2)
    sam.load_state_dict(plain.state_dict())  # resuming a plain AdamW run with SAM
    assert sam.param_groups[0]["rho"] == 0.2 and "exp_avg" in sam.state_dict()["state"][0]
    sam.step(sam_closure(model, sam, make_batches(1)[0]))
    gsam = GSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, rho=0.2)
    gsam.load_state_dict(sam.state_dict())  # a SAM checkpoint lacks GSAM's schedule keys
    assert GSAM.lr_max_of(gsam.param_groups[0]) == 1e-2
    gsam.step(sam_closure(model, gsam, make_batches(1)[0]))
    broken = sam.state_dict()
    broken["param_groups"][0]["rho"] = -1.0
    with pytest.raises(ValueError, match="loaded param group 0: rho must be a finite number >= 0, got -1.0"):
        SAM(model.parameters(), torch.optim.AdamW, lr=1e-2).load_state_dict(broken)


@pytest.mark.parametrize(
    "name, knobs, refused",
    [("periodic", {"interval": 3}, True), ("looksam", {"interval": 3}, True), ("msam", {}, True),
     ("periodic", {"interval": 1}, False), ("gsam", {}, False), ("fsam", {}, False)],
)
def test_two_call_api_is_refused_where_the_schedule_needs_the_window_hooks(name, knobs, refused):
    model = make_mlp()
    opt = build_sam_optimizer(name, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **knobs)
    x, y = make_batches(1)[0]
    ((model(x) - y) ** 2).mean().backward()
    if refused:
        with pytest.raises(RuntimeError, match="window hooks"):
            opt.first_step()
        assert not opt.is_perturbed
    else:
        assert opt.first_step(zero_grad=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.second_step()
        assert not opt.is_perturbed and opt.optimizer_steps == 1


def test_add_param_group_scales_periodic_rho_and_checks_msam_momentum():
    periodic = sgd_variant(PeriodicSAM, make_mlp(), rho=RHO, interval=4, rho_scaling="linear")
    periodic.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": 0.2})
    periodic.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert [g["rho"] for g in periodic.param_groups] == pytest.approx([4 * RHO, 4 * 0.2, 4 * RHO])
    msam = sgd_variant(MomentumSAM, make_mlp(), rho=RHO)
    with pytest.raises(ValueError, match="new param group: msam takes its perturbation from the momentum buffer"):
        msam.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "momentum": 0.0})
    assert len(msam.param_groups) == 1


def test_gsam_after_a_warmup_or_one_cycle_scheduler_spans_the_peak_learning_rate():
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=MOMENTUM)
    torch.optim.lr_scheduler.LinearLR(base, start_factor=0.01, total_iters=10)  # lr is 0.001 now
    gsam = GSAM(model.parameters(), base, rho=RHO, rho_min=0.0)
    assert GSAM.lr_max_of(gsam.param_groups[0]) == pytest.approx(0.1)
    assert gsam.scheduled_rho(gsam.param_groups[0]) == pytest.approx(RHO * 0.01)

    base = torch.optim.SGD(make_mlp().parameters(), lr=0.1, momentum=MOMENTUM)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(base, max_lr=0.4, total_steps=20)
    gsam = GSAM([p for g in base.param_groups for p in g["params"]], base, rho=RHO, rho_min=0.01)
    assert GSAM.lr_max_of(gsam.param_groups[0]) == pytest.approx(0.4)
    radii = []
    for _ in range(19):
        radii.append(gsam.scheduled_rho(gsam.param_groups[0]))
        base.step()
        one_cycle.step()
    assert max(radii) == pytest.approx(RHO, rel=1e-3) and min(radii) >= 0.01


def test_gsam_follows_a_one_cycle_schedule_attached_after_it():
    """OneCycleLR built on GSAM itself (the plain PyTorch order): ρ_t = ρ·lr_t/max_lr along the cycle, not ρ
    from the first steps on (lr_max read when GSAM was built, 0.01, would put every later step above it)."""
    model = make_mlp()
    gsam = GSAM(model.parameters(), torch.optim.SGD, lr=0.01, rho=0.1)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(gsam, max_lr=0.1, total_steps=20)
    for _ in range(15):
        group = gsam.param_groups[0]
        assert GSAM.scheduled_rho(group) == pytest.approx(0.1 * group["lr"] / 0.1)
        gsam.step(sam_closure(model, gsam, make_batches(1)[0]))
        one_cycle.step()
    assert gsam.param_groups[0]["lr"] < 0.05  # the cycle came down again
    with pytest.raises(ValueError, match=r"gsam: lr_min=0.5 is above the peak learning rate 0.1"):
        GSAM.scheduled_rho({**gsam.param_groups[0], "lr_min": 0.5})


def test_gsam_follows_a_learning_rate_no_scheduler_records_a_peak_for():
    """ReduceLROnPlateau (and a loop setting the lr by hand) record no peak: ρ_t follows the lr down from the
    largest the group has had, and that peak rides in the checkpoint."""
    model = make_mlp()
    gsam = GSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, lr_min=0.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(gsam, factor=0.1, patience=0)
    batch = make_batches(1)[0]
    gsam.step(sam_closure(model, gsam, batch))
    for loss in (1.0, 2.0, 3.0):
        plateau.step(loss)  # no improvement after the first: the lr falls to 0.01, then 0.001
    gsam.step(sam_closure(model, gsam, batch))  # an ascent at the lowered lr keeps the peak it has seen
    group = gsam.param_groups[0]
    assert group["lr"] == pytest.approx(0.001) and GSAM.lr_max_of(group) == pytest.approx(0.1)
    assert GSAM.scheduled_rho(group) == pytest.approx(0.001)
    resumed = GSAM(make_mlp().parameters(), torch.optim.SGD, lr=0.001, rho=0.1)
    resumed.load_state_dict(gsam.state_dict())
    assert GSAM.scheduled_rho(resumed.param_groups[0]) == pytest.approx(0.001)
    with pytest.raises(ValueError, match=r"lr_min=0.5, lr_max=0.1 \(the group's peak learning rate\)"):
        GSAM(model.parameters(), torch.optim.SGD, lr=0.1, lr_min=0.5)
    numpy = pytest.importorskip("numpy")
    stored = GSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho_min=numpy.float32(0.01), lr_min=numpy.float64(0.0))
    assert {type(stored.param_groups[0][key]) for key in ("rho_min", "lr_min")} == {float}


def test_gsam_follows_a_learning_rate_warmed_up_by_hand_down_from_the_peak_it_reached():
    """A loop that sets the lr by hand (a warm-up to 0.1, then down to 0.05) records no peak for a scheduler to
    keep: ρ_t = ρ·lr/peak = 0.1·0.05/0.1 = 0.05 from the largest lr seen at an ascent, not from the first one."""
    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = GSAM([w], torch.optim.SGD, lr=0.01, rho=0.1, alpha=0.0)
    for lr in (0.01, 0.05, 0.1, 0.05):
        opt.param_groups[0]["lr"] = lr
        w.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
        clean = w.detach().clone()
        with opt.perturbed():
            moved = (w.detach() - clean).norm().item()
        opt.zero_grad()
    assert moved == pytest.approx(0.05, rel=1e-12)  # ‖ε‖ = ρ_t


def test_esam_selects_ceil_gamma_b_examples_with_the_largest_rise():  # kills V6
    opt = ESAM([nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, gamma=0.5)
    chosen = opt.select_examples(torch.zeros(5), torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3]))
    assert sorted(chosen.tolist()) == [1, 3, 4]  # ceil(0.5 * 5) = 3


def test_gsam_rho_t_is_rho_when_lr_min_equals_lr_max():
    """The class docstring's degenerate schedule: an lr range of zero width keeps ρ_t = ρ (not rho_min), whether
    lr_max is given or is the group's peak learning rate, and the ascent then moves the weights by ρ."""
    for lr_max in (0.1, None):
        w = nn.Parameter(torch.ones(2))
        opt = GSAM([w], torch.optim.SGD, lr=0.1, rho=0.1, rho_min=0.02, lr_min=0.1, lr_max=lr_max)
        assert GSAM.scheduled_rho(opt.param_groups[0]) == 0.1
        w.grad, clean = torch.tensor([3.0, 4.0]), w.detach().clone()
        with opt.perturbed():
            torch.testing.assert_close(w.detach() - clean, torch.tensor([0.06, 0.08]))  # ρ g/‖g‖, ‖g‖ = 5


def test_gsam_scheduled_rho_is_held_within_rho_min_and_rho_outside_the_lr_range():  # kills V9
    w = nn.Parameter(torch.ones(2))
    opt = GSAM([w], torch.optim.SGD, lr=0.1, rho=0.05, rho_min=0.01, lr_max=0.1, lr_min=0.02)
    group = opt.param_groups[0]
    group["lr"] = 0.2
    assert GSAM.scheduled_rho(group) == 0.05
    w.grad, clean = torch.tensor([3.0, 4.0]), w.detach().clone()
    with opt.perturbed():
        assert abs((w.detach() - clean).norm().item() - 0.05) < 1e-6
    group["lr"] = 0.01
    assert GSAM.scheduled_rho(group) == 0.01


def test_friendly_sam_commits_the_average_after_a_finite_zero_norm_ascent():  # kills V11
    w = nn.Parameter(torch.ones(3))
    opt = FriendlySAM([w], torch.optim.SGD, lr=0.0, sigma=2.0, ema_decay=0.5)  # d = 0·g − m = 0 at m = 0
    g = torch.tensor([1.0, 2.0, 2.0])
    w.grad = g.clone()
    assert opt.perturb() is False
    opt.restore()  # every loop restores after perturb(), ascent or not: the average is committed there
    torch.testing.assert_close(opt.buffers["ema"][w], 0.5 * g)
    w.grad = g.clone()
    assert opt.perturb() is True  # d = −m ≠ 0 now
    opt.restore()


def test_friendly_sam_step_after_a_zero_norm_ascent_is_the_base_step_on_the_clean_gradient():
    """The ascent runs SAM's along d with d in ``.grad``; with d = 0 (σ = 2, λ = ½, m = 0) nothing is perturbed and
    no pass 2 runs, so the base step must see the clean gradient g again, not d: w ← w − lr·g."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = FriendlySAM([w], torch.optim.SGD, lr=0.1, sigma=2.0, ema_decay=0.5)
    g = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = (w * g).sum()  # ∇ = g
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(w.detach(), torch.ones(3, dtype=torch.float64) - 0.1 * g, rtol=0, atol=1e-15)


def test_loaded_variant_buffers_are_copies_not_the_checkpoint_tensors():  # kills V15
    w1, w2 = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    a = FriendlySAM([w1], torch.optim.SGD, lr=0.1)
    b = FriendlySAM([w2], torch.optim.SGD, lr=0.1)
    w1.grad = torch.tensor([1.0, 2.0, 3.0])
    a.perturb()
    a.restore()
    b.load_state_dict(a.state_dict())
    snapshot = a.buffers["ema"][w1].clone()
    w2.grad = torch.tensor([5.0, -5.0, 5.0])
    b.perturb()
    b.restore()  # b's in-place EMA update must not reach a's buffer
    assert torch.equal(a.buffers["ema"][w1], snapshot)


def test_a_pending_window_count_survives_a_checkpoint():  # kills V16
    def build(p):
        return PeriodicSAM([p], torch.optim.SGD, lr=0.1, interval=2)

    live = build(nn.Parameter(torch.ones(2)))
    live.before_first_pass()
    live.after_first_pass()
    live.base_optimizer.step()  # the Accelerate helper steps the base optimizer directly
    resumed = build(nn.Parameter(torch.ones(2)))
    resumed.load_state_dict(live.state_dict())
    live.before_first_pass()
    resumed.before_first_pass()
    assert resumed.optimizer_steps == live.optimizer_steps == 1
    assert resumed.ascent_this_step() == live.ascent_this_step() is False


def test_a_window_stopped_before_its_last_micro_batch_is_not_counted_by_a_checkpoint():
    """A callback stopped training between micro-batches and the Trainer saved: the checkpoint counted the
    abandoned window as a pending step, and periodic/LookSAM/ESAM resumed one step out of phase."""
    opt = PeriodicSAM([nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, interval=2)
    opt.before_first_pass()  # first micro-batch of a window of several; training stops here
    saved = opt.state_dict()
    assert saved["sam_variant"]["window_open"] is False
    resumed = PeriodicSAM([nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, interval=2)
    resumed.load_state_dict(saved)
    resumed.before_first_pass()
    assert resumed.optimizer_steps == 0 and resumed.ascent_this_step()


# -- tensors without gradient: frozen ones are never drawn or perturbed -------------------------------------
def test_esam_tensor_swp_draws_among_trainable_tensors_so_a_frozen_one_in_the_optimizer_changes_nothing():
    """A frozen layer handed to the optimizer with ``model.parameters()``: the draws are taken among the tensors
    that require grad, so the run equals one whose optimizer never held the frozen layer (it crashed once a
    pruned pass 1 drew only frozen tensors: the loss had no graph)."""
    batches = make_batches(8)
    runs = {}
    for holds_frozen in (True, False):
        model = make_mlp()
        model[0].requires_grad_(False)
        params = model.parameters() if holds_frozen else model[2].parameters()
        opt = ESAM(params, torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO, beta=0.5, gamma=1.0, seed=3)
        for x, y in batches:
            def closure(indices=None, model=model, x=x, y=y):
                return ((model(x) - y) ** 2).mean(dim=1)
            opt.step(closure)
        runs[holds_frozen] = model
    assert bitwise_equal(runs[True], runs[False])
    assert torch.equal(runs[True][0].weight, make_mlp()[0].weight)
    assert max_abs_diff(runs[True], make_mlp()) > 1e-3


def test_msam_never_perturbs_a_tensor_frozen_after_it_gained_momentum():
    """SAM perturbs no tensor without gradient; msam perturbed a frozen tensor along the momentum its base
    optimizer no longer updates (and that stale momentum shrank everyone else's ε)."""
    model = make_mlp()
    opt = sgd_variant(MomentumSAM, model, rho=0.5)
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(module.weight.detach().clone()))
    batches = make_batches(5)
    for index, batch in enumerate(batches):
        if index == 2:
            model[0].requires_grad_(False)
            clean = model[0].weight.detach().clone()
            seen.clear()
        opt.zero_grad()
        opt.before_first_pass()
        ((model(batch[0]) - batch[1]) ** 2).mean().backward()
        opt.after_first_pass()
        opt.step()
    assert len(seen) == 3 and all(torch.equal(weight, clean) for weight in seen)
    assert opt.stats["grad_norm"] > 0  # the trainable layer was still perturbed


def test_gsam_takes_rho_min_above_a_rho_zero_group_it_never_perturbs():
    model = make_mlp()

    def groups():
        return [{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias], "rho": 0.0}]

    opt = GSAM(groups(), torch.optim.SGD, lr=LR, rho=RHO, rho_min=0.02, alpha=0.1)
    assert [group["rho_min"] for group in opt.param_groups] == [0.02, 0.02]
    with pytest.raises(ValueError, match=r"rho_min must be in \[0, rho=0.1\], got 0.2"):
        GSAM(groups(), torch.optim.SGD, lr=LR, rho=RHO, rho_min=0.2)
    with pytest.raises(ValueError, match="rho_min must be in"):
        GSAM([{"params": [model[0].weight]}, {"params": [model[0].bias], "rho": 0.0, "rho_min": -0.1}],
             torch.optim.SGD, lr=LR, rho=RHO)


@pytest.mark.parametrize("reuse_scale", [1e-3, 8e3])
def test_looksam_stores_and_reuses_its_direction_in_float32_for_float16_weights(reuse_scale):
    """1/‖g_v‖ was cast to float16, which overflows below ‖g_v‖ ≈ 1.5e-5 (a pass-2 gradient nearly parallel to
    the clean one): the stored direction became inf/NaN after the finiteness check, and the next reuse step fed
    NaN to the base optimizer. The reuse step's ‖g‖ may leave float16's range too (8e3 per entry: ‖g‖ ≈ 8e4 >
    65504, as under a GradScaler), while g + α‖g‖ĝ_v itself fits."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, dtype=torch.float16)), nn.Parameter(torch.randn(32, dtype=torch.float16))]
    opt = LookSAM(params, torch.optim.SGD, lr=0.0, rho=RHO, interval=2, alpha=0.5)
    clean = [torch.randn(p.shape) * 1e-3 for p in params]
    perturbed = [(g + torch.randn(g.shape) * 2e-7).half() for g in clean]  # ‖g_v‖ ≈ 1e-6
    clean = [g.half() for g in clean]
    reuse = [(torch.randn(p.shape) * reuse_scale).half() for p in params]
    opt.before_first_pass()
    for p, g in zip(params, clean):
        p.grad = g.clone()
    opt.after_first_pass()
    assert opt.perturb()
    for p, g in zip(params, perturbed):
        p.grad = g.clone()
    opt.restore()
    opt.step()
    direction = torch.cat([opt.buffers["direction"][p].double() for p in params])
    assert torch.isfinite(direction).all() and abs(direction.norm().item() - 1) < 1e-2

    opt.before_first_pass()
    for p, r in zip(params, reuse):
        p.grad = r.clone()
    opt.after_first_pass()
    r = torch.cat([t.double() for t in reuse])
    got = torch.cat([p.grad.double() for p in params])
    assert r.norm() > 65504 if reuse_scale > 1 else r.norm() < 1
    expected = r + 0.5 * r.norm() * direction
    assert torch.isfinite(got).all() and torch.allclose(got, expected, rtol=1e-2, atol=1e-3 * reuse_scale)


def esam_closure_rises(model: nn.Module) -> list[torch.Tensor]:
    """Each step's perturbed − clean per-example losses that ESAM.step's selection ranks, at a negligible ρ: three
    closure steps on batches of 8 on the model's device."""
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=LR, rho=1e-9, beta=1.0, gamma=0.5)
    rises = []
    select = opt.select_examples
    opt.select_examples = lambda clean, perturbed, **kw: rises.append(perturbed - clean) or select(clean, perturbed, **kw)
    device = next(model.parameters()).device
    for x, y in make_batches(3):
        x, y = x.to(device), y.to(device)
        opt.step(lambda indices=None, x=x, y=y: ((model(x if indices is None else x[indices])
                                                  - (y if indices is None else y[indices])) ** 2).mean(dim=1))
    return rises


def test_esam_closure_step_selects_under_pass_one_dropout_masks():
    """ESAM.step's no-grad forward at w + ε drew fresh dropout masks, so the rise it ranks was mostly noise; it
    now replays pass 1's draws: at a negligible ρ every rise is ~0."""
    torch.manual_seed(0)
    rises = esam_closure_rises(nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3)).double())
    assert len(rises) == 3 and max(rise.abs().max().item() for rise in rises) < 1e-6


def test_a_run_that_keeps_its_settings_drops_another_methods_checkpoint_state(caplog):
    """Resumed with another --optimizer (SAMTrainer keeps the run's settings): LookSAM's direction in an F-SAM
    run was refused ("checkpoint holds buffers ['direction']"), while LookSAM -> SAM dropped it silently."""
    model = make_mlp()
    looksam = sgd_variant(LookSAM, model, rho=RHO, interval=2)
    for batch in make_batches(2):
        looksam.step(lambda batch=batch: _closure_loss(looksam, model, batch))
    saved = looksam.state_dict()
    assert saved["sam_variant"]["buffers"]["direction"]
    with pytest.raises(ValueError, match=r"holds buffers \['direction'\]"):
        sgd_variant(FriendlySAM, make_mlp(), rho=RHO).load_state_dict(saved)
    fsam = sgd_variant(FriendlySAM, make_mlp(), rho=RHO).keep_settings_on_load()
    with caplog.at_level("WARNING", logger="arrcoc_sam.sam.variants._base"):
        fsam.load_state_dict(saved)
    assert "drops it" in caplog.text and fsam.optimizer_steps == 2 and not fsam.buffers["ema"]


def _closure_loss(opt, model, batch):
    opt.zero_grad()
    loss = ((model(batch[0]) - batch[1]) ** 2).mean()
    loss.backward()
    return loss



def test_a_subclass_override_of_after_first_pass_without_super_still_counts_its_windows():
    """Counting moved into after_first_pass: a third-party override that does not call super() never advanced
    the step counter in a loop that steps the base optimizer itself (6 windows: 0 steps, an ascent each)."""
    class Quiet(PeriodicSAM):
        def after_first_pass(self) -> None:
            pass

    model = make_mlp()
    opt = Quiet(model.parameters(), torch.optim.SGD, lr=LR, interval=2)
    ascents = 0
    for x, y in make_batches(6):
        opt.before_first_pass()
        ascend = opt.ascent_this_step()
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.after_first_pass()
        if ascend:
            ascents += 1
            with opt.perturbed():
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
        opt.base_optimizer.step()  # as the Accelerate helper's loop does
    opt.before_first_pass()
    assert (opt.optimizer_steps, ascents) == (6, 3)


def test_esam_closure_with_detached_per_example_losses_is_refused_not_silently_skipped():
    model = make_mlp()
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO, beta=1.0, gamma=0.5)
    x, y = make_batches(1)[0]
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(lambda indices=None: ((model(x) - y) ** 2).mean(dim=1).detach())


def test_a_checkpoint_of_another_method_is_refused_before_anything_loads():
    model = make_mlp()
    looksam = sgd_variant(LookSAM, model, rho=RHO, interval=2)
    for batch in make_batches(2):
        looksam.step(lambda batch=batch: _closure_loss(looksam, model, batch))
    saved = looksam.state_dict()
    fsam = FriendlySAM(make_mlp().parameters(), torch.optim.SGD, lr=0.5, momentum=MOMENTUM, rho=RHO)
    with pytest.raises(ValueError, match=r"holds buffers \['direction'\]"):
        fsam.load_state_dict(saved)
    assert fsam.param_groups[0]["lr"] == 0.5 and not fsam.state and fsam._extra_before_load is None


# -- audit 24: BatchNorm statistics, failed windows, ⌈γB⌉, NumPy knobs, momentum-less bases -----------------
def bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def bn_batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=gen) * 3 + 2, torch.randn(16, 1, generator=gen)) for _ in range(n)]


def test_msam_under_hold_running_stats_lets_batchnorm_follow_its_one_pass_per_step():
    """msam's only pass runs between perturb() and restore(); restore() copied the pre-step statistics back, so
    they never moved (num_batches_tracked 1 after 5 steps, from the plain first step)."""
    runs = {}
    for hold in (False, True):
        model = bn_mlp()
        opt = sgd_variant(MomentumSAM, model, rho=RHO).hold_running_stats(model if hold else None)
        for batch in bn_batches(5):
            opt.step(sam_closure(model, opt, batch))
        runs[hold] = model
    assert int(runs[True][1].num_batches_tracked) == 5
    assert bitwise_equal(runs[True], runs[False])  # weights and running statistics: one pass per step either way


def test_esam_tensor_swp_with_a_zero_norm_draw_under_hold_running_stats_moves_batchnorm_once_per_step():
    """The only perturbed tensor has a zero gradient, so every ascent norm over the draw is 0 and pass 2 runs at w:
    the step is the base optimizer's, its statistics one forward's (they moved twice per step)."""
    model, twin = bn_mlp(), bn_mlp()
    extra = nn.Parameter(torch.zeros(8))  # a LoRA-B-like tensor at init: in the forward, zero gradient

    def closure_of(net, opt, batch, zero):
        def closure():
            opt.zero_grad()
            hidden = net[2](net[1](net[0](batch[0])))
            loss = ((net[3](hidden + 0 * zero) - batch[1]) ** 2).mean()
            loss.backward()
            return loss
        return closure

    groups = [{"params": list(model.parameters()), "rho": 0.0}, {"params": [extra], "rho": RHO}]
    opt = ESAM(groups, torch.optim.SGD, lr=LR, momentum=MOMENTUM, beta=0.5, gamma=1.0).hold_running_stats(model)
    twin_extra = nn.Parameter(torch.zeros(8))
    base = torch.optim.SGD([*twin.parameters(), twin_extra], lr=LR, momentum=MOMENTUM)
    for batch in bn_batches(4):
        assert opt.swp_tensors() == [extra]
        opt.step(closure_of(model, opt, batch, extra))
        closure_of(twin, base, batch, twin_extra)()
        base.step()
    assert int(model[1].num_batches_tracked) == 4
    assert bitwise_equal(model, twin)


def fsam_after(batches):
    model = make_mlp()
    opt = sgd_variant(FriendlySAM, model, rho=RHO, sigma=1.0)
    for batch in batches:
        opt.step(sam_closure(model, opt, batch))
    return model, opt


def test_fsam_step_whose_second_pass_raises_keeps_its_average_and_the_retry_equals_a_run_without_failure():
    """perturb() folded g_t into the stored average before pass 2, which a raising pass 2 did not undo: the retried
    step folded g_t in twice (max|m − m_twin| 3e-2 after the retry and one step more)."""
    batches = make_batches(4)
    model, opt = fsam_after(batches[:2])
    ema = {p: m.clone() for p, m in opt.buffers["ema"].items()}
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing_closure(model, opt, batches[2], fail_on_call=2))  # pass 2 at w + ε raises
    assert all(torch.equal(ema[p], m) for p, m in opt.buffers["ema"].items())
    for batch in batches[2:]:
        opt.step(sam_closure(model, opt, batch))
    twin, twin_opt = fsam_after(batches)
    assert bitwise_equal(model, twin)
    assert all(torch.equal(m, twin_opt.buffers["ema"][q])
               for m, q in zip(opt.buffers["ema"].values(), twin_opt.buffers["ema"], strict=True))


@pytest.mark.parametrize("gamma, batch_size, chosen", [(0.14, 50, 7), (0.07, 100, 7), (0.28, 25, 7), (1 / 3, 30, 10),
                                                       (0.5, 10, 5), (0.5, 11, 6)])
def test_esam_selects_exactly_ceil_gamma_times_batch_examples(gamma, batch_size, chosen):
    """⌈γB⌉ was taken of the float product: 0.14·50 = 7.000000000000001 chose 8."""
    opt = ESAM(make_mlp().parameters(), torch.optim.SGD, lr=LR, gamma=gamma)
    rise = torch.arange(batch_size, dtype=torch.float64)
    assert opt.select_examples(torch.zeros(batch_size), rise).numel() == chosen


def test_numpy_scalar_knobs_are_taken_and_stored_as_python_numbers():
    """NumPy integers and floats were refused with messages their values contradicted ("interval must be an integer
    >= 1, got np.int64(2)"), while SAMSettings took them (and ρ, η take NumPy numbers everywhere)."""
    np = pytest.importorskip("numpy")
    from arrcoc_sam.integrations._settings import SAMSettings

    params = list(make_mlp().parameters())
    built = [
        (PeriodicSAM, {"interval": np.int64(2)}, {"interval": (int, 2)}),
        (LookSAM, {"interval": np.int32(3), "alpha": np.float32(0.5)}, {"interval": (int, 3), "alpha": (float, 0.5)}),
        (ESAM, {"beta": np.float32(0.5), "gamma": np.float64(0.25)}, {"beta": (float, 0.5), "gamma": (float, 0.25)}),
        (GSAM, {"alpha": np.float32(0.25)}, {"alpha": (float, 0.25)}),
        (FriendlySAM, {"sigma": np.int64(1), "ema_decay": np.float32(0.5)}, {"sigma": (float, 1.0), "ema_decay": (float, 0.5)}),
    ]
    for cls, kwargs, stored in built:
        opt = cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
        for name, (kind, value) in stored.items():
            assert type(getattr(opt, name)) is kind and getattr(opt, name) == value, (cls.__name__, name)
    settings = SAMSettings(method="periodic", interval=np.int64(2), extra={"rho_scaling": "sqrt"})
    assert settings.build(torch.optim.SGD(params, lr=0.1)).interval == 2
    assert SAMSettings(method="esam", extra={"gamma": np.float32(0.5)}).build(torch.optim.SGD(params, lr=0.1)).gamma == 0.5
    for cls, kwargs, match in [(PeriodicSAM, {"interval": np.float64(2.0)}, "interval must be an integer >= 1"),
                               (ESAM, {"gamma": np.float32(1.5)}, r"gamma must be a number in \(0, 1\]"),
                               (LookSAM, {"alpha": np.float64("nan")}, "alpha must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=match):
            cls(params, torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("base", [torch.optim.Adagrad, torch.optim.Rprop, torch.optim.ASGD, torch.optim.Adafactor],
                         ids=lambda base: base.__name__)
def test_msam_refuses_a_base_optimizer_that_keeps_no_momentum_at_construction(base):
    """Adagrad, Rprop and ASGD were accepted and raised TypeError at step 0 or 1, after a full step was applied."""
    with pytest.raises(ValueError, match=f"param group 0: msam .* {base.__name__} keeps none"):
        MomentumSAM(make_mlp().parameters(), base, lr=0.01)
    instance = base(make_mlp().parameters(), lr=0.01)
    with pytest.raises(ValueError, match=f"{base.__name__} keeps none"):
        MomentumSAM(instance.param_groups[0]["params"], instance)
    assert "rho" not in instance.param_groups[0]  # a refused wrapper leaves the instance as it was
    model = make_mlp()
    opt = MomentumSAM(model.parameters(), base, lr=0.01, rho=0.0)  # nothing to perturb: the base optimizer alone
    for batch in make_batches(2):
        opt.step(sam_closure(model, opt, batch))


def test_a_refused_second_friendly_sam_perturb_keeps_the_first_ones_average():
    """The pending average was cleared before SAM refused the second perturb(), so restore() committed nothing."""
    def average(misuse: bool):
        model = make_mlp()
        opt = FriendlySAM(model.parameters(), torch.optim.SGD, lr=LR, rho=0.05)
        x, y = make_batches(1)[0]
        ((model(x) - y) ** 2).mean().backward()
        opt.perturb()
        if misuse:
            with pytest.raises(RuntimeError, match="perturb\\(\\) called twice"):
                opt.perturb()
        opt.restore()
        return list(opt.buffers["ema"].values())

    plain, misused = average(False), average(True)
    assert len(plain) == len(misused) > 0 and all(map(torch.equal, plain, misused))


def test_esam_takes_a_numpy_gamma_as_written_for_ceil_gamma_times_batch():
    """np.float32(0.14) is 0.14000000059604645 in binary: stored as such, ⌈γ·50⌉ chose 8 examples, not 7."""
    np = pytest.importorskip("numpy")
    opt = ESAM(make_mlp().parameters(), torch.optim.SGD, lr=LR, gamma=np.float32(0.14))
    assert opt.gamma == 0.14
    assert opt.select_examples(torch.zeros(50), torch.arange(50.0)).numel() == 7
    opt.gamma = np.float32(0.28)  # set after construction: read as written too
    assert opt.select_examples(torch.zeros(25), torch.arange(25.0)).numel() == 7
