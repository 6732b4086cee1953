"""AcceleratedSAM in a plain Accelerate loop: accumulation, GradScaler, refusals (one CPU process).

Its two-process checks run inside tests/test_trainer_ddp.py (one torchrun start-up for both integrations).
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from arrcoc_sam.integrations.accelerate import AcceleratedSAM

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from accelerate_common import LR, batches, flat, mse, reference_sam, regression_data, tiny_mlp  # noqa: E402


def _loop(accumulation: int, micro_size: int, steps: int, scaler: torch.amp.GradScaler | None = None, **sam_kwargs):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    accelerator.scaler = scaler
    model = tiny_mlp()
    loader = DataLoader(regression_data(micro_size * accumulation * steps), batch_size=micro_size)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, **sam_kwargs)
    return model, sam, _train_epoch(accelerator, model, optimizer, loader, sam)


def _train_epoch(accelerator, model, optimizer, loader, sam, loss_fn=mse, after_backward=None, set_to_none=True):
    """The README loop over ``loader``; ``after_backward(batch)`` runs after each ``sam.backward``. The losses."""
    losses = []
    for batch in loader:
        with accelerator.accumulate(model):
            losses.append(sam.backward(loss_fn, batch))
            if after_backward is not None:
                after_backward(batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
    return losses


def test_accumulated_loop_matches_full_batch_sam_reference():
    model, sam, losses = _loop(accumulation=2, micro_size=4, steps=3, method="sam", rho=0.1)
    reference = reference_sam(tiny_mlp(), batches(regression_data(24), 8), rho=0.1)
    assert (flat(model) - flat(reference)).abs().max() < 1e-6
    metrics = sam.metrics()
    assert metrics["sam/rho"] == pytest.approx(0.1)
    assert metrics["sam/skipped_steps"] == 0
    assert metrics["sam/sharpness"] > 0
    assert len(losses) == 6 and losses[0] == mse(tiny_mlp(), batches(regression_data(24), 4)[0]).detach()


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_perturbed_loss_figures_are_in_the_units_of_one_micro_batch_loss(accumulation):
    """At a vanishing radius the perturbed loss is the clean one: ``sam/loss_perturbed`` must equal the mean
    micro-batch loss the loop sees, whatever the accumulation (not the window's sum)."""
    _, sam, losses = _loop(accumulation=accumulation, micro_size=8 // accumulation, steps=1, method="sam", rho=1e-12)
    metrics = sam.metrics()
    assert metrics["sam/loss_perturbed"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
    assert abs(metrics["sam/sharpness"]) < 1e-6


def test_grad_scaler_path_matches_unscaled_loop():
    plain, _, _ = _loop(accumulation=2, micro_size=4, steps=3, method="sam", rho=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    scaled, _, _ = _loop(accumulation=2, micro_size=4, steps=3, scaler=scaler, method="sam", rho=0.1)
    assert (flat(plain) - flat(scaled)).abs().max() < 1e-6
    assert scaler.state_dict()["_growth_tracker"] == 3  # three unskipped scaled steps went through the scaler


def test_refuses_none_and_microbatch_without_accumulation():
    accelerator = Accelerator(cpu=True)
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="method='none' needs no AcceleratedSAM"):
        AcceleratedSAM(accelerator, model, optimizer, method="none")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        AcceleratedSAM(accelerator, model, optimizer, scope="microbatch")



@pytest.mark.parametrize("method", ["gsam", "looksam", "fsam"])
def test_refuses_microbatch_scope_for_methods_defined_on_the_window_gradient(method):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match=f"--optimizer {method} .* use sam_scope=global"):
        AcceleratedSAM(accelerator, model, optimizer, method=method, scope="microbatch")
    with pytest.raises(ValueError, match=f"--optimizer {method} \\(AcceleratedSAM's method=\\) .*sam_scope=per_device \\(AcceleratedSAM's scope=\\) leaves local to each rank"):
        AcceleratedSAM(accelerator, model, optimizer, method=method, scope="per_device")
    AcceleratedSAM(accelerator, model, optimizer, method=method, scope="global")


def _microbatch_sam():
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Linear(3, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return accelerator, model, optimizer, AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.05,
                                                         scope="microbatch")


def _weighted_mse(model, batch):
    """``weight`` × MSE; a micro-batch of weight 0 has no gradient (its ascent is skipped) and a constant loss of 1."""
    x, y, weight = batch
    return weight * ((model(x) - y) ** 2).mean() + (1.0 - weight)


def test_microbatch_scope_keeps_the_window_gradient_when_a_micro_batch_skips_its_ascent():  # kills W2
    accelerator, model, optimizer, sam = _microbatch_sam()
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for weight in (1.0, 0.0, 1.0, 0.0):  # two windows; each one's second micro-batch skips its ascent
        with accelerator.accumulate(model):
            sam.backward(_weighted_mse, (x, y, weight))
            if accelerator.sync_gradients:
                window_grad = model.weight.grad.clone()
            optimizer.step()
            optimizer.zero_grad()
    metrics = sam.metrics()
    assert metrics["sam/skipped_steps"] == 2  # one per window, not the optimizer's running total
    assert window_grad.norm() > 1e-3  # the first micro-batch's pass-2 gradient is still there
    # MSE of a linear model is convex, so the perturbed loss exceeds the clean one; a skipped micro-batch
    # contributes its clean loss to both sums, so it adds nothing to the sharpness
    assert metrics["sam/sharpness"] > 0


def test_microbatch_scope_sharpness_is_perturbed_minus_the_whole_window_clean_loss():  # kills W5
    accelerator, model, optimizer, sam = _microbatch_sam()
    clean = 0.0
    for _ in range(2):
        with accelerator.accumulate(model):
            clean += float(sam.backward(_weighted_mse, (torch.randn(4, 3), torch.randn(4, 1), 1.0)))
            optimizer.step()
            optimizer.zero_grad()
    metrics = sam.metrics()
    # window sums in one micro-batch loss's units: the clean part is the mean of the two clean losses
    assert abs(metrics["sam/loss_perturbed"] - metrics["sam/sharpness"] - clean / 2) < 1e-5


def test_statistics_false_skips_the_pass_two_statistics_only():
    _, sam, _ = _loop(accumulation=2, micro_size=4, steps=1, method="sam", rho=0.1, statistics=False)
    metrics = sam.metrics()
    assert sam.sam_optimizer.track_stats is False
    assert "sam/grad_cosine" not in metrics and "sam/grad_norm_perturbed" not in metrics
    assert "sam/sharpness" in metrics and "sam/grad_norm" in metrics


def _recording_no_sync(accelerator):
    """Make ``accelerator.no_sync`` (also the one ``accumulate`` enters) count how deep the caller is inside it."""
    depth, original = [0], accelerator.no_sync

    @contextlib.contextmanager
    def no_sync(model):
        depth[0] += 1
        try:
            with original(model):
                yield
        finally:
            depth[0] -= 1

    accelerator.no_sync = no_sync
    return depth


@pytest.mark.parametrize("method,scope,expected", [
    # per pass, whether the backward runs under no_sync (True) or all-reduces (False); GA 2, two windows
    ("sam", "global", [True, False, True, False] * 2),
    ("sam", "per_device", [True, True, True, False] * 2),
    # microbatch: each micro-batch's pass 1 is its own (no_sync); only the last pass 2 syncs the window's sum
    ("sam", "microbatch", [True, True, True, False] * 2),
    # periodic ascends in the first window only: the second one is stock accumulation, which syncs its last pass
    ("periodic", "per_device", [True, True, True, False, True, False]),
])
def test_only_the_backward_that_completes_each_pass_all_reduces(method, scope, expected):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    depth = _recording_no_sync(accelerator)
    model = tiny_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method=method, scope=scope, rho=0.1,
                         **({"interval": 2} if method == "periodic" else {}))
    under_no_sync = []

    def loss_fn(m, batch):
        under_no_sync.append(depth[0] > 0)
        return mse(m, batch)

    for batch in batches(regression_data(16), 4):
        with accelerator.accumulate(model):
            sam.backward(loss_fn, batch)
            optimizer.step()
            optimizer.zero_grad()
    assert under_no_sync == expected


def test_metrics_are_pooled_over_ranks_and_skipped_ascents_averaged():
    from arrcoc_sam.integrations._window import SAMMetrics

    # both ranks saw the same figures: the sum over ranks is twice this one's (a mean would be this one's)
    two_ranks = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                                reduce=lambda packed, reduction: {"sum": packed * 2, "mean": packed}[reduction])
    metrics = SAMMetrics()
    for value in (1.0, 3.0):
        metrics.add("sharpness", torch.tensor(value))
    metrics.add_skipped(1)
    assert metrics.read(two_ranks) == {"sam/sharpness": 2.0, "sam/skipped_steps": 1.0}


def test_refuses_an_optimizer_that_updates_none_of_the_models_parameters():
    accelerator = Accelerator(cpu=True)
    model, other = tiny_mlp(), tiny_mlp()
    with pytest.raises(ValueError, match="the optimizer updates none of the model's parameters"):
        AcceleratedSAM(accelerator, model, torch.optim.SGD(other.parameters(), lr=LR), method="sam")


def test_accumulating_by_hand_over_several_calls_is_refused_and_zeroed_gradients_are_not():
    """Without ``accelerator.accumulate`` every call is a whole window; gradients left by the previous call would
    enter the next ascent and be dropped by its replay. Zeros left by ``zero_grad(set_to_none=False)`` are fine."""
    data = batches(regression_data(16), 4)
    accelerator = Accelerator(cpu=True)
    model = tiny_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1)
    sam.backward(mse, data[0])
    before = flat(model)
    with pytest.raises(RuntimeError, match="window opened with gradients already in .grad"):
        sam.backward(mse, data[1])
    assert torch.equal(flat(model), before)  # the refused call left the clean weights

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_mlp()
    loader = DataLoader(regression_data(16), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1)
    _train_epoch(accelerator, model, optimizer, loader, sam, set_to_none=False)
    reference = reference_sam(tiny_mlp(), batches(regression_data(16), 8), rho=0.1)
    assert (flat(model) - flat(reference)).abs().max() < 1e-6


def test_a_loss_function_that_pops_from_its_batch_trains_as_one_that_does_not():
    def popping_mse(model, batch):
        target = batch.pop("y")
        return nn.functional.mse_loss(model(batch["x"]), target)

    plain, _, _ = _loop(accumulation=2, micro_size=4, steps=2, method="sam", rho=0.1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_mlp()
    loader = DataLoader(regression_data(16), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1)
    kept = []
    _train_epoch(accelerator, model, optimizer, loader, sam, popping_mse, lambda batch: kept.append(sorted(batch)))
    assert all(keys == ["x", "y"] for keys in kept)  # the caller's batch is untouched
    assert torch.equal(flat(model), flat(plain))


def test_esam_selection_with_a_loss_function_that_pops_from_its_batch_trains_as_one_that_does_not():
    """ESAM's data selection runs loss_fn twice more per micro-batch at w + ε (the scoring forward and the chosen
    examples' one) and reads each example's target from the batch after loss_fn has run: a loss_fn that pops the
    target must get its own copy there too."""
    def popping_mse(model, batch):
        target = batch.pop("y")
        return nn.functional.mse_loss(model(batch["x"]), target)

    def run(loss_fn):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = tiny_mlp()
        loader = DataLoader(regression_data(16), batch_size=4)
        model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
        sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=0.1, beta=1.0, gamma=0.5,
                             per_example_loss_fn=lambda outputs, batch: ((outputs - batch["y"]) ** 2).mean(dim=1))
        _train_epoch(accelerator, model, optimizer, loader, sam, loss_fn)
        return flat(model)

    assert torch.equal(run(popping_mse), run(mse))
    assert not torch.equal(run(mse), flat(tiny_mlp()))


def test_metrics_of_a_window_the_end_of_the_data_closes_early_average_its_own_micro_batches():
    """Windows of 3, 3 and 1 micro-batches (7 per epoch, accumulation 3): at a vanishing radius the perturbed
    loss of each window is the mean clean loss of its micro-batches."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = tiny_mlp()
    loader = DataLoader(regression_data(28), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=1e-12)
    figures, seen = [], [0]

    def read_window_end(_batch):
        if accelerator.sync_gradients:
            figures.append((sam.metrics()["sam/loss_perturbed"], float(torch.stack(losses[seen[0]:]).mean())))
            seen[0] = len(losses)

    losses = []
    for batch in loader:  # the losses so far are needed inside the loop, so not _train_epoch
        with accelerator.accumulate(model):
            losses.append(sam.backward(mse, batch))
            read_window_end(batch)
            optimizer.step()
            optimizer.zero_grad()
    assert len(figures) == 3
    for logged, expected in figures:
        assert logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("accumulation, chosen_runs", [(2, [4]), (3, [3, 3])])
def test_esam_selection_regroups_the_chosen_examples_of_a_window_into_full_sub_batches(accumulation, chosen_runs):
    """ESAM (γ = 0.5) on a BatchNorm model, micro-batches of 4: the ⌈γB⌉ chosen of each window run in as few
    sub-batches of at most one micro-batch (4) as hold them, of balanced sizes: 4 of 8 as one sub-batch of 4,
    6 of 12 as ⌈6/4⌉ = 2 sub-batches of 3 (never a lone example, which BatchNorm cannot normalise in training
    mode, and never more than a micro-batch's examples at once), after pass 1's forwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    loader = DataLoader(regression_data(16 * accumulation), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=0.1, gamma=0.5,
                         per_example_loss_fn=lambda outputs, batch: ((outputs - batch["y"]) ** 2).mean(dim=1))
    sizes = []
    hook = model.register_forward_hook(lambda module, args, output: sizes.append(
        (args[0].shape[0], torch.is_grad_enabled())) if module.training else None)
    _train_epoch(accelerator, model, optimizer, loader, sam)
    hook.remove()
    window = [(4, True)] * accumulation + [(4, False)] * accumulation + [(size, True) for size in chosen_runs]
    assert sizes == window * (len(loader) // accumulation)
    assert torch.isfinite(flat(model)).all()


def test_arguments_of_the_wrong_kind_are_refused_by_name():
    accelerator = Accelerator(cpu=True)
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match="accelerator must be an accelerate.Accelerator, got Sequential"):
        AcceleratedSAM(model, accelerator, optimizer)
    with pytest.raises(TypeError, match="model must be the torch.nn.Module accelerator.prepare returned, got NoneType"):
        AcceleratedSAM(accelerator, None, optimizer)
    with pytest.raises(TypeError, match="optimizer must be the optimizer accelerator.prepare returned"):
        AcceleratedSAM(accelerator, model, model)
    with pytest.raises(TypeError, match="per_example_loss_fn must be callable"):
        AcceleratedSAM(accelerator, model, optimizer, method="esam", per_example_loss_fn=1)
    with pytest.raises(ValueError, match="sam_statistics must be True or False, got 'no'"):
        AcceleratedSAM(accelerator, model, optimizer, statistics="no")


@pytest.mark.parametrize("temperatures", [(2.0, 2.0), (2.0, 3.0)], ids=["shared", "per-micro-batch"])
def test_esam_regrouping_keeps_a_per_batch_tensor_as_it_is(temperatures):
    """A micro-batch may carry a per-batch tensor (here a [1] temperature) beside its per-example ones. Regrouping
    the chosen examples keeps it whole where every micro-batch holds the same value and does not regroup where
    they differ; it is never concatenated into a per-example tensor, even when each micro-batch contributes
    exactly one chosen example (whose per-example tensors are then [1]-shaped too)."""
    seen = []

    def tempered_mse(model, batch):
        seen.append((batch["x"].shape[0], tuple(batch["temperature"].shape), float(batch["temperature"][0])))
        return nn.functional.mse_loss(model(batch["x"]) / batch["temperature"], batch["y"])

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=0.1, gamma=0.25,
                         per_example_loss_fn=lambda outputs, batch: ((outputs - batch["y"]) ** 2).mean(dim=1))
    sam.sam_optimizer.select_examples = lambda clean, perturbed: torch.tensor([1, 6])  # one of each micro-batch
    micro_batches = [{**b, "temperature": torch.tensor([t])} for b, t in zip(batches(regression_data(8), 4), temperatures)]
    for batch in micro_batches:
        with accelerator.accumulate(model):
            sam.backward(tempered_mse, batch)
    assert all(shape == (1,) for _, shape, _ in seen)
    replay = seen[4:]  # after pass 1 (2 forwards) and the perturbed losses of the window (2 no-grad forwards)
    if temperatures[0] == temperatures[1]:
        assert replay == [(2, (1,), 2.0)]  # regrouped: one forward of both chosen examples
    else:
        assert replay == [(1, (1,), 2.0), (1, (1,), 3.0)]  # each with its own micro-batch's temperature


@pytest.mark.parametrize(("saved_with", "resumed_with"), [
    ({"method": "asam", "rho": 0.5}, {"method": "sam", "rho": 0.05}),
    ({"method": "sam", "rho": 0.05}, {"method": "sam", "rho": 0.2}),
    (None, {"method": "sam", "rho": 0.05}),  # a plain AdamW run resumed with SAM
    ({"method": "sam", "rho": 0.05}, {"method": "looksam", "rho": 0.05}),
    (None, {"method": "fsam", "rho": 0.05}),
    ({"method": "esam", "rho": 0.05}, {"method": "sam", "rho": 0.05}),
    ({"method": "looksam", "rho": 0.05, "interval": 1}, {"method": "fsam", "rho": 0.05}),
])
def test_accelerate_load_state_keeps_the_helpers_own_settings(tmp_path, caplog, saved_with, resumed_with):
    """load_state loads the base optimizer: the checkpoint's ρ/adaptive silently won (an ASAM checkpoint resumed
    with method='sam' trained ASAM), and a plain checkpoint dropped `rho` (KeyError at the first ascent). A switch
    between SAM (or no helper) and a variant failed in Accelerate's count of custom checkpoint objects: the
    variant's state rides in the optimizer's state dict now."""
    def build(settings):
        accelerator = Accelerator(cpu=True)
        model = tiny_mlp()
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR))
        sam = AcceleratedSAM(accelerator, model, optimizer, **settings) if settings else None
        return accelerator, model, optimizer, sam

    accelerator, model, optimizer, sam = build(saved_with)
    for batch in batches(regression_data(8), 4):
        with accelerator.accumulate(model):
            if sam is None:
                accelerator.backward(mse(model, batch))
            else:
                sam.backward(mse, batch)
            optimizer.step()
            optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "ckpt"))

    accelerator, model, optimizer, sam = build(resumed_with)
    with caplog.at_level("WARNING", logger="arrcoc_sam.sam.optimizer"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    group = sam.sam_optimizer.param_groups[0]
    assert (group["rho"], group["adaptive"]) == (resumed_with["rho"], False)
    assert optimizer.optimizer.state_dict()["state"], "the base optimizer's moments were loaded"
    if saved_with is not None and (saved_with["rho"] != resumed_with["rho"] or saved_with["method"] == "asam"):
        assert "this run keeps its own" in caplog.text
    if saved_with is not None and saved_with["method"] not in ("sam", "asam", resumed_with["method"]):
        assert "another sharpness-aware method" in caplog.text
    if saved_with is not None and saved_with["method"] == "looksam":
        assert "direction" in caplog.text and not sam.sam_optimizer.buffers["ema"]
    for batch in batches(regression_data(4), 4):
        with accelerator.accumulate(model):
            sam.backward(mse, batch)
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("method, knobs", [
    ("sam", {}), ("asam", {}), ("periodic", {"interval": 2}), ("looksam", {"interval": 2}),
    ("esam", {"beta": 0.5, "gamma": 0.5, "seed": 3,
              "per_example_loss_fn": lambda outputs, batch: (outputs - batch["y"]).square().mean(dim=1)}),
    ("gsam", {}), ("fsam", {}), ("msam", {}), ("sam", {"scope": "microbatch"}),
])
def test_every_method_reports_the_same_metrics_and_weights_under_a_grad_scaler(method, knobs):
    """Each window's metrics are free of the GradScaler's scale, also for the short last window (7 micro-batches
    of 4 in windows of 3: m/k = 1/3 in the last) and in the microbatch scope. Friendly-SAM's ascent norm was
    divided by the scale twice."""

    def run(scaler):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
        accelerator.scaler = scaler
        model = tiny_mlp()
        loader = DataLoader(regression_data(28), batch_size=4)
        model, optimizer, loader = accelerator.prepare(
            model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), loader)
        sam = AcceleratedSAM(accelerator, model, optimizer, method=method, rho=0.1, **knobs)
        windows = []
        _train_epoch(accelerator, model, optimizer, loader, sam,
                     after_backward=lambda batch: windows.append(sam.metrics()) if accelerator.sync_gradients else None)
        return flat(model), windows

    (plain, plain_windows), (scaled, scaled_windows) = run(None), run(
        torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000))
    assert (plain - scaled).abs().max() < 1e-6
    assert len(plain_windows) == len(scaled_windows) == 3
    for plain_metrics, scaled_metrics in zip(plain_windows, scaled_windows, strict=True):
        assert plain_metrics.keys() == scaled_metrics.keys()
        for key, value in plain_metrics.items():
            assert scaled_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("scope", ["global", "microbatch"])
@pytest.mark.parametrize("where", ["at_w", "at_w_plus_eps"])
def test_a_window_with_non_finite_gradients_takes_no_step_without_a_grad_scaler(scope, where, caplog):
    """The loop steps the base optimizer itself, so the skip the ascent asked for never reached it: one micro-batch
    with a non-finite loss made every weight NaN (global and microbatch scope). A loss finite at w and infinite at
    w + ε (every pass at w + ε of the first window) was not even seen. Its window now leaves the weights as they
    were; the next windows train."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = tiny_mlp()
    loader = DataLoader(regression_data(24), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1, scope=scope)
    weights = []

    def loss_fn(m, b, index):
        blows_up = index == 1 if where == "at_w" else not weights and sam.sam_optimizer.is_perturbed
        return mse(m, b) * (math.inf if blows_up else 1.0)

    with caplog.at_level("WARNING"):
        for index, batch in enumerate(loader):
            with accelerator.accumulate(model):
                sam.backward(lambda m, b, index=index: loss_fn(m, b, index), batch)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                weights.append(flat(model).clone())
    assert torch.equal(weights[0], flat(tiny_mlp())) and torch.isfinite(weights[1]).all()
    assert not torch.equal(weights[1], weights[0])
    assert "this step is skipped" in caplog.text
    if where == "at_w":
        assert sam.metrics()["sam/skipped_steps"] == 1
    else:
        assert sam.metrics()["sam/skipped_steps"] == 0 and "non-finite gradients at w + ε" in caplog.text


@pytest.mark.parametrize("steps_through_sam", [False, True])
def test_microbatch_scope_checks_every_micro_batch_sharpness_aware_gradient(steps_through_sam):
    """Micro-batch 1 blows up at w + ε; micro-batch 2's gradient is zero, so its own ascent is skipped and no
    restore of it recorded a check: the window applied the non-finite sum, both where the loop steps the base
    optimizer (AcceleratedSAM) and where SAM.step() does (SAMTrainer's window)."""
    from arrcoc_sam.integrations._window import SAMWindow

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_mlp()
    loader = DataLoader(regression_data(16), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1, scope="microbatch")
    if steps_through_sam:
        sam._window = SAMWindow(accelerator, "microbatch", loop_steps_base=False)
    weights = []
    for index, batch in enumerate(loader):
        def loss_fn(m, b, index=index):
            factor = 0.0 if index == 1 else math.inf if index == 0 and sam.sam_optimizer.is_perturbed else 1.0
            return mse(m, b) * factor

        with accelerator.accumulate(model):
            sam.backward(loss_fn, batch)
            if not steps_through_sam:
                optimizer.step()
            elif accelerator.sync_gradients:
                sam.sam_optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            weights.append(flat(model).clone())
    assert torch.equal(weights[0], flat(tiny_mlp()))
    assert torch.isfinite(weights[1]).all() and not torch.equal(weights[1], weights[0])


def test_microbatch_scope_window_with_an_overflow_logs_the_other_windows_figures_only():
    """Under a GradScaler one overflowing micro-batch made every sam/* figure of the logging window inf or NaN: the
    window's later figures were measured on its non-finite gradient sum. Its figures are now left out."""
    def run(bad_index):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        model = tiny_mlp()
        loader = DataLoader(regression_data(24), batch_size=4)
        model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
        sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1, scope="microbatch")
        for index, batch in enumerate(loader):
            with accelerator.accumulate(model):
                factor = math.inf if index == bad_index else 1.0
                sam.backward(lambda m, b, factor=factor: mse(m, b) * factor, batch)
                optimizer.step()
                optimizer.zero_grad()
            if index == 2:  # after the first window: its figures alone
                first_window = sam.metrics()
        return first_window, sam.metrics()

    (clean_first, _), (overflowed_first, second) = run(bad_index=None), run(bad_index=1)
    assert overflowed_first == {"sam/skipped_steps": 1.0}
    assert clean_first.keys() > {"sam/loss_perturbed", "sam/sharpness", "sam/grad_norm", "sam/grad_cosine"}
    assert all(math.isfinite(v) for v in second.values()) and second["sam/skipped_steps"] == 0
    assert second.keys() == clean_first.keys()


def test_a_short_last_window_reports_the_norm_of_its_mean_gradient():
    """A plain Accelerate backward divides each loss by the accumulation steps k, so a last window of m < k
    micro-batches holds m/k of its mean gradient; its sam/grad_norm was reported m/k as large (as the Trainer's
    is not). 7 micro-batches in windows of 3: the last holds one."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = tiny_mlp()
    data = regression_data(28)
    loader = DataLoader(data, batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1)
    for index, batch in enumerate(loader):
        if index == 6:
            reference = tiny_mlp()
            reference.load_state_dict(accelerator.unwrap_model(model).state_dict())
            sam.metrics()  # the earlier windows' figures
        with accelerator.accumulate(model):
            sam.backward(mse, batch)
            optimizer.step()
            optimizer.zero_grad()
    last = batches(data, 4)[6]
    grads = torch.autograd.grad(mse(reference, last), list(reference.parameters()))
    expected = float(torch.sqrt(sum(g.double().square().sum() for g in grads)))
    assert sam.metrics()["sam/grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_metrics_leave_non_finite_observations_out_of_their_means():
    """A pass-2 overflow under fp16 (the GradScaler then skips the step) gave an inf ‖g_SAM‖ and a NaN cosine, and
    one such window made the logging window's means inf/NaN."""
    from arrcoc_sam.integrations._window import SAMMetrics

    metrics = SAMMetrics()
    for norm, cosine in ((1.0, 0.5), (math.inf, math.nan), (3.0, 0.7)):
        metrics.add("grad_norm_perturbed", torch.tensor(norm))
        metrics.add("grad_cosine", torch.tensor(cosine))
    metrics.add("sharpness", torch.tensor(math.nan))
    read = metrics.read(Accelerator(cpu=True))
    assert read == {"sam/grad_norm_perturbed": 2.0, "sam/grad_cosine": pytest.approx(0.6), "sam/skipped_steps": 0.0}


@pytest.mark.multiprocess
def test_non_finite_gradients_on_one_of_two_processes_skip_the_step_on_both(run_torchrun, tmp_path):
    """per_device and microbatch ascend from each rank's own gradient, so only the rank that met the non-finite
    loss skipped: per_device replicas drifted apart, and microbatch ones became NaN. A loss that blows up only at
    w + ε on one rank: its non-finite gradient reaches every rank through the all-reduce, and no rank steps."""
    import json

    arguments = [f"{scope}:{stage}" for scope in ("global", "per_device", "microbatch") for stage in ("pass1", "pass2")]
    # one rank's own ascent skipped (zero gradient): the ranks must still agree, also where SAM.step() decides
    arguments += [f"{scope}:pass2_alone:{path}" for scope in ("per_device", "microbatch") for path in ("base", "sam_step")]
    run_torchrun(Path(__file__).parent / "dist_scripts" / "non_finite_ddp.py", *arguments, timeout=300)
    results = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(tmp_path.glob("non_finite_*.json"))]
    assert len(results) == 20
    for result in results:
        assert result["finite"] and result["replicas_equal"] and result["trained"], result


def test_an_esam_window_whose_drawn_tensors_have_no_gradient_records_no_ascent():
    """ESAM's tensor SWP asks for pass 2 even where the tensors it drew have a zero gradient (nothing to ascend
    along): pass 2 runs at w, so the window made no ascent and records no figures, as SAM's zero-norm windows
    do not; counting it would log a loss_perturbed equal to the clean loss and a sharpness of 0 for it. The loss
    here has a value (y²) and a graph but a zero gradient for every weight."""
    accelerator = Accelerator(cpu=True)
    model = tiny_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=0.1, beta=0.5, gamma=1.0)
    before = flat(model)

    def flat_loss(module, batch):
        return (module(batch["x"]) * 0).sum() + batch["y"].square().mean()

    for batch in batches(regression_data(8), 4):
        with accelerator.accumulate(model):
            assert float(sam.backward(flat_loss, batch)) == pytest.approx(float(batch["y"].square().mean()))
            optimizer.step()
            optimizer.zero_grad()
    assert torch.equal(flat(model), before)
    assert set(sam.metrics()) == {"sam/skipped_steps"}


class _BranchAtOne(nn.Module):
    """``w·x + gate·x`` while ``w <= 1``, ``w·x`` beyond: at w = 1 the ascent (along +∇w) leaves the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        self.gate = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x + self.gate * x if float(self.w.detach()) <= 1.0 else self.w * x


def test_a_weight_that_pass_two_does_not_reach_gets_no_gradient_and_no_step():
    """The sharpness-aware gradient is ∇L(w + ε) alone: a weight pass 1 reached but pass 2 does not (a branch left at
    w + ε) has none, and the base optimizer skips it (weight decay included), as a closure step that clears .grad
    before pass 2 does. A zero .grad instead would let weight decay move it. Hand-computed at ρ = 0.1, x = 1,
    L = out²: ∇L(w) = (6, 6), ε = ρ(1, 1)/√2, ∇_w L(w + ε) = 2(1 + ε_w)."""
    accelerator = Accelerator(cpu=True)
    model = _BranchAtOne()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, weight_decay=0.5))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1)
    with accelerator.accumulate(model):
        assert float(sam.backward(lambda module, x: module(x).square().mean(), torch.ones(1, dtype=torch.float64))) == 9
        assert model.gate.grad is None
        optimizer.step()
        optimizer.zero_grad()
    eps = 0.1 / math.sqrt(2)
    assert float(model.w.detach()) == pytest.approx(1 - LR * (2 * (1 + eps) + 0.5 * 1), rel=1e-12)
    assert float(model.gate.detach()) == 2.0


def test_microbatch_scope_keeps_the_window_gradient_of_a_weight_a_skipping_micro_batch_does_not_reach():
    """A micro-batch that skips its ascent adds its pass-1 gradient to the window's sum; a weight its pass does not
    reach (here the bias) must keep the sum of the earlier micro-batches. Window of two: the first's SAM gradient
    ½∇L₁(w + ρ ĝ₁) (Accelerate divides each loss by 2), the second reaches the weight only, with a zero gradient."""
    accelerator, model, optimizer, sam = _microbatch_sam()
    reference = nn.Linear(3, 1)
    reference.load_state_dict(accelerator.unwrap_model(model).state_dict())
    x, y = torch.randn(4, 3), torch.randn(4, 1)

    def loss_fn(module, batch):
        x, y, reaches_bias = batch
        return ((module(x) - y) ** 2).mean() if reaches_bias else 0 * module.weight.sum() + 1.0

    for batch in ((x, y, True), (x, y, False)):
        with accelerator.accumulate(model):
            sam.backward(loss_fn, batch)
            if accelerator.sync_gradients:
                window = [model.weight.grad, model.bias.grad]
                window = [None if g is None else g.clone() for g in window]
            optimizer.step()
            optimizer.zero_grad()
    params = list(reference.parameters())
    g = torch.autograd.grad(((reference(x) - y) ** 2).mean(), params)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g, strict=True):
            p.add_(0.05 * gi / norm)
    expected = [0.5 * gi for gi in torch.autograd.grad(((reference(x) - y) ** 2).mean(), params)]
    assert window[1] is not None, "the bias lost the first micro-batch's gradient"
    for got, want in zip(window, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert sam.metrics()["sam/skipped_steps"] == 1


def test_microbatch_scope_window_without_any_ascent_records_no_figures():
    """A window none of whose micro-batches ascended (zero gradients) made no sharpness-aware step: it records no
    loss_perturbed and no sharpness (counting it would log its clean loss and a sharpness of 0), as a global-scope
    window without an ascent does not; its two skipped ascents are counted."""
    accelerator, model, optimizer, sam = _microbatch_sam()
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for _ in range(2):
        with accelerator.accumulate(model):
            sam.backward(_weighted_mse, (x, y, 0.0))
            optimizer.step()
            optimizer.zero_grad()
    assert sam.metrics() == {"sam/skipped_steps": 2.0}


def test_a_batch_encoding_reaches_the_loss_function_as_one_in_both_passes():
    """A tokenizer's BatchEncoding (a UserDict) stays a BatchEncoding through the copy each pass gets, so a loss
    function may read its fields as attributes; the step is SAM's on that batch."""
    from transformers import BatchEncoding

    accelerator = Accelerator(cpu=True)
    model = tiny_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1)
    seen = []

    def loss_fn(module, batch):
        seen.append(type(batch))
        return mse(module, {"x": batch.x, "y": batch.y})

    rows = batches(regression_data(4), 4)
    with accelerator.accumulate(model):
        sam.backward(loss_fn, BatchEncoding(rows[0]))
        optimizer.step()
        optimizer.zero_grad()
    assert seen == [BatchEncoding, BatchEncoding]
    assert torch.allclose(flat(model), flat(reference_sam(tiny_mlp(), rows, 0.1)), atol=1e-6)


def test_microbatch_scope_reports_the_mean_of_every_micro_batchs_ascent_figures():
    """Each micro-batch ascends from its own gradient, so the window's sam/grad_norm is the mean over its micro-batches
    of ‖½∇L_m(w)‖ (Accelerate divides each loss by the 2 steps), not the last micro-batch's alone."""
    accelerator, model, optimizer, sam = _microbatch_sam()
    reference = nn.Linear(3, 1)
    reference.load_state_dict(accelerator.unwrap_model(model).state_dict())
    generator = torch.Generator().manual_seed(5)
    micro = [(torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator), 1.0) for _ in range(2)]
    micro[1] = (micro[1][0] * 3, micro[1][1], 1.0)  # a larger gradient than the first's
    for batch in micro:
        with accelerator.accumulate(model):
            sam.backward(_weighted_mse, batch)
            optimizer.step()
            optimizer.zero_grad()
    norms = []
    for x, y, _ in micro:
        grads = torch.autograd.grad(((reference(x) - y) ** 2).mean() / 2, list(reference.parameters()))
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    assert sam.metrics()["sam/grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-5)
