"""Curvature probes on a tiny HF BERT with dict batches: methods agree, the model is left exactly as found."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from arrcoc_sam.curvature import (
    adaptive_sharpness,
    average_sharpness,
    curvature_operator,
    exact_hessian,
    hessian_diagonal,
    hessian_trace,
    hessian_vector_product,
    probe_context,
    sam_sharpness,
    top_eigenvalues,
)
from arrcoc_sam.curvature._data import batch_weights, shifts_labels

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


def _loss_drawing_from_the_global_rng(model, batch):
    """The model's loss after a draw from the global RNG, as a loss with random token masking makes: a probe
    that did not put the RNG state back would show it."""
    return model(**batch).loss + 0.0 * torch.rand(())


def _outputs_drawing_from_the_global_rng(model, batch):
    """The GGN's (logits, labels) after a draw from the global RNG."""
    return model(**batch).logits + 0.0 * torch.rand(()), batch["labels"]


_LOSS, _OUTPUTS = _loss_drawing_from_the_global_rng, _outputs_drawing_from_the_global_rng
PROBES = {
    "hvp": lambda m: hessian_vector_product(m, _LOSS, _batches(), [torch.ones_like(p) for p in m.parameters()]),
    "lanczos": lambda m: top_eigenvalues(m, _LOSS, _batches(), k=2, tol=1e-2),
    "power": lambda m: top_eigenvalues(m, _LOSS, _batches(), method="power", tol=1e-2),
    "trace": lambda m: hessian_trace(m, _LOSS, _batches(), num_probes=4, method="hutch++"),
    "diag_ggn": lambda m: hessian_diagonal(m, None, _batches(), num_probes=2, method="ggn", output_fn=_OUTPUTS),
    "diag_cv": lambda m: hessian_diagonal(m, _LOSS, _batches(), num_probes=2, method="hutchinson_cv",
                                          output_fn=_OUTPUTS),
    "sam": lambda m: sam_sharpness(m, _LOSS, _batches(), rho=0.1, steps=2),
    "asam": lambda m: adaptive_sharpness(m, _LOSS, _batches(), rho=0.5),
    "average": lambda m: average_sharpness(m, _LOSS, _batches(), sigma=0.05, num_samples=2),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_every_probe_leaves_mode_weights_grads_rng_and_attention_as_found(trained_state_bert, probe):
    """Each probe's loss (or GGN outputs) draws from the global RNG, so the RNG check can fail."""
    model = trained_state_bert
    snapshot = _snapshot(model)
    PROBES[probe](model)
    _assert_unchanged(model, snapshot, probe)


def test_attention_without_double_backward_is_switched_to_sdpa_for_the_probe_and_restored(trained_state_bert):
    model = trained_state_bert
    seen = []

    def loss_fn(m, batch):
        seen.append(m.config._attn_implementation)
        return m(**batch).loss

    original = model.config._attn_implementation
    model.config._attn_implementation = "flex_attention"
    try:
        sam_sharpness(model, loss_fn, _batches()[0])
        assert set(seen) == {"sdpa"}  # BERT supports SDPA: its math kernel is exact and has double backward
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


class _ConfiguredAttention(nn.Module):
    """A non-HF module holding an HF-style config (no ``_supports_sdpa``): the fallback must be eager."""

    def __init__(self) -> None:
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.config._attn_implementation = "flash_attention_2"
        self.linear = nn.Linear(3, 2)
        self.seen: list[str] = []

    def forward(self, x):
        self.seen.append(self.config._attn_implementation)
        return self.linear(x)


def test_attention_fallback_is_eager_for_a_model_that_does_not_declare_sdpa_support():
    model = _ConfiguredAttention()
    sam_sharpness(model, lambda m, b: m(b).square().mean(), torch.randn(4, 3))
    assert set(model.seen) == {"eager"} and model.config._attn_implementation == "flash_attention_2"


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=16, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: fully masked query rows
    return model, {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_flash_attention_fallback_gives_the_finite_sdpa_hessian_on_a_left_padded_fp64_llama():
    """Eager HF attention upcasts the softmax to float32: the old eager fallback gave NaN Hessians here."""
    model, batch = _tiny_llama()
    params = [model.model.norm.weight, model.model.layers[0].post_attention_layernorm.weight]
    model.config._attn_implementation = "sdpa"
    expected = exact_hessian(model, None, batch, params=params)
    model.config._attn_implementation = "flash_attention_2"
    fallback = exact_hessian(model, None, batch, params=params)
    assert model.config._attn_implementation == "flash_attention_2"
    assert bool(expected.isfinite().all()) and float(expected.abs().max()) > 0
    torch.testing.assert_close(fallback, expected, atol=1e-14, rtol=0)


def _reference_ggn(model, params, batch, likelihood, shift=False):
    """Jᵀ Λ J of the head's logits w.r.t. ``params`` from torch.autograd.functional.jacobian (dense formulas)."""
    reference = copy.deepcopy(model).eval()
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    fixed = {n: p.detach() for n, p in reference.named_parameters()}

    def selected(flat):
        values = dict(fixed)
        values.update({n: c.view(s) for n, c, s in zip(chosen, flat.split([s.numel() for s in shapes]), shapes, strict=True)})
        logits, labels = functional_call(reference, values, args=(), kwargs=batch).logits, batch["labels"]
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        if likelihood != "cross_entropy":
            return logits.reshape(-1)
        return logits.reshape(-1, logits.shape[-1])[labels.reshape(-1) != -100]

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    outputs = selected(flat).detach()
    jacobian = torch.autograd.functional.jacobian(selected, flat)
    if likelihood == "mse":
        return 2 * jacobian.T @ jacobian / outputs.numel()
    if likelihood == "bce":
        prob = outputs.sigmoid()
        return jacobian.T @ (jacobian * (prob * (1 - prob))[:, None]) / outputs.numel()
    probs = outputs.softmax(-1)
    rows = [jacobian[r].T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian[r] for r, p in enumerate(probs)]
    return sum(rows) / outputs.shape[0]


def _sequence_head(num_labels, problem_type):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=num_labels, problem_type=problem_type,
    )
    model = transformers.BertForSequenceClassification(config).double()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (4, 5), generator=generator)
    if num_labels == 1:
        labels = torch.randn(4, generator=generator, dtype=torch.float64)
    else:
        labels = torch.randint(0, 2, (4, num_labels), generator=generator).double()
    return model, {"input_ids": ids, "labels": labels}, [model.classifier.weight, model.classifier.bias, model.bert.pooler.dense.bias]


def _dense_ggn(model, batch, params, **kwargs):
    op = curvature_operator(model, None, batch, params, curvature="ggn", **kwargs)
    with probe_context(model, op.params):
        return op.to_dense()


@pytest.mark.parametrize(("num_labels", "problem_type", "likelihood"), [
    (1, "regression", "mse"), (1, None, "mse"), (3, "multi_label_classification", "bce"),
])
def test_default_ggn_likelihood_follows_the_heads_problem_type(num_labels, problem_type, likelihood):
    """Was cross-entropy for every head: an exactly-zero GGN for regression, a size error for multi-label."""
    model, batch, params = _sequence_head(num_labels, problem_type)
    expected = _reference_ggn(model, params, batch, likelihood)
    assert float(expected.trace()) > 0
    torch.testing.assert_close(_dense_ggn(model, batch, params), expected, atol=1e-12, rtol=0)
    diagonal = hessian_diagonal(model, None, batch, num_probes=2, method="ggn", params=params)
    assert all(bool((d >= 0).all()) for d in diagonal.value) and sum(float(d.sum()) for d in diagonal.value) > 0


def test_cross_entropy_on_a_single_logit_or_mismatched_labels_is_refused_with_a_hint():
    model, batch, params = _sequence_head(1, "regression")
    with pytest.raises(ValueError, match=r"one column.*likelihood='mse'"):
        _dense_ggn(model, batch, params, likelihood="cross_entropy")
    model, batch, params = _sequence_head(3, "multi_label_classification")
    with pytest.raises(ValueError, match=r"12 labels for 4 rows.*likelihood='bce'"):
        _dense_ggn(model, batch, params, likelihood="cross_entropy")


def _tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).double()
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_default_ggn_of_a_causal_lm_pairs_logits_with_the_next_token_labels(name):
    """Was unshifted (position t against label t): up to ~11 % off on these models."""
    model, batch = _tiny_gpt2() if name == "gpt2" else _tiny_llama()
    params = [model.transformer.ln_f.weight] if name == "gpt2" else [model.model.norm.weight]
    expected = _reference_ggn(model, params, batch, "cross_entropy", shift=True)
    torch.testing.assert_close(_dense_ggn(model, batch, params), expected, atol=1e-12, rtol=0)


def test_default_ggn_of_t5_builds_decoder_inputs_from_the_labels():
    """Dropping the labels left T5 without decoder inputs: the default GGN raised."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).double()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(1, 20, (2, 4), generator=generator)
    labels[1, 3:] = -100
    batch = {"input_ids": torch.randint(1, 20, (2, 5), generator=generator), "labels": labels}
    params = [model.decoder.final_layer_norm.weight, model.encoder.final_layer_norm.weight]
    expected = _reference_ggn(model, params, batch, "cross_entropy")
    # T5LayerNorm computes its variance in float32 even in a float64 model: agreement to float32 rounding
    torch.testing.assert_close(_dense_ggn(model, batch, params), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


class _DataParallelLike(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_wrapped_causal_lms_are_recognised_and_weighted_by_shifted_labels():
    """PEFT without task_type, torch.compile and DDP-style wrappers hid GPT-2's label shift (weighted 4:12, not 3:10)."""
    peft = pytest.importorskip("peft")
    model, batch = _tiny_gpt2()
    parts = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    expected = batch_weights(parts, "shifted_tokens")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    wrapped = peft.get_peft_model(copy.deepcopy(model), lora).double()  # PEFT creates float32 adapters
    for wrapper in (wrapped, torch.compile(model), _DataParallelLike(model), _DataParallelLike(torch.compile(model))):
        assert shifts_labels(wrapper), type(wrapper).__name__
        assert batch_weights(parts, "auto", wrapper) == pytest.approx(expected, rel=1e-15), type(wrapper).__name__
    params = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    whole = exact_hessian(wrapped, None, batch, params=params)  # HF's causal-LM loss runs in float32: tolerance
    torch.testing.assert_close(exact_hessian(wrapped, None, parts, params=params), whole, atol=1e-5 * float(whole.abs().max()), rtol=0)
