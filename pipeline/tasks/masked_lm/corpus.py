"""Masked-LM corpora: text files (plain or word/POS-tagged), probe files, long lines cut."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.tables import TableError, encoding_error, read_table, table_format

TEXT_SUFFIXES = (".txt",)


def is_text_file(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


WORD_POS = re.compile(r"\[?([^\s\[]+?)/[A-Za-z]+\]?[A-Za-z]*(?=\s|$)")


def strip_tags(line: str) -> str:
    """`迈向/v  充满/v  [中国/ns  政府/n]nt` -> `迈向充满中国政府` (People's Daily's word/POS
    format); words are joined without spaces, as Chinese is written."""
    return "".join(WORD_POS.findall(line))


def tagged(line: str) -> bool:
    """Whether every token of the line is a word/TAG one (a review's `in/out` is not)."""
    tokens = line.split()
    return bool(tokens) and all(WORD_POS.fullmatch(token) for token in tokens)


def read_lines(path: Path, column: str, text_format: str = "plain") -> pd.DataFrame:
    """A text file as one row a line (`line` is 1-based); a folder as all its .txt files.
    `word_pos` lines hold word/TAG tokens and become their words joined (lines without any
    stay as they are, so a plain corpus and a tagged rehearsal file can be read together)."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and is_text_file(f))
    if path.is_dir() and not files:
        raise TableError(
            f"{path}: a folder with no .txt files; give one text a line in .txt files"
        )
    frames = []
    for file in files if path.is_dir() else [path]:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise encoding_error(file) from None
        if text_format == "word_pos":  # a line without word/TAG tokens is plain text
            lines = [strip_tags(line) if tagged(line) else line for line in lines]
        frames.append(
            pd.DataFrame({column: lines, "line": np.arange(1, len(lines) + 1), "file": file.name})
        )
    return pd.concat(frames, ignore_index=True)


def read_corpus(path: Path, column: str, text_format: str = "plain") -> pd.DataFrame:
    """One text per row from a .txt file or folder, or the `column` of a CSV/JSONL/Parquet."""
    if path.is_dir() or is_text_file(path):
        return read_lines(path, column, text_format)
    if table_format(path) is None:
        raise TableError(
            f"{path}: unsupported file type; give a .txt file (one text a line), a folder of "
            ".txt files, or a .csv/.tsv/.jsonl/.parquet file with a text column"
        )
    df = read_table(path)
    if column not in df.columns:
        raise TableError(
            f"{path}: no column {column!r} (set by base.text_column); the file has "
            f"{list(df.columns)}; fix base.text_column in params.yaml"
        )
    return df.assign(line=np.arange(1, len(df) + 1))


PLACEHOLDER = "[MASK]"  # how a probe file writes the mask; ingest puts the model's own in


def read_probes(path: Path) -> pd.DataFrame:
    """Probe rows {"text": "... [MASK] ...", "answer": "..."} from a JSONL file, each with an
    optional "kind" (a group the report scores apart: "name", "fact", "control", ...) and an
    optional "avoid" (text whose characters the fill must not bring in: a control probe about
    someone else must not be filled with pieces of the taught name)."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TableError(
                f"{path} line {number}: not JSON ({exc.msg}); one object a line"
            ) from None
        if not isinstance(row, dict) or not {"text", "answer"} <= set(row):
            raise TableError(
                f'{path} line {number}: give {{"text": "... [MASK] ...", "answer": "..."}} '
                '(optional "kind" and "avoid")'
            )
        extra = {key: row.get(key, "") for key in ("kind", "avoid")}
        for key, value in {"text": row["text"], "answer": row["answer"], **extra}.items():
            if not isinstance(value, str):
                raise TableError(f"{path} line {number}: {key!r} must be a string, not {value!r}")
        if not row["answer"].strip():
            raise TableError(f"{path} line {number}: empty answer; give the text the masks hide")
        rows.append({"text": row["text"], "answer": row["answer"], **extra, "line": number})
    if not rows:
        raise TableError(
            f'{path}: no probes; give one JSON object a line or set ingest.probes: ""'
        )
    return pd.DataFrame(rows)


def with_mask_token(texts: pd.Series, mask: str) -> pd.Series:
    """Probe texts with the placeholder [MASK] written as the model's own mask token
    (XLM-R-style tokenizers, such as multilingual-e5's, call it <mask>)."""
    return texts if mask == PLACEHOLDER else texts.str.replace(PLACEHOLDER, mask, regex=False)


def split_long(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at the last space where there is one."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind(" ", limit // 2, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    return [*pieces, text] if text else pieces
