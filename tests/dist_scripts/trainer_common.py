"""Tiny BERT token-classification fixtures shared by the trainer tests and their torchrun scripts."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForTokenClassification

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_LABELS = 5
SEQ_LEN = 8


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertForTokenClassification:
    """A 1-layer, 16-wide BERT token classifier (~3k parameters), deterministic for ``seed``."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ_LEN, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        num_labels=NUM_LABELS,
    )
    return BertForTokenClassification(config)


def token_dataset(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` examples of ``SEQ_LEN`` tokens; trailing positions are padding (label -100), 2..SEQ_LEN real tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, SEQ_LEN + 1, (1,), generator=gen))
        ids = torch.randint(1, 40, (SEQ_LEN,), generator=gen)
        mask = (torch.arange(SEQ_LEN) < length).long()
        labels = torch.where(mask.bool(), ids % NUM_LABELS, torch.full_like(ids, -100))
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return rows


def token_sum_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Token cross-entropy summed over the micro-batch and divided by the window's label count.

    Honours ``num_items_in_batch``, so an accumulation window of micro-batches has exactly the gradient of one
    big batch (BERT's own loss is a per-micro-batch mean that ignores it: transformers issue 47688).
    """
    logits = outputs["logits"].float()
    total = F.cross_entropy(logits.reshape(-1, NUM_LABELS), labels.reshape(-1), ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum()
    return total / count


def trainer_kwargs(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """TrainingArguments defaults for deterministic CPU runs: sequential data, no saving, no reporting."""
    kwargs: dict[str, Any] = {
        "output_dir": output_dir, "report_to": "none", "use_cpu": True, "seed": 0,
        "train_sampling_strategy": "sequential", "learning_rate": 0.05, "optim": "sgd",
        "lr_scheduler_type": "constant", "save_strategy": "no", "disable_tqdm": True,
        "logging_steps": 1, "dataloader_num_workers": 0, "max_grad_norm": 0.0,
    }
    kwargs.update(overrides)
    return kwargs


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one float64 vector (named order)."""
    return torch.cat([p.detach().reshape(-1).double() for _, p in sorted(model.named_parameters())])

