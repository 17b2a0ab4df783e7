"""Token classification (NER): entities with type, score, text and character offsets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Encoding

from bertrt.contract import TOKEN_CLASSIFICATION
from bertrt.engine import CHUNK, Engine
from bertrt.predictor import EngineBacked, softmax

# As transformers.pipeline("ner") defines them: "simple" groups tokens; "first", "max" and
# "average" first give each word one tag (its first token's, its most confident token's, or the
# argmax of its tokens' mean scores), then group words.
AGGREGATIONS = ("simple", "first", "max", "average")


def is_cjk(char: str) -> bool:
    """CJK ideographs: each is a word of its own, as BERT's tokenizer treats them."""
    cp = ord(char)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def word_ids(text: str) -> np.ndarray:
    """Per character, the index of its word (-1 for whitespace).

    A word is a run of characters without whitespace, and every CJK character is a word: the
    unit a CoNLL token or an MSRA character is, so the model is read the way it was trained.
    """
    ids = np.full(len(text), -1, dtype=np.int64)
    word, inside = -1, False
    for i, char in enumerate(text):
        if char.isspace():
            inside = False
            continue
        if is_cjk(char) or not inside:
            word += 1
        ids[i] = word
        inside = not is_cjk(char)
    return ids


@dataclass(frozen=True)
class Token:
    """One model token: the text it covers, its tag and the tag's probability."""

    text: str
    tag: str
    score: float
    start: int
    end: int

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("text", "tag", "score", "start", "end")}


@dataclass(frozen=True)
class Entity:
    type: str
    score: float
    text: str
    start: int
    end: int

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("type", "score", "text", "start", "end")}


@dataclass(frozen=True)
class Tagging:
    """The entities of one text and, on request, every token's tag."""

    entities: list[Entity]
    tokens: list[Token] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"entities": [e.as_dict() for e in self.entities]}
        if self.tokens is not None:
            out["tokens"] = [t.as_dict() for t in self.tokens]
        return out


def merge_windows(
    windows: list[Encoding], outputs: list[np.ndarray], stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (k, 2), scores (k, labels)) over a text's tokens, each read once.

    Each window repeats the last `stride` content tokens of the one before. A token in two
    windows is taken from the one where it has the most context on both sides (the rule of
    `run_qa`'s max-context windows).
    """
    best: dict[int, tuple[int, tuple[int, int], np.ndarray]] = {}
    position = 0
    for enc, out in zip(windows, outputs, strict=True):
        content = [j for j, special in enumerate(enc.special_tokens_mask) if not special]
        for rank, j in enumerate(content):
            context = min(rank, len(content) - 1 - rank)
            key = position + rank
            if key not in best or context > best[key][0]:
                best[key] = (context, enc.offsets[j], out[j])
        position += len(content) - stride
    keys = sorted(best)
    offsets = np.array([best[k][1] for k in keys], dtype=np.int64).reshape(-1, 2)
    scores = np.stack([best[k][2] for k in keys]) if keys else np.zeros((0, 0), np.float32)
    return offsets, scores


@dataclass
class TokenClassifier(EngineBacked):
    """Named entities per text; texts longer than the limit are read in overlapping windows."""

    engine: Engine
    task = TOKEN_CLASSIFICATION
    OPTIONS = ("aggregation", "tokens")

    def token_scores(
        self, texts: Sequence[str], batch_size: int = 32
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, (character offsets (k, 2), tag probabilities (k, labels)) of its tokens."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        result: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(texts), CHUNK):
            per_text = self.engine.encode(texts[start : start + CHUNK])
            flat = [w for windows in per_text for w in windows]
            logits, _ = self.engine.infer(flat, batch_size)
            at = 0
            for windows in per_text:
                outs = [logits[at + i, : len(w.ids)] for i, w in enumerate(windows)]
                at += len(windows)
                offsets, scores = merge_windows(windows, outs, self.engine.stride)
                if len(scores):
                    scores = softmax(scores.astype(np.float64))
                result.append((offsets, scores))
        return result

    def predict(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        aggregation: str = "simple",
        tokens: bool = False,
    ) -> list[Tagging]:
        """Entities per text (aggregation: simple, first, max or average); `tokens` adds every
        token's own tag."""
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}"
            )
        out = []
        for text, (offsets, scores) in zip(
            texts, self.token_scores(texts, batch_size), strict=True
        ):
            raw = [
                Token(text[s:e], self.labels[int(p.argmax())], float(p.max()), int(s), int(e))
                for (s, e), p in zip(offsets, scores, strict=True)
            ]
            units = (
                raw if aggregation == "simple" else self._words(text, offsets, scores, aggregation)
            )
            out.append(Tagging(group(units, text), raw if tokens else None))
        return out

    def _words(
        self, text: str, offsets: np.ndarray, scores: np.ndarray, aggregation: str
    ) -> list[Token]:
        """One tagged unit per word, by the aggregation's rule."""
        if not len(offsets):
            return []
        ids = word_ids(text)
        # A token that starts on whitespace (rare, e.g. a byte-level space) joins the next word.
        owner = [int(ids[min(max(s, 0), len(text) - 1)]) if len(text) else 0 for s, _ in offsets]
        units = []
        start = 0
        while start < len(offsets):
            end = start + 1
            while end < len(offsets) and owner[end] == owner[start]:
                end += 1
            group_scores = scores[start:end]
            if aggregation == "first":
                probs = group_scores[0]
            elif aggregation == "max":
                probs = group_scores[int(group_scores.max(axis=1).argmax())]
            else:
                probs = group_scores.mean(axis=0)
            s, e = int(offsets[start][0]), int(offsets[end - 1][1])
            tag = int(probs.argmax())
            units.append(Token(text[s:e], self.labels[tag], float(probs[tag]), s, e))
            start = end
        return units


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("O", "") for O."""
    if tag == "O" or "-" not in tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def group(units: list[Token], text: str) -> list[Entity]:
    """Consecutive units of one type form an entity; B- starts a new one; O ends it."""
    entities: list[Entity] = []
    current: list[Token] = []
    kind = ""

    def close() -> None:
        if current:
            s, e = current[0].start, current[-1].end
            score = float(np.mean([u.score for u in current]))
            entities.append(Entity(kind, score, text[s:e], s, e))
            current.clear()

    for unit in units:
        prefix, unit_kind = split_tag(unit.tag)
        if prefix == "O":
            close()
            kind = ""
            continue
        if prefix == "B" or unit_kind != kind:
            close()
            kind = unit_kind
        current.append(unit)
    close()
    return entities
