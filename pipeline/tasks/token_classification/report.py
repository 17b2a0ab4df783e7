"""The evaluate stage's tables for tagged data: entity-type confusion and the worst sentences."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

NONE = "O"  # an entity the other side does not have, in the confusion matrix


def entity_pairs(
    truth: list[str], guess: list[str], spans: Callable[[list[str]], set]
) -> list[tuple[str, str]]:
    """(actual type, predicted type) per entity span of either side; O where a side has none."""
    gold = {(s, e): t for s, e, t in spans(truth)}
    pred = {(s, e): t for s, e, t in spans(guess)}
    return [(gold.get(k, NONE), pred.get(k, NONE)) for k in sorted(set(gold) | set(pred))]


def render(tokens: list[str], tags: list[str], spans: Callable[[list[str]], set]) -> str:
    """Entities of a sentence as `[words](TYPE)`, sorted by position."""
    return "; ".join(f"{' '.join(tokens[s:e])} ({t})" for s, e, t in sorted(spans(tags)))


def write_report(
    test: pd.DataFrame,
    truth: list[list[str]],
    guess: list[list[str]],
    top: int,
    plots_dir: Path,
    confusion_png: Callable,
    spans: Callable[[list[str]], set],
) -> None:
    """confusion.csv / .png over entity types, and mistakes.csv with the worst sentences."""
    pairs = [p for t, g in zip(truth, guess, strict=True) for p in entity_pairs(t, g, spans)]
    rows = pd.DataFrame(pairs, columns=["actual", "predicted"])
    rows.to_csv(plots_dir / "confusion.csv", index=False)
    kinds = [*sorted((set(rows["actual"]) | set(rows["predicted"])) - {NONE}), NONE]
    confusion_png(
        rows["actual"].tolist(), rows["predicted"].tolist(), kinds, plots_dir / "confusion.png"
    )
    errors = [
        sum(a != b for a, b in zip(t, g, strict=True)) for t, g in zip(truth, guess, strict=True)
    ]
    order = sorted((i for i, n in enumerate(errors) if n), key=lambda i: (-errors[i], i))[:top]
    tokens = [list(t) for t in test["tokens"]]
    pd.DataFrame(
        {
            "line": [int(test["line"].iloc[i]) for i in order],
            "text": [" ".join(tokens[i]) for i in order],
            "wrong_tags": [errors[i] for i in order],
            "actual": [render(tokens[i], truth[i], spans) for i in order],
            "predicted": [render(tokens[i], guess[i], spans) for i in order],
        }
    ).to_csv(plots_dir / "mistakes.csv", index=False)
