"""The validate stage's checks of labeled text splits, over splits read whole or in pieces.

Checks that look at one row (a text is a string, a label is in the label set) run on each piece
as it comes. Checks that compare rows (a text repeated in its split, or found in an earlier
split) need the whole split: a first pass keeps a 16-byte digest per row and finds them over
the whole split, and the pandera schema then reads the answers from columns of each piece. A
split read whole is the case of one piece, so both ways give the same failures.
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandera.errors import SchemaErrors

from pipeline.core.params import Params
from pipeline.core.tables import SPLITS, digest_halves, key_digests, text_key
from pipeline.tasks.text_classification.schema import (
    EXACT_REPEAT,
    LEAKS_INTO,
    NEAR_REPEAT,
    as_label,
    at_source,
    failures_from,
    has_kind,
    label_kind_of,
    schema,
)

# A split as pieces of rows whose index counts rows from the split's start: called again, it
# reads the split again from the start.
Pieces = Callable[[], Iterator[pd.DataFrame]]


def halves(digests: np.ndarray) -> pd.DataFrame:
    """16-byte digests as two uint64 columns, which pandas hashes without a Python object each."""
    pairs = digest_halves(digests)
    return pd.DataFrame({"a": pairs[:, 0], "b": pairs[:, 1]})


class SplitDigests:
    """One split's rows as digests: of the text itself, and of its case- and space-insensitive
    key; which rows are blank (null, not a string, or only spaces); and the labels it holds."""

    def __init__(self, text: str, label: str) -> None:
        self.text, self.label = text, label
        self.exact: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.no_key: list[np.ndarray] = []
        self.blank: list[np.ndarray] = []
        self.labels: Counter[tuple[str, Any]] = Counter()
        self.has_labels = False

    def add(self, piece: pd.DataFrame) -> None:
        if self.text in piece:
            values = piece[self.text]
            strings = values.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
            self.blank.append(~strings | ~values.map(lambda v: bool(str(v).strip())).to_numpy())
            # Non-strings are blank, so their exact digest is never compared.
            self.exact.append(key_digests(values.where(strings, None)))
            keys = text_key(values)
            self.keys.append(key_digests(keys))
            self.no_key.append(keys.isna().to_numpy())
        if self.label in piece:
            self.has_labels = True
            self.labels.update(
                (type(v).__name__, v) for v in piece[self.label] if v is not None and v == v
            )

    def joined(self, name: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def repeats(self) -> tuple[np.ndarray, np.ndarray]:
        """(exact, near) repeats of an earlier row of the split; blank rows are neither (their
        own check reports them)."""
        if not self.exact:
            return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
        blank = self.joined("blank")
        exact = halves(self.joined("exact")).duplicated(keep="first").to_numpy()
        near = halves(self.joined("keys")).duplicated(keep="first").to_numpy()
        return exact & ~blank, near & ~exact & ~blank

    def key_set(self) -> pd.MultiIndex:
        """The keys the split holds (rows without a key left out)."""
        if not self.keys:
            return pd.MultiIndex.from_arrays([[], []])
        both = halves(self.joined("keys"))[~self.joined("no_key")]
        return pd.MultiIndex.from_frame(both)

    def leaks(self, earlier: pd.MultiIndex) -> np.ndarray:
        """Rows whose key an earlier split holds."""
        if not self.keys:
            return np.zeros(0, dtype=bool)
        found = pd.MultiIndex.from_frame(halves(self.joined("keys"))).isin(earlier)
        return found & ~self.joined("no_key")


def labels_of(train: Counter[tuple[str, Any]], p: Params) -> tuple[str, list[str]]:
    """(kind, labels): the kind of label train holds and the sorted labels of that kind, unless
    validate.labels fixes them."""
    present = sum(train.values())
    strings = sum(n for (_, v), n in train.items() if isinstance(v, str))
    integral = sum(
        n
        for (_, v), n in train.items()
        if isinstance(v, numbers.Integral) and not isinstance(v, bool)
    )
    kind = "str" if p.validate.labels else label_kind_of(present, strings, integral)
    labels = list(p.validate.labels) or sorted(
        {as_label(v) for (_, v) in train if has_kind(v, kind)}
    )
    return kind, labels


def check_pieces(
    pieces: dict[str, Pieces], files: dict[str, Path], p: Params
) -> tuple[list[str], list[dict[str, Any]]]:
    """(labels, failures) of the three splits, each read twice in pieces."""
    text, label = p.base.text_column, p.base.label_column
    digests = {split: SplitDigests(text, label) for split in SPLITS}
    for split in SPLITS:
        for piece in pieces[split]():
            digests[split].add(as_objects(piece))
    kind, labels = labels_of(digests["train"].labels, p)
    found: list[dict[str, Any]] = []
    if len(labels) == 1:
        found.append(
            {
                "file": str(files["train"]),
                "row": None,
                "column": label,
                "reason": f"one class only ({labels[0]!r}): a classifier needs at least two "
                "labels; check base.label_column, ingest.drop_labels and validate.labels",
                "value": None,
            }
        )
    limit = p.validate.max_duplicate_report
    earlier: dict[str, pd.MultiIndex] = {}
    for split in SPLITS:
        split_digests = digests[split]
        exact, near = split_digests.repeats()
        leaks = {other: split_digests.leaks(keys) for other, keys in earlier.items()}
        held = {as_label(v) for (_, v) in split_digests.labels}
        every_class = split_digests.has_labels and set(labels) <= held
        reasons: Counter[str] = Counter()
        first = True
        for piece in pieces[split]():
            piece = as_objects(piece)
            rows = piece.index.to_numpy()
            if text in piece:
                piece[EXACT_REPEAT] = exact[rows]
                piece[NEAR_REPEAT] = near[rows]
                for other, leaked in leaks.items():
                    piece[LEAKS_INTO + other] = leaked[rows]
            whole_split = every_class or not first  # judged once, on the first piece
            checks = schema(split, text, label, labels, kind, list(leaks), whole_split)
            first = False
            try:
                checks.validate(piece, lazy=True)
            except SchemaErrors as err:
                for failure in at_source(failures_from(err, files[split], text, limit), piece):
                    reasons[failure["reason"]] += 1
                    if reasons[failure["reason"]] <= limit:
                        found.append(failure)
        if split_digests.keys:  # the split has a text column
            earlier[split] = split_digests.key_set()
    return labels, found


def as_objects(piece: pd.DataFrame) -> pd.DataFrame:
    """Values as Python objects, missing ones as None: what the checks judge."""
    return piece.astype(object).replace({np.nan: None})
