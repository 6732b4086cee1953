"""Benchmark batched vs per-sample token precision: time(batched) ÷ time(looped), and their agreement.

``batched`` is `arrcoc_sam.relevance.token_precision` on the whole batch: one batched forward+backward per
probe, each sample's probes drawn from its own (seed, index) generator (a ``BlockSampler``). ``looped`` is the
per-sample reference it replaced: one ``token_precision`` call per sample with ``sample_offset`` = its index,
i.e. one ``hessian_diagonal`` per sample. Both give each sample the same estimate to rounding (``max_diff``:
max |batched − looped| ÷ max |looped|, over precision and stderr). Median of ``--repeats`` runs after a
warm-up, for B in ``--batch-sizes`` and each method. Model:
ArrCocRelevanceModel in the configuration of the tests (8x8 grid, D=32, coupling 8, balancer 16); optionally
the ARR-COC configuration (32x32 grid, D=384). Run (one intra-op thread: stable timings on a shared CPU)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/token_precision.py --out bench_results/token_precision.json
"""

from __future__ import annotations

import argparse
import functools
import os

import _report  # scripts/bench is on sys.path
import torch

from arrcoc_sam.relevance.allocation import token_precision
from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    "arrcoc_g8_d32_tests": dict(grid_size=8, query_dim=32, coupling_hidden=8, balancer_hidden=16),
    "arrcoc_g32_d384": dict(grid_size=32, query_dim=384),
}
METHODS = ("ggn", "hutchinson", "hutchinson_cv")


def looped_token_precision(model, batch: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample reference: one estimate per sample, its global index passed as ``sample_offset``."""
    rows = [token_precision(model, {key: value[row:row + 1] for key, value in batch.items()}, return_stderr=True,
                            sample_offset=row, **kwargs) for row in range(batch["token_features"].shape[0])]
    return torch.cat([value for value, _ in rows]), torch.cat([stderr for _, stderr in rows])


def bench_model(name: str, overrides: dict, batch_sizes: list[int], num_probes: int, repeats: int,
                device: torch.device) -> dict:
    torch.manual_seed(0)
    model = ArrCocRelevanceModel(ArrCocRelevanceConfig(**overrides)).to(device).eval()
    tokens, channels = overrides["grid_size"] ** 2, model.config.num_channels
    results: dict = {}
    for samples in batch_sizes:
        generator = torch.Generator().manual_seed(samples)
        batch = {"token_features": torch.rand(samples, tokens, channels, generator=generator).to(device),
                 "query_embedding": torch.randn(samples, overrides["query_dim"], generator=generator).to(device),
                 "labels": torch.rand(samples, tokens, generator=generator).to(device)}
        for method in METHODS:
            kwargs = dict(method=method, num_probes=num_probes, seed=0)
            batched = token_precision(model, batch, return_stderr=True, **kwargs)
            looped = looped_token_precision(model, batch, **kwargs)
            max_diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(batched, looped, strict=True))
            timed = {mode: functools.partial(estimate, model, batch, **kwargs)
                     for mode, estimate in (("batched", token_precision), ("looped", looped_token_precision))}
            row = _report.batched_vs_looped(lambda mode, timed=timed: _report.median_seconds(timed[mode], repeats, device))
            row["max_diff"] = max_diff
            results[f"B{samples}_{method}"] = row
            print(f"{name:>20} B={samples:<3} {method:>13}: {_report.ratio_text(row)}; max diff {max_diff:.1e})", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/token_precision.json")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--num-probes", type=int, default=16, help="token_precision's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["arrcoc_g8_d32_tests"], choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {
        "measures": "time(batched token_precision) / time(one token_precision call per sample); max_diff = "
                    "max |batched - looped| / max |looped| over precision and stderr",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__, "num_probes": args.num_probes, "repeats": args.repeats,
        "models": {name: bench_model(name, MODELS[name], args.batch_sizes, args.num_probes, args.repeats, device)
                   for name in args.models},
    }
    print(f"wrote {_report.write_report(args.out, report)}")


if __name__ == "__main__":
    main()
