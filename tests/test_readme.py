"""Every ```python block of README.md runs as written, on CPU, offline, in a fresh interpreter.

A block meant for ``torchrun`` is marked on the line right before its fence with
``<!-- readme-test: torchrun --nproc_per_node N -->`` and runs under ``torchrun --standalone`` with N CPU
(gloo) processes, every rank printing the same lines. A block that cannot run here is marked
``<!-- readme-test: skip (REASON) -->``; those are counted, not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from packaging.version import Version

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = re.compile(r"<!-- readme-test: skip \((?P<reason>[^()]*\S[^()]*)\) -->")
TORCHRUN_MARKER = re.compile(r"<!-- readme-test: torchrun --nproc_per_node (?P<nproc>[1-9][0-9]*) -->")
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
BLOCK_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README: its id, 1-based first code line, source, skip reason, and the
    number of torchrun processes it runs under (None: a plain interpreter)."""

    id: str
    line: int
    source: str
    skip_reason: str | None
    nproc: int | None = None


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "top"


def python_blocks(text: str) -> list[Block]:
    """The README's ```python blocks, each id'd by the nearest preceding heading and its index under it.

    Raises ValueError for an unclosed fence and for a `readme-test` comment that is not a well-formed skip or
    torchrun marker directly before a ```python fence.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    heading, index_under_heading = "top", 0
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("<!--") and "readme-test" in line:
            follows = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            well_formed = SKIP_MARKER.fullmatch(line.strip()) or TORCHRUN_MARKER.fullmatch(line.strip())
            if not well_formed or follows is None or follows.group(2) != "python":
                raise ValueError(f"README.md line {i + 1}: {line.strip()!r} must be '<!-- readme-test: skip "
                                 f"(REASON) -->' or '<!-- readme-test: torchrun --nproc_per_node N -->' on the "
                                 f"line right before a ```python fence")
        fence = FENCE.match(line)
        if fence is None:
            if line.startswith("#"):
                heading, index_under_heading = line.lstrip("#").strip(), 0
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1)), None)
        if end is None:
            raise ValueError(f"README.md line {i + 1}: code fence is never closed")
        if fence.group(2) == "python":
            previous = lines[i - 1].strip() if i > 0 else ""
            skip, torchrun = SKIP_MARKER.fullmatch(previous), TORCHRUN_MARKER.fullmatch(previous)
            blocks.append(Block(id=f"{_slug(heading)}-{index_under_heading}", line=i + 2,
                                source="\n".join(lines[i + 1:end]) + "\n",
                                skip_reason=skip.group("reason") if skip else None,
                                nproc=int(torchrun.group("nproc")) if torchrun else None))
            index_under_heading += 1
        i = end + 1
    return blocks


README_TEXT = README.read_text(encoding="utf-8")
BLOCKS = python_blocks(README_TEXT)
RUNNABLE = [block for block in BLOCKS if block.skip_reason is None and block.nproc is None]
TORCHRUN = [block for block in BLOCKS if block.nproc is not None]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_parser_finds_blocks_headings_and_skip_markers():
    text = ("# Top\n```python\nprint(1)\n```\n## Two words\n```bash\n# not a heading\n```\n"
            "<!-- readme-test: skip (needs CUDA) -->\n```python\nx = 1\n```\n```python\ny = 2\n```\n"
            "<!-- readme-test: torchrun --nproc_per_node 2 -->\n```python\nz = 3\n```\n")
    blocks = python_blocks(text)
    assert [(b.id, b.line, b.source, b.skip_reason, b.nproc) for b in blocks] == [
        ("top-0", 3, "print(1)\n", None, None),
        ("two-words-0", 11, "x = 1\n", "needs CUDA", None),
        ("two-words-1", 14, "y = 2\n", None, None),
        ("two-words-2", 18, "z = 3\n", None, 2),
    ]


@pytest.mark.parametrize("text", [
    "<!-- readme-test: skip () -->\n```python\nx = 1\n```\n",
    "<!-- readme-test: skip (no reason) -->\n\n```python\nx = 1\n```\n",
    "<!-- readme-test: skip (bash) -->\n```bash\nls\n```\n",
    "<!-- readme-test: torchrun --nproc_per_node 0 -->\n```python\nx = 1\n```\n",
    "<!-- readme-test: torchrun -->\n```python\nx = 1\n```\n",
    "```python\nx = 1\n",
])
def test_parser_rejects_malformed_markers_and_unclosed_fences(text):
    with pytest.raises(ValueError, match="README.md line"):
        python_blocks(text)


def test_every_skip_marker_skips_one_python_block_with_a_reason():
    markers = [SKIP_MARKER.fullmatch(line.strip()) for line in README_TEXT.splitlines()]
    reasons = [m.group("reason") for m in markers if m]
    assert reasons == [b.skip_reason for b in BLOCKS if b.skip_reason is not None]
    assert len(RUNNABLE) + len(TORCHRUN) + len(reasons) == len(BLOCKS) and RUNNABLE


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_readme_python_block_runs_as_written(block, tmp_path):
    proc = subprocess.run([sys.executable, "-c", block.source], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"README.md block {block.id} (code starts at line {block.line}) exited {proc.returncode}\n"
                    f"--- stderr ---\n{proc.stderr[-6000:]}", pytrace=False)


@pytest.mark.multiprocess
@pytest.mark.parametrize("block", TORCHRUN, ids=[block.id for block in TORCHRUN])
def test_readme_torchrun_block_runs_and_every_rank_prints_the_same(block, tmp_path):
    if "fsdp" in block.id and Version(torch.__version__).release < (2, 9):
        pytest.skip(f"FSDP2 on CPU/gloo needs torch >= 2.9 (torch {torch.__version__}; see tests/test_fsdp.py)")
    script = tmp_path / f"{block.id}.py"
    script.write_text(block.source, encoding="utf-8")
    logs = tmp_path / "logs"  # each rank's stdout in its own file: on a shared pipe their writes interleave
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={block.nproc}", f"--log-dir={logs}", "--redirects=1", str(script)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"README.md block {block.id} (code starts at line {block.line}) exited {proc.returncode} under "
                    f"torchrun\n--- stderr ---\n{proc.stderr[-6000:]}", pytrace=False)
    # torch 2.8-2.9's gloo prints "[Gloo] Rank <r> is connected to ..." on each rank's stdout
    printed = {path.parent.name: "".join(line for line in path.read_text(encoding="utf-8").splitlines(True)
                                         if not line.startswith("[Gloo] ")) for path in logs.rglob("stdout.log")}
    assert sorted(printed) == [str(rank) for rank in range(block.nproc)], printed
    assert printed["0"].strip(), "rank 0 printed nothing"
    assert len(set(printed.values())) == 1, f"ranks printed different lines: {printed}"
