"""Hugging Face glue: Trainer subclass, Accelerate loop helper, launcher, callbacks."""

from arrcoc_sam._lazy import lazy_exports

_EXPORTS = {
    "SAMTrainer": "arrcoc_sam.integrations.trainer",
    "SAMTrainingArguments": "arrcoc_sam.integrations.trainer",
    "SAMSeq2SeqTrainer": "arrcoc_sam.integrations.trainer",
    "SAMSeq2SeqTrainingArguments": "arrcoc_sam.integrations.trainer",
    "SharpnessCallback": "arrcoc_sam.integrations.callbacks",
    "AcceleratedSAM": "arrcoc_sam.integrations.accelerate",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
