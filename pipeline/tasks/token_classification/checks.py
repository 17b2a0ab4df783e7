"""The validate stage's checks of token-level data: one failure per problem, by file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.params import Params
from pipeline.core.tables import SPLITS
from pipeline.tasks.token_classification.tagging import (
    entity_types,
    is_sequence_problem,
    labels_for,
    problems,
    split_tag,
    to_iob2,
)


def _failure(file: Path, line: Any, column: str, reason: str, value: Any = None) -> dict:
    return {
        "file": str(file),
        "line": int(line) if line is not None else None,
        "row": None,
        "column": column,
        "reason": reason,
        "value": None if value is None else str(value)[:200],
    }


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def sentence_problems(
    tokens: Any, tags: Any, scheme: str, names: tuple[str, str], repair: bool = False
) -> list:
    """(column, reason, value) for one sentence; `repair` lets broken sequences through."""
    tok_col, tag_col = names
    if not _is_list(tokens):
        return [(tok_col, "tokens must be a list of strings", tokens)]
    if not _is_list(tags):
        return [(tag_col, "tags must be a list of strings", tags)]
    if len(tokens) == 0:
        return [(tok_col, "empty sentence: no tokens", None)]
    if len(tokens) != len(tags):
        return [(tag_col, f"{len(tokens)} tokens but {len(tags)} tags", " ".join(map(str, tags)))]
    found = []
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token.strip():
            found.append((tok_col, f"token {i + 1} is empty or not a string", repr(token)))
        elif any(c.isspace() for c in token):
            found.append((tok_col, f"token {i + 1} contains whitespace", token))
    texts = [str(t) for t in tags]
    for i, reason in problems(texts, scheme):
        if repair and is_sequence_problem(reason):
            continue
        found.append((tag_col, f"token {i + 1} ({tokens[i]!r}): {reason}", texts[i]))
    return found


def check_splits(
    frames: dict[str, pd.DataFrame], files: dict[str, Path], p: Params
) -> tuple[list[str], list[dict[str, Any]]]:
    """(IOB2 label list, failures) over every split."""
    tok_col, tag_col = p.base.text_column, p.base.label_column
    scheme = p.validate.tag_scheme
    limit = p.validate.max_duplicate_report
    failures: list[dict[str, Any]] = []
    seen: dict[str, set[str]] = {}
    types_by_split: dict[str, set[str]] = {}
    for split in SPLITS:
        df, file = frames[split], files[split]
        missing = [c for c in (tok_col, tag_col) if c not in df]
        if missing:
            failures += [
                _failure(
                    file,
                    None,
                    c,
                    f"required column {c!r} is missing; the data has {list(df.columns)}",
                )
                for c in missing
            ]
            continue
        lines = df["line"] if "line" in df else pd.Series(np.arange(1, len(df) + 1))
        # Name the file the row was read from (ingest records it), else the split's table.
        sources = df["source_file"] if "source_file" in df else pd.Series([file] * len(df))
        keys: dict[str, int] = {}
        types: set[str] = set()
        rows = zip(df[tok_col], df[tag_col], lines, sources, strict=True)
        for tokens, tags, line, source in rows:
            repairs = p.validate.broken_tags == "repair"
            found = sentence_problems(tokens, tags, scheme, (tok_col, tag_col), repairs)
            failures += [_failure(source, line, c, r, v) for c, r, v in found]
            if found:
                continue
            iob2 = to_iob2([str(t) for t in tags], scheme)
            types |= entity_types(iob2)
            key = " ".join(tokens).lower()
            for other, other_keys in seen.items():
                if key in other_keys:
                    failures.append(
                        _failure(
                            source,
                            line,
                            tok_col,
                            f"leakage: the same sentence is also in split {other!r}",
                            " ".join(tokens),
                        )
                    )
            keys.setdefault(key, line)
        seen[split] = set(keys)
        types_by_split[split] = types
    wanted = _declared_types(p.validate.labels) or sorted(types_by_split.get("train", set()))
    for split, types in types_by_split.items():
        unknown = sorted(types - set(wanted))
        if unknown:
            failures.append(
                _failure(
                    files[split],
                    None,
                    tag_col,
                    f"entity types {unknown} are not in the label set {wanted}",
                )
            )
        absent = sorted(set(wanted) - types)
        if absent:
            failures.append(
                _failure(
                    files[split],
                    None,
                    tag_col,
                    f"entity types missing: split {split!r} has no {absent}",
                )
            )
    return labels_for(wanted), _capped(failures, limit)


def _declared_types(labels: list[str]) -> list[str]:
    """Entity types, in order, of validate.labels (either types or IOB2 tags)."""
    types = [split_tag(label)[1] if "-" in label else label for label in labels if label != "O"]
    return list(dict.fromkeys(types))


def _capped(failures: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` failures of one kind (the reason before its first colon)."""
    counts: dict[str, int] = {}
    kept = []
    for failure in failures:
        kind = failure["reason"].split(":")[-1].split("(")[0].strip()[:40]
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] <= limit:
            kept.append(failure)
    return kept
