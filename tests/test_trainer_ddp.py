"""SAMTrainer and AcceleratedSAM across 2 real gloo processes (one torchrun run): global scope = one process on
the doubled batch; per_device scope keeps replicas bitwise identical and takes each rank's ascent from its own
shard; every cheaper variant through AcceleratedSAM keeps the replicas identical and matches its own closure step
on the global batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from arrcoc_sam import SAMTrainer, SAMTrainingArguments
from arrcoc_sam.sam.variants import VARIANTS

DIST = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(DIST))
from trainer_common import flat_params, tiny_bert, token_dataset, token_sum_loss, trainer_kwargs  # noqa: E402


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one_process_and_per_device_ascent_is_local(run_torchrun, tmp_path):
    """Trainer and Accelerate helper: global = single process on the doubled batch; per_device = local ascent."""
    run_torchrun(DIST / "trainer_ddp.py")
    result = json.loads((tmp_path / "ddp_result.json").read_text())

    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path / "single"), max_steps=3,
                                                 per_device_train_batch_size=8, rho=0.05))
    single = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(24),
                        compute_loss_func=token_sum_loss)
    single.train()
    two_process = torch.load(tmp_path / "global.pt", weights_only=True)
    assert (two_process - flat_params(single.model)).abs().max() < 1e-5
    assert result["global_replicas_equal"]
    # --ddp_static_graph with accumulation 1: ESAM (tensor SWP) on 2 x 4 = one process on 8
    args = SAMTrainingArguments(**trainer_kwargs(str(tmp_path / "single_esam"), max_steps=3, per_device_train_batch_size=8,
                                                 rho=0.05, optimizer="esam", sam_args="beta=0.5,gamma=1.0,seed=3"))
    single_esam = SAMTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(24),
                             compute_loss_func=token_sum_loss)
    single_esam.train()
    static = torch.load(tmp_path / "static_esam.pt", weights_only=True)
    assert (static - flat_params(single_esam.model)).abs().max() < 1e-5
    assert (static - two_process).abs().max() > 1e-4  # ESAM, not SAM
    assert result["static_graph_replicas_equal"]
    assert {"sam/loss_perturbed", "sam/sharpness", "sam/grad_norm", "sam/grad_norm_perturbed", "sam/grad_cosine",
            "sam/rho", "sam/skipped_steps"} <= set(result["global_log_keys"])

    assert result["per_device_replicas_equal"]
    for rank in (0, 1):
        assert result[f"rank{rank}_own_shard_diff"] < 1e-5
        assert result[f"rank{rank}_averaged_diff"] > 1e-2
        assert result[f"rank{rank}_own_shard_diff_sync_each_batch"] < 1e-5

    for rank_result in result["accelerate"]:
        assert rank_result["global_reference_diff"] < 1e-5
        assert rank_result["global_replicas_equal"]
        assert rank_result["per_device_replicas_equal"]
        assert rank_result["per_device_differs_from_global"] > 1e-6
        assert set(rank_result["variants"]) == set(VARIANTS) | {"esam-coordinate"}
        for name, variant in rank_result["variants"].items():  # the Accelerate loop under DDP, every variant
            assert variant["replicas_equal"], name
            assert variant["reference_diff"] < 1e-6 and variant["rho0_diff"] > 100 * variant["reference_diff"], (
                name, variant)
        static = rank_result["static_graph"]  # DDP(static_graph=True), GA 1: exact, and per_device refused
        assert set(static["reference_diffs"]) == set(rank_result["variants"]) | {"sam"}
        assert max(static["reference_diffs"].values()) < 1e-6, static
        assert static["replicas_equal"]
        closure_step = rank_result["esam_closure_step_ddp"]  # ESAM.step(closure) on a DDP model
        assert closure_step["reference_diff"] < 1e-6 and closure_step["replicas_equal"], closure_step
        checkpointed = rank_result["esam_checkpointed"]  # reentrant checkpointing found: pass 1 never pruned
        assert checkpointed["reference_diff"] < 1e-6 and checkpointed["replicas_equal"], checkpointed
        assert checkpointed["pruning_off"]
        refusals = rank_result["unwrapped_model_refusals"]  # a bare module in a 2-process run: no silent copies
        assert len(refusals) == 2 and all("not wrapped in DistributedDataParallel" in m for m in refusals), refusals
        selection = rank_result["esam_selection"]  # ESAM's data selection per rank, gradients averaged by DDP
        assert selection["reference_diff"] < 1e-6 and selection["replicas_equal"], selection
        assert selection["whole_window_diff"] > 100 * selection["reference_diff"], selection
        scopes = rank_result["asam_and_microbatch"]  # ASAM; mSAM's per-micro-batch ascent on each rank
        assert scopes["asam_reference_diff"] < 1e-6 and scopes["asam_plain_sam_diff"] > 1e-3, scopes
        assert scopes["microbatch_reference_diff"] < 1e-6 and scopes["microbatch_global_diff"] > 1e-3, scopes
        assert scopes["replicas_equal"]
        assert "static_graph=True" in static["per_device_refused"] and "sam_scope=per_device" in static[
            "per_device_refused"]
