"""Entity metrics of decoded tags: windows merged back into words, each sentence decoded as a
whole (bertrt.decoding), scored as seqeval's strict IOB2 mode counts entities."""

from __future__ import annotations

from typing import Any

import numpy as np

from bertrt.decoding import ARGMAX, Decoder, invalid_steps, log_softmax
from pipeline.tasks.token_classification.tagging import split_tag

OUTSIDE = "O"
IGNORE = -100  # the label id the loss and the metrics skip


class Scores(np.ndarray):
    """A tagger's per-token logits, as `predict` returns them, that also carry how the model
    is decoded (`decoder`; None where they came from elsewhere). numpy's documented way to add
    an attribute to an array: slices and views keep it."""

    decoder: Decoder | None

    def __new__(cls, logits: np.ndarray, decoder: Decoder | None) -> Scores:
        scores = np.asarray(logits, dtype=np.float64).view(cls)
        scores.decoder = decoder
        return scores

    def __array_finalize__(self, obj: Any) -> None:
        self.decoder = getattr(obj, "decoder", None)


def seqeval_scores(truth: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Entity-level micro P/R/F1 overall and per type, strict IOB2, as seqeval computes them."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    report = classification_report(
        truth, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0
    )
    micro = report.pop("micro avg")
    for key in ("macro avg", "weighted avg"):
        report.pop(key, None)
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "per_type": {
            kind: {
                "precision": float(v["precision"]),
                "recall": float(v["recall"]),
                "f1": float(v["f1-score"]),
                "support": int(v["support"]),
            }
            for kind, v in sorted(report.items())
        },
    }


def spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """(first word, last word + 1, type) of each IOB2 entity, read strictly as seqeval's strict
    mode does: only B- opens an entity, so a stray I- is no entity."""
    out, start, kind = set(), None, ""
    for i, tag in enumerate([*tags, OUTSIDE]):
        prefix, this = split_tag(tag)
        if start is not None and (prefix != "I" or this != kind):
            out.add((start, i, kind))
            start = None
        if prefix == "B":
            start, kind = i, this
    return out


def word_positions(
    word_ids: list[list[int]], example_ids: list[int], rows: int
) -> list[dict[int, tuple[int, int]]]:
    """Per example, word -> (window, position) of its first token in the window where the word
    has most context: where its scores and its label are read."""
    best: list[dict[int, tuple[int, int, int]]] = [{} for _ in range(rows)]
    for window, (words, example) in enumerate(zip(word_ids, example_ids, strict=True)):
        content = [j for j, w in enumerate(words) if w >= 0]
        for rank, j in enumerate(content):
            word = words[j]
            if j > 0 and words[j - 1] == word:
                continue  # only a word's first token speaks for it
            context = min(rank, len(content) - 1 - rank)
            if word not in best[example] or context > best[example][word][0]:
                best[example][word] = (context, window, j)
    return [{w: (window, j) for w, (_, window, j) in words.items()} for words in best]


def word_log_probs(
    outputs: np.ndarray, positions: dict[int, tuple[int, int]], count: int, labels: list[str]
) -> np.ndarray:
    """(count, labels) log-probabilities of a sentence's words from the per-token `outputs` at
    their `positions`; a word no window reached (cut off at max_length) is O."""
    outside = labels.index(OUTSIDE) if OUTSIDE in labels else 0
    out = np.full((count, len(labels)), -np.inf)
    out[:, outside] = 0.0
    for word, (window, j) in positions.items():
        if word < count:
            out[word] = log_softmax(outputs[window, j])
    return out


def decode_sentences(sentences: list[np.ndarray], decoder: Decoder) -> list[list[str]]:
    """Each sentence's word tags, decoded as a whole."""
    return [[decoder.labels[i] for i in decoder.decode(words)] for words in sentences]


def compare_decodings(
    truth: list[list[str]], sentences: list[np.ndarray], decoder: Decoder
) -> tuple[dict[str, dict[str, Any]], dict[str, list[list[str]]]]:
    """({decoding: P/R/F1, F1 per entity type (`f1_TYPE`), the sentences with a step IOB2
    forbids, and 1 for the model's own decoding}, {decoding: tags}) for every decoding the model
    allows, on the same scores."""
    results, guesses = {}, {}
    for mode in decoder.modes():
        guess = decode_sentences(sentences, decoder.using(mode))
        scores = seqeval_scores(truth, guess)
        results[mode] = {
            "precision": scores["precision"],
            "recall": scores["recall"],
            "f1": scores["f1"],
            **{f"f1_{kind}": v["f1"] for kind, v in scores["per_type"].items()},
            "invalid_sequences": sum(invalid_steps(tags) > 0 for tags in guess),
            "shipped": int(mode == decoder.mode),
        }
        guesses[mode] = guess
    return results, guesses


def decoder_of(predictions: np.ndarray, labels: list[str]) -> Decoder:
    """The decoding `predict`'s scores carry; argmax for scores from elsewhere."""
    decoder = getattr(predictions, "decoder", None) or Decoder(tuple(labels), ARGMAX)
    if list(decoder.labels) != list(labels):
        raise ValueError(
            f"the model's labels {list(decoder.labels)!r:.120} are not the data's "
            f"{labels!r:.120}; re-run finetune on this data"
        )
    return decoder


def select_sentences(
    outputs: np.ndarray, dataset: Any, counts: list[int], labels: list[str]
) -> list[np.ndarray]:
    """Per sentence (`counts` words each), its words' log-probabilities, windows merged
    back."""
    positions = word_positions(dataset["word_ids"], dataset["example_id"], len(counts))
    return [
        word_log_probs(outputs, at, count, labels)
        for at, count in zip(positions, counts, strict=True)
    ]


def validation_sentences(
    outputs: np.ndarray, dataset: Any, labels: list[str]
) -> tuple[list[np.ndarray], list[list[str]]]:
    """(word log-probabilities, word tags) per validation sentence, both read where the word's
    first token has most context (its label there is the word's tag)."""
    examples = dataset["example_id"]
    rows = max(examples, default=-1) + 1
    positions = word_positions(dataset["word_ids"], examples, rows)
    label_rows = dataset["labels"]
    found, truth = [], []
    for at in positions:
        tagged = {w: label_rows[window][j] for w, (window, j) in at.items()}
        tagged = {w: tag for w, tag in tagged.items() if tag != IGNORE}
        count = max(tagged, default=-1) + 1
        found.append(word_log_probs(outputs, at, count, labels))
        truth.append([labels[tagged.get(w, 0)] for w in range(count)])
    return found, truth


def text_word_log_probs(
    offsets: np.ndarray, scores: np.ndarray, tokens: list[str], labels: list[str]
) -> np.ndarray:
    """(words, labels) log-probabilities of a sentence from the runtime's tokens of its words
    joined by spaces (character `offsets`, per-token `scores`); each word's first token speaks
    for it, and a word without one (cut off) is O."""
    starts = np.cumsum([0, *[len(t) + 1 for t in tokens[:-1]]])
    out = np.full((len(tokens), len(labels)), -np.inf)
    out[:, labels.index(OUTSIDE) if OUTSIDE in labels else 0] = 0.0
    seen = set()
    for (start, _), row in zip(offsets, scores, strict=True):
        word = int(np.searchsorted(starts, start, side="right")) - 1
        if word not in seen:
            seen.add(word)
            out[word] = log_softmax(row)
    return out
