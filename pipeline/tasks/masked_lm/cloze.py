"""Masked-LM building blocks: corpus files, probes, blocks of tokens, masking and scoring."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.sources import resolve_path
from pipeline.core.tables import TableError, encoding_error, read_table, table_format

TEXT_SUFFIXES = (".txt",)
IGNORE = -100


def is_text_file(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


WORD_POS = re.compile(r"\[?([^\s\[]+?)/[A-Za-z]+\]?[A-Za-z]*(?=\s|$)")


def strip_tags(line: str) -> str:
    """`迈向/v  充满/v  [中国/ns  政府/n]nt` -> `迈向充满中国政府` (People's Daily's word/POS
    format); words are joined without spaces, as Chinese is written."""
    return "".join(WORD_POS.findall(line))


def tagged(line: str) -> bool:
    """Whether every token of the line is a word/TAG one (a review's `in/out` is not)."""
    tokens = line.split()
    return bool(tokens) and all(WORD_POS.fullmatch(token) for token in tokens)


def read_lines(path: Path, column: str, text_format: str = "plain") -> pd.DataFrame:
    """A text file as one row a line (`line` is 1-based); a folder as all its .txt files.
    `word_pos` lines hold word/TAG tokens and become their words joined (lines without any
    stay as they are, so a plain corpus and a tagged rehearsal file can be read together)."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and is_text_file(f))
    if path.is_dir() and not files:
        raise TableError(
            f"{path}: a folder with no .txt files; give one text a line in .txt files"
        )
    frames = []
    for file in files if path.is_dir() else [path]:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise encoding_error(file) from None
        if text_format == "word_pos":  # a line without word/TAG tokens is plain text
            lines = [strip_tags(line) if tagged(line) else line for line in lines]
        frames.append(
            pd.DataFrame({column: lines, "line": np.arange(1, len(lines) + 1), "file": file.name})
        )
    return pd.concat(frames, ignore_index=True)


def read_corpus(path: Path, column: str, text_format: str = "plain") -> pd.DataFrame:
    """One text per row from a .txt file or folder, or the `column` of a CSV/JSONL/Parquet."""
    if path.is_dir() or is_text_file(path):
        return read_lines(path, column, text_format)
    if table_format(path) is None:
        raise TableError(
            f"{path}: unsupported file type; give a .txt file (one text a line), a folder of "
            ".txt files, or a .csv/.tsv/.jsonl/.parquet file with a text column"
        )
    df = read_table(path)
    if column not in df.columns:
        raise TableError(
            f"{path}: no column {column!r} (set by base.text_column); the file has "
            f"{list(df.columns)}; fix base.text_column in params.yaml"
        )
    return df.assign(line=np.arange(1, len(df) + 1))


def read_probes(path: Path) -> pd.DataFrame:
    """Probe rows {"text": "... [MASK] ...", "answer": "..."} from a JSONL file."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TableError(
                f"{path} line {number}: not JSON ({exc.msg}); one object a line"
            ) from None
        if not isinstance(row, dict) or not {"text", "answer"} <= set(row):
            raise TableError(
                f'{path} line {number}: give {{"text": "... [MASK] ...", "answer": "..."}}'
            )
        rows.append({"text": row["text"], "answer": row["answer"], "line": number})
    if not rows:
        raise TableError(
            f'{path}: no probes; give one JSON object a line or set ingest.probes: ""'
        )
    return pd.DataFrame(rows)


def split_long(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at the last space where there is one."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind(" ", limit // 2, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    return [*pieces, text] if text else pieces


@functools.cache
def jieba_tokenizer(user_words: str) -> Any:
    """A jieba segmenter of its own (the module-level one is shared state), with `user_words`
    (a file of words, one a line) added to its dictionary."""
    import jieba

    segmenter = jieba.Tokenizer()
    if user_words:
        segmenter.load_userdict(str(resolve_path(user_words, "masking.user_words")))
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
        `salient_probability`, on top of what the library's collator masked."""
        import torch

        for row, ids in enumerate(originals):
            for start, length in find_spans(ids, self.salient):
                draw = torch.rand(1, generator=self.generator).item()
                if draw < self.salient_probability:
                    span = slice(start, start + length)
                    out["labels"][row, span] = torch.tensor(ids[span])
                    out["input_ids"][row, span] = self.mask_id


def salient_ids(tokenizer: Any, words_file: str) -> list[list[int]]:
    """The token ids of each salient word (longest first, so a longer name wins)."""
    if not words_file:
        return []
    path = resolve_path(words_file, "masking.salient_words")
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


def heldout_scores(model: Any, dataset: Any, collator: Any, batch_size: int) -> dict[str, float]:
    """Summed negative log-likelihood and top-1/top-5 hits at the masked positions."""
    import torch

    model.eval()
    nll = top1 = top5 = count = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(rows)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            where = labels != IGNORE
            picked, truth = torch.log_softmax(logits[where], dim=-1), labels[where]
            nll -= float(picked.gather(1, truth[:, None]).sum())
            best = picked.topk(min(5, picked.shape[-1]), dim=-1).indices
            top1 += float((best[:, 0] == truth).sum())
            top5 += float((best == truth[:, None]).any(dim=-1).sum())
            count += int(where.sum())
    return {"nll": nll, "top1": top1, "top5": top5, "count": count}


def perplexity(scores: dict[str, float]) -> float:
    return math.exp(scores["nll"] / scores["count"]) if scores["count"] else float("nan")


def probe_fills(model: Any, tokenizer: Any, probes: pd.DataFrame) -> list[dict[str, Any]]:
    """Per probe, its fills as the runtime makes them (`bertrt.fill_mask`), each right only when
    every mask is: `fill`, each mask's best token from one pass (the `independent` strategy);
    `greedy`, each run of consecutive masks filled left to right, each best token put in before
    the next mask is read; `beam`, the same search keeping the runtime's default `beam_size`
    best partial fills; and the top 5 tokens of each mask, right when each answer token is in
    its mask's top 5."""
    import torch

    from bertrt.fill_mask import BEAM_SIZE

    model.eval()
    out = []
    with torch.no_grad():
        for text, answer in zip(probes["text"], probes["answer"], strict=True):
            enc = tokenizer(text, return_tensors="pt", truncation=True)
            where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
            first = torch.log_softmax(model(**enc).logits[0, where].float(), dim=-1)
            top = first.topk(min(5, first.shape[-1]), dim=-1).indices.tolist()
            best = [t[0] for t in top]
            greedy = joint_fill(model, enc, where, first, width=1)
            beam = joint_fill(model, enc, where, first, width=BEAM_SIZE)
            truth = tokenizer(answer, add_special_tokens=False)["input_ids"]
            out.append(
                {
                    "fill": fill_text(tokenizer, best),
                    "greedy": fill_text(tokenizer, greedy),
                    "greedy_ok": greedy == truth,
                    "beam": fill_text(tokenizer, beam),
                    "beam_ok": beam == truth,
                    "top5": [fill_text(tokenizer, t) for t in top],
                    "top1_ok": best == truth,
                    "top5_ok": len(top) == len(truth)
                    and all(a in t for a, t in zip(truth, top, strict=False)),
                    "masks": len(top),
                }
            )
    return out


def joint_fill(model: Any, enc: Any, where: list[int], first: Any, width: int) -> list[int]:
    """The best joint fill of every run of consecutive masks, by the runtime's own search
    (`bertrt.fill_mask.beam_search`, `width` best partial fills): the first mask of a run reads
    the one pass (`first`, log-probabilities per mask), the others a pass with the run's
    earlier tokens put in and the other runs still masked."""
    import torch

    from bertrt.fill_mask import beam_search, runs

    row_of = {p: r for r, p in enumerate(where)}
    filled: list[int] = []
    for group in runs(where):

        def rescore(step: int, prefixes: list[list[int]], group: list[int] = group) -> Any:
            ids = enc["input_ids"].repeat(len(prefixes), 1)
            ids[:, group[:step]] = torch.tensor(prefixes)
            batch = {k: v.expand(len(prefixes), -1) for k, v in enc.items()}
            logits = model(**{**batch, "input_ids": ids}).logits[:, group[step]].float()
            return torch.log_softmax(logits, dim=-1).numpy()

        rows = first[[row_of[p] for p in group]].numpy()
        filled += beam_search(rows, rescore, width)[0][0]
    return filled


def fill_text(tokenizer: Any, ids: list[int]) -> str:
    """Token ids as text, without the spaces a WordPiece decoder puts between CJK characters."""
    from bertrt.fill_mask import join_cjk

    return join_cjk(tokenizer.decode(ids))
