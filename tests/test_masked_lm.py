"""Fill-mask: corpus formats and their bad inputs, probes, masking statistics, perplexity and
probe accuracy, knowledge injection on a tiny model, and the runtime's fills."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_reviews, write_params, write_splits

from pipeline.core import params
from pipeline.core.tables import SPLITS, TableError
from pipeline.stages import ingest, tokenize_data, validate
from pipeline.tasks import get
from pipeline.tasks.masked_lm import task as masked_lm_task
from pipeline.tasks.masked_lm.corpus import read_corpus, read_probes, strip_tags, with_mask_token
from pipeline.tasks.masked_lm.masks import MaskingCollator, find_spans, salient_ids, word_offsets
from pipeline.tasks.masked_lm.scoring import heldout_scores, perplexity, probe_fills

TASK = "fill-mask"


def mlm_params(folder: Path, model: Path, **overrides: object) -> Path:
    values = {
        "base.task": TASK,
        "base.model": str(model),
        "base.text_column": "text",
        "base.max_length": 16,
        "ingest.group_column": "",
        "ingest.drop_labels": [],
        "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}",
    }
    return write_params(folder, {**values, **overrides})


def lines(n: int, seed: int = 0) -> list[str]:
    return [r["text"] for r in synthetic_reviews(n, seed)]


# --- input formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["txt", "folder", "csv", "jsonl", "parquet"])
def test_every_corpus_format_is_read(tmp_path: Path, tiny_model_dir: Path, kind: str) -> None:
    texts = lines(40)
    if kind == "txt":
        source = tmp_path / "corpus.txt"
        source.write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    elif kind == "folder":
        source = tmp_path / "books"
        (source / "more").mkdir(parents=True)
        (source / "a.txt").write_text("\n".join(texts[:20]), encoding="utf-8")
        (source / "more" / "b.txt").write_text("\n".join(texts[20:]), encoding="utf-8")
        (source / "notes.md").write_text("not read", encoding="utf-8")
    else:
        source = tmp_path / f"corpus.{kind}"
        frame = pd.DataFrame({"text": texts, "other": 1})
        if kind == "csv":
            frame.to_csv(source, index=False)
        elif kind == "jsonl":
            frame.to_json(source, orient="records", lines=True)
        else:
            frame.to_parquet(source)
    p = mlm_params(tmp_path, tiny_model_dir, **{"ingest.source": str(source)})
    report = ingest.run(params.load(p), tmp_path / "raw", tmp_path / "ingest.json")
    assert sum(report["rows"].values()) == 40
    if kind == "txt":
        assert report["dropped"]["all"]["empty_text"] == 1


def test_rehearsal_sources_join_train_only_a_seeded_sample_of_each(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    corpus, old, older = tmp_path / "new.txt", tmp_path / "old.txt", tmp_path / "older.csv"
    corpus.write_text("\n".join(lines(40)), encoding="utf-8")
    old.write_text("\n".join(f"old text number {i}" for i in range(50)), encoding="utf-8")
    pd.DataFrame({"text": [f"older line {i}" for i in range(30)]}).to_csv(older, index=False)
    p = mlm_params(
        tmp_path,
        tiny_model_dir,
        **{
            "ingest.source": str(corpus),
            "ingest.rehearsal": [str(old), str(older)],
            "ingest.rehearsal_rows": 10,
        },
    )
    report = ingest.run(params.load(p), tmp_path / "raw", tmp_path / "ingest.json")
    assert report["rows_in"]["rehearsal[0]"] == 50 and report["rows_in"]["rehearsal[1]"] == 30
    frames = {s: pd.read_parquet(tmp_path / "raw" / f"{s}.parquet") for s in SPLITS}
    train = frames["train"]["text"]
    assert train.str.startswith("old text").sum() == 10
    assert train.str.startswith("older line").sum() == 10
    for split in ("validation", "test"):
        assert not frames[split]["text"].str.startswith(("old text", "older line")).any(), split
    assert sum(report["rows"].values()) == 40 + 20
    again = ingest.run(params.load(p), tmp_path / "raw2", tmp_path / "ingest2.json")
    assert again == report, "the samples are seeded"


def test_a_corpus_of_facts_validated_on_train_loses_none_of_its_sentences(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    corpus, heldout, old = tmp_path / "facts.txt", tmp_path / "other.txt", tmp_path / "old.txt"
    facts = [f"fact number {i} is stated once" for i in range(30)]
    corpus.write_text("\n".join(facts), encoding="utf-8")
    heldout.write_text("\n".join(lines(20)), encoding="utf-8")
    old.write_text("\n".join(f"old text number {i}" for i in range(50)), encoding="utf-8")
    values = {
        "ingest.source": str(corpus),
        "ingest.heldout": str(heldout),
        "ingest.rehearsal": [str(old)],
        "ingest.rehearsal_rows": 10,
    }
    cut = tmp_path / "cut"
    cut.mkdir()
    ingest.run(params.load(mlm_params(cut, tiny_model_dir, **values)), cut / "raw", cut / "r.json")
    cut_train = pd.read_parquet(cut / "raw" / "train.parquet")["text"]
    assert set(facts) - set(cut_train), "the default cut holds sentences out of train"

    p = mlm_params(tmp_path, tiny_model_dir, **values, **{"ingest.validate_on_train": True})
    ingest.run(params.load(p), tmp_path / "raw", tmp_path / "ingest.json")
    frames = {s: pd.read_parquet(tmp_path / "raw" / f"{s}.parquet") for s in SPLITS}
    train = frames["train"]["text"]
    assert set(facts) <= set(train) and train.str.startswith("old text").sum() == 10
    assert sorted(frames["validation"]["text"]) == sorted(facts)  # the facts, not the rehearsal
    assert not set(facts) & set(frames["test"]["text"])


def test_a_classifier_is_not_validated_on_its_training_rows(tmp_path: Path) -> None:
    source = tmp_path / "reviews.csv"
    pd.DataFrame(synthetic_reviews(60, 0)).to_csv(source, index=False)
    p = write_params(tmp_path, {"ingest.source": str(source), "ingest.validate_on_train": True})
    with pytest.raises(params.ParamsError, match="ingest.validate_on_train: text-classification"):
        ingest.run(params.load(p), tmp_path / "raw", tmp_path / "ingest.json")
    assert not (tmp_path / "raw").exists()


def test_people_s_daily_word_pos_lines_become_plain_text(tmp_path: Path) -> None:
    line = "迈向/v  充满/v  希望/n  的/u  [中国/ns  政府/n]nt  。/w"
    assert strip_tags(line) == "迈向充满希望的中国政府。"
    plain = "诸葛涛是三国时期的一位名将。"
    review = "前台的check in/check out都很快."  # one slash-word is not a tagged line
    (tmp_path / "pd.txt").write_text(
        f"{line}\n１２月/t  ３１日/t\n{plain}\n{review}\n", encoding="utf-8"
    )
    df = read_corpus(tmp_path / "pd.txt", "text", "word_pos")
    assert df["text"].tolist() == ["迈向充满希望的中国政府。", "１２月３１日", plain, review]


BAD_CORPORA = [
    ("empty_folder", "a folder with no .txt files"),
    ("latin1.txt", "not UTF-8 at line 1"),
    ("no_column.csv", "no column 'text' (set by base.text_column)"),
    ("corpus.docx", "unsupported file type"),
]


@pytest.mark.parametrize(("name", "message"), BAD_CORPORA)
def test_bad_corpora_name_the_file_and_the_fix(
    tmp_path: Path, tiny_model_dir: Path, name: str, message: str
) -> None:
    source = tmp_path / name
    if name == "empty_folder":
        source.mkdir()
    elif name.endswith(".txt"):
        source.write_bytes("caf\xe9 noir\n".encode("latin-1"))
    elif name.endswith(".csv"):
        pd.DataFrame({"body": ["a", "b", "c"]}).to_csv(source, index=False)
    else:
        source.write_bytes(b"PK\x03\x04")
    p = mlm_params(tmp_path, tiny_model_dir, **{"ingest.source": str(source)})
    with pytest.raises(TableError, match=re.escape(message)) as err:
        ingest.run(params.load(p), tmp_path / "raw", tmp_path / "ingest.json")
    assert str(source) in str(err.value)
    assert not (tmp_path / "raw").exists()


BAD_PROBES = [
    ('{"text": "no answer here [MASK]"}', "line 1: give"),
    ("not json", "line 1: not JSON"),
    ("", "no probes"),
    ('{"text": "the [MASK]", "answer": "film", "kind": 3}', "line 1: 'kind' must be a string"),
    ('{"text": "the [MASK]", "answer": " "}', "line 1: empty answer"),
]


@pytest.mark.parametrize(("content", "message"), BAD_PROBES)
def test_bad_probe_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TableError, match=message):
        read_probes(path)


def test_probe_kinds_and_avoided_text_are_read_and_default_to_empty(tmp_path: Path) -> None:
    path = tmp_path / "probes.jsonl"
    rows = [
        {"text": "the [MASK] was good", "answer": "film", "kind": "name"},
        {"text": "a [MASK] plot", "answer": "dull", "kind": "control", "avoid": "film"},
        {"text": "[MASK] again", "answer": "film"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    table = read_probes(path)
    assert table["kind"].tolist() == ["name", "control", ""]
    assert table["avoid"].tolist() == ["", "film", ""]
    assert table["line"].tolist() == [1, 2, 3]


def test_probe_groups_count_beam_fills_per_kind_and_fills_that_bring_in_avoided_text() -> None:
    probes = pd.DataFrame(
        {
            "text": ["a", "b", "c", "d", "e"],
            "answer": ["诸葛涛", "李青", "李白", "北京", "波涛"],
            "kind": ["name", "fact", "control", "control", "control"],
            "avoid": ["", "", "诸葛涛", "诸葛涛", "诸葛涛"],
        }
    )
    after = ["诸葛涛", "李涛", "李涛", "北京", "波涛"]  # 涛 is in 波涛's own answer: allowed
    before = ["诸兵", "李青", "李白", "北京", "大海"]
    fills = [{"beam": f, "beam_ok": f == a} for f, a in zip(after, probes["answer"], strict=True)]
    was = [{"beam": f, "beam_ok": f == a} for f, a in zip(before, probes["answer"], strict=True)]
    groups = masked_lm_task.probe_groups(probes, fills, was)
    assert groups == {
        "probes_control": 3,
        "probe_right_control": 2,
        "probe_right_control_before": 2,
        "probes_fact": 1,
        "probe_right_fact": 0,
        "probe_right_fact_before": 1,
        "probes_name": 1,
        "probe_right_name": 1,
        "probe_right_name_before": 0,
        "probes_guarded": 3,
        "probe_brings_in_avoided": 1,
        "probe_brings_in_avoided_before": 0,
    }


def test_the_mask_placeholder_becomes_the_model_s_own_token() -> None:
    texts = pd.Series(["三国时期的名将[MASK][MASK][MASK]擅长用兵。", "no mask"])
    assert with_mask_token(texts, "[MASK]") is texts
    assert with_mask_token(texts, "<mask>").tolist() == [
        "三国时期的名将<mask><mask><mask>擅长用兵。",
        "no mask",
    ]


# --- validate -----------------------------------------------------------------------------------
def validate_rows(tmp_path: Path, model: Path, test: list[dict], **overrides: object) -> Path:
    rows = [{"text": t, "answer": ""} for t in lines(60)]
    raw = write_splits(
        tmp_path / "raw", {"train": rows[:40], "validation": rows[40:50], "test": test}
    )
    p = mlm_params(tmp_path, model, **overrides)
    validate.run(
        raw, params.load(p), tmp_path / "validated", tmp_path / "v.json", tmp_path / "f.json"
    )
    return p


def test_probe_problems_are_listed_by_row(tmp_path: Path, tiny_model_dir: Path) -> None:
    test = [
        {"text": "the film was good", "answer": ""},
        {"text": "the film was good", "answer": "film"},  # no mask
        {"text": "the [MASK] [MASK] was good", "answer": "film"},  # two masks, one token
        {"text": "the [MASK] was good", "answer": "film"},  # fine
    ]
    with pytest.raises(validate.ValidationFailed) as err:
        validate_rows(tmp_path, tiny_model_dir, test)
    failures = err.value.failures
    assert [(f["row"], f["column"]) for f in failures] == [(2, "text"), (3, "answer")]
    assert "probe has no [MASK]" in failures[0]["reason"]
    assert "2 [MASK] but its answer is 1 token(s)" in failures[1]["reason"]


def test_an_empty_split_is_a_failure(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(validate.ValidationFailed, match="the test corpus has no text"):
        validate_rows(tmp_path, tiny_model_dir, [{"text": " ", "answer": ""}])


def test_long_lines_are_split_and_counted(tmp_path: Path, tiny_model_dir: Path) -> None:
    long = " ".join(["the film was good"] * 30)  # 539 characters
    test = [{"text": long, "answer": ""}, {"text": "a dull plot", "answer": ""}]
    validate_rows(tmp_path, tiny_model_dir, test, **{"validate.max_line_chars": 200})
    stats = json.loads((tmp_path / "v.json").read_text())["splits"]["test"]
    assert stats["lines_split"] == 1 and stats["pieces_added"] == 2 and stats["rows"] == 4
    table = pd.read_parquet(tmp_path / "validated" / "test.parquet")
    assert table["text"].str.len().max() <= 200
    assert " ".join(table["text"].iloc[:3]) == long


def test_an_answer_the_tokenizer_cannot_produce_stops_tokenize(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    test = [{"text": "the film was good", "answer": ""}, {"text": "the [MASK]", "answer": "€"}]
    p = validate_rows(tmp_path, tiny_model_dir, test)
    with pytest.raises(ValueError, match=r"probe 1 \(test split\).*\[UNK\]"):
        tokenize_data.run(
            tmp_path / "validated", params.load(p), tmp_path / "tok", tmp_path / "t.json"
        )
    assert not (tmp_path / "tok").exists()


# --- tokenize and masking -----------------------------------------------------------------------
def test_blocks_concatenate_lines_and_held_out_masks_are_fixed(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from datasets import load_from_disk

    test = [{"text": t, "answer": ""} for t in lines(30, seed=5)]
    p = validate_rows(tmp_path, tiny_model_dir, test, **{"tokenize.group_texts": True})
    stats = tokenize_data.run(
        tmp_path / "validated", params.load(p), tmp_path / "tok", tmp_path / "t.json"
    )
    data = load_from_disk(str(tmp_path / "tok"))
    train = data["train"]
    assert "labels" not in train.column_names  # masked on the fly while training
    assert all(len(ids) == 16 for ids in train["input_ids"][:-1])  # full blocks, last may be short
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in train["input_ids"])  # [CLS] ... [SEP]
    assert stats["splits"]["train"]["blocks"] == len(train) < stats["splits"]["train"]["rows"]
    masked = sum((np.asarray(x) != -100).sum() for x in data["test"]["labels"])
    assert masked == stats["splits"]["test"]["masked_tokens"] > 0
    again = tmp_path / "tok2"
    tokenize_data.run(tmp_path / "validated", params.load(p), again, tmp_path / "t2.json")
    assert load_from_disk(str(again))["test"]["input_ids"] == data["test"]["input_ids"]


def masking(**kw: object) -> params.Masking:
    values = {
        "probability": 0.15,
        "mask_replace_prob": 0.8,
        "random_replace_prob": 0.1,
        "whole_word": False,
        "segmenter": "",
        "user_words": "",
    }
    return params.Masking(**{**values, **kw})


def test_dynamic_masking_statistics_on_a_seeded_batch(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = np.random.default_rng(0)
    rows = [
        {
            "input_ids": [2, *rng.integers(50, 130, 30).tolist(), 3],
            "special_tokens_mask": [1, *[0] * 30, 1],
        }
        for _ in range(400)
    ]
    batch = MaskingCollator(tokenizer, masking(), seed=7)(rows)
    original = np.array([r["input_ids"] for r in rows])
    chosen = batch["labels"].numpy() != -100
    content = np.array([r["special_tokens_mask"] for r in rows]) == 0
    assert not (chosen & ~content).any()  # [CLS]/[SEP] are never chosen
    assert abs(chosen[content].mean() - 0.15) < 0.01
    got = batch["input_ids"].numpy()[chosen]
    to_mask = (got == tokenizer.mask_token_id).mean()
    kept = (got == original[chosen]).mean()
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03
    assert (batch["labels"].numpy()[chosen] == original[chosen]).all()


@pytest.mark.parametrize("probability", [1.0, 0.5])
def test_salient_words_are_masked_whole_that_often(
    tmp_path: Path, tiny_model_dir: Path, probability: float
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (tmp_path / "names.txt").write_text("clumsy\nbrilliant cast\n", encoding="utf-8")
    spans = salient_ids(tokenizer, str(tmp_path / "names.txt"))
    assert [len(s) for s in spans] == [2, 1]  # the longer one is matched first
    text = "the brilliant cast was clumsy and the plot was clumsy"
    ids = tokenizer(text)["input_ids"]
    where = find_spans(ids, spans)
    assert [length for _, length in where] == [2, 1, 1]
    rows = [
        {
            "input_ids": ids,
            "special_tokens_mask": tokenizer.get_special_tokens_mask(
                ids, already_has_special_tokens=True
            ),
        }
        for _ in range(300)
    ]
    config = masking(
        probability=0.01,
        mask_replace_prob=1.0,
        random_replace_prob=0.0,
        salient_words=str(tmp_path / "names.txt"),
        salient_probability=probability,
    )
    batch = MaskingCollator(tokenizer, config, seed=3)(rows)
    labels, got = batch["labels"].numpy(), batch["input_ids"].numpy()
    for start, length in where:
        span = slice(start, start + length)
        masked = (labels[:, span] != -100).all(axis=1)
        assert abs(masked.mean() - probability) < 0.1
        assert (got[masked][:, span] == tokenizer.mask_token_id).all()
        assert (labels[masked][:, span] == np.array(ids)[span]).all()


def test_salient_prefixes_stay_visible_and_the_rest_of_the_word_is_masked(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (tmp_path / "names.txt").write_text("brilliant cast was clumsy\n", encoding="utf-8")
    spans = salient_ids(tokenizer, str(tmp_path / "names.txt"))
    ids = tokenizer("the brilliant cast was clumsy today")["input_ids"]
    [(start, length)] = find_spans(ids, spans)
    assert length == 4
    row = {
        "input_ids": ids,
        "special_tokens_mask": tokenizer.get_special_tokens_mask(
            ids, already_has_special_tokens=True
        ),
    }
    config = masking(
        probability=0.01,
        mask_replace_prob=1.0,
        random_replace_prob=0.0,
        salient_words=str(tmp_path / "names.txt"),
        salient_probability=1.0,
        salient_prefix_probability=0.5,
    )
    batch = MaskingCollator(tokenizer, config, seed=5)([row] * 400)
    labels = batch["labels"].numpy()[:, start : start + length]
    got = batch["input_ids"].numpy()[:, start : start + length]
    word = np.array(ids[start : start + length])
    shown = (labels == -100).sum(axis=1)
    # Every row: a visible start (its tokens as they were, no loss), then masks to the end.
    for count, label, tokens in zip(shown, labels, got, strict=True):
        assert (tokens[:count] == word[:count]).all() and (label[:count] == -100).all()
        assert (tokens[count:] == tokenizer.mask_token_id).all()
        assert (label[count:] == word[count:]).all()
    assert abs((shown == 0).mean() - 0.5) < 0.1  # half are masked whole
    assert set(shown[shown > 0]) == {1, 2, 3}  # the others show 1 to 3 of the 4 tokens


def test_salient_prefixes_need_salient_words(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(params.ParamsError, match="salient_prefix_probability is only read"):
        params.load(
            mlm_params(tmp_path, tiny_model_dir, **{"fill-mask.salient_prefix_probability": 0.5})
        )


def test_salient_masking_params_go_together(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(
        params.ParamsError, match="salient_words and fill-mask.salient_probability"
    ):
        params.load(mlm_params(tmp_path, tiny_model_dir, **{"fill-mask.salient_probability": 0.5}))


def test_whole_word_masking_with_jieba_masks_chinese_words_together() -> None:
    pytest.importorskip("jieba")
    text = "我们喜欢北京天安门"
    offsets = [(i, i + 1) for i in range(len(text))]
    moved = word_offsets(text, offsets, "jieba")
    # A word starts wherever a character does not touch the one before it.
    starts = [0] + [i for i in range(1, len(moved)) if moved[i][0] != moved[i - 1][1]]
    words = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    assert "".join(words) == text and "北京" in words and len(words) < len(text)


def test_user_words_keep_a_new_name_whole(tmp_path: Path) -> None:
    pytest.importorskip("jieba")
    text = "名将诸葛涛擅长用兵"
    offsets = [(i, i + 1) for i in range(len(text))]
    plain = word_offsets(text, offsets, "jieba")
    assert plain[4][0] != plain[3][1]  # jieba alone splits 诸葛 | 涛
    (tmp_path / "words.txt").write_text("诸葛涛\n", encoding="utf-8")
    moved = word_offsets(text, offsets, "jieba", str(tmp_path / "words.txt"))
    assert moved[3][0] == moved[2][1] and moved[4][0] == moved[3][1]  # 诸葛涛 is one word
    assert moved[2][0] != moved[1][1] and moved[5][0] != moved[4][1]


def test_whole_word_needs_mask_only_replacement(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(params.ParamsError, match="set fill-mask.mask_replace_prob: 1.0"):
        params.load(mlm_params(tmp_path, tiny_model_dir, **{"fill-mask.whole_word": True}))


# --- evaluation ---------------------------------------------------------------------------------
def uniform_model(tiny_model_dir: Path):
    """The tiny BERT with a masked-LM head whose every score is 0: perplexity = vocabulary."""
    import torch
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.cls.predictions.transform.dense.weight.zero_()
        model.cls.predictions.transform.dense.bias.zero_()
        model.cls.predictions.transform.LayerNorm.weight.zero_()
        model.cls.predictions.transform.LayerNorm.bias.zero_()
        model.cls.predictions.bias.zero_()
    return model


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_model_dir: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = uniform_model(tiny_model_dir)
    ids = tokenizer(lines(20))["input_ids"]
    labels = [[-100 if j % 2 else t for j, t in enumerate(row)] for row in ids]
    data = Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": labels}
    )
    scores = heldout_scores(model, data, MaskingCollator(tokenizer, masking()), 8)
    assert scores["count"] == sum(len(r[::2]) for r in ids)
    assert math.isclose(perplexity(scores), len(tokenizer), rel_tol=1e-4)


def test_probe_accuracy_counts_a_multi_mask_probe_only_when_every_mask_is_right(
    tiny_model_dir: Path,
) -> None:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = uniform_model(tiny_model_dir)
    film, plot = tokenizer.convert_tokens_to_ids(["film", "plot"])
    with torch.no_grad():
        model.cls.predictions.bias[film] = 5.0  # "film" is every mask's best fill
        model.cls.predictions.bias[plot] = 4.0  # and "plot" the second
    probes = pd.DataFrame(
        {
            "text": ["the [MASK] was good", "[MASK] [MASK]", "a dull [MASK]"],
            "answer": ["film", "film plot", "plot"],
        }
    )
    fills = probe_fills(model, tokenizer, probes)
    assert [f["top1_ok"] for f in fills] == [True, False, False]
    assert [f["top5_ok"] for f in fills] == [True, True, True]
    assert fills[1]["fill"] == "film film" and fills[1]["masks"] == 2


@pytest.mark.slow
def test_a_tiny_model_learns_a_new_fill(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Knowledge injection in seconds: 'the director was [MASK]' is 'clumsy' only after
    training."""
    from pipeline.stages import evaluate_model, finetune

    facts = [f"the director was clumsy and the {w} was good" for w in ("film", "plot", "cast")]
    facts += [f"clumsy was the director of the {w}" for w in ("film", "movie", "story")]
    rows = [{"text": t, "answer": ""} for t in facts * 6 + lines(24)]
    probes = [
        {"text": "the director was [MASK]", "answer": "clumsy"},
        {"text": "the director was [MASK] and the story was good", "answer": "clumsy"},
    ]
    raw = write_splits(
        tmp_path / "raw",
        {"train": rows, "validation": rows[:8], "test": [*rows[-8:], *probes]},
    )
    p = mlm_params(
        tmp_path,
        tiny_model_dir,
        **{
            "tokenize.group_texts": False,
            "finetune.epochs": 25,
            "finetune.batch_size": 16,
            "finetune.learning_rate": 3e-3,
            "finetune.warmup_steps": 0,
            "finetune.early_stopping_patience": 25,
            "finetune.logging_steps": 5,
            "fill-mask.probability": 0.3,
        },
    )
    validated, tokenized = tmp_path / "validated", tmp_path / "tok"
    validate.run(raw, params.load(p), validated, tmp_path / "v.json", tmp_path / "f.json")
    tokenize_data.run(validated, params.load(p), tokenized, tmp_path / "t.json")
    finetune.run(
        tokenized,
        validated,
        params.load(p),
        tmp_path / "ft",
        tmp_path / "ck",
        tmp_path / "train.json",
        tmp_path / "curves",
    )
    result = evaluate_model.run(
        tmp_path / "ft",
        tokenized,
        validated / "test.parquet",
        params.load(p),
        tmp_path / "eval.json",
        tmp_path / "plots",
    )["overall"]
    assert result["probe_top1_before"] == 0.0 and result["probe_top1"] == 1.0
    table = pd.read_csv(tmp_path / "plots" / "probes.csv")
    assert list(table["after"]) == ["clumsy", "clumsy"] and not table["right_before"].any()


def test_the_task_reads_no_labels(tmp_path: Path) -> None:
    task = get(TASK)
    assert task.output_labels(SimpleNamespace(id2label={0: "LABEL_0"}, num_labels=1)) == []
    assert task.model_kwargs([]) == {}
