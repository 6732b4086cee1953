"""Benchmark batched vs looped robustness evaluation: time(batched) ÷ time(looped) for 32 draws.  target ≤ 0.3

Both paths compute the same relevance maps (the tests check they agree to 1e-6): ``batched`` stacks the
draws (noisy inputs as extra rows, weight draws through ``vmap(functional_call)``), ``looped`` makes one
model call per draw. Timed per perturbation: ``RelevanceRobustness.evaluate`` with only mean |r - r~| and
one bootstrap resample, so the time is the perturbed-relevance computation. Median of ``--repeats`` runs
after a warm-up. Models: ArrCocRelevanceModel with the ARR-COC configuration (32x32 grid, D=384) and a
small one (8x8 grid, D=32) where per-call overhead dominates. Run::

    .venv/bin/python scripts/bench/robustness.py --out bench_results/robustness.json
"""

from __future__ import annotations

import argparse
import functools
import os

import _report  # scripts/bench is on sys.path
import torch

from arrcoc_sam.relevance.robustness import RelevanceRobustness
from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    "arrcoc_g32_d384": dict(grid_size=32, query_dim=384),
    "arrcoc_g8_d32": dict(grid_size=8, query_dim=32),
}
PERTURBATIONS = ("feature_noise", "weight_random")


def bench_model(name: str, overrides: dict, samples: int, draws: int, repeats: int, device: torch.device,
                chunk_rows: int) -> dict:
    torch.manual_seed(0)
    model = ArrCocRelevanceModel(ArrCocRelevanceConfig(**overrides)).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = overrides["grid_size"] ** 2
    batch = {"token_features": torch.rand(samples, tokens, 13, generator=generator).to(device),
             "query_embedding": torch.randn(samples, overrides["query_dim"], generator=generator).to(device)}
    results = {}
    for perturbation in PERTURBATIONS:
        def seconds_of(mode: str, perturbation: str = perturbation) -> float:
            # mean |r - r~| and one bootstrap resample: the time is the perturbed-relevance computation
            evaluator = RelevanceRobustness(levels=(0.1,), k=min(200, tokens), num_draws=draws,
                                            perturbations=(perturbation,), metrics=("mean_abs_diff",),
                                            batched=mode == "batched", chunk_rows=chunk_rows, num_bootstrap=1)
            return _report.median_seconds(functools.partial(evaluator.evaluate, model, batch), repeats, device)

        row = results[perturbation] = _report.batched_vs_looped(seconds_of)
        print(f"{name:>16} {perturbation:>14}: {_report.ratio_text(row)})", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/robustness.json")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="sample-evaluations per stacked call (default: 16 on CPU, where big stacks leave the "
                             "cache, 1024 on GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    chunk_rows = args.chunk_rows or (1024 if device.type == "cuda" else 16)
    report = {
        "target": "time(batched) / time(looped) <= 0.3 for 32 draws",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__, "samples": args.samples, "draws": args.draws, "repeats": args.repeats,
        "chunk_rows": chunk_rows,
        "models": {name: bench_model(name, MODELS[name], args.samples, args.draws, args.repeats, device, chunk_rows)
                   for name in args.models},
    }
    print(f"wrote {_report.write_report(args.out, report)}")


if __name__ == "__main__":
    main()
