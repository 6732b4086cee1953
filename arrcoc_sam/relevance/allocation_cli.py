"""`arrcoc-sam allocate`: precision-aware token allocation for a dataset, as JSON and a picture.

    arrcoc-sam allocate --model out/sam --data scenes --num-samples 16 --total-budget 48000 --out alloc

For each sample: relevance from the model, per-token precision from the curvature of the relevance loss
w.r.t. the token features (`token_precision`), then the chosen allocator. Writes ``allocation.json``
(settings, and per sample its query, ``selected_indices`` [K], ``token_budgets`` [K] and their sum) and
``allocation.png`` (per sample shown: the image, relevance, precision and token budgets over the G x G grid).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from arrcoc_sam.relevance.allocation import (
    PrecisionAwareAllocation,
    PrecisionAwareAllocator,
    RelevanceAllocator,
    token_precision,
)
from arrcoc_sam.relevance.robustness_cli import (
    add_data_arguments,
    check_k_fits,
    check_output_dir,
    load_checked,
    non_negative_float,
    non_negative_int,
    positive_int,
)

MODES = ("precision", "plain", "topk")


def at_least_two_probes(text: str) -> int:
    """argparse type of ``--num-probes``: an integer >= 2 (the precision's standard error needs two probes)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (the precision's standard error needs two probes), got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type of ``--target-precision``: a number in [0, 1] (a fraction of the sample's sharpest token)."""
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (a fraction of the sample's sharpest token's "
                                         f"precision; 1 penalises no token), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrcoc-sam allocate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a save_pretrained() folder of a relevance model")
    parser.add_argument("--out", required=True, help="output folder for allocation.json and allocation.png")
    add_data_arguments(parser)
    group = parser.add_argument_group("allocation")
    group.add_argument("--mode", choices=MODES, default="precision",
                       help="precision: PrecisionAwareAllocator; plain: ARR-COC min + (max-min)*relevance; "
                            "topk: the knowledge file's PrecisionAwareAllocation")
    group.add_argument("--min-tokens", type=non_negative_int, default=64)
    group.add_argument("--max-tokens", type=positive_int, default=400)
    group.add_argument("--total-budget", type=positive_int, default=None, help="default: k * (min + max) // 2")
    group.add_argument("--k", type=positive_int, default=200)
    group.add_argument("--favor", choices=("precise", "uncertain"), default="precise")
    group.add_argument("--alpha", type=non_negative_float, default=1.0, help="relevance exponent")
    group.add_argument("--beta", type=non_negative_float, default=1.0, help="precision exponent")
    group.add_argument("--target-precision", type=fraction, default=1.0,
                       help="topk mode: penalise tokens above this fraction (in [0, 1]) of the sample's highest "
                            "precision (1: no penalty)")
    group.add_argument("--penalty", type=non_negative_float, default=0.1, help="topk mode")
    group.add_argument("--precision-method", choices=("ggn", "hutchinson", "hutchinson_cv"), default="ggn")
    group.add_argument("--num-probes", type=at_least_two_probes, default=16)
    group.add_argument("--probe-seed", type=int, default=None,
                       help="seed of the precision probes (default: --seed); each sample's probes depend only on "
                            "this seed and the sample's index, not on --batch-size")
    group.add_argument("--plot-samples", type=non_negative_int, default=4, help="samples drawn in allocation.png")
    return parser


def _allocator(args: argparse.Namespace):
    if args.mode == "precision":
        return PrecisionAwareAllocator(args.min_tokens, args.max_tokens, args.total_budget, args.k,
                                       favor=args.favor, alpha=args.alpha, beta=args.beta)
    if args.mode == "plain":
        return RelevanceAllocator(args.min_tokens, args.max_tokens, args.total_budget, args.k)
    return PrecisionAwareAllocation(args.target_precision, args.penalty, args.k, args.min_tokens, args.max_tokens,
                                    args.total_budget)


def _plot(path: Path, panels: list[dict[str, torch.Tensor]], queries: list[str], grid: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    columns = ("image", "relevance", "precision", "token budget")
    fig, axes = plt.subplots(len(panels), 4, figsize=(11, 2.8 * len(panels)), squeeze=False)
    for row, (panel, query) in enumerate(zip(panels, queries, strict=True)):
        for col, title in enumerate(columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if title == "image":
                if "image" in panel:
                    ax.imshow(panel["image"].permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_ylabel(query or f"sample {row}", fontsize=8)
            else:
                values = panel[title].view(grid, grid).numpy()
                # precision spans decades: a log colour scale when it is positive
                norm = LogNorm() if title == "precision" and (values > 0).all() else None
                image = ax.imshow(values, cmap="magma", norm=norm)
                fig.colorbar(image, ax=ax, fraction=0.046)
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_dir(parser, "--out", args.out)
    try:
        allocator = _allocator(args)
    except ValueError as err:  # limits that do not fit together, e.g. --min-tokens above --max-tokens
        parser.error(f"--min-tokens/--max-tokens/--total-budget/--k: {err}")
    models, batches, queries = load_checked(parser, args, [args.model])
    check_k_fits(parser, args.k, models)
    model = models[args.model]
    probe_seed = args.seed if args.probe_seed is None else args.probe_seed
    samples, panels, relative_stderr = [], [], []
    for batch in batches:
        with torch.no_grad():
            features = batch.get("token_features")
            if features is None:
                features = model.token_features(pixel_values=batch["pixel_values"], token_features=None)
            relevance = model.compute_relevance(features, batch["query_embedding"])
        undefined = (~torch.isfinite(relevance)).any(dim=1).nonzero().flatten().tolist()
        if undefined:
            parser.error(f"--model {args.model}: its relevance holds inf/NaN on sample {len(samples) + undefined[0]} "
                         f"({len(undefined)} of the batch's {relevance.shape[0]}): a diverged checkpoint? Nothing "
                         "can be allocated from it")
        precision, stderr = token_precision(model, {**batch, "token_features": features}, method=args.precision_method,
                                            num_probes=args.num_probes, seed=probe_seed, return_stderr=True,
                                            sample_offset=len(samples))
        relative_stderr.append((stderr / precision.abs().clamp_min(1e-30)).median(dim=1).values)
        if args.precision_method != "ggn":  # Hessian estimates can dip below zero; the allocator checks >= 0
            precision = precision.clamp_min(0)  # in every mode (plain and topk show it, and ignore it)
        try:
            indices, budgets = allocator(relevance, precision)
        except ValueError as err:  # scores the allocator refuses: a non-finite precision, relevance above 1 (plain)
            parser.error(f"--model {args.model}: {err}")
        for i in range(relevance.shape[0]):
            index = len(samples)
            samples.append({"index": index, "query": queries[index], "selected_indices": indices[i].tolist(),
                            "token_budgets": budgets[i].tolist(), "total_tokens": int(budgets[i].sum())})
            if len(panels) < args.plot_samples:
                grid_budget = torch.zeros(relevance.shape[1], dtype=torch.float64).scatter_(0, indices[i], budgets[i].double())
                panel = {"relevance": relevance[i].double(), "precision": precision[i].double(), "token budget": grid_budget}
                if "pixel_values" in batch:
                    panel["image"] = batch["pixel_values"][i]
                panels.append(panel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {key: getattr(args, key) for key in ("mode", "min_tokens", "max_tokens", "k", "favor", "alpha", "beta",
                                                     "target_precision", "penalty", "precision_method", "num_probes")}
    settings["total_budget"] = allocator.total_budget
    settings["probe_seed"] = probe_seed
    document = {"model": str(args.model), "data": {"source": args.data, "split": args.split, "seed": args.seed},
                "settings": settings, "samples": samples}
    (out / "allocation.json").write_text(json.dumps(document, indent=2))
    written = [out / "allocation.json"]
    grid = int(round(relevance.shape[1] ** 0.5))
    if panels and grid * grid == relevance.shape[1]:
        _plot(out / "allocation.png", panels, queries[:len(panels)], grid)
        written.append(out / "allocation.png")
    median_stderr = float(torch.cat(relative_stderr).median())
    print(f"allocated {len(samples)} samples, {allocator.total_budget} tokens each at most (median relative "
          f"stderr of the precision: {median_stderr:.3f}); wrote {' and '.join(map(str, written))}")
    return 0
