"""Extending a checkpoint's vocabulary with the characters it reads as [UNK] (e.g. Chinese on an
English WordPiece), measured by the [UNK] rate before and after."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)
# The extended tokenizer's folder inside the tokenize stage's output; finetune trains with it.
TOKENIZER_DIR = "tokenizer"


def unk_rate(tokenizer: Any, texts: list[str]) -> float:
    """Share of (non-special) tokens that are [UNK]."""
    unk = tokenizer.unk_token_id
    total = hits = 0
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        total += len(ids)
        hits += sum(1 for i in ids if i == unk)
    return hits / total if total else 0.0


def unknown_characters(tokenizer: Any, texts: list[str]) -> Counter[str]:
    """How often each character that the tokenizer alone maps to [UNK] occurs in `texts`."""
    unk = tokenizer.unk_token_id
    counts: Counter[str] = Counter()
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    for text, ids, offsets in zip(
        texts, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        for token, (start, end) in zip(ids, offsets, strict=True):
            if token == unk:
                counts.update(c for c in text[start:end] if not c.isspace())
    cache: dict[str, bool] = {}
    for char in list(counts):
        if char not in cache:
            ids = tokenizer(char, add_special_tokens=False)["input_ids"]
            cache[char] = ids == [unk]
        if not cache[char]:
            del counts[char]
    return counts


def extend(tokenizer: Any, texts: list[str], min_count: int) -> dict[str, Any]:
    """Add every character seen at least `min_count` times as [UNK] to `tokenizer` (in place).

    Characters are added as whole tokens (`add_tokens`), so each is split off wherever it occurs;
    the model's embedding matrix is resized to match before fine-tuning, the new rows starting at
    the mean of the old ones.
    """
    before = unk_rate(tokenizer, texts)
    counts = unknown_characters(tokenizer, texts)
    chosen = sorted(c for c, n in counts.items() if n >= min_count)
    added = tokenizer.add_tokens(chosen)
    after = unk_rate(tokenizer, texts)
    log.info(
        "vocabulary: +%d characters seen >= %d times as [UNK]; [UNK] rate %.2f%% -> %.2f%%",
        added,
        min_count,
        100 * before,
        100 * after,
    )
    return {
        "added_tokens": added,
        "unknown_characters": len(counts),
        "min_count": min_count,
        "vocab_size": len(tokenizer),
        "unk_rate_before": round(before, 6),
        "unk_rate_after": round(after, 6),
    }
