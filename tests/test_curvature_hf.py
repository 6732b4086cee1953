"""Curvature probes on a tiny HF BERT with dict batches: methods agree, the model is left exactly as found."""

from __future__ import annotations

import pytest
import torch

from arrcoc_sam.curvature import (
    adaptive_sharpness,
    average_sharpness,
    exact_hessian,
    hessian_diagonal,
    hessian_trace,
    hessian_vector_product,
    sam_sharpness,
    top_eigenvalues,
)

transformers = pytest.importorskip("transformers")



def _tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3,
    )
    return transformers.BertForTokenClassification(config)


def _batches():
    generator = torch.Generator().manual_seed(1)
    batches = []
    for size in (3, 2):
        labels = torch.randint(0, 3, (size, 6), generator=generator)
        labels[:, 0] = -100
        batches.append({
            "input_ids": torch.randint(0, 50, (size, 6), generator=generator),
            "attention_mask": torch.ones(size, 6, dtype=torch.long),
            "labels": labels,
        })
    return batches


def _snapshot(model):
    return (
        [(module, module.training) for module in model.modules()],
        {name: p.detach().clone() for name, p in model.named_parameters()},
        {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        torch.get_rng_state(),
        model.config._attn_implementation,
    )


def _assert_unchanged(model, snapshot, probe):
    modes, weights, grads, rng, attention = snapshot
    assert all(module.training == mode for module, mode in modes), probe
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), (probe, name)
        assert (p.grad is None and grads[name] is None) or torch.equal(p.grad, grads[name]), (probe, name)
    assert torch.equal(torch.get_rng_state(), rng), probe
    assert model.config._attn_implementation == attention, probe


@pytest.fixture(scope="module")
def trained_state_bert():
    model = _tiny_bert()
    model.train()
    model(**_batches()[0]).loss.backward()  # grads present, as mid-training
    model.classifier.bias.grad = None       # and one grad field left empty
    return model


def test_lanczos_and_power_iteration_agree_on_a_tiny_bert(trained_state_bert):
    model = trained_state_bert
    fast = top_eigenvalues(model, None, _batches(), method="lanczos", tol=1e-5)
    slow = top_eigenvalues(model, None, _batches(), method="power", tol=1e-5, max_iter=2000)
    assert fast.converged and slow.converged
    assert float(fast.values[0]) == pytest.approx(float(slow.values[0]), rel=1e-6)
    assert fast.num_matvecs < slow.num_matvecs


PROBES = {
    "hvp": lambda m: hessian_vector_product(m, None, _batches(), [torch.ones_like(p) for p in m.parameters()]),
    "lanczos": lambda m: top_eigenvalues(m, None, _batches(), k=2, tol=1e-2),
    "power": lambda m: top_eigenvalues(m, None, _batches(), method="power", tol=1e-2),
    "trace": lambda m: hessian_trace(m, None, _batches(), num_probes=4, method="hutch++"),
    "diag_ggn": lambda m: hessian_diagonal(m, None, _batches(), num_probes=2, method="ggn"),
    "diag_cv": lambda m: hessian_diagonal(m, None, _batches(), num_probes=2, method="hutchinson_cv"),
    "sam": lambda m: sam_sharpness(m, None, _batches(), rho=0.1, steps=2),
    "asam": lambda m: adaptive_sharpness(m, None, _batches(), rho=0.5),
    "average": lambda m: average_sharpness(m, None, _batches(), sigma=0.05, num_samples=2),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_every_probe_leaves_mode_weights_grads_rng_and_attention_as_found(trained_state_bert, probe):
    model = trained_state_bert
    snapshot = _snapshot(model)
    PROBES[probe](model)
    _assert_unchanged(model, snapshot, probe)


def test_attention_without_double_backward_is_switched_to_eager_for_the_probe_and_restored(trained_state_bert):
    model = trained_state_bert
    seen = []

    def loss_fn(m, batch):
        seen.append(m.config._attn_implementation)
        return m(**batch).loss

    original = model.config._attn_implementation
    model.config._attn_implementation = "flex_attention"
    try:
        sam_sharpness(model, loss_fn, _batches()[0])
        assert set(seen) == {"eager"}
        assert model.config._attn_implementation == "flex_attention"
    finally:
        model.config._attn_implementation = original


def test_causal_lm_batches_are_weighted_by_shifted_labels_like_one_padded_big_batch():
    """A causal LM's loss averages labels[..., 1:]: batches of 4x2 and 1x10 tokens predict 4 and 9 tokens."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double()
    params = [model.transformer.ln_f.weight, model.transformer.ln_f.bias]
    generator = torch.Generator().manual_seed(0)
    short, long = torch.randint(0, 11, (4, 2), generator=generator), torch.randint(0, 11, (1, 10), generator=generator)
    batches = [{"input_ids": ids, "labels": ids.clone()} for ids in (short, long)]
    ids = torch.cat([torch.cat([short, torch.zeros(4, 8, dtype=torch.long)], dim=1), long])
    mask = torch.ones_like(ids)
    mask[:4, 2:] = 0
    big = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    expected = exact_hessian(model, None, big, params=params)
    for weighting in ("auto", "shifted_tokens"):
        torch.testing.assert_close(exact_hessian(model, None, batches, params=params, weighting=weighting), expected,
                                   atol=1e-6 * float(expected.abs().max()), rtol=0)  # was off by 6 %
