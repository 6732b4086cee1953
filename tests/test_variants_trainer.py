"""Each cheaper variant through SAMTrainer: 2 gloo processes, gradient accumulation 2, clean-weight checks, resume."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from test_variants_accelerate import RHO, bert_windows, esam_closure_reference

from arrcoc_sam import SAMTrainer, SAMTrainingArguments
from arrcoc_sam.sam.variants import VARIANTS
from arrcoc_sam.sam.variants.esam import PerExampleLossUnavailable, per_example_loss

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from trainer_common import flat_params, tiny_bert, token_dataset, trainer_kwargs  # noqa: E402

SCRIPT = Path(__file__).parent / "dist_scripts" / "variants_trainer.py"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_variant_trains_resumes_and_never_exposes_perturbed_weights_under_ddp(run_torchrun):
    """One torchrun for all variants (startup dominates); the script asserts, per variant: equal weights on
    both ranks, agreement with the variant's own closure step on the global batch (and not with ρ = 0),
    clean weights at every step boundary, evaluation forward and checkpoint, and a bitwise resume."""
    proc = run_torchrun(SCRIPT, *sorted(VARIANTS), timeout=400)
    done = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VARIANT-OK")}
    assert done == set(VARIANTS)


def _example_mean_loss(outputs, labels, num_items_in_batch=None):
    """The Trainer's pass-1 loss: the mean of per_example_loss over the micro-batch (ESAM's closure weighting)."""
    return per_example_loss(outputs, {"labels": labels}).mean()


def test_trainer_esam_data_selection_with_accumulation_matches_closure_step_on_each_window(tmp_path):
    steps, micro, accumulation, lr = 3, 4, 2, 0.05
    args = SAMTrainingArguments(**trainer_kwargs(
        str(tmp_path / "out"), optimizer="esam", rho=RHO, sam_args="beta=0.5,gamma=0.5,seed=3", learning_rate=lr,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, max_steps=steps,
    ))
    model = tiny_bert()
    trainer = SAMTrainer(model=model, args=args, train_dataset=token_dataset(steps * micro * accumulation),
                         compute_loss_func=_example_mean_loss)
    examples = {"grad": 0, "no_grad": 0}

    def count(module, args, kwargs):
        examples["grad" if torch.is_grad_enabled() else "no_grad"] += kwargs["input_ids"].shape[0]

    model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.train()
    window_size = micro * accumulation
    chosen = math.ceil(0.5 * window_size)
    assert examples == {"grad": steps * (window_size + chosen), "no_grad": steps * window_size}

    names = {id(p): n for n, p in trainer.model.named_parameters()}
    order = [names[id(p)] for group in trainer.optimizer.optimizer.param_groups for p in group["params"]]

    def in_trainer_order(ref_model):  # ESAM draws its masks in parameter order
        named = dict(ref_model.named_parameters())
        return [named[n] for n in order]

    windows = bert_windows(steps, micro, accumulation)
    got = flat_params(trainer.model)
    gap = (esam_closure_reference(windows, 0.5, in_trainer_order, lr=lr) - got).abs().max().item()
    whole_batch_gap = (esam_closure_reference(windows, 1.0, in_trainer_order, lr=lr) - got).abs().max().item()
    assert gap <= 1e-6 and whole_batch_gap > 100 * gap, (gap, whole_batch_gap)


def test_default_per_example_loss_matches_hand_computed_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100], [0, -100, 4, 3], [-100, -100, -100, -100]])

    def hand(logits, labels):  # mean over each example's labelled tokens of -log softmax(logits)[label]
        out = []
        for row_logits, row_labels in zip(logits, labels, strict=True):
            terms = [-torch.log_softmax(row_logits[t].double(), 0)[y] for t, y in enumerate(row_labels.tolist())
                     if y != -100]
            out.append(sum(terms) / len(terms) if terms else torch.zeros((), dtype=torch.float64))
        return torch.stack(out)

    got = per_example_loss({"logits": logits}, {"labels": labels})
    assert torch.allclose(got.double(), hand(logits, labels), atol=1e-12)
    shifted = per_example_loss({"logits": logits}, {"labels": labels}, shift_labels=True)
    assert torch.allclose(shifted.double(), hand(logits[:, :-1], labels[:, 1:]), atol=1e-12)
    sequence = per_example_loss({"logits": logits[:, 0]}, {"labels": torch.tensor([1, 0, 4])})
    assert torch.allclose(sequence.double(), hand(logits[:, :1], torch.tensor([[1], [0], [4]])), atol=1e-12)
    with pytest.raises(PerExampleLossUnavailable, match="logits"):
        per_example_loss(torch.zeros(3, 5), {"labels": labels})
    with pytest.raises(PerExampleLossUnavailable, match="integer labels"):
        per_example_loss({"logits": logits[:, 0]}, {"labels": torch.zeros(3)})
