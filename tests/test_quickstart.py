"""The quickstart writes its report, figures and metrics, and prints the comparison table."""

from __future__ import annotations

import json
import shlex

import pytest

from arrcoc_sam.cli import main as cli_main


def test_tiny_quickstart_writes_report_figures_and_prints_the_table(tmp_path, capsys):
    assert cli_main(["quickstart", "--tiny", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| held-out (unseen combinations) | untrained | AdamW | SAM |" in printed and str(tmp_path / "report.md") in printed
    report = (tmp_path / "report.md").read_text()
    assert "training_curves.png" in report and "heldout_examples.png" in report
    assert "### Robustness of relevance (feature_noise" in report and "### Robustness of relevance (weight_adversarial" in report
    assert "| AdamW | 0.1 |" in report and "| SAM | 0.2 |" in report
    # the text follows the run (--tiny: 32 px images, a 16 x 16 grid, top-16), not the defaults
    assert "on a 16 x 16 grid" in report and "32 x 32" not in report and "top-16 selection" in report
    assert "a 7 % binary mask scores about 0.45" not in report and "a perfect ranking scores" in report
    command = report.split("Reproduce this report")[1].split("\n\n")[1].strip()
    assert command.startswith("arrcoc-sam quickstart ") and "--tiny" not in command
    from arrcoc_sam.relevance.quickstart import _parser

    rerun = vars(_parser().parse_args(shlex.split(command)[2:]))
    ran = json.loads((tmp_path / "metrics.json").read_text())["args"]
    assert rerun == {**ran, "tiny": False}  # every setting of the run, spelled out
    for figure in ("training_curves.png", "heldout_examples.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "metrics.json").read_text())["heldout"]
    for run in ("untrained", "adamw", "sam"):
        assert {"heldout_mse", "heldout_spearman", "heldout_top_k_recall", "heldout_ndcg"} <= set(metrics[run])
        assert 0 <= metrics[run]["heldout_top_k_recall"] <= 1
    assert metrics["adamw"] != metrics["sam"], "SAM and AdamW runs must differ"
    # the comparison says what it is: equal steps, one seed, and by how much the better run leads
    assert "equal steps, not equal compute" in report and "One run per optimizer (seed 0)" in report
    gap = abs(metrics["adamw"]["heldout_mse"] - metrics["sam"]["heldout_mse"])
    mse_row = next(line for line in report.splitlines() if line.startswith("| MSE"))
    assert mse_row.endswith(f"({gap:.4f}) |")


def test_saved_quickstart_models_load_with_automodel_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    assert cli_main(["quickstart", "--tiny", "--robustness-scenes", "0", "--output-dir", str(tmp_path)]) == 0
    code = (
        "import sys, torch, arrcoc_sam.relevance\n"
        "from transformers import AutoModel\n"
        "model = AutoModel.from_pretrained(sys.argv[1])\n"
        "print(type(model).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sam")], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "ArrCocRelevanceModel"


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--top-k"])
def test_quickstart_rejects_counts_below_one_by_flag(flag, capsys):
    from arrcoc_sam.relevance.quickstart import _parser

    with pytest.raises(SystemExit):
        _parser().parse_args([flag, "0"])
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_report_facts_are_computed_from_the_held_out_targets():
    import torch

    from arrcoc_sam.relevance.quickstart import _data_facts
    from arrcoc_sam.relevance.rank_metrics import spearman

    labels = [[0.0, 0.0, 0.7, 1.0, 0.0, 0.2], [0.0, 0.6, 0.0, 0.0, 0.0, 0.0]]
    scenes = {"heldout": {"labels": labels, "query": ["red circle", "blue square"]}}

    class Rows(list):
        def __getitem__(self, key):
            return [row[key] for row in self] if isinstance(key, str) else super().__getitem__(key)

    scenes["heldout"] = Rows({"labels": row, "query": q} for row, q in zip(labels, ["red circle", "blue square"],
                                                                          strict=True))
    facts = _data_facts(scenes)
    assert facts["queries"] == ["red circle", "blue square"]
    assert facts["mask_share"] == pytest.approx(3 / 12)
    target = torch.tensor(labels, dtype=torch.float64)
    expected = spearman(target + 1e-6 * torch.arange(6.0, dtype=torch.float64), target).mean()  # any untied order
    assert facts["spearman_ceiling"] == pytest.approx(float(expected), abs=1e-12)


def test_tiny_sets_defaults_that_flags_given_with_it_override():
    from arrcoc_sam.relevance.quickstart import TINY_DEFAULTS, parse_args

    tiny = parse_args(["--tiny"])
    assert all(getattr(tiny, name) == value for name, value in TINY_DEFAULTS.items())
    chosen = parse_args(["--tiny", "--top-k", "8", "--steps", "2", "--image-size", "16"])
    assert (chosen.top_k, chosen.steps, chosen.image_size, chosen.batch_size) == (8, 2, 16, TINY_DEFAULTS["batch_size"])
    assert parse_args([]).steps == 240  # without --tiny the full defaults


@pytest.mark.parametrize(("flags", "message"), [
    (["--rho", "-0.1"], "argument --rho: must be a finite number >= 0, got -0.1"),
    (["--image-size", "33"], "--image-size 33: scenes need a side of 4 to 63 px that is even"),
    (["--image-size", "100"], "--image-size 100: scenes need a side"),
    (["--image-size", "32", "--top-k", "257"], "--top-k 257 exceeds the 256 tokens of a 16 x 16 grid"),
])
def test_quickstart_options_that_cannot_run_are_usage_errors(flags, message, capsys):
    from arrcoc_sam.relevance.quickstart import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_table_names_the_better_run_by_each_metrics_own_direction():
    """MSE and loss: lower is better; Spearman, top-K recall and NDCG: higher is better."""
    from arrcoc_sam.relevance.quickstart import _table

    keys = ("mse", "spearman", "top_k_recall", "ndcg", "loss")
    results = {"untrained": dict.fromkeys((f"heldout_{k}" for k in keys), 0.5),
               "adamw": {f"heldout_{k}": 0.2 for k in keys}, "sam": {f"heldout_{k}": 0.3 for k in keys}}
    rows = {line.split(" (")[0].lstrip("| "): line for line in _table(results).splitlines()[2:]}
    assert rows["MSE"].endswith("| AdamW (0.1000) |") and rows["loss"].endswith("| AdamW (0.1000) |")
    for label in ("Spearman", "top-K recall", "NDCG@K"):
        assert rows[label].endswith("| SAM (0.1000) |"), rows[label]
    assert rows["MSE"] == "| MSE (lower is better) | 0.5000 | 0.2000 | 0.3000 | AdamW (0.1000) |"


def test_both_runs_start_alike_the_baseline_has_no_rho_and_each_section_reads_its_own_scenes(tmp_path, monkeypatch):
    """Same seed, same initial weights (equal untrained figures); AdamW runs without a rho; the held-out table reads
    the held-out scenes (6, not the 4 validation ones) and the robustness section the first --robustness-scenes."""
    from arrcoc_sam.integrations import trainer as trainer_module
    from arrcoc_sam.relevance import quickstart, robustness

    settings, heldout_sizes, robustness_sizes, untrained = [], [], [], []
    arguments_class, evaluate, train_one = (trainer_module.SAMTrainingArguments, trainer_module.SAMTrainer.evaluate,
                                            quickstart._train_one)

    def training_arguments(**kwargs):
        settings.append((kwargs["optimizer"], kwargs["rho"]))
        return arguments_class(**kwargs)

    def recording_evaluate(self, *args, **kwargs):
        if kwargs.get("metric_key_prefix") == "heldout":
            heldout_sizes.append(len(kwargs["eval_dataset"]))
        return evaluate(self, *args, **kwargs)

    def recording_train_one(*args):
        result = train_one(*args)
        untrained.append({key: result[2][key] for key in ("heldout_mse", "heldout_spearman", "heldout_loss")})
        return result

    monkeypatch.setattr(trainer_module, "SAMTrainingArguments", training_arguments)
    monkeypatch.setattr(trainer_module.SAMTrainer, "evaluate", recording_evaluate)
    monkeypatch.setattr(quickstart, "_train_one", recording_train_one)
    monkeypatch.setattr(robustness, "robustness_report_section", lambda models, batches, **options: robustness_sizes.append(
        sum(len(batch["labels"]) for batch in batches)) or "")
    assert cli_main(["quickstart", "--tiny", "--steps", "2", "--validation-scenes", "4", "--heldout-scenes", "6",
                     "--robustness-scenes", "3", "--output-dir", str(tmp_path)]) == 0
    assert settings == [("none", None), ("sam", 0.05)]
    assert heldout_sizes == [6, 6, 6, 6] and robustness_sizes == [3, 3]
    assert untrained[0] == untrained[1]
