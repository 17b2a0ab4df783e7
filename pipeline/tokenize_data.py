"""Stage tokenize: the model's fast tokenizer over every split, saved with `save_to_disk`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import entry, params, tasks
from pipeline.atomic import atomic_dir, write_json
from pipeline.sources import resolve_model
from pipeline.tables import SPLITS

log = logging.getLogger(__name__)


def run(validated_dir: Path, params_path: Path, out_dir: Path, report: Path) -> dict[str, Any]:
    """Tokenise `validated_dir/{split}.parquet` (no padding) into a DatasetDict at `out_dir`."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    p = params.load(params_path, "base", "tokenize")
    task = tasks.get(p.base.task)
    labels = json.loads((validated_dir / "labels.json").read_text(encoding="utf-8"))
    label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(p.base.model))
    if not tokenizer.is_fast:
        raise ValueError(f"base.model {p.base.model!r} has no fast tokenizer (tokenizer.json)")
    splits = {}
    stats: dict[str, Any] = {"max_length": p.base.max_length, "splits": {}}
    for split in SPLITS:
        dataset = Dataset.from_parquet(str(validated_dir / f"{split}.parquet"))
        full = dataset.map(
            lambda b: {"n_tokens": [len(x) for x in tokenizer(b["text"])["input_ids"]]},
            batched=True,
            batch_size=p.tokenize.batch_size,
            desc=f"measuring {split}",
        )["n_tokens"]
        splits[split] = dataset.map(
            lambda b: task.tokenize_batch(tokenizer, b, p.base.max_length, label2id),
            batched=True,
            batch_size=p.tokenize.batch_size,
            remove_columns=dataset.column_names,
            desc=f"tokenizing {split}",
        )
        lengths = np.asarray(full)
        truncated = float((lengths > p.base.max_length).mean()) if len(lengths) else 0.0
        stats["splits"][split] = {
            "rows": len(dataset),
            "truncation_rate": round(truncated, 6),
            "token_length": {
                f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99, 100)
            },
        }
        log.info("%s: %d rows, %.2f%% truncated", split, len(dataset), 100 * truncated)
    with atomic_dir(out_dir) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
    write_json(report, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--validated", type=Path, required=True)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    return entry.guarded(lambda: run(args.validated, args.params, args.out, args.report))


if __name__ == "__main__":
    raise SystemExit(main())
