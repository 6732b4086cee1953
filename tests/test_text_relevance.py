"""TextRelevanceModel: shapes and ranges, masks, the loss against hand-written formulas, save/load, LoRA + SAM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

from arrcoc_sam.relevance.collators import TextRelevanceCollator, encode_token_relevance
from arrcoc_sam.relevance.text import (
    TextRelevanceConfig,
    TextRelevanceModel,
    minilm_path,
    pair_segment_masks,
)
from arrcoc_sam.relevance.training import ModelArguments, apply_lora

TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def tiny_model(**kwargs) -> TextRelevanceModel:
    torch.manual_seed(0)
    return TextRelevanceModel(TextRelevanceConfig(encoder_config=BertConfig(**TINY), **kwargs)).eval()


@pytest.fixture(scope="module")
def batch(tokenizer):
    examples = [
        ("person", ["Barack", "Obama", "visited", "Chicago", "yesterday"], [1, 1, 0, 0, 0]),
        ("sports team", ["go", "lakers"], [0, 1]),
        ("music artist", ["no", "artists", "here", "at", "all", ",", "sorry"], [0, 0, 0, 0, 0, 0, 0]),
    ]
    encoded = [encode_token_relevance(tokenizer, q, t, y, max_length=32) for q, t, y in examples]
    return TextRelevanceCollator(tokenizer)(encoded)


def test_relevance_is_in_unit_interval_and_zero_outside_the_text(batch):
    out = tiny_model()(**batch)
    assert out.logits.shape == batch["input_ids"].shape == out.relevance.shape
    assert out.query_embedding.shape == (3, TINY["hidden_size"])
    assert torch.all((out.relevance >= 0) & (out.relevance <= 1))
    assert torch.all(out.relevance[~batch["text_mask"]] == 0)
    assert torch.all(out.relevance[batch["text_mask"]] > 0)


def test_compute_relevance_matches_forward_on_text_tokens(batch):
    model = tiny_model()
    out = model(**batch)
    states = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"]).last_hidden_state
    relevance = model.compute_relevance(states, out.query_embedding)
    assert relevance.shape == batch["input_ids"].shape
    torch.testing.assert_close(relevance[batch["text_mask"]], out.relevance[batch["text_mask"]])
    with pytest.raises(ValueError, match="token_features must be"):
        model.compute_relevance(states[0], out.query_embedding)


def test_segment_masks_from_token_type_ids_equal_the_collator_masks(batch):
    query_mask, text_mask = pair_segment_masks(batch["token_type_ids"], batch["attention_mask"])
    assert torch.equal(query_mask, batch["query_mask"])
    assert torch.equal(text_mask, batch["text_mask"])
    model = tiny_model()
    without = {k: v for k, v in batch.items() if k not in ("query_mask", "text_mask")}
    torch.testing.assert_close(model(**without).relevance, model(**batch).relevance, rtol=0, atol=0)


def test_relevance_depends_on_the_query(tokenizer):
    model = tiny_model()
    words = ["Barack", "Obama", "visited", "Chicago"]
    encoded = [encode_token_relevance(tokenizer, q, words) for q in ("person", "location")]
    out = model(**TextRelevanceCollator(tokenizer)(encoded))
    assert not torch.allclose(out.relevance[0], out.relevance[1])


def test_word_labels_go_to_first_word_pieces_only(tokenizer):
    encoded = encode_token_relevance(tokenizer, "company", ["Pxleyes", "rocks"], [1, 0], max_length=32)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert pieces[:3] == ["[CLS]", "company", "[SEP]"]
    labelled = [(p, y) for p, y in zip(pieces, encoded["labels"]) if y != -100]
    assert labelled == [(pieces[3], 1.0), ("rocks", 0.0)]
    assert pieces[4].startswith("##") and encoded["labels"][4] == -100


def test_a_word_the_tokenizer_deletes_keeps_its_label_as_the_unknown_token(tokenizer):
    """A zero-width space or a soft hyphen has no word piece, so its label silently left the loss and metrics."""
    words = ["hi", "\u200b", "Obama", "\u00ad"]
    encoded = encode_token_relevance(tokenizer, "person", words, [0, 1, 1, 1], max_length=32)
    labels = [y for y in encoded["labels"] if y != -100]
    assert labels == [0.0, 1.0, 1.0, 1.0]
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert pieces.count(tokenizer.unk_token) == 2
    plain = encode_token_relevance(tokenizer, "person", ["hi", "Obama"], [0, 1], max_length=32)
    assert tokenizer.unk_token not in tokenizer.convert_ids_to_tokens(plain["input_ids"])


def test_truncation_keeps_the_query_and_drops_late_word_labels(tokenizer):
    words = ["word"] * 50
    encoded = encode_token_relevance(tokenizer, "sports team", words, [1] * 50, max_length=16)
    assert len(encoded["input_ids"]) == 16
    assert sum(encoded["query_mask"]) == 2
    assert sum(y == 1 for y in encoded["labels"]) == 16 - 2 - 3


def _reference_loss(logits, labels, text_mask, pos_weight, gamma, focal, ranking_weight):
    """Per-token loops over the documented formula."""
    total, count, pair_total, pairs = 0.0, 0, 0.0, 0
    for b in range(logits.shape[0]):
        valid = [i for i in range(logits.shape[1]) if text_mask[b, i] and labels[b, i] != -100]
        for i in valid:
            y, s = float(labels[b, i]), float(logits[b, i])
            p = 1 / (1 + math.exp(-s))
            bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
            w = pos_weight * y + (1 - y)
            if focal:
                p_t = p * y + (1 - p) * (1 - y)
                w *= (1 - p_t) ** gamma
            total, count = total + w * bce, count + 1
            for j in valid:
                if labels[b, i] > labels[b, j]:
                    pair_total += math.log1p(math.exp(-(s - float(logits[b, j]))))
                    pairs += 1
    return total / count + ranking_weight * (pair_total / pairs if pairs else 0.0)


@pytest.mark.parametrize("loss_type", ["bce", "focal"])
def test_loss_matches_the_hand_written_formula(batch, loss_type):
    model = tiny_model(loss_type=loss_type, pos_weight=4.0, focal_gamma=1.5, ranking_weight=0.3)
    out = model(**batch)
    expected = _reference_loss(out.logits.detach().double(), batch["labels"], batch["text_mask"], 4.0, 1.5,
                               loss_type == "focal", 0.3)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_weighted_bce_equals_torch_pos_weight_bce(batch):
    model = tiny_model(pos_weight=3.0)
    out = model(**batch)
    valid = batch["text_mask"] & (batch["labels"] != -100)
    expected = F.binary_cross_entropy_with_logits(
        out.logits[valid], batch["labels"][valid], pos_weight=torch.tensor(3.0)
    )
    torch.testing.assert_close(out.loss, expected)


def test_gradients_reach_every_parameter(batch):
    model = tiny_model(ranking_weight=0.5).train()
    model(**batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_save_and_load_round_trip_with_safetensors_and_auto_classes(tmp_path, batch):
    model = tiny_model(head_hidden_size=16, loss_type="focal", ranking_weight=0.2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "arrcoc_text_relevance"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is TextRelevanceModel
    assert loaded.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # Loaded tensors can sit at other memory alignments, so kernels may round differently in the last bit.
    torch.testing.assert_close(loaded(**batch).relevance, model(**batch).relevance, rtol=0, atol=1e-6)


def test_from_backbone_loads_the_pretrained_minilm_weights():
    model = TextRelevanceModel.from_backbone()
    encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    assert model.config.encoder_config.hidden_size == 384
    for name, value in encoder.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], value), name


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        TextRelevanceConfig(loss_type="hinge")
    with pytest.raises(ValueError, match="pos_weight must be > 0, got -1"):
        TextRelevanceConfig(pos_weight=-1)
    with pytest.raises(ValueError, match="model_type"):
        TextRelevanceConfig(encoder_config={"hidden_size": 8})


def test_lora_with_sam_perturbs_and_updates_only_adapters_and_head(batch):
    from arrcoc_sam.sam.optimizer import SAM

    model = apply_lora(tiny_model(), ModelArguments(lora_r=4, lora_target_modules="query,value")).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".head." in n for n in trainable)
    assert any("lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, lr=0.5, rho=0.05)

    model(**batch).loss.backward()
    assert optimizer.perturb()
    perturbed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert perturbed <= trainable and any("lora_B" in n for n in perturbed)
    optimizer.zero_grad()
    model(**batch).loss.backward()
    optimizer.restore()
    optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert any("lora_B" in n for n in changed) and any(".head." in n for n in changed)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_backbones_with_and_without_a_pooler_build_save_load_and_score(tmp_path, batch, kind):
    from transformers import DistilBertConfig, DistilBertModel

    if kind == "bert":
        encoder_config = BertConfig(**TINY)
    else:
        encoder_config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    torch.manual_seed(0)
    backbone = (DistilBertModel(encoder_config) if kind == "distilbert"
                else AutoModel.from_config(encoder_config, add_pooling_layer=True))
    backbone.save_pretrained(tmp_path / "backbone")
    model = TextRelevanceModel.from_backbone(str(tmp_path / "backbone")).eval()  # local weights, no hub
    assert getattr(model.backbone, "pooler", None) is None
    out = model(**batch)
    assert out.relevance.shape == batch["input_ids"].shape
    assert torch.all(out.relevance[batch["text_mask"]] > 0) and torch.all(out.relevance[~batch["text_mask"]] == 0)
    model.save_pretrained(tmp_path / "relevance")
    loaded = AutoModel.from_pretrained(tmp_path / "relevance").eval()
    torch.testing.assert_close(loaded(**batch).relevance, out.relevance, atol=1e-6, rtol=0)


def test_the_query_embedding_is_the_mean_backbone_state_over_the_query_word_pieces(batch):
    model = tiny_model()
    states = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"]).last_hidden_state
    expected = torch.stack([states[b][batch["query_mask"][b]].mean(0) for b in range(states.shape[0])])
    assert batch["query_mask"].sum(1).tolist() == [1, 2, 2]  # one- and two-piece queries: a mean, not a sum over L
    torch.testing.assert_close(model(**batch).query_embedding, expected)


def test_the_head_couples_token_and_query_multiplicatively_as_documented():
    """logit_i = w·GELU(a_i + b + a_i ⊙ b) + c with a_i = W_h h_i, b = W_q q."""
    torch.manual_seed(0)
    model = tiny_model(head_hidden_size=8)
    head = model.head
    tokens, query = torch.randn(2, 5, TINY["hidden_size"]), torch.randn(2, TINY["hidden_size"])
    a = tokens @ head.token_proj.weight.T + head.token_proj.bias
    b = (query @ head.query_proj.weight.T + head.query_proj.bias).unsqueeze(1)
    expected = torch.sigmoid(F.gelu(a + b + a * b) @ head.out.weight[0] + head.out.bias)
    torch.testing.assert_close(model.compute_relevance(tokens, query), expected)


def test_targets_outside_the_text_never_enter_the_loss(batch):
    """The loss covers text tokens with a target; a label at a query or special position is ignored."""
    model = tiny_model(ranking_weight=0.3)
    reference = model(**batch).loss
    labels = batch["labels"].clone()
    labels[~batch["text_mask"]] = 1.0  # stray targets on [CLS], the query, [SEP] and padding
    torch.testing.assert_close(model(**{**batch, "labels": labels}).loss, reference)


def test_config_rejects_a_zero_positive_weight():
    with pytest.raises(ValueError, match="pos_weight must be > 0, got 0"):
        TextRelevanceConfig(pos_weight=0)


def test_the_collator_pads_ids_masks_and_labels_with_their_own_values(tokenizer):
    short = encode_token_relevance(tokenizer, "person", ["Obama"], [1], max_length=32)
    long = encode_token_relevance(tokenizer, "person", ["Barack", "Obama", "spoke", "today"], [1, 1, 0, 0],
                                  max_length=32)
    batch = TextRelevanceCollator(tokenizer)([short, long])
    pad = len(long["input_ids"]) - len(short["input_ids"])
    assert pad > 0
    assert batch["input_ids"][0, -pad:].tolist() == [tokenizer.pad_token_id] * pad
    assert batch["labels"][0, -pad:].tolist() == [-100.0] * pad
    for key in ("attention_mask", "token_type_ids"):
        assert batch[key][0, -pad:].tolist() == [0] * pad
    assert not batch["query_mask"][0, -pad:].any() and not batch["text_mask"][0, -pad:].any()


def test_pad_to_multiple_of_rounds_the_length_up(tokenizer):
    encoded = [encode_token_relevance(tokenizer, "person", ["Barack", "Obama"], [1, 1])]
    length = len(encoded[0]["input_ids"])
    assert length % 8  # otherwise rounding up and down agree
    batch = TextRelevanceCollator(tokenizer, pad_to_multiple_of=8)(encoded)
    assert batch["input_ids"].shape[1] == -(-length // 8) * 8


def test_truncation_never_cuts_a_long_query(tokenizer):
    query = " ".join(["team"] * 8)
    encoded = encode_token_relevance(tokenizer, query, ["word"] * 8, [1] * 8, max_length=16)
    assert len(encoded["input_ids"]) == 16 and sum(encoded["query_mask"]) == 8  # all 8 query pieces kept
    assert sum(encoded["text_mask"]) == 16 - 8 - 3


def test_the_shortest_max_length_keeps_exactly_one_text_piece_and_one_less_is_refused(tokenizer):
    """``[CLS] person [SEP]`` + one text piece + ``[SEP]`` = 5: the documented minimum, accepted; 4 is refused."""
    from arrcoc_sam.relevance.collators import MaxLengthTooShort

    encoded = encode_token_relevance(tokenizer, "person", ["Obama", "spoke"], [1, 0], max_length=5)
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["[CLS]", "person", "[SEP]", "obama", "[SEP]"]
    assert encoded["labels"] == [-100.0, -100.0, -100.0, 1.0, -100.0]
    with pytest.raises(MaxLengthTooShort, match="max_length=4 is too short .* needs at least 5 word pieces"):
        encode_token_relevance(tokenizer, "person", ["Obama"], [1], max_length=4)


def test_labels_of_another_count_than_the_words_are_refused_not_silently_dropped(tokenizer):
    with pytest.raises(ValueError, match="one entry per token: 3 labels for 2 tokens"):
        encode_token_relevance(tokenizer, "person", ["Barack", "Obama"], [1, 1, 0])
