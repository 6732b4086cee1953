"""`python -m arrcoc_sam.launch SCRIPT.py --optimizer sam ...` runs an unmodified HF script with SAM."""

from __future__ import annotations

import contextlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import Seq2SeqTrainer, Trainer

from arrcoc_sam.integrations._settings import SAMSettings
from arrcoc_sam.integrations.launch import main, split_argv
from arrcoc_sam.integrations.trainer import _STOCK_TRAINING_STEP, patched_trainer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_token_classification.py"
SAM_KEYS = {"sam/loss_perturbed", "sam/sharpness", "sam/grad_norm", "sam/grad_norm_perturbed", "sam/grad_cosine",
            "sam/rho", "sam/skipped_steps"}


def _conll(path: Path, sentences: int = 32) -> Path:
    rng = random.Random(0)
    tags = {"john": "B-person", "mary": "B-person", "paris": "B-geo", "google": "B-company"}
    words = [*tags, "the", "went", "to", "likes", "big", "city", "red"]
    lines = []
    for _ in range(sentences):
        lines += [f"{w}\t{tags.get(w, 'O')}" for w in rng.choices(words, k=rng.randint(3, 8))] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def _script_args(tmp_path: Path) -> list[str]:
    return ["--train_file", str(_conll(tmp_path / "ner.txt")), "--tiny", "--output_dir", str(tmp_path / "out"),
            "--optim", "adamw_torch", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
            "--disable_tqdm", "true"]


def _sam_log(tmp_path: Path) -> list[dict]:
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def test_split_argv_leaves_script_flags_alone_and_takes_no_abbreviations():
    sam, script, rest = split_argv(["train.py", "--optim", "adamw_torch", "--optimizer", "asam", "--rho", "0.5",
                                    "--output_dir", "o", "--sam_scope", "per_device", "--optimiz", "x"])
    assert (sam.optimizer, sam.rho, sam.sam_scope, script) == ("asam", 0.5, "per_device", "train.py")
    assert rest == ["--optim", "adamw_torch", "--output_dir", "o", "--optimiz", "x"]
    with pytest.raises(SystemExit):
        split_argv(["train.py", "--sam_scope", "everywhere"])
    with pytest.raises(SystemExit):
        split_argv(["--optimizer", "sam"])
    with pytest.raises(SystemExit):  # the script must come first: a script flag is not a script
        split_argv(["--output_dir", "o", "train.py"])
    numbers = split_argv(["train.py", "--sam_eta", "0.2", "--sam_interval", "3"])[0]
    assert (numbers.sam_eta, numbers.sam_interval) == (0.2, 3)


def test_bad_launcher_flags_exit_2_with_the_reason(capsys):
    assert main([str(SCRIPT), "--optimizer", "sharp"]) == 2
    assert "optimizer must be one of none, " in capsys.readouterr().err
    assert main(["missing_script.py", "--optimizer", "sam"]) == 2
    assert "training script 'missing_script.py' not found" in capsys.readouterr().err
    assert main([str(SCRIPT.parent), "--optimizer", "sam"]) == 2  # a folder: said so, not "not found"
    assert f"training script {str(SCRIPT.parent)!r} is a folder, not a Python file" in capsys.readouterr().err
    assert main([str(SCRIPT), "--optimizer", "esam", "--sam_args", "gamma=1.5"]) == 2  # refused before the script runs
    assert "--optimizer esam (gamma=1.5, sam_scope=global): gamma must be a number in (0, 1]" in capsys.readouterr().err


def test_patch_reaches_trainer_subclasses_and_is_undone():
    with patched_trainer(SAMSettings()):
        assert Seq2SeqTrainer.training_step is not _STOCK_TRAINING_STEP
        assert Seq2SeqTrainer.training_step is Trainer.training_step
    assert Trainer.training_step is _STOCK_TRAINING_STEP


@pytest.mark.parametrize("raises", [False, True])
def test_patch_and_launcher_settings_are_gone_after_the_block_even_when_it_raises(tmp_path, raises):
    from transformers import TrainingArguments

    from arrcoc_sam import SAMTrainer

    with contextlib.suppress(RuntimeError), patched_trainer(SAMSettings(method="asam", rho=0.7)):
        if raises:
            raise RuntimeError("the script failed")
    assert Trainer.training_step is _STOCK_TRAINING_STEP
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    group = SAMTrainer(model=torch.nn.Linear(2, 2), args=args).create_optimizer().param_groups[0]
    assert (group["rho"], group["adaptive"]) == (0.05, False)  # SAM's defaults, not the last launch's ASAM


def test_launcher_runs_unmodified_script_with_sam(tmp_path):
    text = SCRIPT.read_text()
    assert "import arrcoc_sam" not in text and "from arrcoc_sam" not in text
    code = main([str(SCRIPT), "--optimizer", "sam", "--rho", "0.05", *_script_args(tmp_path)])
    assert code == 0
    logs = _sam_log(tmp_path)
    assert len(logs) == 2 and all(set(h) >= SAM_KEYS for h in logs)
    assert logs[0]["sam/rho"] == pytest.approx(0.05)
    assert Trainer.training_step is _STOCK_TRAINING_STEP


@pytest.mark.multiprocess
@pytest.mark.slow
def test_launcher_under_torchrun_two_processes(run_torchrun, tmp_path):
    run_torchrun("arrcoc_sam.launch", str(SCRIPT), "--optimizer", "asam", "--sam_scope", "per_device",
                 *_script_args(tmp_path), module=True)
    logs = _sam_log(tmp_path)
    assert len(logs) == 2 and all(set(h) >= SAM_KEYS for h in logs)
    assert logs[0]["sam/rho"] == pytest.approx(0.5)


def test_shutdown_frees_training_objects_in_cycles_before_destroying_the_group(tmp_path):
    """A DDP model kept only by a reference cycle (as a finished Trainer keeps it) is freed while the group
    is still alive, not left to a garbage collection during interpreter exit."""
    import gc
    import weakref

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from arrcoc_sam.integrations.launch import shutdown_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    automatic_gc = gc.isenabled()
    gc.disable()  # no automatic collection may free the cycle first
    try:
        holder: dict = {"model": DistributedDataParallel(torch.nn.Linear(2, 2))}
        holder["self"] = holder
        model_ref = weakref.ref(holder["model"])
        del holder
        assert model_ref() is not None
        shutdown_process_group()
        assert model_ref() is None
        assert not dist.is_initialized()
    finally:
        if automatic_gc:
            gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_launcher_boolean_flag_takes_true_false_and_bare_forms():
    assert split_argv(["train.py", "--sam_statistics", "false"])[0].sam_statistics is False
    assert split_argv(["train.py", "--sam_statistics", "true"])[0].sam_statistics is True
    assert split_argv(["train.py", "--sam_statistics"])[0].sam_statistics is True
    assert split_argv(["train.py"])[0].sam_settings().statistics is True
    with pytest.raises(SystemExit):
        split_argv(["train.py", "--sam_statistics", "maybe"])


def test_launcher_flags_that_a_script_with_its_own_sam_arguments_never_saw_are_refused(tmp_path):
    from arrcoc_sam import SAMTrainer, SAMTrainingArguments

    def arguments():
        return SAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")

    refused = pytest.raises(ValueError, match="took its own SAM flags .*asam.* run a script that parses the SAM")
    with patched_trainer(SAMSettings(method="asam", rho=0.7)), refused:
        SAMTrainer(model=torch.nn.Linear(2, 2), args=arguments())
    with patched_trainer(SAMSettings()):  # the same settings on both sides: no conflict
        SAMTrainer(model=torch.nn.Linear(2, 2), args=arguments())


def test_a_script_with_its_own_sam_arguments_keeps_them_when_the_launcher_got_no_sam_flag(tmp_path):
    from arrcoc_sam import SAMTrainer, SAMTrainingArguments
    from arrcoc_sam.integrations.launch import flags_given

    assert flags_given(["train.py", "--optim", "sgd", "--rho_schedule", "x"]) == []
    assert flags_given(["train.py", "--rho", "0.1", "--sam_statistics"]) == ["rho", "sam_statistics"]
    args = SAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", optimizer="asam", rho=0.7)
    with patched_trainer(split_argv(["train.py"])[0].sam_settings(), explicit=False):
        trainer = SAMTrainer(model=torch.nn.Linear(2, 2), args=args)
        optimizer = trainer.create_optimizer()
    assert optimizer.param_groups[0]["rho"] == 0.7 and optimizer.param_groups[0]["adaptive"] is True


_EXITING_SCRIPT = """
import json, sys
import torch
from sibling import NAME  # a module next to the script
from arrcoc_sam import SAMTrainer, SAMTrainingArguments
args = SAMTrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to="none", optimizer="asam", rho=0.7)
rho = SAMTrainer(model=torch.nn.Linear(2, 2), args=args).create_optimizer().param_groups[0]["rho"]
with open(sys.argv[1] + "/seen.json", "w") as handle:
    json.dump({"argv": sys.argv, "rho": rho, "name": NAME}, handle)
sys.exit(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
"""


@pytest.mark.parametrize("exit_arg,status", [("0", 0), ("3", 3), ("failed: no data", 1)])
def test_launcher_returns_the_script_exit_status_and_restores_argv_and_path(tmp_path, capsys, exit_arg, status):
    """No SAM flag given: the script's own SAMTrainingArguments stand (not refused); it sees its own argv and
    imports modules next to it; the launcher's process gets its argv and sys.path back."""
    (tmp_path / "sibling.py").write_text("NAME = 'sibling'\n")
    script = tmp_path / "exits.py"
    script.write_text(_EXITING_SCRIPT)
    argv, path = sys.argv[:], sys.path[:]
    assert main([str(script), str(tmp_path), exit_arg]) == status
    assert (sys.argv, sys.path) == (argv, path)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {"argv": [str(script), str(tmp_path), exit_arg], "rho": 0.7, "name": "sibling"}
    assert ("failed: no data" in capsys.readouterr().err) == (status == 1)


def test_a_launcher_flag_is_held_against_sam_training_arguments_a_script_builds_in_code(tmp_path):
    """A script that builds SAMTrainingArguments(optimizer='asam', rho=0.7) in code has no parser to stop at parse
    time: `--optimizer sam`, taken off its command line, is refused where its SAMTrainer is built, before it trains
    (without a SAM flag the same script keeps its own settings, test above); argv, sys.path and Trainer come back."""
    (tmp_path / "sibling.py").write_text("NAME = 'sibling'\n")
    script = tmp_path / "exits.py"
    script.write_text(_EXITING_SCRIPT)
    argv, path = sys.argv[:], sys.path[:]
    refused = r"builds SAMTrainingArguments \(asam, rho=0\.7\) while arrcoc_sam\.launch took its own SAM flags \(sam,"
    with pytest.raises(ValueError, match=refused):
        main(["--optimizer", "sam", str(script), str(tmp_path), "0"])
    assert not (tmp_path / "seen.json").exists()
    assert (sys.argv, sys.path) == (argv, path) and Trainer.training_step is _STOCK_TRAINING_STEP


def test_launcher_help_prints_usage_and_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "python -m arrcoc_sam.launch SCRIPT.py" in capsys.readouterr().out


def test_launcher_without_a_script_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "give the training script to run" in capsys.readouterr().err


def test_a_process_group_the_caller_created_outlives_the_script(tmp_path):
    import torch.distributed as dist

    from arrcoc_sam.integrations.launch import owned_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with owned_process_group():
            pass
        assert dist.is_initialized()
        with pytest.raises(SystemExit), owned_process_group():
            raise SystemExit(0)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_a_script_ending_in_sys_exit_zero_still_shuts_its_process_group_down(tmp_path):
    import torch.distributed as dist

    from arrcoc_sam.integrations.launch import owned_process_group

    with pytest.raises(SystemExit), owned_process_group():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise SystemExit(0)
    assert not dist.is_initialized()


_OWN_FLAGS_SCRIPT = """
import argparse, json, sys
from dataclasses import dataclass
from transformers import HfArgumentParser

@dataclass
class Own:
    rho: float = -1.0
    optimizer: str = "script-default"

own, rest = HfArgumentParser(Own).parse_args_into_dataclasses(return_remaining_strings=True)
with open(sys.argv[-1], "w") as handle:
    json.dump({"rho": own.rho, "optimizer": own.optimizer}, handle)
"""


def test_a_script_flag_the_launcher_took_stops_the_script_naming_it(tmp_path, capsys):
    """The script's own --rho and --optimizer silently parsed their defaults (the launcher had taken them)."""
    script = tmp_path / "own_flags.py"
    script.write_text(_OWN_FLAGS_SCRIPT)
    seen = tmp_path / "seen.json"
    assert main([str(script), "--optimizer", "sam", "--rho", "0.05", str(seen)]) == 2
    assert "--optimizer, --rho: the script defines these flags itself" in capsys.readouterr().err
    assert not seen.exists()
    assert main([str(script), "--sam_scope", "global", str(seen)]) == 0  # flags the script does not define: fine
    assert json.loads(seen.read_text()) == {"rho": -1.0, "optimizer": "script-default"}
    import argparse

    assert argparse.ArgumentParser.parse_known_args.__module__ == "argparse"  # the guard is undone
    explicit = tmp_path / "explicit.py"  # a parse of a list of the script's own reads no command line: left alone
    explicit.write_text(_OWN_FLAGS_SCRIPT.replace(
        "own, rest = HfArgumentParser(Own).parse_args_into_dataclasses(return_remaining_strings=True)",
        "(own,) = HfArgumentParser(Own).parse_args_into_dataclasses(args=['--rho', '0.3'])"))
    assert main([str(explicit), "--rho", "0.05", str(seen)]) == 0
    assert json.loads(seen.read_text()) == {"rho": 0.3, "optimizer": "script-default"}


def test_a_module_next_to_the_script_wins_over_one_of_the_same_name_elsewhere(tmp_path, monkeypatch):
    """As under ``python SCRIPT.py``, the script's folder comes first on sys.path: its own ``helpers.py`` is the
    one imported, not a ``helpers`` module found further along the path."""
    elsewhere, own = tmp_path / "elsewhere", tmp_path / "project"
    for folder in (elsewhere, own):
        folder.mkdir()
        (folder / "launch_probe_helpers.py").write_text(f"WHERE = {folder.name!r}\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.delitem(sys.modules, "launch_probe_helpers", raising=False)
    script = own / "train.py"
    script.write_text("import pathlib, sys, launch_probe_helpers\n"
                      "pathlib.Path(sys.argv[1]).write_text(launch_probe_helpers.WHERE)\n")
    assert main([str(script), str(tmp_path / "where.txt")]) == 0
    assert (tmp_path / "where.txt").read_text() == "project"
    sys.modules.pop("launch_probe_helpers", None)
