"""How a classifier reads a text longer than its limit, the same way in training, evaluation,
the export's parity check and the runtime.

- `truncate`: the first tokens only.
- `head+tail`: the first and the last tokens (a share `head_fraction` from the start), as
  reviews often open with the plot and end with the verdict.
- `windows`: overlapping windows that share `stride` tokens; each is classified and the logits
  of a text's windows are aggregated: `mean` (every part counts alike) or `max` (per class, the
  strongest window wins: one decisive passage decides).

Everything here works on token ids, so the pipeline (transformers' tokenizer) and the runtime
(the tokenizers library) cut a text identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

TRUNCATE = "truncate"
HEAD_TAIL = "head+tail"
WINDOWS = "windows"
STRATEGIES = (TRUNCATE, HEAD_TAIL, WINDOWS)
AGGREGATES = ("mean", "max")


@dataclass(frozen=True)
class Reading:
    """One way of reading long texts, as params.yaml's `long_text` and the manifest hold it."""

    strategy: str = TRUNCATE
    stride: int = 0
    head_fraction: float = 0.25
    aggregate: str = "mean"

    def problems(self, max_length: int) -> list[str]:
        found = []
        if self.strategy not in STRATEGIES:
            found.append(f"strategy {self.strategy!r} is not one of {list(STRATEGIES)}")
        if self.aggregate not in AGGREGATES:
            found.append(f"aggregate {self.aggregate!r} is not one of {list(AGGREGATES)}")
        if not 0.0 <= self.head_fraction <= 1.0:
            found.append(f"head_fraction {self.head_fraction} must be in [0, 1]")
        if self.strategy == WINDOWS and not 0 <= self.stride <= max_length // 2:
            found.append(
                f"stride {self.stride} must be in [0, {max_length // 2}] (max_length / 2)"
            )
        return found

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Reading:
        return cls(**(raw or {}))


def split(
    ids: Sequence[int], special: Sequence[int], max_length: int, reading: Reading
) -> list[list[int]]:
    """The windows (token id lists of at most `max_length`) a text is read as.

    `special` marks the tokenizer's special tokens ([CLS] ... [SEP], <s> ... </s>): the leading
    and trailing ones frame every window; what lies between is the content that is cut. A text
    with no content (an empty string) is one window of its special tokens.
    """
    if len(ids) <= max_length:  # a text that fits is its one window
        return [list(ids)]
    content = [i for i, flag in enumerate(special) if not flag]
    if not content:
        return [list(ids)]
    first, last = content[0], content[-1]
    prefix, body, suffix = list(ids[:first]), list(ids[first : last + 1]), list(ids[last + 1 :])
    budget = max_length - len(prefix) - len(suffix)
    if budget <= 0:
        raise ValueError(f"max_length {max_length} leaves no room between the special tokens")
    if len(body) <= budget:
        return [prefix + body + suffix]
    if reading.strategy == HEAD_TAIL:
        head = round(budget * reading.head_fraction)
        tail = budget - head
        return [prefix + body[:head] + (body[-tail:] if tail else []) + suffix]
    if reading.strategy == WINDOWS:
        step = budget - reading.stride
        if step <= 0:
            raise ValueError(f"stride {reading.stride} leaves windows of {budget} no room to move")
        starts = range(0, max(len(body) - reading.stride, 1), step)
        return [prefix + body[s : s + budget] + suffix for s in starts]
    return [prefix + body[:budget] + suffix]


def aggregate(outputs: np.ndarray, counts: Sequence[int], how: str = "mean") -> np.ndarray:
    """One row per text from the rows of its windows (`counts[i]` consecutive rows for text i)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != len(outputs):
        raise ValueError(f"{len(outputs)} window outputs but the counts add up to {counts.sum()}")
    if (counts < 1).any():
        raise ValueError("every text has at least one window")
    if len(counts) == len(outputs):
        return np.asarray(outputs)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if how == "max":
        return np.maximum.reduceat(outputs, starts, axis=0)
    if how == "mean":
        return np.add.reduceat(outputs, starts, axis=0) / counts[:, None]
    raise ValueError(f"aggregate {how!r} is not one of {list(AGGREGATES)}")
