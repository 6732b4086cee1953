"""Sharpness measures against closed forms: quadratics, ReLU rescaling, Gaussian noise, the PAC-Bayes formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arrcoc_sam.curvature import (
    adaptive_sharpness,
    average_sharpness,
    pac_bayes_bound,
    sam_sharpness,
    top_eigenvalues,
)


class Quadratic(nn.Module):
    """L(w) = ½ (w − c)ᵀ A (w − c) with a known spectrum."""

    def __init__(self, eigenvalues: list[float]) -> None:
        super().__init__()
        dim = len(eigenvalues)
        rotation = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).Q
        self.register_buffer("matrix", rotation @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ rotation.T)
        self.register_buffer("center", torch.linspace(-1, 1, dim, dtype=torch.float64))
        self.weight = nn.Parameter(self.center.clone())

    def loss(self) -> torch.Tensor:
        diff = self.weight - self.center
        return 0.5 * diff @ self.matrix @ diff


def _quadratic_loss(model, batch):
    return model.loss()


BATCH = torch.zeros(1)
SPECTRUM = [4.0, 2.0, 1.0, 0.5, 0.25, 0.1]


def test_multistep_sam_sharpness_at_a_minimum_equals_half_rho_squared_lambda_max():
    model = Quadratic(SPECTRUM)
    rho = 0.1
    value = sam_sharpness(model, _quadratic_loss, BATCH, rho=rho, steps=100)
    assert value == pytest.approx(0.5 * rho**2 * max(SPECTRUM), rel=1e-9)


def test_first_order_sam_sharpness_matches_the_quadratic_closed_form():
    model = Quadratic(SPECTRUM)
    with torch.no_grad():
        model.weight.add_(torch.linspace(0.3, -0.2, len(SPECTRUM), dtype=torch.float64))
    gradient = model.matrix @ (model.weight.detach() - model.center)
    rho = 0.05
    expected = rho * gradient.norm() + 0.5 * rho**2 * (gradient @ model.matrix @ gradient) / gradient.square().sum()
    assert sam_sharpness(model, _quadratic_loss, BATCH, rho=rho) == pytest.approx(float(expected), rel=1e-12)


def test_sam_sharpness_restores_weights_bitwise():
    model = Quadratic(SPECTRUM)
    before = model.weight.detach().clone()
    sam_sharpness(model, _quadratic_loss, BATCH, rho=0.5, steps=5, adaptive=True)
    assert torch.equal(model.weight, before)


def _relu_net(alpha: float) -> nn.Module:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        net[0].weight.mul_(alpha)
        net[0].bias.mul_(alpha)
        net[2].weight.div_(alpha)
    return net


def _regression_batch():
    generator = torch.Generator().manual_seed(8)
    return torch.randn(16, 3, dtype=torch.float64, generator=generator), torch.randn(16, 2, dtype=torch.float64, generator=generator)


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def test_adaptive_sharpness_is_invariant_to_relu_rescaling_while_lambda_max_changes():
    batch = _regression_batch()
    plain, scaled = _relu_net(1.0), _relu_net(4.0)
    torch.testing.assert_close(plain(batch[0]), scaled(batch[0]), atol=1e-12, rtol=0)
    for steps in (1, 3):
        a = adaptive_sharpness(plain, _mse, batch, rho=0.3, steps=steps)
        b = adaptive_sharpness(scaled, _mse, batch, rho=0.3, steps=steps)
        assert a > 0
        assert b == pytest.approx(a, rel=1e-8, abs=0)
    top_plain = float(top_eigenvalues(plain, _mse, batch, tol=1e-8).values[0])
    top_scaled = float(top_eigenvalues(scaled, _mse, batch, tol=1e-8).values[0])
    assert abs(top_scaled - top_plain) > 0.1 * top_plain


def test_average_sharpness_of_a_quadratic_is_half_sigma_squared_trace_within_three_stderr():
    model = Quadratic(SPECTRUM)
    sigma = 0.1
    estimate = average_sharpness(model, _quadratic_loss, BATCH, sigma=sigma, num_samples=200)
    assert abs(estimate.value - 0.5 * sigma**2 * sum(SPECTRUM)) <= 3 * estimate.stderr


def test_pac_bayes_bound_matches_the_formula_and_grows_with_the_trace():
    n, delta, sigma = 1000, 0.05, 0.02
    result = pac_bayes_bound(trace=50.0, loss=0.1, distance_sq=4.0, num_examples=n, delta=delta, sigmas=[sigma])
    kl = 4.0 / (2 * sigma**2)
    expected = 0.1 + 0.5 * sigma**2 * 50.0 + math.sqrt((kl + math.log(2 * math.sqrt(n) / delta)) / (2 * n))
    assert result.bound == pytest.approx(expected, rel=1e-12)
    assert result.kl == pytest.approx(kl)
    flat = pac_bayes_bound(trace=1.0, loss=0.1, distance_sq=4.0, num_examples=n)
    sharp = pac_bayes_bound(trace=1e4, loss=0.1, distance_sq=4.0, num_examples=n)
    assert flat.bound < sharp.bound


def test_sharpness_arguments_are_validated_by_name():
    model = Quadratic(SPECTRUM)
    with pytest.raises(ValueError, match="rho must be > 0"):
        sam_sharpness(model, _quadratic_loss, BATCH, rho=-0.1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sam_sharpness(model, _quadratic_loss, BATCH, steps=0)
    with pytest.raises(ValueError, match="delta must be in"):
        pac_bayes_bound(1.0, 0.1, 1.0, 10, delta=1.5)


def _random_quadratic(seed: int):
    """L(w) = ½ wᵀAw + bᵀw with an indefinite A, and a model at a random w near 0."""
    generator = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64)).Q
    matrix = rotation @ torch.diag(torch.randn(6, generator=generator, dtype=torch.float64) * 3) @ rotation.T
    linear = torch.randn(6, generator=generator, dtype=torch.float64) * 0.05
    model = nn.Linear(6, 1, bias=False).double()
    nn.init.normal_(model.weight, std=0.01, generator=generator)
    return model, matrix, linear, lambda m, batch: 0.5 * m.weight[0] @ matrix @ m.weight[0] + linear @ m.weight[0]


def test_multistep_sam_sharpness_is_never_below_one_step_on_random_quadratics():
    for seed in range(80):  # seeds 10, 61 and 72 gave a lower 5-step value before
        model, _, _, loss = _random_quadratic(seed)
        one = sam_sharpness(model, loss, BATCH, rho=0.5, steps=1)
        five = sam_sharpness(model, loss, BATCH, rho=0.5, steps=5)
        assert five >= one, seed


def test_multistep_sam_sharpness_is_the_largest_loss_increase_over_hand_computed_ascent_iterates():
    model, matrix, linear, loss = _random_quadratic(10)
    rho, origin = 0.5, model.weight.detach()[0].clone()

    def value(w):
        return float(0.5 * w @ matrix @ w + linear @ w)

    delta, increases = torch.zeros(6, dtype=torch.float64), []
    for _ in range(5):
        gradient = matrix @ (origin + delta) + linear
        delta = delta + rho * gradient / gradient.norm()
        delta = delta * min(1.0, rho / float(delta.norm()))
        increases.append(value(origin + delta) - value(origin))
    assert increases[-1] < max(increases)  # the last iterate is not the worst one here
    assert sam_sharpness(model, loss, BATCH, rho=rho, steps=5) == pytest.approx(max(increases), rel=1e-10)


def test_adaptive_sharpness_is_zero_when_every_probed_weight_is_zero():
    """η = 0 and all-zero weights (a zero-initialised LoRA B): the only feasible perturbation is ε = 0."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 2, bias=False), "b": nn.Linear(2, 3, bias=False)})
    nn.init.zeros_(model["b"].weight)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))

    def loss(m, b):
        return F.cross_entropy(m["b"](m["a"](b[0])), b[1])

    assert adaptive_sharpness(model, loss, batch, params=[model["b"].weight], steps=2) == 0.0
    assert bool((model["b"].weight == 0).all())


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("trace", float("nan"), "trace must be finite"),
    ("trace", float("inf"), "trace must be finite"),
    ("loss", float("nan"), "loss must be finite"),
    ("distance_sq", float("inf"), "distance_sq must be finite"),
    ("trace", -3.0, "trace must be >= 0, got -3.0"),
    ("loss", -0.1, "loss must be >= 0"),
])
def test_pac_bayes_bound_refuses_non_finite_or_negative_inputs(argument, value, message):
    """A negative trace used to give a 'bound' below zero (the Taylor term rewarded the largest sigma)."""
    inputs = {"trace": 10.0, "loss": 0.1, "distance_sq": 4.0} | {argument: value}
    with pytest.raises(ValueError, match=message):
        pac_bayes_bound(num_examples=1000, **inputs)


def test_average_sharpness_cancels_the_gradient_term_away_from_a_minimum():
    """L = ½(w − c)ᵀA(w − c) at ‖∇L‖ ≈ 4: E[L(w + δ)] − L(w) = ½σ² tr(A) exactly. One-sided samples carry the
    σ‖∇L‖ ≈ 4e-2 first-order noise (vs a 3.9e-4 signal); antithetic pairs cancel it exactly."""
    model = Quadratic(SPECTRUM)
    with torch.no_grad():
        model.weight.add_(torch.linspace(1.0, -1.0, len(SPECTRUM), dtype=torch.float64))
    sigma = 0.01
    expected = 0.5 * sigma**2 * sum(SPECTRUM)
    estimate = average_sharpness(model, _quadratic_loss, BATCH, sigma=sigma, num_samples=20)
    assert abs(estimate.value - expected) <= 3 * estimate.stderr
    assert estimate.stderr < 0.2 * expected
    assert estimate.num_matvecs == 40


def test_sharpness_measures_warn_when_the_loss_is_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    batch = (torch.randn(16, 4, dtype=torch.bfloat16), torch.randint(0, 3, (16,)))

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    with pytest.warns(UserWarning, match=r"sam_sharpness: the loss is torch.bfloat16"):
        sam_sharpness(model, loss, batch)
    with pytest.warns(UserWarning, match=r"average_sharpness: the loss is torch.bfloat16"):
        average_sharpness(model, loss, batch, num_samples=2)


def test_pac_bayes_bound_matches_the_formula_with_the_union_bound_over_the_grid():  # kills C8
    result = pac_bayes_bound(trace=10.0, loss=0.1, distance_sq=4.0, num_examples=1000, delta=0.05,
                             sigmas=[0.01, 0.1, 1.0])
    s = result.sigma
    hand = 0.1 + 0.5 * s**2 * 10.0 + math.sqrt((4.0 / (2 * s**2) + math.log(2 * math.sqrt(1000) * 3 / 0.05)) / 2000)
    assert abs(result.bound - hand) < 1e-12


def test_adaptive_average_sharpness_with_eta_perturbs_zero_weights():  # kills C12
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    x, y = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 1)
    estimate = average_sharpness(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), (x, y), sigma=0.1,
                                 num_samples=8, adaptive=True, eta=1.0)
    expected = 0.01 * float((x**2).sum()) / 8  # σ²η² tr(XᵀX)/N for this quadratic
    assert estimate.value > 0 and abs(estimate.value - expected) < 5 * estimate.stderr


def _unequal_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (12,), generator=generator)
    return model, [(x[:9], y[:9]), (x[9:], y[9:])], (x, y)


def _cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_sharpness_over_unequal_batches_equals_that_of_one_big_batch():
    """Batches of 9 and 3 examples weigh 3:1 in the loss, its gradient and every perturbed loss."""
    model, batches, whole = _unequal_batches()
    for steps in (1, 3):
        split = sam_sharpness(model, _cross_entropy, batches, rho=0.5, steps=steps)
        assert split == pytest.approx(sam_sharpness(model, _cross_entropy, whole, rho=0.5, steps=steps), rel=1e-10)
    split = average_sharpness(model, _cross_entropy, batches, sigma=0.1, num_samples=3)
    joined = average_sharpness(model, _cross_entropy, whole, sigma=0.1, num_samples=3)
    assert split.value == pytest.approx(joined.value, rel=1e-10)


def test_adaptive_sam_sharpness_with_eta_perturbs_zero_weights_like_sam_with_rho_times_eta():
    """At w = 0, T = |w| + η = η·1, so ε = ρ T²g/‖Tg‖ = ρη·g/‖g‖: plain SAM with radius ρη (η ignored gave 0)."""
    model = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, dtype=torch.float64, generator=generator), torch.ones(8, 1, dtype=torch.float64)

    def mse(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    gradient = -2 * (x * y).mean(0)  # ∇ mean((xw − y)²) at w = 0
    epsilon = 0.1 * 0.5 * gradient / gradient.norm()
    expected = float(((x @ epsilon - y[:, 0]) ** 2).mean() - 1.0)
    adaptive = sam_sharpness(model, mse, (x, y), rho=0.1, adaptive=True, eta=0.5)
    assert adaptive == pytest.approx(expected, rel=1e-10)
    assert adaptive == pytest.approx(sam_sharpness(model, mse, (x, y), rho=0.05), rel=1e-10)


class _DiagonalQuadratic(nn.Module):
    """L(w) = ½ Σ a_i (w_i − c_i)², at its minimum w = c."""

    def __init__(self, center: list[float], curvature: list[float]) -> None:
        super().__init__()
        self.register_buffer("center", torch.tensor(center, dtype=torch.float64))
        self.register_buffer("curvature", torch.tensor(curvature, dtype=torch.float64))
        self.weight = nn.Parameter(self.center.clone())

    def loss(self) -> torch.Tensor:
        return 0.5 * (self.curvature * (self.weight - self.center).square()).sum()


def test_adaptive_sharpness_at_a_zero_gradient_spends_the_whole_radius_on_weights_it_can_perturb():
    """∇L = 0: the random direction must live on T > 0. With a_i = 1/c_i² (c_i ≠ 0), L(w + Tδ) − L(w) = ½‖δ‖² =
    ½ρ² for every direction on those weights; a direction leaking onto the zero weights (T = 0) gave less."""
    model = _DiagonalQuadratic([0.5, 0.0, -2.0, 0.0, 1.0, 0.0], [4.0, 3.0, 0.25, 5.0, 1.0, 7.0])
    for seed in range(5):
        value = adaptive_sharpness(model, lambda m, b: m.loss(), BATCH, rho=0.5, seed=seed)
        assert value == pytest.approx(0.5 * 0.5**2, rel=1e-12), seed


def test_pac_bayes_bound_is_the_minimum_of_the_formula_over_the_sigma_grid():
    sigmas = [0.003, 0.01, 0.03, 0.1, 0.3]
    result = pac_bayes_bound(trace=20.0, loss=0.2, distance_sq=0.5, num_examples=500, delta=0.1, sigmas=sigmas)
    confidence = math.log(2 * math.sqrt(500) * len(sigmas) / 0.1)

    def bound(s):
        return 0.2 + 0.5 * s**2 * 20.0 + math.sqrt((0.5 / (2 * s**2) + confidence) / 1000)

    best = min(sigmas, key=bound)
    assert best not in (sigmas[0], sigmas[-1])  # an interior minimum: neither end of the grid
    assert result.sigma == best and result.bound == pytest.approx(bound(best), rel=1e-12)


class _Log(nn.Module):
    """L(w) = −log w at w = 0.01: the ascent step ε = −ρ crosses zero, so L(w + ε) is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.01], dtype=torch.float64))


def test_sam_sharpness_is_nan_when_a_perturbed_loss_is_nan():
    """Python's max(−inf, nan) is −inf: a NaN L(w + ε) gave −inf (steps=1) or 0.0 (steps=3), not NaN."""
    model = _Log()
    for steps in (1, 3):
        assert math.isnan(sam_sharpness(model, lambda m, b: -torch.log(m.weight).sum(), BATCH, rho=0.05, steps=steps))
    assert math.isnan(adaptive_sharpness(model, lambda m, b: -torch.log(m.weight).sum(), BATCH, rho=10.0))
    assert torch.equal(model.weight.detach(), torch.tensor([0.01], dtype=torch.float64))


@pytest.mark.parametrize("eta", [float("nan"), float("inf"), -1.0])
def test_eta_must_be_finite_and_non_negative_in_every_sharpness_measure(eta):
    """eta=nan and eta=inf were accepted by sam_sharpness (and gave −inf); average_sharpness took eta < 0 too."""
    model = Quadratic(SPECTRUM)
    message = rf"eta must be >= 0 and finite, got {eta}"
    with pytest.raises(ValueError, match=message):
        sam_sharpness(model, _quadratic_loss, BATCH, adaptive=True, eta=eta)
    with pytest.raises(ValueError, match=message):
        adaptive_sharpness(model, _quadratic_loss, BATCH, eta=eta)
    with pytest.raises(ValueError, match=message):
        average_sharpness(model, _quadratic_loss, BATCH, adaptive=True, eta=eta)


def test_adaptive_average_sharpness_of_a_quadratic_is_half_sigma_squared_trace_of_tat():
    """δ ~ N(0, σ²T²) with T = |w| + η, so on L = ½(w − c)ᵀA(w − c) every antithetic pair gives ½δᵀAδ and the
    expectation is ½σ² Σ_i A_ii (|w_i| + η)² (σ|w| + η, the scale without its parentheses, gave ~115x that)."""
    model = Quadratic(SPECTRUM)
    with torch.no_grad():
        model.weight.add_(torch.linspace(0.3, -0.2, len(SPECTRUM), dtype=torch.float64))
    sigma, eta = 0.05, 0.5
    scale = model.weight.detach().abs() + eta
    expected = 0.5 * sigma**2 * float((model.matrix.diagonal() * scale.square()).sum())
    estimate = average_sharpness(model, _quadratic_loss, BATCH, sigma=sigma, num_samples=200, adaptive=True, eta=eta)
    assert abs(estimate.value - expected) <= 3 * estimate.stderr
    assert estimate.stderr < 0.1 * expected  # the band is narrow enough to tell the scale apart


def test_adaptive_sharpness_of_all_zero_weights_is_nan_when_the_loss_at_w_is_nan():
    """η = 0 and every weight 0: the only feasible ε is 0, and L(w + 0) − L(w) is NaN when L(w) is (not 0.0)."""
    model = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    x = torch.ones(3, 2, dtype=torch.float64)
    value = adaptive_sharpness(model, lambda m, b: m(b).sum() + math.nan, x)
    assert math.isnan(value)


def test_multistep_sam_sharpness_is_nan_when_only_the_last_iterates_loss_is_nan():
    """Loss calls: L(w) with ∇L, L(ε₁) with ∇L, then L(ε₂). A NaN at ε₂ alone must not be dropped by the max
    (Python's max(finite, nan) keeps the finite value)."""
    model = Quadratic(SPECTRUM)
    with torch.no_grad():
        model.weight.add_(0.1)
    calls = []

    def loss_fn(m, batch):
        calls.append(None)
        return m.loss() * (math.nan if len(calls) == 3 else 1.0)

    assert math.isnan(sam_sharpness(model, loss_fn, BATCH, rho=0.05, steps=2)) and len(calls) == 3


def test_average_sharpness_is_the_mean_and_ddof_1_stderr_of_antithetic_pairs_replayed_from_its_seed():
    """Off the minimum (∇L ≠ 0), each antithetic pair of a quadratic gives exactly ½δᵀAδ, δ = σ·randn from a
    generator seeded with ``seed``: value = their mean, stderr = their ddof-1 std over √n."""
    model = Quadratic(SPECTRUM)
    with torch.no_grad():
        model.weight.add_(torch.linspace(0.3, -0.2, len(SPECTRUM), dtype=torch.float64))
    sigma, num_samples, seed = 0.1, 5, 7
    estimate = average_sharpness(model, _quadratic_loss, BATCH, sigma=sigma, num_samples=num_samples, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    steps = sigma * torch.stack([torch.randn(len(SPECTRUM), dtype=torch.float64, generator=generator) for _ in range(num_samples)])
    gaps = 0.5 * ((steps @ model.matrix) * steps).sum(1)
    assert estimate.value == pytest.approx(float(gaps.mean()), rel=1e-9)
    assert estimate.stderr == pytest.approx(float(gaps.std(unbiased=True) / math.sqrt(num_samples)), rel=1e-6)
    assert estimate.num_matvecs == 2 * num_samples


@pytest.mark.parametrize("name", ["rho", "sigma"])
def test_an_infinite_radius_or_noise_scale_is_refused_by_name(name):
    model = Quadratic(SPECTRUM)
    with pytest.raises(ValueError, match=rf"{name} must be > 0 and finite, got inf"):
        if name == "rho":
            sam_sharpness(model, _quadratic_loss, BATCH, rho=math.inf)
        else:
            average_sharpness(model, _quadratic_loss, BATCH, sigma=math.inf)


@pytest.mark.parametrize("seed", [0, 5])
def test_sam_sharpness_at_a_zero_gradient_steps_along_the_random_direction_of_its_seed(seed):
    """∇L = 0 at the minimum: one step goes along d = randn(P) from a generator seeded with ``seed``, so the
    value is ½ρ² dᵀAd / dᵀd for that d."""
    model = Quadratic(SPECTRUM)
    rho = 0.1
    direction = torch.randn(len(SPECTRUM), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = 0.5 * rho**2 * float(direction @ model.matrix @ direction / direction.square().sum())
    assert sam_sharpness(model, _quadratic_loss, BATCH, rho=rho, seed=seed) == pytest.approx(expected, rel=1e-9)


def test_pac_bayes_default_grid_has_41_sigmas_up_to_one():
    """With trace 0 and loss 0 the bound only falls as σ grows: the default grid's best σ is its top, 1.0, and
    the union bound counts its 41 values: √((‖w − w₀‖²/2 + ln(2√n·41/δ)) / 2n)."""
    result = pac_bayes_bound(trace=0.0, loss=0.0, distance_sq=1.0, num_examples=100)
    assert result.sigma == pytest.approx(1.0, rel=1e-12)
    assert result.bound == pytest.approx(math.sqrt((0.5 + math.log(2 * 10 * 41 / 0.05)) / 200), rel=1e-12)
