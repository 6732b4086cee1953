"""GPU check: SAMTrainer under Accelerate/Trainer FSDP2 (one process, one GPU) against the same run without FSDP.

World size 1 still takes the whole FSDP2 code path: ``fully_shard`` turns every parameter into a DTensor,
forward all-gathers it, backward reduces the gradients, ``no_sync`` skips the reduction on inner
micro-batches. Each configuration runs in its own subprocess (Accelerate's state is process-wide)::

    fp32: plain  vs fsdp2                      -> final weights and logged figures must agree (<= 1e-5)
    bf16: plain (autocast) vs fsdp2 (bf16 compute, fp32 shards) -> figures reported, shards must stay fp32

Every run: a 2-layer BERT token classifier, SGD, SAM rho=0.05, 6 optimizer steps of 2 micro-batches
(``gradient_accumulation_steps=2``: the window is replayed at w + ε, so each pass reduces once per FSDP unit).

Usage: ``python scripts/fsdp_check.py [--report out.json] [--fp32-only]``. Without CUDA it prints ``SKIP`` and exits 0
(Accelerate FSDP needs GPUs: on CPU it falls back to DDP); it exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

STEPS, ACCUMULATION, MICRO_BATCH, SEQ_LEN, NUM_LABELS = 6, 2, 4, 16, 5
FP32_TOLERANCE = 1e-5


def run_one(mode: str, precision: str, out: Path) -> None:
    """One SAMTrainer run (in this process); saves final weights, log history and FSDP facts to ``out``."""
    import torch
    from transformers import BertConfig, BertForTokenClassification, TrainerCallback

    from arrcoc_sam.integrations.trainer import SAMTrainer, SAMTrainingArguments

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ_LEN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=NUM_LABELS,
    )
    model = BertForTokenClassification(config)
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(STEPS * ACCUMULATION * MICRO_BATCH):
        ids = torch.randint(1, 64, (SEQ_LEN,), generator=gen)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids % NUM_LABELS})

    extra: dict = {}
    if mode == "fsdp2":
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
    args = SAMTrainingArguments(
        output_dir=str(out.parent / f"trainer_{mode}_{precision}"), report_to="none", seed=0,
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION, max_steps=STEPS,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        train_sampling_strategy="sequential", dataloader_num_workers=0, save_strategy="no",
        logging_steps=1, disable_tqdm=True, bf16=precision == "bf16",
        optimizer="sam", rho=0.05, sam_scope="global", **extra,
    )
    facts: dict = {"reductions": 0}

    class CountReductions(TrainerCallback):
        """Counts FSDP2 gradient reductions (one per FSDP unit per synchronised backward)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from torch.distributed.fsdp import FSDPModule

            units = [m for m in model.modules() if isinstance(m, FSDPModule)]
            facts["fsdp_units"] = len(units)
            for unit in units:
                unit.set_all_reduce_hook(lambda _grad: facts.__setitem__("reductions", facts["reductions"] + 1))

    trainer = SAMTrainer(model=model, args=args, train_dataset=data, callbacks=[CountReductions()])
    start = time.perf_counter()
    trainer.train()
    facts["train_s"] = time.perf_counter() - start
    params = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
        for name, p in trainer.model.named_parameters()
    }
    facts["param_types"] = sorted({type(p).__name__ for p in trainer.model.parameters()})
    facts["param_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters()})
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    torch.save({"params": params, "logs": logs, "facts": facts}, out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(mode: str, precision: str, workdir: Path) -> dict:
    """Run :func:`run_one` in a fresh interpreter (FSDP2 as a world-size-1 distributed job) and load its result."""
    import torch

    out = workdir / f"{mode}_{precision}.pt"
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    if mode == "fsdp2":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    cmd = [sys.executable, __file__, "--run", mode, "--precision", precision, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}/{precision} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=True)


def compare(plain: dict, sharded: dict) -> dict:
    """Largest absolute differences between two runs: final weights and each logged figure."""
    diffs = {"weights": max((plain["params"][k] - sharded["params"][k]).abs().max().item() for k in plain["params"])}
    for key in ("loss", "sam/grad_norm", "sam/grad_norm_perturbed", "sam/grad_cosine", "sam/sharpness"):
        pairs = [(a[key], b[key]) for a, b in zip(plain["logs"], sharded["logs"], strict=True) if key in a]
        diffs[key] = max(abs(a - b) for a, b in pairs) if pairs else None
    return diffs


def check(report_path: Path | None, precisions: tuple[str, ...]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("fsdp_check: SKIP (no CUDA device: Accelerate FSDP needs GPUs; on CPU it falls back to DDP)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = {(m, p): spawn(m, p, Path(tmp)) for p in precisions for m in ("plain", "fsdp2")}
    failures = []
    report: dict = {"device": torch.cuda.get_device_name(0)}
    for precision in precisions:
        plain, sharded = runs[("plain", precision)], runs[("fsdp2", precision)]
        facts = sharded["facts"]
        expected_reductions = 2 * STEPS * facts.get("fsdp_units", 0)  # two passes per step, one reduce each
        report[precision] = {
            "diff": compare(plain, sharded),
            "fsdp_facts": facts,
            "expected_reductions": expected_reductions,
            "plain_train_s": plain["facts"]["train_s"],
            "final_loss": {"plain": plain["logs"][-1]["loss"], "fsdp2": sharded["logs"][-1]["loss"]},
            "skipped": [entry.get("sam/skipped_steps", 0) for entry in sharded["logs"]],
        }
        if facts["param_types"] != ["DTensor"]:
            failures.append(f"{precision}: FSDP2 parameters are {facts['param_types']}, not DTensor")
        if facts["param_dtypes"] != ["torch.float32"]:
            failures.append(f"{precision}: sharded parameters are {facts['param_dtypes']}, not float32")
        if facts["reductions"] != expected_reductions:
            failures.append(f"{precision}: {facts['reductions']} gradient reductions, expected {expected_reductions}")
        if len(sharded["logs"]) != STEPS or any(report[precision]["skipped"]):
            failures.append(f"{precision}: expected {STEPS} logged steps without skipped ascents")
        if precision == "fp32":
            worst = max(v for v in report[precision]["diff"].values() if v is not None)
            if worst > FP32_TOLERANCE:
                failures.append(f"fp32: FSDP2 and plain runs differ by {worst:.3g} > {FP32_TOLERANCE}")
    report["failures"] = failures
    print(json.dumps(report, indent=1))
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=1))
    print("fsdp_check:", "FAIL\n  " + "\n  ".join(failures) if failures else "OK")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="write the figures as JSON here")
    parser.add_argument("--fp32-only", action="store_true", help="skip the bf16 pair")
    parser.add_argument("--run", choices=["plain", "fsdp2"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run, args.precision, args.out)
        return 0
    return check(args.report, ("fp32",) if args.fp32_only else ("fp32", "bf16"))


if __name__ == "__main__":
    sys.exit(main())
