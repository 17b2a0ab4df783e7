"""Token classification: input formats, tag schemes, alignment, windows, metrics and spans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_sentences, write_params, write_splits

from bertrt.decoding import ARGMAX, VITERBI, Decoder, invalid_steps
from bertrt.predictors.token_classification import Token, group, word_units
from pipeline.core import params
from pipeline.core.tables import TableError
from pipeline.stages import ingest, validate
from pipeline.tasks.token_classification import tagger, tagging
from pipeline.tasks.token_classification.metrics import (
    Scores,
    seqeval_scores,
    spans,
    word_positions,
)

NER = {
    "base.task": "token-classification",
    "base.text_column": "tokens",
    "base.label_column": "tags",
    "ingest.group_column": "",
    "ingest.drop_labels": [],
}


# --- tag schemes ---------------------------------------------------------------------------

SCHEMES = [
    ("iob2", ["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),
    ("iob1", ["I-PER", "I-PER", "O", "I-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),
    ("iob1", ["I-PER", "B-PER", "I-LOC"], ["B-PER", "B-PER", "B-LOC"]),
    (
        "bioes",
        ["B-PER", "I-PER", "E-PER", "S-LOC", "O"],
        ["B-PER", "I-PER", "I-PER", "B-LOC", "O"],
    ),
    ("bioes", ["B-ORG", "M-ORG", "E-ORG", "S-ORG"], ["B-ORG", "I-ORG", "I-ORG", "B-ORG"]),
]


@pytest.mark.parametrize(("scheme", "tags", "iob2"), SCHEMES)
def test_schemes_are_read_into_iob2(scheme: str, tags: list[str], iob2: list[str]) -> None:
    assert tagging.problems(tags, scheme) == []
    assert tagging.to_iob2(tags, scheme) == iob2


BROKEN = [
    ("iob2", ["O", "I-PER"], "I-PER after O: under IOB2 an entity starts with B-PER"),
    ("iob2", ["B-LOC", "I-PER"], "I-PER after B-LOC"),
    ("iob2", ["B-PER", "PER"], "tag 'PER' is not O or B/I-TYPE (iob2)"),
    ("iob2", ["S-PER"], "tag 'S-PER' is not O or B/I-TYPE"),
    ("bioes", ["O", "E-PER"], "E-PER after O: under BIOES an entity starts with B-/S-"),
    ("bioes", ["S-PER", "M-PER"], "M-PER after O"),
]


@pytest.mark.parametrize(("scheme", "tags", "reason"), BROKEN)
def test_broken_sequences_are_named(scheme: str, tags: list[str], reason: str) -> None:
    found = tagging.problems(tags, scheme)
    assert found and reason in found[0][1]


# --- reading -------------------------------------------------------------------------------


def test_conll_reader_skips_docstart_extra_columns_and_blank_runs(tmp_path: Path) -> None:
    path = tmp_path / "train.conll"
    path.write_text(
        "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
        "Peter\tB-PER\r\nBlackburn\tI-PER\r\n \t\n",
        encoding="utf-8",
    )
    df = tagging.read_conll(path)
    assert df["tokens"].tolist() == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert df["tags"].tolist() == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert df["line"].tolist() == [3, 7]


def _conll(text: str, name: str = "data.conll"):
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return path

    return make


def _folder(files: dict[str, str]):
    def make(folder: Path) -> Path:
        (folder / "splits").mkdir()
        for name, text in files.items():
            (folder / "splits" / name).write_text(text, encoding="utf-8")
        return folder / "splits"

    return make


def _gz(text: str):
    def make(folder: Path) -> Path:
        import gzip

        path = folder / "data.conll.gz"
        path.write_bytes(gzip.compress(text.encode("utf-8")))
        return path

    return make


GOOD = "EU\tB-ORG\nrejects\tO\n\nPeter\tB-PER\n"
BAD_SOURCES = [
    (_conll("EU B-ORG\nrejects\n"), "data.conll, line 2: 'rejects' has no tag"),
    (_conll("EU B-ORG\n\nB-PER\n"), "data.conll, line 3: 'B-PER' has no tag"),
    (_conll(b"EU B-ORG\n\xff\xfe O\n"), "data.conll, line 2: not UTF-8"),
    (_conll(b"\xef\xbb\xbf\xc3\x28 O\n"), "data.conll, line 1: not UTF-8"),
    (_gz("EU B-ORG\nrejects\n"), "data.conll.gz, line 2: 'rejects' has no tag"),
    (_conll(""), "data.conll: 0 rows left after cleaning (read 0"),
    (_conll("-DOCSTART- -X- O O\n\n"), "data.conll: 0 rows left after cleaning"),
    (_conll('{"words": ["a"], "tags": ["O"]}\n', "d.jsonl"), "no column 'tokens'"),
    (_conll('{"tokens": ["a"], "labels": ["O"]}\n', "d.jsonl"), "no column 'tags'"),
    (_conll('{"tokens": ["a"], "tags": ["O"]}\n{oops\n', "d.jsonl"), "cannot be read as jsonl"),
    (_folder({"train.txt": GOOD, "dev.txt": GOOD}), "no file for split(s) ['test']"),
    (_folder({"train.txt": GOOD, "a_train.txt": GOOD, "test.txt": GOOD}), "two files for split"),
]


@pytest.mark.parametrize(("make", "message"), BAD_SOURCES, ids=[m for _, m in BAD_SOURCES])
def test_bad_token_files_are_refused_at_ingest(tmp_path: Path, make, message: str) -> None:
    params_path = write_params(tmp_path, {**NER, "ingest.source": str(make(tmp_path))})
    with pytest.raises(TableError) as caught:
        ingest.run(params.load(params_path), tmp_path / "raw", tmp_path / "ingest.json")
    assert message in str(caught.value)
    assert not (tmp_path / "raw").exists()


def test_ingest_splits_a_conll_file_and_a_folder_without_validation(tmp_path: Path) -> None:
    rows = synthetic_sentences(60, seed=2)
    text = "\n\n".join(
        "\n".join(f"{w}\t{t}" for w, t in zip(r["tokens"], r["tags"], strict=True)) for r in rows
    )
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ner.txt").write_text(text + "\n", encoding="utf-8")
    params_path = write_params(tmp_path, {**NER, "ingest.source": str(tmp_path / "src/ner.txt")})
    result = ingest.run(params.load(params_path), tmp_path / "raw", tmp_path / "ingest.json")
    assert sum(result["rows"].values()) == 60
    assert set(result["labels"]["train"]) == {"PER", "LOC"}
    folder = tmp_path / "msra"
    folder.mkdir()
    (folder / "msra_train.txt").write_text(text + "\n", encoding="utf-8")
    (folder / "msra_test.txt").write_text(text.split("\n\n")[0] + "\n", encoding="utf-8")
    (folder / "msra.txt").write_text("ignored\tO\n", encoding="utf-8")
    params_path = write_params(tmp_path, {**NER, "ingest.source": str(folder)})
    result = ingest.run(params.load(params_path), tmp_path / "raw2", tmp_path / "ingest2.json")
    assert result["rows"]["test"] == 1
    # The test sentence is also in the train file: train loses it, the test file stays whole.
    assert result["dropped"]["train"]["also_in_a_later_split"] == 1
    assert result["rows"]["train"] + result["rows"]["validation"] == 59


# --- validate ------------------------------------------------------------------------------


def _splits() -> dict[str, list[dict]]:
    rows = synthetic_sentences(40, seed=3)
    for i, row in enumerate(rows):
        row["line"] = 10 * i + 1
    return {"train": rows[:24], "validation": rows[24:32], "test": rows[32:]}


def _change(split: str, row: int, tokens: object, tags: object):
    def apply(splits: dict) -> None:
        splits[split][row].update(tokens=tokens, tags=tags)

    return apply


def _leak(splits: dict) -> None:
    splits["test"][0] = {**splits["train"][0], "line": 999}


def _no_loc(splits: dict) -> None:
    for row in splits["validation"]:
        row["tags"] = ["O"] * len(row["tags"])


TWO = ["the", "film"]
BAD_DATA = [
    (_change("train", 0, TWO, ["O"]), "line 1 column tags", "2 tokens but 1 tags"),
    (_change("train", 1, [], []), "line 11 column tokens", "empty sentence"),
    (_change("train", 2, ["the", ""], ["O", "O"]), "line 21 column tokens", "token 2 is empty"),
    (_change("train", 2, ["a b", "x"], ["O", "O"]), "line 21", "token 1 contains whitespace"),
    (_change("validation", 0, TWO, ["O", "I-PER"]), "line 241", "I-PER after O"),
    (_change("test", 1, TWO, ["O", "B-XYZ"]), "(whole split)", "entity types ['XYZ']"),
    (_change("test", 1, TWO, ["O", "PERSON"]), "line 331", "tag 'PERSON' is not O"),
    (_change("train", 3, None, ["O"]), "line 31", "tokens must be a list"),
    (_change("train", 3, TWO, None), "line 31", "tags must be a list"),
    (_leak, "line 999 column tokens", "leakage: the same sentence is also in split 'train'"),
    (_no_loc, "(whole split)", "split 'validation' has no ['LOC', 'PER']"),
]


@pytest.mark.parametrize(("damage", "where", "reason"), BAD_DATA, ids=[b[2] for b in BAD_DATA])
def test_bad_token_data_is_refused_with_file_line_and_reason(
    tmp_path: Path, tiny_model_dir: Path, damage, where: str, reason: str
) -> None:
    splits = _splits()
    damage(splits)
    raw = write_splits(tmp_path / "raw", {k: pd.DataFrame(v) for k, v in splits.items()})
    params_path = write_params(tmp_path, {**NER, "base.model": str(tiny_model_dir)})
    with pytest.raises(validate.ValidationFailed) as caught:
        validate.run(
            raw,
            params.load(params_path),
            tmp_path / "out",
            tmp_path / "v.json",
            tmp_path / "f.json",
        )
    message = str(caught.value)
    assert reason in message and where in message, message
    assert not (tmp_path / "out").exists()
    listed = json.loads((tmp_path / "f.json").read_text())["failures"]
    assert any(reason in f["reason"] for f in listed)


def test_bmes_input_is_validated_and_written_as_iob2(tmp_path: Path, tiny_model_dir: Path) -> None:
    splits = _splits()
    for rows in splits.values():
        for row in rows:
            row["tags"] = [
                {"B": "B", "I": "M"}.get(t[0], t[0]) + t[1:] if t != "O" else t
                for t in row["tags"]
            ]
            # A one-word entity is S- in BMES, a multi-word one ends with E-.
            fixed = []
            for i, tag in enumerate(row["tags"]):
                nxt = row["tags"][i + 1] if i + 1 < len(row["tags"]) else "O"
                ends = tag != "O" and not nxt.startswith("M-")
                fixed.append(("S" if tag[0] == "B" else "E") + tag[1:] if ends else tag)
            row["tags"] = fixed
    raw = write_splits(tmp_path / "raw", splits)
    params_path = write_params(
        tmp_path, {**NER, "base.model": str(tiny_model_dir), "validate.tag_scheme": "bioes"}
    )
    validate.run(
        raw, params.load(params_path), tmp_path / "out", tmp_path / "v.json", tmp_path / "f.json"
    )
    out = pd.read_parquet(tmp_path / "out" / "train.parquet")
    expected = [r["tags"] for r in synthetic_sentences(40, seed=3)[:24]]
    assert [list(t) for t in out["tags"]] == expected
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == [
        "O",
        "B-LOC",
        "I-LOC",
        "B-PER",
        "I-PER",
    ]


# --- alignment, windows and metrics ----------------------------------------------------------


def test_first_subword_carries_the_label_and_windows_cover_every_word(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    from pipeline import tasks
    from pipeline.core import params

    task = tasks.get("token-classification")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    labels = ["O", "B-PER", "I-PER"]
    rows = {"tokens": [["the", "zork", "film", "xq"]], "tags": [["O", "B-PER", "I-PER", "O"]]}
    for all_subwords, expected in (
        # [CLS] the z ##o ##r ##k film x ##q [SEP]
        (False, [-100, 0, 1, -100, -100, -100, 2, 0, -100, -100]),
        (True, [-100, 0, 1, 2, 2, 2, 2, 0, 0, -100]),
    ):
        path = write_params(
            tmp_path,
            {
                **NER,
                "base.max_length": 64,
                "token-classification.label_all_subwords": all_subwords,
            },
        )
        p = params.load(path, "base", "tokenize", params.TASK_SECTION)
        from datasets import Dataset

        out, _ = task.tokenize(Dataset.from_dict(rows), tokenizer, labels, p, "fp")
        assert out["labels"][0] == expected
    # max_length 8: 6 content tokens per window, 2 shared: every word is in some window.
    path = write_params(tmp_path, {**NER, "base.max_length": 8, "token-classification.stride": 2})
    p = params.load(path, "base", "tokenize", params.TASK_SECTION)
    out, stats = task.tokenize(Dataset.from_dict(rows), tokenizer, labels, p, "fp")
    assert stats["windows"] == len(out) > 1 and stats["rows_split_into_windows"] == 1
    assert set(out["example_id"]) == {0}
    seen = {w for words in out["word_ids"] for w in words if w >= 0}
    assert seen == {0, 1, 2, 3}


def test_window_merge_takes_each_word_from_its_most_central_window() -> None:
    # Two windows over words 0..3: window 0 sees 0,1,2 ; window 1 sees 1,2,3.
    word_ids = [[-1, 0, 1, 2, -1], [-1, 1, 2, 3, -1]]
    (merged,) = word_positions(word_ids, [0, 0], 1)
    # Word 1 is central in window 0 (context 1 vs 0); word 2 is central in window 1.
    assert merged == {0: (0, 1), 1: (0, 2), 2: (1, 2), 3: (1, 3)}


def test_seqeval_scores_on_a_known_case() -> None:
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    guess = [["B-PER", "I-PER", "O", "O"], ["B-PER", "O"]]
    scores = seqeval_scores(truth, guess)
    # 3 true entities, 2 predicted, 1 right: P 1/2, R 1/3, F1 0.4.
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4)
    assert scores["per_type"]["PER"]["f1"] == pytest.approx(2 / 3)
    assert scores["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # Strict IOB2, as seqeval counts: a stray I- opens no entity.
    assert spans(["O", "I-PER", "I-PER", "B-PER"]) == {(3, 4, "PER")}


# --- runtime spans -------------------------------------------------------------------------


def test_word_aggregations_on_subwords_and_punctuation() -> None:
    text = "Paris."
    offsets = np.array([[0, 3], [3, 5], [5, 6]])  # Par ##is .
    words = np.array([0, 0, 1])
    labels = ["O", "B-LOC", "I-LOC"]
    scores = np.array([[0.1, 0.6, 0.3], [0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    first = word_units(text, offsets, scores, words, labels, "first")
    assert [(u.text, u.tag) for u in first] == [("Paris", "B-LOC"), (".", "O")]
    assert first[0].score == pytest.approx(0.6)
    most = word_units(text, offsets, scores, words, labels, "max")  # ##is is most confident
    assert (most[0].text, most[0].tag, most[0].score) == ("Paris", "O", pytest.approx(0.9))
    mean = word_units(text, offsets, scores, words, labels, "average")
    assert mean[0].tag == "O" and mean[0].score == pytest.approx(0.5)
    assert [e.text for e in group(first, text)] == ["Paris"]


def test_grouping_follows_iob2() -> None:
    text = "Bob Stone met Ann in Rome"
    units = [
        Token("Bob", "B-PER", 0.9, 0, 3),
        Token("Stone", "I-PER", 0.7, 4, 9),
        Token("met", "O", 0.9, 10, 13),
        Token("Ann", "B-PER", 0.8, 14, 17),
        Token("in", "O", 0.9, 18, 20),
        Token("Rome", "I-LOC", 0.6, 21, 25),  # I- with no B-: still an entity, as seqeval reads
    ]
    entities = group(units, text)
    assert [(e.type, e.text, e.start, e.end) for e in entities] == [
        ("PER", "Bob Stone", 0, 9),
        ("PER", "Ann", 14, 17),
        ("LOC", "Rome", 21, 25),
    ]
    assert entities[0].score == pytest.approx(0.8)


SPAN_TEXTS = [
    "alice  went\tto   paris",
    "诸葛亮 在 成都",
    "bob 🙂 stone 🚀🚀 oslo",
    "the film the film the film the film the film alice the film paris",
    "",
    "   ",
]


def test_runtime_offsets_point_into_the_original_strings(ner_dir: Path) -> None:
    import bertrt

    model = bertrt.load(ner_dir, device="cpu")
    assert model.task == "token-classification"
    for aggregation in ("simple", "first", "max", "average"):
        results = model.predict(SPAN_TEXTS, aggregation=aggregation, tokens=True)
        for text, result in zip(SPAN_TEXTS, results, strict=True):
            for token in result.tokens:
                assert text[token.start : token.end] == token.text and token.text.strip()
            for entity in result.entities:
                assert text[entity.start : entity.end] == entity.text
                assert 0.0 < entity.score <= 1.0
                assert entity.type in {"PER", "LOC"}
    # A text longer than the 8-token window: every word is still tagged once, in order.
    long = SPAN_TEXTS[3]
    (result,) = model.predict([long], tokens=True)
    starts = [t.start for t in result.tokens]
    assert starts == sorted(set(starts))
    assert "".join(t.text for t in result.tokens) == long.replace(" ", "")


def test_runtime_reads_each_token_once_across_windows(ner_dir: Path) -> None:
    """A text of 20 words over windows of 6 content tokens sharing 2: each word once, in order."""
    import bertrt

    model = bertrt.load(ner_dir, device="cpu")
    text = "the film story plot"  # whole words of the tiny vocabulary, one window
    (short,) = model.predict([text], tokens=True)
    assert [t.text for t in short.tokens] == ["the", "film", "story", "plot"]
    (long,) = model.predict([" ".join([text] * 5)], tokens=True)
    assert [t.text for t in long.tokens] == text.split() * 5


# --- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"token-classification.decoding": "beam"}, "decoding: 'beam' is not one of"),
        (
            {"token-classification.crf": True, "token-classification.decoding": "argmax"},
            "set token-classification.decoding: viterbi",
        ),
        (
            {"token-classification.crf": True, "token-classification.label_all_subwords": True},
            "set token-classification.label_all_subwords: false",
        ),
    ],
)
def test_decoding_params_refuse_what_cannot_be_decoded(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(params.ParamsError, match=message):
        params.load(write_params(tmp_path, {**NER, **overrides}))


def _config(folder: Path, **recorded: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    labels = {"0": "O", "1": "B-PER", "2": "I-PER"}
    (folder / "config.json").write_text(json.dumps({"id2label": labels, **recorded}))
    return folder


def _tagging(decoding: str, crf: bool) -> params.Tagging:
    return params.Tagging(
        stride=0, label_all_subwords=False, decoding=decoding, crf=crf, crf_learning_rate=5e-3
    )


def test_the_model_records_its_decoding_and_params_must_agree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    section = _tagging(VITERBI, crf=False)
    recorded = _config(tmp_path / "a", decoding=VITERBI, crf=False)
    tagger.check_params(recorded, section)
    assert tagger.model_decoder(recorded).mode == VITERBI
    argmax = _tagging(ARGMAX, crf=False)
    with pytest.raises(
        ValueError, match="fine-tuned with decoding 'viterbi'.*re-run the finetune"
    ):
        tagger.check_params(recorded, argmax)
    older = _config(tmp_path / "b")  # fine-tuned before the decoding was recorded
    assert tagger.model_decoder(older).mode == ARGMAX
    tagger.check_params(older, section)
    assert "records no decoding" in caplog.text
    crf = _tagging(VITERBI, crf=True)
    with pytest.raises(ValueError, match="has no CRF head"):
        tagger.check_params(older, crf)
    with pytest.raises(FileNotFoundError, match="transitions.json: missing"):
        tagger.model_decoder(_config(tmp_path / "c", decoding=VITERBI, crf=True))


def _evaluated(tmp_path: Path, decoder: Decoder | None) -> dict:
    """The task's evaluate on two sentences whose word scores argmax reads as I- after O."""
    from pipeline import tasks

    labels = ["O", "B-PER", "I-PER"]
    test = pd.DataFrame(
        {
            "tokens": [["bob", "stone", "met"], ["ann", "left", "x", "y"]],
            "tags": [["B-PER", "I-PER", "O"], ["B-PER", "O", "O", "O"]],
            "line": [1, 5],
        }
    )
    # Window 0: sentence 0 in one window; windows 1 and 2: sentence 1 cut in two.
    word_ids = [[-1, 0, 1, 2, -1], [-1, 0, 1, 2, -1], [-1, 2, 3, -1, -1]]
    dataset = {"word_ids": word_ids, "example_id": [0, 1, 1], "labels": []}
    logits = np.full((3, 5, 3), -100.0)
    probs = [[0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.9, 0.05, 0.05]]  # O?I I O: argmax I- first
    logits[0, 1:4] = np.log(probs)
    logits[1, 1:4] = np.log([[0.1, 0.8, 0.1], [0.6, 0.1, 0.3], [0.7, 0.1, 0.2]])
    # Word 2 is read from window 1 (as central there as here), word 3 from here.
    logits[2, 1:3] = np.log([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    dataset["labels"] = [[-100, 1, 2, 0, -100], [-100, 1, 0, 0, -100], [-100, 0, 0, -100, -100]]
    outputs = logits if decoder is None else Scores(logits, decoder)
    p = params.load(write_params(tmp_path, NER))
    plots = tmp_path / "plots"
    plots.mkdir(exist_ok=True)
    task = tasks.get("token-classification")
    return task.evaluate(outputs, dataset, test, labels, p, plots, lambda: (outputs, dataset))


def test_evaluate_reports_argmax_and_viterbi_on_the_same_scores(tmp_path: Path) -> None:
    result = _evaluated(tmp_path, Decoder(("O", "B-PER", "I-PER"), VITERBI))
    by = result["decoding"]
    # Argmax: [I-PER, I-PER, O] (no entity, strictly) and [B-PER, O, O, O]: 1 of 2 found.
    assert by["argmax"]["invalid_sequences"] == 1 and by["argmax"]["recall"] == 0.5
    # Viterbi: [B-PER, I-PER, O] and [B-PER, O, O, O]: both.
    assert by["viterbi"]["invalid_sequences"] == 0 and by["viterbi"]["f1"] == 1.0
    assert (by["viterbi"]["shipped"], by["argmax"]["shipped"]) == (1, 0)
    assert (by["argmax"]["f1_PER"], by["viterbi"]["f1_PER"]) == (pytest.approx(2 / 3), 1.0)
    assert result["overall"]["f1"] == 1.0 and result["overall"]["invalid_sequences"] == 0
    assert result["validation"] == {"argmax_f1": pytest.approx(2 / 3), "viterbi_f1": 1.0}
    # Scores that do not say how they decode are read by argmax, as before.
    plain = _evaluated(tmp_path, None)
    assert plain["overall"]["recall"] == 0.5 and plain["decoding"]["argmax"]["shipped"] == 1


@pytest.fixture(scope="module")
def ner_viterbi_dir(tmp_path_factory: pytest.TempPathFactory, ner_dir: Path) -> Path:
    """ner_dir's fine-tuned model recorded as decoded by Viterbi, exported the same way."""
    from pipeline import tasks
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    root = tmp_path_factory.mktemp("ner-viterbi")
    shutil.copytree(ner_dir.parent / "ft", root / "ft")
    config = json.loads((root / "ft" / "config.json").read_text())
    (root / "ft" / "config.json").write_text(json.dumps({**config, "decoding": VITERBI}))
    texts = [" ".join(r["tokens"]) for r in synthetic_sentences(24, seed=9)]
    task = tasks.get("token-classification")
    model_folder.build(root / "ft", root / "onnx", task, texts, ExportOptions(8, window_stride=2))
    return root / "onnx"


def test_runtime_decodes_words_as_the_manifest_says(ner_dir: Path, ner_viterbi_dir: Path) -> None:
    import bertrt

    assert json.loads((ner_dir / "manifest.json").read_text())["decoding"] == ARGMAX
    assert json.loads((ner_viterbi_dir / "manifest.json").read_text())["decoding"] == VITERBI
    argmax, viterbi = (bertrt.load(d, device="cpu") for d in (ner_dir, ner_viterbi_dir))
    assert viterbi.metadata()["decoding"] == VITERBI
    texts = [" ".join(r["tokens"]) for r in synthetic_sentences(30, seed=2)] + SPAN_TEXTS
    texts.append(" ".join(["alice went to paris"] * 6))  # read in windows, decoded after
    broken = 0
    for text, plain, constrained, scored in zip(
        texts,
        argmax.predict(texts, aggregation="first", tokens=True),
        viterbi.predict(texts, tokens=True),
        argmax.token_scores(texts),
        strict=True,
    ):
        assert constrained.tokens == plain.tokens  # every token's own tag is unchanged
        offsets, scores, words = scored
        units = word_units(text, offsets, scores, words, argmax.labels, "first")
        broken += invalid_steps([u.tag for u in units]) > 0
        # The runtime's Viterbi is the shared decoder over the words' first-token scores.
        decoded = word_units(text, offsets, scores, words, argmax.labels, "first", viterbi.decoder)
        assert invalid_steps([u.tag for u in decoded]) == 0
        assert constrained.entities == group(decoded, text)
    assert broken >= 5  # the random head breaks IOB2 often enough to be decoded differently


# --- vocabulary extension ------------------------------------------------------------------

CHINESE = ["王", "小", "明", "在", "北", "京", "上", "海", "工", "作", "住"]


def chinese_sentences(n: int, seed: int = 0) -> list[dict]:
    """Character-level sentences: a PER name, then a LOC, in characters the tiny vocab lacks."""
    import random

    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        name = ["王", *rng.sample(["小", "明", "海"], rng.randint(1, 2))]
        place = rng.choice([["北", "京"], ["上", "海"]])
        verb = rng.choice([["在"], ["住", "在"]])
        tokens = name + verb + place + rng.sample(["工", "作", "the", "film"], 2)
        tags = ["B-PER"] + ["I-PER"] * (len(name) - 1) + ["O"] * len(verb)
        tags += ["B-LOC", "I-LOC", "O", "O"]
        if "".join(tokens) not in seen:
            seen.add("".join(tokens))
            rows.append({"tokens": tokens, "tags": tags})
    return rows


@pytest.mark.slow
def test_unknown_characters_join_the_vocabulary_and_the_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoConfig

    from pipeline.stages import finetune, tokenize_data

    rows = chinese_sentences(40, seed=1)
    raw = write_splits(
        tmp_path / "raw", {"train": rows[:24], "validation": rows[24:32], "test": rows[32:]}
    )
    params_path = write_params(
        tmp_path,
        {
            **NER,
            "base.model": str(tiny_model_dir),
            "tokenize.vocab_extension_min_count": 2,
            "finetune.epochs": 1,
            "finetune.batch_size": 8,
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment": "vocab",
        },
    )
    validate.run(
        raw, params.load(params_path), tmp_path / "val", tmp_path / "v.json", tmp_path / "f.json"
    )
    stats = tokenize_data.run(
        tmp_path / "val", params.load(params_path), tmp_path / "tok", tmp_path / "t.json"
    )
    vocab = stats["vocabulary"]
    # Every Chinese character of train occurs at least twice; none is in the tiny vocabulary.
    assert vocab["unk_rate_before"] > 0.5 and vocab["unk_rate_after"] == 0.0
    assert vocab["added_tokens"] == len({c for r in rows[:24] for c in r["tokens"]} & set(CHINESE))
    assert stats["splits"]["test"]["unk_rate"] == 0.0
    summary = finetune.run(
        tmp_path / "tok",
        tmp_path / "val",
        params.load(params_path),
        tmp_path / "ft",
        tmp_path / "ck",
        tmp_path / "train.json",
        tmp_path / "curves",
    )
    config = AutoConfig.from_pretrained(tmp_path / "ft")
    assert summary["added_tokens"] == vocab["added_tokens"]
    assert config.vocab_size == summary["vocab_size"] == vocab["vocab_size"]
