"""SAMTrainer on a model transformers shards at load time (``from_pretrained(distributed_config=...)``): one torchrun
launch of ``dist_scripts/trainer_sharded_at_load.py`` (2 gloo processes); each test asserts one of its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_fsdp import FSDP2_ON_GLOO

SCRIPT = Path(__file__).parent / "dist_scripts" / "trainer_sharded_at_load.py"
_launch: dict[str, dict] = {}


@pytest.fixture
def sharded_run(run_torchrun, tmp_path) -> dict:
    """The measurements of the (cached) two-rank launch."""
    if not FSDP2_ON_GLOO:
        pytest.skip("FSDP2 on CPU/gloo needs torch >= 2.9")
    pytest.importorskip("transformers.distributed", reason="transformers without load-time sharding")
    if "result" not in _launch:
        out = tmp_path / "sharded_at_load.json"
        run_torchrun(SCRIPT, str(tmp_path), str(out))
        _launch["result"] = json.loads(out.read_text())
    return _launch["result"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sam_on_a_model_sharded_at_load_matches_full_batch_sam_and_keeps_replicas_equal(sharded_run):
    assert sharded_run["error"] is None
    assert sharded_run["max_error"] <= 1e-12  # float64 reference over the global batch of 8
    assert sharded_run["replicas_bitwise"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_replay_holds_back_the_reduction_of_its_inner_micro_batches(sharded_run):
    """Accelerate's no_sync does nothing on a model sharded at load time: every replayed micro-batch reduced
    (12 reduce-scatters per step where 8 do, the stock run taking 4)."""
    assert sharded_run["reduce_scatters_per_step"] == 2 * sharded_run["stock_reduce_scatters_per_step"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_per_device_scope_is_refused_on_a_model_sharded_at_load(sharded_run):
    """It ran, bitwise as the global scope, where a rank holds no gradient of its own."""
    assert "sam_scope='per_device' has no meaning under FSDP" in (sharded_run["per_device_refusal"] or "")
