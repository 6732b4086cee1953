"""The training entry (scripts/train_relevance.py): text and vision runs end to end, recipes, LoRA saving."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from arrcoc_sam.relevance.training import MODEL_KINDS, main, parse_args, recipe_to_argv, run_training
from arrcoc_sam.sam.registry import available_methods

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true",
          "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--logging_steps", "1"]
TEXT_ROWS = [
    {"query": "person", "tokens": ["Barack", "Obama", "met", "Angela", "Merkel", "in", "Berlin"], "labels": [1, 1, 0, 1, 1, 0, 0]},
    {"query": "location", "tokens": ["Barack", "Obama", "met", "Angela", "Merkel", "in", "Berlin"], "labels": [0, 0, 0, 0, 0, 0, 1]},
    {"query": "company", "tokens": ["I", "love", "my", "new", "Apple", "phone"], "labels": [0, 0, 0, 0, 1, 0]},
    {"query": "sports team", "tokens": ["go", "lakers", "go"], "labels": [0, 1, 0]},
]


def text_files(tmp_path: Path) -> list[str]:
    args = []
    for split in ("train", "validation", "heldout"):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in TEXT_ROWS * 2), encoding="utf-8")
        args += [f"--{split}_file", str(path)]
    return args


def test_text_entry_trains_with_sam_evaluates_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    argv = ["--model_kind", "text", "--backbone", "tiny", "--data_source", "files", *text_files(tmp_path),
            "--optimizer", "sam", "--rho", "0.05", "--max_steps", "3", "--eval_strategy", "steps",
            "--eval_steps", "2", "--config_overrides", "ranking_weight=0.1,loss_type='focal'",
            "--output_dir", str(out), *COMMON]
    results = run_training(*parse_args(argv))
    for prefix in ("eval", "heldout"):
        for name in ("f1", "precision", "recall", "average_precision", "loss"):
            assert 0.0 <= results[f"{prefix}_{name}"] < float("inf"), (prefix, name)
    model = AutoModel.from_pretrained(out)
    assert model.config.loss_type == "focal" and model.config.ranking_weight == 0.1
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "heldout_results.json").read_text())["heldout_f1"] == results["heldout_f1"]


def test_lora_run_on_wnut_saves_the_merged_model_without_adapters(tmp_path):
    out = tmp_path / "lora"
    argv = ["--model_kind", "text", "--backbone", "tiny", "--data_source", "wnut", "--lora_r", "2",
            "--max_train_samples", "8", "--max_eval_samples", "8", "--optimizer", "sam", "--max_steps", "2",
            "--output_dir", str(out), *COMMON]
    results = run_training(*parse_args(argv))
    assert {"eval_f1", "heldout_f1"} <= set(results)
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not any("lora" in name or "base_layer" in name for name in model.state_dict())


def test_vision_entry_trains_on_generated_scenes_and_reports_ranking_metrics(tmp_path):
    argv = ["--model_kind", "vision", "--data_source", "scenes", "--num_train_scenes", "8",
            "--num_validation_scenes", "4", "--num_heldout_scenes", "4", "--query_embedder", "hash",
            "--optimizer", "asam", "--rho", "0.5", "--max_steps", "2", "--top_k", "50",
            "--output_dir", str(tmp_path / "vision"), *COMMON]
    results = run_training(*parse_args(argv))
    for prefix in ("eval", "heldout"):
        assert {f"{prefix}_{m}" for m in ("mse", "spearman", "top_k_recall", "ndcg")} <= set(results)
    assert 0.0 <= results["heldout_mse"] <= 1.0


@pytest.mark.parametrize("kind", ["text", "vision", "multiscale"])
def test_esam_selects_examples_by_the_relevance_models_own_per_example_loss(tmp_path, kind):
    """ESAM's default per-example loss (cross-entropy on integer labels) does not apply to relevance targets, so
    its data selection never ran from the command line: pass 2 took the whole batch, with only a warning."""
    from arrcoc_sam.relevance.training import build_run, train_and_evaluate

    if kind == "text":
        data = ["--backbone", "tiny", "--data_source", "files", *text_files(tmp_path)]
    else:
        data = ["--data_source", "scenes", "--num_train_scenes", "8", "--num_validation_scenes", "4",
                "--num_heldout_scenes", "4", "--query_embedder", "hash"]
    argv = ["--model_kind", kind, *data, "--optimizer", "esam", "--sam_args", "gamma=0.5", "--max_steps", "2",
            "--output_dir", str(tmp_path / kind), *COMMON]
    parsed = parse_args(argv)
    trainer, splits, tokenizer = build_run(*parsed)
    sizes = []
    hook = trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(next(v for v in kwargs.values() if torch.is_tensor(v)).shape[0])
        if module.training else None, with_kwargs=True)
    train_and_evaluate(trainer, splits, tokenizer, parsed[0])
    hook.remove()
    assert sizes == [4, 4, 2] * 2  # pass 1, the no-grad replay at w + ε, and the chosen half


def test_relevance_losses_per_example_split_the_batch_loss_and_rank_a_single_sample_as_its_own():
    from transformers import BertConfig

    from arrcoc_sam.relevance.text import TextRelevanceConfig, text_relevance_loss
    from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, relevance_loss

    generator = torch.Generator().manual_seed(0)
    config = ArrCocRelevanceConfig(grid_size=4, ranking_weight=0.5)
    relevance, labels = torch.rand(3, 16, generator=generator), torch.rand(3, 4, 4, generator=generator)
    labels[2] = 0.3  # a sample without valid ranking pairs: the split must still add up to the batch loss
    each = relevance_loss(relevance, labels, config, per_example=True)
    assert each.shape == (3,) and torch.allclose(each.mean(), relevance_loss(relevance, labels, config))
    assert torch.allclose(relevance_loss(relevance[:1], labels[:1], config, per_example=True)[0],
                          relevance_loss(relevance[:1], labels[:1], config))
    text_config = TextRelevanceConfig(encoder_config=BertConfig(hidden_size=8, num_hidden_layers=1,
                                                                num_attention_heads=1, intermediate_size=8),
                                      ranking_weight=0.3, loss_type="focal")
    logits = torch.randn(3, 6, generator=generator)
    targets = torch.tensor([[-100, 1, 0, 0, -100, -100], [-100, 0, 0, 1, 1, -100], [-100, 0, 0, -100, -100, -100]])
    mask = targets != -100
    each = text_relevance_loss(logits, targets.float(), mask, text_config, per_example=True)
    assert each.shape == (3,) and torch.allclose(each.mean(), text_relevance_loss(logits, targets.float(), mask,
                                                                                  text_config))
    assert torch.allclose(text_relevance_loss(logits[1:2], targets[1:2].float(), mask[1:2], text_config,
                                              per_example=True)[0],
                          text_relevance_loss(logits[1:2], targets[1:2].float(), mask[1:2], text_config))
    assert not torch.allclose(each, each.mean())  # samples with more labelled tokens carry more of it


def test_images_smaller_than_the_grid_of_their_relevance_maps_fail_before_training_naming_the_file(tmp_path, capsys):
    """8 x 8 images with 1024-token maps (G = 32) died at the first forward inside texture_array, without the file."""
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    rows = [{"query": "red circle", "image": "small.png", "relevance": [0.0] * 1024}] * 2
    (tmp_path / "small.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_kind", "vision", "--data_source", "files", "--train_file", str(tmp_path / "small.jsonl"),
              "--query_embedder", "hash", "--max_steps", "1", *COMMON, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"--train_file {tmp_path / 'small.jsonl'}: images of 8 x 8 pixels are smaller than the 32 x 32 grid" in \
        capsys.readouterr().err


def test_vision_entry_trains_on_token_feature_files(tmp_path):
    rows = [{"query": "red circle", "token_features": torch.rand(16, 13).tolist(),
             "relevance": torch.rand(16).tolist(), "query_embedding": torch.randn(8).tolist()} for _ in range(6)]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    argv = ["--model_kind", "vision", "--data_source", "files", "--train_file", str(path),
            "--validation_file", str(path), "--config_overrides", "grid_size=4,top_k_tokens=4", "--top_k", "4",
            "--max_steps", "2", "--output_dir", str(tmp_path / "vf"), *COMMON]
    results = run_training(*parse_args(argv))
    assert "eval_mse" in results and "heldout_mse" not in results


def test_sharpness_every_logs_curvature_probes_through_the_trainer(tmp_path, capsys):
    argv = ["--model_kind", "text", "--backbone", "tiny", "--data_source", "files", *text_files(tmp_path),
            "--optimizer", "sam", "--max_steps", "2", "--sharpness_every", "1", "--sharpness_probes",
            "sam_sharpness", "--output_dir", str(tmp_path / "probe"), *COMMON]
    run_training(*parse_args(argv))
    logged = capsys.readouterr().out
    assert logged.count("'sharpness/sam'") == 2


def test_recipe_flags_load_and_later_command_line_flags_override_them(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_kind: text\nbackbone: tiny\nmax_steps: 50\noptimizer: sam\nrho: 0.1\nuse_cpu: true\n"
                      "output_dir: x\nlora_r: 4\n", encoding="utf-8")
    model_args, data_args, training_args = parse_args([str(recipe), "--max_steps", "7"])
    assert (model_args.backbone, model_args.lora_r, training_args.rho) == ("tiny", 4, 0.1)
    assert training_args.max_steps == 7 and training_args.optimizer == "sam"
    assert recipe_to_argv(recipe)[:2] == ["--model_kind", "text"]


def test_a_recipe_may_give_sam_args_as_a_mapping(tmp_path, capsys):
    """`sam_args:` written as a YAML mapping reached the parser as a JSON object and was refused as not
    'name=value,…'; the command line takes one too."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_kind: vision\noptimizer: looksam\nsam_args:\n  alpha: 0.5\n  interval: 3\n"
                      "use_cpu: true\noutput_dir: x\n", encoding="utf-8")
    assert parse_args([str(recipe)])[2].sam_settings().extra == {"alpha": 0.5, "interval": 3}
    flags = ["--model_kind", "vision", "--optimizer", "looksam", "--use_cpu", "true", "--output_dir", "x"]
    assert parse_args([*flags, "--sam_args", '{"alpha": 0.25}'])[2].sam_settings().extra == {"alpha": 0.25}
    with pytest.raises(SystemExit):
        parse_args([*flags, "--sam_args", "{alpha: 0.25}"])
    assert "sam_args looks like a JSON object but is not valid JSON" in capsys.readouterr().err


RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes").glob("*.json"))
ACCELERATE_CONFIGS = [r for r in RECIPES if r.name.startswith("accelerate_")]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in ACCELERATE_CONFIGS], ids=lambda r: r.name)
def test_every_training_recipe_parses(recipe):
    model_args, _, training_args = parse_args([str(recipe)])
    assert model_args.model_kind in MODEL_KINDS
    assert training_args.optimizer in available_methods()


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda r: r.name)
def test_accelerate_configs_load_as_accelerate_launch_configs(config):
    from accelerate.commands.config.config_args import ClusterConfig

    cluster = ClusterConfig.from_yaml_file(str(config))  # accelerate's own parser: rejects unknown keys
    assert str(cluster.distributed_type) in {"DistributedType.MULTI_GPU", "DistributedType.FSDP", "MULTI_GPU", "FSDP"}
    assert cluster.num_processes >= 2
    if cluster.fsdp_config:
        assert int(cluster.fsdp_config["fsdp_version"]) == 2


def test_bad_arguments_fail_with_the_argument_name(tmp_path, capsys):
    cases = [
        (["--model_kind", "audio"], "--model_kind must be one of"),
        (["--model_kind", "vision", "--lora_r", "4"], "--lora_r applies to the text backbone only"),
        (["--model_kind", "text", "--data_source", "files"], "--data_source files needs --train_file"),
        (["--model_kind", "vision", "--top_k", "0"], "--top_k must be an integer >= 1, got 0"),
        (["--model_kind", "vision", "--top_k", "-5"], "--top_k must be an integer >= 1, got -5"),
        (["--model_kind", "vision", "--query_embedder", "clip"],
         "--query_embedder must be one of ('minilm', 'hash'), got 'clip'"),
        (["--model_kind", "text", "--max_length", "0"], "--max_length must be an integer >= 1, got 0"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:  # a usage error: exit 2, the reason, no traceback
            parse_args([*flags, "--output_dir", str(tmp_path)])
        assert exit_info.value.code == 2, flags
        assert message in capsys.readouterr().err, flags
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_kind", "vision", "--top_k", "0", "--output_dir", str(tmp_path), *COMMON])
    assert exit_info.value.code == 2 and "--top_k" in capsys.readouterr().err


def test_resume_from_checkpoint_continues_the_run_bitwise(tmp_path):
    """The flag was ignored: the 'resumed' run trained again from scratch (and a missing folder said nothing)."""
    from safetensors.torch import load_file

    def argv(out, *extra):
        return ["--model_kind", "text", "--backbone", "tiny", "--data_source", "files", *text_files(tmp_path),
                "--optimizer", "sam", "--max_steps", "4", *COMMON, "--save_strategy", "steps", "--save_steps", "2",
                "--output_dir", str(out), *extra]

    run_training(*parse_args(argv(tmp_path / "whole")))
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    resumed = tmp_path / "resumed"
    results = run_training(*parse_args(argv(resumed, "--resume_from_checkpoint", str(checkpoint))))
    whole, again = load_file(tmp_path / "whole" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert not (resumed / "checkpoint-2").exists() and results["heldout_f1"] >= 0  # steps 3-4 only
    run_training(*parse_args(argv(tmp_path / "whole", "--resume_from_checkpoint", "true")))  # the last: step 4


def test_usable_positions_leave_out_robertas_padding_offset_and_resume_false_means_no_resume(tmp_path):
    """RoBERTa's position ids start after the padding index, so --max_length 512 passed the check and then failed
    with 'index out of range' (514 positions, pad 1); a recipe's resume_from_checkpoint: false was refused."""
    from types import SimpleNamespace

    from transformers import BertConfig, RobertaConfig

    from arrcoc_sam.relevance.training import _usable_positions, checkpoint_to_resume

    assert _usable_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert _usable_positions(BertConfig(max_position_embeddings=512)) == 512
    for value in (None, False, "", "false", "False"):
        assert checkpoint_to_resume(SimpleNamespace(resume_from_checkpoint=value, output_dir=str(tmp_path))) is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--resume_from_checkpoint", "nowhere"], "--resume_from_checkpoint nowhere: no such checkpoint folder"),
    (["--resume_from_checkpoint", "true"], "--resume_from_checkpoint true: no checkpoint-N folder in --output_dir"),
    (["--max_length", "3"], "--max_length 3: max_length=3 is too short for the query 'person'"),
    (["--max_length", "600"], "--max_length 600 exceeds the 512 positions of the backbone (bert)"),
])
def test_text_run_settings_that_cannot_work_are_usage_errors_before_training(tmp_path, capsys, flags, message):
    """--max_length 3 trained on examples without a single text token (every metric 0.0), 6 died in the tokenizer
    and 600 in the first step; a resume folder that does not exist was ignored."""
    argv = ["--model_kind", "text", "--backbone", "tiny", "--data_source", "files", *text_files(tmp_path),
            "--max_steps", "1", *COMMON, "--output_dir", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value"), [("top_k", 0), ("top_k", -1), ("query_embedder", "auto"),
                                              ("num_train_scenes", 0), ("max_eval_samples", 0)])
def test_data_arguments_refuse_bad_values_at_construction(field, value):
    from arrcoc_sam.relevance.training import DataArguments

    with pytest.raises(ValueError, match=rf"--{field} must be .*got {value!r}"):
        DataArguments(**{field: value})


@pytest.mark.multiprocess
@pytest.mark.slow
def test_text_entry_runs_under_torchrun_with_two_processes(run_torchrun, tmp_path):
    """The script trains, saves and evaluates under torchrun, then destroys the process group that parsing its
    flags created, once its DDP model is unreferenced (it left the group alive, and gloo aborted some runs at
    interpreter exit: "terminate called without an active exception")."""
    out = tmp_path / "ddp"
    proc = run_torchrun(REPO / "tests" / "dist_scripts" / "entry_shutdown.py", "--model_kind", "text",
                        "--backbone", "tiny", "--data_source", "files", *text_files(tmp_path), "--optimizer", "sam",
                        "--max_steps", "2", "--output_dir", str(out), *COMMON)
    assert '"heldout_f1"' in proc.stdout
    assert (out / "model.safetensors").is_file()
    for rank in (0, 1):
        ending = json.loads((tmp_path / f"shutdown_rank{rank}.json").read_text())
        assert ending == {"status": 0, "live_ddp_at_destroy": [0], "initialized_at_exit": False}


def _feature_rows(n_tokens: int, query_dim: int | None, count: int = 4) -> str:
    rows = [{"query": "red circle", "token_features": torch.rand(n_tokens, 13).tolist(),
             "relevance": torch.rand(n_tokens).tolist(),
             **({"query_embedding": torch.randn(query_dim).tolist()} if query_dim else {})} for _ in range(count)]
    return "".join(json.dumps(row) + "\n" for row in rows)


def test_a_heldout_file_inconsistent_with_training_fails_before_training(tmp_path):
    from arrcoc_sam.relevance.data_files import DataFileError

    (tmp_path / "train.jsonl").write_text(_feature_rows(16, 8), encoding="utf-8")
    (tmp_path / "heldout.jsonl").write_text(_feature_rows(16, None), encoding="utf-8")  # would get other embeddings
    argv = ["--model_kind", "vision", "--data_source", "files", "--train_file", str(tmp_path / "train.jsonl"),
            "--heldout_file", str(tmp_path / "heldout.jsonl"), "--query_embedder", "hash",
            "--config_overrides", "grid_size=4,top_k_tokens=4", "--top_k", "4", "--max_steps", "2",
            "--output_dir", str(tmp_path / "out"), *COMMON]
    with pytest.raises(DataFileError, match=r"heldout\.jsonl: row 1: field 'query_embedding': missing, but .*train"):
        run_training(*parse_args(argv))
    assert not (tmp_path / "out").exists()  # nothing trained, nothing half-written


def test_the_model_is_saved_before_the_evaluations_run(tmp_path, monkeypatch):
    from arrcoc_sam.integrations.trainer import SAMTrainer

    def failing_evaluate(self, *args, **kwargs):
        assert (Path(self.args.output_dir) / "model.safetensors").is_file(), "evaluated before saving"
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(SAMTrainer, "evaluate", failing_evaluate)
    (tmp_path / "v.jsonl").write_text(_feature_rows(16, 8), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--model_kind", "vision", "--data_source", "files", "--train_file", str(tmp_path / "v.jsonl"),
            "--heldout_file", str(tmp_path / "v.jsonl"), "--config_overrides", "grid_size=4,top_k_tokens=4",
            "--top_k", "4", "--max_steps", "1", "--output_dir", str(out), *COMMON]
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_training(*parse_args(argv))
    assert AutoModel.from_pretrained(out).config.grid_size == 4


def test_config_overrides_parse_lists_and_reject_unknown_fields():
    from arrcoc_sam.relevance.training import (
        ModelArguments,
        _text_model_and_tokenizer,
        _vision_model,
        parse_overrides,
    )

    assert parse_overrides("mode=rescale,scales=[0.5,1.0,2.0],fusion='learned',b=(1, 2)") == {
        "mode": "rescale", "scales": [0.5, 1.0, 2.0], "fusion": "learned", "b": (1, 2)}
    model = _vision_model(ModelArguments(model_kind="multiscale", config_overrides=(
        "grid_size=8,mode=rescale,scales=[0.5,1.0,2.0],top_k_tokens=16")), query_dim=8)
    assert model.config.scales == [0.5, 1.0, 2.0] and model.config.num_scales == 3
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['ranking_wieght'\] for ArrCocRelevanceConfig"):
        _vision_model(ModelArguments(model_kind="vision", config_overrides="ranking_wieght=0,top_k_tokens=50"), 32)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['loss_typ', 'pos_weigth'\] for TextRelevanceConfig"):
        _text_model_and_tokenizer(ModelArguments(model_kind="text", backbone="tiny",
                                                 config_overrides="pos_weigth=10,loss_typ='focal'"))


def test_recipe_null_keeps_the_default_instead_of_the_string_none(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_kind: vision\nmax_train_samples: null\noutput_dir: x\n", encoding="utf-8")
    assert recipe_to_argv(recipe) == ["--model_kind", "vision", "--output_dir", "x"]
    assert parse_args([str(recipe)])[1].max_train_samples is None


def test_the_console_entry_is_offline_and_mistyped_local_paths_fail_without_the_hub(tmp_path, monkeypatch, capsys):
    import os

    from arrcoc_sam.cli import main as cli_main

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert cli_main(["--help"]) == 0
    assert all(os.environ[name] == "1" for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))
    missing = str(tmp_path / "my-modle")
    for argv in (["--model_kind", "vision", "--model_name_or_path", missing],
                 ["--model_kind", "text", "--model_name_or_path", missing],
                 ["--model_kind", "text", "--backbone", "tiny", "--tokenizer_name_or_path", missing]):
        with pytest.raises(SystemExit) as exit_info:  # a usage error: exit 2, the path named, no download tried
            cli_main(["train", *argv, "--query_embedder", "hash", "--num_train_scenes", "2",
                      "--num_validation_scenes", "1", "--num_heldout_scenes", "1", "--scene_image_size", "32",
                      "--output_dir", str(tmp_path / "out"), *COMMON])
        assert exit_info.value.code == 2
        assert re.search(rf"{argv[-2][2:]}: .*my-modle", capsys.readouterr().err)


def test_max_train_samples_truncates_only_the_training_split_and_max_eval_samples_the_others(tmp_path):
    from transformers import AutoTokenizer

    from arrcoc_sam.relevance.text import minilm_path
    from arrcoc_sam.relevance.training import DataArguments, build_text_data, build_vision_data

    files = text_files(tmp_path)  # 8 rows per split
    names = dict(zip(files[::2], files[1::2], strict=True))
    data_args = DataArguments(data_source="files", train_file=names["--train_file"],
                              validation_file=names["--validation_file"], heldout_file=names["--heldout_file"],
                              max_train_samples=3, max_eval_samples=5)
    text = build_text_data(data_args, AutoTokenizer.from_pretrained(minilm_path()))
    assert {split: len(rows) for split, rows in text.items()} == {"train": 3, "validation": 5, "heldout": 5}
    vision = build_vision_data(DataArguments(num_train_scenes=8, num_validation_scenes=8, num_heldout_scenes=8,
                                             scene_image_size=32, query_embedder="hash", max_train_samples=3,
                                             max_eval_samples=5))
    assert {split: len(rows) for split, rows in vision.items()} == {"train": 3, "validation": 5, "heldout": 5}


def test_data_arguments_refuse_a_boolean_where_a_count_is_expected():
    from arrcoc_sam.relevance.training import DataArguments

    with pytest.raises(ValueError, match="--top_k must be an integer >= 1, got True"):
        DataArguments(top_k=True)


def test_set_offline_keeps_a_callers_explicit_online_choice(monkeypatch):
    import os

    from arrcoc_sam.relevance.training import set_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    set_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_config_overrides_keep_commas_inside_quoted_strings():
    from arrcoc_sam.relevance.training import parse_overrides

    assert parse_overrides("name='a,b',note=\"x, [y\",k=2") == {"name": "a,b", "note": "x, [y", "k": 2}


def test_sharpness_probes_run_on_a_validation_batch_when_there_is_one():
    from types import SimpleNamespace

    from arrcoc_sam.relevance.training import ModelArguments, _add_sharpness_callback

    added = []
    trainer = SimpleNamespace(args=SimpleNamespace(per_device_eval_batch_size=2), add_callback=added.append)
    splits = {"train": [{"x": 0}, {"x": 1}, {"x": 2}], "validation": [{"x": 10}, {"x": 11}, {"x": 12}]}
    _add_sharpness_callback(trainer, ModelArguments(sharpness_every=3, sharpness_probes="trace"), splits, list)
    (callback,) = added
    assert callback.eval_batches == [[{"x": 10}, {"x": 11}]] and callback.every_n_steps == 3
    added.clear()
    _add_sharpness_callback(trainer, ModelArguments(sharpness_every=3, sharpness_probes="trace"),
                            {"train": splits["train"]}, list)
    assert added[0].eval_batches == [[{"x": 0}, {"x": 1}]]


def test_json_recipes_load_and_mapping_values_become_json_flags(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model_kind": "text", "backbone": "tiny", "output_dir": "x", "use_cpu": True,
                                  "accelerator_config": {"split_batches": True}}), encoding="utf-8")
    argv = recipe_to_argv(recipe)
    assert argv[argv.index("--accelerator_config") + 1] == '{"split_batches": true}'
    assert argv[argv.index("--use_cpu") + 1] == "true"
    model_args, _, training_args = parse_args([str(recipe), "--max_steps", "3"])
    assert model_args.backbone == "tiny" and training_args.max_steps == 3 and training_args.use_cpu


def test_a_missing_start_model_fails_before_any_data_is_read(tmp_path):
    argv = ["--model_kind", "vision", "--data_source", "files", "--train_file", str(tmp_path / "absent.jsonl"),
            "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "out"), *COMMON]
    with pytest.raises(FileNotFoundError, match="model_name_or_path: no model directory"):
        run_training(*parse_args(argv))


def test_split_seed_must_be_non_negative_and_is_named(tmp_path, capsys):
    """`--split_seed -1` reached numpy, whose message did not name the flag ('expected non-negative integer')."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model_kind", "vision", "--split_seed", "-1", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--split_seed must be an integer >= 0, got -1" in capsys.readouterr().err


def test_a_sam_recipe_run_as_its_adamw_baseline_does_not_warn_about_the_recipes_rho():
    """The README's baseline `recipes/text_minilm_lora_sam.yaml --optimizer none` always warned 'ignoring --rho' (the
    recipe's rho: 0.05); a SAM setting given on the command line with it is still said to be ignored."""
    import warnings

    recipe = str(REPO / "recipes" / "text_minilm_lora_sam.yaml")
    for optimizer in (["--optimizer", "none"], ["--optimizer=none"]):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="--optimizer none runs stock training")
            _, _, training_args = parse_args([recipe, *optimizer])
        assert (training_args.optimizer, training_args.rho) == ("none", None)
    with pytest.warns(UserWarning, match="--optimizer none runs stock training: ignoring --rho$"):
        parse_args([recipe, "--optimizer", "none", "--rho", "0.1"])
    assert parse_args([recipe])[2].rho == 0.05  # the SAM run keeps its recipe


@pytest.mark.parametrize(("flags", "message"), [
    (["--scene_image_size", "48"], "--scene_image_size 48: image_size (48) must be a positive multiple of grid_size (32)"),
    (["--config_overrides", "bogus=1"], "arrcoc-sam train: error: config_overrides: unknown field(s) ['bogus']"),
    (["--output_dir", "{tmp}/afile"], "--output_dir {tmp}/afile: exists and is not a folder"),
    (["--output_dir", "{tmp}/afile/sub"], "--output_dir {tmp}/afile/sub: cannot create the output folder"),
    (["--data_source", "files", "--train_file", "{tmp}/train.jsonl", "--validation_file", "{tmp}/nosuch.jsonl"],
     "--validation_file {tmp}/nosuch.jsonl: no such file"),
    (["--data_source", "files", "--train_file", "{tmp}"], "--train_file {tmp}: a folder, not a data file"),
])
def test_vision_setup_errors_name_the_flag_they_come_from(tmp_path, capsys, flags, message):
    """They read 'image_size (48) must be ...', 'the scenes: grid_size=32 (N=1024 tokens per sample):
    config_overrides: ...' (blaming the data), '[Errno 17] File exists: ...', 'data file not found: ...' and
    '/tmp: row 0: unknown file type'; an output folder that cannot be made only failed at the first save."""
    from arrcoc_sam.cli import main as cli_main

    (tmp_path / "afile").write_text("not a folder")
    row = {"query": "red", "token_features": [[0.1] * 13] * 4, "relevance": [0.0, 1.0, 0.2, 0.1]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    argv = ["--model_kind", "vision", "--query_embedder", "hash", "--num_train_scenes", "2", "--num_validation_scenes",
            "1", "--num_heldout_scenes", "1", "--max_steps", "1", "--output_dir", str(tmp_path / "out"), *COMMON, *flags]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out").exists()  # the probe of a new output folder leaves nothing behind


def test_config_overrides_keep_nested_brackets_and_equals_signs_inside_a_value():
    from arrcoc_sam.relevance.training import parse_overrides

    assert parse_overrides("a=[[1, 2], [3]],b=2") == {"a": [[1, 2], [3]], "b": 2}
    assert parse_overrides("name='x=y',k=(1, (2, 3))") == {"name": "x=y", "k": (1, (2, 3))}


def test_generic_pretrained_config_fields_are_accepted_as_overrides():
    """Fields a config has only through PretrainedConfig's to_dict (here output_attentions) are not typos."""
    from arrcoc_sam.relevance.training import ModelArguments, _vision_model, check_overrides
    from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig

    assert check_overrides({"output_attentions": True}, ArrCocRelevanceConfig) == {"output_attentions": True}
    model = _vision_model(ModelArguments(model_kind="vision", config_overrides="output_attentions=True"), query_dim=8,
                          grid_size=4)
    assert model.config.output_attentions is True


def test_a_start_model_saved_with_its_tokenizer_is_trained_with_that_tokenizer(tmp_path):
    from transformers import AutoTokenizer, BertConfig

    from arrcoc_sam.relevance.text import TextRelevanceModel, minilm_path
    from arrcoc_sam.relevance.training import _TINY_BERT, ModelArguments, _text_model_and_tokenizer

    TextRelevanceModel.from_backbone(BertConfig(**_TINY_BERT)).save_pretrained(tmp_path / "start")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    assert tokenizer.model_max_length != 77
    tokenizer.model_max_length = 77  # a mark that only the start model's own tokenizer carries
    tokenizer.save_pretrained(tmp_path / "start")
    _, loaded = _text_model_and_tokenizer(ModelArguments(model_kind="text", model_name_or_path=str(tmp_path / "start")))
    assert loaded.model_max_length == 77


def test_the_data_flags_reach_the_wnut_and_scene_builders(monkeypatch):
    from datasets import Dataset, DatasetDict

    from arrcoc_sam.relevance import scenes, wnut
    from arrcoc_sam.relevance.training import DataArguments, build_text_data, build_vision_data

    received = {}

    def load_wnut16_relevance(**kwargs):
        received["wnut"] = kwargs
        return DatasetDict({"train": Dataset.from_list([])})

    def make_scene_dataset(**kwargs):
        received["scenes"] = kwargs
        return DatasetDict({"train": Dataset.from_list([])})

    monkeypatch.setattr(wnut, "load_wnut16_relevance", load_wnut16_relevance)
    monkeypatch.setattr(scenes, "make_scene_dataset", make_scene_dataset)
    data_args = DataArguments(split_seed=7, wnut_validation_tweets=5, wnut_heldout_tweets=9, wnut_negatives_per_tweet=2,
                              num_train_scenes=11, num_validation_scenes=3, num_heldout_scenes=4, scene_image_size=48,
                              query_embedder="hash")
    assert build_text_data(data_args, tokenizer=None) == {}
    build_vision_data(data_args, grid_size=6)
    assert received == {
        "wnut": {"seed": 7, "validation_tweets": 5, "heldout_tweets": 9, "negatives_per_tweet": 2},
        "scenes": {"num_train": 11, "num_validation": 3, "num_heldout": 4, "image_size": 48, "seed": 7,
                   "embedder": "hash", "grid_size": 6},
    }


def test_the_probe_batch_is_the_whole_split_when_it_is_smaller_than_the_eval_batch_size():
    from types import SimpleNamespace

    from arrcoc_sam.relevance.training import ModelArguments, _add_sharpness_callback

    added = []
    trainer = SimpleNamespace(args=SimpleNamespace(per_device_eval_batch_size=8), add_callback=added.append)
    splits = {"train": [{"x": 0}] * 20, "validation": [{"x": 10}, {"x": 11}, {"x": 12}]}
    _add_sharpness_callback(trainer, ModelArguments(sharpness_every=1, sharpness_probes="trace"), splits, list)
    assert added[0].eval_batches == [[{"x": 10}, {"x": 11}, {"x": 12}]]


def test_the_model_of_a_run_is_initialised_from_seed_whatever_the_callers_random_state(tmp_path):
    from arrcoc_sam.relevance.training import build_run

    weights = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        argv = ["--model_kind", "vision", "--data_source", "scenes", "--num_train_scenes", "2", "--num_validation_scenes",
                "1", "--num_heldout_scenes", "1", "--scene_image_size", "32", "--query_embedder", "hash", "--seed", "5",
                "--output_dir", str(tmp_path / "out"), *COMMON]
        trainer, _, _ = build_run(*parse_args(argv))
        weights.append({name: value.clone() for name, value in trainer.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_top_k_sets_the_k_of_the_vision_evaluation_metrics(tmp_path):
    from transformers import EvalPrediction

    from arrcoc_sam.relevance.training import build_run
    from arrcoc_sam.relevance.vision_metrics import relevance_metrics

    (tmp_path / "v.jsonl").write_text(_feature_rows(16, 8), encoding="utf-8")
    argv = ["--model_kind", "vision", "--data_source", "files", "--train_file", str(tmp_path / "v.jsonl"),
            "--config_overrides", "grid_size=4,top_k_tokens=4", "--top_k", "3", "--output_dir", str(tmp_path / "out"),
            *COMMON]
    trainer, _, _ = build_run(*parse_args(argv))
    generator = np.random.default_rng(0)
    predictions, targets = generator.random((4, 16)), (generator.random((4, 16)) > 0.6).astype(np.float32)
    metrics = trainer.compute_metrics(EvalPrediction(predictions=predictions, label_ids=targets))
    assert metrics == relevance_metrics(predictions, targets, 3, 0.5)
    assert metrics != relevance_metrics(predictions, targets, 16, 0.5)


def test_a_recipe_list_becomes_one_flag_with_several_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_kind: vision\nlabel_names: [labels, extra]\noutput_dir: x\n", encoding="utf-8")
    assert recipe_to_argv(recipe) == ["--model_kind", "vision", "--label_names", "labels", "extra", "--output_dir", "x"]
    assert parse_args([str(recipe)])[2].label_names == ["labels", "extra"]


def test_the_last_optimizer_flag_decides_whether_a_recipes_sam_settings_are_left_out():
    """argparse keeps the last of repeated flags, in either spelling; the recipe reading must agree with it."""
    from arrcoc_sam.relevance.training import _last_value

    assert _last_value(["--optimizer", "sam", "--optimizer", "none"], "--optimizer") == "none"
    assert _last_value(["--optimizer=none", "--optimizer", "sam"], "--optimizer") == "sam"
    assert _last_value(["--optimizer", "none", "--optimizer=sam"], "--optimizer") == "sam"
    assert _last_value(["--rho", "0.1", "--optimizer"], "--optimizer") is None


def test_a_yml_recipe_is_read_like_a_yaml_one(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("model_kind: vision\nmax_steps: 9\noutput_dir: x\n", encoding="utf-8")
    model_args, _, training_args = parse_args([str(recipe)])
    assert model_args.model_kind == "vision" and training_args.max_steps == 9
