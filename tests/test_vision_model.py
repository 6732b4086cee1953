"""The ARR-COC v0.1 vision relevance model: texture array, scorers, balancer, loss, save/load."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from transformers import AutoConfig, AutoModel

from arrcoc_sam.relevance.texture import (
    NUM_TEXTURE_CHANNELS,
    TEXTURE_CHANNELS,
    grid_to_tokens,
    rgb_to_lab,
    sobel,
    texture_array,
)
from arrcoc_sam.relevance.vision import (
    ArrCocRelevanceConfig,
    ArrCocRelevanceModel,
    information_score,
    pairwise_ranking_loss,
)

GRID, QUERY_DIM = 8, 16


def _model(seed: int = 0, **overrides) -> ArrCocRelevanceModel:
    torch.manual_seed(seed)
    config = ArrCocRelevanceConfig(grid_size=GRID, query_dim=QUERY_DIM, coupling_hidden=8, balancer_hidden=16,
                                   top_k_tokens=10, **overrides)
    return ArrCocRelevanceModel(config).eval()


def _batch(batch_size: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.rand(batch_size, 3, 2 * GRID, 2 * GRID, generator=g),
        "query_embedding": torch.randn(batch_size, QUERY_DIM, generator=g),
        "labels": (torch.rand(batch_size, GRID * GRID, generator=g) > 0.8).float(),
    }


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)), ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
     ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602))],
)
def test_rgb_to_lab_matches_reference_values(rgb, lab):
    got = rgb_to_lab(torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1)).flatten()
    torch.testing.assert_close(got, torch.tensor(lab, dtype=torch.float64), atol=2e-3, rtol=0)


@pytest.mark.parametrize(("rgb", "lab_l", "lab_a"), [
    ((1.0, 0.0, 0.0), 53.2408, 80.0925),  # sRGB red (reference values as above)
    ((0.02, 0.02, 0.02), 24389 / 27 * 0.02 / 12.92, 0.0),  # dark grey: linear sRGB segment, L* = κ·Y (CIE)
])
def test_a_solid_colours_pixel_channels_are_its_rgb_l_star_a_star_zero_gradients_and_saliency_and_its_luma(
        rgb, lab_l, lab_a):
    """Every cell of a uniform image, channel by channel in `TEXTURE_CHANNELS` order: L* and a* (not a*, b*), flat
    Sobel, saliency 0 up to its borders (the blur replicates the edge) and Rec. 709 luma 0.2126 R + 0.7152 G + 0.0722 B."""
    images = torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 8, 8).contiguous()
    cells = texture_array(images, 4, normalize=False)[0].flatten(1)  # [13, 16]
    expected = {"red": rgb[0], "green": rgb[1], "blue": rgb[2], "lab_l": lab_l, "lab_a": lab_a, "sobel_gx": 0.0,
                "sobel_gy": 0.0, "sobel_magnitude": 0.0, "saliency": 0.0,
                "luminance": 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]}
    for name, value in expected.items():
        got = cells[TEXTURE_CHANNELS.index(name)]
        torch.testing.assert_close(got, torch.full_like(got, value), atol=2e-3, rtol=0, msg=name)


def test_sobel_of_a_horizontal_ramp_is_eight_times_its_slope_in_x_and_zero_in_y():
    slope = 0.1
    ramp = (slope * torch.arange(6.0)).expand(1, 1, 5, 6)
    gx, gy = sobel(ramp)
    torch.testing.assert_close(gx[..., 1:-1], torch.full_like(gx[..., 1:-1], 8 * slope))
    torch.testing.assert_close(gy, torch.zeros_like(gy))


def test_texture_array_has_13_channels_with_exact_positions_and_per_sample_standardisation():
    images = _batch()["pixel_values"]
    raw = texture_array(images, GRID, normalize=False)
    assert raw.shape == (3, NUM_TEXTURE_CHANNELS, GRID, GRID) and len(TEXTURE_CHANNELS) == 13
    centres = (torch.arange(GRID) + 0.5) / GRID
    torch.testing.assert_close(raw[1, TEXTURE_CHANNELS.index("y"), :, 0], centres)
    torch.testing.assert_close(raw[1, TEXTURE_CHANNELS.index("x"), 0, :], centres)
    ecc = raw[0, TEXTURE_CHANNELS.index("eccentricity")]
    assert ecc[0, 0] == pytest.approx(math.hypot(0.5 - 0.5 / GRID, 0.5 - 0.5 / GRID) / math.sqrt(0.5))
    red = F.avg_pool2d(images[:, :1], 2)
    torch.testing.assert_close(raw[:, :1], red)
    tokens = grid_to_tokens(texture_array(images, GRID))
    torch.testing.assert_close(tokens.mean(dim=1), torch.zeros(3, 13), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.std(dim=1, unbiased=False), torch.ones(3, 13), atol=1e-4, rtol=0)


def test_information_score_is_softmax_channel_entropy_over_log_c():
    tokens = torch.randn(2, 5, 13, dtype=torch.float64)
    expected = entropy(torch.softmax(tokens, -1).numpy(), axis=-1) / math.log(13)
    np.testing.assert_allclose(information_score(tokens).numpy(), expected, rtol=1e-12)


def test_relevance_maps_weights_and_top_k_have_promised_shapes_and_ranges():
    model, batch = _model(), _batch()
    with torch.no_grad():
        out = model(**batch)
    assert out.relevance.shape == (3, GRID * GRID) and out.loss.dim() == 0
    for scores in (out.relevance, out.information, out.perspectival, out.participatory):
        assert scores.shape == (3, GRID * GRID) and scores.min() >= 0 and scores.max() <= 1
    torch.testing.assert_close(out.balancer_weights.sum(-1), torch.ones(3))
    maps = torch.stack((out.information, out.perspectival, out.participatory), 1)
    torch.testing.assert_close(out.relevance, (out.balancer_weights.unsqueeze(-1) * maps).sum(1))
    assert out.selected_indices.shape == (3, 10)
    torch.testing.assert_close(out.relevance.gather(1, out.selected_indices), out.relevance.topk(10).values)


def test_compute_relevance_on_texture_tokens_equals_image_forward():
    model, batch = _model(), _batch()
    tokens = grid_to_tokens(texture_array(batch["pixel_values"], GRID, normalize=False))
    with torch.no_grad():
        from_images = model(pixel_values=batch["pixel_values"], query_embedding=batch["query_embedding"]).relevance
        from_tokens = model.compute_relevance(tokens, batch["query_embedding"])
    torch.testing.assert_close(from_tokens, from_images, atol=1e-5, rtol=0)


def test_relevance_of_a_sample_does_not_change_when_other_samples_join_its_batch():
    model, batch = _model(), _batch(batch_size=5)
    with torch.no_grad():
        together = model(pixel_values=batch["pixel_values"], query_embedding=batch["query_embedding"])
        alone = model(pixel_values=batch["pixel_values"][2:3], query_embedding=batch["query_embedding"][2:3])
    torch.testing.assert_close(alone.relevance[0], together.relevance[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(alone.balancer_weights[0], together.balancer_weights[2], atol=1e-6, rtol=0)


def test_participatory_cosine_equals_cosine_of_the_explicit_projection():
    model = _model()
    scorer = model.scorer.participatory
    with torch.no_grad():
        scorer.conv_out.bias.normal_()  # a non-zero output bias exercises every term of the expansion
    tokens, query = torch.randn(2, 7, 13), torch.randn(2, QUERY_DIM)
    projected = scorer.conv_out(F.gelu(scorer.conv_in(tokens.transpose(1, 2)))).transpose(1, 2)
    expected = F.cosine_similarity(projected, query.unsqueeze(1), dim=-1)
    torch.testing.assert_close(scorer.cosine(tokens, query), expected, atol=1e-5, rtol=0)


def test_gradients_reach_every_learned_parameter():
    model = _model().train()
    model(**_batch()).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_pairwise_ranking_loss_matches_a_loop_over_the_fixed_pairs():
    g = torch.Generator().manual_seed(0)
    relevance, targets = torch.rand(2, 9, generator=g), torch.rand(2, 9, generator=g)
    num_pairs, margin, scale = 4, 0.1, 3.0
    total, count = 0.0, 0
    for b in range(2):
        for offset in sorted({1 + (k * 9) // num_pairs for k in range(num_pairs)}):
            for i in range(9):
                j = (i + offset) % 9
                gap = float(targets[b, i] - targets[b, j])
                if abs(gap) > margin:
                    total += math.log1p(math.exp(-scale * math.copysign(1, gap) * float(relevance[b, i] - relevance[b, j])))
                    count += 1
    got = pairwise_ranking_loss(relevance, targets, num_pairs, margin, scale)
    assert float(got) == pytest.approx(total / count, rel=1e-5)


def test_loss_is_mse_when_the_ranking_weight_is_zero():
    model, batch = _model(ranking_weight=0.0), _batch()
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.loss, F.mse_loss(out.relevance, batch["labels"]))


def test_save_and_automodel_load_round_trip_gives_identical_outputs(tmp_path):
    model, batch = _model(), _batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ArrCocRelevanceConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ArrCocRelevanceModel)
    with torch.no_grad():
        before, after = model(**batch), loaded(**batch)
        torch.testing.assert_close(after.relevance, before.relevance, atol=1e-6, rtol=0)
        # Loaded tensors live in unaligned mmap'd storage, which can pick another SIMD summation order
        # (~3e-8); in freshly allocated storage the outputs are bitwise identical.
        for param in loaded.parameters():
            param.data = param.data.clone()
        realigned = loaded(**batch)
    assert torch.equal(before.relevance, realigned.relevance) and torch.equal(before.loss, realigned.loss)


@pytest.mark.parametrize(("field", "value"), [("top_k_tokens", 0), ("query_dim", -1), ("ranking_weight", -0.5),
                                              ("ranking_scale", 0.0)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ArrCocRelevanceConfig(**{field: value})


def test_forward_requires_exactly_one_input_and_checks_the_query_shape():
    model, batch = _model(), _batch()
    tokens = torch.randn(3, GRID * GRID, 13)
    with pytest.raises(ValueError, match="exactly one"):
        model(pixel_values=batch["pixel_values"], token_features=tokens, query_embedding=batch["query_embedding"])
    with pytest.raises(ValueError, match="query_embedding must be"):
        model(token_features=tokens, query_embedding=torch.randn(3, QUERY_DIM + 1))
    with pytest.raises(ValueError, match="token_features must be"):
        model(token_features=tokens[..., :5], query_embedding=batch["query_embedding"])


@pytest.mark.parametrize("image", ["flat_with_a_square", "constant"])
def test_texture_gradients_are_finite_on_flat_regions_and_values_match_the_plain_formula(image):
    from arrcoc_sam.relevance.texture import TEXTURE_CHANNELS, sobel

    pixels = torch.full((1, 3, 16, 16), 0.5)
    if image == "flat_with_a_square":
        pixels[:, :, 4:8, 4:8] = 0.9
    leaf = pixels.clone().requires_grad_(True)
    texture_array(leaf, 8).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    luminance = (pixels * torch.tensor([0.2126, 0.7152, 0.0722]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    gx, gy = sobel(luminance)
    raw = texture_array(pixels, 8, normalize=False)
    expected = F.adaptive_avg_pool2d(torch.sqrt(gx**2 + gy**2), 8)[:, 0]
    torch.testing.assert_close(raw[:, TEXTURE_CHANNELS.index("sobel_magnitude")], expected, atol=1e-7, rtol=0)
    tokens = raw.flatten(2).transpose(1, 2)
    reference = (tokens - tokens.mean(1, keepdim=True)) / (tokens.std(1, keepdim=True, unbiased=False) + 1e-6)
    torch.testing.assert_close(texture_array(pixels, 8).flatten(2).transpose(1, 2), reference, atol=1e-6, rtol=0)


def test_a_bfloat16_model_takes_float32_inputs_and_matches_the_float32_model():
    model, batch = _model(), _batch()
    reference = model(pixel_values=batch["pixel_values"], query_embedding=batch["query_embedding"]).relevance
    half = _model().to(torch.bfloat16)
    from_pixels = half(pixel_values=batch["pixel_values"], query_embedding=batch["query_embedding"]).relevance
    features = model.token_features(batch["pixel_values"], None)
    from_features = half.compute_relevance(features, batch["query_embedding"])
    for relevance in (from_pixels, from_features):
        assert relevance.dtype == torch.bfloat16
        torch.testing.assert_close(relevance.float(), reference, atol=3e-2, rtol=0)


def _reference_scores(model: ArrCocRelevanceModel, features: torch.Tensor, query: torch.Tensor):
    """The module docstring's pipeline written out by hand (float64): per-sample standardisation, the three maps,
    the balancer on (mean, max, population std) ++ query, softmax, weighted sum."""
    scorer = model.scorer
    x = features.double()
    x = (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True, unbiased=False).sqrt() + 1e-6)
    p = torch.softmax(x, -1)
    information = -(p * p.log()).sum(-1) / math.log(13)
    sobel_magnitude = x[..., TEXTURE_CHANNELS.index("sobel_magnitude")]
    low, high = sobel_magnitude.amin(1, keepdim=True), sobel_magnitude.amax(1, keepdim=True)
    perspectival = (sobel_magnitude - low) / (high - low + 1e-6)
    conv_in, conv_out = scorer.participatory.conv_in, scorer.participatory.conv_out
    projected = F.linear(F.gelu(F.linear(x, conv_in.weight[..., 0].double(), conv_in.bias.double())),
                         conv_out.weight[..., 0].double(), conv_out.bias.double())
    cosine = F.cosine_similarity(projected, query.double().unsqueeze(1), dim=-1)
    scale, bias = float(scorer.participatory.log_scale.detach().exp()), float(scorer.participatory.bias.detach())
    participatory = torch.sigmoid(scale * cosine + bias)
    maps = torch.stack((information, perspectival, participatory), 1)  # [B, 3, N]
    stats = torch.cat((maps.mean(-1), maps.amax(-1), maps.var(-1, unbiased=False).sqrt()), -1)
    weights = torch.softmax(copy.deepcopy(scorer.balancer.mlp).double()(torch.cat((stats, query.double()), -1)), -1)
    return maps, weights, (weights.unsqueeze(-1) * maps).sum(1)


def test_forward_matches_a_hand_written_reference_of_every_map_the_balancer_and_the_mix():
    """Sobel *magnitude* channel, exp(log_scale) and +bias in the sigmoid, population std in the balancer."""
    model = _model()
    with torch.no_grad():
        model.scorer.participatory.log_scale.fill_(math.log(3.0))
        model.scorer.participatory.bias.fill_(0.7)  # a non-default bias and scale expose their sign and exp
    g = torch.Generator().manual_seed(3)
    features = 2.0 + 3.0 * torch.randn(2, GRID * GRID, 13, generator=g)  # unstandardised on purpose
    query = torch.randn(2, QUERY_DIM, generator=g)
    with torch.no_grad():
        out = model(token_features=features, query_embedding=query)
    maps, weights, relevance = _reference_scores(model, features, query)
    for got, want in ((out.information, maps[:, 0]), (out.perspectival, maps[:, 1]), (out.participatory, maps[:, 2]),
                      (out.balancer_weights, weights), (out.relevance, relevance)):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_the_loss_adds_ranking_weight_times_the_ranking_term_to_the_mse():
    model, batch = _model(ranking_weight=0.7, ranking_pairs=4, ranking_margin=0.1, ranking_scale=3.0), _batch()
    with torch.no_grad():
        out = model(**batch)
    ranking = pairwise_ranking_loss(out.relevance, batch["labels"], 4, 0.1, 3.0)
    assert float(ranking) > 0.1  # the term is large enough that a wrong weight shows
    torch.testing.assert_close(out.loss, F.mse_loss(out.relevance, batch["labels"]) + 0.7 * ranking)


def test_pairs_whose_target_gap_equals_the_margin_are_ignored():
    relevance = torch.tensor([[0.9, 0.1]])
    targets = torch.tensor([[0.5, 0.25]])  # gap exactly 0.25 (exact in binary): not "> margin"
    assert float(pairwise_ranking_loss(relevance, targets, num_pairs=1, margin=0.25)) == 0.0
    assert float(pairwise_ranking_loss(relevance, targets, num_pairs=1, margin=0.2)) > 0.0


def test_a_fresh_model_starts_its_participatory_sigmoid_at_the_configured_scale_and_bias():
    model = _model(participatory_init_scale=7.0, participatory_init_bias=-1.5)
    assert float(model.scorer.participatory.log_scale.detach()) == pytest.approx(math.log(7.0))
    assert float(model.scorer.participatory.bias.detach()) == pytest.approx(-1.5)


def test_top_k_is_clamped_to_the_number_of_tokens():
    model = _model()
    model.config.top_k_tokens = 10_000
    with torch.no_grad():
        out = model(token_features=torch.randn(2, 9, 13), query_embedding=torch.randn(2, QUERY_DIM))
    assert out.selected_indices.shape == (2, 9)
    assert sorted(out.selected_indices[0].tolist()) == list(range(9))


def test_token_features_use_the_grid_size_they_are_given_else_the_configs():
    model, batch = _model(), _batch()
    assert model.token_features(batch["pixel_values"], None).shape == (3, GRID * GRID, 13)
    coarse = model.token_features(batch["pixel_values"], None, grid_size=4)
    torch.testing.assert_close(coarse, grid_to_tokens(texture_array(batch["pixel_values"], 4)))


def test_the_balancer_reads_mean_max_and_population_std_of_each_map():
    balancer = copy.deepcopy(_model().scorer.balancer).double()
    g = torch.Generator().manual_seed(4)
    maps, query = torch.rand(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, QUERY_DIM, generator=g,
                                                                                     dtype=torch.float64)
    population_std = (maps - maps.mean(-1, keepdim=True)).square().mean(-1).sqrt()  # / N, not / (N - 1)
    stats = torch.cat((maps.mean(-1), maps.amax(-1), population_std), -1)
    expected = torch.softmax(balancer.mlp(torch.cat((stats, query), -1)), -1)
    torch.testing.assert_close(balancer(maps, query), expected, rtol=1e-12, atol=1e-12)


def test_evaluation_gathers_only_the_relevance_not_the_per_way_maps(tmp_path):
    """`keys_to_ignore_at_inference`: the Trainer's predictions are relevance [B, N] alone, so evaluation does not
    gather three extra [B, N] maps, the weights and the indices per batch."""
    from transformers import Trainer, TrainingArguments

    from arrcoc_sam.relevance.collators import TokenFeatureCollator

    rows = [{"token_features": torch.randn(GRID * GRID, 13), "query_embedding": torch.randn(QUERY_DIM),
             "labels": torch.rand(GRID * GRID)} for _ in range(3)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2)
    predictions = Trainer(model=_model(), args=args, data_collator=TokenFeatureCollator()).predict(rows).predictions
    assert isinstance(predictions, np.ndarray) and predictions.shape == (3, GRID * GRID)


def test_a_query_batch_of_another_size_is_refused_not_broadcast():
    model = _model()
    with pytest.raises(ValueError, match=r"query_embedding must be \[B=3, D=16\], got shape \(1, 16\)"):
        model(token_features=torch.randn(3, GRID * GRID, 13), query_embedding=torch.randn(1, QUERY_DIM))


def test_a_bfloat16_texture_array_is_the_float32_one_rounded_once():
    """Computed in bfloat16 it was off by up to 0.26 standard units after normalisation."""
    images = torch.rand(2, 3, 4 * GRID, 4 * GRID, generator=torch.Generator().manual_seed(3)).bfloat16()
    features = texture_array(images, GRID)
    assert features.dtype == torch.bfloat16
    assert torch.equal(features, texture_array(images.float(), GRID).bfloat16())
