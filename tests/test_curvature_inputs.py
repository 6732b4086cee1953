"""What the curvature probes accept as data and params, and the errors that name a bad argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from arrcoc_sam.curvature import (
    average_sharpness,
    curvature_operator,
    exact_hessian,
    hessian_diagonal,
    hessian_trace,
    sam_sharpness,
    top_eigenvalues,
)


def _linear_mse():
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    return model, x, y


def _mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def test_a_list_of_tensors_is_one_batch_bitwise_like_the_tuple_and_a_list_of_pairs_is_several():
    """[x, y] (what a DataLoader over a TensorDataset yields) was read as two batches, x and y: the Hessian was
    off by 151% relative and sam_sharpness gave 0.0594 for 0.0728."""
    model, x, y = _linear_mse()
    from_loader = next(iter(DataLoader(TensorDataset(x, y), batch_size=10)))
    assert isinstance(from_loader, list)
    assert len(curvature_operator(model, _mse, from_loader).batches) == 1
    assert torch.equal(exact_hessian(model, _mse, from_loader), exact_hessian(model, _mse, (x, y)))
    assert sam_sharpness(model, _mse, [x, y], steps=2) == sam_sharpness(model, _mse, (x, y), steps=2)
    listed, tupled = (top_eigenvalues(model, _mse, batch, k=2) for batch in ([x, y], (x, y)))
    assert torch.equal(listed.values, tupled.values)
    whole = exact_hessian(model, _mse, (x, y))  # while a list of tuples or lists stays a list of weighted batches
    for batches in ([(x[:7], y[:7]), (x[7:], y[7:])], [[x[:7], y[:7]], [x[7:], y[7:]]]):
        op = curvature_operator(model, _mse, batches)
        assert len(op.batches) == 2 and op.weights == pytest.approx([0.7, 0.3], rel=1e-15)
        torch.testing.assert_close(exact_hessian(model, _mse, batches), whole, atol=1e-14, rtol=0)
    several_tensor_batches = iter([x[:7], x[7:]])
    assert len(curvature_operator(model, lambda m, b: m(b).square().mean(), several_tensor_batches).batches) == 2


def test_the_same_tensor_twice_in_params_is_refused_naming_its_positions():
    """Tied weights listed twice doubled the trace and λ_max and changed the SAM sharpness, silently."""
    model, x, y = _linear_mse()
    params = [model.weight, model.bias, model.weight]
    message = r"params holds the same tensor more than once \(params\[0\] and params\[2\]\)"
    probes = [
        lambda: exact_hessian(model, _mse, (x, y), params),
        lambda: top_eigenvalues(model, _mse, (x, y), params=params),
        lambda: hessian_trace(model, _mse, (x, y), params=params),
        lambda: hessian_diagonal(model, _mse, (x, y), params=params, method="ggn", likelihood="mse"),
        lambda: sam_sharpness(model, _mse, (x, y), params=params),
        lambda: average_sharpness(model, _mse, (x, y), params=params),
    ]
    for probe in probes:
        with pytest.raises(ValueError, match=message):
            probe()


def test_a_detached_loss_or_output_names_loss_fn_or_output_fn():
    """Was autograd's bare 'element 0 of tensors does not require grad and does not have a grad_fn'."""
    model, x, y = _linear_mse()
    with pytest.raises(ValueError, match="loss_fn returned a loss that does not require grad"):
        exact_hessian(model, lambda m, b: _mse(m, b).detach(), (x, y))
    with pytest.raises(ValueError, match="loss_fn returned a loss that does not require grad"):
        sam_sharpness(model, lambda m, b: torch.tensor(_mse(m, b).item()), (x, y))
    with pytest.raises(ValueError, match="output_fn returned outputs that do not require grad"):
        hessian_diagonal(model, None, (x, y), method="ggn", likelihood="mse",
                         output_fn=lambda m, b: (m(b[0]).detach(), b[1]))


def test_a_0_dim_tensor_batch_is_refused_with_a_hint_instead_of_an_index_error():
    model, x, _ = _linear_mse()

    def loss(m, scale):
        return m(x).square().mean() * scale

    with pytest.raises(ValueError, match=r"batch 0 is a 0-dim tensor, but weighting by examples .*weighting='equal'"):
        hessian_trace(model, loss, torch.tensor(2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batch 1\['scale'\] is a 0-dim tensor"):
        exact_hessian(model, lambda m, b: loss(m, b["scale"]), [{"scale": torch.ones(1)}, {"scale": torch.tensor(1.0)}])
    assert hessian_trace(model, loss, torch.tensor(2.0, dtype=torch.float64), weighting="equal").value > 0


def test_an_integer_param_is_refused_naming_its_dtype():
    model, x, y = _linear_mse()
    with pytest.raises(TypeError, match=r"params\[1\] must be a floating-point tensor, got dtype torch.int64"):
        exact_hessian(model, _mse, (x, y), [model.weight, torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("value", [2.5, True, 4.0])
def test_non_integer_counts_are_refused_naming_the_argument_and_value(value):
    """num_probes=2.5 / steps=2.5 raised 'float object cannot be interpreted as an integer'; True was taken as 1."""
    model, x, y = _linear_mse()
    shown = rf"got {value!r} \({type(value).__name__}\)"
    cases = {
        "num_probes": lambda: hessian_trace(model, _mse, (x, y), num_probes=value),
        "steps": lambda: sam_sharpness(model, _mse, (x, y), steps=value),
        "num_samples": lambda: average_sharpness(model, _mse, (x, y), num_samples=value),
        "k": lambda: top_eigenvalues(model, _mse, (x, y), k=value),
        "max_iter": lambda: top_eigenvalues(model, _mse, (x, y), method="power", max_iter=value),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError, match=rf"{name} must be an integer, {shown}"):
            call()


def _classification_hessian(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0):
    """Reference: ∇² of the mean cross-entropy of ``(x @ Wᵀ + b) / temperature`` over every labelled row of one big
    batch, w.r.t. the flat (W, b), by ``torch.autograd.functional.hessian`` (no batching or weighting code)."""
    out, inp = model.weight.shape

    def loss(flat):
        weight, bias = flat[: out * inp].view(out, inp), flat[out * inp:]
        return F.cross_entropy((x @ weight.T + bias) / temperature, y)

    flat = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    return torch.autograd.functional.hessian(loss, flat)


def _classifier_and_rows(rows: int):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 3, generator=generator, dtype=torch.float64)
    return nn.Linear(3, 4).double(), x, torch.randint(0, 4, (rows,), generator=generator)


def test_examples_weighting_counts_a_dict_batch_by_its_labels_not_its_first_tensor():
    """'examples' reads the leading dimension of ``labels`` when a dict batch has them; the first tensor here is a
    shared [1] temperature, so the 6- and 2-example batches would weigh 1:1 instead of 3:1."""
    model, x, y = _classifier_and_rows(8)
    temperature = torch.tensor([2.0], dtype=torch.float64)
    batches = [{"temperature": temperature, "x": x[:6], "labels": y[:6]},
               {"temperature": temperature, "x": x[6:], "labels": y[6:]}]

    def loss(m, batch):
        return F.cross_entropy(m(batch["x"]) / batch["temperature"], batch["labels"])

    expected = _classification_hessian(model, x, y, temperature=2.0)
    torch.testing.assert_close(exact_hessian(model, loss, batches, weighting="examples"), expected, atol=1e-12, rtol=0)


def test_a_batch_without_labelled_tokens_weighs_zero_and_is_never_evaluated():
    """Its mean loss over no labelled token is 0/0 = NaN; evaluated and weighted by 0 it still made L(w), hence
    every sharpness, NaN (0 · NaN). The curvature and the first-order SAM sharpness ρ‖g‖ + ... are those of the
    labelled batch alone, the latter by hand: L(w + ρ g/‖g‖) − L(w)."""
    model, x, y = _classifier_and_rows(8)
    unlabelled = torch.full((3,), -100)
    batches = [{"x": x[:5], "labels": y[:5]}, {"x": x[5:], "labels": unlabelled}]

    def loss(m, batch):
        return F.cross_entropy(m(batch["x"]), batch["labels"])  # mean over the labels that are not -100

    assert torch.isnan(loss(model, batches[1]))
    expected = _classification_hessian(model, x[:5], y[:5])
    for weighting in ("auto", "tokens"):
        torch.testing.assert_close(exact_hessian(model, loss, batches, weighting=weighting), expected, atol=1e-12, rtol=0)
    assert math.isfinite(hessian_trace(model, loss, batches, num_probes=4).value)
    rho, clean = 0.05, loss(model, batches[0])
    gradient = torch.autograd.grad(clean, [model.weight, model.bias])
    step = [rho * g / torch.sqrt(sum(h.square().sum() for h in gradient)) for g in gradient]
    with torch.no_grad():
        ascended = F.cross_entropy(x[:5] @ (model.weight + step[0]).T + model.bias + step[1], y[:5])
    assert sam_sharpness(model, loss, batches, rho=rho) == pytest.approx(float(ascended - clean.detach()), rel=1e-10)


def test_batches_without_any_labelled_token_are_refused_by_name_not_divided_by_zero():
    model = nn.Linear(3, 2).double()
    batch = {"x": torch.randn(2, 3, dtype=torch.float64), "labels": torch.full((2,), -100)}
    with pytest.raises(ValueError, match=r"batch weights sum to 0.0 with weighting='tokens'"):
        curvature_operator(model, lambda m, b: m(b["x"]).sum(), [batch, batch], weighting="tokens")


def test_an_empty_list_of_batches_is_refused_as_holding_no_batches():
    model = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="data holds no batches"):
        curvature_operator(model, lambda m, b: m(b[0]).sum(), [])


def test_examples_weighting_counts_the_leading_dimension_not_the_elements_of_padded_batches():
    """Batches padded to their own length ([2, 5] and [4, 3] token ids) hold 2 and 4 examples: weights 1/3, 2/3."""
    from arrcoc_sam.curvature._data import batch_weights

    batches = [{"input_ids": torch.zeros(2, 5, dtype=torch.long)}, {"input_ids": torch.zeros(4, 3, dtype=torch.long)}]
    assert batch_weights(batches, "examples") == pytest.approx([1 / 3, 2 / 3], rel=1e-15)


def test_default_outputs_pass_the_labels_to_a_forward_that_takes_kwargs():
    """A forward(input_ids, **kwargs) may build decoder inputs from the labels, as its loss does."""
    from arrcoc_sam.curvature._data import default_outputs

    seen = {}

    class Model(nn.Module):
        def forward(self, input_ids, **kwargs):
            seen.update(kwargs)
            return {"logits": input_ids.double()}

    batch = {"input_ids": torch.ones(2, 3), "labels": torch.tensor([0, 1])}
    outputs, targets = default_outputs(Model(), batch)
    assert set(seen) == {"labels"} and torch.equal(seen["labels"], batch["labels"]) and targets is batch["labels"]


def test_probing_inputs_restores_the_grads_of_the_model_parameters_that_loss_fn_cleared():
    """probe_context restores the .grad of every parameter of the model, not only of the probed tensors."""
    model, x, y = _linear_mse()
    grads = [torch.full_like(p, 3.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    features = x.clone().requires_grad_(True)

    def loss_fn(m, batch):
        m.zero_grad(set_to_none=True)  # user code touching the model's grads inside the probe
        return F.mse_loss(m(features), y)

    hessian_trace(model, loss_fn, (x, y), num_probes=2, params=[features])
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))


def test_probes_restore_each_submodules_own_train_flag():
    """A root in train mode with one submodule frozen in eval mode (e.g. a frozen dropout or norm) is left so."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 3)).double().train()
    model[1].eval()
    x, y = _linear_mse()[1:]
    hessian_trace(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), num_probes=2)
    assert [m.training for m in model.modules()] == [True, True, False, True]
