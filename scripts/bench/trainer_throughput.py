"""Throughput of SAMTrainer relative to the stock Trainer (same base optimizer), side by side in one process.

Trains a small BERT token classifier with ``transformers.Trainer`` and with ``SAMTrainer`` in alternating
rounds, times each optimizer step with a callback (after warm-up steps), and reports samples/s and the
ratio SAM ÷ stock per configuration — with and without gradient accumulation. ``ratio`` uses wall-clock
step times; ``ratio_cpu_time`` uses process CPU time, which other jobs on a shared machine do not disturb
(meaningful with ``--threads 1`` on CPU). Full SAM does two
forward+backward passes per step, so 0.5 is the ceiling; the target is ≥ 0.47.

    python scripts/bench/trainer_throughput.py --out bench_results/trainer_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from _report import write_report  # scripts/bench is on sys.path
from transformers import BertConfig, BertForTokenClassification, Trainer, TrainerCallback, TrainingArguments

from arrcoc_sam import SAMTrainer, SAMTrainingArguments

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _StepTimer(TrainerCallback):
    """(wall-clock, process CPU) time stamps at every optimizer-step end."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append((time.perf_counter(), time.process_time()))


def _model(hidden: int, layers: int, seq_len: int) -> BertForTokenClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=seq_len, num_labels=9)
    return BertForTokenClassification(config)


def _data(n: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (n, seq_len), generator=gen)
    return [{"input_ids": row, "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": row % 9}
            for row in ids]


def _step_seconds(sam: bool, opts: argparse.Namespace, accumulation: int) -> tuple[list[float], list[float]]:
    """Per-step (wall-clock seconds, process CPU seconds) after the warm-up steps."""
    micro = opts.batch_size // accumulation
    steps = opts.warmup + opts.steps
    common = {"output_dir": tempfile.mkdtemp(prefix="bench_"), "report_to": "none", "use_cpu": not torch.cuda.is_available(),
              "max_steps": steps, "per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation,
              "optim": "adamw_torch", "learning_rate": 1e-4, "logging_steps": steps, "save_strategy": "no",
              "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0}
    if sam:
        args = SAMTrainingArguments(**common, optimizer=opts.optimizer, rho=opts.rho)
        trainer_cls = SAMTrainer
    else:
        args, trainer_cls = TrainingArguments(**common), Trainer
    timer = _StepTimer()
    trainer = trainer_cls(model=_model(opts.hidden, opts.layers, opts.seq_len), args=args,
                          train_dataset=_data(opts.batch_size * steps, opts.seq_len), callbacks=[timer])
    trainer.train()
    stamps = timer.stamps[opts.warmup - 1:]
    pairs = list(zip(stamps, stamps[1:], strict=False))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="sam", help="sharpness-aware method to time (default: sam)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16, help="samples per optimizer step")
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="alternating stock/SAM rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="bench_results/trainer_throughput.json")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    results = []
    for accumulation in opts.accumulation:
        wall: dict[str, list[float]] = {"stock": [], "sam": []}
        cpu: dict[str, list[float]] = {"stock": [], "sam": []}
        for _ in range(opts.rounds):
            for name in ("stock", "sam"):
                wall_s, cpu_s = _step_seconds(name == "sam", opts, accumulation)
                wall[name] += wall_s
                cpu[name] += cpu_s
        stock_s, sam_s = statistics.median(wall["stock"]), statistics.median(wall["sam"])
        row = {"gradient_accumulation_steps": accumulation, "samples_per_step": opts.batch_size,
               "stock_samples_per_s": opts.batch_size / stock_s, "sam_samples_per_s": opts.batch_size / sam_s,
               "ratio": stock_s / sam_s,
               # Process CPU time is immune to other jobs on a shared machine (meaningful with --threads 1).
               "ratio_cpu_time": statistics.median(cpu["stock"]) / statistics.median(cpu["sam"]),
               "stock_step_s_median": stock_s, "sam_step_s_median": sam_s, "timed_steps_each": len(wall["sam"])}
        results.append(row)
        print(json.dumps(row))
    report = {"benchmark": "trainer_throughput", "optimizer": opts.optimizer, "rho": opts.rho,
              "base_optimizer": "adamw_torch", "model": {"hidden": opts.hidden, "layers": opts.layers,
                                                          "seq_len": opts.seq_len},
              "device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "results": results}
    write_report(opts.out, report)
    return report


if __name__ == "__main__":
    main()
