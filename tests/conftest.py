"""Shared test fixtures: offline HF, deterministic seeds, and a real 2-process torchrun launcher."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The suite's models are tiny: one intra-op thread is fastest on 2-core machines, leaves the other core to
    torchrun peers, and avoids oversubscription (measured: a tiny-BERT test went from 71 s to 2 s)."""
    torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def flat_reductions(monkeypatch) -> None:
    """Run the accelerator path of the engine's reductions (every tensor in flattened chunks) on CPU tensors."""
    from arrcoc_sam.sam import perturbation

    monkeypatch.setattr(perturbation, "_flatten_limit", lambda device: math.inf)


@pytest.fixture
def per_tensor_reductions(monkeypatch) -> None:
    """Run the engine's reductions one tensor at a time, whatever the tensors' sizes."""
    from arrcoc_sam.sam import perturbation

    monkeypatch.setattr(perturbation, "_flatten_limit", lambda device: 0)


@pytest.fixture
def run_torchrun(tmp_path):
    """Run ``torchrun --nproc_per_node N SCRIPT ARGS`` on CPU/gloo; returns the CompletedProcess (check=True).

    The script runs with the repository root on PYTHONPATH and its working directory at ``tmp_path``.
    """

    def run(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, module: bool = False):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={nproc}", "--nnodes=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}",
        ]
        cmd += ["-m", str(script)] if module else [str(script)]
        cmd += list(args)
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(
                f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}"
                f"\n--- stderr ---\n{proc.stderr[-6000:]}"
            )
        return proc

    return run


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (GradientState remembers a Trainer's unfinished dataloader,
    which makes later `accumulate()` calls sync on every micro-batch): give every test fresh ones."""
    yield
    import sys as _sys

    state = _sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(True)
        state.GradientState._reset_state()
