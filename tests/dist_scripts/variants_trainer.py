"""Every cheaper variant through SAMTrainer on 2 gloo processes, gradient accumulation 2.

For each variant (run by tests/test_variants_trainer.py under torchrun):
1. trains 4 optimizer steps (linear lr decay, AdamW, an evaluation and a checkpoint every 2 steps) while a
   callback checks that evaluation, every checkpoint and every step boundary see the clean weights;
2. checks both ranks hold the same weights and that rank 0's matches the variant's own closure step on the
   whole global batch in one process (the hook path of the Trainer computes the same algorithm);
3. resumes from checkpoint-2 in a fresh trainer and checks it lands on the same weights (transformers >= 5.18).
``esam`` runs tensor SWP (pass 1 without the other tensors' gradients, under ``no_sync``, averaged over the
ranks by the window instead of DDP), ``esam-coordinate`` coordinate SWP (pass 1 synced by DDP).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from packaging.version import Version
from safetensors.torch import load_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from trainer_common import (  # noqa: E402
    flat_params,
    tiny_bert,
    token_dataset,
    token_sum_loss,
    trainer_kwargs,
)

from arrcoc_sam import SAMTrainer, SAMTrainingArguments  # noqa: E402
from arrcoc_sam.integrations.launch import shutdown_process_group  # noqa: E402
from arrcoc_sam.sam.registry import build_sam_optimizer  # noqa: E402

# transformers before 5.18 loads a checkpoint's optimizer state with map_location=args.device, which is "cpu:0"
# in a CPU process group, and torch refuses that device: no Trainer resumes there (upstream)
RESUMES_IN_CPU_PROCESS_GROUPS = Version(transformers.__version__) >= Version("5.18")
STEPS, MICRO, ACCUMULATION, LR, RHO = 4, 2, 2, 0.02, 0.1
CONFIGS = {
    "periodic": {"sam_interval": 2},
    "looksam": {"sam_interval": 2, "sam_args": "alpha=0.5"},
    "esam": {"sam_args": "beta=0.5,gamma=1.0,seed=3"},  # tensor SWP: pass 1 pruned, averaged by hand
    "esam-coordinate": {"sam_args": "beta=0.5,gamma=1.0,seed=3,swp=coordinate"},
    # data selection: each rank picks from its own window, so no single-process closure step is the reference
    "esam-selection": {"sam_args": "beta=0.5,gamma=0.5,seed=3"},
    "gsam": {"sam_args": "alpha=0.3,rho_min=0.02"},
    "fsam": {"sam_args": "sigma=1.0,ema_decay=0.6"},
    "msam": {},
}
METHOD = {"esam-coordinate": "esam", "esam-selection": "esam"}  # config name -> --optimizer


class CleanWeightsCheck(TrainerCallback):
    """Asserts that step boundaries, evaluation forwards and checkpoints only ever see the clean weights."""

    def __init__(self) -> None:
        self.trainer = None
        self.snapshots: dict[int, torch.Tensor] = {}
        self.evaluated = 0
        self.perturbed_training_forwards = 0
        self.pruned_training_forwards = 0  # training forwards with some parameter's requires_grad off
        self.perturbed_examples_with_grad = 0  # examples in forwards that back-propagate at w + ε

    def attach(self, trainer: SAMTrainer) -> None:
        self.trainer = trainer
        trainer.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def _sam(self):
        return self.trainer.optimizer.optimizer

    def _pre_forward(self, module, args, kwargs):
        if module.training:
            perturbed = self._sam().is_perturbed
            self.perturbed_training_forwards += int(perturbed)
            self.pruned_training_forwards += not all(p.requires_grad for p in module.parameters())
            if perturbed and torch.is_grad_enabled():
                self.perturbed_examples_with_grad += kwargs["input_ids"].shape[0]
            return
        assert not self._sam().is_perturbed, "evaluation forward at perturbed weights"
        assert torch.equal(flat_params(module), self.snapshots[max(self.snapshots)]), "evaluation saw moved weights"
        self.evaluated += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        assert not self._sam().is_perturbed, f"weights perturbed after optimizer step {state.global_step}"
        self.snapshots[state.global_step] = flat_params(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        assert not self._sam().is_perturbed, "checkpoint written at perturbed weights"
        assert torch.equal(flat_params(model), self.snapshots[state.global_step])


def make_args(name: str, output_dir: str) -> SAMTrainingArguments:
    return SAMTrainingArguments(**trainer_kwargs(
        output_dir, optimizer=METHOD.get(name, name), rho=RHO, learning_rate=LR, optim="adamw_torch", weight_decay=0.0,
        lr_scheduler_type="linear", per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
        per_device_eval_batch_size=4, average_tokens_across_devices=True, **CONFIGS[name],
    ))


def make_trainer(name: str, output_dir: str, callback: TrainerCallback | None = None) -> SAMTrainer:
    trainer = SAMTrainer(
        model=tiny_bert(), args=make_args(name, output_dir), train_dataset=token_dataset(40),
        eval_dataset=token_dataset(8, seed=5), compute_loss_func=token_sum_loss,
        callbacks=[callback] if callback else None,
    )
    if callback is not None:
        callback.attach(trainer)
    return trainer


def closure_reference(name: str, trainer: SAMTrainer, **override: float) -> torch.Tensor:
    """The variant's own step(closure) on each whole global batch of 8 examples, same groups and schedule."""
    model = tiny_bert()
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    named = dict(model.named_parameters())
    groups = [
        {"params": [named[by_id[id(p)]] for p in group["params"]], "weight_decay": group["weight_decay"]}
        for group in trainer.optimizer.optimizer.param_groups
    ]
    base = torch.optim.AdamW(groups, lr=LR)
    params = [p for g in groups for p in g["params"]]
    opt = build_sam_optimizer(METHOD.get(name, name), params, base, **(trainer.args.sam_settings().knobs() | override))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (STEPS - s) / STEPS)
    data = token_dataset(40)
    global_batch = MICRO * ACCUMULATION * 2
    for step in range(STEPS):
        rows = data[step * global_batch:(step + 1) * global_batch]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

        def closure(batch=batch):
            opt.zero_grad()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = token_sum_loss(out, batch["labels"])
            loss.backward()
            return loss

        opt.step(closure)
        schedule.step()
    return flat_params(model)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = sys.argv[1:] or list(CONFIGS)
    for name in names:
        check = CleanWeightsCheck()
        full = make_trainer(name, f"{name}/out", check)
        full.train()
        rank = dist.get_rank()
        final = flat_params(full.model)
        gathered = [torch.empty_like(final) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, final)
        assert torch.equal(gathered[0], gathered[1]), f"{name}: ranks diverged"
        assert check.evaluated > 0 and sorted(check.snapshots) == list(range(1, STEPS + 1))
        if name == "msam":
            assert check.perturbed_training_forwards > 0, "msam never perturbed a training forward"
        # tensor SWP runs each pass-1 forward (2 per step) without the other tensors' gradients, but for the first
        # window's (the probe for reentrant checkpointing); nothing else does
        pruned = (STEPS - 1) * ACCUMULATION if name in ("esam", "esam-selection") else 0
        assert check.pruned_training_forwards == pruned, (name, check.pruned_training_forwards)
        if name.startswith("esam"):  # pass 2 on all 4 examples of this rank's window, or on the chosen ⌈γ·4⌉ = 2
            chosen = 2 if name == "esam-selection" else MICRO * ACCUMULATION
            assert check.perturbed_examples_with_grad == STEPS * chosen, (name, check.perturbed_examples_with_grad)
        gap = unperturbed_gap = float("nan")
        if rank == 0:
            saved = load_file(f"{name}/out/checkpoint-2/model.safetensors")
            saved_flat = torch.cat([saved[n].reshape(-1).double() for n in sorted(saved)])
            assert torch.equal(saved_flat, check.snapshots[2]), f"{name}: checkpoint-2 is not the clean weights"
            assert (final - flat_params(tiny_bert())).abs().max().item() > 1e-3, f"{name}: did not train"
        if rank == 0 and name != "esam-selection":
            gap = (closure_reference(name, full) - final).abs().max().item()
            # float32 through AdamW: agreement to ~1e-5, while the same steps without the ascent land far away
            no_ascent = {"rho": 0.0, **({"rho_min": 0.0} if name == "gsam" else {})}
            unperturbed_gap = (closure_reference(name, full, **no_ascent) - final).abs().max().item()
            assert gap < 5e-5 and 20 * gap < unperturbed_gap, (
                f"{name}: Trainer hook path is {gap} from the closure step and {unperturbed_gap} from rho=0"
            )

        if RESUMES_IN_CPU_PROCESS_GROUPS:
            resumed = make_trainer(name, f"{name}/out")
            resumed.train(resume_from_checkpoint=f"{name}/out/checkpoint-2")
            resume_gap = (flat_params(resumed.model) - final).abs().max().item()
            assert resume_gap == 0.0, f"{name}: resume left the trajectory by {resume_gap}"
        if rank == 0:
            print(f"VARIANT-OK {name} reference_gap={gap:.2e} rho0_gap={unperturbed_gap:.2e}", flush=True)


if __name__ == "__main__":
    main()
    shutdown_process_group()
