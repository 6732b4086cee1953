"""`arrcoc-sam evaluate-robustness` and `arrcoc-sam allocate` end to end on tiny checkpoints and scenes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_model

from arrcoc_sam.cli import main as cli_main
from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel


def _checkpoint(path, seed: int, grid_size: int = 8, query_dim: int = 32):
    torch.manual_seed(seed)
    model = ArrCocRelevanceModel(ArrCocRelevanceConfig(grid_size=grid_size, query_dim=query_dim, coupling_hidden=8,
                                                       balancer_hidden=16))
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


def test_allocate_gives_each_sample_the_same_budgets_at_any_batch_size(tmp_path):
    """Hutchinson precision is noisy, so the budgets only match if each sample's probes ignore its batch."""
    model = _checkpoint(tmp_path / "model", 0)
    documents = []
    for batch_size in ("1", "2", "3"):
        out = tmp_path / f"alloc{batch_size}"
        code = cli_main(["allocate", "--model", model, "--data", "scenes", "--num-samples", "3", "--image-size", "32",
                         "--batch-size", batch_size, "--k", "12", "--min-tokens", "8", "--max-tokens", "40",
                         "--total-budget", "300", "--precision-method", "hutchinson", "--num-probes", "2",
                         "--plot-samples", "0", "--out", str(out)])
        assert code == 0
        documents.append(json.loads((out / "allocation.json").read_text()))
    assert documents[0]["samples"] == documents[1]["samples"] == documents[2]["samples"]
    assert documents[0]["settings"]["probe_seed"] == 0


def _usage_error(argv, capsys) -> str:
    """Run the console command; it must exit 2 (argparse's usage error) and return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(("flags", "message"), [
    (["--k", "0"], "argument --k: must be >= 1, got 0"),
    (["--num-draws", "-1"], "argument --num-draws: must be >= 1, got -1"),
    (["--levels", "0.1", "-0.2"], "argument --levels: must be a finite number >= 0, got -0.2"),
    (["--levels", "1.5"], "--levels: token_dropout levels are fractions in [0, 1], got 1.5"),
    (["--num-samples", "0"], "argument --num-samples: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--query-embedder", "clip"], "argument --query-embedder: invalid choice: 'clip'"),
    (["--name", "a", "b"], "--name needs one distinct label per --model"),
])
def test_evaluate_robustness_bad_flag_values_are_usage_errors_naming_the_flag(tmp_path, capsys, flags, message):
    model = _checkpoint(tmp_path / "model", 0)
    err = _usage_error(["evaluate-robustness", "--model", model, *DATA, *flags, "--out", str(tmp_path / "o")], capsys)
    assert message in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-tokens", "50", "--max-tokens", "10"], "--min-tokens/--max-tokens/--total-budget/--k: min_tokens (50)"),
    (["--k", "12", "--min-tokens", "8", "--total-budget", "20"], "total_budget=20 cannot give k=12"),
    (["--k", "65"], "--k 65 exceeds the 64 tokens of --model"),
    (["--k", "12", "--num-probes", "1"], "argument --num-probes: must be >= 2 (the precision's standard error needs two"),
    (["--beta", "-1"], "argument --beta: must be a finite number >= 0, got -1"),
])
def test_allocate_bad_flag_values_are_usage_errors_naming_the_flag(tmp_path, capsys, flags, message):
    model = _checkpoint(tmp_path / "model", 0)
    err = _usage_error(["allocate", "--model", model, *DATA, *flags, "--out", str(tmp_path / "o")], capsys)
    assert message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("grid_size", "query_dim", "message"), [
    (4, 32, "grid_size=4 (16 tokens), but the data's target relevance has N=64 tokens"),
    (8, 16, "query_dim=16, but the data's query embeddings have D=32"),
])
def test_models_that_do_not_fit_the_data_fail_before_any_evaluation(tmp_path, capsys, monkeypatch, grid_size,
                                                                    query_dim, message):
    from arrcoc_sam.relevance.robustness import RelevanceRobustness

    def evaluate(*args, **kwargs):
        raise AssertionError("a model was evaluated before every model was checked")

    monkeypatch.setattr(RelevanceRobustness, "evaluate", evaluate)
    fits = _checkpoint(tmp_path / "fits", 0)
    other = _checkpoint(tmp_path / "other", 1, grid_size=grid_size, query_dim=query_dim)
    err = _usage_error(["evaluate-robustness", "--model", fits, other, *DATA, "--out", str(tmp_path / "o")], capsys)
    assert f"--model {other}: {message}" in err
    assert not (tmp_path / "o").exists()


def test_a_missing_model_folder_is_a_usage_error_naming_it(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    for command in ("evaluate-robustness", "allocate"):
        err = _usage_error([command, "--model", missing, *DATA, "--out", str(tmp_path / "o")], capsys)
        assert f"--model {missing}: no config.json there" in err


@pytest.mark.parametrize("config", ['{"model_type": "no_such_model"}', "{not json"])
def test_a_config_that_does_not_load_is_a_usage_error_naming_the_model(tmp_path, capsys, config):
    """transformers' own error (unknown model_type, broken JSON) came out as a traceback without --model."""
    model = tmp_path / "odd"
    model.mkdir()
    (model / "config.json").write_text(config, encoding="utf-8")
    for command in ("evaluate-robustness", "allocate"):
        err = _usage_error([command, "--model", str(model), *DATA, "--out", str(tmp_path / "o")], capsys)
        assert f"--model {model}: its config.json does not load" in err, err


def test_a_rescale_multiscale_model_is_a_usage_error_naming_it(tmp_path, capsys):
    """It crashed with a traceback: such a model scores images, not the token features the commands perturb."""
    from arrcoc_sam.relevance.multiscale import MultiScaleRelevanceConfig, MultiScaleRelevanceModel

    MultiScaleRelevanceModel(MultiScaleRelevanceConfig(grid_size=8, query_dim=32, mode="rescale", coupling_hidden=8,
                                                       balancer_hidden=16)).save_pretrained(tmp_path / "rescale")
    model = str(tmp_path / "rescale")
    for command in ("evaluate-robustness", "allocate"):
        err = _usage_error([command, "--model", model, *DATA, "--out", str(tmp_path / "o")], capsys)
        assert f"--model {model}: a multiscale relevance model with mode='rescale'" in err, err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["plain", "topk"])
def test_allocate_without_precision_mode_runs_on_a_hessian_precision_that_dips_below_zero(tmp_path, mode):
    """`--mode plain|topk --precision-method hutchinson` died on 'precision must be >= 0' (the clamp was only in
    precision mode); the budgets are then those of the GGN precision, which these modes ignore."""
    model = _checkpoint(tmp_path / "model", 0)
    budgets = {}
    for method in ("hutchinson", "ggn"):
        out = tmp_path / f"{mode}_{method}"
        code = cli_main(["allocate", "--model", model, *DATA, "--k", "12", "--mode", mode, "--precision-method", method,
                         "--num-probes", "2", "--plot-samples", "0", "--out", str(out)])
        assert code == 0
        budgets[method] = json.loads((out / "allocation.json").read_text())["samples"]
    assert budgets["hutchinson"] == budgets["ggn"]


def test_a_text_relevance_model_is_a_usage_error_naming_its_kind(tmp_path, capsys):
    from transformers import BertConfig

    from arrcoc_sam.relevance.text import TextRelevanceConfig, TextRelevanceModel

    encoder = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)
    TextRelevanceModel(TextRelevanceConfig(encoder_config=encoder)).save_pretrained(tmp_path / "text")
    model = str(tmp_path / "text")
    for command in ("evaluate-robustness", "allocate"):
        err = _usage_error([command, "--model", model, *DATA, "--out", str(tmp_path / "o")], capsys)
        assert f"--model {model}: a text relevance model (TextRelevanceConfig, model_type 'arrcoc_text_relevance'); " \
               "this command takes vision relevance models: model_type 'arrcoc_relevance' or " \
               "'arrcoc_multiscale_relevance'" in err, err
        assert not (tmp_path / "o").exists()
