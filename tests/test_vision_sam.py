"""A short SAM run trains the vision relevance model on procedural scenes."""

from __future__ import annotations

import torch

from arrcoc_sam.relevance.scenes import SceneCollator, make_scene_dataset
from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel
from arrcoc_sam.sam.optimizer import SAM


def test_short_sam_run_lowers_heldout_loss_on_scene_data():
    torch.manual_seed(0)
    scenes = make_scene_dataset(num_train=64, num_validation=1, num_heldout=32, image_size=32, grid_size=16,
                                seed=0, embedder="hash")
    collate = SceneCollator()
    train = collate([scenes["train"][i] for i in range(64)])
    heldout = collate([scenes["heldout"][i] for i in range(32)])
    model = ArrCocRelevanceModel(ArrCocRelevanceConfig(grid_size=16, query_dim=32))
    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**heldout).loss)

    before = heldout_loss()
    model.train()
    for step in range(12):
        batch = {name: value[(step % 4) * 16:(step % 4 + 1) * 16] for name, value in train.items()}

        def closure(batch=batch):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss

        optimizer.step(closure)
    after = heldout_loss()
    assert after < 0.6 * before, (before, after)
