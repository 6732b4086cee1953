"""Each cheaper variant through SAMTrainer: 2 gloo processes, gradient accumulation 2, clean-weight checks, resume."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from test_variants_accelerate import RHO, bert_windows, causal_lm, esam_closure_reference

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
    extra = {"esam-coordinate", "esam-selection"}  # (data selection: the per-rank checks, no closure reference)
    proc = run_torchrun(SCRIPT, *sorted(VARIANTS), *sorted(extra), timeout=400)
    done = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VARIANT-OK")}
    assert done == set(VARIANTS) | extra


def _example_mean_loss(window_size: int):
    """A compute_loss_func normalised over the window as HF's contract asks (the Trainer does not divide it by
    the accumulation steps): Σ per_example_loss / examples in the window, ESAM's closure weighting."""

    def loss(outputs, labels, num_items_in_batch=None):
        return per_example_loss(outputs, {"labels": labels}).sum() / window_size

    return loss


@pytest.mark.parametrize("swp", ["coordinate", "tensor"])
def test_trainer_esam_data_selection_with_accumulation_matches_closure_step_on_each_window(tmp_path, swp):
    steps, micro, accumulation, lr = 3, 4, 2, 0.05
    args = SAMTrainingArguments(**trainer_kwargs(
        str(tmp_path / "out"), optimizer="esam", rho=RHO, sam_args=f"beta=0.5,gamma=0.5,seed=3,swp={swp}", learning_rate=lr,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, max_steps=steps,
    ))
    model = tiny_bert()
    trainer = SAMTrainer(model=model, args=args, train_dataset=token_dataset(steps * micro * accumulation),
                         compute_loss_func=_example_mean_loss(micro * accumulation))
    examples = {"grad": 0, "no_grad": 0, "pruned": 0}

    def count(module, args, kwargs):
        examples["grad" if torch.is_grad_enabled() else "no_grad"] += kwargs["input_ids"].shape[0]
        examples["pruned"] += not all(p.requires_grad for p in module.parameters())

    model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.train()
    window_size = micro * accumulation
    chosen = math.ceil(0.5 * window_size)
    # tensor SWP: pass 1 without the others' gradients, after the first window (the checkpointing probe)
    pruned = (steps - 1) * accumulation if swp == "tensor" else 0
    assert examples == {"grad": steps * (window_size + chosen), "no_grad": steps * window_size, "pruned": pruned}

    names = {id(p): n for n, p in trainer.model.named_parameters()}
    order = [names[id(p)] for group in trainer.optimizer.optimizer.param_groups for p in group["params"]]

    def in_trainer_order(ref_model):  # ESAM draws its masks in parameter order
        named = dict(ref_model.named_parameters())
        return [named[n] for n in order]

    windows = bert_windows(steps, micro, accumulation)
    got = flat_params(trainer.model)
    gap = (esam_closure_reference(windows, 0.5, in_trainer_order, swp, lr=lr) - got).abs().max().item()
    whole_batch_gap = (esam_closure_reference(windows, 1.0, in_trainer_order, swp, lr=lr) - got).abs().max().item()
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


def _sequence_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=3)
    model = BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 40, (8,), generator=gen), "labels": torch.randint(0, 3, (), generator=gen)}
            for _ in range(8)]
    return model, rows


def _uneven_causal_lm():
    """causal_lm with 0 to 6 of each row's tokens unlabelled (-100): examples hold different numbers of labels,
    which the stock token-mean loss weights and an example mean would not."""
    model, rows = causal_lm()
    for index, row in enumerate(rows):
        row["labels"] = row["labels"].clone()
        row["labels"][: index % 7] = -100
    return model, rows


def _uneven_token_classifier():
    """tiny_bert (its own loss: a token mean over each micro-batch, ignoring num_items_in_batch) on rows of 2 to 8
    labelled tokens."""
    return tiny_bert(), token_dataset(8)


@pytest.mark.parametrize(
    ("build", "accumulation", "smoothing"),
    [(_sequence_classifier, 2, 0.0), (_sequence_classifier, 1, 0.2), (causal_lm, 2, 0.0), (_uneven_causal_lm, 2, 0.0),
     (_uneven_causal_lm, 2, 0.1), (_uneven_token_classifier, 2, 0.0)],
    ids=["seq_cls_accumulation_2", "label_smoothing", "causal_lm_accumulation_2", "uneven_labels_causal_lm",
         "uneven_labels_label_smoothing", "uneven_labels_micro_batch_mean"],
)
def test_trainer_esam_selecting_every_example_updates_like_the_whole_batch_replay(tmp_path, build, accumulation,
                                                                                   smoothing):
    """γ just below 1 selects every example, so its update must equal γ = 1's (the stock replay) whatever the
    Trainer's loss normalisation (a model that ignores num_items_in_batch: ×GA), label smoothing or next-token
    labels: the selective replay scores and scales examples as the stock loss does."""
    updates = []
    for gamma in (1.0, 0.9999):
        model, rows = build()
        before = flat_params(model)
        args = SAMTrainingArguments(**trainer_kwargs(
            str(tmp_path / f"g{gamma}"), optimizer="esam", rho=RHO, sam_args=f"beta=1.0,gamma={gamma}",
            per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation, max_steps=1,
            label_smoothing_factor=smoothing,
        ))
        SAMTrainer(model=model, args=args, train_dataset=rows).train()
        updates.append(flat_params(model) - before)
    whole, selected = updates
    assert whole.abs().max() > 0
    assert (selected - whole).abs().max() <= 1e-5 * whole.abs().max(), (selected - whole).abs().max() / whole.abs().max()


def test_per_example_loss_applies_label_smoothing_like_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100], [0, -100, 4, 3], [2, 2, 2, 2]])
    got = per_example_loss({"logits": logits}, {"labels": labels}, label_smoothing=0.2)
    for row in range(3):
        kept = labels[row] != -100
        expected = torch.nn.functional.cross_entropy(logits[row][kept], labels[row][kept], label_smoothing=0.2)
        assert torch.allclose(got[row], expected, atol=1e-12)
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\), got 1.0"):
        per_example_loss({"logits": logits}, {"labels": labels}, label_smoothing=1.0)


class _TargetsRegressor(torch.nn.Module):
    """Takes ``**kwargs`` (the Trainer counts it as accepting loss kwargs) but names its labels ``targets``: the
    Trainer then passes ``num_items_in_batch=None`` and divides the loss by the accumulation steps itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x, targets=None, **kwargs):
        out = self.lin(x)
        return {"loss": ((out - targets) ** 2).mean(), "logits": out}


def test_trainer_esam_ranks_with_the_given_per_example_loss_and_logs_in_the_units_of_the_loss(tmp_path):
    gen = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(4, generator=gen), "targets": torch.randn(2, generator=gen)} for _ in range(8)]
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="esam", rho=1e-6, sam_args="beta=1,gamma=0.5",
                                                 per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                                 max_steps=1))
    model = _TargetsRegressor()
    examples = {"grad": 0}

    def count(module, args, kwargs):
        examples["grad"] += kwargs["x"].shape[0] if torch.is_grad_enabled() else 0

    model.register_forward_pre_hook(count, with_kwargs=True)
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows,
                         per_example_loss_fn=lambda out, batch: ((out["logits"] - batch["targets"]) ** 2).mean(1))
    trainer.train()
    assert examples["grad"] == 8 + 4  # pass 1, then the ⌈γB⌉ chosen by the given per-example loss
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert abs(log["sam/sharpness"]) < 1e-4 * log["loss"]  # ρ ≈ 0: the replay's loss in the units of the logged one


class _OwnComputeLoss(SAMTrainer):
    """A Trainer whose loss is customised by overriding compute_loss (not through compute_loss_func)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("customised", ["compute_loss_func", "compute_loss_override"])
def test_trainer_esam_warns_once_that_selection_cannot_follow_a_custom_compute_loss(tmp_path, caplog, customised):
    model, rows = _sequence_classifier()
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="esam", rho=RHO, sam_args="gamma=0.5",
                                                 per_device_train_batch_size=4, max_steps=2))

    def custom_loss(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    if customised == "compute_loss_func":
        trainer = SAMTrainer(model=model, args=args, train_dataset=rows, compute_loss_func=custom_loss)
    else:
        trainer = _OwnComputeLoss(model=model, args=args, train_dataset=rows)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert caplog.text.count("not on the customised compute_loss") == 1


def test_trainer_esam_perturbed_loss_at_a_vanishing_radius_is_the_logged_loss_over_uneven_token_counts(tmp_path):
    """GPT-2 takes num_items_in_batch (its loss: the window's token sum over the window's label count), and the two
    micro-batches of each window hold different numbers of labels. At ρ ≈ 0 the replay's loss is pass 1's, so
    sam/loss_perturbed must be the stock logged loss and sam/sharpness ≈ 0 (a micro-batch token mean is not)."""
    model, rows = _uneven_causal_lm()
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path), optimizer="esam", rho=1e-6, sam_args="beta=1.0,gamma=0.5",
                                                 per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                                 max_steps=1, learning_rate=0.0))
    trainer = SAMTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["sam/loss_perturbed"] == pytest.approx(log["loss"], rel=1e-4)
    assert abs(log["sam/sharpness"]) < 1e-4 * log["loss"]


def test_trainer_esam_prunes_pass_one_of_a_lora_model_without_changing_its_update(tmp_path, monkeypatch):
    """LoRA: only the adapters are trainable; pruning pass 1 to this step's chosen adapters (the frozen base
    needs no gradient either way) must give the very same update as computing every adapter's gradient."""
    peft = pytest.importorskip("peft")
    from test_trainer import _train

    from arrcoc_sam.integrations import _window

    def lora_model():
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
        return peft.get_peft_model(tiny_bert(), config)

    pruned_windows = []
    plan = _window.SAMWindow._plan_first_pass

    def recording_plan(self, model, optimizer):
        plan(self, model, optimizer)
        pruned_windows.append(self._first_pass_tensors is not None)

    monkeypatch.setattr(_window.SAMWindow, "_plan_first_pass", recording_plan)
    kwargs = {"optimizer": "esam", "sam_args": "beta=0.5,gamma=0.5,seed=1", "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 2, "max_steps": 4, "optim": "adamw_torch", "learning_rate": 0.02}
    pruned = _train(tmp_path / "pruned", model=lora_model(), **kwargs)
    assert pruned_windows == [False, True, True, True]  # the first window probes for checkpointing
    monkeypatch.setattr(_window, "_may_prune", lambda model: False)
    full = _train(tmp_path / "full", model=lora_model(), **kwargs)
    assert pruned_windows[4:] == [False] * 4
    assert torch.equal(flat_params(pruned.model), flat_params(full.model))
    assert (flat_params(pruned.model) - flat_params(lora_model())).abs().max() > 1e-3


@pytest.mark.parametrize("optimizer, sam_args", [
    ("sam", None), ("asam", None), ("periodic", "interval=2"), ("looksam", "interval=2"),
    ("esam", "beta=0.5,gamma=0.5,seed=3"), ("gsam", None), ("fsam", None), ("msam", None),
])
def test_every_method_logs_the_same_figures_and_weights_under_a_grad_scaler(tmp_path, optimizer, sam_args):
    """Under fp16's GradScaler both passes' gradients carry the scale; the logged norms must not. Friendly-SAM
    divided its ascent norm by the scale twice (0.0020 logged for 0.517, found on a GPU)."""
    micro, accumulation, steps = 4, 2, 3

    def run(path, scale):
        args = SAMTrainingArguments(**trainer_kwargs(
            str(path), optimizer=optimizer, rho=0.05, sam_args=sam_args, optim_args="momentum=0.9",
            per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, max_steps=steps))
        trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(micro * accumulation * steps),
                             compute_loss_func=_example_mean_loss(micro * accumulation))
        if scale is not None:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
        trainer.train()
        return trainer, [h for h in trainer.state.log_history if "loss" in h]

    (plain, plain_logs), (scaled, scaled_logs) = run(tmp_path / "plain", None), run(tmp_path / "scaled", 2.0**12)
    assert (flat_params(plain.model) - flat_params(scaled.model)).abs().max() < 1e-6
    assert len(plain_logs) == len(scaled_logs) == steps
    for plain_log, scaled_log in zip(plain_logs, scaled_logs, strict=True):
        for key in ("sam/grad_norm", "sam/grad_norm_perturbed", "sam/grad_cosine", "sam/rho"):
            assert (key in plain_log) == (key in scaled_log), key
            if key in plain_log:
                assert scaled_log[key] == pytest.approx(plain_log[key], rel=1e-5), key
