"""A micro-batch with a non-finite loss on ONE of 2 gloo processes, through AcceleratedSAM in each scope: its window
takes no step on any rank, so the replicas stay equal and finite (run by tests/test_accelerate_helper.py).
Each argument is ``<scope>:<stage>``: ``pass1``, the loss of rank 1's first micro-batch is infinite at w;
``pass2``, rank 1's losses of the first window are finite at w and infinite at w + ε; ``pass2_alone``, as
``pass2`` but rank 0's gradient of its window's last micro-batch is zero, so its own ascent is skipped and only the
all-reduced sharpness-aware gradient shows the overflow. An optional ``:sam_step`` steps through the sharpness-aware
optimizer (``SAM.step()``, as SAMTrainer does: the window built with ``loop_steps_base=False``) instead of the base
optimizer (AcceleratedSAM's loop).

Writes ``non_finite_<scope>_<stage>_<rank>.json`` (its own file: the ranks' writes to one pipe can interleave) with
``{"scope", "stage", "rank", "finite", "replicas_equal", "trained"}`` into the working directory.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from accelerate_common import LR, flat, mse, regression_data, tiny_mlp  # noqa: E402

from arrcoc_sam.integrations._window import SAMWindow  # noqa: E402
from arrcoc_sam.integrations.accelerate import AcceleratedSAM  # noqa: E402
from arrcoc_sam.integrations.launch import shutdown_process_group  # noqa: E402


def same_on_all_ranks(vector: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return all(torch.equal(gathered[0], other) for other in gathered)


def run(scope: str, stage: str, path: str) -> dict:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_mlp()
    loader = DataLoader(regression_data(32), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1, scope=scope)
    if path == "sam_step":
        sam._window = SAMWindow(accelerator, scope, loop_steps_base=False)
    windows = 0
    rank_one = accelerator.process_index == 1
    for index, batch in enumerate(loader):
        def loss_fn(m, b, index=index, first_window=windows == 0, last=index % 2 == 1):
            if stage == "pass1":
                factor = math.inf if rank_one and index == 0 else 1.0
            elif stage == "pass2_alone" and not rank_one and first_window and (last or scope == "per_device"):
                factor = 0.0  # rank 0's ascent of this window (or micro-batch) is skipped
            else:
                factor = math.inf if rank_one and first_window and sam.sam_optimizer.is_perturbed else 1.0
            return mse(m, b) * factor

        with accelerator.accumulate(model):
            sam.backward(loss_fn, batch)
            if path == "sam_step" and accelerator.sync_gradients:
                sam.sam_optimizer.step()
            elif path != "sam_step":
                optimizer.step()
            optimizer.zero_grad()
        windows += int(accelerator.sync_gradients)
    weights = flat(accelerator.unwrap_model(model))
    return {"scope": scope, "stage": stage, "path": path, "rank": accelerator.process_index,
            "finite": bool(torch.isfinite(weights).all()), "replicas_equal": same_on_all_ranks(weights),
            "trained": not torch.equal(weights, flat(tiny_mlp()))}


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        scope, stage, path = (argument.split(":") + ["base"])[:3]
        result = run(scope, stage, path)
        Path(f"non_finite_{scope}_{stage}_{path}_{result['rank']}.json").write_text(json.dumps(result),
                                                                                  encoding="utf-8")
    shutdown_process_group()
