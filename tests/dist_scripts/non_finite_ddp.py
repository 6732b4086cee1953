"""A micro-batch with a non-finite loss on ONE of 2 gloo processes, through AcceleratedSAM in each scope: its window
takes no step on any rank, so the replicas stay equal and finite (run by tests/test_accelerate_helper.py).

Writes ``non_finite_<scope>_<rank>.json`` (its own file: the ranks' writes to one pipe can interleave) with
``{"scope", "rank", "finite", "replicas_equal", "trained"}`` into the working directory.
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

from arrcoc_sam.integrations.accelerate import AcceleratedSAM  # noqa: E402
from arrcoc_sam.integrations.launch import shutdown_process_group  # noqa: E402


def same_on_all_ranks(vector: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return all(torch.equal(gathered[0], other) for other in gathered)


def run(scope: str) -> dict:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_mlp()
    loader = DataLoader(regression_data(32), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR), loader)
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1, scope=scope)
    for index, batch in enumerate(loader):
        bad = index == 0 and accelerator.process_index == 1  # rank 1's first micro-batch only
        with accelerator.accumulate(model):
            sam.backward(lambda m, b, bad=bad: mse(m, b) * (math.inf if bad else 1.0), batch)
            optimizer.step()
            optimizer.zero_grad()
    weights = flat(accelerator.unwrap_model(model))
    return {"scope": scope, "rank": accelerator.process_index, "finite": bool(torch.isfinite(weights).all()),
            "replicas_equal": same_on_all_ranks(weights), "trained": not torch.equal(weights, flat(tiny_mlp()))}


if __name__ == "__main__":
    for scope in sys.argv[1:]:
        result = run(scope)
        Path(f"non_finite_{scope}_{result['rank']}.json").write_text(json.dumps(result), encoding="utf-8")
    shutdown_process_group()
