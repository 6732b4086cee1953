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


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_report(out: str | Path, report: Any) -> Path:
    """Write ``report`` to ``out`` as indented JSON, creating its folder; returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
