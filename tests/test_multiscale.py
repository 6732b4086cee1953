"""The multi-scale relevance model: pyramid / rescaled scales, sharpness fusion, coarse-to-fine top-K."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from arrcoc_sam.relevance.multiscale import (
    MultiScaleRelevanceConfig,
    MultiScaleRelevanceModel,
    coarse_to_fine_top_k,
)
from arrcoc_sam.relevance.texture import grid_to_tokens, normalize_per_sample, tokens_to_grid

GRID, QUERY_DIM = 8, 16


def _model(seed: int = 0, **overrides) -> MultiScaleRelevanceModel:
    torch.manual_seed(seed)
    config = MultiScaleRelevanceConfig(grid_size=GRID, query_dim=QUERY_DIM, coupling_hidden=8, balancer_hidden=16,
                                       top_k_tokens=12, coarse_k=4, **overrides)
    return MultiScaleRelevanceModel(config).eval()


def _batch(batch_size: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.rand(batch_size, 3, 4 * GRID, 4 * GRID, generator=g),
        "query_embedding": torch.randn(batch_size, QUERY_DIM, generator=g),
        "labels": (torch.rand(batch_size, GRID * GRID, generator=g) > 0.8).float(),
    }


@pytest.mark.parametrize(("mode", "num_scales"), [("pyramid", 3), ("rescale", 3)])
def test_outputs_have_promised_shapes_ranges_and_weights(mode, num_scales):
    out = _model(mode=mode)(**_batch())
    assert out.combined_relevance.shape == (3, GRID * GRID) and out.per_scale.shape == (3, num_scales, GRID * GRID)
    assert out.combined_relevance.min() >= 0 and out.combined_relevance.max() <= 1
    assert out.sharpness.shape == (3, num_scales) and (out.sharpness > 0).all()
    torch.testing.assert_close(out.weights.sum(1), torch.ones(3))
    torch.testing.assert_close(out.combined_relevance, (out.weights.unsqueeze(-1) * out.per_scale).sum(1))
    assert out.selected_indices.shape == (3, 12)


def test_sharpness_weights_are_inverse_input_gradient_norms_of_each_scale():
    model, batch = _model(), _batch(batch_size=2)
    out = model(**batch)
    fine = grid_to_tokens(tokens_to_grid(normalize_per_sample(model.token_features(batch["pixel_values"], None))))
    for level in range(3):
        features = grid_to_tokens(F.avg_pool2d(tokens_to_grid(fine), 2**level)).requires_grad_(True)
        per_scale = model.scorer(features, batch["query_embedding"]).relevance
        for b in range(2):
            (grad,) = torch.autograd.grad(per_scale[b].mean(), features, retain_graph=True)
            expected = grad[b].norm() * features.shape[1] ** 0.5
            assert float(out.sharpness[b, level]) == pytest.approx(float(expected), rel=1e-4)
    inverse = 1 / out.sharpness
    torch.testing.assert_close(out.weights, inverse / inverse.sum(1, keepdim=True))


def test_fused_relevance_of_a_sample_is_independent_of_its_batch():
    model, batch = _model(), _batch(batch_size=4)
    together = model(pixel_values=batch["pixel_values"], query_embedding=batch["query_embedding"])
    alone = model(pixel_values=batch["pixel_values"][1:2], query_embedding=batch["query_embedding"][1:2])
    torch.testing.assert_close(alone.combined_relevance[0], together.combined_relevance[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(alone.weights[0], together.weights[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fusion", ["sharpness", "curvature", "learned"])
def test_gradients_reach_every_learned_parameter(fusion):
    model = _model(fusion=fusion).train()
    model(**_batch()).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_save_and_automodel_load_round_trip_gives_identical_outputs(tmp_path):
    model, batch = _model(fusion="learned", num_levels=4), _batch()
    with torch.no_grad():
        model.scale_logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MultiScaleRelevanceModel) and loaded.config.num_levels == 4
    loaded_state = loaded.state_dict()
    assert all(torch.equal(value, loaded_state[name]) for name, value in model.state_dict().items())
    before, after = model(**batch), loaded(**batch)
    torch.testing.assert_close(after.combined_relevance, before.combined_relevance, atol=1e-6, rtol=0)
    for param in loaded.parameters():  # unaligned mmap'd storage may change the SIMD summation order (~3e-8)
        param.data = param.data.clone()
    assert torch.equal(before.combined_relevance, loaded(**batch).combined_relevance)


def test_coarse_to_fine_top_k_equals_exact_top_k_when_the_best_cells_share_coarse_blocks():
    relevance = torch.rand(2, 64) * 0.1
    grid = relevance.view(2, 8, 8)
    grid[:, 2:4, 4:6] += 1.0  # one 2x2 block holds the four best tokens
    got = coarse_to_fine_top_k(relevance, k=4, coarse_k=1)
    assert torch.equal(got.sort(1).values, relevance.topk(4).indices.sort(1).values)


def test_coarse_to_fine_top_k_returns_children_of_the_best_coarse_cells_in_relevance_order():
    g = torch.Generator().manual_seed(0)
    relevance = torch.rand(3, 256, generator=g)
    got = coarse_to_fine_top_k(relevance, k=20, coarse_k=8)
    coarse = F.avg_pool2d(relevance.view(3, 1, 16, 16), 2).flatten(1)
    best_cells = coarse.topk(8).indices
    cells_of_got = (got // 16 // 2) * 8 + (got % 16) // 2
    for b in range(3):
        assert set(cells_of_got[b].tolist()) <= set(best_cells[b].tolist())
    values = relevance.gather(1, got)
    assert (values[:, :-1] >= values[:, 1:]).all() and got.unique(dim=1).shape[1] == 20


@pytest.mark.parametrize(("field", "value"), [("num_levels", 6), ("mode", "wavelet"), ("fusion", "max"),
                                              ("scales", [0.5, -1.0])])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MultiScaleRelevanceConfig(**{field: value})


def test_rescale_mode_needs_images():
    with pytest.raises(ValueError, match="pixel_values"):
        _model(mode="rescale")(token_features=torch.randn(1, GRID * GRID, 13), query_embedding=torch.randn(1, 16))


def test_curvature_fusion_estimates_each_samples_input_hessian_frobenius_norm():
    model, batch = _model(fusion="curvature", num_levels=2, curvature_probes=48), _batch(batch_size=2)
    out = model(pixel_values=batch["pixel_values"], query_embedding=batch["query_embedding"])
    fine = normalize_per_sample(model.token_features(batch["pixel_values"], None))
    for level in range(2):
        features = grid_to_tokens(F.avg_pool2d(tokens_to_grid(fine), 2**level)).detach()
        for b in range(2):
            def mean_relevance(x, b=b):
                return model.scorer(x.unsqueeze(0), batch["query_embedding"][b:b + 1]).relevance.mean()

            hessian = torch.autograd.functional.hessian(mean_relevance, features[b])
            exact = hessian.reshape(features[b].numel(), -1).norm() * features.shape[1] ** 0.5
            assert float(out.sharpness[b, level]) == pytest.approx(float(exact), rel=0.2)
    inverse = 1 / out.sharpness
    torch.testing.assert_close(out.weights, inverse / inverse.sum(1, keepdim=True))
