"""torchrun (2 gloo processes): run ``scripts/train_relevance.py`` ARGS and check how it ends its process group.

``TrainingArguments`` creates the default process group while the flags are parsed; the script must still
destroy it, and only once nothing references the Trainer's DDP model any more (a reducer freed after the group
has gone, at interpreter exit, can abort the process). Writes ``shutdown_rank{R}.json`` into the cwd: how many
times the group was destroyed, the live DDP modules counted at each destruction, and the script's exit status.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
from pathlib import Path

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_relevance.py"
destroy_process_group = dist.destroy_process_group
live_ddp_at_destroy: list[int] = []


def counting_destroy(*args, **kwargs):
    live_ddp_at_destroy.append(sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects()))
    return destroy_process_group(*args, **kwargs)


dist.destroy_process_group = counting_destroy
sys.argv = [str(SCRIPT), *sys.argv[1:]]
try:
    runpy.run_path(str(SCRIPT), run_name="__main__")
    status = 0
except SystemExit as exit_:
    status = exit_.code or 0
with open(f"shutdown_rank{os.environ['RANK']}.json", "w") as handle:
    json.dump({"status": status, "live_ddp_at_destroy": live_ddp_at_destroy,
               "initialized_at_exit": dist.is_initialized()}, handle)
