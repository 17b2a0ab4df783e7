"""Stage tokenize: the model's fast tokenizer over every split, saved with `save_to_disk`."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from bertrt.predictors import TEXT_CLASSIFICATION
from pipeline import tasks
from pipeline.core import entry, imports, layout, lineage, params
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.sources import load_options, resolve_model
from pipeline.core.spool import spool
from pipeline.core.tables import SPLITS
from pipeline.train import vocabulary
from pipeline.train.vocabulary import TOKENIZER_DIR

log = logging.getLogger(__name__)

# The params.yaml sections this stage reads (dvc.yaml lists the same).
SECTIONS = ("base", "tokenize", params.TASK_SECTION)
# Task params read after training only (how a long text's window logits combine): not part of
# the tokens' fingerprint.
NOT_TOKENS = (f"{TEXT_CLASSIFICATION}.aggregate",)
CHUNK_ROWS = 100_000  # rows read at a time by a task that streams


def run(validated_dir: Path, p: params.Params, out_dir: Path, report: Path) -> dict[str, Any]:
    """Tokenise `validated_dir/{split}.parquet` (no padding) into a DatasetDict at `out_dir`."""
    from datasets import DatasetDict
    from transformers import AutoTokenizer

    p = p.select(*SECTIONS)
    task = tasks.get(p.base.task)
    labels = json.loads(layout.labels_file(validated_dir).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(p.base.model), **load_options(p.base.trust_remote_code, weights=False)
    )
    if not tokenizer.is_fast:
        raise ValueError(f"base.model {p.base.model!r} has no fast tokenizer (tokenizer.json)")
    if task.window_stride(p) and not 0 < task.window_stride(p) < p.base.max_length // 2:
        raise ValueError(
            f"{task.name}.stride: {task.window_stride(p)} must be between 1 and half of "
            f"base.max_length ({p.base.max_length}) so that windows advance"
        )
    stats: dict[str, Any] = {"max_length": p.base.max_length, "splits": {}}
    if p.tokenize.vocab_extension_min_count:
        stats["vocabulary"] = vocabulary.extend(
            tokenizer,
            task.texts(pd.read_parquet(layout.split_file(validated_dir, layout.TRAIN))),
            p.tokenize.vocab_extension_min_count,
        )
    # What else decides the output: the tokenizer itself, the labels and the tokenising code.
    # The code: every project file this stage runs, as dvc.yaml lists them (core.imports).
    recipe = hashlib.sha256(
        tokenizer.backend_tokenizer.to_str().encode()
        + json.dumps(labels).encode()
        + imports.code_digest(__spec__.name).encode()
    ).hexdigest()
    # A task that streams writes each split's windows to a scratch file beside the output as
    # it reads the split in pieces; the saved dataset is then copied from it.
    with spool(out_dir) as store:
        splits = {}
        for split in SPLITS:
            path = layout.split_file(validated_dir, split)
            # The saved fingerprint is a function of the inputs only, not of the environment.
            # (How windows' logits are aggregated is evaluate's business, not the tokens'.)
            digest = p.digest(skip=NOT_TOKENS)
            key = f"{lineage.file_digest(path)}|{digest}|{recipe}|{split}"
            fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
            # Read into memory, or in pieces by a task that streams: nothing is written to (or
            # reused from) a datasets cache folder. One thread: Arrow's pool, started beside
            # the tokenizer's, costs more than it saves.
            if task.streams:
                pieces = pq.ParquetFile(path).iter_batches(
                    batch_size=CHUNK_ROWS, use_threads=False
                )
                where = store.folder / f"{split}.arrow"
            else:
                pieces, where = iter([pq.read_table(path, use_threads=False)]), None
            splits[split], split_stats = task.tokenize_pieces(
                pieces, tokenizer, labels, p, fingerprint, split, where
            )
            if "unk_rate" not in split_stats:  # a task that does not count [UNK] as it encodes
                texts = task.texts(pd.read_parquet(path))
                split_stats["unk_rate"] = round(vocabulary.unk_rate(tokenizer, texts), 6)
            stats["splits"][split] = split_stats
            log.info("%s: %s", split, split_stats)
        if not p.tokenize.vocab_extension_min_count:
            stats["vocabulary"] = {"unk_rate": stats["splits"]["train"]["unk_rate"]}
        with atomic_dir(out_dir) as tmp:
            DatasetDict(splits).save_to_disk(str(tmp))
            if p.tokenize.vocab_extension_min_count:
                tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            section = p.select(params.TASK_SECTION).as_dict() if task.trains_with_section else {}
            write_json(layout.task_params_file(tmp), section)
        splits.clear()  # the datasets read from the scratch files let go before they go
    write_json(report, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--validated", type=Path, required=True)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    return entry.guarded(
        lambda: run(args.validated, params.load(args.params, *SECTIONS), args.out, args.report),
        writes=[args.out, args.report],
    )


if __name__ == "__main__":
    raise SystemExit(main())
