"""Where a training step's time goes, per method: wall time, host (CPU) time, GPU kernel time, kernels and
host syncs per optimizer step, under ``torch.profiler``.

On a GPU a step is either kernel-bound (GPU busy ≈ wall) or launch-bound (the host dispatches kernels
slower than the GPU runs them: GPU busy ≪ wall); there every extra kernel the optimizer launches costs its
host dispatch time, which is why the engine keeps its per-step launch count independent of the number of
parameter tensors. Uses the BERT token classifier and the per-example closure of ``variants.py``. Run::

    python scripts/bench/step_profile.py --methods base sam msam --out bench_results/step_profile.json
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _report import write_report  # scripts/bench is on sys.path
from torch.profiler import ProfilerActivity, profile
from variants import (  # scripts/bench is on sys.path
    METHODS,
    bert_per_example,
    build,
    sync,
    token_classifier_and_batch,
    train_step,
)


def profile_method(method: str, model, batch, device: torch.device, steps: int) -> dict:
    opt = build(method, model, 1e-4, 0.05)
    per_example = bert_per_example(model, batch)
    for _ in range(3):
        train_step(method, opt, per_example)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            train_step(method, opt, per_example)
        sync(device)
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_busy_us = sum(e.device_time for e in kernels) if kernels else 0.0
    syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    d2h = sum(1 for e in events if e.name == "cudaMemcpyAsync")
    return {
        "wall_ms_per_step": 1e3 * wall / steps,
        "host_cpu_ms_per_step": 1e3 * cpu / steps,
        "gpu_kernel_ms_per_step": gpu_busy_us / 1e3 / steps,
        "kernels_per_step": len(kernels) / steps,
        "stream_syncs_per_step": syncs / steps,
        "memcpy_per_step": d2h / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["base", "sam", "msam", "periodic_k5"], choices=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="bench_results/step_profile.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    initial, batch = token_classifier_and_batch(device, args.hidden, args.layers, args.batch_size, args.seq_len)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": f"BERT h{args.hidden} x{args.layers}",
              "batch": [args.batch_size, args.seq_len], "methods": {}}
    print(f"{'method':>12} {'wall ms':>8} {'host ms':>8} {'GPU ms':>8} {'kernels':>8} {'syncs':>6}")
    for method in args.methods:
        row = profile_method(method, copy.deepcopy(initial), batch, device, args.steps)
        report["methods"][method] = row
        print(f"{method:>12} {row['wall_ms_per_step']:8.2f} {row['host_cpu_ms_per_step']:8.2f} "
              f"{row['gpu_kernel_ms_per_step']:8.2f} {row['kernels_per_step']:8.0f} "
              f"{row['stream_syncs_per_step']:6.1f}", flush=True)
    print(f"wrote {write_report(args.out, report)}")


if __name__ == "__main__":
    main()
