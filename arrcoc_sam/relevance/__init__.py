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
    "texture_array": "arrcoc_sam.relevance.texture",
    "TEXTURE_CHANNELS": "arrcoc_sam.relevance.texture",
    "ArrCocRelevanceConfig": "arrcoc_sam.relevance.vision",
    "ArrCocRelevanceModel": "arrcoc_sam.relevance.vision",
    "ArrCocRelevanceOutput": "arrcoc_sam.relevance.vision",
    "AdaptiveTensionBalancer": "arrcoc_sam.relevance.vision",
    "MultiScaleRelevanceConfig": "arrcoc_sam.relevance.multiscale",
    "MultiScaleRelevanceModel": "arrcoc_sam.relevance.multiscale",
    "MultiScaleRelevanceOutput": "arrcoc_sam.relevance.multiscale",
    "coarse_to_fine_top_k": "arrcoc_sam.relevance.multiscale",
    "make_scene_dataset": "arrcoc_sam.relevance.scenes",
    "SceneCollator": "arrcoc_sam.relevance.scenes",
    "MiniLMQueryEmbedder": "arrcoc_sam.relevance.scenes",
    "HashQueryEmbedder": "arrcoc_sam.relevance.scenes",
    "relevance_metrics": "arrcoc_sam.relevance.vision_metrics",
    "make_compute_metrics": "arrcoc_sam.relevance.vision_metrics",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

# Registering the configs and models with AutoConfig/AutoModel is a side effect of their modules: import
# them, so that `AutoModel.from_pretrained(saved_dir)` works after `import arrcoc_sam.relevance`.
from arrcoc_sam.relevance import multiscale as _multiscale  # noqa: E402,F401  (imports .vision too)
from arrcoc_sam.relevance import text as _text  # noqa: E402,F401
