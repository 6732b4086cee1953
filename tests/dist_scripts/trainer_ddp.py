"""torchrun (2 gloo processes) checks of SAMTrainer's scopes; writes ddp_result.json and global.pt into the cwd.

1. ``sam_scope=global``, 2 × (GA 2 × batch 2): final weights (rank 0) saved for comparison with one process
   on the doubled batch; both ranks' weights must be bitwise equal.
2. ``sam_scope=per_device``, 20 steps: both ranks' weights bitwise equal; the gradient each rank's first
   ascent used is that rank's own shard gradient (not the all-reduced one), also with Accelerate's
   ``sync_each_batch`` (one step).
3. The Accelerate helper's checks (accelerate_ddp.py), in the same processes to save a torchrun start-up.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accelerate_ddp import accelerate_checks  # noqa: E402
from trainer_common import (  # noqa: E402
    flat_params,
    tiny_bert,
    token_dataset,
    token_sum_loss,
    trainer_kwargs,
)

from arrcoc_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from arrcoc_sam.integrations.launch import shutdown_process_group  # noqa: E402

torch.set_num_threads(1)


class _RecordingTrainer(SAMTrainer):
    """Records the direction of the gradient the first ascent was taken from."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        perturb = optimizer.perturb

        def recording_perturb():
            if not hasattr(self, "first_ascent_grad"):
                self.first_ascent_grad = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])
            return perturb()

        optimizer.perturb = recording_perturb
        return optimizer


def _train(scope: str, steps: int, out: str, sync_each_batch: bool = False, **overrides) -> _RecordingTrainer:
    args = SAMTrainingArguments(**trainer_kwargs(out, **{
        "max_steps": steps, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "sam_scope": scope, "rho": 0.05, "ddp_find_unused_parameters": False,
        "accelerator_config": {"gradient_accumulation_kwargs": {"sync_each_batch": sync_each_batch}}, **overrides,
    }))
    trainer = _RecordingTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8 * steps),
                                compute_loss_func=token_sum_loss)
    trainer.train()
    return trainer


def _same_on_all_ranks(vector: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return all(torch.equal(gathered[0], other) for other in gathered)


def _own_shard_gradient(rank: int) -> torch.Tensor:
    """Gradient (up to scale) of this rank's first window at init: micro-batches rank and rank + 2, of size 2."""
    data = token_dataset(16)
    model = tiny_bert()
    window = [data[i * 2:(i + 1) * 2] for i in (rank, rank + 2)]
    model.zero_grad()
    for micro in window:
        batch = {k: torch.stack([row[k] for row in micro]) for k in micro[0]}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        token_sum_loss(out, batch["labels"], 1.0).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def main() -> None:
    global_run = _train("global", 3, "out_global")
    dist.barrier()
    rank = dist.get_rank()
    result = {"global_replicas_equal": _same_on_all_ranks(flat_params(global_run.model))}
    if rank == 0:
        torch.save(flat_params(global_run.model), "global.pt")
        result["global_log_keys"] = sorted(next(h for h in global_run.state.log_history if "loss" in h))

    # DDP(static_graph=True), accumulation 1: ESAM's tensor SWP (pass 1 then keeps every gradient) on 2 x 4
    static_run = _train("global", 3, "out_static", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                        ddp_static_graph=True, optimizer="esam", sam_args="beta=0.5,gamma=1.0,seed=3")
    result["static_graph_replicas_equal"] = _same_on_all_ranks(flat_params(static_run.model))
    if rank == 0:
        torch.save(flat_params(static_run.model), "static_esam.pt")

    local_run = _train("per_device", 20, "out_local")
    result["per_device_replicas_equal"] = _same_on_all_ranks(flat_params(local_run.model))
    used = local_run.first_ascent_grad / local_run.first_ascent_grad.norm()
    own = _own_shard_gradient(rank)
    averaged = own.clone()
    dist.all_reduce(averaged)
    own, averaged = own / own.norm(), averaged / averaged.norm()
    result[f"rank{rank}_own_shard_diff"] = float((used - own).abs().max())
    result[f"rank{rank}_averaged_diff"] = float((used - averaged).abs().max())
    # sync_each_batch all-reduces every micro-batch; per_device must still keep pass 1 local
    synced_run = _train("per_device", 1, "out_sync_each_batch", sync_each_batch=True)
    used = synced_run.first_ascent_grad / synced_run.first_ascent_grad.norm()
    result[f"rank{rank}_own_shard_diff_sync_each_batch"] = float((used - own).abs().max())
    result["accelerate"] = accelerate_checks()
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if rank == 0:
        merged = {k: v for r in results for k, v in r.items() if k.startswith("rank")}
        merged["global_replicas_equal"] = all(r["global_replicas_equal"] for r in results)
        merged["per_device_replicas_equal"] = all(r["per_device_replicas_equal"] for r in results)
        merged["static_graph_replicas_equal"] = all(r["static_graph_replicas_equal"] for r in results)
        merged["global_log_keys"] = result["global_log_keys"]
        merged["accelerate"] = [r["accelerate"] for r in results]
        with open("ddp_result.json", "w") as handle:
            json.dump(merged, handle)


if __name__ == "__main__":
    main()
    shutdown_process_group()
