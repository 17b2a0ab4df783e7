"""The data stages read tables in pieces: their outputs are the same bytes as reading whole.

Each case runs a stage twice on the same source, once reading the file whole and once in pieces
of a few rows (so that duplicates, conflicting labels, groups and type changes fall in different
pieces), and compares the files written byte for byte and the reports value for value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import synthetic_reviews, write_params

from pipeline.core import params
from pipeline.stages import ingest, tokenize_data, validate
from pipeline.tasks.text_classification.task import TextClassification

SPLITS = ("train", "validation", "test")


def reviews(n: int = 400) -> pd.DataFrame:
    """Reviews with what the cleaning looks for, spread over the file: a dropped label, an empty
    text, a duplicate of row 0 near the end (other case and spaces), and one text given two
    labels far apart (both copies are dropped)."""
    rows = synthetic_reviews(n, seed=11)
    for i, row in enumerate(rows):
        row["movie_name"] = f"movie {i // 6}"
        row["rating"] = i % 5
    rows[5]["category"] = "plot"
    rows[9]["text"] = "  "
    rows[n - 3]["text"] = "  " + rows[0]["text"].upper()
    rows[n - 3]["category"] = rows[0]["category"]
    rows[n - 7]["text"] = rows[12]["text"]
    rows[n - 7]["category"] = "rotten" if rows[12]["category"] == "fresh" else "fresh"
    rows[n - 1]["rating"] = None  # the last piece alone has a missing number
    return pd.DataFrame(rows)


def write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def ingest_both_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: Path, **overrides: object
) -> dict[str, tuple[Path, dict]]:
    params_path = write_params(tmp_path, {"ingest.source": str(source), **overrides})
    p = params.load(params_path)
    done = {}
    for way, streams, rows in (("whole", False, ingest.CHUNK_ROWS), ("pieces", True, 37)):
        monkeypatch.setattr(TextClassification, "streams", streams)
        monkeypatch.setattr(ingest, "CHUNK_ROWS", rows)
        out = tmp_path / way
        done[way] = (out, ingest.run(p, out / "raw", out / "ingest.json"))
    return done


def assert_same_files(done: dict[str, tuple[Path, dict]]) -> None:
    (whole, whole_report), (pieces, pieces_report) = done["whole"], done["pieces"]
    assert pieces_report == whole_report
    for split in SPLITS:
        a = (whole / "raw" / f"{split}.parquet").read_bytes()
        b = (pieces / "raw" / f"{split}.parquet").read_bytes()
        assert a == b, f"{split}.parquet differs"
    assert json.loads((pieces / "ingest.json").read_text()) == whole_report


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".csv.gz"])
def test_ingest_in_pieces_writes_the_bytes_of_reading_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    source = write(reviews(), tmp_path / f"data{suffix}")
    done = ingest_both_ways(tmp_path, monkeypatch, source)
    report = done["pieces"][1]
    assert report["dropped"]["all"] == {
        "label_in_drop_labels": 1,
        "empty_text": 1,
        "conflicting_labels": 2,
        "duplicate_text": 1,
    }
    train = pd.read_parquet(done["pieces"][0] / "raw" / "train.parquet")
    assert train["rating"].dtype == "float64"  # one missing value makes the column float
    assert_same_files(done)


@pytest.mark.parametrize(
    "overrides",
    [
        {"ingest.group_column": ""},  # a shuffled, stratified split: rows leave file order
        {"ingest.max_rows": 150},
        {"ingest.deduplicate": False},
    ],
    ids=["no groups", "max_rows", "no deduplication"],
)
def test_ingest_in_pieces_keeps_order_samples_and_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict
) -> None:
    source = write(reviews(), tmp_path / "data.csv")
    assert_same_files(ingest_both_ways(tmp_path, monkeypatch, source, **overrides))


def test_a_folder_of_splits_in_pieces_drops_the_rows_a_later_split_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    df = reviews()
    folder = tmp_path / "given"
    folder.mkdir()
    test = df.iloc[300:]
    # Four test rows copied into train; two more test texts are rows 0 and 12 of train, in
    # other case or with another label.
    train = pd.concat([df.iloc[:300], test.iloc[:4]])
    write(train, folder / "train.csv")
    write(test, folder / "test.csv")
    done = ingest_both_ways(tmp_path, monkeypatch, folder)
    assert done["pieces"][1]["dropped"]["train"]["also_in_a_later_split"] == 6
    assert_same_files(done)


def test_mixed_label_kinds_in_different_pieces_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"text": f"text number {i}", "category": "pos" if i < 50 else 1} for i in range(80)]
    source = tmp_path / "data.jsonl"
    pd.DataFrame(rows).to_json(source, orient="records", lines=True)
    params_path = write_params(tmp_path, {"ingest.source": str(source), "ingest.group_column": ""})
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 20)
    with pytest.raises(ValueError, match=r"mixes kinds of label \(strings in data rows 1, 2"):
        ingest.run(params.load(params_path), tmp_path / "raw", tmp_path / "ingest.json")
    assert not (tmp_path / "raw").exists()


def validate_both_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: Path
) -> dict[str, tuple[Path, object]]:
    """validate.run on `raw` whole and in pieces of 37 rows: (folder, stats or the failures)."""
    p = params.load(write_params(tmp_path))
    done: dict[str, tuple[Path, object]] = {}
    for way, streams, rows in (("whole", False, validate.CHUNK_ROWS), ("pieces", True, 37)):
        monkeypatch.setattr(TextClassification, "streams", streams)
        monkeypatch.setattr(validate, "CHUNK_ROWS", rows)
        out = tmp_path / f"validated-{way}"
        failures = tmp_path / f"failures-{way}.json"
        try:
            result: object = validate.run(raw, p, out, tmp_path / f"stats-{way}.json", failures)
        except validate.ValidationFailed as exc:
            result = exc.failures
        done[way] = (out, result)
    return done


def test_validate_in_pieces_writes_the_bytes_and_stats_of_reading_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write(reviews(), tmp_path / "data.csv")
    ingest.run(
        params.load(write_params(tmp_path, {"ingest.source": str(source)})),
        tmp_path / "raw",
        tmp_path / "ingest.json",
    )
    done = validate_both_ways(tmp_path, monkeypatch, tmp_path / "raw")
    (whole, whole_stats), (pieces, pieces_stats) = done["whole"], done["pieces"]
    assert pieces_stats == whole_stats
    assert whole_stats["splits"]["train"]["rows"] > 200
    for name in (*(f"{split}.parquet" for split in SPLITS), "labels.json"):
        assert (pieces / name).read_bytes() == (whole / name).read_bytes(), name


def test_validate_in_pieces_finds_what_reading_whole_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeats, near-repeats and leaks that lie in different pieces, a wrong label, missing and
    blank texts and a class missing from a split: the same failures, at the same source rows."""
    df = reviews(300).drop(columns=["rating"])
    df = df.assign(source_file="data.csv", source_row=range(1, len(df) + 1))
    train, validation, test = df.iloc[:200].copy(), df.iloc[200:250].copy(), df.iloc[250:].copy()
    train.loc[train.index[150], "text"] = train["text"].iloc[3]  # a repeat, 147 rows later
    train.loc[train.index[120], "text"] = train["text"].iloc[7].upper() + " "  # a near-repeat
    train.loc[train.index[60], "text"] = None
    train.loc[train.index[70], "text"] = "   "
    test.loc[test.index[40], "text"] = train["text"].iloc[100]  # leaks from train
    test.loc[test.index[10], "category"] = "meh"  # outside train's labels
    validation["category"] = "fresh"  # one class only: rotten is missing
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, frame in (("train", train), ("validation", validation), ("test", test)):
        frame.reset_index(drop=True).to_parquet(raw / f"{name}.parquet", index=False)
    done = validate_both_ways(tmp_path, monkeypatch, raw)

    def ordered(failures: object) -> list[tuple]:
        assert isinstance(failures, list)
        return sorted(
            (str(f["file"]), f["row"] or 0, f["column"], f["reason"], str(f["value"]))
            for f in failures
        )

    found = ordered(done["pieces"][1])
    assert found == ordered(done["whole"][1])
    reasons = {(row, reason.split(":")[0].split(" [")[0]) for _, row, _, reason, _ in found}
    assert {
        (151, "duplicate text"),
        (121, "near-duplicate text"),
        (261, "label outside the label set"),
        (61, "missing value (null)"),
        (71, "empty or whitespace-only text"),
        (291, "leakage"),
        (0, "class missing"),
    } <= reasons
    assert not (tmp_path / "validated-pieces").exists()


def test_tokenize_in_pieces_saves_the_bytes_of_reading_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long texts cut into windows, so that `doc` numbers texts across pieces."""
    df = reviews()
    df.loc[df.index[::9], "text"] = df["text"].iloc[::9] + " and" + " a very long film" * 60
    source = write(df, tmp_path / "data.csv")
    p = params.load(
        write_params(
            tmp_path,
            {
                "ingest.source": str(source),
                "tokenize.batch_size": 16,
                "text-classification.strategy": "windows",
            },
        )
    )
    ingest.run(p, tmp_path / "raw", tmp_path / "ingest.json")
    validate.run(tmp_path / "raw", p, tmp_path / "val", tmp_path / "v.json", tmp_path / "f.json")
    done = {}
    for way, streams, rows in (("whole", False, tokenize_data.CHUNK_ROWS), ("pieces", True, 37)):
        monkeypatch.setattr(TextClassification, "streams", streams)
        monkeypatch.setattr(tokenize_data, "CHUNK_ROWS", rows)
        out = tmp_path / f"tok-{way}"
        done[way] = (out, tokenize_data.run(tmp_path / "val", p, out, tmp_path / f"{way}.json"))
    (whole, whole_stats), (pieces, pieces_stats) = done["whole"], done["pieces"]
    assert pieces_stats == whole_stats
    assert whole_stats["splits"]["train"]["windows"] > whole_stats["splits"]["train"]["rows"]

    def names(folder: Path) -> list[Path]:
        return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())

    files = names(whole)
    assert files == names(pieces)
    for name in files:
        assert (pieces / name).read_bytes() == (whole / name).read_bytes(), name
    assert not list(tmp_path.glob(".tok-pieces.spool.*"))  # the scratch files are gone
