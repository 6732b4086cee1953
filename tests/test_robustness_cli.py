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
    (["--levels", "0.1", "inf"], "argument --levels: must be a finite number >= 0, got inf"),
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


@pytest.mark.parametrize("query_dim", [384, 16])
def test_auto_embeds_queries_with_minilm_for_384_dimensions_else_hashed_to_the_models_dimension(query_dim,
                                                                                               monkeypatch):
    """The data for a model: its scenes' queries embedded for its query_dim, uint8 pixels scaled to [0, 1], the
    first --num-samples rows in batches of --batch-size. (A stand-in for MiniLM: only the choice is tested here.)"""
    from types import SimpleNamespace

    import numpy as np

    from arrcoc_sam.relevance import scenes
    from arrcoc_sam.relevance.robustness_cli import build_parser, load_batches
    from arrcoc_sam.relevance.scenes import HashQueryEmbedder, make_scene_dataset

    class MiniLMQueryEmbedder:
        dim = 384

        def __call__(self, queries):
            return np.stack([np.full(384, len(query), dtype=np.float32) for query in queries])

    monkeypatch.setattr(scenes, "MiniLMQueryEmbedder", MiniLMQueryEmbedder)
    args = build_parser().parse_args(["--model", "m", "--out", "o", *DATA])
    model = SimpleNamespace(config=SimpleNamespace(grid_size=8, query_dim=query_dim))
    batches, queries = load_batches(args, model)
    assert [len(batch["labels"]) for batch in batches] == [2, 1] and len(queries) == 3
    embedder = MiniLMQueryEmbedder() if query_dim == 384 else HashQueryEmbedder(dim=query_dim)
    embeddings = torch.cat([batch["query_embedding"] for batch in batches])
    np.testing.assert_allclose(embeddings.numpy(), embedder(queries), rtol=1e-6, atol=1e-7)
    rows = make_scene_dataset(1, 1, 3, image_size=32, grid_size=8, seed=0, embedder=embedder)["heldout"]
    pixels = torch.cat([batch["pixel_values"] for batch in batches])
    torch.testing.assert_close(pixels, torch.as_tensor(np.stack(rows["pixel_values"])).float() / 255)


def test_num_samples_takes_the_first_rows_of_a_data_file(tmp_path):
    from types import SimpleNamespace

    from arrcoc_sam.relevance.robustness_cli import build_parser, load_batches

    rows = [{"query": f"q{i}", "token_features": [[float(i)] * 13] * 4, "relevance": [0.0, 1.0, 0.5, 0.25],
             "query_embedding": [float(i), 1.0]} for i in range(5)]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    args = build_parser().parse_args(["--model", "m", "--out", "o", "--data", str(path), "--num-samples", "3",
                                      "--batch-size", "2"])
    batches, queries = load_batches(args, SimpleNamespace(config=SimpleNamespace(grid_size=2, query_dim=2)))
    assert queries == ["q0", "q1", "q2"]
    assert [batch["token_features"][:, 0, 0].tolist() for batch in batches] == [[0.0, 1.0], [2.0]]


def test_models_whose_folder_names_clash_need_distinct_names(tmp_path, capsys):
    """Two runs' `model` folders would share one label, and the second report would replace the first."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    models = [_checkpoint(tmp_path / "a" / "model", 0), _checkpoint(tmp_path / "b" / "model", 1)]
    err = _usage_error(["evaluate-robustness", "--model", *models, *DATA, "--out", str(tmp_path / "o")], capsys)
    assert "--name needs one distinct label per --model, got ['model', 'model'] for 2 models" in err


@pytest.mark.parametrize(("flags", "batched"), [([], True), (["--looped"], False)])
def test_the_robustness_flags_reach_the_evaluator(tmp_path, monkeypatch, flags, batched):
    """--seed seeds the perturbation draws as well as the scenes; --looped picks the reference path."""
    from arrcoc_sam.relevance import robustness_cli

    class Stop(Exception):
        pass

    received = {}

    def evaluator(**kwargs):
        received.update(kwargs)
        raise Stop

    monkeypatch.setattr(robustness_cli, "RelevanceRobustness", evaluator)
    with pytest.raises(Stop):
        cli_main(["evaluate-robustness", "--model", "m", "--out", str(tmp_path / "o"), "--seed", "3", "--k", "7",
                  "--num-draws", "5", "--levels", "0.1", "0.3", "--perturbations", "input_noise",
                  "--metrics", "spearman", *flags])
    assert received == {"levels": [0.1, 0.3], "k": 7, "num_draws": 5, "perturbations": ["input_noise"],
                        "metrics": ["spearman"], "batched": batched, "seed": 3}


@pytest.mark.parametrize(("flags", "allocator", "expected"), [
    (["--mode", "precision", "--alpha", "0.5", "--beta", "2"], "PrecisionAwareAllocator",
     ((8, 40, 300, 12), {"favor": "uncertain", "alpha": 0.5, "beta": 2.0})),
    (["--mode", "plain"], "RelevanceAllocator", ((8, 40, 300, 12), {})),
    (["--mode", "topk", "--target-precision", "0", "--penalty", "0.3"], "PrecisionAwareAllocation",
     ((0.0, 0.3, 12, 8, 40, 300), {})),
])
def test_the_allocation_flags_reach_the_chosen_allocator(tmp_path, monkeypatch, flags, allocator, expected):
    """Each flag lands in its own parameter; a target precision of 0 (penalise every token above zero) is valid."""
    from arrcoc_sam.relevance import allocation_cli

    class Stop(Exception):
        pass

    received = []

    def build(*args, **kwargs):
        received.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(allocation_cli, allocator, build)
    with pytest.raises(Stop):
        cli_main(["allocate", "--model", "m", "--out", str(tmp_path / "o"), "--k", "12", "--min-tokens", "8",
                  "--max-tokens", "40", "--total-budget", "300", "--favor", "uncertain", *flags])
    assert received == [expected]


def test_allocate_threads_the_probe_seed_and_sample_index_and_reports_each_sample_with_its_query(tmp_path,
                                                                                                monkeypatch):
    """Over batches of 2: each batch's probes start at its first sample's index and use --probe-seed; the report
    keeps every sample's own query, its own token total and the budget that was used (the default one here)."""
    from arrcoc_sam.relevance import allocation_cli
    from arrcoc_sam.relevance.scenes import make_scene_dataset

    calls = []
    original = allocation_cli.token_precision

    def token_precision(*args, **kwargs):
        calls.append((kwargs["seed"], kwargs["sample_offset"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(allocation_cli, "token_precision", token_precision)
    out = tmp_path / "alloc"
    assert cli_main(["allocate", "--model", _checkpoint(tmp_path / "model", 0), *DATA, "--k", "12", "--min-tokens",
                     "8", "--max-tokens", "40", "--num-probes", "2", "--probe-seed", "5", "--plot-samples", "0",
                     "--out", str(out)]) == 0
    assert calls == [(5, 0), (5, 2)]
    document = json.loads((out / "allocation.json").read_text())
    assert document["settings"]["probe_seed"] == 5 and document["settings"]["total_budget"] == 12 * (8 + 40) // 2
    queries = list(make_scene_dataset(1, 1, 3, image_size=32, grid_size=8, seed=0, embedder="hash")["heldout"]["query"])
    assert [sample["query"] for sample in document["samples"]] == queries
    assert [sample["index"] for sample in document["samples"]] == [0, 1, 2]
    assert all(sample["total_tokens"] == sum(sample["token_budgets"]) for sample in document["samples"])


def test_a_sample_whose_relevance_is_not_finite_is_named_by_its_index_in_the_data(tmp_path, capsys, monkeypatch):
    """Sample 2 is the first of the second batch: the message must say 2, not its place in the batch."""
    from arrcoc_sam.relevance.vision import ArrCocRelevanceModel

    original = ArrCocRelevanceModel.compute_relevance

    def compute_relevance(self, features, query):  # the last batch (one sample: data index 2) diverges
        relevance = original(self, features, query)
        return relevance.fill_(float("nan")) if relevance.shape[0] == 1 else relevance

    monkeypatch.setattr(ArrCocRelevanceModel, "compute_relevance", compute_relevance)
    model = _checkpoint(tmp_path / "model", 0)
    err = _usage_error(["allocate", "--model", model, *DATA, "--k", "12", "--num-probes", "2",
                        "--out", str(tmp_path / "o")], capsys)
    assert f"--model {model}: its relevance holds inf/NaN on sample 2 (1 of the batch's 1)" in err
