"""`arrcoc-sam evaluate-robustness`: robustness.json and a plot for one or several relevance checkpoints.

    arrcoc-sam evaluate-robustness --model out/adamw out/sam --data scenes --split heldout \\
        --num-samples 64 --out robustness_report

Every model sees the same batches. ``--data scenes`` generates the seeded query scenes
(`arrcoc_sam.relevance.scenes`); ``--data PATH.jsonl`` reads a vision relevance file
(`arrcoc_sam.relevance.data_files`). The plot has one panel per (metric, perturbation) and one curve per
model, with the bootstrap CI as error bars. This module also holds the data and model loading that
``arrcoc-sam allocate`` shares.

Bad flag values exit with status 2 and the flag named (argparse's usage error): an ``--out`` that cannot be a
folder right after parsing, and, before anything is evaluated, every model against the data (query dimension
D, tokens per sample N = grid_size²) and ``--k`` against N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arrcoc_sam.relevance.robustness import METRICS, PERTURBATIONS, RelevanceRobustness
from arrcoc_sam.relevance.training import check_output_folder

PLOT_METRICS = ("mean_abs_diff", "spearman", "topk_jaccard")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def check_output_dir(parser: argparse.ArgumentParser, flag: str, path: str | os.PathLike) -> None:
    """``parser.error`` naming ``flag`` unless ``path`` is a folder or can be created as one (`check_output_folder`:
    nothing is left behind); call it right after parsing, before any expensive work."""
    try:
        check_output_folder(path, flag)
    except ValueError as err:
        parser.error(str(err))


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data flags shared by `evaluate-robustness` and `allocate`."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", default="scenes", help="'scenes' (generated query scenes) or a vision .jsonl file")
    group.add_argument("--split", default="heldout", choices=("train", "validation", "heldout"), help="scenes split")
    group.add_argument("--num-samples", type=positive_int, default=64, help="samples to evaluate (the first ones)")
    group.add_argument("--batch-size", type=positive_int, default=16)
    group.add_argument("--image-size", type=positive_int, default=64, help="scenes: image side in pixels")
    group.add_argument("--seed", type=non_negative_int, default=0, help="scene seed (and noise seed)")
    group.add_argument("--query-embedder", default="auto", choices=("auto", "minilm", "hash"),
                       help="'auto': minilm when the model's query_dim is 384, else hash")


def load_model(path: str | os.PathLike) -> torch.nn.Module:
    """A saved vision or multiscale relevance checkpoint (``save_pretrained`` folder) in eval mode; ValueError
    naming ``--model`` for any other kind of model (a text relevance model scores word pieces, not a grid)."""
    from transformers import AutoConfig, AutoModel

    from arrcoc_sam.relevance.multiscale import MultiScaleRelevanceConfig
    from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: no config.json there; pass a save_pretrained() folder")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as error:  # an unknown model_type, a config.json that is not JSON
        raise ValueError(f"--model {path}: its config.json does not load ({error})") from error
    if not isinstance(config, ArrCocRelevanceConfig):  # MultiScaleRelevanceConfig is one too
        kind = {"arrcoc_text_relevance": "a text relevance model"}.get(config.model_type, "not a relevance model")
        raise ValueError(f"--model {path}: {kind} ({type(config).__name__}, model_type {config.model_type!r}); "
                         f"this command takes vision relevance models: model_type "
                         f"{ArrCocRelevanceConfig.model_type!r} or {MultiScaleRelevanceConfig.model_type!r} "
                         "(trained with --model_kind vision or multiscale)")
    if getattr(config, "mode", None) == "rescale":
        raise ValueError(f"--model {path}: a multiscale relevance model with mode='rescale', which scores images "
                         "resized per scale and not token features; this command perturbs and scores token features: "
                         "use a mode='pyramid' model")
    return AutoModel.from_pretrained(str(path), config=config).eval()


def _embedder(choice: str, query_dim: int):
    from arrcoc_sam.relevance.scenes import HashQueryEmbedder, MiniLMQueryEmbedder

    if choice == "auto":
        choice = "minilm" if query_dim == MiniLMQueryEmbedder.dim else "hash"
    return MiniLMQueryEmbedder() if choice == "minilm" else HashQueryEmbedder(dim=query_dim)


def _collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {"query_embedding": torch.as_tensor(np.stack([r["query_embedding"] for r in rows])).float()}
    if "pixel_values" in rows[0]:
        pixels = torch.as_tensor(np.stack([np.asarray(r["pixel_values"]) for r in rows]))
        # datasets' numpy format returns uint8 images as int64: any integer dtype means 0-255.
        batch["pixel_values"] = pixels.float() if pixels.is_floating_point() else pixels.float() / 255.0
    else:
        batch["token_features"] = torch.as_tensor(np.stack([r["token_features"] for r in rows])).float()
    if "labels" in rows[0]:
        batch["labels"] = torch.as_tensor(np.stack([r["labels"] for r in rows])).float()
    return batch


def load_batches(args: argparse.Namespace, model: torch.nn.Module) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """The evaluation batches and each sample's query text, from ``--data`` and the model's config (scenes are
    generated on its grid, queries embedded for its query_dim)."""
    config = model.config
    if args.data == "scenes" and args.image_size % config.grid_size:
        raise ValueError(f"--image-size {args.image_size}: scenes for a model with grid_size {config.grid_size} "
                         f"need a side that is a multiple of {config.grid_size} pixels")
    embedder = _embedder(args.query_embedder, config.query_dim)
    if args.data == "scenes":
        from arrcoc_sam.relevance.scenes import make_scene_dataset

        sizes = {"num_train": 1, "num_validation": 1, "num_heldout": 1}
        sizes[f"num_{args.split}"] = args.num_samples
        dataset = make_scene_dataset(**sizes, image_size=args.image_size, grid_size=config.grid_size,
                                     seed=args.seed, embedder=embedder)
        rows = dataset[args.split]
    else:
        from arrcoc_sam.relevance.data_files import load_relevance_files

        if not Path(args.data).is_file():
            raise FileNotFoundError(f"--data {args.data}: not 'scenes' and not a file")
        rows = load_relevance_files({"eval": args.data}, kind="vision", query_embedder=embedder)["eval"]
    count = min(args.num_samples, len(rows))
    rows = [rows[i] for i in range(count)]
    batches = [_collate(rows[i:i + args.batch_size]) for i in range(0, count, args.batch_size)]
    return batches, [str(r.get("query", "")) for r in rows]


def check_models_fit_data(models: Mapping[str, torch.nn.Module], batch: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the first model (by its path, the key of ``models``) whose ``query_dim`` or grid
    (N = grid_size² tokens) does not fit the data's ``batch``; call it before evaluating any model."""
    query_dim = batch["query_embedding"].shape[-1]
    if batch.get("token_features") is not None:
        tokens, source = batch["token_features"].shape[1], "token_features"
    elif batch.get("labels") is not None:
        tokens, source = batch["labels"][0].numel(), "target relevance"
    else:
        tokens, source = None, ""
    for path, model in models.items():
        config = model.config
        if config.query_dim != query_dim:
            raise ValueError(f"--model {path}: query_dim={config.query_dim}, but the data's query embeddings have "
                             f"D={query_dim}; evaluate models with other query dimensions in separate runs")
        grid = getattr(config, "grid_size", None)
        if tokens is not None and grid is not None and grid * grid != tokens:
            raise ValueError(f"--model {path}: grid_size={grid} ({grid * grid} tokens), but the data's {source} has "
                             f"N={tokens} tokens per sample; evaluate models with other grids in separate runs")


def plot_reports(reports: dict[str, dict[str, Any]], path: Path, metrics: Sequence[str] = PLOT_METRICS) -> None:
    """Metric vs perturbation level, one curve per model (error bars: bootstrap CI), one panel per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in PERTURBATIONS if any(n in r["perturbations"] for r in reports.values())]
    fig, axes = plt.subplots(len(metrics), len(names), figsize=(3.2 * len(names), 2.6 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, name in enumerate(names):
            ax = axes[row][col]
            for model_name, report in reports.items():
                levels = report["perturbations"].get(name, {}).get("levels", {})
                points = [(float(level), stats[metric]) for level, stats in levels.items()
                          if metric in stats and stats[metric]["mean"] is not None]
                if not points:
                    continue
                x = [p[0] for p in points]
                y = [p[1]["mean"] for p in points]
                err = [[max(0.0, p[1]["mean"] - (p[1]["ci_low"] if p[1]["ci_low"] is not None else p[1]["mean"])) for p in points],
                       [max(0.0, (p[1]["ci_high"] if p[1]["ci_high"] is not None else p[1]["mean"]) - p[1]["mean"]) for p in points]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=model_name)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("level", fontsize=8)
            if col == 0:
                ax.set_ylabel(metric, fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrcoc-sam evaluate-robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="one or more save_pretrained() folders")
    parser.add_argument("--name", nargs="+", help="a label per model (default: folder names)")
    parser.add_argument("--out", required=True, help="output folder for robustness.json and robustness.png")
    add_data_arguments(parser)
    group = parser.add_argument_group("robustness")
    group.add_argument("--levels", type=non_negative_float, nargs="+", default=[0.05, 0.1, 0.2])
    group.add_argument("--k", type=positive_int, default=200)
    group.add_argument("--num-draws", type=positive_int, default=8)
    group.add_argument("--perturbations", nargs="+", default=list(PERTURBATIONS), choices=PERTURBATIONS)
    group.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    group.add_argument("--looped", action="store_true", help="evaluate draws one at a time (reference path)")
    return parser


def load_checked(
    parser: argparse.ArgumentParser, args: argparse.Namespace, paths: Sequence[str]
) -> tuple[dict[str, torch.nn.Module], list[dict[str, torch.Tensor]], list[str]]:
    """``({path: model}, batches, queries)``: the models, and the data for the first of them, each model checked
    against the data; a bad ``--model`` or ``--data`` ends in ``parser.error`` (exit 2) naming it."""
    try:
        models = {path: load_model(path) for path in paths}
        batches, queries = load_batches(args, models[paths[0]])
        check_models_fit_data(models, batches[0])
    except (OSError, ValueError) as err:
        parser.error(str(err))
    return models, batches, queries


def check_k_fits(parser: argparse.ArgumentParser, k: int, models: Mapping[str, torch.nn.Module]) -> None:
    """``parser.error`` when ``--k`` exceeds the N = grid_size² tokens of a model (keyed by its path): a top-K
    set of all N tokens is the same for any scores, so every top-K figure would read as perfect."""
    for path, model in models.items():
        grid = model.config.grid_size
        if k > grid * grid:
            parser.error(f"--k {k} exceeds the {grid * grid} tokens of --model {path} (grid_size {grid})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_dir(parser, "--out", args.out)
    names = args.name or [Path(m).name or str(m) for m in args.model]
    if len(names) != len(args.model) or len(set(names)) != len(names):
        parser.error(f"--name needs one distinct label per --model, got {names} for {len(args.model)} models")
    try:
        evaluator = RelevanceRobustness(levels=args.levels, k=args.k, num_draws=args.num_draws,
                                        perturbations=args.perturbations, metrics=args.metrics,
                                        batched=not args.looped, seed=args.seed)
    except ValueError as err:  # the flags' types leave only --levels to check against the perturbations
        parser.error(f"--levels: {err}")
    loaded, batches, _ = load_checked(parser, args, args.model)
    check_k_fits(parser, args.k, loaded)
    models = {name: loaded[path] for name, path in zip(names, args.model, strict=True)}
    reports = {name: evaluator.evaluate(model, batches) for name, model in models.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    document = {"models": {name: {"path": str(path), **reports[name]} for name, path in zip(names, args.model, strict=True)},
                "data": {"source": args.data, "split": args.split, "num_samples": reports[names[0]]["num_samples"],
                         "seed": args.seed}}
    (out / "robustness.json").write_text(json.dumps(document, indent=2, allow_nan=False))
    plot_reports(reports, out / "robustness.png")
    for name, report in reports.items():
        print(f"[{name}]")
        for line in report["summary"]:
            print(f"  {line}")
    print(f"wrote {out / 'robustness.json'} and {out / 'robustness.png'}")
    return 0
