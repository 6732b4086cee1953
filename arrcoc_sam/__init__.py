"""arrcoc_sam: sharpness-aware training for the Hugging Face stack, flatness measurement, ARR-COC relevance."""

from arrcoc_sam._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "SAM": "arrcoc_sam.sam.optimizer",
    "ASAM": "arrcoc_sam.sam.optimizer",
    "SAMTrainer": "arrcoc_sam.integrations.trainer",
    "SAMTrainingArguments": "arrcoc_sam.integrations.trainer",
    "SAMSeq2SeqTrainer": "arrcoc_sam.integrations.trainer",
    "SAMSeq2SeqTrainingArguments": "arrcoc_sam.integrations.trainer",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
