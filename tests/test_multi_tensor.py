"""The multi-tensor helpers of the engine: exact results, and a per-step op count that does not grow with the
number of parameter tensors (each dispatched op is a kernel launch on a GPU, so this is what keeps a SAM step
close to two forward+backward passes on models with many small tensors)."""

from __future__ import annotations

import pytest
import torch
from op_counting import OpCounter
from torch import nn

from arrcoc_sam.sam import perturbation
from arrcoc_sam.sam.optimizer import SAM
from arrcoc_sam.sam.variants import ESAM


def tensors(count: int, seed: int, dtype=torch.float32, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3 + i % 5, 2 + i % 3) if i % 2 else (7 + i % 4,) for i in range(count)]
    return [(scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype) for shape in shapes]


def exact_dot(a, b) -> float:
    return sum(float(torch.dot(x.double().reshape(-1), y.double().reshape(-1))) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("path", ["per_tensor", "flat"])
def test_dot_paths_match_float64_reference(path, dtype):
    a, b = tensors(40, 0, dtype), tensors(40, 1, dtype)
    b[3] = -b[3] * 50  # mixed signs and magnitudes
    fn = perturbation._dot_per_tensor if path == "per_tensor" else perturbation._dot_flat
    got = fn(a, b)
    assert got.dtype == perturbation.accumulation_dtype(dtype)
    scale = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    assert abs(float(got) - exact_dot(a, b)) <= tol * scale


def test_flat_dot_handles_tensors_larger_than_a_chunk_and_several_chunks(monkeypatch):
    monkeypatch.setattr(perturbation, "CHUNK_NUMEL", 64)
    a, b = tensors(30, 2), tensors(30, 3)
    a.insert(7, torch.randn(500, dtype=torch.float32))  # above the cap: a chunk of its own, read as a view
    b.insert(7, torch.randn(500, dtype=torch.float32))
    a.append(torch.randn(20, 30, dtype=torch.float32).t())  # non-contiguous
    b.append(torch.randn(30, 20, dtype=torch.float32))
    scale = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    assert abs(float(perturbation._dot_flat(a, b)) - exact_dot(a, b)) <= 1e-6 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reductions", ["flat", "split_by_size", "per_tensor"])
def test_reductions_match_float64_reference(request, monkeypatch, dtype, reductions):
    """Norms, dot products and ASAM's ‖T g‖ equal float64 sums over flattened chunks (the accelerator path),
    one tensor at a time, and split by size (the CPU default: here tensors of ≤ 20 elements are flattened),
    across chunk boundaries, a tensor larger than a chunk, non-contiguous tensors and mixed settings."""
    if reductions == "split_by_size":
        monkeypatch.setattr(perturbation, "_flatten_limit", lambda device: 20)
    else:
        request.getfixturevalue(f"{reductions}_reductions")
    monkeypatch.setattr(perturbation, "CHUNK_NUMEL", 100)
    a, b = tensors(25, 10, dtype), tensors(25, 11, dtype)
    a[4], b[4] = (torch.randn(300, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (1, 2))
    a[9], b[9] = a[9].t(), b[9].t()  # non-contiguous pair (same shape)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    exact_a = sum(float(x.double().square().sum()) for x in a)
    exact_b = sum(float(y.double().square().sum()) for y in b)

    assert float(perturbation.squared_norm(a)) == pytest.approx(exact_a, rel=tol)
    got = perturbation.dot_and_squared_norms(a, b).double()
    scale = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    assert abs(float(got[0]) - exact_dot(a, b)) <= tol * scale
    assert got[1:].tolist() == pytest.approx([exact_a, exact_b], rel=tol)

    adaptive = [i % 3 != 0 for i in range(len(a))]
    eta = [0.02] * len(a)
    expected = sum(
        float((((w.double().abs() + 0.02) if on else torch.ones_like(w.double())) * g.double()).square().sum())
        for w, g, on in zip(a, b, adaptive)
    )
    got_norm = perturbation.ascent_norm(a, b, adaptive, eta)
    assert float(got_norm) ** 2 == pytest.approx(expected, rel=tol)


def test_chunks_are_consecutive_single_kind_slices_within_the_size_cap(monkeypatch):
    monkeypatch.setattr(perturbation, "CHUNK_NUMEL", 40)
    first = tensors(6, 0) + tensors(2, 1, torch.float64) + [torch.randn(100)] + tensors(5, 2)
    second = [torch.full_like(t, float(i)) for i, t in enumerate(first)]  # a parallel list, same order
    sliced = list(perturbation.chunks(first, second))

    assert [t for chunk, _ in sliced for t in chunk] == first  # identity, in order, nothing dropped
    assert [t for _, chunk in sliced for t in chunk] == second
    for chunk, parallel in sliced:
        assert len({(t.device, t.dtype) for t in chunk}) == 1
        assert len(chunk) == 1 or sum(t.numel() for t in chunk) <= 40
        assert len(parallel) == len(chunk)
    assert any(len(chunk) == 1 and chunk[0].numel() == 100 for chunk, _ in sliced)  # larger than the cap: alone
    assert list(perturbation.chunks([], [])) == []


def test_dot_sums_over_mixed_dtypes_in_the_widest():
    a = tensors(6, 4, torch.float32) + tensors(4, 5, torch.float64)
    b = tensors(6, 6, torch.float32) + tensors(4, 7, torch.float64)
    got = perturbation.dot(a, b)
    assert got.dtype == torch.float64
    assert abs(float(got) - exact_dot(a, b)) <= 1e-5


@pytest.mark.parametrize("foreach_clone", [True, False], ids=["foreach_clone", "foreach_mul_fallback"])
def test_clone_all_makes_bitwise_copies_in_new_memory(monkeypatch, foreach_clone):
    if not foreach_clone:
        monkeypatch.setattr(perturbation, "_FOREACH_CLONE", None)
    source = tensors(9, 8) + tensors(3, 9, torch.bfloat16) + [torch.tensor([-0.0, float("inf"), 1e-45])]
    copies = perturbation.clone_all(source)
    for original, copy in zip(source, copies, strict=True):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy.view(torch.uint8), original.view(torch.uint8))  # bitwise, -0.0 included
        assert copy.data_ptr() != original.data_ptr()
    assert perturbation.clone_all([]) == []


def stack_model(tensor_pairs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(tensor_pairs)])


def ops_of_perturb_restore(opt_cls, tensor_pairs: int, **kwargs) -> OpCounter:
    model = stack_model(tensor_pairs)
    opt = opt_cls(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    opt.track_stats = False
    model(torch.randn(3, 4)).square().mean().backward()
    with OpCounter() as counter:
        assert opt.perturb()
        opt.restore()
    return counter


@pytest.mark.parametrize("opt_cls, kwargs", [(SAM, {}), (SAM, {"adaptive": True}), (ESAM, {"beta": 0.5})],
                         ids=["sam", "asam", "esam-swp"])
def test_perturb_and_restore_launch_a_constant_number_of_kernels(opt_cls, kwargs):
    few, many = (ops_of_perturb_restore(opt_cls, n, **kwargs) for n in (2, 40))
    assert few.launches() == many.launches(), dict(many.counts - few.counts)


@pytest.mark.usefixtures("flat_reductions")
@pytest.mark.parametrize("opt_cls", [SAM, ESAM])
def test_pass_two_statistics_take_a_constant_number_of_ops_off_cpu(opt_cls):
    """The accelerator path of the statistics (forced here on CPU tensors) does not loop over tensors."""

    def counts(pairs: int) -> OpCounter:
        model = stack_model(pairs)
        opt = opt_cls(model.parameters(), torch.optim.SGD, lr=0.1)
        model(torch.randn(3, 4)).square().mean().backward()
        assert opt.perturb()
        model(torch.randn(3, 4)).square().mean().backward()
        with OpCounter() as counter:
            opt.restore()
        assert torch.isfinite(opt.stats["grad_cosine"])
        return counter

    few, many = counts(5), counts(40)  # ESAM's tensors outside S: several in both (one alone is read as a view)
    assert few.launches() == many.launches(), dict(many.counts - few.counts)


def test_flat_dot_launches_a_constant_number_of_kernels():
    def launches(count: int) -> int:
        a, b = tensors(count, 0), tensors(count, 1)
        with OpCounter() as counter:
            perturbation._dot_flat(a, b)
        return counter.launches()

    assert launches(3) == launches(60)


def test_esam_masks_follow_parameter_order_across_dtype_runs_and_keep_unmasked_coordinates_exact(monkeypatch):
    monkeypatch.setattr(perturbation, "CHUNK_NUMEL", 50)  # several runs per dtype as well
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float64, torch.float64]
    params = [torch.randn(4 + 3 * i, 5, generator=gen, dtype=torch.float64).to(d).requires_grad_()
              for i, d in enumerate(dtypes)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    clean = [p.detach().clone() for p in params]
    beta, rho, seed = 0.4, 0.05, 3
    opt = ESAM(params, torch.optim.SGD, lr=0.1, rho=rho, beta=beta, gamma=1.0, seed=seed, swp="coordinate")
    assert opt.perturb()
    masks_gen = torch.Generator().manual_seed(seed * 1_000_003 + 0)
    masks = [torch.rand(p.shape, generator=masks_gen) < beta for p in params]  # one draw per tensor, in order
    norm = torch.cat([p.grad.double().reshape(-1) for p in params]).norm()
    for p, w, m in zip(params, clean, masks, strict=True):
        expected = w.double() + (rho / beta) * p.grad.double() / norm
        assert torch.equal(p.detach()[~m], w[~m])  # outside the mask: the clean weight, bitwise
        torch.testing.assert_close(p.detach()[m].double(), expected[m], rtol=1e-6, atol=1e-7)
    opt.restore()
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, clean, strict=True))


# -- mutation round 26 (engine core): each test below failed on a surviving mutant ------------------------------
def test_public_ascent_functions_pair_each_gradient_with_its_tensor_across_interleaved_dtypes():
    """ascent_norm/apply_ascent_ split interleaved float32/float64 lists by dtype; each tensor keeps its own
    gradient (the cached plans of SAM.perturb re-slice gradients themselves, so only these public functions show it)."""
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64]
    params = [torch.randn(5, generator=gen, dtype=torch.float64).to(d) for d in dtypes]
    grads = [torch.randn(5, generator=gen, dtype=torch.float64).to(d) for d in dtypes]
    adaptive, eta = [True, False, False, True], [0.1, 0.0, 0.0, 0.2]
    scaled = [g.double() * ((p.double().abs() + e) if a else 1.0) for p, g, a, e in zip(params, grads, adaptive, eta)]
    expected = torch.sqrt(sum((s * s).sum() for s in scaled))
    norm = perturbation.ascent_norm(params, grads, adaptive, eta)
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(expected.item(), rel=1e-6)
    clean = [p.clone() for p in params]
    steps = [0.5, 0.25, 0.125, 1.0]
    perturbation.apply_ascent_(params, grads, steps, adaptive, eta)
    for p, c, g, s, a, e in zip(params, clean, grads, steps, adaptive, eta):
        t = (c.double().abs() + e) if a else torch.ones_like(c, dtype=torch.float64)
        torch.testing.assert_close(p.double() - c.double(), s * t * t * g.double(), rtol=1e-5, atol=1e-6)


def test_lists_torch_cannot_group_are_split_by_dtype_in_python(monkeypatch):
    """Lists torch's grouping refuses go through the Python grouping: split by the first list's (device, dtype),
    the order kept, the other lists following along whatever their dtypes."""

    def refuse(*args, **kwargs):
        raise RuntimeError("not groupable here")

    monkeypatch.setattr(perturbation, "_group_tensors_by_device_and_dtype", refuse)
    a = [torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.ones(2)]
    b = [torch.zeros(2, dtype=torch.float64), torch.zeros(2), torch.ones(2, dtype=torch.float64)]
    groups = perturbation.group_by_device_and_dtype(a, b)
    found = sorted(([str(t.dtype) for t in ga], [id(t) for t in gb]) for ga, gb in groups)
    assert found == [(["torch.float32", "torch.float32"], [id(b[0]), id(b[2])]), (["torch.float64"], [id(b[1])])]


def test_the_sum_of_squares_of_a_float32_group_then_a_float64_group_is_float64():
    """The accumulation dtype is the widest over every group, not the first group's."""
    gen = torch.Generator().manual_seed(5)
    small = [torch.randn(6, generator=gen)]
    wide = [(1.0 + 1e-12 * torch.arange(6, dtype=torch.float64))]
    settings = [{"rho": 0.1, "adaptive": False, "eta": 0.0}, {"rho": 0.2, "adaptive": False, "eta": 0.0}]
    groups = perturbation.ascent_groups(small + wide, small + wide, settings)  # one group per setting, in order
    assert [g.params[0].dtype for g in groups] == [torch.float32, torch.float64]
    total = perturbation.groups_sum_of_squares(groups)
    expected = (small[0].double() ** 2).sum() + (wide[0] ** 2).sum()
    assert total.dtype == torch.float64 and total.item() == pytest.approx(expected.item(), rel=1e-14)


def test_the_float64_recomputed_norm_forms_asam_scaling_in_float64():
    """T = |w| + η is formed in float64 for float32 weights: w = 1, η = 1.5·2⁻²⁴ is not a float32 sum."""
    eta = 1.5 * 2.0**-24
    weight, grad = torch.ones(3), torch.full((3,), 2.0)
    group = perturbation.ascent_groups([weight], [grad], [{"rho": 0.1, "adaptive": True, "eta": eta}])
    assert perturbation.norm_in_float64(group) == pytest.approx(2.0 * (1.0 + eta) * 3**0.5, rel=1e-15)
