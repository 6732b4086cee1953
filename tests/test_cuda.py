"""CUDA paths of the engine: skipped without a GPU (CI has none); run by scripts/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from arrcoc_sam.sam.optimizer import SAM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8))


def batches(n: int, device: str):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 32, generator=gen).to(device), torch.randn(16, 8, generator=gen).to(device)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    out = model(x)
    if out.dtype in (torch.float16, torch.bfloat16):  # autocast outputs; float64 runs stay float64
        out = out.float()
    return nn.functional.mse_loss(out, y)


def closure_step(model, opt, batch):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    return opt.step(closure)


@pytest.mark.parametrize("adaptive", [False, True])
def test_cuda_float64_step_matches_cpu_float64(adaptive):
    cpu = make_model().double()
    gpu = copy.deepcopy(cpu).cuda()
    opt_cpu = SAM(cpu.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.1, adaptive=adaptive)
    opt_gpu = SAM(gpu.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.1, adaptive=adaptive)
    for x, y in batches(5, "cpu"):
        closure_step(cpu, opt_cpu, (x.double(), y.double()))
        closure_step(gpu, opt_gpu, (x.double().cuda(), y.double().cuda()))
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=0, atol=1e-10)


def test_cuda_fp16_grad_scaler_loop_matches_fp32_reference():
    model = make_model().cuda()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05)
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    for batch in batches(10, "cuda"):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model, batch)
        scaler.scale(loss).backward()
        with opt.perturbed() as ok:
            if ok:
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.float16):
                    scaler.scale(loss_fn(model, batch)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        closure_step(ref, ref_opt, batch)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.float32  # master weights stay fp32 and are what gets perturbed
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)


def test_cuda_bf16_autocast_perturbs_fp32_master_weights_and_restores_bitwise():
    model = make_model().cuda()
    before = copy.deepcopy(model.state_dict())
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0, rho=0.05)
    for batch in batches(5, "cuda"):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_fn(model, batch).backward()
        with opt.perturbed() as ok:
            assert ok
            assert not torch.equal(model[0].weight, before["0.weight"])
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss_fn(model, batch).backward()
        opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def host_syncs_in_one_step(model: nn.Module, opt: SAM) -> int:
    """The host syncs of perturb + restore + step after one full step (whose leftovers the ascent reads)."""
    batch = batches(1, "cuda")[0]
    closure_step(model, opt, batch)
    loss_fn(model, batch).backward()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            opt.perturb()
            opt.restore()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in record)


@pytest.mark.parametrize(("track_stats", "expected"), [(True, 2), (False, 1)])
def test_cuda_step_makes_no_host_sync_beyond_the_ascents_and_the_update_check(track_stats, expected):
    """One sync decides the ascent; with the pass-2 statistics a second one checks the sharpness-aware gradient."""
    model = make_model().cuda()
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=1e-3, foreach=True)
    opt.track_stats = track_stats
    assert host_syncs_in_one_step(model, opt) == expected


def test_cuda_fused_adamw_checks_the_update_on_the_device_without_a_host_sync():
    """With torch's fused AdamW the step's non-finite check is its ``found_inf`` flag: a SAM step syncs once (the
    ascent, which also reads the previous steps' skip count) and a NaN step leaves weights and moments as they were."""
    model = make_model().cuda()
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=1e-3, fused=True)
    assert host_syncs_in_one_step(model, opt) == 1
    batch = batches(1, "cuda")[0]
    before = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(opt.base_optimizer.state_dict()["state"])
    opt.zero_grad()
    loss_fn(model, batch).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    after = opt.base_optimizer.state_dict()["state"]
    assert all(torch.equal(moments[i][k], after[i][k]) for i in moments for k in moments[i])
    assert opt.skipped_updates == 1


@pytest.mark.parametrize("chunk", ["default", 3000])
def test_cuda_multi_tensor_statistics_match_float64_and_clones_are_bitwise(monkeypatch, chunk):
    """One flattened chunk (the default) and several, with a tensor of a chunk of its own (chunk 3000)."""
    from arrcoc_sam.sam import perturbation

    if chunk != "default":
        monkeypatch.setattr(perturbation, "ACCELERATOR_FLAT_CHUNK_NUMEL", chunk)
        assert perturbation.flat_chunk_numel(torch.device("cuda")) == chunk
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(s, generator=gen) for s in [(64, 32), (32,), (5, 7, 3), (1000,)] * 10 + [(4000,)]]
    b = [torch.randn(t.shape, generator=gen) * (1 if i % 3 else -20) for i, t in enumerate(a)]
    stats = perturbation.dot_and_squared_norms([t.cuda() for t in a], [t.cuda() for t in b]).cpu().double()
    exact = torch.tensor([
        sum(float(torch.dot(x.double().reshape(-1), y.double().reshape(-1))) for x, y in zip(a, b)),
        sum(float(x.double().square().sum()) for x in a),
        sum(float(y.double().square().sum()) for y in b),
    ], dtype=torch.float64)
    scale = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(a, b))
    assert abs(stats[0] - exact[0]) <= 1e-6 * scale
    torch.testing.assert_close(stats[1:], exact[1:], rtol=1e-5, atol=0)
    copies = perturbation.clone_all([t.cuda() for t in a])
    assert all(torch.equal(c.cpu(), t) for c, t in zip(copies, a))


def test_cuda_restore_with_statistics_dispatches_a_constant_number_of_ops():
    from op_counting import VIEW_OPS, OpCounter

    not_launches = VIEW_OPS | {"unbind", "select", "slice", "squeeze", "unsqueeze", "empty_like", "empty",
                               "empty_strided"}

    def launches(layers: int) -> tuple[int, dict]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)]).cuda()
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        x = torch.randn(4, 8, device="cuda")
        model(x).square().mean().backward()
        counter = OpCounter()
        with counter:
            assert opt.perturb()
        model(x).square().mean().backward()
        with counter:
            opt.restore()
        assert torch.isfinite(opt.stats["grad_cosine"])
        return counter.launches(not_launches), dict(counter.counts)

    few, many = launches(2), launches(40)
    assert few[0] == many[0], (few[1], many[1])


@pytest.mark.parametrize("name", ["esam", "fsam", "gsam", "looksam", "msam", "periodic"])
def test_cuda_variant_float64_steps_match_cpu_float64(name):
    """Each variant's closure step on CUDA follows the CPU trajectory (float64; ESAM's default tensor SWP draws its
    masks on CPU, so both devices perturb the same tensors and select the same examples)."""
    from test_sam_engine import make_batches, make_mlp
    from test_variants import LR, MOMENTUM, VARIANT_KNOBS, per_example_closure, sam_closure

    from arrcoc_sam.sam.registry import build_sam_optimizer

    trajectories = {}
    for device in ("cpu", "cuda"):
        model = make_mlp().to(device)
        opt = build_sam_optimizer(name, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM,
                                  **VARIANT_KNOBS[name])
        closure = per_example_closure if name == "esam" else sam_closure
        for batch in make_batches(6):
            opt.step(closure(model, opt, tuple(t.to(device) for t in batch)))
        trajectories[device] = torch.cat([p.detach().cpu().flatten() for p in model.parameters()])
    assert (trajectories["cuda"] - trajectories["cpu"]).abs().max().item() <= 1e-12


def _dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3)).double().cuda()


def test_cuda_esam_closure_step_selects_under_pass_one_dropout_masks():
    """ESAM.step's no-grad forward at w + ε replays pass 1's CUDA generator state: at a negligible ρ every rise
    is ~0 (fresh masks at p = 0.5 would move the losses by O(1))."""
    from test_variants import esam_closure_rises

    rises = esam_closure_rises(_dropout_mlp())
    assert len(rises) == 3 and max(rise.abs().max().item() for rise in rises) < 1e-6


def test_cuda_accelerate_esam_selection_replays_each_micro_batch_dropout_masks():
    """The window's no-grad forwards at w + ε replay each micro-batch's pass-1 CUDA generator state."""
    from accelerate import Accelerator
    from test_variants_accelerate import esam_window_rises

    accelerator = Accelerator(gradient_accumulation_steps=2)
    assert accelerator.device.type == "cuda"
    rises = esam_window_rises(accelerator, _dropout_mlp())
    assert len(rises) == 3 and max(rise.abs().max().item() for rise in rises) < 1e-6


@pytest.mark.parametrize("optimizer, sam_args", [
    ("sam", ""), ("asam", ""), ("periodic", "interval=2"), ("looksam", "interval=2"),
    ("esam", "beta=0.5,gamma=1.0,seed=3"), ("gsam", ""), ("fsam", ""), ("msam", ""),
])
def test_cuda_trainer_fp16_run_with_a_grad_scaler_tracks_the_fp32_run(tmp_path, optimizer, sam_args):
    """SAMTrainer with --fp16 on CUDA (autocast, Accelerate's GradScaler: both passes' gradients scaled) follows
    the fp32 run on the same GPU: the same update direction and size, and the logged norms free of the scale."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
    from trainer_common import flat_params, tiny_bert, token_dataset, trainer_kwargs

    from arrcoc_sam import SAMTrainer, SAMTrainingArguments
    from arrcoc_sam.sam.variants.esam import per_example_loss

    micro, accumulation, steps, init_scale = 4, 2, 4, 2.0**8

    def window_mean_loss(outputs, labels, num_items_in_batch=None):
        return per_example_loss(outputs, {"labels": labels}).sum() / (micro * accumulation)

    def run(fp16: bool):
        args = SAMTrainingArguments(**trainer_kwargs(
            str(tmp_path / f"fp16_{fp16}"), use_cpu=False, fp16=fp16, optimizer=optimizer, rho=0.05, optim_args="momentum=0.9",
            sam_args=sam_args or None, per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
            max_steps=steps))
        trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(micro * accumulation * steps),
                             compute_loss_func=window_mean_loss)
        if fp16:
            trainer.accelerator.scaler = torch.amp.GradScaler("cuda", init_scale=init_scale, growth_interval=1000)
        trainer.train()
        return trainer

    start = flat_params(tiny_bert())
    full, half = run(False), run(True)
    assert half.accelerator.scaler.get_scale() == init_scale  # no overflow: every step went through
    moved_full, moved_half = flat_params(full.model).cpu() - start, flat_params(half.model).cpu() - start
    cosine = float(moved_half @ moved_full / (moved_half.norm() * moved_full.norm()))
    assert cosine > 0.99 and abs(float(moved_half.norm() / moved_full.norm()) - 1) < 0.02, cosine
    logged = [[h for h in t.state.log_history if "loss" in h] for t in (full, half)]
    assert len(logged[0]) == len(logged[1]) == steps
    for log_full, log_half in zip(*logged):
        for key in ("sam/grad_norm", "sam/grad_norm_perturbed", "sam/grad_cosine"):
            if key in log_full:
                assert log_half[key] == pytest.approx(log_full[key], rel=0.02, abs=1e-3), key


@pytest.mark.parametrize("method, knobs", [
    ("sam", {}), ("asam", {}), ("periodic", {"interval": 2}), ("looksam", {"interval": 2}),
    ("esam", {"beta": 0.5, "gamma": 1.0, "seed": 3}), ("gsam", {}), ("fsam", {}), ("msam", {}),
])
def test_cuda_accelerate_fp16_loop_with_a_grad_scaler_tracks_the_fp32_loop(method, knobs):
    """AcceleratedSAM under Accelerator(mixed_precision="fp16") (autocast, GradScaler) follows the fp32 loop on the
    same GPU: the same update direction and size, and the metrics' norms free of the scale."""
    import sys
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
    from accelerate_common import flat, mse, regression_data, tiny_mlp

    from arrcoc_sam.integrations.accelerate import AcceleratedSAM

    init_scale = 2.0**8

    def run(precision: str):
        AcceleratorState._reset_state(True)  # the precision is process-wide state
        GradientState._reset_state()
        accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=2)
        if precision == "fp16":
            accelerator.scaler = torch.amp.GradScaler("cuda", init_scale=init_scale, growth_interval=1000)
        model = tiny_mlp()
        loader = DataLoader(regression_data(32), batch_size=4)
        model, optimizer, loader = accelerator.prepare(
            model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loader)
        sam = AcceleratedSAM(accelerator, model, optimizer, method=method, rho=0.05, **knobs)
        norms = []
        for batch in loader:
            with accelerator.accumulate(model):
                sam.backward(mse, batch)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                norms.append(sam.metrics().get("sam/grad_norm"))
        return flat(accelerator.unwrap_model(model)).cpu(), norms, accelerator

    start = flat(tiny_mlp())
    (full, full_norms, _), (half, half_norms, accelerator) = run("no"), run("fp16")
    assert accelerator.scaler.get_scale() == init_scale  # no overflow: every step went through
    moved_full, moved_half = full - start, half - start
    cosine = float(moved_half @ moved_full / (moved_half.norm() * moved_full.norm()))
    assert cosine > 0.99 and abs(float(moved_half.norm() / moved_full.norm()) - 1) < 0.02, cosine
    assert len(full_norms) == len(half_norms) == 4
    assert any(n is not None for n in full_norms) or method == "msam", full_norms  # msam: no pass-1 gradient norm
    for norm_full, norm_half in zip(full_norms, half_norms):
        assert (norm_full is None) == (norm_half is None)
        if norm_full is not None:
            assert norm_half == pytest.approx(norm_full, rel=0.02)
