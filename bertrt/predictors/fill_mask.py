"""Fill-mask: the best tokens for each mask, and joint fills for runs of consecutive masks.

One forward pass scores every mask on its own (`masks`). A run of several consecutive masks (a
name of three characters, a word of two pieces) is also filled jointly, left to right: greedy
takes the best token at the leftmost open mask, puts it in and runs the model again for the next;
beam search keeps the `beam_size` best partial fills at each step instead of one. A joint fill's
score is the product of its tokens' probabilities, each given the tokens put in before it.
`independent` reads every mask from the one pass (no token is put in) and ranks the fills by the
product of those probabilities: the strategy for a model trained with whole-word masking, which
saw a word's pieces hidden together, never one shown and the next hidden.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, TypedDict

import numpy as np
from tokenizers import Encoding

from bertrt.engine import CHUNK, Engine, ModelFolderError
from bertrt.predictors.base import Doc, EngineBacked, Option
from bertrt.session import run

# The task's name, in manifests, params.yaml and the registry.
FILL_MASK = "fill-mask"

MASK_TOKENS = ("[MASK]", "<mask>")
STRATEGIES = ("beam", "greedy", "independent")
MAX_TOP_K = 100
MAX_BEAM = 32
BEAM_SIZE = 4  # the default beam width: the Python API, the CLI, the server and evaluation
_CJK = (
    "\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
)
_CJK_GAP = re.compile(f"(?<=[{_CJK}])\\s+(?=[{_CJK}])")


def join_cjk(text: str) -> str:
    """Decoded text without the spaces a WordPiece decoder puts between CJK characters (and
    around tokens added to its vocabulary), and without spaces at its ends."""
    return _CJK_GAP.sub("", " ".join(text.split()))


class TokenScore(TypedDict):
    token: str
    score: Annotated[float, Doc("probability")]


class FillOut(TypedDict):
    start: Annotated[int, Doc("offset of the run's first mask in the text (code points)")]
    end: Annotated[int, Doc("offset just past its last mask")]
    masks: Annotated[int, Doc("consecutive masks in the run")]
    candidates: Annotated[list[TokenScore], Doc("joint fills, best first")]


class FillingOut(TypedDict):
    sequence: Annotated[str, Doc("the text with each run's best fill put in")]
    masks: Annotated[list[list[TokenScore]], Doc("per mask, its best tokens on their own")]
    fills: list[FillOut]


@dataclass(frozen=True)
class Candidate:
    token: str
    score: float

    def as_dict(self) -> TokenScore:
        return {"token": self.token, "score": self.score}


@dataclass(frozen=True)
class Fill:
    """A joint fill of one run of consecutive masks at characters start:end of the input."""

    start: int
    end: int
    masks: int
    candidates: list[Candidate]

    def as_dict(self) -> FillOut:
        return {
            "start": self.start,
            "end": self.end,
            "masks": self.masks,
            "candidates": [c.as_dict() for c in self.candidates],
        }


@dataclass(frozen=True)
class Filling:
    """One text: its best fills put in, each mask's top tokens, and each run's joint fills."""

    sequence: str
    masks: list[list[Candidate]]
    fills: list[Fill]

    def as_dict(self) -> FillingOut:
        return {
            "sequence": self.sequence,
            "masks": [[c.as_dict() for c in mask] for mask in self.masks],
            "fills": [f.as_dict() for f in self.fills],
        }


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def runs(positions: list[int]) -> list[list[int]]:
    """Consecutive positions grouped: [3, 4, 5, 9] -> [[3, 4, 5], [9]]."""
    out: list[list[int]] = []
    for p in positions:
        if out and out[-1][-1] == p - 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def beam_search(
    first: np.ndarray,
    rescore: Callable[[int, list[list[int]]], np.ndarray] | None,
    width: int,
) -> list[tuple[list[int], float]]:
    """Left-to-right beam search (width 1: greedy) over one run of masks: the fills kept, best
    first, as (token ids, summed log-probability), at most `width` of them.

    `first[step]` holds the one pass's log-probabilities of the run's mask `step`. For each
    later mask, `rescore(step, prefixes)` gives its log-probabilities with each kept fill's
    earlier tokens put in, one row per prefix (None: `first` is all the search reads).
    """
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    for step in range(len(first)):
        if step == 0 or rescore is None:
            rows = np.repeat(first[step][None, :], len(beams), axis=0)
        else:
            rows = rescore(step, [tokens for tokens, _ in beams])
        grown = []
        for (tokens, score), row in zip(beams, rows, strict=True):
            for t in np.argsort(-row, kind="stable")[:width]:
                grown.append(([*tokens, int(t)], score + float(row[t])))
        grown.sort(key=lambda b: -b[1])
        beams = grown[: max(width, 1)]
    return beams


@dataclass
class FillMask(EngineBacked):
    """Masked-LM head: fills the tokenizer's mask token ([MASK] or <mask>)."""

    engine: Engine
    task = FILL_MASK
    # The graph's outputs and their dynamic axes (vocabulary scores per token: the runtime
    # reads the rows at mask tokens).
    OUTPUTS: ClassVar[dict[str, dict[int, str]]] = {"logits": {0: "batch", 1: "sequence"}}
    LABELLED = False  # scores over labels.json (else over the tokenizer's vocabulary)
    OPTIONS = (
        Option(
            "top_k",
            int,
            default=5,
            help="the k best tokens per mask and fills per run of masks",
            minimum=1,
            maximum=MAX_TOP_K,
        ),
        Option(
            "strategy",
            str,
            default="beam",
            help="joint fills of consecutive masks: beam search or greedy left to right, or "
            "independent (each mask from one pass; for whole-word-masking models)",
            choices=STRATEGIES,
        ),
        Option(
            "beam_size",
            int,
            default=BEAM_SIZE,
            help="partial fills kept at each step",
            minimum=1,
            maximum=MAX_BEAM,
        ),
    )
    RESULT = FillingOut
    TEXTS = "texts with one mask token per token to fill"
    SCHEMA_NAME = "Fill"

    def __post_init__(self) -> None:
        tokenizer = self.engine.tokenizer
        found = [t for t in MASK_TOKENS if tokenizer.token_to_id(t) is not None]
        if not found:
            raise ModelFolderError(
                f"{self.engine.folder}: the tokenizer has none of {list(MASK_TOKENS)}; re-export"
            )
        self.mask_token = found[0]
        self.mask_id = int(tokenizer.token_to_id(found[0]))

    def predict(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        top_k: int | None = 5,
        strategy: str = "beam",
        beam_size: int = BEAM_SIZE,
    ) -> list[Filling]:
        """Per text (each with at least one mask token): fills, as the module describes."""
        top_k = 5 if top_k is None else top_k
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if not 1 <= beam_size <= MAX_BEAM:
            raise ValueError(f"beam_size must be between 1 and {MAX_BEAM}, got {beam_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        width = 1 if strategy == "greedy" else beam_size
        rerun = strategy != "independent"
        texts = list(texts) if not isinstance(texts, str) else texts
        out: list[Filling] = []
        for start in range(0, len(texts), CHUNK):
            chunk = texts[start : start + CHUNK]
            encodings = [w[0] for w in self.engine.encode(chunk, first=start)]
            for i, (text, enc) in enumerate(zip(chunk, encodings, strict=True)):
                if self.mask_id not in enc.ids:
                    where = "within the first max_length tokens" if self.mask_token in text else ""
                    raise ValueError(
                        f"text {start + i} has no {self.mask_token} {where}".rstrip()
                        + f"; put one {self.mask_token} for each token to fill"
                    )
            first = self._mask_scores(encodings, batch_size)
            for text, enc, scores in zip(chunk, encodings, first, strict=True):
                out.append(self._fill(text, enc, scores, top_k, width, batch_size, rerun))
        return out

    def _mask_scores(self, encodings: list[Encoding], batch_size: int) -> list[np.ndarray]:
        """Per encoding, log-probabilities (masks, vocabulary) at its mask tokens; only those
        rows of each batch's output are kept."""
        engine, result = self.engine, [np.empty(0)] * len(encodings)
        for idx in engine.batches(encodings, batch_size):
            logits = self._forward(engine.feeds([encodings[i] for i in idx]))
            for row, i in enumerate(idx):
                where = [j for j, t in enumerate(encodings[i].ids) if t == self.mask_id]
                result[i] = log_softmax(logits[row, where])
        return result

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        engine = self.engine
        return run(engine.session, feeds, engine.output_name, engine.provider)

    def _fill(
        self,
        text: str,
        enc: Encoding,
        scores: np.ndarray,
        top_k: int,
        width: int,
        batch: int,
        rerun: bool,
    ) -> Filling:
        positions = [j for j, t in enumerate(enc.ids) if t == self.mask_id]
        row_of = {p: r for r, p in enumerate(positions)}
        masks = [self._ranked(scores[r], top_k) for r in range(len(positions))]
        fills, sequence, shift = [], text, 0
        for group in runs(positions):
            if len(group) == 1:
                best = masks[row_of[group[0]]]
                joint = [(c.token, c.score) for c in best]
            else:
                rows = scores[[row_of[p] for p in group]]
                joint = self._joint(enc, group, rows, width, top_k, batch, rerun)
            start, end = enc.offsets[group[0]][0], enc.offsets[group[-1]][1]
            candidates = [Candidate(token, score) for token, score in joint]
            fills.append(Fill(start, end, len(group), candidates))
            sequence = sequence[: start + shift] + joint[0][0] + sequence[end + shift :]
            shift += len(joint[0][0]) - (end - start)
        return Filling(sequence, masks, fills)

    def _ranked(self, row: np.ndarray, k: int) -> list[Candidate]:
        ids = np.argsort(-row, kind="stable")[:k]
        return [Candidate(self._text([int(i)]), float(np.exp(row[i]))) for i in ids]

    def _text(self, ids: list[int]) -> str:
        return join_cjk(self.engine.tokenizer.decode(ids, skip_special_tokens=False)).strip()

    def _joint(
        self,
        enc: Encoding,
        group: list[int],
        first: np.ndarray,
        width: int,
        top_k: int,
        batch: int,
        rerun: bool,
    ) -> list[tuple[str, float]]:
        """Left-to-right beam search (width 1: greedy) over one run of masks; `first` holds the
        one pass's scores of the run's masks, and without `rerun` they are all it reads."""
        base = np.asarray(enc.ids, dtype=np.int64)

        def rescore(step: int, prefixes: list[list[int]]) -> np.ndarray:
            filled = []
            for tokens in prefixes:
                ids = base.copy()
                ids[group[:step]] = tokens
                filled.append(ids)
            return self._position_scores(filled, enc, group[step], batch)

        beams = beam_search(first, rescore if rerun else None, width)
        return [(self._text(tokens), float(np.exp(score))) for tokens, score in beams[:top_k]]

    def _position_scores(
        self, rows: list[np.ndarray], enc: Encoding, position: int, batch: int
    ) -> np.ndarray:
        """Log-probabilities at `position` for copies of one encoding with other input ids."""
        out = []
        for start in range(0, len(rows), batch):
            ids = np.stack(rows[start : start + batch])
            arrays = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": np.tile(np.asarray(enc.type_ids, dtype=np.int64), (len(ids), 1)),
            }
            feeds = {name: arrays[name] for name in self.engine.input_names}
            out.append(log_softmax(self._forward(feeds)[:, position]))
        return np.concatenate(out)
