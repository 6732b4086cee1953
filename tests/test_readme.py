"""Every ```python block of README.md runs as written, on CPU, offline, in a fresh interpreter.

A block that cannot run here is marked on the line right before its fence with
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

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = re.compile(r"<!-- readme-test: skip \((?P<reason>[^()]*\S[^()]*)\) -->")
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
BLOCK_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README: its id, 1-based first code line, source and skip reason."""

    id: str
    line: int
    source: str
    skip_reason: str | None


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "top"


def python_blocks(text: str) -> list[Block]:
    """The README's ```python blocks, each id'd by the nearest preceding heading and its index under it.

    Raises ValueError for an unclosed fence and for a `readme-test` comment that is not a well-formed skip
    marker directly before a ```python fence.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    heading, index_under_heading = "top", 0
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("<!--") and "readme-test" in line:
            follows = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if not SKIP_MARKER.fullmatch(line.strip()) or follows is None or follows.group(2) != "python":
                raise ValueError(f"README.md line {i + 1}: {line.strip()!r} must be '<!-- readme-test: skip "
                                 f"(REASON) -->' on the line right before a ```python fence")
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
            marker = SKIP_MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
            blocks.append(Block(id=f"{_slug(heading)}-{index_under_heading}", line=i + 2,
                                source="\n".join(lines[i + 1:end]) + "\n",
                                skip_reason=marker.group("reason") if marker else None))
            index_under_heading += 1
        i = end + 1
    return blocks


README_TEXT = README.read_text(encoding="utf-8")
BLOCKS = python_blocks(README_TEXT)
RUNNABLE = [block for block in BLOCKS if block.skip_reason is None]


def test_parser_finds_blocks_headings_and_skip_markers():
    text = ("# Top\n```python\nprint(1)\n```\n## Two words\n```bash\n# not a heading\n```\n"
            "<!-- readme-test: skip (needs CUDA) -->\n```python\nx = 1\n```\n```python\ny = 2\n```\n")
    blocks = python_blocks(text)
    assert [(b.id, b.line, b.source, b.skip_reason) for b in blocks] == [
        ("top-0", 3, "print(1)\n", None),
        ("two-words-0", 11, "x = 1\n", "needs CUDA"),
        ("two-words-1", 14, "y = 2\n", None),
    ]


@pytest.mark.parametrize("text", [
    "<!-- readme-test: skip () -->\n```python\nx = 1\n```\n",
    "<!-- readme-test: skip (no reason) -->\n\n```python\nx = 1\n```\n",
    "<!-- readme-test: skip (bash) -->\n```bash\nls\n```\n",
    "```python\nx = 1\n",
])
def test_parser_rejects_malformed_markers_and_unclosed_fences(text):
    with pytest.raises(ValueError, match="README.md line"):
        python_blocks(text)


def test_every_skip_marker_skips_one_python_block_with_a_reason():
    markers = [SKIP_MARKER.fullmatch(line.strip()) for line in README_TEXT.splitlines()]
    reasons = [m.group("reason") for m in markers if m]
    assert reasons == [b.skip_reason for b in BLOCKS if b.skip_reason is not None]
    assert len(RUNNABLE) + len(reasons) == len(BLOCKS) and RUNNABLE


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_readme_python_block_runs_as_written(block, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", block.source], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"README.md block {block.id} (code starts at line {block.line}) exited {proc.returncode}\n"
                    f"--- stderr ---\n{proc.stderr[-6000:]}", pytrace=False)
