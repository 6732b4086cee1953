"""What a user gets wrong ends in a message that names it, before anything trains: launches whose processes
would train separately, missing files and model folders, malformed data rows, knobs a method does not take,
and quickstart options that cannot work together. Runs are reproducible under one seed."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers.training_args import ParallelMode

from arrcoc_sam.cli import main as cli_main
from arrcoc_sam.integrations.trainer import check_processes_train_together

REPO = Path(__file__).resolve().parents[1]
NER = "John\tB-person\nruns\tO\n\nParis\tB-geo\nis\tO\nbig\tO\n\nMary\tB-person\nsings\tO\n"


def _script(name: str):
    """A file under scripts/ as a module (scripts/ is not a package), loaded once."""
    module_name = f"{name}_under_test"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up here
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


@pytest.mark.parametrize(("world_size_env", "world_size", "refused"), [("2", 1, True), ("2", 2, False), (None, 1, False)])
def test_processes_that_would_each_train_their_own_copy_are_refused(monkeypatch, world_size_env, world_size, refused):
    if world_size_env is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size_env)
    mode = ParallelMode.NOT_PARALLEL if world_size == 1 else ParallelMode.DISTRIBUTED
    args = SimpleNamespace(world_size=world_size, parallel_mode=mode)
    if refused:
        with pytest.raises(ValueError, match=r"2 processes were launched .* pass --use_cpu true \(torchrun\)"):
            check_processes_train_together(args)
    else:
        check_processes_train_together(args)



def test_every_sam_trainer_checks_that_its_launched_processes_train_together(monkeypatch, tmp_path):
    """The check above runs for each SAMTrainer, plain TrainingArguments included (SAMTrainingArguments do not run
    it): a 2-process torchrun without --use_cpu is refused before anything trains (its 2-process launch is
    test_torchrun_without_cpu_flag_on_a_cpu_machine_is_refused)."""
    from transformers import TrainingArguments

    import arrcoc_sam.integrations.trainer as trainer_module
    from arrcoc_sam import SAMTrainer

    checked = []

    def check(args):
        checked.append(args)
        check_processes_train_together(args)

    monkeypatch.setattr(trainer_module, "check_processes_train_together", check)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    SAMTrainer(model=torch.nn.Linear(2, 2), args=args)
    assert checked == [args]

_LAUNCHED = {
    "trainer": (
        "from arrcoc_sam import SAMTrainer, SAMTrainingArguments\n"
        "args = SAMTrainingArguments(output_dir=sys.argv[1], report_to='none', use_cpu=together)\n"
        "SAMTrainer(model=torch.nn.Linear(2, 2), args=args)\n"
        "print(f'built with world size {args.world_size}', flush=True)  # one write: the ranks share stdout\n"
    ),
    "accelerate": (
        "from accelerate import Accelerator\n"
        "from arrcoc_sam.integrations import AcceleratedSAM\n"
        "accelerator = Accelerator(cpu=together)\n"
        "model = torch.nn.Linear(2, 2)\n"
        "model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))\n"
        "AcceleratedSAM(accelerator, model, optimizer)\n"
        "print(f'built with world size {accelerator.num_processes}', flush=True)\n"
    ),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("entry", sorted(_LAUNCHED))
def test_torchrun_without_cpu_flag_on_a_cpu_machine_is_refused(tmp_path, entry):
    import subprocess

    script = tmp_path / "train.py"
    script.write_text("import sys, torch\ntogether = '--use_cpu' in sys.argv\n" + _LAUNCHED[entry], encoding="utf-8")
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def launch(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), str(tmp_path / "out"), *flags], capture_output=True, text=True,
                              env=env, timeout=240)

    alone = launch()
    # older stacks (accelerate 1.3 with transformers 5.6) do form the 2-process group on CPU without the flag, so
    # there is nothing to refuse; newer ones leave each process to train alone, which must be refused
    formed_group = alone.returncode == 0 and alone.stdout.count("built with world size 2") == 2
    assert formed_group or (alone.returncode != 0 and "2 processes were launched (WORLD_SIZE=2)" in alone.stderr)
    together = launch("--use_cpu")
    assert together.returncode == 0, together.stderr[-3000:]
    assert together.stdout.count("built with world size 2") == 2


def _token_classification_argv(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "ner.txt"
    data.write_text(NER, encoding="utf-8")
    return ["train_token_classification.py", "--train_file", str(data), "--tiny", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "true",
            "--save_strategy", "no", "--disable_tqdm", "true", *extra]


def test_token_classification_runs_with_one_seed_train_the_same_weights(tmp_path, monkeypatch):
    script = _script("train_token_classification")
    weights = []
    for run in ("first", "second"):
        monkeypatch.setattr(sys, "argv", _token_classification_argv(tmp_path, "--output_dir", str(tmp_path / run)))
        torch.manual_seed(len(weights))  # whatever the global RNG holds before main(), the seed decides
        script.main()
        weights.append(load_file(str(tmp_path / run / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.parametrize(("flags", "message"), [
    (["--validation_file", "missing.txt"], "--validation_file missing.txt: no such file"),
    (["--model_name_or_path", "no-such-folder"], "--model_name_or_path no-such-folder: not a local directory"),
])
def test_token_classification_missing_inputs_are_usage_errors(tmp_path, monkeypatch, capsys, flags, message):
    script = _script("train_token_classification")
    monkeypatch.setattr(sys, "argv", _token_classification_argv(tmp_path, "--output_dir", str(tmp_path / "o"), *flags))
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_malformed_token_classification_row_is_a_usage_error_naming_file_and_line(tmp_path, monkeypatch, capsys):
    script = _script("train_token_classification")
    argv = _token_classification_argv(tmp_path, "--output_dir", str(tmp_path / "o"))
    Path(argv[2]).write_text("John\tB-person\nruns\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2 and f"{argv[2]}: line 2: expected 'token<TAB>tag'" in capsys.readouterr().err


def test_arrcoc_sam_train_names_itself_and_its_recipe_argument_in_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: arrcoc-sam train [RECIPE.yaml | RECIPE.json]")


@pytest.mark.parametrize(("case", "message"), [
    ("missing recipe", "recipe {tmp}/vision_sm.yaml: [Errno 2] No such file or directory"),
    ("bad yaml", "recipe {tmp}/broken.yaml: not valid YAML"),
    ("bad row", "{tmp}/train.jsonl: row 1: field 'relevance': values must lie in [0, 1]"),
    ("missing model", "model_name_or_path: no model directory with a config.json at '{tmp}/nope'"),
])
def test_arrcoc_sam_train_setup_errors_exit_2_before_training(tmp_path, capsys, case, message):
    (tmp_path / "broken.yaml").write_text("model_kind: [vision\n", encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(
        '{"query": "red", "token_features": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]], '
        '"relevance": [0.0, 1.5, 0.2, 0.1], "query_embedding": [0.1, 0.2, 0.3, 0.4]}\n', encoding="utf-8")
    common = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none", "--max_steps", "1"]
    argv = {
        "missing recipe": [str(tmp_path / "vision_sm.yaml")],
        "bad yaml": [str(tmp_path / "broken.yaml")],
        "bad row": ["--model_kind", "vision", "--data_source", "files", "--train_file", str(tmp_path / "train.jsonl"),
                    "--query_embedder", "hash"],
        "missing model": ["--model_kind", "vision", "--model_name_or_path", str(tmp_path / "nope")],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *argv, *common])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "arrcoc-sam train: error: " in err and message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_top_k_above_the_grid_warns_that_recall_is_trivially_one(tmp_path):
    from arrcoc_sam.relevance.training import build_run, parse_args

    features = json.dumps([[0.1 * (i + c) for c in range(13)] for i in range(4)])  # 4 tokens x 13 channels
    row = (f'{{"query": "red", "token_features": {features}, '
           '"relevance": [0.0, 1.0, 0.2, 0.1], "query_embedding": [0.1, 0.2, 0.3, 0.4]}\n')
    (tmp_path / "train.jsonl").write_text(row * 2, encoding="utf-8")
    argv = ["--model_kind", "vision", "--data_source", "files", "--train_file", str(tmp_path / "train.jsonl"),
            "--query_embedder", "hash", "--config_overrides", "grid_size=2,top_k_tokens=2",
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    with pytest.warns(UserWarning, match=r"--top_k 200 exceeds the 4 tokens per sample of a 2 x 2 grid"):
        build_run(*parse_args(argv))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_run(*parse_args([*argv, "--top_k", "3"]))
    assert not [w for w in caught if "--top_k" in str(w.message)]


def test_method_knobs_are_the_builders_named_keywords_and_unknown_behind_a_catch_all(monkeypatch):
    from arrcoc_sam.sam import registry

    assert registry.method_knobs("looksam") == {"adaptive", "alpha", "eta", "interval", "rho"}
    assert registry.method_knobs("sam") == {"adaptive", "eta", "rho"}  # not SAM's **base_kwargs
    monkeypatch.setitem(registry._BUILDERS, "open", lambda params, base, **knobs: None)
    monkeypatch.setitem(registry._BUILDERS, "closed", lambda params, base, rho=0.05, *, k=2: None)
    assert registry.method_knobs("open") is None and registry.method_knobs("closed") == {"rho", "k"}
    assert registry.method_knobs("no-such-method") is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--max_seq_length", "0"], "--max_seq_length must be >= 1, got 0"),
    (["--max_train_samples", "-3"], "--max_train_samples must be >= 1 (or left out), got -3"),
    (["--model_config_json", "{bad"], "--model_config_json {bad: not valid JSON"),
    (["--model_config_json", "nosuch.json"], "--model_config_json nosuch.json: neither a JSON object nor a file"),
    (["--model_config_json", '{"hidden_size": 30, "num_attention_heads": 4}'],
     '--model_config_json {"hidden_size": 30, "num_attention_heads": 4}: no BERT model can be built from it '
     "(ValueError: The hidden size (30) is not a multiple of the number of attention heads (4))"),
    (["--train_file", "{tmp}/latin.txt"], "{tmp}/latin.txt: not UTF-8 text (byte 1: invalid continuation byte)"),
    (["--train_file", "{tmp}"], "--train_file {tmp}: a folder, not a file"),
])
def test_token_classification_bad_values_are_usage_errors_naming_the_flag_or_file(tmp_path, monkeypatch, capsys,
                                                                                  flags, message):
    """These were tracebacks (ValueError from the argument dataclass, JSONDecodeError, BertConfig's refusal; a file
    name was parsed as JSON text), or a usage error that named no file ('utf-8' codec can't decode ...) or called a
    folder 'no such file'."""
    script = _script("train_token_classification")
    (tmp_path / "latin.txt").write_bytes("J\xe9r\tO\n".encode("latin-1"))
    argv = _token_classification_argv(tmp_path, "--output_dir", str(tmp_path / "o"))
    if "--model_config_json" in flags:
        argv.remove("--tiny")
    monkeypatch.setattr(sys, "argv", [*argv, *(flag.replace("{tmp}", str(tmp_path)) for flag in flags)])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.replace("{tmp}", str(tmp_path)) in err, err


_PARSES_SAM_ARGUMENTS = (
    "import pathlib, sys\n"
    "from transformers import HfArgumentParser\n"
    "from arrcoc_sam import SAMTrainingArguments\n"
    "(args,) = HfArgumentParser((SAMTrainingArguments,)).parse_args_into_dataclasses()\n"
    "pathlib.Path(args.output_dir, 'parsed').write_text(args.optimizer)\n"
)


def test_launcher_settings_a_sam_arguments_script_parses_otherwise_are_a_usage_error_at_parse_time(tmp_path, capsys):
    """`--optimizer asam --rho 0.7` on a script that parses SAMTrainingArguments itself (it sees sam, rho None) was
    refused by the Trainer at train(), a traceback after the model and data were built; now its parser stops."""
    from arrcoc_sam.integrations.launch import main as launch

    script = tmp_path / "own.py"
    script.write_text(_PARSES_SAM_ARGUMENTS)
    common = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    assert launch(["--optimizer", "asam", "--rho", "0.7", str(script), *common]) == 2
    err = capsys.readouterr().err
    assert ("own.py: error: the script parses SAMTrainingArguments and reads optimizer='sam', rho=None where python -m "
            "arrcoc_sam.launch has optimizer='asam', rho=0.7 from --optimizer, --rho") in err, err
    assert not (tmp_path / "parsed").exists()
    assert launch(["--optimizer", "sam", str(script), *common]) == 0  # the same settings: nothing to refuse
    assert (tmp_path / "parsed").read_text() == "sam"


def test_arrcoc_sam_without_a_command_is_a_usage_error(capsys):
    """It printed the usage and exited 0."""
    assert cli_main([]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage: arrcoc-sam COMMAND") and "error: give a COMMAND" in captured.err
    assert cli_main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: arrcoc-sam COMMAND")


def test_a_backward_outside_the_window_that_left_nan_gradients_is_refused():
    """A gradient left in .grad by a backward outside the window (here one that overflowed to NaN) is refused like a
    finite one: NaN is not 'all zero'."""
    from accelerate import Accelerator

    from arrcoc_sam.integrations.accelerate import AcceleratedSAM

    sys.path.insert(0, str(REPO / "tests" / "dist_scripts"))
    from accelerate_common import LR, batches, mse, regression_data, tiny_mlp

    accelerator = Accelerator(cpu=True)
    model = tiny_mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    sam = AcceleratedSAM(accelerator, model, optimizer, method="sam", rho=0.1)
    first = next(model.parameters())
    first.grad = torch.zeros_like(first)
    first.grad[0] = math.nan
    with pytest.raises(RuntimeError, match="window opened with gradients already in .grad"):
        sam.backward(mse, batches(regression_data(4), 4)[0])


def test_only_sam_settings_the_launcher_was_given_are_held_against_a_script_that_parses_its_own(tmp_path, capsys):
    """A script whose SAM arguments default to asam runs as it says when the launcher got no SAM flag; a launcher
    --sam_args the script never saw (it parses none) is a usage error, like any other SAM flag it took."""
    from arrcoc_sam.integrations.launch import main as launch

    script = tmp_path / "own_default.py"
    script.write_text(_PARSES_SAM_ARGUMENTS.replace(
        "(args,) = HfArgumentParser((SAMTrainingArguments,))",
        "import dataclasses\n"
        "@dataclasses.dataclass\n"
        "class Args(SAMTrainingArguments):\n"
        "    optimizer: str = 'asam'\n"
        "(args,) = HfArgumentParser((Args,))"))
    common = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    assert launch([str(script), *common]) == 0
    assert (tmp_path / "parsed").read_text() == "asam"
    (tmp_path / "parsed").unlink()
    plain = tmp_path / "own.py"
    plain.write_text(_PARSES_SAM_ARGUMENTS)
    assert launch(["--sam_args", "rho=0.1", str(plain), *common]) == 2
    assert "reads sam_args={} where python -m arrcoc_sam.launch has sam_args={'rho': 0.1}" in capsys.readouterr().err
    assert not (tmp_path / "parsed").exists()
