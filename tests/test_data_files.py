"""Users' data files: the documented schema loads from JSONL/CSV/Parquet; bad rows fail with file, row, field."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from arrcoc_sam.relevance.data_files import DataFileError, load_relevance_files, read_relevance_file

TEXT_ROWS = [
    {"query": "person", "tokens": ["Barack", "Obama", "spoke"], "labels": [1, 1, 0]},
    {"query": "location", "tokens": ["in", "Paris"], "labels": [0, 1]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("writer,suffix", [(write_jsonl, "jsonl"), (write_csv, "csv"), (write_parquet, "parquet")])
def test_text_rows_load_identically_from_every_format(tmp_path, writer, suffix):
    examples = read_relevance_file(writer(tmp_path / f"data.{suffix}", TEXT_ROWS), kind="text")
    assert examples == [{**row, "labels": [float(y) for y in row["labels"]]} for row in TEXT_ROWS]


def test_csv_accepts_whitespace_separated_tokens_and_labels(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('query,tokens,labels\nperson,"Barack Obama spoke","1 1 0"\n', encoding="utf-8")
    assert read_relevance_file(path, "text") == [
        {"query": "person", "tokens": ["Barack", "Obama", "spoke"], "labels": [1.0, 1.0, 0.0]}
    ]


@pytest.mark.parametrize(
    "bad_row,field,message",
    [
        ({"tokens": ["a"], "labels": [0]}, "query", "missing"),
        ({"query": "x", "tokens": ["a", "b"], "labels": [0]}, "labels", "one label per token"),
        ({"query": "x", "tokens": ["a"], "labels": [2]}, "labels", r"in \[0, 1\]"),
        ({"query": "x", "tokens": ["a", "b"], "labels": [1, -0.5]}, "labels", r"in \[0, 1\], got min -0.5, max 1"),
        ({"query": "x", "tokens": ["a", 3], "labels": [0, 1]}, "tokens", "item 1"),
        ({"query": "x", "tokens": [], "labels": []}, "tokens", "non-empty list"),
        ({"query": "x", "tokens": ["a"], "labels": ["yes"]}, "labels", "expected numbers"),
        ({"query": "x", "tokens": ["a", "b"], "labels": ["1", "0.5"]}, "labels", "got text such as '1'"),
        ({"query": "x", "tokens": ["a", " "], "labels": [0, 1]}, "tokens", "item 1 is ' ', expected a non-empty string"),
        ({"query": "x", "tokens": ["a", "b"], "labels": [[0], [1]]}, "labels",
         r"one label per token \(2\), got shape \(2, 1\)"),
    ],
)
def test_a_malformed_text_row_names_file_row_and_field(tmp_path, bad_row, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [TEXT_ROWS[0], TEXT_ROWS[1], bad_row])
    with pytest.raises(DataFileError, match=rf"bad\.jsonl: row 3: field '{field}': .*{message}") as info:
        read_relevance_file(path, "text")
    assert (info.value.row, info.value.field) == (3, field)


def test_csv_row_numbers_count_data_rows_after_the_header(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [TEXT_ROWS[0], {**TEXT_ROWS[1], "labels": [0, 7]}])
    with pytest.raises(DataFileError, match=r"bad\.csv: row 2: field 'labels'"):
        read_relevance_file(path, "text")


@pytest.mark.parametrize("name", ["bad.json", "bad.parquet"])
def test_json_array_items_and_parquet_rows_are_numbered_from_one(tmp_path, name):
    rows = [TEXT_ROWS[0], TEXT_ROWS[1], {**TEXT_ROWS[1], "labels": [0, 7]}]
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        write_parquet(path, rows)
    with pytest.raises(DataFileError, match=rf"{name}: row 3: field 'labels'") as info:
        read_relevance_file(path, "text")
    assert info.value.row == 3


def test_blank_and_whitespace_only_jsonl_lines_are_skipped_and_not_counted_as_rows(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(("\r\n".join([json.dumps(TEXT_ROWS[0]), "", " \t", json.dumps(TEXT_ROWS[1])]) + "\r\n").encode())
    assert [row["query"] for row in read_relevance_file(path, "text")] == ["person", "location"]


def test_invalid_json_line_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(TEXT_ROWS[0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"broken\.jsonl: row 3: not valid JSON"):
        read_relevance_file(path, "text")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_file_fails_clearly(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFileError, match=r"empty\.jsonl: row 0: .*empty dataset"):
        load_relevance_files({"train": path}, kind="text")


def test_an_empty_csv_with_only_a_header_fails_clearly(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("query,tokens,labels\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="empty dataset"):
        read_relevance_file(path, "text")


def vision_row(n=4, c=3, value=0.5, **extra):
    return {"query": "red circle", "token_features": np.full((n, c), value).tolist(),
            "relevance": [0.0, 1.0, 0.5, 0.25][:n], **extra}


def test_vision_features_load_with_computed_query_embeddings(tmp_path):
    path = write_jsonl(tmp_path / "v.jsonl", [vision_row(), vision_row(value=1.0)])
    data = load_relevance_files({"train": path}, kind="vision", query_embedder="hash")["train"]
    row = data[1]
    assert row["token_features"].shape == (4, 3) and np.all(row["token_features"] == 1.0)
    assert row["query_embedding"].shape == (32,)
    np.testing.assert_allclose(row["labels"], [0.0, 1.0, 0.5, 0.25])


def test_vision_images_load_relative_to_the_data_file(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    row = {"query": "red circle", "image": "a.png", "relevance": [[0.0, 1.0], [0.5, 0.0]],
           "query_embedding": [0.1, 0.2]}
    data = load_relevance_files({"train": write_jsonl(tmp_path / "v.jsonl", [row])}, kind="vision")["train"]
    assert data[0]["pixel_values"].shape == (3, 8, 8) and data[0]["pixel_values"].max() == 200
    assert data[0]["labels"].shape == (4,)


@pytest.mark.parametrize(
    "rows,field,message",
    [
        ([vision_row(), vision_row(n=3)], "relevance", "N .* is 3, but earlier rows have 4"),
        ([vision_row(), vision_row(c=5)], "token_features", "C .* is 5, but earlier rows have 3"),
        ([vision_row(), {**vision_row(), "image": "x.png"}], "token_features", "exactly one of"),
        ([vision_row(), {**vision_row(), "image": "a.png", "token_features": None}], "image",
         "this row gives 'image', but earlier rows have 'token_features'"),
        ([{**vision_row(), "image": "a.png", "token_features": None}, {**vision_row(), "image": "missing.png",
                                                                      "token_features": None}], "image", "cannot read"),
        ([vision_row(), vision_row(value=float("nan"))], "token_features", "NaN"),
        ([vision_row(), {**vision_row(), "relevance": [0.0, -0.25, 0.5, 0.25]}], "relevance", r"got min -0.25"),
        ([vision_row(), {**vision_row(), "relevance": [["0.5", 1.0], [0.5, 0.0]]}], "relevance", "quoted numbers"),
        ([vision_row(query_embedding=[1, 2]), vision_row()], "query_embedding", "give it in all or none"),
    ],
)
def test_a_malformed_vision_row_names_file_row_and_field(tmp_path, rows, field, message):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    with pytest.raises(DataFileError, match=rf"v\.jsonl: row 2: field '{field}': .*{message}"):
        read_relevance_file(path, "vision")


def test_unknown_extension_and_kind_are_rejected(tmp_path):
    with pytest.raises(DataFileError, match="unknown file type '.txt'"):
        read_relevance_file(tmp_path / "data.txt", "text")
    with pytest.raises(ValueError, match="kind must be one of"):
        read_relevance_file(tmp_path / "data.jsonl", "audio")


@pytest.mark.parametrize(
    "heldout_row,field,message",
    [
        (vision_row(n=3, query_embedding=[0.3, 0.4]), "relevance", r"N \(relevance length\) is 3, but .*train\.jsonl \(row 1\) has 4"),
        (vision_row(c=5, query_embedding=[0.3, 0.4]), "token_features", r"C \(channels\) is 5, but .*train\.jsonl \(row 1\) has 3"),
        (vision_row(query_embedding=[1.0] * 3), "query_embedding", r"D .* is 3, but .*train\.jsonl"),
        (vision_row(), "query_embedding", r"missing, but .*train\.jsonl \(row 1\) has one"),
        ({**vision_row(query_embedding=[0.3, 0.4]), "token_features": None, "image": "a.png"}, "image",
         r"this row gives 'image', but .*train\.jsonl \(row 1\) has 'token_features'"),
    ],
)
def test_a_heldout_file_inconsistent_with_the_training_file_fails_before_loading(tmp_path, heldout_row, field,
                                                                                  message):
    train = write_jsonl(tmp_path / "train.jsonl", [vision_row(query_embedding=[0.1, 0.2])] * 2)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [vision_row(query_embedding=[0.3, 0.4]), heldout_row])
    with pytest.raises(DataFileError, match=rf"heldout\.jsonl: row 2: field '{field}': {message}.*must agree"):
        load_relevance_files({"train": train, "validation": train, "heldout": heldout}, kind="vision",
                             query_embedder=lambda queries: pytest.fail("embedded before checking every file"))


@pytest.mark.parametrize(
    "row,field",
    [
        ({"query": "q", "relevance": [[]], "token_features": [[]]}, "relevance"),
        ({"query": "q", "relevance": [[], []], "token_features": [[1.0]]}, "relevance"),
        ({"query": "q", "relevance": [0.5], "token_features": [[]]}, "token_features"),
        ({"query": "q", "relevance": [0.5, 0.5], "token_features": [[], []]}, "token_features"),
    ],
)
def test_empty_nested_lists_and_zero_channels_name_the_field(tmp_path, row, field):
    with pytest.raises(DataFileError, match=rf"v\.jsonl: row 1: field '{field}'"):
        read_relevance_file(write_jsonl(tmp_path / "v.jsonl", [row]), "vision")


@pytest.mark.parametrize("name,content", [
    ("bom.csv", '\ufeffquery,tokens,labels\nperson,"Barack Obama",1 1\n'),
    ("bom.jsonl", '\ufeff{"query": "person", "tokens": ["Barack", "Obama"], "labels": [1, 1]}\n'),
    ("pretty.json", '[\n  {\n    "query": "person",\n    "tokens": ["Barack", "Obama"],\n    "labels": [1, 1]\n  }\n]\n'),
    ("lines.json", '{"query": "person", "tokens": ["Barack", "Obama"], "labels": [1, 1]}\n'),
])
def test_byte_order_marks_and_json_arrays_load(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert read_relevance_file(path, "text") == [{"query": "person", "tokens": ["Barack", "Obama"], "labels": [1.0, 1.0]}]


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.csv"])
def test_a_file_that_is_not_utf8_fails_naming_the_line(tmp_path, name):
    path = tmp_path / name
    header = b"query,tokens,labels\n" if name.endswith(".csv") else b""
    line = b"caf\xe9,a,1\n" if name.endswith(".csv") else b'{"query": "caf\xe9", "tokens": ["a"], "labels": [1]}\n'
    path.write_bytes(header + line)
    with pytest.raises(DataFileError, match=rf"{name}: row 1: not UTF-8 text \(byte 0xe9 on line {1 + bool(header)}\)"):
        read_relevance_file(path, "text")


def test_a_json_array_of_non_objects_names_the_item(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"query": "q", "tokens": ["a"], "labels": [1]}, [1, 2]]', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"bad\.json: row 2: expected a JSON object, got list"):
        read_relevance_file(path, "text")


def test_jsonl_lines_split_only_at_newlines_not_at_unicode_line_separators(tmp_path):
    path = tmp_path / "sep.jsonl"
    path.write_text('{"query": "a\u2028b", "tokens": ["x"], "labels": [1]}\r\n', encoding="utf-8")
    assert read_relevance_file(path, "text") == [{"query": "a\u2028b", "tokens": ["x"], "labels": [1.0]}]


def _token_classification_script():
    """scripts/train_token_classification.py as a module (scripts/ is not a package), loaded once."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "train_token_classification_script"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / "train_token_classification.py"
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up here
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.parametrize(("line", "message"), [
    ('{"tokens": ["a", "b"]}', "row 2: field 'tags': missing"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}', "row 2: 2 tokens but 1 tags"),
    ('{"tokens": [], "tags": []}', "row 2: field 'tokens': expected a non-empty list of strings, got []"),
    ('{"tokens": ["a", 3], "tags": ["O", "O"]}', "row 2: field 'tokens': item 1 is 3"),
    ('{"tokens": ["a"], "tags": "O"}', "row 2: field 'tags': expected a non-empty list of strings, got 'O'"),
    ('["a", "O"]', "row 2: expected a JSON object with 'tokens' and 'tags', got list"),
    ('{"tokens": ["a"], "tags": ["O"]', "row 2: not valid JSON"),
])
def test_a_malformed_token_classification_row_names_file_and_row(tmp_path, line, message):
    script = _token_classification_script()
    path = tmp_path / "ner.jsonl"
    path.write_text('{"tokens": ["John", "runs"], "tags": ["B-person", "O"]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {message}")):
        script.read_sentences(str(path))


@pytest.mark.parametrize(("text", "message"), [
    ("John\tB-person\nruns\n", "line 2: expected 'token<TAB>tag' (or 'token tag'), got 'runs'"),
    ("John\tB-person\n\nruns\t \n", "line 3: expected 'token<TAB>tag'"),
    ("", "row 0: no sentences (the file is empty)"),
    ("\n\n", "row 0: no sentences (the file is empty)"),
])
def test_a_malformed_conll_file_names_file_and_line(tmp_path, text, message):
    script = _token_classification_script()
    path = tmp_path / "ner.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: {message}")):
        script.read_sentences(str(path))


def test_conll_sentences_keep_the_line_they_start_on_and_unknown_validation_tags_are_named(tmp_path):
    script = _token_classification_script()
    train = tmp_path / "train.txt"
    train.write_text("John\tB-person\nruns\tO\n\n\nParis\tB-geo\n", encoding="utf-8")
    validation = tmp_path / "validation.txt"
    validation.write_text("Mary\tB-person\n\nGoogle\tB-company\nhires O\n", encoding="utf-8")
    sentences = script.read_sentences(str(train))
    assert sentences == [(["John", "runs"], ["B-person", "O"], 1), (["Paris"], ["B-geo"], 5)]
    labels = {tag: i for i, tag in enumerate(sorted({t for _, tags, _ in sentences for t in tags}))}
    held = script.read_sentences(str(validation))
    assert held[1] == (["Google", "hires"], ["B-company", "O"], 3)
    with pytest.raises(ValueError, match="^" + re.escape(f"{validation}: line 3: tag 'B-company' does not occur in "
                                                         f"the training file {train}")):
        script.check_tags(held, labels, str(validation), str(train))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_seq_length": 0}, "--max_seq_length must be >= 1, got 0"),
    ({"max_train_samples": 0}, "--max_train_samples must be >= 1 (or left out), got 0"),
])
def test_token_classification_data_arguments_name_the_bad_flag(kwargs, message):
    script = _token_classification_script()
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        script.DataArguments(train_file="ner.txt", **kwargs)


@pytest.mark.parametrize(("length", "positions", "special", "message"), [
    (2, 512, 2, "--max_seq_length 2 leaves no room for a word beside the tokenizer's 2 special tokens; use >= 3"),
    (600, 512, 2, "--max_seq_length 600 exceeds the model's 512 position embeddings"),
])
def test_token_classification_sequence_length_must_fit_tokenizer_and_model(length, positions, special, message):
    script = _token_classification_script()
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        script.check_sequence_length(length, positions, special)
    script.check_sequence_length(1, 8, 0)  # no tokenizer: one word is enough
    script.check_sequence_length(positions, positions, special)


@pytest.mark.parametrize(
    "row,field,message",
    [
        ({"query": "red circle", "relevance": [0.0, 1.0, 0.5, 0.25]}, "token_features",
         "give exactly one of 'token_features' and 'image'"),
        (vision_row(n=4) | {"token_features": np.zeros((3, 3)).tolist()}, "token_features",
         r"expected \[N=4, C\] numbers, got shape \(3, 3\)"),
        (vision_row(query_embedding=[[0.1, 0.2], [0.3, 0.4]]), "query_embedding",
         r"expected a flat list of D numbers, got shape \(2, 2\)"),
        ({**vision_row(), "query": "   "}, "query", "expected a non-empty string, got '   '"),
    ],
)
def test_a_row_without_input_mismatched_features_a_nested_embedding_or_a_blank_query_names_the_field(
        tmp_path, row, field, message):
    with pytest.raises(DataFileError, match=rf"v\.jsonl: row 1: field '{field}': {message}"):
        read_relevance_file(write_jsonl(tmp_path / "v.jsonl", [row]), "vision")


def test_a_given_query_embedding_is_kept_not_recomputed(tmp_path):
    path = write_jsonl(tmp_path / "v.jsonl", [vision_row(query_embedding=[0.25, -1.5])] * 2)
    data = load_relevance_files({"train": path}, kind="vision",
                                query_embedder=lambda queries: pytest.fail("embedded a row that has its embedding"))
    np.testing.assert_array_equal(data["train"][0]["query_embedding"], np.float32([0.25, -1.5]))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_palette_and_alpha_images_load_as_three_channel_rgb(tmp_path, mode):
    from PIL import Image

    Image.new("RGB", (4, 4), (200, 100, 50)).convert(mode).save(tmp_path / "a.png")
    row = {"query": "red circle", "image": "a.png", "relevance": [0.0, 1.0, 0.5, 0.0], "query_embedding": [0.1]}
    pixels = read_relevance_file(write_jsonl(tmp_path / "v.jsonl", [row]), "vision")[0]["pixel_values"]
    expected = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).transpose(2, 0, 1)
    assert pixels.shape == (3, 4, 4) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, expected)


def _image_row(name: str) -> dict:
    return {"query": "red circle", "image": name, "relevance": [0.0, 1.0, 0.5, 0.25]}


def test_sixteen_bit_images_scale_to_eight_bits_and_exif_orientation_is_applied(tmp_path):
    """A 16-bit PNG loaded as all 255 (convert('RGB') clips); a JPEG's EXIF rotation was ignored, so labels drawn on
    the image as shown landed on rotated cells."""
    from PIL import Image

    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    Image.fromarray((values * 257).astype(np.uint16)).save(tmp_path / "deep.png")
    wide = np.zeros((4, 8, 3), dtype=np.uint8)
    wide[:, :4] = 255  # stored 4 high x 8 wide, left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(wide).save(tmp_path / "turned.png", exif=exif)
    data = load_relevance_files({"train": write_jsonl(tmp_path / "v.jsonl", [_image_row("deep.png")])}, kind="vision",
                                query_embedder="hash")["train"]
    np.testing.assert_array_equal(data[0]["pixel_values"][0], values)
    Image.fromarray((values * 257).astype(np.int32)).save(tmp_path / "deep_i.tif")  # mode I: also 16-bit, scaled
    deep_i = read_relevance_file(write_jsonl(tmp_path / "i.jsonl", [_image_row("deep_i.tif")]), "vision")[0]
    np.testing.assert_array_equal(deep_i["pixel_values"][0], values)
    turned = read_relevance_file(write_jsonl(tmp_path / "t.jsonl", [_image_row("turned.png")]), "vision")[0]
    assert turned["pixel_values"].shape == (3, 8, 4)  # shown 8 high x 4 wide, the white half on top
    assert (turned["pixel_values"][:, :4] == 255).all() and (turned["pixel_values"][:, 4:] == 0).all()


@pytest.mark.parametrize("query", ["\u200b", " \u00ad "])
def test_a_query_with_nothing_to_embed_is_refused_naming_the_file_instead_of_a_nan_embedding(tmp_path, query):
    """MiniLM deletes these characters, and the mean over no word piece was an all-NaN embedding (every metric NaN)."""
    from arrcoc_sam.relevance.scenes import HashQueryEmbedder

    path = write_jsonl(tmp_path / "v.jsonl", [vision_row(), {**vision_row(), "query": query}])
    with pytest.raises(ValueError, match=r"v\.jsonl: query number 2 .* has no word to embed"):
        load_relevance_files({"train": path}, kind="vision", query_embedder="minilm")
    with pytest.raises(ValueError, match="query number 1 .* has no word to embed"):
        HashQueryEmbedder()([" "])


def test_images_of_another_height_than_the_first_rows_are_refused_naming_both_sizes(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "square.png")
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "short.png")  # 6 high, 8 wide
    path = write_jsonl(tmp_path / "v.jsonl", [_image_row("square.png"), _image_row("short.png")])
    with pytest.raises(DataFileError, match=r"v\.jsonl: row 2: field 'image': image size is \(6, 8\), but earlier "
                                            r"rows have \(8, 8\)"):
        read_relevance_file(path, "vision")


@pytest.mark.parametrize("name", ["DATA.JSONL", "Data.Csv", "DATA.PARQUET"])
def test_the_format_follows_the_extension_in_any_letter_case(tmp_path, name):
    writer = {".jsonl": write_jsonl, ".csv": write_csv, ".parquet": write_parquet}[name[name.rindex("."):].lower()]
    examples = read_relevance_file(writer(tmp_path / name, TEXT_ROWS), kind="text")
    assert [row["tokens"] for row in examples] == [row["tokens"] for row in TEXT_ROWS]
