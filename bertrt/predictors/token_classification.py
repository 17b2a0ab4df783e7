"""Token classification (NER): entities with type, score, text and character offsets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, ClassVar, NotRequired, TypedDict

import numpy as np
from tokenizers import Encoding

import bertrt.manifest as manifest_io
from bertrt.contract import TRANSITIONS_FILE
from bertrt.decoding import ARGMAX, CRF, Decoder, Transitions
from bertrt.engine import CHUNK, Engine
from bertrt.predictors.base import Doc, EngineBacked, Option, softmax

# The task's name, in manifests, params.yaml and the registry.
TOKEN_CLASSIFICATION = "token-classification"

# As transformers.pipeline("ner") defines them: "simple" groups tokens; "first", "max" and
# "average" first give each word one tag (its first token's, its most confident token's, or the
# argmax of its tokens' mean scores), then group words. Under Viterbi decoding (the manifest's
# `decoding`) words are always the units, decoded as a sequence: "simple" reads each word from
# its first token, as "first" does (a later subword carries no trained tag).
AGGREGATIONS = ("simple", "first", "max", "average")
# Probabilities below this are read as this before their log (no -inf from an underflow).
TINY = 1e-300


class TokenOut(TypedDict):
    text: str
    tag: str
    score: float
    start: int
    end: int


class EntityOut(TypedDict):
    type: Annotated[str, Doc("entity type, e.g. PER")]
    score: Annotated[float, Doc("mean probability of the entity's tags")]
    text: Annotated[str, Doc("the entity exactly as it appears in the text")]
    start: Annotated[int, Doc("offset of its first character in the text (code points)")]
    end: Annotated[int, Doc("offset just past its last character")]


class TaggingOut(TypedDict):
    entities: list[EntityOut]
    tokens: NotRequired[list[TokenOut]]


@dataclass(frozen=True)
class Token:
    """One model token: the text it covers, its tag and the tag's probability."""

    text: str
    tag: str
    score: float
    start: int
    end: int

    def as_dict(self) -> TokenOut:
        return {
            "text": self.text,
            "tag": self.tag,
            "score": self.score,
            "start": self.start,
            "end": self.end,
        }


@dataclass(frozen=True)
class Entity:
    type: str
    score: float
    text: str
    start: int
    end: int

    def as_dict(self) -> EntityOut:
        return {
            "type": self.type,
            "score": self.score,
            "text": self.text,
            "start": self.start,
            "end": self.end,
        }


@dataclass(frozen=True)
class Tagging:
    """The entities of one text and, on request, every token's tag."""

    entities: list[Entity]
    tokens: list[Token] | None = None

    def as_dict(self) -> TaggingOut:
        out: TaggingOut = {"entities": [e.as_dict() for e in self.entities]}
        if self.tokens is not None:
            out["tokens"] = [t.as_dict() for t in self.tokens]
        return out


def merge_windows(
    windows: list[Encoding], outputs: list[np.ndarray], stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets (k, 2), scores (k, labels), word ids (k,)) over a text's tokens, each read once.

    Each window repeats the last `stride` content tokens of the one before. A token in two
    windows is taken from the one where it has the most context on both sides (the rule of
    `run_qa`'s max-context windows).
    """
    best: dict[int, tuple[int, tuple[int, int], np.ndarray, int]] = {}
    position = 0
    for enc, out in zip(windows, outputs, strict=True):
        content = [j for j, special in enumerate(enc.special_tokens_mask) if not special]
        for rank, j in enumerate(content):
            context = min(rank, len(content) - 1 - rank)
            key = position + rank
            if key not in best or context > best[key][0]:
                word = enc.word_ids[j]
                best[key] = (context, enc.offsets[j], out[j], -1 if word is None else word)
        position += len(content) - stride
    keys = sorted(best)
    offsets = np.array([best[k][1] for k in keys], dtype=np.int64).reshape(-1, 2)
    scores = np.stack([best[k][2] for k in keys]) if keys else np.zeros((0, 0), np.float32)
    words = np.array([best[k][3] for k in keys], dtype=np.int64)
    return offsets, scores, words


@dataclass
class TokenClassifier(EngineBacked):
    """Named entities per text; texts longer than the limit are read in overlapping windows."""

    engine: Engine
    task = TOKEN_CLASSIFICATION
    # The graph's outputs and their dynamic axes (a label per token, read only where the
    # attention mask is 1).
    OUTPUTS: ClassVar[dict[str, dict[int, str]]] = {"logits": {0: "batch", 1: "sequence"}}
    LABELLED = True  # scores over labels.json (else over the tokenizer's vocabulary)
    OPTIONS = (
        Option(
            "aggregation",
            str,
            default="simple",
            help="how tokens form entities: simple groups tokens; first, max and average give "
            "each word one tag first",
            choices=AGGREGATIONS,
        ),
        Option("tokens", bool, default=False, help="also return every token's own tag"),
    )
    RESULT = TaggingOut
    TEXTS = "texts to find entities in, in order"
    SCHEMA_NAME = "Tag"

    def __post_init__(self) -> None:
        _ = self.decoder  # a bad transitions file fails the load, not the first request

    @cached_property
    def decoder(self) -> Decoder:
        """How tag scores become tags, as the manifest says (a CRF's transitions read from the
        folder, whose digest the engine verified)."""
        labels = tuple(self.labels)
        if self.manifest.decoding != CRF:
            return Decoder(labels, self.manifest.decoding)
        path = manifest_io.inside(self.folder, TRANSITIONS_FILE)
        try:
            return Decoder(labels, CRF, Transitions.read(path))
        except (OSError, ValueError) as exc:
            raise manifest_io.IntegrityError(
                f"{path}: not a usable CRF transitions file ({exc}); restore the folder from "
                "the export"
            ) from None

    def metadata(self) -> dict[str, Any]:
        return {**self.engine.metadata(), "decoding": self.manifest.decoding}

    def token_scores(
        self, texts: Sequence[str], batch_size: int = 32
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per text, (character offsets (k, 2), tag probabilities (k, labels), word ids (k,)) of
        its tokens; words are what the tokenizer's pre-tokenizer splits."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        result: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for start in range(0, len(texts), CHUNK):
            per_text = self.engine.encode(texts[start : start + CHUNK], first=start)
            flat = [w for windows in per_text for w in windows]
            logits, _ = self.engine.infer(flat, batch_size)
            at = 0
            for windows in per_text:
                outs = [logits[at + i, : len(w.ids)] for i, w in enumerate(windows)]
                at += len(windows)
                offsets, scores, words = merge_windows(windows, outs, self.engine.stride)
                if len(scores):
                    scores = softmax(scores.astype(np.float64))
                result.append((offsets, scores, words))
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
        decoder = self.decoder
        if decoder.mode != ARGMAX and aggregation == "simple":
            aggregation = "first"
        scored = self.token_scores(texts, batch_size)
        for text, (offsets, scores, words) in zip(texts, scored, strict=True):
            raw = [
                Token(text[s:e], self.labels[int(p.argmax())], float(p.max()), int(s), int(e))
                for (s, e), p in zip(offsets, scores, strict=True)
            ]
            units = raw
            if aggregation != "simple":
                units = word_units(text, offsets, scores, words, self.labels, aggregation, decoder)
            out.append(Tagging(group(units, text), raw if tokens else None))
        return out


def word_units(
    text: str,
    offsets: np.ndarray,
    scores: np.ndarray,
    words: np.ndarray,
    labels: list[str],
    aggregation: str,
    decoder: Decoder | None = None,
) -> list[Token]:
    """One tagged unit per word (consecutive tokens with one word id): its scores by the
    aggregation's rule (the first token's, the most confident token's, or their mean), its tag
    the argmax of them, or the decoder's choice over the text's words as a sequence."""
    bounds, probs = [], []
    start = 0
    while start < len(offsets):
        end = start + 1
        while end < len(offsets) and words[end] == words[start] and words[start] >= 0:
            end += 1
        group_scores = scores[start:end]
        if aggregation == "first":
            probs.append(group_scores[0])
        elif aggregation == "max":
            probs.append(group_scores[int(group_scores.max(axis=1).argmax())])
        else:
            probs.append(group_scores.mean(axis=0))
        bounds.append((int(offsets[start][0]), int(offsets[end - 1][1])))
        start = end
    if not probs:
        return []
    table = np.stack(probs)
    if decoder is None or decoder.mode == ARGMAX:
        tags = table.argmax(axis=1)
    else:
        tags = decoder.decode(np.log(np.maximum(table, TINY)))
    return [
        Token(text[s:e], labels[int(tag)], float(p[tag]), s, e)
        for (s, e), p, tag in zip(bounds, table, tags, strict=True)
    ]


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
