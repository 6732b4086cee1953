"""Curvature operators and estimators on a float64 MLP (≤ 300 parameters) against independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from arrcoc_sam.curvature import (
    GGNOperator,
    HessianOperator,
    MatrixOperator,
    curvature_operator,
    exact_hessian,
    hessian_diagonal,
    hessian_trace,
    hessian_vector_product,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    probe_context,
    top_eigenvalues,
)
from arrcoc_sam.curvature.estimators import control_variate_diagonal, ggn_diagonal


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=generator)
    return [(x[:7], y[:7]), (x[7:], y[7:])]  # unequal batches: weighting by examples matters


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _flat_loss_reference_for(model, x, y):
    """Cross-entropy on (x, y) as a function of one flat parameter vector, and that vector (no weighting code)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(flat):
        chunks = flat.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _flat_loss_reference(model):
    """Full-data mean loss as a function of one flat parameter vector (one big batch)."""
    return _flat_loss_reference_for(model, torch.cat([b[0] for b in _data()]), torch.cat([b[1] for b in _data()]))


@pytest.fixture(scope="module")
def reference():
    model = _mlp()
    loss, flat = _flat_loss_reference(model)
    hessian = torch.autograd.functional.hessian(loss, flat, vectorize=True)
    return model, hessian


def test_exact_hessian_matches_autograd_functional_hessian_over_weighted_batches(reference):
    model, hessian = reference
    assert sum(p.numel() for p in model.parameters()) <= 300
    ours = exact_hessian(model, _loss, _data())
    torch.testing.assert_close(ours, hessian, atol=1e-12, rtol=0)


def test_exact_hessian_refuses_more_parameters_than_max_params(reference):
    model, _ = reference
    with pytest.raises(ValueError, match="max_params=10"):
        exact_hessian(model, _loss, _data(), max_params=10)


def test_hessian_vector_product_equals_hessian_times_vector(reference):
    model, hessian = reference
    vector = [torch.randn_like(p) for p in model.parameters()]
    product = hessian_vector_product(model, _loss, _data(), vector)
    flat = torch.cat([t.reshape(-1) for t in product])
    expected = hessian @ torch.cat([v.reshape(-1) for v in vector])
    torch.testing.assert_close(flat, expected, atol=1e-12, rtol=0)
    assert [t.shape for t in product] == [p.shape for p in model.parameters()]


def test_lanczos_top_eigenvalues_match_eigvalsh_to_1e10_relative(reference):
    model, hessian = reference
    expected = torch.linalg.eigvalsh(hessian).flip(0)[:3]
    result = lanczos(MatrixOperator(hessian), k=3, tol=1e-9)
    assert result.converged
    torch.testing.assert_close(result.values, expected, rtol=1e-10, atol=0)
    residual = hessian @ result.vectors[0] - result.values[0] * result.vectors[0]
    assert residual.norm() <= 1e-9 * abs(result.values[0])


def test_top_eigenvalue_through_model_hvps_matches_eigvalsh_for_both_methods(reference):
    model, hessian = reference
    expected = float(torch.linalg.eigvalsh(hessian)[-1])
    for method in ("lanczos", "power"):
        result = top_eigenvalues(model, _loss, _data(), k=1, method=method, tol=1e-6)
        assert result.converged
        assert abs(float(result.values[0]) - expected) <= 1e-9 * expected, method


def test_power_iteration_top_eigenvalues_match_eigvalsh_to_1e9_relative(reference):
    _, hessian = reference
    expected = torch.linalg.eigvalsh(hessian).flip(0)[:2]
    result = power_iteration(MatrixOperator(hessian), k=2, tol=1e-7, max_iter=5000)
    assert result.converged
    torch.testing.assert_close(result.values, expected, rtol=1e-9, atol=0)


def test_power_iteration_finds_largest_algebraic_eigenvalue_when_a_negative_one_dominates():
    matrix = torch.diag(torch.tensor([-5.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    rotation = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))).Q
    op = MatrixOperator(rotation @ matrix @ rotation.T)
    for solver in (power_iteration, lanczos):
        result = solver(op, k=1, tol=1e-10)
        assert abs(float(result.values[0]) - 2.0) < 1e-9, solver.__name__


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigenvalues_of_a_nan_loss_are_nan_after_one_product_instead_of_an_eigh_failure(method):
    """Lanczos died with 'linalg.eigh: failed to converge' and power iteration spent max_iter products on NaN;
    now both stop at the first product and give NaN (as sam_sharpness does), so a monitoring callback logs it."""
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="operator product 1 is not finite .*the eigenvalues are NaN"):
        result = top_eigenvalues(model, _loss, _data(), k=2, method=method)
    assert result.values.isnan().all() and result.values.shape == (2,) and result.vectors.isnan().all()
    assert result.num_matvecs == 1 and not result.converged


def test_lanczos_needs_fewer_products_than_power_iteration(reference):
    _, hessian = reference
    op = MatrixOperator(hessian)
    fast = lanczos(op, k=1, tol=1e-6)
    slow = power_iteration(op, k=1, tol=1e-6, max_iter=5000)
    assert fast.num_matvecs < slow.num_matvecs


def test_hutchinson_trace_and_diagonal_lie_within_three_standard_errors_over_seeds(reference):
    model, hessian = reference
    for seed in range(3):
        trace = hessian_trace(model, _loss, _data(), num_probes=10, seed=seed)
        assert abs(trace.value - float(hessian.trace())) <= 3 * trace.stderr
        diagonal = hessian_diagonal(model, _loss, _data(), num_probes=10, seed=seed)
        value = torch.cat([t.reshape(-1) for t in diagonal.value])
        stderr = torch.cat([t.reshape(-1) for t in diagonal.stderr])
        inside = (value - hessian.diagonal()).abs() <= 3 * stderr + 1e-12
        assert inside.double().mean() >= 0.95  # ~98.5 % expected per coordinate (t, 9 d.o.f.)


def test_hutchinson_standard_errors_are_calibrated_within_factor_1_2(reference):
    _, hessian = reference
    op = MatrixOperator(hessian)
    generator = torch.Generator().manual_seed(7)
    traces, trace_errors, diagonals, diagonal_errors = [], [], [], []
    for _ in range(400):
        trace = hutchinson_trace(op, 8, generator)
        diagonal = hutchinson_diagonal(op, 8, generator)
        traces.append(trace.value)
        trace_errors.append(trace.stderr)
        diagonals.append(diagonal.value)
        diagonal_errors.append(diagonal.stderr)
    reported = torch.tensor(trace_errors).square().mean().sqrt()
    ratio = float(torch.tensor(traces).std() / reported)
    assert 1 / 1.2 <= ratio <= 1.2, ratio
    empirical = torch.stack(diagonals).std(dim=0)
    reported = torch.stack(diagonal_errors).square().mean(dim=0).sqrt()
    ratios = empirical / reported
    assert bool(((ratios >= 1 / 1.2) & (ratios <= 1.2)).all()), ratios


def test_hutchpp_is_exact_when_the_rank_fits_its_sketch():
    generator = torch.Generator().manual_seed(5)
    factor = torch.randn(50, 3, dtype=torch.float64, generator=generator)
    op = MatrixOperator(factor @ factor.T)
    estimate = hutchpp_trace(op, num_probes=12, generator=generator)
    assert abs(estimate.value - float(factor.square().sum())) < 1e-10
    assert estimate.stderr < 1e-10


def test_ggn_operator_equals_jacobian_transpose_output_hessian_jacobian(reference):
    model, _ = reference
    loss, flat = _flat_loss_reference(model)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    x = torch.cat([b[0] for b in _data()])

    def outputs(vector):
        chunks = vector.split([s.numel() for s in shapes])
        return functional_call(model, {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}, (x,))

    jacobian = torch.autograd.functional.jacobian(outputs, flat).reshape(12 * 3, -1)
    probs = outputs(flat).detach().softmax(-1)
    blocks = [torch.diag(p) - torch.outer(p, p) for p in probs]
    expected = jacobian.T @ torch.block_diag(*blocks) @ jacobian / 12
    op = curvature_operator(model, None, _data(), curvature="ggn")
    with probe_context(model, op.params):
        dense = op.to_dense()
    torch.testing.assert_close(dense, expected, atol=1e-12, rtol=0)


def test_ggn_equals_hessian_for_a_linear_model_with_squared_error():
    torch.manual_seed(2)
    model = nn.Linear(5, 2).double()
    batch = (torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64))
    params = list(model.parameters())
    with probe_context(model, params):
        hessian = HessianOperator(model, params, batch, lambda m, b: F.mse_loss(m(b[0]), b[1])).to_dense()
        ggn = GGNOperator(model, params, batch, likelihood="mse").to_dense()
    torch.testing.assert_close(ggn, hessian, atol=1e-12, rtol=0)


def test_control_variate_diagonal_is_unbiased_with_smaller_error_than_hutchinson(reference):
    model, hessian = reference
    plain = hessian_diagonal(model, _loss, _data(), num_probes=10, method="hutchinson")
    controlled = hessian_diagonal(model, _loss, _data(), num_probes=10, method="hutchinson_cv")
    value = torch.cat([t.reshape(-1) for t in controlled.value])
    stderr = torch.cat([t.reshape(-1) for t in controlled.stderr])
    assert ((value - hessian.diagonal()).abs() <= 3 * stderr + 1e-12).double().mean() >= 0.95
    plain_stderr = torch.cat([t.reshape(-1) for t in plain.stderr])
    assert stderr.square().mean() < plain_stderr.square().mean()


def test_probes_reject_bad_arguments_by_name(reference):
    model, _ = reference
    with pytest.raises(ValueError, match="method must be one of"):
        top_eigenvalues(model, _loss, _data(), method="arnoldi")
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        hessian_trace(model, _loss, _data(), num_probes=1)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        hessian_diagonal(model, _loss, _data(), method="ggn", likelihood="poisson")
    with pytest.raises(ValueError, match="weighting must be one of"):
        exact_hessian(model, _loss, _data(), weighting="rows")


def _rotated(eigenvalues, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ for a random orthogonal Q (float64)."""
    size = len(eigenvalues)
    rotation = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))).Q
    return rotation @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ rotation.T


def test_power_iteration_never_returns_a_dominant_negative_eigenvalue_as_the_top_over_seeds():
    """(2, 1, 0.5, −4): the ±λ shift must not accept the −4 iterate it was switched on at (was wrong in 5/20)."""
    op = MatrixOperator(_rotated([2.0, 1.0, 0.5, -4.0]))
    for seed in range(20):
        result = power_iteration(op, k=1, tol=1e-6, generator=torch.Generator().manual_seed(seed))
        assert result.converged, seed
        assert abs(float(result.values[0]) - 2.0) < 1e-6, (seed, result.values)


def test_lanczos_returns_repeated_eigenvalues_with_their_multiplicity_like_eigvalsh():
    cases = [([5.0, 5.0, 1.0, 0.5], 2), ([2.0, 2.0, 2.0, 1.0, -4.0], 3)]
    for seed in range(8):  # random spectra with a repeated top value (multiplicity 2..5) and repeated runner-up
        generator = torch.Generator().manual_seed(seed)
        size = int(torch.randint(12, 40, (1,), generator=generator))
        spectrum = torch.randn(size, generator=generator, dtype=torch.float64)
        spectrum[: 2 + seed % 4] = 3.0
        spectrum[6:8] = 2.5
        cases.append((spectrum.tolist(), 1 + seed % 5))
    for seed, (spectrum, k) in enumerate(cases):
        matrix = _rotated(spectrum, seed)
        expected = torch.linalg.eigvalsh(matrix).flip(0)[:k]
        result = lanczos(MatrixOperator(matrix), k=k, tol=1e-8, generator=torch.Generator().manual_seed(seed))
        assert result.converged, seed
        torch.testing.assert_close(result.values, expected, rtol=1e-8, atol=1e-10)
        residuals = matrix @ result.vectors.T - result.vectors.T * result.values
        assert float(residuals.norm(dim=0).max()) <= 1e-6
        torch.testing.assert_close(result.vectors @ result.vectors.T, torch.eye(k, dtype=torch.float64), atol=1e-8, rtol=0)


def test_top_eigenvalues_of_a_linear_layer_under_mse_repeat_each_gram_eigenvalue_output_dim_times():
    """H of mean-squared error w.r.t. Linear(6, 3) = 2/(N·3) · (X̃ᵀX̃ ⊗ I₃), X̃ = [x, 1]: every eigenvalue thrice."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    design = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    gram = torch.linalg.eigvalsh(2 * design.T @ design / (40 * 3))
    expected = gram.repeat_interleave(3).flip(0)[:4]
    result = top_eigenvalues(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), k=4, tol=1e-8)
    assert result.converged
    torch.testing.assert_close(result.values, expected, rtol=1e-8, atol=0)


def test_lanczos_rejects_max_iter_below_k_by_name():
    with pytest.raises(ValueError, match=r"max_iter=3 is below k=5"):
        lanczos(MatrixOperator(torch.diag(torch.arange(10, dtype=torch.float64))), k=5, max_iter=3)


def test_both_methods_converge_on_the_zero_eigenvalues_of_a_low_rank_operator():
    factor = torch.randn(30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    matrix = factor @ factor.T
    expected = torch.linalg.eigvalsh(matrix).flip(0)[:4]
    for solver in (lanczos, power_iteration):
        result = solver(MatrixOperator(matrix), k=4, tol=1e-6)
        assert result.converged, solver.__name__
        torch.testing.assert_close(result.values, expected, rtol=1e-9, atol=1e-9 * float(expected[0]))


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.unused, self.last = nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))


def test_exact_hessian_with_a_parameter_the_loss_never_uses_matches_autograd_with_zero_blocks():
    torch.manual_seed(0)
    model = _WithUnused().double()
    batch = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
    flat_loss, flat = _flat_loss_reference_for(model, *batch)
    expected = torch.autograd.functional.hessian(flat_loss, flat)
    ours = exact_hessian(model, _loss, batch)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    assert float(ours[16:22].abs().max()) == 0.0 and float(ours[:, 16:22].abs().max()) == 0.0  # model.unused


def test_bf16_model_top_eigenvalues_match_the_fp64_reference_and_hutchpp_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    x, y = torch.randn(16, 4, dtype=torch.bfloat16), torch.randint(0, 3, (16,))
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    reference.load_state_dict({name: value.double() for name, value in model.state_dict().items()})
    loss, flat = _flat_loss_reference_for(reference, x.double(), y)
    expected = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat)).flip(0)[:2]
    result = top_eigenvalues(model, lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]), (x, y), k=2, tol=1e-2)
    assert result.converged
    torch.testing.assert_close(result.values, expected, rtol=5e-3, atol=0)
    trace = hessian_trace(model, lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]), (x, y), num_probes=6, method="hutch++")
    assert math.isfinite(trace.value) and all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_probes_run_under_torch_no_grad(reference):
    model, hessian = reference
    with torch.no_grad():
        result = top_eigenvalues(model, _loss, _data(), tol=1e-8)
    assert abs(float(result.values[0]) - float(torch.linalg.eigvalsh(hessian)[-1])) <= 1e-9 * float(result.values[0])


def test_ggn_and_control_variate_diagonals_accept_list_batches_from_a_dataloader(reference):
    model, _ = reference
    x = torch.cat([b[0] for b in _data()])
    y = torch.cat([b[1] for b in _data()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    for method in ("ggn", "hutchinson_cv"):
        from_lists = hessian_diagonal(model, _loss, loader, num_probes=2, method=method)
        from_tuples = hessian_diagonal(model, _loss, _data(), num_probes=2, method=method)
        for a, b in zip(from_lists.value, from_tuples.value, strict=True):
            torch.testing.assert_close(a, b, atol=1e-14, rtol=0)


def test_eigen_solvers_reject_nan_tol_and_max_iter_below_one_by_name(reference):
    """tol=nan was accepted; power iteration turned max_iter=0 into 1000 and max_iter=-3 into UnboundLocalError."""
    model, _ = reference
    for method in ("lanczos", "power"):
        with pytest.raises(ValueError, match="tol must be a finite number > 0, got nan"):
            top_eigenvalues(model, _loss, _data(), method=method, tol=float("nan"), max_iter=5)
        for max_iter in (0, -3):
            with pytest.raises(ValueError, match=f"max_iter must be >= 1 .*got {max_iter}"):
                top_eigenvalues(model, _loss, _data(), method=method, max_iter=max_iter)


def test_hessian_vector_product_rejects_vectors_shaped_unlike_params(reference):
    model, hessian = reference
    vector = [torch.ones_like(p) for p in model.parameters()]
    vector[0] = torch.ones(model[0].weight.shape[::-1], dtype=torch.float64)  # same numel, transposed shape
    with pytest.raises(ValueError, match=r"vector\[0\] has shape \(4, 8\), but params\[0\] has shape \(8, 4\)"):
        hessian_vector_product(model, _loss, _data(), vector)


def test_hutchpp_names_its_own_minimum_number_of_probes(reference):
    model, _ = reference
    with pytest.raises(ValueError, match=r"num_probes must be >= 4 \(Hutch\+\+ .*got 3"):
        hessian_trace(model, _loss, _data(), num_probes=3, method="hutch++")


def test_probes_refuse_inference_mode_with_a_clear_error_and_leave_the_model_as_found(reference):
    model, _ = reference
    before = [p.detach().clone() for p in model.parameters()]
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"need autograd.*inference_mode"):
        top_eigenvalues(model, _loss, _data())
    assert all(torch.equal(a, b) and b.requires_grad for a, b in zip(before, model.parameters(), strict=True))


def _rotated_spectrum(values):
    q = torch.linalg.qr(torch.randn(len(values), len(values), dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(3))).Q
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def test_power_iteration_converges_when_the_extreme_eigenvalues_are_plus_minus_equal():  # kills C5
    result = power_iteration(MatrixOperator(_rotated_spectrum([2.0, -2.0, 1.0, 0.5])), k=1, tol=1e-8, max_iter=500)
    assert result.converged
    assert abs(float(result.values[0]) - 2.0) < 1e-7


class _CountingMatrix(MatrixOperator):
    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls = 0

    def matvec(self, vector):
        self.calls += 1
        return super().matvec(vector)


def test_hutchpp_spends_and_reports_exactly_num_probes_products():  # kills C3
    a = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = _CountingMatrix(a + a.T)
    estimate = hutchpp_trace(op, num_probes=14)
    assert op.calls == estimate.num_matvecs == 14


def test_ggn_diagonal_over_weighted_batches_is_within_five_stderr_of_the_dense_diagonal():  # kills C9
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(2)]
    op = GGNOperator(model, list(model.parameters()), batches, lambda m, b: (m(b[0]), b[1]), likelihood="mse")
    exact = torch.diagonal(op.to_dense())
    estimate = ggn_diagonal(op, num_probes=400, generator=torch.Generator().manual_seed(0))
    assert ((estimate.value - exact).abs() <= 5 * estimate.stderr + 1e-12).all()


class _ExactFactorGGN(MatrixOperator):
    """G given as a matrix, with sample_factor = R z for R Rᵀ = G."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.root = torch.linalg.cholesky(matrix)

    def sample_factor(self, generator):
        z = torch.randint(0, 2, (self.numel,), generator=generator).to(self.dtype).mul_(2).sub_(1)
        return self.root @ z


def test_control_variate_stderr_combines_the_two_parts_in_quadrature():  # kills C2
    a = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hessian = a @ a.T + 6 * torch.eye(6, dtype=torch.float64)
    ggn = _ExactFactorGGN(hessian / 2)
    both = control_variate_diagonal(MatrixOperator(hessian), ggn, 10, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)  # replay the same draws: 10 GGN factors, then 10 probes of H − G
    base = ggn_diagonal(ggn, 10, generator)
    probes = [torch.randint(0, 2, (6,), generator=generator).to(torch.float64).mul_(2).sub_(1) for _ in range(10)]
    samples = torch.stack([z * ((hessian - hessian / 2) @ z) for z in probes])
    correction_stderr = samples.std(dim=0, unbiased=True) / math.sqrt(10)
    torch.testing.assert_close(both.value, base.value + samples.mean(dim=0))
    torch.testing.assert_close(both.stderr, torch.hypot(base.stderr, correction_stderr))


def test_hutchinson_trace_stderr_is_the_sample_std_with_ddof_1_over_root_n_of_the_same_probes():
    a = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    matrix = a + a.T
    estimate = hutchinson_trace(MatrixOperator(matrix), 5, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # replay the probes
    probes = [torch.randint(0, 2, (7,), generator=generator).to(torch.float64).mul_(2).sub_(1) for _ in range(5)]
    samples = torch.stack([z @ matrix @ z for z in probes])
    assert estimate.value == pytest.approx(float(samples.mean()), rel=1e-12)
    assert estimate.stderr == pytest.approx(float(samples.std(unbiased=True)) / math.sqrt(5), rel=1e-12)


def test_power_iteration_on_the_shifted_operator_meets_the_tolerance_relative_to_the_unshifted_eigenvalue():
    """A dominant −4 makes it iterate on A + ρ̂I (θ ≈ 6): the test must be ‖Av − λv‖ ≤ tol·|λ| with λ = θ − ρ̂ = 2."""
    matrix = _rotated([2.0, 1.0, 0.5, -4.0])
    tol = 1e-6
    for seed in range(5):
        result = power_iteration(MatrixOperator(matrix), k=1, tol=tol, generator=torch.Generator().manual_seed(seed))
        vector, value = result.vectors[0], float(result.values[0])
        assert result.converged and abs(value - 2.0) < 1e-9
        assert float((matrix @ vector - value * vector).norm()) <= tol * abs(value) * (1 + 1e-6), seed


def test_power_iteration_switches_to_the_shift_when_the_rayleigh_quotient_lags_the_growth_by_over_one_percent():
    """(2, −1.9, 1, 0.5): after 20 steps θ/‖Av‖ ≈ 0.6-0.9; unshifted iteration would need ~360 products."""
    matrix = _rotated_spectrum([2.0, -1.9, 1.0, 0.5])
    for seed in range(5):
        result = power_iteration(MatrixOperator(matrix), k=1, tol=1e-8, max_iter=150,
                                 generator=torch.Generator().manual_seed(seed))
        assert result.converged and abs(float(result.values[0]) - 2.0) < 1e-8, seed


def test_lanczos_pairs_far_below_the_top_meet_their_own_relative_tolerance():
    """Spectrum (100, 39 values in [0, 0.01]): the absolute residual floor is 1e-3·tol·ρ̂, so the small pairs
    still reach ‖Av − θv‖ ≤ tol·|θ| and ~1e-10 relative accuracy (a floor of tol·ρ̂ accepted 1e-3 errors)."""
    tol = 1e-6
    for seed in range(3):
        generator = torch.Generator().manual_seed(100 + seed)
        spectrum = [100.0] + (torch.rand(39, generator=generator, dtype=torch.float64) * 1e-2).tolist()
        matrix = _rotated(spectrum, seed)
        result = lanczos(MatrixOperator(matrix), k=4, tol=tol, generator=torch.Generator().manual_seed(seed))
        assert result.converged
        residuals = (matrix @ result.vectors.T - result.vectors.T * result.values).norm(dim=0)
        bound = torch.clamp(tol * result.values.abs(), min=1e-3 * tol * 100.0)
        assert bool((residuals <= 1.5 * bound).all()), (seed, residuals / bound)
        torch.testing.assert_close(result.values, torch.linalg.eigvalsh(matrix).flip(0)[:4], rtol=1e-8, atol=0)


def test_lanczos_locks_every_pair_of_a_krylov_breakdown_so_verification_costs_one_product():
    """(5, 4, 3, 2, 0×16): the Krylov space is invariant after 5 products (5 distinct values); all 5 exact pairs
    are locked, so the verification run starts in the null space and stops after 1 product: 6 in all."""
    for seed in range(3):
        matrix = _rotated([5.0, 4.0, 3.0, 2.0] + [0.0] * 16, seed)
        result = lanczos(MatrixOperator(matrix), k=3, tol=1e-8, generator=torch.Generator().manual_seed(seed))
        assert result.converged and result.num_matvecs == 6, (seed, result.num_matvecs)
        torch.testing.assert_close(result.values, torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sampling", ["rademacher", "labels"])
def test_bce_ggn_diagonal_is_within_five_stderr_of_the_jacobian_reference(sampling):
    """Λ = diag(σ(1 − σ))/N for the sigmoid cross-entropy averaged over N logits; G = Jᵀ Λ J by autograd."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (6, 2), generator=torch.Generator().manual_seed(2)).double()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def logits(vector):
        chunks = vector.split([s.numel() for s in shapes])
        return functional_call(model, {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}, (x,)).reshape(-1)

    jacobian = torch.autograd.functional.jacobian(logits, flat)
    prob = logits(flat).detach().sigmoid()
    exact = (jacobian.square() * (prob * (1 - prob))[:, None]).sum(0) / prob.numel()
    op = GGNOperator(model, list(model.parameters()), (x, y), likelihood="bce", sampling=sampling)
    with probe_context(model, op.params):
        estimate = ggn_diagonal(op, num_probes=400, generator=torch.Generator().manual_seed(0))
    assert bool(((estimate.value - exact).abs() <= 5 * estimate.stderr + 1e-12).all()), (estimate.value, exact)
    assert bool((estimate.value > 0.5 * exact).all() and (estimate.value < 2 * exact).all())


def _plus_minus_three_with_bulk(seed: int) -> torch.Tensor:
    """Q diag(3, −3, 48 values in [−1, 1]) Qᵀ, Q seeded: the ± pair has equal magnitude, so unshifted power
    iteration never separates them."""
    spectrum = torch.cat([torch.tensor([3.0, -3.0]), torch.linspace(-1, 1, 48)]).double()
    rotation = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q
    return rotation @ torch.diag(spectrum) @ rotation.T


def test_power_iteration_detects_plus_minus_mixing_at_any_step_not_only_at_step_20():
    """Starts mostly along u₊ (|c₋/c₊| < 0.07) passed the one-off step-20 test (θ/‖Av‖ ≈ 0.998) and stalled for
    1000 products: (Q seed, start seed) = (11, 1011), (54, 1054), ... gave up to 0.7% error, converged=False."""
    tol = 1e-6
    for seed in range(100):
        result = power_iteration(MatrixOperator(_plus_minus_three_with_bulk(seed)), k=1, tol=tol, max_iter=200,
                                 generator=torch.Generator().manual_seed(1000 + seed))
        assert result.converged and result.num_matvecs <= 200, (seed, result.num_matvecs)
        assert abs(float(result.values[0]) - 3.0) <= tol * 3.0, (seed, result.values)


def test_power_iteration_finds_all_three_eigenpairs_of_the_shifted_3x3_example_within_max_iter():
    """diag(1, 2, 3) − 1.5 (every entry): eigenvalues ±√7 and 1.5. Start seeds 0 and 2 stalled at 2.6399 / 2.6408
    (converged=False after 1000 products), and the deflated third value was wrong with them."""
    matrix = torch.diag(torch.arange(1.0, 4.0, dtype=torch.float64)) - 1.5
    expected = torch.linalg.eigvalsh(matrix).flip(0)
    tol = 1e-8
    for k in (1, 2, 3):
        for seed in range(4):
            result = power_iteration(MatrixOperator(matrix), k=k, tol=tol, max_iter=100,
                                     generator=torch.Generator().manual_seed(seed))
            assert result.converged and result.num_matvecs <= 100 * k, (k, seed, result.num_matvecs)
            assert ((result.values - expected[:k]).abs() <= tol * expected[:k].abs()).all(), (k, seed, result.values)


def test_power_iteration_max_iter_caps_every_product_of_an_eigenpair_restarts_included():
    """A run that converges to the dominant −4 restarts on A + 4I; that restart used to get max_iter more steps."""
    op = _CountingMatrix(_rotated([2.0, 1.0, 0.5, -4.0]))
    for seed in range(10):
        op.calls = 0
        result = power_iteration(op, k=1, tol=1e-2, max_iter=12, generator=torch.Generator().manual_seed(seed))
        assert op.calls == result.num_matvecs <= 12, (seed, op.calls)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues_takes_max_matvecs_caps_the_products_and_validates_it_by_name(reference, method):
    """The README promised max_matvecs; top_eigenvalues raised TypeError (only eigen.lanczos took it)."""
    model, _ = reference
    capped = top_eigenvalues(model, _loss, _data(), k=2, method=method, tol=1e-12, max_matvecs=5)
    assert capped.num_matvecs <= 5 and not capped.converged and capped.values.shape == (2,)
    with pytest.raises(ValueError, match="max_matvecs=1 is below k=2"):
        top_eigenvalues(model, _loss, _data(), k=2, method=method, max_matvecs=1)
    with pytest.raises(ValueError, match=r"max_matvecs must be an integer, got 10.5 \(float\)"):
        top_eigenvalues(model, _loss, _data(), method=method, max_matvecs=10.5)


@pytest.mark.parametrize("num_probes", [4, 5, 6, 7])
def test_hutchpp_keeps_at_least_two_residual_probes_down_to_its_documented_minimum_of_four(num_probes):
    """'At least 4: sketch, its trace, two residual probes': a sketch one row larger left 0 or 1 residual probes
    at 4 and 5 (no standard error). A rank-1 operator fits any sketch: exact value, stderr ~0 from >= 2 probes."""
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(20, 1, dtype=torch.float64, generator=generator)
    op = _CountingMatrix(factor @ factor.T)
    estimate = hutchpp_trace(op, num_probes=num_probes, generator=generator)
    assert op.calls == estimate.num_matvecs == num_probes
    assert abs(estimate.value - float(factor.square().sum())) < 1e-10
    assert math.isfinite(estimate.stderr) and estimate.stderr < 1e-10


def test_hutchinson_trace_and_control_variate_report_exactly_the_products_they_spend():
    """hutchinson_trace: num_probes products; control_variate_diagonal: num_probes GGN factors plus num_probes
    products of H and of G (3·num_probes), as documented."""
    a = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = _CountingMatrix(a + a.T)
    estimate = hutchinson_trace(op, num_probes=9)
    assert op.calls == estimate.num_matvecs == 9

    class CountingGGN(_ExactFactorGGN):
        calls = 0

        def matvec(self, vector):
            self.calls += 1
            return super().matvec(vector)

        def sample_factor(self, generator):
            self.calls += 1
            return super().sample_factor(generator)

    hessian = _CountingMatrix(a @ a.T + 6 * torch.eye(6, dtype=torch.float64))
    ggn = CountingGGN(a @ a.T + torch.eye(6, dtype=torch.float64))
    both = control_variate_diagonal(hessian, ggn, 7, torch.Generator().manual_seed(1))
    assert hessian.calls + ggn.calls == both.num_matvecs == 21


def test_hutchpp_is_the_documented_deflated_estimator_replayed_from_the_same_rademacher_draws():
    """value = tr(QᵀAQ) + mean_j zⱼᵀ(I − QQᵀ)A(I − QQᵀ)zⱼ with Q = orth(A S); stderr = the ddof-1 std of those
    residual samples over √n. A one-sided deflation zᵀA(I − QQᵀ)z has the same mean but other samples."""
    a = torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    matrix = a + a.T
    estimate = hutchpp_trace(MatrixOperator(matrix), num_probes=11, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    sketch = torch.randint(0, 2, (3, 12), generator=generator).to(torch.float64).mul_(2).sub_(1)  # (11 − 2) // 3 = 3
    q = torch.linalg.qr(matrix @ sketch.T).Q
    residual = torch.randint(0, 2, (5, 12), generator=generator).to(torch.float64).mul_(2).sub_(1)  # 11 − 2·3
    deflated = residual - residual @ q @ q.T
    samples = ((deflated @ matrix) * deflated).sum(1)
    assert estimate.value == pytest.approx(float(torch.trace(q.T @ matrix @ q) + samples.mean()), rel=1e-12)
    assert estimate.stderr == pytest.approx(float(samples.std(unbiased=True) / math.sqrt(5)), rel=1e-12)


def test_lanczos_stops_after_one_product_when_the_first_ritz_pair_already_meets_the_tolerance():
    """Spectrum 1 ± 1e-9: the first Rayleigh quotient has residual ~1e-9 ≤ tol·|θ| = 1e-6 (not a breakdown: β
    is far above rounding), so one product settles k = 1."""
    spread = torch.linspace(-1e-9, 1e-9, 10, dtype=torch.float64)
    result = lanczos(MatrixOperator(_rotated_spectrum((1 + spread).tolist())), k=1, tol=1e-6)
    assert result.converged and result.num_matvecs == 1
    assert abs(float(result.values[0]) - 1.0) < 2e-9


def test_power_iteration_spends_exactly_max_matvecs_and_reports_the_returned_vectors_own_residual():
    """No pair can converge at tol=1e-12 in 9 products: k = 2 spends all 9 (the first pair 9 − 1, the last the one
    left); for k = 1 the residual is ‖A v − λ v‖ of the vector returned (λ its Rayleigh quotient), not of a
    later iterate."""
    matrix = _rotated_spectrum([3.0, 2.9, 2.8, 1.0, 0.5])
    op = _CountingMatrix(matrix)
    result = power_iteration(op, k=2, tol=1e-12, max_matvecs=9)
    assert op.calls == result.num_matvecs == 9 and not result.converged
    result = power_iteration(MatrixOperator(matrix), k=1, tol=1e-12, max_matvecs=9)
    vector, value = result.vectors[0], float(result.values[0])
    assert result.num_matvecs == 9 and not result.converged
    assert float(vector @ matrix @ vector) == pytest.approx(value, rel=1e-12)
    assert float((matrix @ vector - value * vector).norm()) == pytest.approx(float(result.residuals[0]), rel=1e-9)


def test_power_iteration_on_a_positive_definite_spectrum_keeps_the_unshifted_convergence_rate():
    """λ₂/λ₁ = 0.1 and no negative eigenvalue: the residual falls ~10x per product, so tol=1e-8 takes about
    nine products. A shift to A + ρ̂I (only for ±λ mixing) would slow the ratio to 11/20 (> 30 products)."""
    result = power_iteration(MatrixOperator(_rotated_spectrum([10.0, 1.0, 0.5, 0.2, 0.1])), k=1, tol=1e-8)
    assert result.converged and result.num_matvecs <= 15
    assert abs(float(result.values[0]) - 10.0) < 1e-9


def test_lanczos_default_product_cap_is_four_times_max_iter():
    """A four-fold top eigenvalue, k = 3, max_iter = 3: run 1 sees one copy of 5, and each further copy costs a
    run of its own, 10 products in all; the documented default cap 4·max_iter = 12 lets it settle."""
    result = lanczos(MatrixOperator(_rotated_spectrum([5.0] * 4 + [2.0] * 2 + [0.0] * 6)), k=3, tol=1e-8, max_iter=3)
    assert result.converged and 9 < result.num_matvecs <= 12
    torch.testing.assert_close(result.values, torch.full((3,), 5.0, dtype=torch.float64), rtol=1e-10, atol=0)


def test_lanczos_verification_stops_early_only_when_its_whole_ritz_interval_lies_below_the_kth_value():
    """A two-fold top 2.93 above 2.72 (k = 2): run 1 locks 2.93 and 2.72; the verification run's Ritz value μ
    climbs towards the second 2.93 with a wide residual r. Stopping once μ − r < 2.72 (instead of μ + r)
    would settle on [2.93, 2.72]; eigvalsh says [2.93, 2.93]."""
    spectrum = [2.93, 2.93, -1.95, -0.85, 0.7, 2.72, -1.31, 1.41, 1.13, -1.98, -2.13, -0.12, 2.42]
    matrix = _rotated_spectrum(spectrum)
    result = lanczos(MatrixOperator(matrix), k=2, tol=1e-6)
    assert result.converged
    torch.testing.assert_close(result.values, torch.linalg.eigvalsh(matrix).flip(0)[:2], rtol=1e-9, atol=0)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues_draws_its_start_vectors_from_the_generator_of_its_seed(reference, method):
    model, _ = reference
    result = top_eigenvalues(model, _loss, _data(), k=2, method=method, tol=1e-3, seed=5)
    op = curvature_operator(model, _loss, _data())
    solver = lanczos if method == "lanczos" else power_iteration
    with probe_context(model, op.params):
        direct = solver(op, 2, 1e-3, None, torch.Generator().manual_seed(5))
        other = solver(op, 2, 1e-3, None, torch.Generator().manual_seed(0))
    assert torch.equal(result.vectors, direct.vectors) and result.num_matvecs == direct.num_matvecs
    assert not torch.equal(other.vectors, direct.vectors)


def test_lanczos_settles_when_the_verification_value_equals_the_kth_within_the_tolerance():
    """A four-fold 5 and k = 2: the top two are locked after two runs; the next verification run's μ is another
    5, equal to θ_k within the tolerance, which settles the top k (no further copy locked, no further run):
    7 products in all, so a cap of 7 still converges."""
    matrix = _rotated_spectrum([5.0] * 4 + [2.0, 1.0, 0.5, 0.0])
    result = lanczos(MatrixOperator(matrix), k=2, tol=1e-8, max_matvecs=7)
    assert result.converged and result.num_matvecs == 7
    torch.testing.assert_close(result.values, torch.full((2,), 5.0, dtype=torch.float64), rtol=1e-10, atol=0)


def test_hutchpp_caps_its_sketch_at_the_operator_size_and_is_then_exact():
    """P = 3 and 14 probes: the sketch is min(4, P) = 3 rows, Q spans everything (value = tr A), and the products
    spent are still exactly 14 (3 + 3 + 8 residual probes)."""
    a = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = _CountingMatrix(a + a.T)
    estimate = hutchpp_trace(op, num_probes=14)
    assert op.calls == estimate.num_matvecs == 14
    assert estimate.value == pytest.approx(float(torch.trace(a + a.T)), abs=1e-12)


def test_control_variate_refuses_a_hessian_and_ggn_of_different_sizes_by_name():
    with pytest.raises(ValueError, match="hessian and ggn act on different sizes: 6 vs 5"):
        control_variate_diagonal(MatrixOperator(torch.eye(6, dtype=torch.float64)),
                                 _ExactFactorGGN(torch.eye(5, dtype=torch.float64)), 4)


def test_power_iteration_is_converged_only_when_every_pair_met_its_residual_test():
    """λ₂/λ₁ = 0.999 keeps the first pair unconverged within 15 products; the deflated second pair (ratio ~0.01)
    converges at once. The result is not converged."""
    result = power_iteration(MatrixOperator(_rotated_spectrum([1.0, 0.999, 0.01, 0.005])), k=2, tol=1e-10, max_iter=15)
    assert not result.converged
    assert sorted(result.residuals.tolist())[0] <= 1e-10 < sorted(result.residuals.tolist())[1]


def test_lanczos_ends_when_a_run_fills_max_iter_with_its_pairs_unconverged():
    """A run that fills its max_iter basis unconverged ends the solve with converged=False: the rest of a large
    max_matvecs is not spent on fresh runs that forget that Krylov space."""
    spectrum = torch.linspace(1.0, 0.9, 30, dtype=torch.float64).tolist()
    result = lanczos(MatrixOperator(_rotated_spectrum(spectrum)), k=1, tol=1e-12, max_iter=3, max_matvecs=100)
    assert not result.converged and result.num_matvecs == 3
