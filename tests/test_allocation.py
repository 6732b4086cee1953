"""Token allocation: budget invariants (hypothesis), the favour direction, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from arrcoc_sam.relevance.allocation import (
    PrecisionAwareAllocation,
    PrecisionAwareAllocator,
    RelevanceAllocator,
    largest_remainder_round,
    token_precision,
    water_fill,
)
from arrcoc_sam.relevance.rank_metrics import top_k_indices


@st.composite
def allocation_cases(draw):
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 40))
    k = draw(st.integers(1, tokens))
    min_tokens = draw(st.integers(0, 50))
    max_tokens = draw(st.integers(min_tokens, 120))
    budget = draw(st.integers(k * min_tokens, k * max_tokens + 100))
    unit = st.floats(0.0, 1.0, allow_nan=False, width=32)
    positive = st.one_of(st.just(0.0), st.floats(2.0**-20, 2.0**20, allow_nan=False, width=32))
    relevance = torch.tensor(draw(st.lists(unit, min_size=batch * tokens, max_size=batch * tokens))).view(batch, tokens)
    precision = torch.tensor(draw(st.lists(positive, min_size=batch * tokens, max_size=batch * tokens))).view(batch, tokens)
    return relevance, precision, k, min_tokens, max_tokens, budget


def _check_invariants(indices, budgets, relevance, k, min_tokens, max_tokens, budget):
    batch, tokens = relevance.shape
    assert indices.shape == budgets.shape == (batch, k)
    assert indices.dtype == budgets.dtype == torch.int64
    assert ((indices >= 0) & (indices < tokens)).all()
    assert all(len(set(row.tolist())) == k for row in indices)
    assert ((budgets >= min_tokens) & (budgets <= max_tokens)).all()
    assert (budgets.sum(dim=1) <= budget).all()


@settings(max_examples=60, deadline=None)
@given(allocation_cases(), st.sampled_from(["precise", "uncertain"]), st.floats(0.0, 3.0), st.floats(0.0, 3.0))
def test_precision_aware_budgets_are_integers_in_range_and_fill_the_budget(case, favor, alpha, beta):
    relevance, precision, k, min_tokens, max_tokens, budget = case
    allocator = PrecisionAwareAllocator(min_tokens, max_tokens, budget, k, favor=favor, alpha=alpha, beta=beta)
    indices, budgets = allocator(relevance, precision)
    _check_invariants(indices, budgets, relevance, k, min_tokens, max_tokens, budget)
    assert (budgets.sum(dim=1) == min(budget, k * max_tokens)).all()


@settings(max_examples=40, deadline=None)
@given(allocation_cases())
def test_plain_and_topk_allocations_stay_within_range_and_budget(case):
    relevance, precision, k, min_tokens, max_tokens, budget = case
    for allocator in (RelevanceAllocator(min_tokens, max_tokens, budget, k),
                      PrecisionAwareAllocation(0.5, 0.1, k, min_tokens, max_tokens, budget)):
        indices, budgets = allocator(relevance, precision)
        _check_invariants(indices, budgets, relevance, k, min_tokens, max_tokens, budget)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=30), st.integers(0, 2000), st.integers(1, 90))
def test_water_fill_then_rounding_preserves_the_total_under_the_cap(weights, total, cap):
    shares = water_fill(torch.tensor([weights]), torch.tensor([float(total)]), float(cap))
    rounded = largest_remainder_round(shares)
    assert rounded.sum().item() == min(total, cap * len(weights))
    assert (rounded <= cap).all() and (rounded >= 0).all()
    assert (rounded - shares).abs().max() < 1 + 1e-9


def test_equal_relevance_higher_precision_gets_more_tokens_when_precise_and_fewer_when_uncertain():
    relevance = torch.full((1, 6), 0.5)
    precision = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    budgets = {}
    for favor in ("precise", "uncertain"):
        indices, tokens = PrecisionAwareAllocator(10, 100, 6 * 40, k=6, favor=favor)(relevance, precision)
        budgets[favor] = torch.zeros(6, dtype=torch.int64).scatter_(0, indices[0], tokens[0])
    assert (torch.diff(budgets["precise"]) > 0).all(), budgets
    assert (torch.diff(budgets["uncertain"]) < 0).all(), budgets


def test_extreme_exponents_neither_overflow_nor_produce_nan():
    relevance = torch.tensor([[0.0, 0.5, 1.0, 0.9]])
    precision = torch.tensor([[1e6, 1e-6, 0.0, 3.0]])
    for favor in ("precise", "uncertain"):
        _, budgets = PrecisionAwareAllocator(1, 50, 60, k=4, favor=favor, alpha=0.0, beta=200.0)(relevance, precision)
        assert budgets.sum().item() == 60 and budgets.max().item() == 50  # one dominant token takes the cap


@pytest.mark.parametrize(("options", "precision", "indices", "budgets"), [
    # s = r·p = [.5, .4, .3, .2], Σ = 1.4: 10 + 140·s/1.4 = 10 + 100·s
    ({"min_tokens": 10, "max_tokens": 100, "total_budget": 180}, [5.0, 2.0, 1.0, 0.5], [0, 1, 2, 3], [60, 50, 40, 30]),
    # s = r/p = [.02, .1, .3, .8], Σ = 1.22: 10 + 122·s/1.22 = 10 + 100·s
    ({"min_tokens": 10, "max_tokens": 100, "total_budget": 162, "favor": "uncertain"}, [5.0, 2.0, 1.0, 0.5],
     [3, 2, 1, 0], [90, 40, 20, 12]),
    # s = r² = [.01, .04, .09, .16], Σ = .3: 300·s = [10, 40, 90, 160] caps the last at 100; 200 over Σ = .14 gives
    # [14.3, 57.1, 128.6], capping the third; 100 over Σ = .05 gives [20, 80]
    ({"min_tokens": 0, "max_tokens": 100, "total_budget": 300, "alpha": 2.0, "beta": 0.0}, [1.0] * 4,
     [3, 2, 1, 0], [100, 100, 80, 20]),
], ids=["precise", "uncertain", "alpha_and_water_filling"])
def test_precision_aware_budgets_are_min_plus_spare_shared_in_proportion_to_the_score(options, precision, indices,
                                                                                   budgets):
    """Each kept token gets min_tokens plus a share of the spare budget ∝ s = relevance^α · precision^(±β), the
    shares above max_tokens − min_tokens capped and their excess shared again in the same proportions."""
    relevance = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    got_indices, got_budgets = PrecisionAwareAllocator(k=4, **options)(relevance, torch.tensor([precision]))
    assert got_indices.tolist() == [indices] and got_budgets.tolist() == [budgets]


def test_plain_mode_follows_the_arrcoc_formula_then_the_budget():
    relevance = torch.tensor([[1.0, 0.5, 0.0, 0.25]])
    indices, budgets = RelevanceAllocator(64, 400, 10_000, k=3)(relevance)
    assert indices.tolist() == [[0, 1, 3]]
    assert budgets.tolist() == [[400, 232, 148]]  # 64 + 336 * r, floored
    _, tight = RelevanceAllocator(64, 400, 600, k=3)(relevance)
    assert tight.tolist() == [[400, 136, 64]]  # greedy, keeping 64 for the last token


def test_knowledge_file_rule_penalises_tokens_above_the_target_precision():
    relevance = torch.tensor([[0.90, 0.85, 0.10, 0.05]])
    precision = torch.tensor([[1.0, 0.2, 0.1, 0.1]])
    indices, budgets = PrecisionAwareAllocation(target_precision=0.5, penalty=1.0, k=1, total_budget=100)(relevance, precision)
    assert indices.tolist() == [[1]]  # token 0 is sharper than half the maximum: 0.9 - 0.5 < 0.85
    assert budgets.tolist() == [[100]]


@pytest.mark.parametrize("allocator", [
    PrecisionAwareAllocator(0, 10, 20, k=2),
    RelevanceAllocator(0, 10, 20, k=2),
    PrecisionAwareAllocation(k=2, min_tokens=0, max_tokens=10, total_budget=20),
], ids=type)
def test_allocators_break_ties_by_the_lower_token_index_as_the_rank_metrics_do(allocator):
    relevance = torch.full((3, 16), 0.5)
    relevance[:, 0] = 0.1
    indices, _ = allocator(relevance, torch.ones_like(relevance))
    assert indices.tolist() == [[1, 2]] * 3
    assert indices.tolist() == top_k_indices(relevance, 2).tolist()


@pytest.mark.parametrize(
    ("kwargs", "relevance", "message"),
    [
        ({"total_budget": 100, "k": 2, "min_tokens": 64}, torch.rand(1, 5), "total_budget=100 cannot give k=2"),
        ({"min_tokens": 10, "max_tokens": 5, "k": 1}, torch.rand(1, 5), r"min_tokens \(10\) must not exceed"),
        ({"k": 6, "total_budget": 6 * 400}, torch.rand(1, 5), "k=6 exceeds the number of tokens N=5"),
        ({"k": 2}, torch.tensor([[0.1, math.nan, 0.3]]), "relevance contains NaN"),
    ],
)
def test_infeasible_settings_fail_with_clear_errors(kwargs, relevance, message):
    with pytest.raises(ValueError, match=message):
        PrecisionAwareAllocator(**kwargs)(relevance, torch.ones_like(relevance))


def test_negative_or_nan_precision_is_refused():
    relevance = torch.rand(1, 4)
    allocator = PrecisionAwareAllocator(1, 5, 10, k=2)
    with pytest.raises(ValueError, match="precision must be >= 0"):
        allocator(relevance, torch.tensor([[1.0, -0.5, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="precision contains NaN"):
        allocator(relevance, torch.tensor([[1.0, math.nan, 1.0, 1.0]]))


class _LinearTokens(nn.Module):
    """relevance = M (f w): token n's score mixes the features of the tokens M couples it to."""

    def __init__(self, mixing: torch.Tensor, channels: int) -> None:
        super().__init__()
        self.register_buffer("mixing", mixing)
        self.weight = nn.Parameter(torch.linspace(-1.0, 2.0, channels, dtype=torch.float64))

    def compute_relevance(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        return (token_features @ self.weight) @ self.mixing.T * query_embedding[:, :1]


def _exact_token_diagonal(model, batch) -> torch.Tensor:
    """Σ_c ∂²L_b/∂f_bnc² of each sample's own loss L_b = mean_n (r_bn − y_bn)², by
    torch.autograd.functional.hessian on one sample at a time: ``[B, N]``."""
    rows = []
    for b in range(batch["token_features"].shape[0]):
        features, query = batch["token_features"][b:b + 1], batch["query_embedding"][b:b + 1]

        def loss(f, query=query, b=b):
            return F.mse_loss(model.compute_relevance(f, query), batch["labels"][b:b + 1])

        hessian = torch.autograd.functional.hessian(loss, features)
        diagonal = hessian.reshape(features.numel(), features.numel()).diagonal().reshape(features.shape)
        rows.append(diagonal.sum(dim=-1))
    return torch.cat(rows)


def _quadratic_batch(tokens=6, channels=3):
    generator = torch.Generator().manual_seed(0)
    return {"token_features": torch.randn(2, tokens, channels, generator=generator, dtype=torch.float64),
            "query_embedding": torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64),
            "labels": torch.rand(2, tokens, generator=generator, dtype=torch.float64)}


@pytest.mark.parametrize("method", ["ggn", "hutchinson_cv"])
def test_token_precision_matches_the_exact_diagonal_of_a_quadratic(method):
    batch = _quadratic_batch()
    model = _LinearTokens(torch.eye(6, dtype=torch.float64), channels=3)  # tokens independent: estimates exact
    precision, stderr = token_precision(model, batch, method=method, num_probes=2, return_stderr=True)
    exact = _exact_token_diagonal(model, batch)
    assert precision.shape == (2, 6)
    torch.testing.assert_close(precision, exact, rtol=1e-10, atol=1e-12)
    assert stderr.abs().max() < 1e-10
    # the second sample's query doubles its scores: 4x the curvature
    torch.testing.assert_close(precision[1] / precision[0], torch.full((6,), 4.0, dtype=torch.float64))


def test_token_precision_is_unbiased_when_tokens_are_coupled():
    batch = _quadratic_batch()
    mixing = torch.eye(6, dtype=torch.float64) + 0.5 * torch.ones(6, 6, dtype=torch.float64).triu(1)
    model = _LinearTokens(mixing, channels=3)
    exact = _exact_token_diagonal(model, batch)
    for method in ("ggn", "hutchinson"):
        precision, stderr = token_precision(model, batch, method=method, num_probes=200, return_stderr=True)
        assert ((precision - exact).abs() <= 4 * stderr + 1e-12).all(), (method, precision, exact, stderr)
    assert (token_precision(model, batch, method="ggn", num_probes=4) >= 0).all()


def test_token_precision_feeds_the_allocator():
    batch = _quadratic_batch(tokens=8)
    model = _LinearTokens(torch.eye(8, dtype=torch.float64), channels=3)
    precision = token_precision(model, batch)
    relevance = model.compute_relevance(batch["token_features"], batch["query_embedding"]).sigmoid()
    indices, budgets = PrecisionAwareAllocator(4, 20, 40, k=3)(relevance.detach(), precision)
    assert indices.shape == budgets.shape == (2, 3) and (budgets.sum(dim=1) == 40).all()


def _coupled_model_and_batch(samples: int = 5, tokens: int = 6):
    generator = torch.Generator().manual_seed(1)
    mixing = torch.eye(tokens, dtype=torch.float64) + 0.5 * torch.ones(tokens, tokens, dtype=torch.float64).triu(1)
    batch = {"token_features": torch.randn(samples, tokens, 3, generator=generator, dtype=torch.float64),
             "query_embedding": torch.randn(samples, 2, generator=generator, dtype=torch.float64),
             "labels": torch.rand(samples, tokens, generator=generator, dtype=torch.float64)}
    return _LinearTokens(mixing, channels=3), batch


# One batched pass averages the loss over B·N tokens and rescales by B, and batched kernels may sum in another
# order: a sample's estimate alone and in a batch agree to rounding (measured ≤ 2e-15 relative in float64), not bitwise.
SAME_SAMPLE = {"rtol": 1e-12, "atol": 1e-12}


@pytest.mark.parametrize("method", ["ggn", "hutchinson", "hutchinson_cv"])
def test_a_samples_precision_is_the_same_alone_and_in_batches_of_any_size(method):
    """Coupled tokens make every estimate random: equality proves the probes follow (seed, sample index)."""
    model, batch = _coupled_model_and_batch()
    whole, whole_stderr = token_precision(model, batch, method=method, num_probes=3, seed=7, return_stderr=True)
    for sizes in ([1] * 5, [2, 3], [3, 2], [4, 1]):
        start, parts, errors = 0, [], []
        for size in sizes:
            part = {key: value[start:start + size] for key, value in batch.items()}
            value, stderr = token_precision(model, part, method=method, num_probes=3, seed=7, return_stderr=True,
                                            sample_offset=start)
            parts.append(value)
            errors.append(stderr)
            start += size
        torch.testing.assert_close(torch.cat(parts), whole, **SAME_SAMPLE)
        torch.testing.assert_close(torch.cat(errors), whole_stderr, **SAME_SAMPLE)
    exact = _exact_token_diagonal(model, batch)
    assert not torch.allclose(whole, exact), "the estimate should be noisy here, or the test proves nothing"
    other_seed = token_precision(model, batch, method=method, num_probes=3, seed=8)
    assert not torch.equal(other_seed, whole)


def test_the_probe_seed_and_sample_index_choose_the_probes():
    model, batch = _coupled_model_and_batch(samples=2)
    one = {key: value[1:] for key, value in batch.items()}
    as_second = token_precision(model, one, method="hutchinson", num_probes=2, sample_offset=1)
    as_first = token_precision(model, one, method="hutchinson", num_probes=2, sample_offset=0)
    torch.testing.assert_close(as_second[0], token_precision(model, batch, method="hutchinson", num_probes=2)[1],
                               **SAME_SAMPLE)
    assert not torch.allclose(as_first, as_second)


def _relevance_model_and_batch(samples: int, dtype: torch.dtype = torch.float64):
    """The tiny ARR-COC relevance model of the CLI tests (8x8 grid, D=32): tokens coupled through the per-sample
    standardisation and the balancer's map statistics."""
    from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel

    torch.manual_seed(0)
    config = ArrCocRelevanceConfig(grid_size=8, query_dim=32, coupling_hidden=8, balancer_hidden=16)
    model = ArrCocRelevanceModel(config).to(dtype)
    generator = torch.Generator().manual_seed(2)
    batch = {"token_features": torch.rand(samples, 64, 13, generator=generator, dtype=dtype),
             "query_embedding": torch.randn(samples, 32, generator=generator, dtype=dtype),
             "labels": torch.rand(samples, 64, generator=generator, dtype=dtype)}
    return model, batch


@pytest.mark.parametrize("method", ["ggn", "hutchinson", "hutchinson_cv"])
def test_the_relevance_models_precision_of_a_sample_is_the_same_alone_and_batched(method):
    model, batch = _relevance_model_and_batch(4)
    whole, whole_stderr = token_precision(model, batch, method=method, num_probes=2, seed=3, return_stderr=True,
                                          sample_offset=10)
    for row in range(4):
        alone = {key: value[row:row + 1] for key, value in batch.items()}
        value, stderr = token_precision(model, alone, method=method, num_probes=2, seed=3, return_stderr=True,
                                        sample_offset=10 + row)
        torch.testing.assert_close(value[0], whole[row], **SAME_SAMPLE)
        torch.testing.assert_close(stderr[0], whole_stderr[row], **SAME_SAMPLE)
    assert (whole_stderr > 0).any(), "the estimate should be noisy here, or the test proves nothing"


@pytest.mark.parametrize(("method", "passes_per_probe"), [("ggn", 1), ("hutchinson", 1), ("hutchinson_cv", 3)])
def test_token_precision_runs_a_fixed_number_of_forward_passes_per_probe_whatever_the_batch_size(method, passes_per_probe):
    counts = {}
    for samples in (1, 5):
        model, batch = _relevance_model_and_batch(samples, torch.float32)
        calls: list[int] = []
        handle = model.scorer.register_forward_hook(lambda module, args, output, calls=calls: calls.append(args[0].shape[0]))
        try:
            token_precision(model, batch, method=method, num_probes=3)
        finally:
            handle.remove()
        counts[samples] = len(calls)
        assert set(calls) == {samples}  # every pass scores the whole batch
    assert counts == {1: 3 * passes_per_probe, 5: 3 * passes_per_probe}


def test_the_default_total_budget_is_k_times_the_mean_of_min_and_max():
    for allocator in (PrecisionAwareAllocator(10, 31, k=4), RelevanceAllocator(10, 31, k=4),
                      PrecisionAwareAllocation(k=4, min_tokens=10, max_tokens=31)):
        assert allocator.total_budget == 4 * (10 + 31) // 2 == 82
    _, budgets = PrecisionAwareAllocator(10, 31, k=4)(torch.rand(2, 6), torch.rand(2, 6))
    assert budgets.sum(dim=1).tolist() == [82, 82]


def test_plain_mode_floors_fractional_token_counts():
    _, budgets = RelevanceAllocator(64, 400, 10_000, k=2)(torch.tensor([[0.3, 0.1]]))
    assert budgets.tolist() == [[164, 97]]  # floor(64 + 336 * 0.3 = 164.8), floor(64 + 33.6 = 97.6)


def test_knowledge_file_rule_measures_precision_relative_to_the_samples_sharpest_token():
    relevance = torch.tensor([[0.90, 0.85, 0.10, 0.05]])
    rule = PrecisionAwareAllocation(target_precision=0.5, penalty=1.0, k=1, total_budget=100)
    for scale in (1.0, 10.0, 1e-3):  # p̂ = precision / max: the choice cannot depend on the precision's units
        indices, _ = rule(relevance, scale * torch.tensor([[1.0, 0.2, 0.1, 0.1]]))
        assert indices.tolist() == [[1]], scale
    # without precision, p̂ = relevance / its maximum = [1, 0.89, 0.67, 0.11]: penalties 0.5, 0.39, 0.17, 0
    indices, _ = rule(torch.tensor([[0.45, 0.40, 0.30, 0.05]]))
    assert indices.tolist() == [[2]]  # adjusted [-0.05, 0.01, 0.13, 0.05]; unscaled relevance (< 0.5) pays nothing


def test_knowledge_file_rule_divides_each_samples_precision_by_its_own_maximum():
    """Sample 1 is sample 0 with a 10x precision: p̂ = [1, .2, .1, .1] for both, so the penalty 1·relu(p̂ − .5) =
    [.5, 0, 0, 0] turns both choices to token 1. Divided by the batch maximum, sample 0's p̂ fell below the target
    and it kept token 0."""
    relevance = torch.tensor([[0.90, 0.85, 0.10, 0.05]] * 2)
    precision = torch.tensor([[1.0, 0.2, 0.1, 0.1], [10.0, 2.0, 1.0, 1.0]])
    indices, budgets = PrecisionAwareAllocation(target_precision=0.5, penalty=1.0, k=1, total_budget=100)(relevance,
                                                                                                          precision)
    assert indices.tolist() == [[1], [1]] and budgets.tolist() == [[100], [100]]


def test_plain_mode_refuses_relevance_above_one():
    with pytest.raises(ValueError, match=r"relevance must lie in \[0, 1\] for the plain mode, got a maximum of 1.5"):
        RelevanceAllocator(1, 10, 20, k=2)(torch.tensor([[0.2, 1.5, 0.3]]))


def test_negative_penalty_alpha_or_beta_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="penalty must be >= 0, got -0.5"):
        PrecisionAwareAllocation(penalty=-0.5)
    with pytest.raises(ValueError, match="alpha and beta must be >= 0, got alpha=1.0, beta=-1.0"):
        PrecisionAwareAllocator(beta=-1.0)
    with pytest.raises(ValueError, match="alpha and beta must be >= 0, got alpha=-1.0, beta=1.0"):
        PrecisionAwareAllocator(alpha=-1.0)


def test_hessian_precision_needs_labels_and_the_ggn_does_not():
    batch = _quadratic_batch()
    unlabelled = {key: value for key, value in batch.items() if key != "labels"}
    model = _LinearTokens(torch.eye(6, dtype=torch.float64), channels=3)
    for method in ("hutchinson", "hutchinson_cv"):
        with pytest.raises(ValueError, match="method='hutchinson'/'hutchinson_cv' needs target relevance 'labels'"):
            token_precision(model, unlabelled, method=method, num_probes=2)
    torch.testing.assert_close(token_precision(model, unlabelled, num_probes=2), token_precision(model, batch, num_probes=2))


def test_per_sample_seeds_separate_seed_stream_and_index():
    """Each of (seed, stream, index) changes the 56-bit seed, also when the fields would concatenate alike."""
    import hashlib

    from arrcoc_sam.relevance.seeding import sample_generator, sample_seed

    triples = [(0, "token_precision", 3), (1, "token_precision", 3), (0, "noise", 3), (0, "token_precision", 4),
               (1, "s1", 2), (1, "s", 12), (11, "s", 2)]
    seeds = [sample_seed(*triple) for triple in triples]
    assert len(set(seeds)) == len(triples) and all(0 <= s < 2**56 for s in seeds)
    assert seeds[0] == int.from_bytes(hashlib.sha256(b"0:token_precision:3").digest()[:7], "little")
    draws = [torch.rand(4, generator=sample_generator(*triple)) for triple in triples[:4]]
    assert all(not torch.equal(draws[0], other) for other in draws[1:])


def test_precision_of_another_shape_is_refused_not_broadcast():
    relevance = torch.rand(2, 5)
    with pytest.raises(ValueError, match=r"precision must match relevance's shape \(2, 5\), got \(1, 5\)"):
        PrecisionAwareAllocator(1, 5, 10, k=2)(relevance, torch.rand(1, 5))
    with pytest.raises(ValueError, match=r"precision must match relevance's shape \(2, 5\), got \(1, 5\)"):
        PrecisionAwareAllocation(k=2, min_tokens=1, max_tokens=5, total_budget=10)(relevance, torch.rand(1, 5))


def test_precision_from_images_equals_precision_from_their_texture_tokens():
    model, batch = _relevance_model_and_batch(2)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    from_images = {"pixel_values": pixels, "query_embedding": batch["query_embedding"], "labels": batch["labels"]}
    from_tokens = {**from_images, "token_features": model.token_features(pixels, None)}
    for method in ("ggn", "hutchinson"):
        torch.testing.assert_close(token_precision(model, from_images, method=method, num_probes=2),
                                   token_precision(model, from_tokens, method=method, num_probes=2))
