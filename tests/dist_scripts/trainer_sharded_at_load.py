"""SAMTrainer on a model transformers shards at load time (``from_pretrained(distributed_config=...)``), 2 gloo ranks.

Usage (under torchrun, 2 processes): ``trainer_sharded_at_load.py WORKDIR OUT.json``. Rank 0 saves a tiny Llama to
``WORKDIR/ckpt``; each rank loads it with ``DistributedConfig(fsdp_size=2)`` (FSDP2 DTensors, reduction held back
by the Trainer's own deferral, not Accelerate's ``no_sync``). One launch measures:

* 3 steps of ``--optimizer sam`` at gradient accumulation 2 against a float64 full-batch SAM reference computed
  on one unsharded copy, and whether the replicas end bitwise equal;
* the reduce-scatters per step against the stock Trainer's: pass 1 and the replay each reduce once per window,
  so twice the stock count (the replay's first micro-batch held back as the stock loop holds pass 1's);
* ``--sam_scope per_device``: refused (the ranks hold no gradient of their own there), with the message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.distributed import DistributedConfig

from arrcoc_sam import SAMTrainer, SAMTrainingArguments
from arrcoc_sam.integrations.launch import shutdown_process_group

EXAMPLES, LENGTH, VOCAB, STEPS, LR, RHO = 8, 8, 64, 3, 0.1, 0.05


def save_model(directory: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, attention_dropout=0.0)
    LlamaForCausalLM(config).to(torch.float64).save_pretrained(directory)


def rows() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=torch.Generator().manual_seed(123))
    return [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(EXAMPLES)]


def reference(directory: Path) -> dict[str, torch.Tensor]:
    """Float64 SAM with plain SGD over the whole batch of 8 each step (every step of the run sees all of it)."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64)
    ids = torch.stack([row["input_ids"] for row in rows()])
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(STEPS):
        grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        eps = [RHO * g / norm for g in grads]
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)
        with torch.no_grad():
            for p, e, g in zip(params, eps, grads, strict=True):
                p.sub_(e).sub_(LR * g)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train(directory: Path, workdir: Path, scope: str | None) -> tuple[Trainer | None, str | None]:
    """SAMTrainer with ``scope`` (None: the stock Trainer) for STEPS steps; (trainer, None) or (None, refusal)."""
    model = AutoModelForCausalLM.from_pretrained(directory, distributed_config=DistributedConfig(fsdp_size=2),
                                                 dtype=torch.float64)
    common = dict(
        output_dir=str(workdir / f"run_{scope}"), use_cpu=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=STEPS, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", report_to=[], logging_steps=1, seed=0,
        disable_tqdm=True,
    )
    try:
        if scope is None:
            trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows())
        else:
            args = SAMTrainingArguments(**common, optimizer="sam", rho=RHO, sam_scope=scope)
            trainer = SAMTrainer(model=model, args=args, train_dataset=rows())
        trainer.train()
    except ValueError as error:
        return None, str(error)
    return trainer, None


def main() -> None:
    workdir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    try:
        directory = workdir / "ckpt"
        if dist.get_rank() == 0:
            save_model(directory)
        dist.barrier()
        reduce_scatters = [0]
        stock_reduce_scatter = dist.reduce_scatter_single  # what FSDP2 reduces its gradients with

        def counting(*args, **kwargs):
            reduce_scatters[0] += 1
            return stock_reduce_scatter(*args, **kwargs)

        dist.reduce_scatter_single = counting
        train(directory, workdir, None)
        stock_count, reduce_scatters[0] = reduce_scatters[0], 0
        trainer, error = train(directory, workdir, "global")
        counted = reduce_scatters[0]
        dist.reduce_scatter_single = stock_reduce_scatter
        weights = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                   for name, p in trainer.model.named_parameters()}
        gathered = [None, None]
        dist.all_gather_object(gathered, weights)
        expected = reference(directory)
        _, refusal = train(directory, workdir, "per_device")
        if dist.get_rank() == 0:
            out.write_text(json.dumps({
                "error": error,
                "max_error": max(float((weights[k] - expected[k]).abs().max()) for k in expected),
                "replicas_bitwise": all(torch.equal(gathered[0][k], gathered[1][k]) for k in expected),
                "reduce_scatters_per_step": counted / STEPS,
                "stock_reduce_scatters_per_step": stock_count / STEPS,
                "per_device_refusal": refusal,
            }))
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown_process_group()


if __name__ == "__main__":
    main()
