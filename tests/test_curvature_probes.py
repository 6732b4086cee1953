"""Probe samplers: the default is one generator stream (bitwise the seed path); BlockSampler gives each sample of a
stacked leaf its own probes, so one batched estimate equals each sample's estimate alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arrcoc_sam.curvature import MatrixOperator, hessian_diagonal, hutchinson_diagonal
from arrcoc_sam.curvature.probe import BlockSampler, GeneratorSampler

METHODS = ["hutchinson", "ggn", "hutchinson_cv"]


def _generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_block_sampler_draws_each_contiguous_block_from_its_own_generator():
    drawn = BlockSampler(_generators([3, 4])).rademacher((4, 3), torch.float64, torch.device("cpu"))
    first, second = (GeneratorSampler(g).rademacher((6,), torch.float64, torch.device("cpu")) for g in _generators([3, 4]))
    assert torch.equal(drawn, torch.cat([first, second]).view(4, 3))  # rows 0-1 from generator 0, rows 2-3 from 1
    assert set(drawn.unique().tolist()) == {-1.0, 1.0}


def test_block_sampler_refuses_a_probe_that_does_not_split_into_whole_blocks():
    with pytest.raises(ValueError, match=r"shape \(7,\) \(7 entries\) does not split into 2 equal blocks"):
        BlockSampler(_generators([0, 1])).rademacher((7,), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="generators is empty"):
        BlockSampler([])


class _PerTokenClassifier(nn.Module):
    """A tanh MLP over each sample's tokens [B, T, C] -> logits [B, T, K], the tokens of a sample coupled
    through its mean feature (samples never interact)."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(2 * channels, 5).double()
        self.outer = nn.Linear(5, classes).double()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        context = features.mean(dim=1, keepdim=True).expand_as(features)
        return self.outer(torch.tanh(self.inner(torch.cat((features, context), dim=-1))))


def _loss(model, batch):
    logits = model(batch["features"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def _outputs(model, batch):
    return model(batch["features"]), batch["labels"]


def _estimate(model, features, labels, method, sampler, **kwargs):
    leaf = features.detach().clone().requires_grad_(True)
    estimate = hessian_diagonal(model, _loss, {"features": leaf, "labels": labels}, num_probes=3, method=method,
                                params=[leaf], output_fn=_outputs, likelihood="cross_entropy", weighting="equal",
                                sampler=sampler, **kwargs)
    return estimate.value[0], estimate.stderr[0]


@pytest.mark.parametrize("method", METHODS)
def test_block_probes_give_each_sample_of_a_batch_the_estimate_it_gets_alone(method):
    """Cross-entropy puts the GGN's factors in output space ([B·T, K] rows): blocks there must be samples too."""
    model = _PerTokenClassifier()
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(3, 4, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 4), generator=generator)
    seeds = [11, 12, 13]
    value, stderr = _estimate(model, features, labels, method, BlockSampler(_generators(seeds)))
    samples = features.shape[0]  # the batch loss is the mean of the samples' losses: its curvature is 1/B of theirs
    for row, seed in enumerate(seeds):
        alone, alone_stderr = _estimate(model, features[row:row + 1], labels[row:row + 1], method,
                                        BlockSampler(_generators([seed])))
        torch.testing.assert_close(samples * value[row], alone[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(samples * stderr[row], alone_stderr[0], rtol=1e-12, atol=1e-14)
    assert (stderr > 0).any(), "the estimate should be noisy here, or the test proves nothing"
    reseeded, _ = _estimate(model, features, labels, method, BlockSampler(_generators([11, 12, 99])))
    assert torch.equal(reseeded[:2], value[:2]) and not torch.allclose(reseeded[2], value[2])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampling", ["rademacher", "labels"])
def test_a_generator_sampler_is_bitwise_the_default_seeded_stream(method, sampling):
    model = _PerTokenClassifier()
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 4), generator=generator)
    seeded = _estimate(model, features, labels, method, None, seed=4, sampling=sampling)
    sampled = _estimate(model, features, labels, method, GeneratorSampler(torch.Generator().manual_seed(4)),
                        sampling=sampling)
    assert all(torch.equal(a, b) for a, b in zip(seeded, sampled, strict=True))


def test_sampled_labels_need_one_generator_not_blocks():
    model = _PerTokenClassifier()
    features, labels = torch.randn(2, 4, 3, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="sampling='labels' draws cross_entropy labels from one generator.*"
                                         "BlockSampler.*use sampling='rademacher'"):
        _estimate(model, features, labels, "ggn", BlockSampler(_generators([0, 1])), sampling="labels")


def test_a_generator_and_a_sampler_together_are_refused():
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="pass generator or sampler, not both"):
        hutchinson_diagonal(op, 2, torch.Generator(), sampler=BlockSampler(_generators([0, 1])))


def test_block_probes_keep_the_hutchinson_diagonal_unbiased_and_its_stderr_calibrated():
    """Two 5x5 blocks with strong off-diagonal mass: the estimate must sit within a few standard errors of the
    exact diagonal, and the stderr must be the spread of independent runs (per-block probes stay i.i.d.)."""
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(5, 5, generator=generator, dtype=torch.float64) for _ in range(2)]
    matrix = torch.block_diag(*[b + b.T for b in blocks])
    op = MatrixOperator(matrix)
    runs = [hutchinson_diagonal(op, 50, sampler=BlockSampler(_generators([2 * run, 2 * run + 1])))
            for run in range(200)]
    values = torch.stack([run.value for run in runs])
    stderr = torch.stack([run.stderr for run in runs]).mean(dim=0)
    assert ((values[0] - matrix.diagonal()).abs() <= 5 * runs[0].stderr).all()
    ratio = values.std(dim=0) / stderr  # 200 runs: ~5 % sampling error on each coordinate's spread
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio


def test_the_hutchinson_diagonal_honours_the_batch_weighting():
    """weighting='equal' over two batches of 1 and 3 samples: with the same weight-space probes the estimate is the
    plain mean of the two batches' estimates (the default 'auto' would weight them 1:3 by their labelled tokens)."""
    model = _PerTokenClassifier()
    generator = torch.Generator().manual_seed(7)
    batches = [{"features": torch.randn(size, 4, 3, generator=generator, dtype=torch.float64),
                "labels": torch.randint(0, 4, (size, 4), generator=generator)} for size in (1, 3)]

    def diagonal(data):
        return hessian_diagonal(model, _loss, data, num_probes=2, method="hutchinson", weighting="equal",
                                seed=3).value

    both, first, second = diagonal(batches), diagonal(batches[0]), diagonal(batches[1])
    for whole, a, b in zip(both, first, second, strict=True):
        torch.testing.assert_close(whole, (a + b) / 2, rtol=1e-10, atol=1e-12)
