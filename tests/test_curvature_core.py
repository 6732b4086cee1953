"""Curvature operators and estimators on a float64 MLP (≤ 300 parameters) against independent references."""

from __future__ import annotations

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


def _flat_loss_reference(model):
    """Full-data mean loss as a function of one flat parameter vector (one big batch, no weighting code)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    x = torch.cat([b[0] for b in _data()])
    y = torch.cat([b[1] for b in _data()])

    def loss(flat):
        chunks = flat.split([s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return loss, flat


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
