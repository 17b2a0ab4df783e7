"""Property-based tests: hostile bytes and texts through ingest, validate and the runtime.

Each input either works or fails with an error that names the file (and row, where there is
one) and says what to do; nothing ends in a traceback a user cannot act on.
"""

from __future__ import annotations

import csv
import io
import string
from pathlib import Path

import pandas as pd
import pytest
from conftest import synthetic_reviews, write_params, write_splits
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bertrt
from pipeline.core import params
from pipeline.core.sources import SourceError
from pipeline.core.tables import TableError
from pipeline.stages import ingest, validate

RUNS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Texts people actually send: emoji, CJK, combining marks, right-to-left, control characters,
# quotes and newlines that CSV must quote, BOMs in the middle, and the odd very long text.
HOSTILE = st.one_of(
    st.text(min_size=1, max_size=60),
    st.sampled_from(
        [
            "😀👍🏽 great", "好看的电影", "e\u0301\u0301\u0301", "שלום עולם",
            '"quoted, with comma"', "line\r\nbreak", "tab\tand\x00nul", "\ufeffbom inside",
            "\u200b\u200b", "NaN",
            "x" * 100_000,
        ]
    ),
)  # fmt: skip
LABELS = st.sampled_from(["fresh", "rotten"])


def _ingest(tmp_path: Path, source: Path) -> Exception | None:
    """None when ingest worked; the error when it refused, which must name the file."""
    params_path = write_params(tmp_path, {"ingest.source": str(source), "ingest.group_column": ""})
    try:
        ingest.run(params.load(params_path), tmp_path / "raw", tmp_path / "ingest.json")
    except (TableError, SourceError) as exc:
        assert str(source) in str(exc), exc
        assert not (tmp_path / "raw").exists(), "nothing is written on a refusal"
        return exc
    return None


@RUNS
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_a_csv_are_read_or_refused_naming_the_file(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    tmp_path = tmp_path_factory.mktemp("bytes")
    source = tmp_path / "data.csv"
    source.write_bytes(data)
    _ingest(tmp_path, source)


@RUNS
@given(
    rows=st.lists(st.tuples(HOSTILE, LABELS), min_size=0, max_size=40),
    bom=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_hostile_csv_texts_survive_quoting_and_are_kept_or_dropped_by_a_named_rule(
    tmp_path_factory: pytest.TempPathFactory, rows: list, bom: bool, newline: str
) -> None:
    tmp_path = tmp_path_factory.mktemp("csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=newline)
    writer.writerow(["text", "category"])
    writer.writerows(rows)
    # With lines ending in "\n" the writer leaves a field with a bare "\r" unquoted (it quotes
    # only its line ending's characters), and CSV readers, Python's own too, read that "\r" as a
    # line break: such a file does not hold these rows, so it is no input for this test.
    table = [["text", "category"], *map(list, rows)]
    assume(list(csv.reader(io.StringIO(buffer.getvalue(), newline=""))) == table)
    source = tmp_path / "data.csv"
    source.write_bytes(("\ufeff" if bom else "").encode() + buffer.getvalue().encode("utf-8"))
    error = _ingest(tmp_path, source)
    if error is not None:
        named = ("rows left after cleaning", "cannot be split", "cannot be read")
        assert any(reason in str(error) for reason in named), error
        return
    report = __import__("json").loads((tmp_path / "ingest.json").read_text())
    kept = sum(report["rows"].values())
    dropped = sum(report["dropped"]["all"].values())
    assert kept + dropped == report["rows_in"]["all"] == len(rows), report
    texts = pd.concat(pd.read_parquet(tmp_path / "raw" / f"{s}.parquet") for s in ingest.SPLITS)
    assert set(texts["text"]) <= {text for text, _ in rows}, "every text kept byte for byte"


@RUNS
@given(
    train=st.lists(st.tuples(HOSTILE, LABELS), min_size=1, max_size=12),
    # One kind of label per file, as ingest leaves them; the test file's kind may differ.
    test_labels=st.one_of(
        st.lists(
            st.one_of(LABELS, st.sampled_from(["meh", ""]), st.none()), min_size=1, max_size=4
        ),
        st.lists(st.integers(0, 3), min_size=1, max_size=4),
    ),
)
def test_validate_accepts_or_lists_each_bad_row_by_file_and_row(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, train: list, test_labels: list
) -> None:
    tmp_path = tmp_path_factory.mktemp("validate")
    good = synthetic_reviews(20, seed=9)
    splits = {
        "train": [{"text": t, "category": c} for t, c in train] + good[:10],
        "validation": good[10:16],
        "test": [{"text": f"t{i}", "category": c} for i, c in enumerate(test_labels)]
        + ([] if any(isinstance(c, int) for c in test_labels) else good[16:]),
    }
    raw = write_splits(tmp_path / "raw", splits)
    params_path = write_params(
        tmp_path, {"base.model": str(tiny_model_dir), "base.max_length": 16}
    )
    try:
        validate.run(
            raw, params.load(params_path), tmp_path / "v", tmp_path / "v.json", tmp_path / "f.json"
        )
    except validate.ValidationFailed as exc:
        assert exc.failures and all(f["file"] and f["reason"] for f in exc.failures)
        for failure in exc.failures:
            assert failure["row"] is None or 1 <= failure["row"] <= len(splits["train"]) + 20
        assert not (tmp_path / "v").exists()
        return
    clean = pd.read_parquet(tmp_path / "v" / "train.parquet")
    assert len(clean) == len(splits["train"])


@pytest.fixture(scope="module")
def predictor(onnx_model_dir: Path) -> object:
    return bertrt.load(onnx_model_dir, device="cpu")


ANY_CHARACTER = st.characters(codec=None, exclude_categories=())  # lone surrogates included


@RUNS
@given(texts=st.lists(st.text(ANY_CHARACTER, max_size=300), min_size=1, max_size=8))
def test_the_runtime_labels_every_text_or_names_the_one_it_cannot_read(
    predictor: object, texts: list[str]
) -> None:
    try:
        predictions = predictor.predict(texts)
    except ValueError as exc:
        assert "cannot be tokenised" in str(exc) and "send valid Unicode" in str(exc)
        bad = [i for i, t in enumerate(texts) if any(0xD800 <= ord(c) <= 0xDFFF for c in t)]
        assert bad and f"text {bad[0]}" in str(exc), (exc, bad)
        return
    assert len(predictions) == len(texts)
    assert all(p.label in predictor.labels for p in predictions)


@RUNS
@given(
    text=st.text(string.printable + "😀好é\u0301", min_size=0, max_size=50),
    times=st.integers(1, 3),
)
def test_the_runtime_gives_a_text_the_same_label_alone_and_in_a_batch(
    predictor: object, text: str, times: int
) -> None:
    alone = predictor.predict([text])[0]
    batch = predictor.predict(["filler text", text * times, text, "x" * 5000])
    assert batch[2].label == alone.label
    assert abs(batch[2].score - alone.score) < 1e-4
