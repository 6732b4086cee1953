"""A vision relevance model's grid comes from its training data: a model trained on token-feature files is
evaluated and allocated on the very same files, and a grid_size that contradicts the data is refused before
anything trains, naming the file and both sizes. `evaluate-robustness`, `allocate` and `quickstart` refuse bad
flags and output folders with a usage error naming them before any work, and report a diverged model's
non-finite figures as None and counts instead of crashing or reading as perfect."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from arrcoc_sam.cli import main as cli_main
from arrcoc_sam.relevance.training import build_run, parse_args

COMMON = ["--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true",
          "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--logging_steps", "1"]


def _feature_file(path: Path, n_tokens: int = 16, count: int = 4, channels: int = 13) -> str:
    rows = [{"query": "red circle", "token_features": torch.rand(n_tokens, channels).tolist(),
             "relevance": torch.rand(n_tokens).tolist(), "query_embedding": torch.randn(8).tolist()}
            for _ in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _train_argv(data: str, out: Path, *extra: str) -> list[str]:
    return ["--model_kind", "vision", "--data_source", "files", "--train_file", data, "--top_k", "4",
            "--max_steps", "1", "--output_dir", str(out), *extra, *COMMON]


def test_a_model_trained_on_token_feature_files_takes_their_grid_and_runs_on_them(tmp_path):
    data = _feature_file(tmp_path / "v.jsonl")
    model = tmp_path / "model"
    assert cli_main(["train", *_train_argv(data, model)]) == 0
    assert AutoConfig.from_pretrained(model).grid_size == 4  # N = 16 tokens: 4 x 4, not the default 32
    flags = ["--model", str(model), "--data", data, "--num-samples", "4", "--k", "4"]
    assert cli_main(["evaluate-robustness", *flags, "--num-draws", "1", "--levels", "0.1",
                     "--perturbations", "feature_noise", "--out", str(tmp_path / "rob")]) == 0
    assert cli_main(["allocate", *flags, "--min-tokens", "1", "--max-tokens", "4", "--num-probes", "2",
                     "--plot-samples", "0", "--out", str(tmp_path / "alloc")]) == 0
    assert (tmp_path / "alloc" / "allocation.json").is_file()


@pytest.mark.parametrize(("n_tokens", "extra", "message"), [
    (16, ["--config_overrides", "grid_size=8"],
     "--train_file {data}: N=16 tokens per sample (4 x 4 grid), but --config_overrides grid_size=8 gives 64 tokens"),
    (15, [], "--train_file {data}: N=15 relevance targets per sample is not a G x G grid"),
])
def test_data_that_fits_no_grid_or_contradicts_the_chosen_one_is_a_usage_error_naming_the_file(
        tmp_path, capsys, n_tokens, extra, message):
    data = _feature_file(tmp_path / "v.jsonl", n_tokens=n_tokens)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *_train_argv(data, tmp_path / "out", *extra)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message.format(data=data) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_start_model_of_another_grid_takes_the_data_files_grid_with_a_warning(tmp_path):
    """A model saved on another grid (a scene-trained one: G = 32) fine-tuned on token-feature files: the grid does
    not enter its weights, so it takes the data's (a warning says so) and is evaluated on those files afterwards."""
    from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel

    start = tmp_path / "start"
    ArrCocRelevanceModel(ArrCocRelevanceConfig(grid_size=8, query_dim=8)).save_pretrained(start)
    data = _feature_file(tmp_path / "v.jsonl")
    with pytest.warns(UserWarning, match=rf"--model_name_or_path {start} \(grid_size=8\) does not fit --train_file "
                                         rf"{data} \(N=16 tokens per sample\): the model takes grid_size=4"):
        trainer, _, _ = build_run(*parse_args(_train_argv(data, tmp_path / "out", "--model_name_or_path", str(start))))
    assert trainer.model.config.grid_size == 4


def test_a_grid_that_does_not_suit_the_model_names_the_data_it_came_from(tmp_path):
    """A multiscale model on N = 16 tokens (G = 4, taken from the file) cannot pool 3 levels: the configuration's
    refusal now names the file and the grid it read there."""
    data = _feature_file(tmp_path / "v.jsonl")
    argv = [*_train_argv(data, tmp_path / "out"), "--config_overrides", "num_levels=3"]
    argv[argv.index("vision")] = "multiscale"
    with pytest.raises(ValueError, match=rf"--train_file {data}: grid_size=4 \(N=16 tokens per sample\): .*num_levels"):
        build_run(*parse_args(argv))


def test_generated_scenes_follow_a_grid_size_override(tmp_path):
    argv = ["--model_kind", "vision", "--data_source", "scenes", "--num_train_scenes", "2",
            "--num_validation_scenes", "1", "--num_heldout_scenes", "1", "--query_embedder", "hash",
            "--config_overrides", "grid_size=8", "--top_k", "4", "--output_dir", str(tmp_path / "out"), *COMMON]
    trainer, splits, _ = build_run(*parse_args(argv))
    assert trainer.model.config.grid_size == 8
    assert all(len(splits[split][0]["labels"]) == 64 for split in ("train", "validation", "heldout"))


def test_token_features_with_other_than_the_models_channels_are_a_usage_error_naming_the_file(tmp_path, capsys):
    """C = 5 channels per token: the model reads the texture array's 13 channels by position, and the run died in
    its first forward with an IndexError; it now fails before training, naming the file and both counts."""
    data = _feature_file(tmp_path / "v.jsonl", channels=5)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *_train_argv(data, tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (f"--train_file {data}: token_features have C=5 channels per token, but vision relevance models take "
            "the texture array's 13") in err and "Traceback" not in err, err
    with pytest.raises(SystemExit):  # nor can the model be told to take them (its scores read channel 7)
        cli_main(["train", *_train_argv(data, tmp_path / "out"), "--config_overrides", "num_channels=5"])
    assert "num_channels must be 13" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_scenes_on_a_grid_their_images_cannot_hold_name_where_the_grid_came_from(tmp_path):
    argv = ["--model_kind", "vision", "--data_source", "scenes", "--num_train_scenes", "2",
            "--num_validation_scenes", "1", "--num_heldout_scenes", "1", "--query_embedder", "hash",
            "--config_overrides", "grid_size=7", "--output_dir", str(tmp_path / "out"), *COMMON]
    with pytest.raises(ValueError, match=r"^--config_overrides grid_size=7: .*grid_size \(7\)"):
        build_run(*parse_args(argv))


def _checkpoint(path: Path, fill: float | None = None) -> str:
    """A tiny vision relevance checkpoint (8 x 8 grid, D=32: the hash embedder's); ``fill`` sets every weight."""
    from safetensors.torch import save_model

    from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel

    torch.manual_seed(0)
    model = ArrCocRelevanceModel(ArrCocRelevanceConfig(grid_size=8, query_dim=32, coupling_hidden=8, balancer_hidden=16))
    if fill is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(fill)
    path.mkdir()
    model.config.to_json_file(path / "config.json")
    save_model(model, str(path / "model.safetensors"))
    return str(path)


SCENES = ["--data", "scenes", "--num-samples", "2", "--batch-size", "2", "--image-size", "16"]


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err


def test_a_diverged_checkpoint_is_reported_with_null_figures_next_to_a_healthy_one(tmp_path):
    """All-NaN weights: the report was lost to `ValueError: Out of range float values are not JSON compliant`
    after the whole evaluation (max_abs_diff was NaN), the healthy model's with it."""
    models = [_checkpoint(tmp_path / "diverged", fill=math.nan), _checkpoint(tmp_path / "healthy")]
    out = tmp_path / "rob"
    with pytest.warns(UserWarning, match="2 of 2 samples have a non-finite clean relevance"):
        code = cli_main(["evaluate-robustness", "--model", *models, *SCENES, "--k", "4", "--num-draws", "1",
                         "--levels", "0.1", "--perturbations", "feature_noise", "weight_random", "--out", str(out)])
    assert code == 0
    reports = json.loads((out / "robustness.json").read_text())["models"]
    diverged, healthy = reports["diverged"], reports["healthy"]
    assert diverged["non_finite_samples"] == 2 and healthy["non_finite_samples"] == 0
    for name in ("feature_noise", "weight_random"):
        entry = diverged["perturbations"][name]
        assert entry["max_abs_diff"] is None and entry["perfectly_robust"] is False
        assert entry["levels"]["0.1"]["spearman"] == {"mean": None, "std": None, "ci_low": None, "ci_high": None,
                                                      "n": 0}
        assert healthy["perturbations"][name]["max_abs_diff"] > 0


def test_a_relevance_that_turns_non_finite_under_a_perturbation_is_counted_not_read_as_robust():
    """relevance = sqrt(feature): sample 0 (features 100..103) stays finite under unit noise, sample 1 (features 0)
    turns NaN; max_abs_diff was NaN (a JSON crash) and the NaN map still counted in the top-K Jaccard."""
    from arrcoc_sam.relevance.robustness import RelevanceRobustness

    class SquareRoot(torch.nn.Module):
        def compute_relevance(self, token_features, query_embedding):
            return token_features[..., 0].sqrt()

    features = torch.stack([100 + torch.arange(4.0), torch.zeros(4)])[..., None]  # [B=2, N=4, C=1]
    evaluator = RelevanceRobustness(levels=(1.0,), k=2, num_draws=4, perturbations=("feature_noise",),
                                    metrics=("mean_abs_diff", "spearman", "topk_jaccard"),
                                    feature_noise_scale="absolute")
    report = evaluator.evaluate(SquareRoot(), {"token_features": features, "query_embedding": torch.zeros(2, 1)})
    json.dumps(report, allow_nan=False)
    entry = report["perturbations"]["feature_noise"]
    assert entry["non_finite_perturbed"] == 1 and entry["perfectly_robust"] is False
    assert 0 < entry["max_abs_diff"] < 1  # sample 0 only: |sqrt(100 + e) - 10| for unit noise e
    assert all(stats["n"] == 1 for stats in entry["levels"]["1"].values())  # sample 1 left out of every metric
    assert "1 sample(s) with a finite clean relevance turned non-finite" in report["summary"][0]


@pytest.mark.parametrize("target_precision", ["nan", "-1", "1.5"])
def test_allocate_refuses_a_target_precision_outside_0_1(tmp_path, capsys, target_precision):
    """`--target-precision nan` selected tokens 0..K-1 of every sample (all scores NaN) and wrote a bare NaN into
    allocation.json; -1 penalised every token."""
    from arrcoc_sam.relevance.allocation import PrecisionAwareAllocation

    err = _usage_error(["allocate", "--model", _checkpoint(tmp_path / "m"), *SCENES, "--k", "4", "--num-probes", "2",
                        "--mode", "topk", "--target-precision", target_precision, "--out", str(tmp_path / "o")], capsys)
    assert f"argument --target-precision: must be a number in [0, 1] (a fraction of the sample's sharpest token's " \
           f"precision; 1 penalises no token), got {target_precision}" in err
    with pytest.raises(ValueError, match=r"target_precision must be a fraction in \[0, 1\]"):
        PrecisionAwareAllocation(target_precision=float(target_precision))
    with pytest.raises(ValueError, match="penalty must be a finite number, got nan"):
        PrecisionAwareAllocation(penalty=math.nan)


def test_allocate_on_a_diverged_checkpoint_is_a_usage_error_naming_it(tmp_path, capsys):
    model = _checkpoint(tmp_path / "diverged", fill=math.nan)
    err = _usage_error(["allocate", "--model", model, *SCENES, "--k", "4", "--num-probes", "2",
                        "--out", str(tmp_path / "o")], capsys)
    assert f"--model {model}: its relevance holds inf/NaN on sample 0 (2 of the batch's 2)" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["evaluate-robustness", "allocate", "quickstart"])
@pytest.mark.parametrize(("where", "message"), [("afile", "exists and is not a folder"),
                                                ("afile/sub", "cannot create the output folder (Not a directory)")])
def test_an_output_folder_that_cannot_be_made_is_a_usage_error_before_any_work(tmp_path, capsys, monkeypatch,
                                                                                command, where, message):
    """It was a FileExistsError / NotADirectoryError traceback, for evaluate-robustness and allocate after the
    whole evaluation (217 s for the README's example)."""
    from arrcoc_sam.relevance import robustness_cli, scenes

    def work(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(robustness_cli, "load_checked", work)
    monkeypatch.setattr(scenes, "make_scene_dataset", work)
    (tmp_path / "afile").write_text("not a folder")
    out = str(tmp_path / where)
    if command == "quickstart":
        argv = ["quickstart", "--tiny", "--output-dir", out]
    else:
        argv = [command, "--model", _checkpoint(tmp_path / "m"), *SCENES, "--out", out]
    err = _usage_error(argv, capsys)
    flag = "--output-dir" if command == "quickstart" else "--out"
    assert f"{flag} {out}: {message}" in err


def test_checking_a_new_output_folder_leaves_nothing_behind(tmp_path, capsys):
    """The check creates a missing folder (and its parents) to see that it can, then removes them: a command
    refused afterwards (here --k above the model's 64 tokens) writes nothing."""
    out = tmp_path / "new" / "deeper"
    err = _usage_error(["allocate", "--model", _checkpoint(tmp_path / "m"), *SCENES, "--k", "65", "--out", str(out)],
                       capsys)
    assert "--k 65 exceeds the 64 tokens of --model" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["evaluate-robustness", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["allocate", "--seed", "-5", "--k", "4"], "argument --seed: must be >= 0, got -5"),
    (["evaluate-robustness", "--image-size", "12"],
     "--image-size 12: scenes for a model with grid_size 8 need a side that is a multiple of 8 pixels"),
])
def test_bad_seeds_and_image_sizes_name_their_flag(tmp_path, capsys, argv, message):
    """A negative seed read 'error: expected non-negative integer' (numpy's words, no flag); an image size the
    model's grid does not divide read 'image_size (12) must be a positive multiple of grid_size (8)'."""
    command, *flags = argv
    err = _usage_error([command, "--model", _checkpoint(tmp_path / "m"), *SCENES, *flags, "--out", str(tmp_path / "o")],
                       capsys)
    assert message in err


def test_quickstart_names_a_negative_seed(capsys):
    """It died with numpy's `ValueError: expected non-negative integer` traceback."""
    assert "argument --seed: must be >= 0, got -1" in _usage_error(["quickstart", "--tiny", "--seed", "-1"], capsys)


def test_evaluate_robustness_refuses_a_k_above_the_models_tokens_before_evaluating(tmp_path, capsys, monkeypatch):
    """`--k 1000` on an 8 x 8 grid ran silently with K clamped to 64, so every top-K Jaccard read 1.0."""
    from arrcoc_sam.relevance.robustness import RelevanceRobustness

    def evaluate(*args, **kwargs):
        raise AssertionError("evaluated with a --k above the model's tokens")

    monkeypatch.setattr(RelevanceRobustness, "evaluate", evaluate)
    model = _checkpoint(tmp_path / "m")
    err = _usage_error(["evaluate-robustness", "--model", model, *SCENES, "--k", "1000", "--out", str(tmp_path / "o")],
                       capsys)
    assert f"--k 1000 exceeds the 64 tokens of --model {model} (grid_size 8)" in err


def test_the_console_entry_restores_the_callers_program_name_even_after_a_usage_error(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "argv", ["the-caller"])
    with pytest.raises(SystemExit):
        cli_main(["quickstart", "--steps", "0"])
    assert "usage: arrcoc-sam quickstart" in capsys.readouterr().err
    assert sys.argv == ["the-caller"]


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_the_console_entry_prints_its_commands_for_either_help_flag(flag, capsys):
    assert cli_main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: arrcoc-sam COMMAND [ARGS...]") and "evaluate-robustness" in out


def test_an_unknown_command_is_a_usage_error_on_stderr(capsys):
    assert cli_main(["evaluate"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("arrcoc-sam: unknown command 'evaluate'\n\nusage: arrcoc-sam")
