"""How a classifier reads a text longer than its limit, the same way in training, evaluation,
the export's parity check and the runtime.

- `truncate`: the first tokens only.
- `head+tail`: the first and the last tokens (a share `head_fraction` from the start), as
  reviews often open with the plot and end with the verdict.
- `windows`: overlapping windows that share `stride` tokens; each is classified and the logits
  of a text's windows are aggregated: `mean` (every part counts alike) or `max` (per class, the
  strongest window wins: one decisive passage decides).

Everything here works on token ids, so the pipeline (transformers' tokenizer) and the runtime
(the tokenizers library) cut a text identically. The runtime reads a long text's ends only
(`read_head`, `read_ends`): tokenizing a 50 MB text whole took 8 GB, while truncation and
head+tail use a few hundred tokens of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

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


# How many windows the runtime reads of one text unless told otherwise (`bertrt.load`'s
# `max_windows`): 64 windows of 128 tokens are about 6,000 tokens, some 25,000 characters of
# English, and a few seconds of CPU; a megabyte text would be thousands.
MAX_WINDOWS = 64
# Characters a token rarely exceeds on average: a text longer than max_windows * max_length
# times this is refused before it is tokenized.
CHARS_PER_TOKEN_CAP = 32
# The most characters of one text the runtime tokenizes: the scan of a long text's ends doubles
# from a guess until every kept token lies in a word wholly inside it, and stops here (half of
# it at each end for head+tail). Tokenizing this many characters took at most about 60 MB (240
# bytes a character, on Thai text without spaces); a text whose kept tokens are not found
# within it is refused (TextTooLong).
SCAN_CHARS = 1 << 18
# Tokens ending this close to a cut are not trusted either: normalizers that combine characters
# (NFC) and pre-tokenizer patterns that look ahead act on a few characters across it.
MARGIN_CHARS = 16


class TextTooLong(ValueError):
    """A text over what the runtime reads: more windows than `max_windows`, or no break between
    words within SCAN_CHARS of an end it reads. `index` is the text's place in the call."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(index, reason)
        self.index = index
        self.reason = reason

    def __str__(self) -> str:
        return f"text {self.index} {self.reason}"


def too_many_windows(
    index: int, limit: int, max_length: int, found: int | None = None, chars: int = 0
) -> TextTooLong:
    """The refusal of a text read as more than `limit` windows: `found` when counted, else
    judged from its `chars` characters before it is tokenized."""
    if found is not None:
        what = f"is read as {found} windows of {max_length} tokens"
    else:
        most = limit * max_length * CHARS_PER_TOKEN_CAP
        what = (
            f"has {chars:,} characters, more than {limit} windows of {max_length} tokens hold "
            f"(at most {most:,})"
        )
    return TextTooLong(
        index,
        f"{what}; the limit is max_windows={limit} (--max-windows, BERTRT_MAX_WINDOWS): split "
        "the text or raise the limit",
    )


def _no_word_break(index: int, end: str, chars: int) -> TextTooLong:
    return TextTooLong(
        index,
        f"has no break between words within {chars:,} characters of its {end}: the tokens "
        "read there cannot be found without tokenizing all of it; send text with spaces or "
        "punctuation",
    )


class Encoded(Protocol):
    """What is read of a tokenizers Encoding."""

    ids: list[int]
    special_tokens_mask: list[int]
    word_ids: list[int | None]
    offsets: list[tuple[int, int]]
    overflowing: list[Any]


Encode = Callable[[str], Any]


def _content(special: Sequence[int]) -> tuple[int, int] | None:
    """Indices of the first and last token that is not special, as `split` frames a text."""
    content = [i for i, flag in enumerate(special) if not flag]
    return (content[0], content[-1]) if content else None


def _stable_head(enc: Encoded, cut: int, words: Sequence[int | None]) -> tuple[int, int] | None:
    """(leading special tokens, tokens after them that are the whole text's too) of the
    encoding of a text's first `cut` characters, None if it has no content: the tokens of every
    word but the last two (the last may be cut, and a pre-tokenizer may split it from the one
    before differently once it is whole: "we'" + "re"), ending MARGIN_CHARS before the cut.
    `words` are the word ids of all the cut text's tokens (its overflowing windows' too)."""
    span = _content(enc.special_tokens_mask)
    known = [w for w in words if w is not None]
    if span is None or not known:
        return None
    first, last = span
    below = max(known) - 1
    stable = 0
    for word, (_, end) in zip(
        enc.word_ids[first : last + 1], enc.offsets[first : last + 1], strict=True
    ):
        if word is None or word >= below or end > cut - MARGIN_CHARS:
            break
        stable += 1
    return first, stable


def _stable_tail(enc: Encoded) -> tuple[int, int] | None:
    """(trailing special tokens, tokens before them that are the whole text's last too) of the
    encoding of a text's last characters, None if it has no content: the tokens of every word
    but the first two, starting MARGIN_CHARS after the cut."""
    span = _content(enc.special_tokens_mask)
    known = [w for w in enc.word_ids if w is not None]
    if span is None or not known:
        return None
    first, last = span
    above = min(known) + 1
    stable = 0
    for word, (start, _) in zip(
        reversed(enc.word_ids[first : last + 1]),
        reversed(enc.offsets[first : last + 1]),
        strict=True,
    ):
        if word is None or word <= above or start < MARGIN_CHARS:
            break
        stable += 1
    return len(enc.ids) - 1 - last, stable


def head_tail_shares(budget: int, head_fraction: float) -> tuple[int, int]:
    """The content tokens head+tail keeps from the start and from the end of a text."""
    head = round(budget * head_fraction)
    return head, budget - head


def read_head(text: str, encode: Encode, index: int, start: int) -> Any:
    """The encoding of `text` by `encode`, a tokenizer that truncates (without stride), from
    its first characters only: `start` of them, doubled until every kept token is the whole
    text's, so that the result is the whole text's encoding; at most SCAN_CHARS."""
    cut = start
    while cut < len(text):
        enc = encode(text[:cut])
        words = [w for e in (enc, *enc.overflowing) for w in e.word_ids]
        found = _stable_head(enc, cut, words)
        span = _content(enc.special_tokens_mask)
        if found is not None and span is not None and found[1] == span[1] - span[0] + 1:
            return enc
        if cut >= SCAN_CHARS:
            raise _no_word_break(index, "start", SCAN_CHARS)
        cut = min(2 * cut, SCAN_CHARS)
    return encode(text)


def read_ends(
    text: str, encode: Encode, max_length: int, head_fraction: float, index: int, start: int
) -> list[int]:
    """The one window head+tail reads of `text`, as `split` cuts the encoding of the whole of it
    by `encode` (a tokenizer that does not truncate), from its ends only: `start` characters at
    each, doubled at an end until the tokens kept there are all the whole text's; at most
    SCAN_CHARS / 2 at each. A text whose ends meet is tokenized whole."""
    most = SCAN_CHARS // 2
    size = {"head": start, "tail": start}
    ids: dict[str, list[int]] = {}
    frame: dict[str, list[int]] = {}
    while size["head"] + size["tail"] < len(text):
        if "head" not in ids:
            enc = encode(text[: size["head"]])
            found = _stable_head(enc, size["head"], enc.word_ids)
            if found is not None:
                lead, stable = found
                frame["head"], ids["head"] = enc.ids[:lead], enc.ids[lead : lead + stable]
        if "tail" not in ids:
            enc = encode(text[len(text) - size["tail"] :])
            found = _stable_tail(enc)
            if found is not None:
                trail, stable = found
                end = len(enc.ids) - trail
                frame["tail"], ids["tail"] = enc.ids[end:], enc.ids[end - stable : end]
        budget = max_length - len(frame.get("head", [])) - len(frame.get("tail", []))
        want = dict(zip(("head", "tail"), head_tail_shares(budget, head_fraction), strict=True))
        short = [side for side in ("head", "tail") if len(ids.get(side, ())) < want[side]]
        short += [side for side in ("head", "tail") if side not in ids and side not in short]
        if not short:
            if budget <= 0:
                raise ValueError(
                    f"max_length {max_length} leaves no room between the special tokens"
                )
            tail = ids["tail"][len(ids["tail"]) - want["tail"] :] if want["tail"] else []
            return [*frame["head"], *ids["head"][: want["head"]], *tail, *frame["tail"]]
        for side in short:
            if size[side] >= most:
                raise _no_word_break(index, "start" if side == "head" else "end", most)
            size[side] = min(2 * size[side], most)
            ids.pop(side, None)
            frame.pop(side, None)
    enc = encode(text)
    return split(
        enc.ids, enc.special_tokens_mask, max_length, Reading(HEAD_TAIL, 0, head_fraction)
    )[0]
