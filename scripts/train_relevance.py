#!/usr/bin/env python
"""Train an ARR-COC relevance model (vision, multi-scale or text) with SAM/ASAM: a thin HF-style script.

    python scripts/train_relevance.py --model_kind text --optimizer sam --rho 0.05 --output_dir runs/text
    python scripts/train_relevance.py recipes/text_minilm_lora_sam.yaml        # a recipe; flags after it override
    torchrun --nproc_per_node 2 scripts/train_relevance.py recipes/text_minilm_lora_sam.yaml
    accelerate launch --config_file recipes/accelerate_multi_gpu.yaml scripts/train_relevance.py RECIPE

Flags: arrcoc_sam.relevance.training.ModelArguments / DataArguments and SAMTrainingArguments (--help).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from arrcoc_sam.relevance.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
