"""From per-word tag scores to a tag sequence: each word's best tag (argmax), or the best
sequence IOB2 allows (Viterbi), optionally with a CRF's learned transitions.

The evaluate stage, the export's gates and the runtime all decode through `Decoder`, so the
metric measured before export is the metric of what ships. numpy only.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

ARGMAX = "argmax"
VITERBI = "viterbi"  # constrained by IOB2 over the log-probabilities
CRF = "crf"  # constrained by IOB2 over the graph's emissions and a CRF's transitions
DECODINGS = (ARGMAX, VITERBI, CRF)


def prefix_and_type(label: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("O", "") for O or any label outside IOB2."""
    prefix, dash, kind = label.partition("-")
    if dash and prefix in ("B", "I") and kind:
        return prefix, kind
    return "O", ""


def iob2_allowed(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(start (k,), step (k, k)) booleans: which tags may open a sequence, and which may follow
    which (step[i, j]: j after i). I-X opens nothing and follows only B-X or I-X."""
    parsed = [prefix_and_type(label) for label in labels]
    start = np.array([prefix != "I" for prefix, _ in parsed], dtype=bool)
    step = np.ones((len(labels), len(labels)), dtype=bool)
    for j, (prefix, kind) in enumerate(parsed):
        if prefix == "I":
            step[:, j] = [p in ("B", "I") and k == kind for p, k in parsed]
    return start, step


def invalid_steps(tags: list[str]) -> int:
    """How many places in `tags` IOB2 forbids: an I- at the start, after O or after another
    type."""
    labels = sorted(set(tags))
    start, step = iob2_allowed(labels)
    ids = [labels.index(t) for t in tags]
    bad = int(bool(ids) and not start[ids[0]])
    return bad + sum(int(not step[a, b]) for a, b in itertools.pairwise(ids))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def viterbi(
    emissions: np.ndarray, transitions: np.ndarray, start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """The highest-scoring tag sequence: sum of start[y0], emissions[t, yt],
    transitions[y(t-1), yt] and end[y(n-1)]. -inf marks a forbidden step.

    Args:
        emissions: (n, k) scores per position and tag.
        transitions: (k, k), from the row's tag to the column's.
    """
    n = len(emissions)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    score = start + emissions[0]
    back = np.zeros((n, emissions.shape[1]), dtype=np.int64)
    for t in range(1, n):
        candidates = score[:, None] + transitions  # (from, to)
        back[t] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + emissions[t]
    path = np.zeros(n, dtype=np.int64)
    path[-1] = int((score + end).argmax())
    for t in range(n - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


@dataclass(frozen=True, eq=False)
class Transitions:
    """A linear-chain CRF's learned scores over a label list: transitions[i, j] for tag j after
    tag i, start[j] for a sequence opening with j, end[i] for one closing with i."""

    labels: tuple[str, ...]
    transitions: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __post_init__(self) -> None:
        k = len(self.labels)
        shapes = (self.transitions.shape, self.start.shape, self.end.shape)
        if shapes != ((k, k), (k,), (k,)):
            raise ValueError(
                f"CRF scores over {k} labels need transitions ({k}, {k}), start ({k},) and "
                f"end ({k},); got {shapes[0]}, {shapes[1]} and {shapes[2]}"
            )
        if not all(np.isfinite(a).all() for a in (self.transitions, self.start, self.end)):
            raise ValueError("CRF scores must be finite numbers")

    def as_dict(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "transitions": self.transitions.tolist(),
            "start": self.start.tolist(),
            "end": self.end.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "transitions") -> Transitions:
        """Read `as_dict`'s shape; a missing key or a wrong shape is a ValueError naming
        `where`."""
        keys = ("labels", "transitions", "start", "end")
        if not isinstance(data, dict) or sorted(data) != sorted(keys):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: needs exactly the keys {list(keys)}, got {found}")
        try:
            arrays = [np.asarray(data[k], dtype=np.float64) for k in keys[1:]]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: transitions, start and end must be numbers") from None
        try:
            return cls(tuple(map(str, data["labels"])), *arrays)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict()) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> Transitions:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))


@dataclass(frozen=True, eq=False)
class Decoder:
    """How scores over `labels` become tags: argmax, viterbi, or crf (needs `crf`)."""

    labels: tuple[str, ...]
    mode: str = ARGMAX
    crf: Transitions | None = None

    def __post_init__(self) -> None:
        if self.mode not in DECODINGS:
            raise ValueError(f"decoding {self.mode!r} is not one of {list(DECODINGS)}")
        if self.mode == CRF and self.crf is None:
            raise ValueError("decoding 'crf' needs the CRF's transitions")
        if self.crf is not None and self.crf.labels != self.labels:
            raise ValueError(
                f"the CRF's transitions are over labels {list(self.crf.labels)!r:.120}, the "
                f"model's are {list(self.labels)!r:.120}"
            )

    def modes(self) -> tuple[str, ...]:
        """Every decoding these scores allow: argmax and viterbi, and crf with transitions."""
        return DECODINGS if self.crf is not None else (ARGMAX, VITERBI)

    def using(self, mode: str) -> Decoder:
        return replace(self, mode=mode)

    @cached_property
    def chain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(transitions, start, end) Viterbi runs on: the CRF's (zeros for viterbi) with the
        steps IOB2 forbids at -inf."""
        allowed_start, allowed_step = iob2_allowed(list(self.labels))
        k = len(self.labels)
        learned = self.crf if self.mode == CRF else None
        transitions = np.zeros((k, k)) if learned is None else learned.transitions
        start = np.zeros(k) if learned is None else learned.start
        end = np.zeros(k) if learned is None else learned.end
        return (
            np.where(allowed_step, transitions, -np.inf),
            np.where(allowed_start, start, -np.inf),
            end,
        )

    def decode(self, log_probs: np.ndarray) -> np.ndarray:
        """Tag ids (n,) of one sequence from its (n, k) log-probabilities (or a CRF's emissions:
        a constant added to one position's scores changes no decision)."""
        scores = np.asarray(log_probs, dtype=np.float64)
        if not len(scores):
            return np.zeros(0, dtype=np.int64)
        if self.mode == ARGMAX:
            return scores.argmax(axis=-1).astype(np.int64)
        return viterbi(scores, *self.chain)
