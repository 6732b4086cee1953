"""Every variant through the Accelerate helper (the base optimizer steps itself) equals its own closure step."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from test_sam_engine import make_batches, make_mlp, max_abs_diff, mse

from arrcoc_sam.integrations.accelerate import AcceleratedSAM
from arrcoc_sam.sam.registry import build_sam_optimizer
from arrcoc_sam.sam.variants import VARIANTS

LR, MOMENTUM, RHO = 0.05, 0.9, 0.1
KNOBS = {
    "periodic": {"interval": 2},
    "looksam": {"interval": 2, "alpha": 0.5},
    "esam": {"beta": 0.5, "gamma": 1.0},
    "gsam": {"alpha": 0.3},
    "fsam": {"sigma": 1.0},
    "msam": {},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_accelerate_loop_with_accumulation_matches_closure_step_on_whole_batch(name):
    batches = make_batches(6)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    sam = AcceleratedSAM(accelerator, model, optimizer, method=name, rho=RHO, **KNOBS[name])
    for x, y in batches:
        for micro in ((x[:4], y[:4]), (x[4:], y[4:])):
            with accelerator.accumulate(model):
                sam.backward(mse, micro)
                optimizer.step()
                optimizer.zero_grad()
        assert not sam.sam_optimizer.is_perturbed
    if name in ("periodic", "looksam"):
        assert sam.sam_optimizer.optimizer_steps == len(batches) - 1  # the last step is counted by the next window

    ref = make_mlp()
    ref_opt = build_sam_optimizer(name, ref.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, rho=RHO, **KNOBS[name])
    for batch in batches:

        def closure(batch=batch):
            ref_opt.zero_grad()
            loss = mse(ref, batch)
            loss.backward()
            return loss

        ref_opt.step(closure)
    assert max_abs_diff(accelerator.unwrap_model(model), ref) <= 1e-12
    assert max_abs_diff(ref, make_mlp()) > 1e-3


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
