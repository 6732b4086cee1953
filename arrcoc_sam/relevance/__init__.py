"""ARR-COC relevance models, data, robustness evaluation and precision-aware token allocation."""

from arrcoc_sam._lazy import lazy_exports

# name -> module. Each module's owner adds its public names here.
_EXPORTS: dict[str, str] = {
    "RelevanceRobustness": "arrcoc_sam.relevance.robustness",
    "robustness_report_section": "arrcoc_sam.relevance.robustness",
    "PrecisionAwareAllocator": "arrcoc_sam.relevance.allocation",
    "PrecisionAwareAllocation": "arrcoc_sam.relevance.allocation",
    "RelevanceAllocator": "arrcoc_sam.relevance.allocation",
    "token_precision": "arrcoc_sam.relevance.allocation",
    "TextRelevanceConfig": "arrcoc_sam.relevance.text",
    "TextRelevanceModel": "arrcoc_sam.relevance.text",
    "TextRelevanceOutput": "arrcoc_sam.relevance.text",
    "TextRelevanceCollator": "arrcoc_sam.relevance.collators",
    "TokenFeatureCollator": "arrcoc_sam.relevance.collators",
    "encode_token_relevance": "arrcoc_sam.relevance.collators",
    "TextRelevanceMetrics": "arrcoc_sam.relevance.text_metrics",
    "token_relevance_metrics": "arrcoc_sam.relevance.text_metrics",
    "load_wnut16_relevance": "arrcoc_sam.relevance.wnut",
    "WnutChecksumError": "arrcoc_sam.relevance.wnut",
    "load_relevance_files": "arrcoc_sam.relevance.data_files",
    "DataFileError": "arrcoc_sam.relevance.data_files",
    "ModelArguments": "arrcoc_sam.relevance.training",
    "DataArguments": "arrcoc_sam.relevance.training",
    "run_training": "arrcoc_sam.relevance.training",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
