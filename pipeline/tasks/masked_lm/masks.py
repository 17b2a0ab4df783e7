"""Masked-LM inputs: token blocks, whole-word and salient-span masking, the collator."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from pipeline.core.sources import resolve_path

IGNORE = -100  # the label of positions the loss skips


@functools.cache
def jieba_tokenizer(user_words: str) -> Any:
    """A jieba segmenter of its own (the module-level one is shared state), with `user_words`
    (a file of words, one a line) added to its dictionary."""
    import jieba

    segmenter = jieba.Tokenizer()
    if user_words:
        segmenter.load_userdict(str(resolve_path(user_words, "fill-mask.user_words")))
    return segmenter


def word_offsets(
    text: str, offsets: list[tuple[int, int]], segmenter: str, user_words: str = ""
) -> list[list[int]]:
    """Token offsets moved apart between the words of `segmenter`, so that whole-word masking
    (which starts a word wherever a token does not touch the previous one) sees those words."""
    if not segmenter:
        return [list(o) for o in offsets]
    word_of = np.zeros(len(text) + 1, dtype=np.int64)
    start = 0
    for index, word in enumerate(jieba_tokenizer(user_words).cut(text, HMM=False)):
        word_of[start : start + len(word)] = index
        start += len(word)
    word_of[len(text)] = word_of[len(text) - 1] if text else 0
    return [[s + int(word_of[s]), e + int(word_of[max(e - 1, s)])] for s, e in offsets]


def blocks(
    encoded: dict[str, list],
    texts: list[str],
    tokenizer: Any,
    width: int,
    group: bool,
    masking: Any,
) -> dict[str, list]:
    """Token blocks of at most `width` tokens with special tokens: the lines concatenated and cut
    (group) or one per line, truncated. Offsets keep a gap between lines for whole-word masking."""
    prefix, suffix = special_frame(tokenizer)
    inner = width - len(prefix) - len(suffix)
    chunks: list[tuple[list[int], list[list[int]]]] = []
    ids_run: list[int] = []
    offs_run: list[list[int]] = []
    base = 0
    for ids, offsets, text in zip(
        encoded["input_ids"], encoded["offset_mapping"], texts, strict=True
    ):
        words = word_offsets(text, offsets, masking.segmenter, masking.user_words)
        moved = [[s + base, e + base] for s, e in words]
        base = (moved[-1][1] if moved else base) + 2
        if not group:
            chunks.append((ids[:inner], moved[:inner]))
            continue
        ids_run += ids
        offs_run += moved
        while len(ids_run) >= inner:
            chunks.append((ids_run[:inner], offs_run[:inner]))
            ids_run, offs_run = ids_run[inner:], offs_run[inner:]
    if group and ids_run:
        chunks.append((ids_run, offs_run))
    out: dict[str, list] = {"input_ids": [], "special_tokens_mask": [], "offset_mapping": []}
    for ids, offsets in chunks:
        special = [1] * len(prefix) + [0] * len(ids) + [1] * len(suffix)
        out["input_ids"].append([*prefix, *ids, *suffix])
        out["special_tokens_mask"].append(special)
        out["offset_mapping"].append([[0, 0]] * len(prefix) + offsets + [[0, 0]] * len(suffix))
    out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
    if "token_type_ids" in tokenizer.model_input_names:
        out["token_type_ids"] = [[0] * len(ids) for ids in out["input_ids"]]
    return out


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text ([CLS] / [SEP], <s> /
    </s>), read from how it encodes a word."""
    enc = tokenizer("a", return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    if 0 not in special:
        raise ValueError("the tokenizer encodes 'a' as special tokens only; check base.model")
    first, last = special.index(0), len(special) - special[::-1].index(0)
    return ids[:first], ids[last:]


class MaskingCollator:
    """Training batches are masked on the fly by the library's collator (dynamic masking);
    held-out batches, masked once when tokenized, are only padded."""

    def __init__(self, tokenizer: Any, masking: Any, seed: int | None = None) -> None:
        from transformers import (
            DataCollatorForLanguageModeling,
            DataCollatorForTokenClassification,
        )

        self.mlm = DataCollatorForLanguageModeling(
            tokenizer,
            mlm_probability=masking.probability,
            mask_replace_prob=masking.mask_replace_prob,
            random_replace_prob=masking.random_replace_prob,
            whole_word_mask=masking.whole_word,
            seed=seed,
        )
        self.pad = DataCollatorForTokenClassification(tokenizer)
        self.whole_word = masking.whole_word
        self.mask_id = tokenizer.mask_token_id
        self.salient = salient_ids(tokenizer, masking.salient_words)
        self.salient_probability = masking.salient_probability
        self.salient_prefix = masking.salient_prefix_probability
        self.generator = None
        if seed is not None:
            import torch

            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "labels" in features[0]:
            return self.pad(features)
        width = max(len(f["input_ids"]) for f in features)
        keep = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")
        batch = []
        for f in features:
            row = {k: list(f[k]) for k in keep if k in f}
            if self.whole_word:
                offsets = [list(o) for o in f["offset_mapping"]]
                row["offset_mapping"] = offsets + [[0, 0]] * (width - len(offsets))
            batch.append(row)
        out = self.mlm(batch)
        if self.salient and self.salient_probability > 0:
            self.mask_salient(out, [list(f["input_ids"]) for f in features])
        return out

    def mask_salient(self, out: dict[str, Any], originals: list[list[int]]) -> None:
        """Salient-span masking: each occurrence of a salient word is masked whole with
        `salient_probability`, on top of what the library's collator masked; with
        `salient_prefix_probability` of those, its first 1 to n-1 tokens stay visible instead."""
        import torch

        for row, ids in enumerate(originals):
            for start, length in find_spans(ids, self.salient):
                draw = torch.rand(1, generator=self.generator).item()
                if draw >= self.salient_probability:
                    continue
                shown = 0  # leading tokens left visible (with no loss), for left-to-right fills
                if (
                    length > 1
                    and self.salient_prefix > 0
                    and torch.rand(1, generator=self.generator).item() < self.salient_prefix
                ):
                    shown = int(torch.randint(1, length, (1,), generator=self.generator))
                if shown:
                    head = slice(start, start + shown)
                    out["labels"][row, head] = IGNORE
                    out["input_ids"][row, head] = torch.tensor(ids[head])
                span = slice(start + shown, start + length)
                out["labels"][row, span] = torch.tensor(ids[span])
                out["input_ids"][row, span] = self.mask_id


def salient_ids(tokenizer: Any, words_file: str) -> list[list[int]]:
    """The token ids of each salient word (longest first, so a longer name wins)."""
    if not words_file:
        return []
    path = resolve_path(words_file, "fill-mask.salient_words")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    return sorted((i for i in ids if i), key=len, reverse=True)


def find_spans(ids: list[int], spans: list[list[int]]) -> list[tuple[int, int]]:
    """(start, length) of every non-overlapping occurrence of the `spans` in `ids`."""
    found, i = [], 0
    while i < len(ids):
        for span in spans:
            if ids[i : i + len(span)] == span:
                found.append((i, len(span)))
                i += len(span)
                break
        else:
            i += 1
    return found


def mask_once(rows: dict[str, list], tokenizer: Any, masking: Any, seed: int) -> dict[str, list]:
    """Held-out blocks with a seeded mask, fixed once, so every evaluation reads the same one."""
    collator = MaskingCollator(tokenizer, masking, seed)
    out: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels")}
    if "token_type_ids" in rows:
        out["token_type_ids"] = list(rows["token_type_ids"])
    for i in range(len(rows["input_ids"])):
        one = collator([{k: rows[k][i] for k in rows}])
        out["input_ids"].append(one["input_ids"][0].tolist())
        out["labels"].append(one["labels"][0].tolist())
        out["attention_mask"].append(list(rows["attention_mask"][i]))
    return out
