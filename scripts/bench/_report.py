"""What the benchmarks here share: a warmed-up median wall time, and writing the JSON report.

The benchmarks import it as a sibling module (``scripts/bench`` is on ``sys.path`` when one runs as a script).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def median_seconds(fn: Callable[[], object], repeats: int, device: Any = None) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, in seconds, after one warm-up call; on a CUDA
    ``device`` each timed call ends with a synchronize, so queued kernels count."""
    sync = _synchronizer(device)

    def call() -> None:
        fn()
        sync()

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batched_vs_looped(seconds_of: Callable[[str], float]) -> dict[str, float]:
    """``{"batched_s", "looped_s", "ratio"}`` from ``seconds_of(mode)`` for mode "batched" then "looped"."""
    row = {f"{mode}_s": seconds_of(mode) for mode in ("batched", "looped")}
    row["ratio"] = row["batched_s"] / row["looped_s"]
    return row


def ratio_text(row: dict[str, float]) -> str:
    """``batched / looped = R (B / L ms`` for a :func:`batched_vs_looped` row (the caller closes the bracket)."""
    return (f"batched / looped = {row['ratio']:.3f} ({row['batched_s'] * 1e3:.1f} / {row['looped_s'] * 1e3:.1f} ms")


def _synchronizer(device: Any) -> Callable[[], None]:
    if device is None or getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return lambda: None
    import torch

    return torch.cuda.synchronize


def run_facts(device: Any = None) -> dict[str, Any]:
    """What a reader needs to place a figure: the commit (and whether the tree had uncommitted changes), the
    date, the CPU thread count and the device's name."""
    import datetime
    import subprocess

    import torch

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    on_cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
    }


def write_report(out: str | Path, report: Any) -> Path:
    """Write ``report`` to ``out`` as indented JSON, creating its folder; returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
