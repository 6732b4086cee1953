"""Each cheaper variant through SAMTrainer: 2 gloo processes, gradient accumulation 2, clean-weight checks, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from arrcoc_sam.sam.variants import VARIANTS

SCRIPT = Path(__file__).parent / "dist_scripts" / "variants_trainer.py"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_variant_trains_resumes_and_never_exposes_perturbed_weights_under_ddp(run_torchrun):
    """One torchrun for all variants (startup dominates); the script asserts, per variant: equal weights on
    both ranks, agreement with the variant's own closure step on the global batch (and not with ρ = 0),
    clean weights at every step boundary, evaluation forward and checkpoint, and a bitwise resume."""
    proc = run_torchrun(SCRIPT, *sorted(VARIANTS), timeout=400)
    done = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VARIANT-OK")}
    assert done == set(VARIANTS)
