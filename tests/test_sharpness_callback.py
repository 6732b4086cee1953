"""SharpnessCallback with a plain transformers.Trainer: logged keys, values, no effect on training, DDP."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from arrcoc_sam.curvature import hessian_trace, sam_sharpness, top_eigenvalues
from arrcoc_sam.integrations.callbacks import (
    CONVERGED_KEY,
    PROBE_KEYS,
    SECONDS_KEY,
    TRACE_STDERR_KEY,
    SharpnessCallback,
)

DIST = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(DIST))
from trainer_common import flat_params, tiny_bert, token_dataset, trainer_kwargs  # noqa: E402


def _held_out():
    rows = token_dataset(8, seed=7)
    return [default_data_collator(rows[:4]), default_data_collator(rows[4:])]


def _train(tmp_path, callback=None, steps=2):
    args = TrainingArguments(**trainer_kwargs(str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4))
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(16), callbacks=[callback] if callback else None)
    if callback:
        callback.bind(trainer)
    trainer.train()
    return trainer


def test_callback_logs_every_probe_through_the_trainer_without_changing_training(tmp_path):
    callback = SharpnessCallback(every_n_steps=1, probes=tuple(PROBE_KEYS), eval_batches=_held_out(), num_probes=4, max_iter=8)
    trainer = _train(tmp_path, callback)
    entries = [entry for entry in trainer.state.log_history if SECONDS_KEY in entry]
    assert [entry["step"] for entry in entries] == [1, 2]
    # the Trainer's own loss logging still ran at both probed steps (the callback restores control.should_log)
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    for entry in entries:
        assert all(math.isfinite(entry[key]) for key in PROBE_KEYS.values())
        assert entry[SECONDS_KEY] > 0
        assert entry[CONVERGED_KEY] in (0.0, 1.0) and entry[TRACE_STDERR_KEY] > 0
    model, last = trainer.model, entries[-1]
    direct_top = top_eigenvalues(model, None, _held_out(), tol=callback.tol, max_iter=callback.max_iter)
    assert last["sharpness/top_eigenvalue"] == pytest.approx(float(direct_top.values[0]), rel=1e-6)
    assert last["sharpness/sam"] == pytest.approx(sam_sharpness(model, None, _held_out(), rho=callback.rho), rel=1e-6)
    baseline = _train(tmp_path)
    assert torch.equal(flat_params(trainer.model), flat_params(baseline.model))


def test_unbound_callback_refuses_to_start_training(tmp_path):
    with pytest.raises(RuntimeError, match="not bound to a Trainer"):
        args = TrainingArguments(**trainer_kwargs(str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4))
        Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(4),
                callbacks=[SharpnessCallback(eval_batches=_held_out())]).train()


def test_callback_rejects_unknown_probes_and_missing_batches():
    with pytest.raises(ValueError, match="probes must be a non-empty subset"):
        SharpnessCallback(probes=("hessian_norm",), eval_batches=_held_out())
    with pytest.raises(ValueError, match="probes must be a non-empty subset"):
        SharpnessCallback(probes=(), eval_batches=_held_out())
    with pytest.raises(ValueError, match="eval_batches must hold"):
        SharpnessCallback(eval_batches=[])


@pytest.mark.parametrize(("setting", "message"), [
    ({"rho": -1.0}, "rho must be > 0"),
    ({"adaptive_rho": float("nan")}, "adaptive_rho must be > 0"),
    ({"tol": 0.0}, "tol must be > 0"),
    ({"num_probes": 1}, "num_probes must be >= 2"),
    ({"max_iter": 0}, "max_iter must be >= 1"),
    ({"every_n_steps": 0}, "every_n_steps must be >= 1"),
])
def test_callback_rejects_bad_probe_settings_when_built_not_at_the_first_probe(setting, message):
    with pytest.raises(ValueError, match=message):
        SharpnessCallback(eval_batches=_held_out(), **setting)


def test_callback_accepts_a_single_probe_name_as_a_string():
    assert SharpnessCallback(probes="trace", eval_batches=_held_out()).probes == ("trace",)


def test_eval_batches_without_labels_fail_when_training_begins_before_any_step(tmp_path):
    unlabeled = [{key: value for key, value in batch.items() if key != "labels"} for batch in _held_out()]
    callback = SharpnessCallback(every_n_steps=3, probes=("trace",), eval_batches=unlabeled)
    args = TrainingArguments(**trainer_kwargs(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4))
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(16), callbacks=[callback])
    callback.bind(trainer)
    with pytest.raises(ValueError, match=r"eval_batches\[0\] gives no loss"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_default_probes_log_a_converged_top_eigenvalue_and_the_trace_standard_error():
    """The old default budget (max_iter=20) stopped Lanczos unconverged on this model, and nothing said so."""
    model, batches = tiny_bert(), _held_out()
    metrics = SharpnessCallback(eval_batches=batches).measure(model)
    assert metrics[CONVERGED_KEY] == 1.0
    reference = top_eigenvalues(model, None, batches, tol=1e-8, max_iter=300)
    assert metrics[PROBE_KEYS["top_eigenvalue"]] == pytest.approx(float(reference.values[0]), rel=1e-5)
    trace = hessian_trace(model, None, batches, num_probes=8)
    assert metrics[TRACE_STDERR_KEY] == pytest.approx(trace.stderr, rel=1e-9) and trace.stderr > 0


class _LogRecorder:
    """Stands in for the Trainer the callback logs through."""

    def __init__(self):
        self.logs = []

    def log(self, metrics):
        self.logs.append(metrics)


def test_probes_run_at_multiples_of_every_n_steps_on_the_world_process_zero_only():
    from transformers import TrainerControl, TrainerState

    recorder = _LogRecorder()
    callback = SharpnessCallback(every_n_steps=2, probes="sam_sharpness", eval_batches=_held_out(), trainer=recorder)
    probed = []
    for step, rank_zero in [(1, True), (2, True), (3, True), (4, True), (4, False)]:
        before = len(recorder.logs)
        state = TrainerState(global_step=step, is_world_process_zero=rank_zero)
        callback.on_step_end(None, state, TrainerControl(), model=tiny_bert())
        probed += [(step, rank_zero)] * (len(recorder.logs) - before)
    assert probed == [(2, True), (4, True)]


def test_adaptive_probe_is_asam_sharpness_at_adaptive_rho_with_eta_zero():
    model, batches = tiny_bert(), _held_out()
    metrics = SharpnessCallback(probes=("sam_sharpness", "adaptive_sharpness"), eval_batches=batches, rho=0.05,
                                adaptive_rho=0.5).measure(model)
    adaptive = sam_sharpness(model, None, batches, rho=0.5, adaptive=True, eta=0.0)
    assert metrics[PROBE_KEYS["adaptive_sharpness"]] == pytest.approx(adaptive, rel=1e-6)
    assert metrics[PROBE_KEYS["sam_sharpness"]] == pytest.approx(sam_sharpness(model, None, batches, rho=0.05), rel=1e-6)
    assert adaptive != pytest.approx(sam_sharpness(model, None, batches, rho=0.5), rel=1e-3)


def test_the_trace_probe_draws_its_probe_vectors_from_the_callbacks_seed():
    """Hutchinson's estimate depends on its Rademacher draws: the logged trace must be the one of the seed the
    callback was given (so two runs with one seed log the same figure), not of a fixed default."""
    model, batches = tiny_bert(), _held_out()
    logged = SharpnessCallback(probes="trace", eval_batches=batches, num_probes=4, seed=3).measure(model)
    seeded = hessian_trace(model, None, batches, num_probes=4, seed=3)
    assert logged[PROBE_KEYS["trace"]] == pytest.approx(seeded.value, rel=1e-9)
    assert logged[TRACE_STDERR_KEY] == pytest.approx(seeded.stderr, rel=1e-9)
    assert seeded.value != pytest.approx(hessian_trace(model, None, batches, num_probes=4, seed=0).value, rel=1e-6)


def test_eval_batches_that_are_plain_tensors_stay_separate_batches():
    """The probes read a list of tensors as one batch ([x, y] from a DataLoader), so the callback hands them its
    list of batches as an iterator."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    batches = [torch.randn(5, 3), torch.randn(2, 3)]

    def loss_fn(module, x):
        return module(x).pow(2).mean()

    metrics = SharpnessCallback(probes=("sam_sharpness", "trace"), eval_batches=batches, loss_fn=loss_fn,
                                num_probes=4).measure(model)
    assert metrics[PROBE_KEYS["sam_sharpness"]] == sam_sharpness(model, loss_fn, iter(batches), rho=0.05)
    assert metrics[PROBE_KEYS["trace"]] == hessian_trace(model, loss_fn, iter(batches), num_probes=4).value


def test_a_diverged_model_logs_nan_probes_instead_of_stopping_training():
    """A NaN weight made the Lanczos probe raise inside torch.linalg.eigh, which ended the training run."""
    model, batches = tiny_bert(), _held_out()
    with torch.no_grad():
        model.classifier.weight[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="not finite"):
        metrics = SharpnessCallback(probes=("top_eigenvalue", "trace", "sam_sharpness"), eval_batches=batches,
                                    num_probes=2).measure(model)
    assert all(math.isnan(metrics[PROBE_KEYS[probe]]) for probe in ("top_eigenvalue", "trace", "sam_sharpness"))
    assert metrics[CONVERGED_KEY] == 0.0


@pytest.mark.parametrize("sharding", [{"fsdp": "full_shard"}, {"deepspeed": "ds_config.json"}])
def test_callback_refuses_sharded_runs_when_training_begins(sharding):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    callback = SharpnessCallback(eval_batches=_held_out(), trainer=_LogRecorder())
    args = SimpleNamespace(**{"fsdp": "", "deepspeed": None, **sharding})
    with pytest.raises(ValueError, match="FSDP/DeepSpeed sharding is not supported"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=tiny_bert())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_callback_logs_on_rank_zero_in_a_two_process_gloo_run_without_hanging(run_torchrun, tmp_path):
    run_torchrun(DIST / "sharpness_callback_ddp.py", timeout=120)
    ranks = [json.loads((tmp_path / f"sharpness_rank{rank}.json").read_text()) for rank in (0, 1)]
    logged = [entry for entry in ranks[0]["log_history"] if SECONDS_KEY in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all(math.isfinite(entry[key]) for entry in logged for key in PROBE_KEYS.values())
    assert not any(SECONDS_KEY in entry for entry in ranks[1]["log_history"])
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the probe on rank 0 did not desynchronise the replicas


def test_eval_batches_are_checked_when_training_begins_on_the_world_process_zero_only():
    """Only rank 0 probes, so only rank 0 runs the check forwards (the other ranks would spend them for nothing)."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    unlabeled = [{key: value for key, value in batch.items() if key != "labels"} for batch in _held_out()]
    callback = SharpnessCallback(probes="trace", eval_batches=unlabeled, trainer=_LogRecorder())
    args = SimpleNamespace(fsdp="", deepspeed=None)
    callback.on_train_begin(args, TrainerState(is_world_process_zero=False), TrainerControl(), model=tiny_bert())
    with pytest.raises(ValueError, match=r"eval_batches\[0\] gives no loss"):
        callback.on_train_begin(args, TrainerState(is_world_process_zero=True), TrainerControl(), model=tiny_bert())


def test_the_top_eigenvalue_probe_starts_lanczos_from_the_callbacks_seed():
    model, batches = tiny_bert(), _held_out()
    logged = SharpnessCallback(probes="top_eigenvalue", eval_batches=batches, seed=3).measure(model)
    seeded = top_eigenvalues(model, None, batches, tol=1e-3, max_iter=64, seed=3)
    default = top_eigenvalues(model, None, batches, tol=1e-3, max_iter=64, seed=0)
    assert logged[PROBE_KEYS["top_eigenvalue"]] == float(seeded.values[0]) != float(default.values[0])


def test_the_check_forwards_run_in_eval_mode_and_leave_the_mode_and_the_rng_as_found():
    model = tiny_bert().train()
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(module.training))
    callback = SharpnessCallback(probes="trace", eval_batches=_held_out(), trainer=_LogRecorder())
    rng = torch.get_rng_state()
    callback.check_batches(model)
    assert seen == [False, False] and model.training and torch.equal(torch.get_rng_state(), rng)


def test_probe_seconds_is_the_duration_of_the_probes_not_a_clock_reading():
    import time

    callback = SharpnessCallback(probes="sam_sharpness", eval_batches=_held_out())
    model = tiny_bert()
    before = time.perf_counter()
    seconds = callback.measure(model)[SECONDS_KEY]
    assert 0.0 <= seconds <= time.perf_counter() - before


def test_the_top_eigenvalue_probe_also_reads_plain_tensor_eval_batches_as_separate_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    batches = [torch.randn(5, 3), torch.randn(2, 3)]

    def loss_fn(module, x):
        return module(x).pow(2).mean()

    metrics = SharpnessCallback(probes="top_eigenvalue", eval_batches=batches, loss_fn=loss_fn).measure(model)
    separate = top_eigenvalues(model, loss_fn, iter(batches), tol=1e-3, max_iter=64)
    assert metrics[PROBE_KEYS["top_eigenvalue"]] == float(separate.values[0])
