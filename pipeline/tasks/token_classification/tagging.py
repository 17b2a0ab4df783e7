"""Token-level data: CoNLL files, tag schemes (IOB1, IOB2, BIOES/BMES) and their IOB2 form."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.core.tables import TableError, open_bytes

SCHEMES = ("iob1", "iob2", "bioes")
# BMES (MSRA's scheme) is BIOES with M for I; both read as "bioes".
PREFIXES = {"iob1": "BI", "iob2": "BI", "bioes": "BIMES"}
DOCSTART = "-DOCSTART-"


def read_conll(path: Path, tokens: str = "tokens", tags: str = "tags") -> pd.DataFrame:
    """Sentences of a CoNLL file: a token and its tag per line (the first and last columns;
    any between are ignored), a blank line between sentences, `-DOCSTART-` lines skipped.

    Returns one row per sentence: `tokens`, `tags` and `line`, the file line it starts on.
    """
    rows: list[dict] = []
    words: list[str] = []
    labels: list[str] = []
    start = 0
    with open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise TableError(
                    f"{path}, line {number}: not UTF-8 ({exc.reason} at byte {exc.start} of the "
                    "line); re-save the file as UTF-8"
                ) from None
            fields = line.split()
            if not fields or fields[0] == DOCSTART:
                if words:
                    rows.append({tokens: words, tags: labels, "line": start})
                words, labels = [], []
                continue
            if len(fields) < 2:
                raise TableError(
                    f"{path}, line {number}: {line!r} has no tag; each line needs a token and "
                    "its tag separated by a tab or space (a blank line ends a sentence)"
                )
            if not words:
                start = number
            words.append(fields[0])
            labels.append(fields[-1])
    if words:
        rows.append({tokens: words, tags: labels, "line": start})
    return pd.DataFrame(rows, columns=[tokens, tags, "line"])


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("O", "") for "O"; ("?", tag) for a tag of no scheme."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if not dash or len(prefix) != 1 or not kind:
        return "?", tag
    return prefix, kind


def problems(tags: list[str], scheme: str) -> list[tuple[int, str]]:
    """(position, reason) for every tag that breaks `scheme`."""
    allowed = PREFIXES[scheme]
    found = []
    previous = ("O", "")
    for i, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        if prefix == "?" or (prefix != "O" and prefix not in allowed):
            found.append((i, f"tag {tag!r} is not O or {'/'.join(allowed)}-TYPE ({scheme})"))
            previous = ("O", "")
            continue
        inside = prefix in "IME" and prefix != "O"
        continues = previous[0] in ("B", "I", "M") and previous[1] == kind
        if scheme == "iob2" and inside and not continues:
            where = "O" if previous[0] == "O" else f"{previous[0]}-{previous[1]}"
            found.append((i, f"{tag} after {where}: under IOB2 an entity starts with B-{kind}"))
        if scheme == "bioes" and inside and not continues:
            where = "O" if previous[0] == "O" else f"{previous[0]}-{previous[1]}"
            found.append((i, f"{tag} after {where}: under BIOES an entity starts with B-/S-"))
        if scheme == "bioes" and previous[0] in ("B", "I", "M"):
            closes = prefix in "IME" and kind == previous[1]
            if not closes:
                found.append((i - 1, f"{tags[i - 1]} is not closed: BIOES ends it with E-"))
        previous = (prefix, kind)
        if scheme == "bioes" and prefix in "ES":
            previous = ("O", "")
    if scheme == "bioes" and previous[0] in ("B", "I", "M"):
        found.append((len(tags) - 1, f"{tags[-1]} is not closed: BIOES ends it with E-"))
    return found


def repair(tags: list[str]) -> list[str]:
    """IOB2 tags with every I- that continues nothing turned into B- (how seqeval's default,
    lenient mode reads them)."""
    out, previous = [], ("O", "")
    for tag in tags:
        prefix, kind = split_tag(tag)
        if prefix == "I" and (previous[0] not in ("B", "I") or previous[1] != kind):
            tag = f"B-{kind}"
        out.append(tag)
        previous = (prefix, kind)
    return out


def is_sequence_problem(reason: str) -> bool:
    """Whether a `problems` reason is about order (repairable), not an unknown tag."""
    return "is not O or" not in reason


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """The same entities in IOB2 (B- opens every entity, I- continues it)."""
    out = []
    previous = ("O", "")
    for tag in tags:
        prefix, kind = split_tag(tag)
        if prefix == "O":
            out.append("O")
        elif scheme == "bioes":
            out.append(f"{'B' if prefix in 'BS' else 'I'}-{kind}")
        elif scheme == "iob1" and prefix == "I" and previous[1] != kind:
            out.append(f"B-{kind}")
        else:
            out.append(f"{prefix}-{kind}")
        previous = (prefix, kind)
        if scheme == "bioes" and prefix in "ES":
            previous = ("O", "")
    return out


def entity_starts(tags: list[str]) -> list[str]:
    """The type of each entity, in any scheme: B-/S- open one, and so does I-/M-/E- after O or
    after another type (IOB1)."""
    out, previous = [], ("O", "")
    for tag in tags:
        prefix, kind = split_tag(tag)
        continues = previous[0] in ("B", "I", "M") and previous[1] == kind
        if prefix in ("B", "S") or (prefix in ("I", "M", "E") and not continues):
            out.append(kind)
        previous = (prefix, kind)
    return out


def entity_types(tags: list[str]) -> set[str]:
    return {split_tag(tag)[1] for tag in tags if split_tag(tag)[0] not in ("O", "?")}


def labels_for(types: list[str]) -> list[str]:
    """The IOB2 label list of some entity types: O, then B- and I- of each type in order."""
    return ["O", *[f"{p}-{t}" for t in types for p in "BI"]]
