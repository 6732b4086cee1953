"""Curvature w.r.t. inputs / token features [B, N, C]: the API the precision-aware token allocator calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from arrcoc_sam.curvature import GGNOperator, hessian_diagonal, probe_context


class Elementwise(nn.Module):
    """outputs = a ⊙ features: every feature drives exactly one output, so the GGN diagonal is known."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, channels, dtype=torch.float64))

    def forward(self, features):
        return features * self.scale


def _regression_outputs(model, batch):
    return model(batch["features"]), batch["targets"]


def test_ggn_diagonal_wrt_features_equals_the_exact_diagonal_of_a_model_with_known_curvature():
    features = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=False)
    batch = {"features": features, "targets": torch.zeros(2, 5, 3, dtype=torch.float64)}
    model = Elementwise(3)
    estimate = hessian_diagonal(
        model, None, batch, num_probes=4, method="ggn", params=[features], output_fn=_regression_outputs, likelihood="mse"
    )
    exact = (2.0 / features.numel()) * model.scale.detach().square().expand(2, 5, 3)
    assert estimate.value[0].shape == (2, 5, 3)
    torch.testing.assert_close(estimate.value[0], exact, atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(estimate.stderr[0], torch.zeros_like(exact), atol=1e-15, rtol=0)
    assert not features.requires_grad and features.grad is None


class TokenLinear(nn.Module):
    """logits [B, N, K] = features [B, N, C] @ W: the GGN w.r.t. token (b, n) is W Λ_bn Wᵀ in closed form."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, classes, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))

    def forward(self, inputs_embeds):
        return {"logits": inputs_embeds @ self.weight}


def _token_batch():
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(2, 4, 3, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (2, 4), generator=generator)
    labels[1, 3] = -100
    return {"inputs_embeds": features, "labels": labels}


def _token_loss(model, batch):
    logits = model(batch["inputs_embeds"])["logits"]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def _closed_form_diagonal(model, batch):
    logits = model(batch["inputs_embeds"])["logits"].detach()
    probs = logits.softmax(-1)
    valid = batch["labels"] != -100
    count = int(valid.sum())
    weight = model.weight.detach()
    diagonal = torch.zeros_like(batch["inputs_embeds"])
    for b, n in valid.nonzero().tolist():
        p = probs[b, n]
        diagonal[b, n] = torch.diagonal(weight @ (torch.diag(p) - torch.outer(p, p)) @ weight.T) / count
    return diagonal


def test_ggn_operator_wrt_token_features_has_the_closed_form_diagonal_and_ignores_masked_tokens():
    model, batch = TokenLinear(3, 5), _token_batch()
    features = batch["inputs_embeds"]
    with probe_context(model, [features]):
        dense = GGNOperator(model, [features], batch).to_dense()
    torch.testing.assert_close(dense.diagonal().view(2, 4, 3), _closed_form_diagonal(model, batch), atol=1e-14, rtol=0)


@pytest.mark.parametrize("sampling", ["rademacher", "labels"])
def test_sampled_ggn_diagonal_wrt_token_features_is_non_negative_and_within_three_stderr(sampling):
    model, batch = TokenLinear(3, 5), _token_batch()
    features = batch["inputs_embeds"]
    exact = _closed_form_diagonal(model, batch)
    estimate = hessian_diagonal(model, None, batch, num_probes=200, method="ggn", params=[features], sampling=sampling)
    value, stderr = estimate.value[0], estimate.stderr[0]
    assert bool((value >= 0).all())
    assert bool((value[1, 3] == 0).all())
    assert ((value - exact).abs() <= 3 * stderr + 1e-15).double().mean() >= 0.95
    precision = value.sum(-1)  # per-token precision [B, N]
    assert precision.shape == (2, 4)


def test_control_variate_diagonal_wrt_features_of_linear_logits_needs_no_correction():
    """Logits linear in the features make H = G, so the Hutchinson correction on H − G vanishes exactly."""
    model, batch = TokenLinear(3, 5), _token_batch()
    features = batch["inputs_embeds"]
    ggn = hessian_diagonal(model, None, batch, num_probes=10, method="ggn", params=[features], seed=3)
    controlled = hessian_diagonal(model, _token_loss, batch, num_probes=10, method="hutchinson_cv", params=[features], seed=3)
    torch.testing.assert_close(controlled.value[0], ggn.value[0], atol=1e-15, rtol=0)
