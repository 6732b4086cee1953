"""`arrcoc-sam evaluate-robustness` and `arrcoc-sam allocate` end to end on tiny checkpoints and scenes."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_model

from arrcoc_sam.cli import main as cli_main
from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel


def _checkpoint(path, seed: int):
    torch.manual_seed(seed)
    model = ArrCocRelevanceModel(ArrCocRelevanceConfig(grid_size=8, query_dim=32, coupling_hidden=8, balancer_hidden=16))
    path.mkdir()
    model.config.to_json_file(path / "config.json")
    save_model(model, str(path / "model.safetensors"))
    return str(path)


DATA = ["--data", "scenes", "--num-samples", "3", "--batch-size", "2", "--image-size", "32"]


def test_evaluate_robustness_compares_checkpoints_in_one_report(tmp_path):
    models = [_checkpoint(tmp_path / "adamw", 0), _checkpoint(tmp_path / "sam", 1)]
    out = tmp_path / "report"
    code = cli_main(["evaluate-robustness", "--model", *models, *DATA, "--k", "10", "--num-draws", "2",
                     "--levels", "0.05", "0.2", "--out", str(out)])
    assert code == 0
    document = json.loads((out / "robustness.json").read_text())
    assert set(document["models"]) == {"adamw", "sam"}
    for report in document["models"].values():
        assert report["num_samples"] == 3 and not report["skipped"]
        spearman = report["perturbations"]["input_noise"]["levels"]["0.2"]["spearman"]
        assert spearman["n"] == 3 and -1 <= spearman["mean"] <= 1
    assert (out / "robustness.png").stat().st_size > 10_000


def test_allocate_writes_budgets_within_limits_and_a_grid_picture(tmp_path):
    model = _checkpoint(tmp_path / "model", 0)
    out = tmp_path / "alloc"
    code = cli_main(["allocate", "--model", model, *DATA, "--k", "12", "--min-tokens", "8", "--max-tokens", "40",
                     "--total-budget", "300", "--num-probes", "2", "--favor", "uncertain", "--out", str(out)])
    assert code == 0
    document = json.loads((out / "allocation.json").read_text())
    assert len(document["samples"]) == 3
    for sample in document["samples"]:
        assert len(sample["selected_indices"]) == len(sample["token_budgets"]) == 12
        assert all(8 <= b <= 40 for b in sample["token_budgets"]) and sample["total_tokens"] == 300
    assert (out / "allocation.png").stat().st_size > 10_000


def test_evaluate_robustness_runs_every_perturbation_on_a_multiscale_checkpoint(tmp_path):
    from arrcoc_sam.relevance.multiscale import MultiScaleRelevanceConfig, MultiScaleRelevanceModel

    torch.manual_seed(0)
    model = MultiScaleRelevanceModel(MultiScaleRelevanceConfig(grid_size=8, query_dim=32, num_levels=2,
                                                               coupling_hidden=8, balancer_hidden=16))
    model.save_pretrained(tmp_path / "multiscale")
    out = tmp_path / "report"
    code = cli_main(["evaluate-robustness", "--model", str(tmp_path / "multiscale"), *DATA, "--k", "10",
                     "--num-draws", "2", "--levels", "0.1", "--looped", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "robustness.json").read_text())["models"]["multiscale"]
    assert not report["skipped"]
    for name in ("feature_noise", "input_noise", "token_dropout", "weight_random", "weight_adversarial"):
        assert report["perturbations"][name]["levels"]["0.1"]["spearman"]["n"] == 3, name
