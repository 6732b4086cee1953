"""Every variant through the Accelerate helper (the base optimizer steps itself) equals its own closure step."""

from __future__ import annotations

import itertools
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_sam_engine import make_batches, make_mlp, max_abs_diff, mse, sam_closure_step
from test_variants import CheckpointedMLP, swp_draw

from arrcoc_sam.integrations.accelerate import AcceleratedSAM
from arrcoc_sam.sam.optimizer import SAM
from arrcoc_sam.sam.registry import build_sam_optimizer
from arrcoc_sam.sam.variants import VARIANTS
from arrcoc_sam.sam.variants.esam import per_example_loss

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from trainer_common import flat_params, tiny_bert, token_dataset  # noqa: E402

from arrcoc_sam.integrations._window import _may_prune  # noqa: E402

LR, MOMENTUM, RHO = 0.05, 0.9, 0.1
KNOBS = {
    "periodic": {"interval": 2},
    "looksam": {"interval": 2, "alpha": 0.5},
    "esam": {"beta": 0.5, "gamma": 1.0},
    "gsam": {"alpha": 0.3},
    "fsam": {"sigma": 1.0},
    "msam": {},
}


def train_in_halves(accelerator, model, optimizer, sam, batches) -> None:
    """The documented Accelerate loop: each batch of 8 as two micro-batches of 4 inside ``accumulate``; the
    weights are clean again after every batch."""
    for x, y in batches:
        for micro in ((x[:4], y[:4]), (x[4:], y[4:])):
            with accelerator.accumulate(model):
                sam.backward(mse, micro)
                optimizer.step()
                optimizer.zero_grad()
        assert not sam.sam_optimizer.is_perturbed


def train_whole_batches(accelerator, model, optimizer, sam, batches, loss_fn=mse) -> None:
    """The documented Accelerate loop over ``batches`` (a list, or a prepared DataLoader whose end closes a short
    last window)."""
    for batch in batches:
        with accelerator.accumulate(model):
            sam.backward(loss_fn, batch)
            optimizer.step()
            optimizer.zero_grad()


def prepared(name: str):
    """``(accelerator, model, optimizer, sam)``: the MLP and SGD with momentum prepared for accumulation 2, ``name``
    with its ``KNOBS``."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    return accelerator, model, optimizer, AcceleratedSAM(accelerator, model, optimizer, method=name, rho=RHO, **KNOBS[name])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_accelerate_loop_with_accumulation_matches_closure_step_on_whole_batch(name):
    batches = make_batches(6)
    accelerator, model, optimizer, sam = prepared(name)
    train_in_halves(accelerator, model, optimizer, sam, batches)
    if name in ("periodic", "looksam"):
        assert sam.sam_optimizer.optimizer_steps == len(batches) - 1  # the last step is counted by the next window

    ref = closure_reference(name, batches)
    assert max_abs_diff(accelerator.unwrap_model(model), ref) <= 1e-12
    assert max_abs_diff(ref, make_mlp()) > 1e-3


def closure_reference(name: str, batches) -> torch.nn.Module:
    """The MLP after ``name``'s own step(closure) with its ``KNOBS`` on each whole batch of 8."""
    ref = make_mlp()
    ref_opt = build_sam_optimizer(name, ref.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO, **KNOBS[name])
    for batch in batches:
        sam_closure_step(ref, ref_opt, batch)
    return ref


def test_accelerate_save_state_round_trips_the_variant_state(tmp_path):
    batches = make_batches(4)

    def build():
        accelerator = Accelerator(cpu=True)
        model = make_mlp()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
        sam = AcceleratedSAM(accelerator, model, optimizer, method="looksam", rho=RHO, interval=3, alpha=0.5)
        return accelerator, model, optimizer, sam

    accelerator, model, optimizer, sam = build()
    for batch in batches:
        with accelerator.accumulate(model):
            sam.backward(mse, batch)
            optimizer.step()
            optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "ckpt"))
    saved = sam.state_dict()
    assert saved["buffers"]["direction"], "LookSAM's stored direction must be in the checkpoint"

    accelerator, model, optimizer, resumed = build()
    accelerator.load_state(str(tmp_path / "ckpt"))
    loaded = resumed.state_dict()
    assert loaded["optimizer_steps"] == saved["optimizer_steps"]
    for index, tensor in saved["buffers"]["direction"].items():
        assert torch.equal(loaded["buffers"]["direction"][index], tensor)


def test_load_state_before_the_helper_is_built_is_refused_instead_of_dropping_the_variant_state(tmp_path):
    """prepare -> load_state -> AcceleratedSAM lost LookSAM's counter and direction silently (torch ignores the
    entry no wrapper is there to read), and the checkpoint's rho passed for the run's own per-group setting."""
    batches = make_batches(3)
    accelerator = Accelerator(cpu=True)
    model = make_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="looksam", rho=RHO, interval=3, alpha=0.5)
    for batch in batches:
        sam.backward(mse, batch)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "ckpt"))

    accelerator = Accelerator(cpu=True)
    model = make_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    accelerator.load_state(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="accelerator.load_state ran before AcceleratedSAM was built"):
        AcceleratedSAM(accelerator, model, optimizer, method="looksam", rho=0.4, interval=3, alpha=0.5)
    # a fresh optimizer whose every group carries the user's own rho/adaptive/eta is not a loaded checkpoint
    accelerator = Accelerator(cpu=True)
    model = make_mlp()
    groups = [{"params": [p], "rho": rho, "adaptive": False, "eta": 0.01}
              for p, rho in zip(model.parameters(), itertools.cycle([RHO, 0.0]))]
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam")
    assert [group["rho"] for group in sam.sam_optimizer.param_groups][:2] == [RHO, 0.0]


def failing_mse(fail_on_call: int, error: type[BaseException] = RuntimeError):
    """``mse`` that raises ``error("boom")`` on its ``fail_on_call``-th call (1-based), after the forward pass."""
    calls = [0]

    def loss(model, batch):
        calls[0] += 1
        value = mse(model, batch)
        if calls[0] == fail_on_call:
            raise error("boom")
        return value

    return loss


def stored_buffers(optimizer):
    """Copies of a variant's persistent buffers (LookSAM's direction, Friendly-SAM's average), in parameter order."""
    return {name: [t.clone() for t in by_param.values()] for name, by_param in optimizer.buffers.items()}


def same_buffers(a, b) -> bool:
    return a.keys() == b.keys() and all(
        len(a[name]) == len(b[name]) and all(map(torch.equal, a[name], b[name])) for name in a)


@pytest.mark.parametrize("name, fail_on_call, error", [
    ("looksam", 3, RuntimeError), ("msam", 1, RuntimeError), ("looksam", 3, KeyboardInterrupt),
    ("fsam", 3, RuntimeError), ("gsam", 3, RuntimeError),
])
def test_accelerate_window_that_raises_leaves_clean_weights_and_counts_nothing(name, fail_on_call, error):
    """looksam, fsam, gsam: the replay's first micro-batch raises on an ascent step (looksam also on a Ctrl-C there);
    msam: pass 1 (run at w + ε) raises. The stored state is as before the window, and the retried window trains
    exactly as in a run where nothing failed (fsam's average kept the failed window's gradient: max|w − w_twin|
    2.5e-4 after the retry and one window more)."""
    accelerator, model, optimizer, sam = prepared(name)
    batches = make_batches(4)
    train_in_halves(accelerator, model, optimizer, sam, batches[:2])
    opt = sam.sam_optimizer
    clean = [p.detach().clone() for p in model.parameters()]
    stored = stored_buffers(opt)
    steps = opt.optimizer_steps
    x, y = batches[2]
    loss_fn = failing_mse(fail_on_call, error)
    with pytest.raises(error, match="boom"):
        for micro in ((x[:4], y[:4]), (x[4:], y[4:])):
            with accelerator.accumulate(model):
                sam.backward(loss_fn, micro)
                optimizer.step()
                optimizer.zero_grad()
    assert not opt.is_perturbed
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), clean, strict=True))
    assert same_buffers(stored_buffers(opt), stored)
    assert opt.optimizer_steps == steps + 1  # the 2nd batch's step, counted when the failed window began
    optimizer.zero_grad()
    accelerator.step = 0  # Accelerate counted the failed micro-batch: realign its accumulation windows
    train_in_halves(accelerator, model, optimizer, sam, batches[2:3])  # the loop goes on; the failed window
    assert opt.optimizer_steps == steps + 1  # counted nothing, so the retry is step 2 again
    train_in_halves(accelerator, model, optimizer, sam, batches[3:])
    twin_accelerator, twin, twin_optimizer, twin_sam = prepared(name)
    train_in_halves(twin_accelerator, twin, twin_optimizer, twin_sam, batches)
    assert max_abs_diff(model, twin) == 0  # nothing of the failed window (its micro-batches, its losses) remains
    assert same_buffers(stored_buffers(opt), stored_buffers(twin_sam.sam_optimizer))


def causal_lm():
    """A 1-layer GPT-2 (vocabulary 40, 8 positions) and 8 rows of 8 tokens labelled with themselves."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(8):
        ids = torch.randint(0, 40, (8,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return model, rows


def test_accelerate_esam_selecting_every_example_on_a_causal_lm_updates_like_the_whole_batch_replay():
    """γ just below 1 selects every example: the default per-example loss must score next-token labels as the
    model's own loss does, or the chosen examples' gradient is another loss's."""
    updates = []
    for gamma in (1.0, 0.9999):
        model, rows = causal_lm()
        before = flat_params(model)
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
        sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, beta=1.0, gamma=gamma)
        for micro in (rows[:4], rows[4:]):
            with accelerator.accumulate(model):
                sam.backward(lambda m, b: m(**b).loss, {k: torch.stack([r[k] for r in micro]) for k in micro[0]})
                optimizer.step()
                optimizer.zero_grad()
        updates.append(flat_params(model) - before)
    whole, selected = updates
    assert whole.abs().max() > 0
    assert (selected - whole).abs().max() <= 1e-5 * whole.abs().max()


# -- ESAM's data selection (SDS) through the helper, on a tiny BERT token classifier -------------------
def bert_windows(steps: int, micro: int, accumulation: int) -> list[list[dict[str, torch.Tensor]]]:
    rows = token_dataset(steps * micro * accumulation)
    stacked = [{k: torch.stack([r[k] for r in rows[i:i + micro]]) for k in rows[0]} for i in range(0, len(rows), micro)]
    return [stacked[s * accumulation:(s + 1) * accumulation] for s in range(steps)]


def _bert_forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def esam_closure_reference(windows, gamma: float, params_of=lambda model: model.parameters(), swp="coordinate",
                           **sgd) -> torch.Tensor:
    """ESAM's own step(per-example closure) on each whole window (micro-batches concatenated), BERT weights."""
    model = tiny_bert()
    opt = build_sam_optimizer("esam", list(params_of(model)), torch.optim.SGD, rho=RHO, beta=0.5, gamma=gamma,
                              seed=3, swp=swp, **sgd)
    for window in windows:
        batch = {k: torch.cat([m[k] for m in window]) for k in window[0]}

        def closure(indices=None, batch=batch):
            sub = batch if indices is None else {k: v[indices] for k, v in batch.items()}
            return per_example_loss(_bert_forward(model, sub), sub)

        opt.step(closure)
    return flat_params(model)


@pytest.mark.parametrize("swp, checkpointing", [("coordinate", False), ("tensor", False), ("tensor", True)])
def test_accelerate_esam_data_selection_matches_closure_step_and_trains_on_chosen_examples_only(swp, checkpointing):
    steps, micro, accumulation = 3, 4, 2
    windows = bert_windows(steps, micro, accumulation)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = tiny_bert()
    if checkpointing:  # reentrant checkpointing tracks a block's inputs only: pass 1 keeps every gradient
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": True})
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, beta=0.5, gamma=0.5, seed=3, swp=swp)
    examples = {"grad": 0, "no_grad": 0, "grad_perturbed": 0}
    pruned_forwards = []  # the chosen tensors of a pass-1 forward that leaves the others without gradient

    def count(module, args, kwargs):
        size = kwargs["input_ids"].shape[0]
        examples["grad" if torch.is_grad_enabled() else "no_grad"] += size
        examples["grad_perturbed"] += size if torch.is_grad_enabled() and sam.sam_optimizer.is_perturbed else 0
        if not all(p.requires_grad for p in module.parameters()):
            pruned_forwards.append({id(p) for p in module.parameters() if p.requires_grad})

    model.register_forward_pre_hook(count, with_kwargs=True)

    def loss_fn(m, batch):
        return per_example_loss(_bert_forward(m, batch), batch).mean()

    for window in windows:
        for batch in window:
            with accelerator.accumulate(model):
                sam.backward(loss_fn, batch)
                optimizer.step()
                optimizer.zero_grad()
    window_size = micro * accumulation
    chosen = math.ceil(0.5 * window_size)
    # pass 1 on every example; at w + ε one no-grad forward of the window, forward+backward on ⌈γB⌉ examples
    assert examples == {"grad": steps * (window_size + chosen), "no_grad": steps * window_size,
                        "grad_perturbed": steps * chosen}
    if swp == "tensor" and not checkpointing:  # each pass-1 forward after the first window (the checkpointing
        # probe, in full), and no other, is pruned to that step's tensors
        assert len(pruned_forwards) == (steps - 1) * accumulation and len({frozenset(f) for f in pruned_forwards}) > 1
        assert 0 < len(pruned_forwards[0]) < len(list(model.parameters()))
    else:
        assert pruned_forwards == []
    got = flat_params(accelerator.unwrap_model(model))
    gap = (esam_closure_reference(windows, 0.5, swp=swp, lr=LR, momentum=MOMENTUM) - got).abs().max().item()
    whole_batch_gap = (esam_closure_reference(windows, 1.0, swp=swp, lr=LR, momentum=MOMENTUM) - got).abs().max().item()
    assert gap <= 1e-6 and whole_batch_gap > 100 * gap, (gap, whole_batch_gap)


def test_accelerate_esam_without_logits_falls_back_to_whole_batch_with_one_warning(caplog):
    batches = make_batches(4)
    accelerator = Accelerator(cpu=True)
    model = make_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, beta=1.0, gamma=0.5)
    twin = make_mlp()
    twin_opt = build_sam_optimizer("esam", twin.parameters(), torch.optim.SGD, lr=LR, rho=RHO, beta=1.0, gamma=1.0)
    with caplog.at_level("WARNING"):
        for batch in batches:
            with accelerator.accumulate(model):
                sam.backward(mse, batch)
                optimizer.step()
                optimizer.zero_grad()
            sam_closure_step(twin, twin_opt, batch)
    assert caplog.text.count("sharpness-sensitive data selection") == 1
    assert max_abs_diff(accelerator.unwrap_model(model), twin) <= 1e-12


def test_accelerate_esam_with_own_per_example_loss_on_tuple_batches_matches_closure_step_in_float64():
    """per_example_loss_fn overrides the default; tuple batches are split by example; float64 agreement."""
    batches = make_batches(5)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, beta=0.5, gamma=0.25, seed=1,
                         per_example_loss_fn=lambda out, batch: ((out - batch[1]) ** 2).mean(dim=1))
    train_in_halves(accelerator, model, optimizer, sam, batches)

    def reference(gamma):
        ref = make_mlp()
        opt = build_sam_optimizer("esam", ref.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO,
                                  beta=0.5, gamma=gamma, seed=1)
        for x, y in batches:

            def closure(indices=None, x=x, y=y):
                xs, ys = (x, y) if indices is None else (x[indices], y[indices])
                return ((ref(xs) - ys) ** 2).mean(dim=1)

            opt.step(closure)
        return ref

    got = accelerator.unwrap_model(model)
    assert max_abs_diff(got, reference(0.25)) <= 1e-12
    assert max_abs_diff(got, reference(1.0)) > 1e-4


def test_accelerate_esam_keeps_every_pass_one_gradient_of_a_compiled_model_and_matches_the_closure_step():
    """torch.compile guards on requires_grad, so a pruned pass 1 would recompile for each new tensor draw."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    batches = make_batches(6)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    inner = make_mlp()
    model, optimizer = accelerator.prepare(torch.compile(inner, backend=backend),
                                           torch.optim.SGD(inner.parameters(), lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, **KNOBS["esam"])
    train_in_halves(accelerator, model, optimizer, sam, batches)
    assert len(graphs) == 1  # one graph for every pass of every step
    assert max_abs_diff(inner, closure_reference("esam", batches)) <= 1e-12


def test_pass_one_is_not_pruned_on_models_compiled_in_place_or_checkpointing():
    plain, in_place, checkpointing = make_mlp(), make_mlp(), tiny_bert()
    in_place.compile()
    (getattr(checkpointing, "activation_checkpointing_enable", None) or checkpointing.gradient_checkpointing_enable)()
    assert _may_prune(plain) and _may_prune(tiny_bert())
    assert not _may_prune(in_place) and not _may_prune(checkpointing)
    assert not _may_prune(torch.compile(make_mlp()))



def _pass_one_records(model) -> list[bool]:
    """Per forward with grad enabled: whether some parameter had ``requires_grad`` off (a pruned pass 1)."""
    records: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: records.append(
        not all(p.requires_grad for p in module.parameters())) if torch.is_grad_enabled() else None)
    return records


def test_accelerate_esam_probes_the_first_window_for_reentrant_checkpointing_that_pruning_would_break(caplog):
    """Reentrant checkpointing inside a plain module (no flag _may_prune could read) would drop the block's
    chosen weights from a pruned pass 1 whenever the block's input needs no gradient; the first window that
    could prune runs pass 1 in full and finds it in the graph, so pass 1 is never pruned for that model."""
    seed = next(s for s in range(200) if (d := swp_draw(s, 1, 6)) and not any(d[:2]) and any(d[2:4]))
    batches, models, records = make_batches(4), {}, {}
    with caplog.at_level("INFO", logger="arrcoc_sam.integrations._window"):
        for checkpointed in (True, False):
            accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
            inner = CheckpointedMLP(checkpointed)
            records[checkpointed] = _pass_one_records(inner)
            model, optimizer = accelerator.prepare(inner, torch.optim.SGD(inner.parameters(), lr=LR, momentum=MOMENTUM))
            sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, seed=seed, **KNOBS["esam"])
            train_in_halves(accelerator, model, optimizer, sam, batches)
            models[checkpointed] = inner
    assert max_abs_diff(models[True], models[False]) <= 1e-12  # the same steps as without checkpointing
    assert len([r for r in caplog.records if "reentrant activation checkpointing" in r.message]) == 1
    assert len(records[True]) == len(records[False]) == 4 * len(batches)  # 2 micro-batches: pass 1 and replay
    assert not any(records[True])
    # without checkpointing: window 0 is the probe, then pass 1 is pruned to each step's draw
    assert records[False][0::4] == [False] + [not all(swp_draw(seed, t, 6)) for t in range(1, len(batches))]


@pytest.mark.parametrize("name", ["sam", *sorted(VARIANTS)])
def test_accelerate_bf16_mixed_precision_on_cpu_equals_the_closure_step_under_autocast(name):
    """Accelerator(mixed_precision="bf16") runs the forward under torch.autocast with fp32 weights: every pass
    of the step (ESAM's pruned pass 1 included) must be the closure step's with its forward under autocast."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # the precision is process-wide state
    GradientState._reset_state()
    knobs = KNOBS.get(name, {})
    batches = make_batches(6, dtype=torch.float32)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = make_mlp(dtype=torch.float32)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method=name, rho=RHO, **knobs)
    train_whole_batches(accelerator, model, optimizer, sam, batches)

    def reference(autocast: bool) -> torch.nn.Module:
        ref = make_mlp(dtype=torch.float32)
        forward = ref.forward
        ref.forward = lambda x: _under_bf16_autocast(forward, x) if autocast else forward(x)
        ref_opt = build_sam_optimizer(name, ref.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO, **knobs)
        for batch in batches:
            sam_closure_step(ref, ref_opt, batch)
        return ref

    got = accelerator.unwrap_model(model)
    assert max_abs_diff(got, reference(autocast=True)) == 0
    assert max_abs_diff(got, reference(autocast=False)) > 1e-5


def _under_bf16_autocast(forward, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return forward(x)


class _OutputInAnObject(torch.nn.Module):
    """make_mlp whose forward returns its output inside a plain object, where no probe can look."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()

    def forward(self, x):
        return types.SimpleNamespace(prediction=self.mlp(x))


def test_accelerate_esam_keeps_every_pass_one_gradient_when_the_outputs_show_no_graph_to_search():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    inner = _OutputInAnObject()
    records = _pass_one_records(inner)
    model, optimizer = accelerator.prepare(inner, torch.optim.SGD(inner.parameters(), lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, **KNOBS["esam"])
    batches = make_batches(4)
    for x, y in batches:
        for micro in ((x[:4], y[:4]), (x[4:], y[4:])):
            with accelerator.accumulate(model):
                sam.backward(lambda m, b: ((m(b[0]).prediction - b[1]) ** 2).mean(), micro)
                optimizer.step()
                optimizer.zero_grad()
    assert len(records) == 4 * len(batches) and not any(records)
    assert max_abs_diff(inner.mlp, closure_reference("esam", batches)) <= 1e-12


def test_accelerate_loop_with_clipping_and_a_scheduler_matches_the_perturb_restore_reference():
    """The documented loop with accelerator.clip_grad_norm_ and a prepared scheduler (accumulation 2): clipping
    sees the sharpness-aware gradient of the window, the schedule steps once per optimizer step."""
    batches, max_norm = make_batches(6), 0.05
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, base, scheduler)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=RHO)
    norms = []
    for x, y in batches:
        for micro in ((x[:4], y[:4]), (x[4:], y[4:])):
            with accelerator.accumulate(model):
                sam.backward(mse, micro)
                if accelerator.sync_gradients:
                    norms.append(float(accelerator.clip_grad_norm_(model.parameters(), max_norm)))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

    reference = make_mlp()
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO)
    ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 1.0 / (1 + step))
    ref_norms = []
    for batch in batches:
        ref_opt.zero_grad()
        mse(reference, batch).backward()
        with ref_opt.perturbed():
            ref_opt.zero_grad()
            mse(reference, batch).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)))
        ref_opt.step()
        ref_scheduler.step()
    assert max_abs_diff(accelerator.unwrap_model(model), reference) <= 1e-12
    assert norms == pytest.approx(ref_norms, rel=1e-12) and min(norms) > max_norm  # every step clipped
    assert scheduler.scheduler.last_epoch == ref_scheduler.last_epoch == len(batches)


class _BranchNet(torch.nn.Module):
    """Two heads; each batch ``(x, y, use_side)`` goes through one of them only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(5, 3).double()
        self.side = torch.nn.Linear(5, 3).double()

    def forward(self, x, use_side):
        return self.side(x) if use_side else self.body(x)


def _branch_mse(model, batch):
    x, y, use_side = batch
    return ((model(x, use_side) - y) ** 2).mean()


def test_accelerate_esam_pruned_pass_one_skips_a_micro_batch_that_reaches_no_drawn_tensor():
    """Tensor SWP drew only the side head's tensors for a window whose batch takes the body: the pruned pass 1
    has no graph. Its backward is skipped (it raised), and the run equals a manual perturb/restore loop that
    computes every pass-1 gradient."""
    # a seed whose draw at some step t >= 1 (step 0 probes for checkpointing, unpruned) holds side tensors only,
    # on a body batch (even steps)
    steps = 6
    seed = next(s for s in range(500) if any(
        (d := swp_draw(s, t, 4)) and not any(d[:2]) and any(d[2:]) for t in range(2, steps, 2)))
    batches = [(*batch, index % 2 == 1) for index, batch in enumerate(make_batches(steps))]
    knobs = {"rho": RHO, "beta": 0.5, "gamma": 1.0, "seed": seed}

    accelerator = Accelerator(cpu=True)
    model = _BranchNet()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", **knobs)
    train_whole_batches(accelerator, model, optimizer, sam, batches, _branch_mse)

    ref = _BranchNet()
    ref_opt = build_sam_optimizer("esam", ref.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **knobs)
    for batch in batches:
        ref_opt.zero_grad()
        _branch_mse(ref, batch).backward()
        if ref_opt.perturb():
            ref_opt.zero_grad()
            _branch_mse(ref, batch).backward()
        ref_opt.restore()
        ref_opt.step()
    assert max_abs_diff(accelerator.unwrap_model(model), ref) <= 1e-15
    assert max_abs_diff(ref, _BranchNet()) > 1e-3


@pytest.mark.parametrize(("accumulation", "batch_size", "examples"), [(3, 2, 8), (1, 4, 10)])
def test_accelerate_esam_selection_never_runs_a_lone_example_through_batchnorm(accumulation, batch_size, examples):
    """γ=0.5 chose one example of a last batch of 2, or 3 of a window of micro-batches of 2 (run as 2 + 1): the
    lone example crashed BatchNorm ("Expected more than 1 value per channel"). With BatchNorm in training mode
    at least two are chosen, and no regrouped sub-batch holds fewer."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 3)).double()
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(examples, 5, dtype=torch.float64), torch.randn(examples, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, beta=1.0, gamma=0.5,
                         per_example_loss_fn=lambda outputs, batch: ((outputs - batch[1]) ** 2).mean(dim=1))
    forward_sizes = []
    accelerator.unwrap_model(model).register_forward_pre_hook(lambda module, args: forward_sizes.append(len(args[0])))
    train_whole_batches(accelerator, model, optimizer, sam, loader)
    assert min(forward_sizes) >= 2 and not sam.sam_optimizer.is_perturbed
    assert not torch.equal(accelerator.unwrap_model(model)[3].weight, start[-2])  # it trained


def test_accelerate_fsam_takes_a_short_windows_gradient_in_mean_gradient_units():
    """Accelerate divides every loss by the k accumulation steps, so a last window of m < k micro-batches holds
    m/k of its mean gradient, while Friendly-SAM's average is over full windows: its ascent went downhill there
    (cos(ε, g) −0.5 to −0.7). Reference: F-SAM's closure step on each whole window, lr scaled by m/k."""
    x, y = (torch.cat(parts) for parts in zip(*make_batches(4)))
    x, y = x[:28], y[:28]  # 7 micro-batches of 4: windows of 3, 3 and 1
    knobs = {"rho": 0.5, "sigma": 1.0, "ema_decay": 0.6}
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model = make_mlp()
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="fsam", **knobs)
    for _ in range(2):
        train_whole_batches(accelerator, model, optimizer, sam, loader)

    ref = make_mlp()
    ref_opt = build_sam_optimizer("fsam", ref.parameters(), torch.optim.SGD, lr=LR, **knobs)
    for _ in range(2):
        for start, stop in ((0, 12), (12, 24), (24, 28)):
            ref_opt.param_groups[0]["lr"] = LR * min((stop - start) / 12, 1.0)
            sam_closure_step(ref, ref_opt, (x[start:stop], y[start:stop]))
    assert max_abs_diff(accelerator.unwrap_model(model), ref) <= 1e-12


def test_accelerate_esam_choosing_every_example_of_uneven_micro_batches_takes_the_stock_step():
    """Micro-batches of 4, 4 and 2 in one window: the chosen examples were weighted alike and scaled by a
    loss-dependent factor (2.94-3.27 for 3), so γ just below 1 stepped 0.80-1.06x as far as γ = 1. Now each
    micro-batch weighs as its own loss does, and γ → 1 is the stock step."""
    x, y = (torch.cat(parts) for parts in zip(*make_batches(2)))
    x[8:] *= 3.0  # the short micro-batch's losses differ from the others'

    def train(gamma):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:10], y[:10]), batch_size=4)
        model = make_mlp()
        model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
        sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=RHO, beta=1.0, gamma=gamma,
                             per_example_loss_fn=lambda outputs, batch: ((outputs - batch[1]) ** 2).mean(dim=1))
        train_whole_batches(accelerator, model, optimizer, sam, loader)
        return accelerator.unwrap_model(model)

    assert max_abs_diff(train(0.9999), train(1.0)) <= 1e-14


def esam_window_rises(accelerator: Accelerator, model: torch.nn.Module) -> list[torch.Tensor]:
    """Each window's perturbed − clean per-example losses that ESAM's selection ranks, at a negligible ρ: three
    windows of two micro-batches of 4 on ``accelerator``'s device."""
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=1e-9, beta=1.0, gamma=0.5,
                         per_example_loss_fn=lambda outputs, batch: ((outputs - batch[1]) ** 2).mean(dim=1))
    rises = []
    select = sam.sam_optimizer.select_examples
    sam.sam_optimizer.select_examples = lambda clean, perturbed, **kw: (
        rises.append(perturbed - clean) or select(clean, perturbed, **kw))
    for x, y in make_batches(3):
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        for micro in ((x[:4], y[:4]), (x[4:], y[4:])):
            with accelerator.accumulate(model):
                sam.backward(mse, micro)
                optimizer.step()
                optimizer.zero_grad()
    return rises


def test_accelerate_esam_selection_compares_each_example_under_its_own_pass_one_dropout_masks():
    """The perturbed losses came from a forward with fresh dropout masks, so at p = 0.1 the "rise" was mostly
    dropout noise (a top-50 % overlap of 0.59 with the same-mask selection, 0.5 being chance). The no-grad
    forward at w + ε now replays its pass 1's random draws: at a negligible ρ every rise is ~0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.5), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double()
    rises = esam_window_rises(Accelerator(cpu=True, gradient_accumulation_steps=2), model)
    assert len(rises) == 3 and max(rise.abs().max().item() for rise in rises) < 1e-6


def test_esam_window_whose_drawn_tensors_have_no_gradient_logs_no_ascent_figures():
    """Tensor SWP runs pass 2 even when the drawn tensors had no gradient to ascend along (an unused tensor); such
    a window was logged as an ascent, with sharpness 0 and the previous window's sam/grad_norm and sam/rho."""

    class WithUnusedTensor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(4, 1, dtype=torch.float64)
            self.unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x)

    accelerator = Accelerator(cpu=True)
    model = WithUnusedTensor()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="esam", rho=0.1, beta=0.3, gamma=1.0, seed=0)
    perturbed_forwards = []
    model.register_forward_pre_hook(lambda module, args: perturbed_forwards.append(sam.sam_optimizer.is_perturbed))
    gen = torch.Generator().manual_seed(1)
    ascended_windows = replays_at_w = 0
    for _ in range(12):
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        perturbed_forwards.clear()
        with accelerator.accumulate(model):
            sam.backward(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), (x, x.sum(1, keepdim=True)))
            optimizer.step()
            optimizer.zero_grad()
        metrics = sam.metrics()
        ascended, logged = any(perturbed_forwards), "sam/grad_norm" in metrics
        assert logged == ascended and ("sam/sharpness" in metrics) == ascended
        ascended_windows += ascended
        replays_at_w += len(perturbed_forwards) == 2 and not ascended
    assert 0 < ascended_windows < 12 and replays_at_w > 0


@pytest.mark.parametrize("kwargs, named", [
    ({"method": "looksam", "interval": 0}, r"sam_interval must be >= 1, got 0 \(AcceleratedSAM's interval=\)"),
    ({"method": "periodic", "interval": 2.5}, r"got 2.5 \(float\) \(AcceleratedSAM's interval=\)"),
    ({"method": "asam", "eta": -1.0}, r"sam_eta must be a finite number >= 0, got -1.0 \(AcceleratedSAM's eta=\)"),
    ({"method": "esam", "statistics": 1}, r"sam_statistics must be True or False, got 1 \(AcceleratedSAM's statistics=\)"),
    ({"method": "esam", "scope": "node"}, r"sam_scope must be one of .*; got 'node' \(AcceleratedSAM's scope=\)"),
    ({"method": "sam", "interval": 2}, r"does not take interval .*sam_eta \(AcceleratedSAM's keyword arguments\)"),
])
def test_accelerated_sam_errors_name_its_own_keyword_arguments(kwargs, named):
    """The refusals named only the Trainer's flags (sam_interval, sam_eta, sam_statistics), not the keyword argument
    the caller of AcceleratedSAM passed."""
    accelerator = Accelerator(cpu=True)
    model = make_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    with pytest.raises(ValueError, match=named):
        AcceleratedSAM(accelerator, model, optimizer, **kwargs)
