"""torchrun (2 gloo processes): a plain transformers.Trainer with SharpnessCallback every 2 steps.

Writes ``sharpness_rank{R}.json`` into the cwd: that rank's ``log_history`` and its final weights' checksum.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments, default_data_collator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_common import flat_params, tiny_bert, token_dataset, trainer_kwargs  # noqa: E402

from arrcoc_sam.integrations.callbacks import PROBE_KEYS, SharpnessCallback  # noqa: E402
from arrcoc_sam.integrations.launch import shutdown_process_group  # noqa: E402

torch.set_num_threads(1)

held_out = token_dataset(8, seed=7)
callback = SharpnessCallback(
    every_n_steps=2,
    probes=tuple(PROBE_KEYS),
    eval_batches=[default_data_collator(held_out[:4]), default_data_collator(held_out[4:])],
    num_probes=4,
    max_iter=8,
)
args = TrainingArguments(**trainer_kwargs("out", max_steps=4, per_device_train_batch_size=4, ddp_backend="gloo"))
trainer = Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(32), callbacks=[callback])
callback.bind(trainer)
trainer.train()

rank = dist.get_rank()
params = flat_params(trainer.model)
with open(f"sharpness_rank{rank}.json", "w") as handle:
    json.dump({"log_history": trainer.state.log_history, "weights": params.tolist()}, handle)
del trainer, callback  # the DDP model must be unreferenced before the group goes
shutdown_process_group()  # barrier, then destroy the group
