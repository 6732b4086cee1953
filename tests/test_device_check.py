"""The update check on the device: a fused Adam/AdamW base optimizer skips a step with inf/NaN gradients through its
``found_inf`` flag, without a host sync, on every step (with or without an ascent or the pass-2 statistics)."""

from __future__ import annotations

import copy
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from test_sam_engine import bitwise_equal, make_batches, make_mlp, mse

from arrcoc_sam import SAMTrainer, SAMTrainingArguments
from arrcoc_sam.sam import SAM
from arrcoc_sam.sam.device_check import checkable_on_device, non_finite_flag, skips_on_device
from arrcoc_sam.sam.variants import MomentumSAM, PeriodicSAM

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from trainer_common import tiny_bert, token_dataset, trainer_kwargs  # noqa: E402


def _sam_steps(model, opt, batches, poison: set[int], ascend: bool = True) -> None:
    """One step per batch through ``perturbed()`` (or a single pass), the last layer's bias gradient set to NaN in
    the pass that feeds the update on the steps in ``poison``."""
    for index, batch in enumerate(batches):
        opt.zero_grad()
        mse(model, batch).backward()
        if ascend:
            with opt.perturbed():
                opt.zero_grad()
                mse(model, batch).backward()
                if index in poison:
                    model[2].bias.grad[0] = math.nan
        elif index in poison:
            model[2].bias.grad[0] = math.nan
        opt.step()


def _reference_without(model, make_opt, batches, skipped: set[int]) -> None:
    """The same loop that simply leaves out the base step on the steps in ``skipped`` (the skip by hand)."""
    opt = make_opt(model)
    for index, batch in enumerate(batches):
        opt.zero_grad()
        mse(model, batch).backward()
        with opt.perturbed():
            opt.zero_grad()
            mse(model, batch).backward()
        if index not in skipped:
            opt.step()


@pytest.mark.parametrize("base", [torch.optim.AdamW, torch.optim.Adam])
def test_fused_base_skips_a_non_finite_update_bitwise_as_leaving_the_step_out(base, caplog):
    batches = make_batches(6)

    def make(model):
        return SAM(model.parameters(), base, rho=0.05, lr=0.01, weight_decay=0.1, fused=True)

    model, reference = make_mlp(), make_mlp()
    opt = make(model)
    with caplog.at_level(logging.WARNING, logger="arrcoc_sam.sam.optimizer"):
        _sam_steps(model, opt, batches, poison={2})
        assert opt.skipped_updates == 1
    assert caplog.text.count("1 optimizer step(s) skipped on the device") == 1
    _reference_without(reference, make, batches, skipped={2})
    assert bitwise_equal(model, reference)
    assert {float(state["step"]) for state in opt.base_optimizer.state.values()} == {5.0}


def test_the_device_check_needs_no_pass_2_statistics():
    """``track_stats=False`` leaves out the host check (no ‖g_SAM‖ is taken); a fused base still skips."""
    batches = make_batches(4)
    model, reference = make_mlp(), make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    opt.track_stats = False
    _sam_steps(model, opt, batches, poison={1})
    _reference_without(reference, lambda m: SAM(m.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True),
                       batches, skipped={1})
    assert bitwise_equal(model, reference) and opt.skipped_updates == 1


def test_a_skip_found_on_the_device_is_counted_at_the_next_ascent_without_being_read(caplog):
    batches = make_batches(3)
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    with caplog.at_level(logging.WARNING, logger="arrcoc_sam.sam.optimizer"):
        _sam_steps(model, opt, batches[:2], poison={0})
    assert caplog.text.count("1 optimizer step(s) skipped on the device") == 1  # by step 1's ascent
    assert opt._skipped_updates == 1  # counted there, before anyone read skipped_updates


@pytest.mark.parametrize("method", ["periodic", "msam"])
def test_steps_without_an_ascent_are_checked_too(method):
    """Periodic SAM's plain steps and msam's (no pass at the clean weights) were not checked on the host; with a
    fused base a NaN there leaves weights and moments bitwise as they were, and the step counter."""
    batches = make_batches(5)
    model = make_mlp()
    if method == "periodic":
        opt = PeriodicSAM(model.parameters(), torch.optim.AdamW, rho=0.05, interval=3, lr=0.01, fused=True)
    else:
        opt = MomentumSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    poisoned = 1  # a plain step of periodic (ascents at 0 and 3)

    def closure_for(index):
        def closure():
            opt.zero_grad()
            loss = mse(model, batches[index])
            loss.backward()
            if index == poisoned:
                model[2].bias.grad[0] = math.nan
            return loss
        return closure

    for index in range(len(batches)):
        if index == poisoned:
            weights = copy.deepcopy(model.state_dict())
            moments = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
        opt.step(closure_for(index))
        if index == poisoned:
            assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
            after = opt.base_optimizer.state_dict()["state"]
            assert all(torch.equal(moments[i][k], after[i][k]) for i in moments for k in moments[i])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_updates == 1


def test_rho_zero_with_a_fused_base_equals_the_bare_base_bitwise_and_lr_zero_moves_nothing():
    batches = make_batches(5)
    model, bare_model, frozen = make_mlp(), make_mlp(), make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.0, lr=0.01, fused=True)
    bare = torch.optim.AdamW(bare_model.parameters(), lr=0.01, fused=True)
    still = SAM(frozen.parameters(), torch.optim.AdamW, rho=0.05, lr=0.0, fused=True)
    start = copy.deepcopy(frozen.state_dict())
    _sam_steps(model, opt, batches, poison=set())
    _sam_steps(frozen, still, batches, poison=set())
    for batch in batches:
        bare.zero_grad()
        mse(bare_model, batch).backward()
        bare.step()
    assert bitwise_equal(model, bare_model)
    assert all(torch.equal(start[k], v) for k, v in frozen.state_dict().items())


def test_the_flag_reads_every_dtype_and_leaves_the_gradients_bitwise_as_they_were():
    tiny = torch.finfo(torch.float32).tiny / 8  # subnormal
    grads = [torch.tensor([1.5, -0.0, tiny, 3e38]), torch.randn(4, dtype=torch.float64),
             torch.randn(3).to(torch.bfloat16), torch.randn(3).to(torch.float16)]
    before = [g.clone() for g in grads]
    flag = non_finite_flag(grads)
    assert flag.shape == () and flag.item() == 0.0
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(grads, before))
    for index, dtype_grads in enumerate(grads):
        poisoned = [g.clone() for g in grads]
        poisoned[index][0] = math.inf if index % 2 else math.nan
        assert non_finite_flag(poisoned).item() == 1.0, dtype_grads.dtype


def test_only_torchs_fused_adam_and_adamw_check_on_the_device():
    params = [torch.nn.Parameter(torch.randn(3))]

    class OwnAdamW(torch.optim.AdamW):
        pass

    assert skips_on_device(torch.optim.AdamW(params, fused=True))
    assert skips_on_device(torch.optim.Adam(params, fused=True))
    assert not skips_on_device(torch.optim.AdamW(params, foreach=True))
    assert not skips_on_device(torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True))  # first step's buffers
    assert not skips_on_device(OwnAdamW(params, fused=True))  # may override step() and drop found_inf
    assert not checkable_on_device([torch.randn(3).to_sparse()])
    assert checkable_on_device([torch.randn(3), torch.randn(2, 2).t()])


def test_the_skip_count_survives_a_copy_and_an_older_pickle_loads():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    _sam_steps(model, opt, make_batches(2), poison={1})
    assert copy.deepcopy(opt).skipped_updates == 1
    state = opt.__getstate__()
    state["skipped_updates"] = state.pop("_skipped_updates") + 2  # the name pickles held before
    state.pop("_device_skips")
    old = SAM.__new__(SAM)
    old.__setstate__(state)
    assert old.skipped_updates == 3


def test_sam_trainer_with_hfs_default_fused_adamw_skips_a_nan_on_a_plain_periodic_step(tmp_path, caplog):
    """The stock Trainer checks no step; SAMTrainer's plain windows (periodic SAM between ascents) now skip one
    whose gradients hold NaN, with a fused AdamW (transformers' default ``optim``), and the next training log says so
    (no ascent follows here to read the count)."""
    calls = []

    def loss_with_one_nan(outputs, labels, num_items_in_batch=None):
        calls.append(None)
        logits = outputs["logits"].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        return loss * math.nan if len(calls) == 3 else loss  # step 0: calls 1-2 (ascent); step 1: call 3

    args = SAMTrainingArguments(**trainer_kwargs(
        str(tmp_path / "out"), optimizer="periodic", sam_interval=10, rho=0.05, optim="adamw_torch_fused",
        per_device_train_batch_size=4, max_steps=3,
    ))
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(12),
                         compute_loss_func=loss_with_one_nan)
    with caplog.at_level(logging.WARNING, logger="arrcoc_sam.sam.optimizer"):
        trainer.train()
    assert caplog.text.count("1 optimizer step(s) skipped on the device") == 1
    sam = trainer.optimizer.optimizer
    assert len(calls) == 4  # one ascent, at step 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert sam.skipped_updates == 1
    assert {float(state["step"]) for state in sam.base_optimizer.state.values()} == {2.0}


def test_a_float64_default_dtype_and_a_hand_expanded_gradient_still_step():
    """The flag is float32 whatever the default dtype; a gradient whose elements share memory (which the in-place
    check kernel refuses) goes through the host check instead of raising."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = make_mlp()
        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
        _sam_steps(model, opt, make_batches(2), poison={1})
        assert opt.skipped_updates == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        torch.set_default_dtype(previous)
    weight = torch.nn.Parameter(torch.zeros(5))
    opt = SAM([weight], torch.optim.AdamW, rho=0.05, lr=0.1, fused=True)
    weight.grad = torch.ones(1).expand(5)
    opt.step()  # (what fused AdamW makes of such a gradient past its first element is its own affair)
    assert weight[0].item() == pytest.approx(-0.1) and opt.skipped_updates == 0


def test_step_hooks_run_on_a_step_skipped_on_the_device(caplog):
    """Documented: the fused step runs (and changes nothing), so the hooks see it, as under a GradScaler."""
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    calls = []
    opt.register_step_post_hook(lambda sam, args, kwargs: calls.append(sam))
    _sam_steps(model, opt, make_batches(3), poison={1})
    assert calls == [opt] * 3 and opt.skipped_updates == 1


# -- mutation round 26 (engine core): each test below failed on a surviving mutant ------------------------------
def test_a_skip_left_by_a_non_finite_ascent_holds_with_a_fused_base_whose_update_is_finite():
    """Pass 1 met an inf (no ascent, the step is to be skipped); pass 2 at w is finite. The device check must not
    take over and step: the step is left out, and the next one runs."""
    model, reference = make_mlp(), make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    batch = make_batches(1)[0]
    mse(model, batch).backward()
    model[0].weight.grad[0, 0] = math.inf
    with opt.perturbed() as ok:
        assert not ok
        opt.zero_grad()
        mse(model, batch).backward()
    opt.step()
    assert bitwise_equal(model, reference) and opt.skipped_updates == 1
    assert len(opt.base_optimizer.state) == 0  # the base step never ran
    _sam_steps(model, opt, [batch], poison=set())
    assert not bitwise_equal(model, reference) and opt.skipped_updates == 1


def test_skips_on_the_host_and_on_the_device_add_up_and_the_counter_can_be_reset():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    batches = make_batches(4)
    _sam_steps(model, opt, batches[:1], poison={0})  # on the device
    assert opt.skipped_updates == 1
    opt.zero_grad()
    mse(model, batches[1]).backward()
    model[0].weight.grad[0, 0] = math.inf  # a non-finite ascent: skipped on the host
    assert not opt.perturb()
    opt.step()
    _sam_steps(model, opt, batches[2:3], poison={0})  # on the device, not read yet
    assert opt.skipped_updates == 3
    _sam_steps(model, opt, batches[3:4], poison={0})
    opt.skipped_updates = 0  # the pending device skip is counted before the reset, not after it
    assert opt.skipped_updates == 0


def test_a_base_with_one_unfused_group_is_checked_on_the_host():
    model, reference = make_mlp(), make_mlp()

    def make(m):
        return SAM([{"params": [m[0].weight, m[0].bias]}, {"params": [m[2].weight, m[2].bias], "fused": False}],
                   torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)

    opt = make(model)
    assert not skips_on_device(opt.base_optimizer)
    batches = make_batches(3)
    _sam_steps(model, opt, batches, poison={1})
    _reference_without(reference, make, batches, skipped={1})
    assert bitwise_equal(model, reference) and opt.skipped_updates == 1


def test_the_flag_handed_to_the_fused_step_does_not_outlive_it():
    """A skipped step's found_inf must not stay on the base optimizer, where its next step taken directly (a loop
    that steps the base itself) would read it and skip a finite update too."""
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    batch = make_batches(1)[0]
    _sam_steps(model, opt, [batch], poison={0})
    assert not hasattr(opt.base_optimizer, "found_inf")
    before = copy.deepcopy(model)
    opt.zero_grad()
    mse(model, batch).backward()
    opt.base_optimizer.step()
    assert not bitwise_equal(model, before)


def test_a_fused_step_takes_over_the_update_check_left_by_the_restore():
    """The device flag covers every gradient the step reads: the host's ‖g_SAM‖ from the restore is dropped, so none
    is pending after the step (take_update_norm() hands out only one taken since the last step)."""
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, fused=True)
    batch = make_batches(1)[0]
    mse(model, batch).backward()
    with opt.perturbed():
        opt.zero_grad()
        mse(model, batch).backward()
    opt.step()
    assert opt.take_update_norm() is None
