"""The HF-style training entry for relevance models: ``python scripts/train_relevance.py --optimizer sam ...``.

Three argument dataclasses, parsed by ``HfArgumentParser``: :class:`ModelArguments` (which model, LoRA,
sharpness probes), :class:`DataArguments` (which data) and
:class:`~arrcoc_sam.integrations.trainer.SAMTrainingArguments` (every ``TrainingArguments`` flag plus
``--optimizer``, ``--rho``, ``--sam_eta``, ``--sam_scope``, ...). A single YAML/JSON path as the first
argument is read as a recipe of those flags; later command-line flags override it.

Model kinds ``vision`` | ``multiscale`` | ``text``; data sources ``scenes`` (vision), ``wnut`` (text) and
``files`` (both; see :mod:`arrcoc_sam.relevance.data_files`). Each evaluation reports MSE, Spearman,
top-K recall and NDCG (vision) or token F1, precision, recall and average precision (text); right after
training the model is saved to ``output_dir`` (LoRA adapters merged into the backbone, so the saved model
loads without peft), then evaluated on the validation and held-out splits (``eval_*``, ``heldout_*``).
Runs offline: ``main`` sets ``HF_HUB_OFFLINE`` (and the transformers/datasets equivalents) unless already
set, and model/tokenizer paths must be local directories.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_KINDS = ("vision", "multiscale", "text")
DATA_SOURCES = ("scenes", "wnut", "files")
QUERY_EMBEDDERS = ("minilm", "hash")
_TINY_BERT = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64}


@dataclass
class ModelArguments:
    """Which relevance model to train."""

    model_kind: str = field(default="text", metadata={"help": "vision | multiscale | text"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a saved relevance model directory to start from (else a fresh model)"}
    )
    backbone: str = field(
        default="minilm",
        metadata={"help": "text backbone: 'minilm' (pretrained all-MiniLM-L6-v2), 'tiny' (2-layer BERT, random "
                  "weights, for smoke tests) or a local HF model directory"},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "text tokenizer directory; unset: the backbone's, else MiniLM's"}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "relevance-config fields as 'name=value,name=value', e.g. 'pos_weight=5,ranking_weight=0.1' "
                  "or 'mode=rescale,scales=[0.5,1.0,2.0]'; unknown names are rejected"},
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the text backbone (0: full fine-tuning)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default="query,value", metadata={"help": "comma-separated backbone module names that get LoRA adapters"}
    )
    sharpness_every: int = field(
        default=0,
        metadata={"help": "every N optimizer steps, log curvature probes on one validation batch (0: off)"},
    )
    sharpness_probes: str = field(
        default="top_eigenvalue,trace,sam_sharpness",
        metadata={"help": "comma-separated SharpnessCallback probes: top_eigenvalue, trace, sam_sharpness, "
                  "adaptive_sharpness"},
    )

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"--model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0, got {self.lora_r}")
        if self.lora_r and self.model_kind != "text":
            raise ValueError(f"--lora_r applies to the text backbone only, got --model_kind {self.model_kind!r}")
        if self.sharpness_every < 0:
            raise ValueError(f"--sharpness_every must be >= 0, got {self.sharpness_every}")


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    data_source: str | None = field(
        default=None, metadata={"help": "scenes | wnut | files; unset: scenes for vision, wnut for text"}
    )
    train_file: str | None = field(default=None, metadata={"help": "JSONL/CSV/Parquet training file (files)"})
    validation_file: str | None = field(default=None, metadata={"help": "evaluated during training (files)"})
    heldout_file: str | None = field(default=None, metadata={"help": "evaluated once after training (files)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the data splits and generated scenes"})
    max_length: int = field(default=128, metadata={"help": "text: maximum word pieces per query/text pair"})
    wnut_validation_tweets: int = field(default=200, metadata={"help": "WNUT-16 tweets in validation"})
    wnut_heldout_tweets: int = field(default=300, metadata={"help": "WNUT-16 tweets held out"})
    wnut_negatives_per_tweet: int = field(default=1, metadata={"help": "absent entity types queried per tweet"})
    num_train_scenes: int = field(default=1024, metadata={"help": "scenes: training scenes"})
    num_validation_scenes: int = field(default=128, metadata={"help": "scenes: validation scenes"})
    num_heldout_scenes: int = field(default=256, metadata={"help": "scenes: held-out scenes (unseen combinations)"})
    scene_image_size: int = field(default=64, metadata={"help": "scenes: image side in pixels"})
    query_embedder: str = field(
        default="minilm", metadata={"help": "vision query embeddings: 'minilm' (D=384) or 'hash' (D=32, tests)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "truncate the training split"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "truncate the validation/held-out splits"})
    top_k: int = field(default=200, metadata={"help": "vision metrics: K of top-K recall and NDCG"})

    def __post_init__(self) -> None:
        """Refuse bad values at construction (the command line then exits 2), naming the flag and the value."""
        if self.data_source is not None and self.data_source not in DATA_SOURCES:
            raise ValueError(f"--data_source must be one of {DATA_SOURCES}, got {self.data_source!r}")
        if self.data_source == "files" and self.train_file is None:
            raise ValueError("--data_source files needs --train_file (and optionally --validation_file, --heldout_file)")
        if self.query_embedder not in QUERY_EMBEDDERS:
            raise ValueError(f"--query_embedder must be one of {QUERY_EMBEDDERS}, got {self.query_embedder!r}")
        minimum = {"split_seed": 0, "top_k": 1, "max_length": 1, "num_train_scenes": 1, "num_validation_scenes": 1,
                   "num_heldout_scenes": 1, "scene_image_size": 1, "wnut_validation_tweets": 0,
                   "wnut_heldout_tweets": 0, "wnut_negatives_per_tweet": 0, "max_train_samples": 1,
                   "max_eval_samples": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")


def _split_items(text: str) -> list[str]:
    """Split ``text`` at the commas that are outside brackets and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"a=1,b=0.5,c=focal,d=[0.5,1.0]"`` -> ``{"a": 1, "b": 0.5, "c": "focal", "d": [0.5, 1.0]}``.

    Values are Python literals (lists, tuples, quoted strings included), else plain strings; commas inside
    brackets or quotes do not separate items.
    """
    if not text:
        return {}
    out: dict[str, Any] = {}
    for item in _split_items(text):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"config_overrides must look like 'name=value,name=value', got the item {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


def config_fields(config_class) -> set[str]:
    """The field names a config class accepts: its and its bases' ``__init__`` parameters and the keys of a
    default instance's ``to_dict()`` (the generic ``PretrainedConfig`` fields)."""
    import inspect

    names = {name for cls in config_class.__mro__ if "__init__" in vars(cls)
             for name, param in inspect.signature(cls.__init__).parameters.items()
             if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)}
    return names | set(config_class().to_dict())


def check_overrides(overrides: dict[str, Any], config_class) -> dict[str, Any]:
    """``overrides`` unchanged, or ValueError naming the keys ``config_class`` does not have (typos would
    otherwise be stored as stray attributes and silently ignored)."""
    unknown = sorted(set(overrides) - config_fields(config_class))
    if unknown:
        own = sorted(name for name in inspect.signature(config_class.__init__).parameters
                     if name not in ("self", "kwargs") and not name.startswith("_"))
        raise ValueError(f"config_overrides: unknown field(s) {unknown} for {config_class.__name__}; its fields: "
                         f"{own} (plus the generic PretrainedConfig ones)")
    return overrides


def _local_model_dir(path: str | Path, argument: str) -> str:
    """``path`` if it is a local model directory (holds a config.json), else FileNotFoundError naming it."""
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{argument}: no model directory with a config.json at {str(path)!r} "
                                "(models load from local paths only; nothing is downloaded)")
    return str(path)


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """ValueError naming ``flag`` and ``path`` unless ``path`` is a writable folder or can be created as one.

    A missing folder is created to find out and removed again (with the parents it needed), so a run that
    fails later leaves nothing behind; processes probing the same folder at once do not fail each other.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder; give a folder for the output")
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create the output folder ({err.strerror or err})") from err
    writable = os.access(out, os.W_OK | os.X_OK) or not out.exists()  # gone: another process probed and removed it
    for folder in created:
        with contextlib.suppress(OSError):  # not empty: another process is writing there
            folder.rmdir()
    if not writable:
        raise ValueError(f"{flag} {path}: the output folder is not writable")


def _text_model_and_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer, BertConfig

    from arrcoc_sam.relevance.text import TextRelevanceConfig, TextRelevanceModel, minilm_path

    overrides = check_overrides(parse_overrides(model_args.config_overrides), TextRelevanceConfig)
    if model_args.model_name_or_path:
        source = _local_model_dir(model_args.model_name_or_path, "model_name_or_path")
        model = TextRelevanceModel.from_pretrained(source, **overrides)
    elif model_args.backbone == "tiny":
        source = None
        model = TextRelevanceModel.from_backbone(BertConfig(**_TINY_BERT), **overrides)
    else:
        source = None if model_args.backbone == "minilm" else model_args.backbone
        model = TextRelevanceModel.from_backbone(source, **overrides)
    has_tokenizer = source is not None and (Path(source) / "tokenizer_config.json").is_file()
    if model_args.tokenizer_name_or_path and not Path(model_args.tokenizer_name_or_path).is_dir():
        raise FileNotFoundError(f"tokenizer_name_or_path: no local tokenizer directory at "
                                f"{model_args.tokenizer_name_or_path!r} (nothing is downloaded)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or (source if has_tokenizer else minilm_path()))
    except (OSError, ValueError, TypeError) as error:
        if not model_args.tokenizer_name_or_path:
            raise
        raise ValueError(f"--tokenizer_name_or_path {model_args.tokenizer_name_or_path}: no tokenizer loads from "
                         f"there ({type(error).__name__}: {str(error)[:200]})") from error
    if model_args.lora_r:
        model = apply_lora(model, model_args)
    return model, tokenizer


def apply_lora(model, model_args: ModelArguments):
    """Wrap a text relevance model with LoRA adapters on its backbone; the head stays fully trainable.

    Only the adapters and the head require grad, so SAM (which perturbs trainable parameters) perturbs
    and updates only those.
    """
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=["head"],
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. no module of the backbone matches a target name
        raise ValueError(f"--lora_target_modules {model_args.lora_target_modules}: {error}") from error


def _vision_classes(model_kind: str):
    """``(config class, model class)`` of a ``vision`` or ``multiscale`` relevance model."""
    if model_kind == "vision":
        from arrcoc_sam.relevance.vision import ArrCocRelevanceConfig, ArrCocRelevanceModel

        return ArrCocRelevanceConfig, ArrCocRelevanceModel
    from arrcoc_sam.relevance.multiscale import MultiScaleRelevanceConfig, MultiScaleRelevanceModel

    return MultiScaleRelevanceConfig, MultiScaleRelevanceModel


def _vision_model(model_args: ModelArguments, query_dim: int, grid_size: int | None = None):
    """A fresh model for ``query_dim`` (and ``grid_size`` when given; a config override wins over both), or the
    saved start model with the overrides applied."""
    config_class, model_class = _vision_classes(model_args.model_kind)
    overrides = check_overrides(parse_overrides(model_args.config_overrides), config_class)
    grid = {} if grid_size is None else {"grid_size": grid_size}
    if model_args.model_name_or_path:
        return model_class.from_pretrained(_local_model_dir(model_args.model_name_or_path, "model_name_or_path"),
                                           **{**grid, **overrides})
    return model_class(config_class(**{"query_dim": query_dim, **grid, **overrides}))


def _chosen_grid_size(model_args: ModelArguments) -> tuple[int | None, str, bool]:
    """``(grid_size, where it was set, whether it binds)``: a ``grid_size`` config override (binding), else the
    start model's (not binding: the data's N may replace it); ``(None, "", False)`` when the user set neither (the
    data decides)."""
    overrides = parse_overrides(model_args.config_overrides)
    if "grid_size" in overrides:
        grid = overrides["grid_size"]
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"config_overrides: grid_size must be a positive integer, got {grid!r}")
        return grid, f"--config_overrides grid_size={grid}", True
    if model_args.model_name_or_path:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(_local_model_dir(model_args.model_name_or_path, "model_name_or_path"))
        grid = getattr(config, "grid_size", None)
        if grid is not None:
            return grid, f"--model_name_or_path {model_args.model_name_or_path} (grid_size={grid})", False
    return None, "", False


def _data_grid_size(tokens: int, chosen: int | None, set_by: str, source: str) -> int:
    """G of data with ``tokens`` = N = G² relevance targets per sample; ValueError naming ``source`` (the data)
    when N is not a square, or when it contradicts the user's ``chosen`` grid (``set_by``: the flag that chose it)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{source}: N={tokens} relevance targets per sample is not a G x G grid; vision relevance "
                         "models score N = grid_size^2 tokens (e.g. 16 for a 4 x 4 grid)")
    if chosen is not None and chosen != side:
        raise ValueError(f"{source}: N={tokens} tokens per sample ({side} x {side} grid), but {set_by} gives "
                         f"{chosen * chosen} tokens; set grid_size={side}, or drop the override to take the grid "
                         "from the data")
    return side


def _truncate(dataset, limit: int | None):
    return dataset if limit is None or len(dataset) <= limit else dataset.select(range(limit))


def _file_splits(data_args: DataArguments) -> dict[str, str]:
    files = {"train": data_args.train_file, "validation": data_args.validation_file,
             "heldout": data_args.heldout_file}
    return {split: path for split, path in files.items() if path is not None}


def build_text_data(data_args: DataArguments, tokenizer) -> dict[str, Any]:
    """Tokenised text splits (``train`` and, when available, ``validation`` / ``heldout``)."""
    from arrcoc_sam.relevance.collators import MaxLengthTooShort, encode_token_relevance_batch

    source = data_args.data_source or "wnut"
    if source == "wnut":
        from arrcoc_sam.relevance.wnut import load_wnut16_relevance

        try:
            raw = load_wnut16_relevance(
                seed=data_args.split_seed,
                validation_tweets=data_args.wnut_validation_tweets,
                heldout_tweets=data_args.wnut_heldout_tweets,
                negatives_per_tweet=data_args.wnut_negatives_per_tweet,
            )
        except ValueError as error:  # the split sizes do not fit the corpus
            raise ValueError(f"--wnut_validation_tweets {data_args.wnut_validation_tweets} / --wnut_heldout_tweets "
                             f"{data_args.wnut_heldout_tweets}: {error}") from error
    elif source == "files":
        from arrcoc_sam.relevance.data_files import load_relevance_files

        raw = load_relevance_files(_file_splits(data_args), kind="text")
    else:
        raise ValueError(f"--data_source: the text model takes 'wnut' or 'files', got {source!r}")
    splits = {}
    for split, dataset in raw.items():
        if len(dataset) == 0:
            continue
        limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
        dataset = _truncate(dataset, limit)
        try:
            splits[split] = dataset.map(
                encode_token_relevance_batch,
                batched=True,
                fn_kwargs={"tokenizer": tokenizer, "max_length": data_args.max_length},
                remove_columns=dataset.column_names,
            )
        except MaxLengthTooShort as error:
            raise ValueError(f"--max_length {data_args.max_length}: {error}") from error
    return splits


def build_vision_data(data_args: DataArguments, grid_size: int | None = None) -> dict[str, Any]:
    """Vision splits: generated query scenes (on a ``grid_size`` x ``grid_size`` grid when given, else the
    scenes' default) or the user's files (their own grid)."""
    source = data_args.data_source or "scenes"
    if source == "scenes":
        from arrcoc_sam.relevance.scenes import make_scene_dataset

        raw = make_scene_dataset(
            num_train=data_args.num_train_scenes,
            num_validation=data_args.num_validation_scenes,
            num_heldout=data_args.num_heldout_scenes,
            image_size=data_args.scene_image_size,
            seed=data_args.split_seed,
            embedder=data_args.query_embedder,
            **({} if grid_size is None else {"grid_size": grid_size}),
        )
    elif source == "files":
        from arrcoc_sam.relevance.data_files import load_relevance_files

        raw = load_relevance_files(_file_splits(data_args), kind="vision", query_embedder=data_args.query_embedder)
    else:
        raise ValueError(f"vision models take data_source 'scenes' or 'files', got {source!r}")
    return {
        split: _truncate(dataset, data_args.max_train_samples if split == "train" else data_args.max_eval_samples)
        for split, dataset in raw.items()
    }


def _add_sharpness_callback(trainer, model_args: ModelArguments, splits: dict[str, Any], collator) -> None:
    """Wire ``SharpnessCallback`` (probes on one fixed validation batch, else a training batch) when asked."""
    if not model_args.sharpness_every:
        return
    from arrcoc_sam.integrations.callbacks import SharpnessCallback

    dataset = splits.get("validation", splits["train"])
    size = min(len(dataset), trainer.args.per_device_eval_batch_size)
    batch = collator([dataset[i] for i in range(size)])
    probes = [probe.strip() for probe in model_args.sharpness_probes.split(",") if probe.strip()]
    callback = SharpnessCallback(every_n_steps=model_args.sharpness_every, probes=probes, eval_batches=[batch])
    trainer.add_callback(callback.bind(trainer))


def _save(trainer, model_args: ModelArguments, tokenizer) -> None:
    """Save the final model (LoRA merged into the backbone) and the tokenizer to ``output_dir``."""
    if not trainer.is_world_process_zero():
        return
    output_dir = trainer.args.output_dir
    model = trainer.model
    if model_args.lora_r:  # merge a copy: the trained model is evaluated next, unchanged
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(output_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


def build_run(model_args: ModelArguments, data_args: DataArguments, training_args):
    """``(trainer, splits, tokenizer)`` of the run, seeded with ``training_args.seed``: the model, the data
    splits and the SAMTrainer (nothing trained yet)."""
    from transformers import set_seed

    from arrcoc_sam.integrations.trainer import SAMTrainer

    set_seed(training_args.seed)
    checkpoint_to_resume(training_args)  # fail before loading any data
    if training_args.output_dir is not None:  # before training: the Trainer only writes there at its first save
        check_output_folder(training_args.output_dir, "--output_dir")
    if model_args.model_name_or_path:
        _local_model_dir(model_args.model_name_or_path, "model_name_or_path")
    if data_args.data_source == "files":
        for split, path in _file_splits(data_args).items():
            if not Path(path).is_file():
                raise ValueError(f"--{split}_file {path}: "
                                 f"{'a folder, not a data file' if Path(path).is_dir() else 'no such file'}")
    tokenizer = None
    if model_args.model_kind == "text":
        from arrcoc_sam.relevance.collators import TextRelevanceCollator
        from arrcoc_sam.relevance.text_metrics import TextRelevanceMetrics

        model, tokenizer = _text_model_and_tokenizer(model_args)
        positions = _usable_positions(model.config.encoder_config)
        if positions is not None and data_args.max_length > positions:
            raise ValueError(f"--max_length {data_args.max_length} exceeds the {positions} positions of the backbone "
                             f"({model.config.encoder_config.model_type}); pass --max_length <= {positions}")
        splits = build_text_data(data_args, tokenizer)
        collator = TextRelevanceCollator(tokenizer)
        metrics = TextRelevanceMetrics()
        compute_metrics, preprocess = metrics, metrics.preprocess_logits_for_metrics
    else:
        from arrcoc_sam.relevance.collators import TokenFeatureCollator
        from arrcoc_sam.relevance.scenes import SceneCollator
        from arrcoc_sam.relevance.vision_metrics import make_compute_metrics

        check_overrides(parse_overrides(model_args.config_overrides), _vision_classes(model_args.model_kind)[0])
        chosen, set_by, binding = _chosen_grid_size(model_args)
        scenes = (data_args.data_source or "scenes") == "scenes"
        try:
            splits = build_vision_data(data_args, grid_size=chosen)
        except ValueError as error:  # scenes generated on the chosen (or default) grid: name the flags
            if not scenes:
                raise
            grid = f"{set_by}: " if chosen is not None else ""
            raise ValueError(f"{grid}--scene_image_size {data_args.scene_image_size}: {error}") from error
        first = splits["train"][0]
        source = "the scenes" if scenes else f"--train_file {data_args.train_file}"
        # a start model's grid does not bind: token features carry their own N, and the weights do not depend on G
        grid = _data_grid_size(len(first["labels"]), chosen if binding else None, set_by, source)
        image_size = tuple(first["pixel_values"].shape[-2:]) if "pixel_values" in first else None
        if image_size is not None and min(image_size) < grid:
            height, width = image_size
            raise ValueError(f"{source}: images of {height} x {width} pixels are smaller than the {grid} x {grid} grid "
                             f"of their relevance maps (N={grid * grid}): give images of at least {grid} pixels a side")
        if chosen is not None and grid != chosen:
            warnings.warn(f"{set_by} does not fit {source} (N={grid * grid} tokens per sample): the model takes "
                          f"grid_size={grid} from the data", stacklevel=2)
        try:
            model = _vision_model(model_args, query_dim=len(first["query_embedding"]), grid_size=grid)
        except ValueError as error:
            raise ValueError(f"{source}: grid_size={grid} (N={grid * grid} tokens per sample): {error}") from error
        channels = len(first["token_features"][0]) if "token_features" in first else None
        if channels is not None and channels != model.config.num_channels:
            raise ValueError(f"{source}: token_features have C={channels} channels per token, but vision relevance "
                             f"models take the texture array's {model.config.num_channels} (their scores read them "
                             "by position)")
        collator = TokenFeatureCollator() if "token_features" in first else SceneCollator()
        tokens = model.config.grid_size ** 2
        if data_args.top_k > tokens:
            warnings.warn(f"--top_k {data_args.top_k} exceeds the {tokens} tokens per sample of a "
                          f"{model.config.grid_size} x {model.config.grid_size} grid: top-K recall and NDCG use "
                          f"K = {tokens}, where recall is always 1; pass --top_k below {tokens}", stacklevel=2)
        compute_metrics, preprocess = make_compute_metrics(k=data_args.top_k), None
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
        per_example_loss_fn=per_example_loss_fn(model),
    )
    _add_sharpness_callback(trainer, model_args, splits, collator)
    return trainer, splits, tokenizer


def run_training(model_args: ModelArguments, data_args: DataArguments, training_args) -> dict[str, float]:
    """Train, save, then evaluate on validation (each evaluation) and held-out (once); returns the final metrics.

    Returns the last ``eval_*`` metrics on the validation split and ``heldout_*`` on the held-out split
    (when those splits exist). Bad inputs (a missing file or model directory, a malformed data row, a config
    override or run setting the model or Trainer refuses) raise before anything trains.
    """
    return train_and_evaluate(*build_run(model_args, data_args, training_args), model_args)


# backbones whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids)
_POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "xmod", "roberta-prelayernorm",
                            "mpnet")


def _usable_positions(encoder_config) -> int | None:
    """How many tokens the backbone's position embeddings take (None if it has none)."""
    positions = getattr(encoder_config, "max_position_embeddings", None)
    if positions is not None and encoder_config.model_type in _POSITIONS_AFTER_PADDING:
        positions -= (encoder_config.pad_token_id or 0) + 1
    return positions


def per_example_loss_fn(model: Any) -> Callable[[Any, Any], Any]:
    """``fn(outputs, batch) -> [B]``: the relevance model's own loss split over its samples (their mean is the batch
    loss), which ESAM's data selection ranks and trains on (its default, cross-entropy on integer labels, does not
    apply to relevance targets)."""
    from arrcoc_sam.relevance.text import TextRelevanceConfig, text_relevance_loss
    from arrcoc_sam.relevance.vision import relevance_loss

    config = model.config
    if isinstance(config, TextRelevanceConfig):
        return lambda outputs, batch: text_relevance_loss(outputs.logits, batch["labels"], batch["text_mask"], config,
                                                          per_example=True)

    def vision_losses(outputs, batch):  # a multiscale model's output holds combined_relevance, a vision one relevance
        relevance = getattr(outputs, "combined_relevance", None)
        return relevance_loss(outputs.relevance if relevance is None else relevance, batch["labels"], config,
                              per_example=True)

    return vision_losses


def checkpoint_to_resume(training_args: Any) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names: a ``checkpoint-N`` folder, or ``true`` for the last
    one in ``--output_dir``; None without the flag. ValueError naming the flag where there is no such folder."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        output_dir = training_args.output_dir
        last = get_last_checkpoint(output_dir) if output_dir and Path(output_dir).is_dir() else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint true: no checkpoint-N folder in --output_dir {output_dir}")
        return last
    if not Path(value).is_dir():
        raise ValueError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return str(value)


def train_and_evaluate(trainer, splits, tokenizer, model_args: ModelArguments) -> dict[str, float]:
    """Train (from ``--resume_from_checkpoint`` when given), save (before any evaluation, so a failing
    evaluation loses nothing), then evaluate."""
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(trainer.args))
    _save(trainer, model_args, tokenizer)
    results: dict[str, float] = {}
    for split, prefix in (("validation", "eval"), ("heldout", "heldout")):
        if split in splits:
            split_metrics = trainer.evaluate(eval_dataset=splits[split], metric_key_prefix=prefix)
            trainer.log_metrics(prefix, split_metrics)
            trainer.save_metrics(prefix, split_metrics)
            results.update(split_metrics)
    return results


def recipe_to_argv(path: str | Path, leave_out: Collection[str] = ()) -> list[str]:
    """Flags of a YAML/JSON recipe (a mapping flag -> value) as command-line arguments, except those named in
    ``leave_out``; ValueError for a file that is not valid YAML/JSON or not a mapping."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        recipe = json.loads(text)
    else:
        import yaml

        try:
            recipe = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"not valid YAML ({err})") from err
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a mapping of flag names to values, got {type(recipe).__name__}")
    argv: list[str] = []
    for key, value in recipe.items():
        if value is None or key in leave_out:  # YAML `null` keeps the flag's default
            continue
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(json.dumps(v) if isinstance(v, (dict, bool)) else str(v) for v in values)]
    return argv


def set_offline() -> None:
    """Make the hub libraries offline unless the caller chose otherwise (``os.environ.setdefault``).

    Takes effect for libraries imported afterwards; ``arrcoc-sam`` and ``scripts/train_relevance.py`` set the
    same variables before importing anything from the HF stack.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")


def _parser():
    from transformers import HfArgumentParser

    from arrcoc_sam.integrations.trainer import SAMTrainingArguments

    return HfArgumentParser(
        (ModelArguments, DataArguments, SAMTrainingArguments),
        usage="%(prog)s [RECIPE.yaml | RECIPE.json] [--flag value ...]",
        description="Train an ARR-COC relevance model (vision, multiscale or text) with SAM, ASAM or a cheaper "
                    "variant, then save and evaluate it. An optional recipe file (a mapping of flag names to "
                    "values, e.g. recipes/vision_sam.yaml) comes first; flags after it override it.",
    )


def _last_value(argv: Sequence[str], flag: str) -> str | None:
    """The value the last ``flag value`` or ``flag=value`` in ``argv`` gives (what argparse keeps), else None."""
    value = None
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            value = argv[index + 1]
        elif item.startswith(f"{flag}="):
            value = item.partition("=")[2]
    return value


def parse_args(argv: Sequence[str] | None = None):
    """``(ModelArguments, DataArguments, SAMTrainingArguments)`` from the command line (and a recipe file).

    A bad flag value or an unreadable recipe exits with status 2 and the reason on stderr
    (``argparse``'s ``parser.error``). ``--optimizer none`` on the command line after a recipe (its baseline run)
    leaves the recipe's SAM settings (``rho``, ``sam_*``) out, so only the ones given on the command line are
    reported as ignored.
    """
    from arrcoc_sam.integrations.trainer import SAMArguments

    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and Path(argv[0]).suffix.lower() in (".yaml", ".yml", ".json") and not argv[0].startswith("-"):
        stock = _last_value(argv[1:], "--optimizer") == "none"
        sam_settings = {spec.name for spec in fields(SAMArguments)} - {"optimizer"}
        try:
            argv = recipe_to_argv(argv[0], leave_out=sam_settings if stock else ()) + argv[1:]
        except (OSError, ValueError) as err:  # a missing file, invalid YAML/JSON, not a mapping
            parser.error(f"recipe {argv[0]}: {err}")
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # a bad flag value, found by a dataclass's __post_init__: usage error, exit 2
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: parse, train, print the final metrics as JSON (rank 0); returns 0 on success."""
    set_offline()
    from arrcoc_sam.integrations.launch import owned_process_group

    with owned_process_group():  # entered first: parsing the training arguments creates the process group
        model_args, data_args, training_args = parse_args(argv)
        results = _build_train_evaluate(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(json.dumps(results, indent=2, sort_keys=True))
    return 0


def _build_train_evaluate(model_args: ModelArguments, data_args: DataArguments, training_args) -> dict[str, float]:
    """Build, train and evaluate; returns the metrics only, so the Trainer and its DDP model are unreferenced by
    the time the caller shuts the process group down (a DDP reducer freed after that aborts the process)."""
    try:
        run = build_run(model_args, data_args, training_args)
    except (OSError, ValueError) as err:  # a bad input met while setting up: a usage error, exit 2
        parser = _parser()
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return train_and_evaluate(*run, model_args)
