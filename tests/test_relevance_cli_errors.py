"""A vision relevance model's grid comes from its training data: a model trained on token-feature files is
evaluated and allocated on the very same files, and a grid_size that contradicts the data is refused before
anything trains, naming the file and both sizes."""

from __future__ import annotations

import json
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
