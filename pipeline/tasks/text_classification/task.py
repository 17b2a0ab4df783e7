"""Sequence classification: one label per text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bertrt import long_text
from bertrt.long_text import aggregate
from bertrt.predictors import TEXT_CLASSIFICATION
from pipeline.core.params import Params
from pipeline.core.tables import (
    TableError,
    duplicates,
    key_digests,
    read_table,
    read_table_chunks,
    table_format,
    text_key,
)
from pipeline.tasks.base import Task
from pipeline.tasks.columns import Columns, plain_encoding
from pipeline.tasks.confusion import confusion_png
from pipeline.tasks.percentiles import percentiles
from pipeline.tasks.text_classification import checks
from pipeline.tasks.text_classification.calibration import (
    calibration,
    expected_calibration_error,
    softmax,
)
from pipeline.tasks.text_classification.schema import as_label, refuse_mixed

TEXT = "text"
LABEL = "label"


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Accuracy and macro-F1, the Trainer's model-selection metrics."""
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred
    predicted = np.asarray(logits).argmax(axis=-1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def metrics(probs: np.ndarray, truth: np.ndarray, labels: list[str], bins: int) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    predicted = probs.argmax(axis=-1)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=list(range(len(labels))), zero_division=0
    )
    return {
        "overall": {
            "accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
            "weighted_f1": float(f1_score(truth, predicted, average="weighted", zero_division=0)),
            "ece": expected_calibration_error(probs, truth, bins),
            "rows": len(truth),
        },
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


class TextClassification(Task):
    name = TEXT_CLASSIFICATION
    columns = (TEXT, LABEL)
    selection_metric = "macro_f1"
    streams = True
    dedupe_reasons = ("conflicting_labels", "duplicate_text")
    long_inputs = "read as text-classification.strategy says (truncate, head+tail or windows)"
    headline = ("accuracy", "macro_f1", "ece", "calibration.ece_after", "validation.macro_f1")

    def accepts(self, path: Path) -> bool:
        return table_format(path) is not None

    def read(self, path: Path, p: Params) -> pd.DataFrame:
        df = read_table(path, texts=(p.base.text_column,))
        self._has_columns(path, df, p)
        return refuse_mixed(path, df, p.base.text_column, p.base.label_column)

    def read_chunks(self, path: Path, p: Params, rows: int) -> Iterator[pd.DataFrame]:
        text, label = p.base.text_column, p.base.label_column
        kinds: dict[str, str] = {}
        read_any = False
        for chunk in read_table_chunks(path, texts=(text,), rows=rows):
            if not read_any:
                self._has_columns(path, chunk, p)
            read_any = True
            yield refuse_mixed(path, chunk, text, label, kinds)
        if not read_any:  # no data rows: read whole, which names what the file lacks
            yield self.read(path, p)

    def _has_columns(self, path: Path, df: pd.DataFrame, p: Params) -> None:
        keys = {"base.text_column": p.base.text_column, "base.label_column": p.base.label_column}
        for key, column in keys.items():
            if column not in df.columns:
                raise TableError(
                    f"{path}: no column {column!r} (set by {key}); the file has "
                    f"{list(df.columns)}; fix {key} in params.yaml"
                )

    def drop_rows(self, df: pd.DataFrame, p: Params) -> tuple[pd.DataFrame, dict[str, int]]:
        cfg, text, label = p.ingest, p.base.text_column, p.base.label_column
        dropped: dict[str, int] = {}
        if cfg.drop_labels:
            mask = df[label].astype("string").isin(cfg.drop_labels)
            dropped["label_in_drop_labels"] = int(mask.sum())
            df = df[~mask.fillna(False)]
        if cfg.drop_empty_text:
            empty = df[text].isna() | (df[text].astype("string").str.strip() == "")
            dropped["empty_text"] = int(empty.sum())
            df = df[~empty]
        return df, dropped

    def targets(self, df: pd.DataFrame, p: Params) -> pd.Series:
        return df[p.base.label_column]

    def clean(self, df: pd.DataFrame, p: Params) -> tuple[pd.DataFrame, dict[str, int]]:
        df, dropped = self.drop_rows(df, p)
        if p.ingest.deduplicate:
            keys = self.key(df, p)
            targets = pd.factorize(self.targets(df, p))[0]
            conflicting, duplicate = duplicates(key_digests(keys), targets, keys.isna().to_numpy())
            dropped[self.dedupe_reasons[0]] = int(conflicting.sum())
            dropped[self.dedupe_reasons[1]] = int(duplicate.sum())
            df = df[~(conflicting | duplicate)]
        return df.reset_index(drop=True), dropped

    def key(self, df: pd.DataFrame, p: Params) -> pd.Series:
        return text_key(df[p.base.text_column])

    def stratify(self, df: pd.DataFrame, p: Params) -> pd.Series:
        return df[p.base.label_column].astype(str)

    def label_counts(self, df: pd.DataFrame, p: Params) -> dict[str, int]:
        return {str(k): int(v) for k, v in df[p.base.label_column].value_counts().items()}

    def check(
        self, frames: dict[str, pd.DataFrame], files: dict[str, Path], p: Params
    ) -> tuple[list[str], list[dict[str, Any]]]:
        return checks.check_pieces({s: one_piece(df) for s, df in frames.items()}, files, p)

    def check_pieces(
        self, pieces: dict[str, checks.Pieces], files: dict[str, Path], p: Params
    ) -> tuple[list[str], list[dict[str, Any]]]:
        return checks.check_pieces(pieces, files, p)

    def validated(self, df: pd.DataFrame, p: Params) -> pd.DataFrame:
        return pd.DataFrame(
            {
                TEXT: df[p.base.text_column].astype(str),
                LABEL: df[p.base.label_column].map(as_label),
            }
        )

    def split_stats(self, df: pd.DataFrame, tokenizer: Any, p: Params) -> dict[str, Any]:
        return self.split_stats_pieces(iter([df]), tokenizer, p)

    def split_stats_pieces(
        self, pieces: Iterator[pd.DataFrame], tokenizer: Any, p: Params
    ) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        chars, words, tokens = [], [], []
        for df in pieces:
            counts.update(df[LABEL])
            chars.append(df[TEXT].str.len().to_numpy(dtype=np.int64))
            words.append(df[TEXT].str.split().str.len().to_numpy(dtype=np.int64))
            tokens.append(lengths(tokenizer, df[TEXT].tolist()))
        rows = sum(counts.values())
        # Most frequent first, ties in the order met (pandas' value_counts order).
        ordered = sorted(counts.items(), key=lambda item: -item[1])
        all_tokens = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
        return {
            "rows": rows,
            "class_balance": {k: round(v / rows, 4) for k, v in ordered},
            "class_counts": {k: int(v) for k, v in ordered},
            "chars": percentiles(np.concatenate(chars) if chars else []),
            "words": percentiles(np.concatenate(words) if words else []),
            "tokens": percentiles(all_tokens),
            "over_max_length": int((all_tokens > p.base.max_length).sum()),
        }

    def tokenize(
        self,
        dataset: Any,
        tokenizer: Any,
        labels: list[str],
        p: Params,
        fingerprint: str,
        split: str = "train",
    ) -> tuple[Any, dict[str, Any]]:
        pieces = iter([dataset.data.table])
        return self.tokenize_pieces(pieces, tokenizer, labels, p, fingerprint, split)

    def tokenize_pieces(
        self,
        pieces: Iterator[Any],
        tokenizer: Any,
        labels: list[str],
        p: Params,
        fingerprint: str,
        split: str = "train",
        spool: Path | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        label2id = {label: i for i, label in enumerate(labels)}
        max_length, reading = p.base.max_length, self.reading(p)
        problems = reading.problems(max_length)
        if problems:
            raise ValueError(f"long_text: {'; '.join(problems)} (base.max_length {max_length})")
        has_types = "token_type_ids" in tokenizer.model_input_names

        columns = Columns(["labels", "doc"], token_types=has_types, spool=spool)
        unk_id, added = tokenizer.unk_token_id, tokenizer.num_special_tokens_to_add()
        tokens: list[np.ndarray] = []
        windows: list[np.ndarray] = []
        unk, doc = 0, 0
        step = p.tokenize.batch_size
        with plain_encoding(tokenizer) as encoder:
            for piece in pieces:
                texts, targets = piece.column(TEXT), piece.column(LABEL)
                for start in range(0, piece.num_rows, step):
                    # Whole texts, cut by the same code as the runtime's (bertrt.long_text);
                    # `doc` numbers the text each window comes from, to aggregate them again.
                    # The one encoding also gives each text's length and its [UNK] count.
                    encodings = encoder.encode_batch(texts.slice(start, step).to_pylist())
                    cuts: list[list[int]] = []
                    out: dict[str, list] = {"labels": [], "doc": []}
                    batch_tokens, batch_windows = [], []
                    for encoding, label in zip(
                        encodings, targets.slice(start, step).to_pylist(), strict=True
                    ):
                        ids = encoding.ids
                        batch_tokens.append(len(ids))
                        unk += ids.count(unk_id)
                        # long_text.split returns a text that fits as its one window; checked
                        # here too so that the special-tokens mask is built only for the texts
                        # it cuts.
                        if len(ids) <= max_length:
                            cut = [ids]
                        else:
                            special = encoding.special_tokens_mask
                            cut = long_text.split(ids, special, max_length, reading)
                        batch_windows.append(len(cut))
                        cuts += cut
                        out["labels"] += [label2id[label]] * len(cut)
                        out["doc"] += [doc] * len(cut)
                        doc += 1
                    columns.add(cuts, out)
                    tokens.append(np.asarray(batch_tokens, dtype=np.int64))
                    windows.append(np.asarray(batch_windows, dtype=np.int64))
                columns.flush()
        dataset = columns.dataset(fingerprint)
        all_tokens = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
        all_windows = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)
        return dataset, self._token_stats(all_tokens, all_windows, unk, added, max_length, p)

    def _token_stats(
        self,
        tokens: np.ndarray,
        windows: np.ndarray,
        unk: int,
        added: int,
        max_length: int,
        p: Params,
    ) -> dict[str, Any]:
        reading = self.reading(p)
        content = int(tokens.sum()) - added * len(tokens)  # the texts' own tokens
        over = tokens > max_length
        read = tokens if reading.strategy == long_text.WINDOWS else np.minimum(tokens, max_length)
        return {
            "rows": len(tokens),
            "truncation_rate": round(float(over.mean()), 6) if len(tokens) else 0.0,
            "token_length": percentiles(tokens),
            "long_text": reading.strategy,
            "windows": int(windows.sum()),
            "windows_per_text": percentiles(windows),
            # Share of all tokens the model sees (specials counted; 1.0 with windows).
            "tokens_read": round(float(read.sum() / tokens.sum()), 6) if len(tokens) else 1.0,
            # Share of the texts' own tokens (not the [CLS]/[SEP] added) that are [UNK].
            "unk_rate": round(unk / content, 6) if content > 0 else 0.0,
        }

    def reading(self, p: Params) -> long_text.Reading:
        return p.text_classification.reading()

    def model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, labels: list[str]) -> dict[str, Any]:
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            # Set up front: the model would set it on its first forward pass, so a run resumed
            # after the last step would otherwise save a different config.json.
            "problem_type": "single_label_classification",
        }

    def collator(self, tokenizer: Any, p: Params) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, labels: list[str]) -> Any:
        return compute_metrics

    def training_summary(self, dataset: Any) -> pd.DataFrame:
        return dataset.to_pandas()[["labels"]].assign(
            n_tokens=[len(x) for x in dataset["input_ids"]]
        )

    def evaluate(
        self,
        predictions: np.ndarray,
        dataset: Any,
        test: pd.DataFrame,
        labels: list[str],
        p: Params,
        plots_dir: Path,
        validation: Any = None,
    ) -> dict[str, Any]:
        how = self.reading(p).aggregate
        logits, truth = per_text(predictions, dataset, how)
        if len(test) != len(truth):
            raise ValueError(f"{len(test)} test rows but the tokenized test has {len(truth)}")
        probs = softmax(logits)
        result = metrics(probs, truth, labels, p.evaluate.ece_bins)
        if validation is not None:
            val_logits, val_truth = per_text(*validation(), how)
            val = metrics(softmax(val_logits), val_truth, labels, p.evaluate.ece_bins)["overall"]
            result["validation"] = {k: val[k] for k in ("accuracy", "macro_f1", "ece", "rows")}
            result["calibration"] = calibration(
                val_logits, val_truth, logits, truth, p.evaluate.ece_bins
            )
        predicted = probs.argmax(axis=-1)
        rows = pd.DataFrame(
            {"actual": [labels[i] for i in truth], "predicted": [labels[i] for i in predicted]}
        )
        rows.to_csv(plots_dir / "confusion.csv", index=False)
        wrong = np.flatnonzero(predicted != truth)
        order = np.argsort(-probs[wrong].max(axis=-1), kind="stable")
        worst = wrong[order][: p.evaluate.top_mistakes]
        pd.DataFrame(
            {
                "row": worst + 1,
                "text": test[TEXT].iloc[worst].to_numpy(),
                "actual": [labels[i] for i in truth[worst]],
                "predicted": [labels[i] for i in predicted[worst]],
                "confidence": probs[worst].max(axis=-1).round(4),
            }
        ).to_csv(plots_dir / "mistakes.csv", index=False)
        confusion_png(
            rows["actual"].tolist(),
            rows["predicted"].tolist(),
            labels,
            plots_dir / "confusion.png",
        )
        return result

    def texts(self, test: pd.DataFrame) -> list[str]:
        return test[TEXT].tolist()

    def score(
        self,
        windows: list[list[Any]],
        outputs: np.ndarray,
        test: pd.DataFrame,
        labels: list[str],
        p: Params,
        tokenizer: Any = None,
    ) -> float:
        truth = truth_ids(test, labels)
        per = aggregate(outputs, [len(w) for w in windows], self.reading(p).aggregate)
        return float((per.argmax(-1) == truth).mean()) if len(truth) else 0.0


def one_piece(df: pd.DataFrame) -> checks.Pieces:
    """A split read whole, as the one piece of itself."""
    return lambda: iter([df])


def per_text(outputs: np.ndarray, dataset: Any, how: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits, label ids), one row per text, from the rows of its windows (column `doc`)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    labels = np.asarray(dataset["labels"], dtype=np.int64)
    if "doc" not in dataset.column_names:  # one row per text
        return outputs, labels
    doc = np.asarray(dataset["doc"], dtype=np.int64)
    counts = np.bincount(doc)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return aggregate(outputs, counts, how), labels[starts]


def truth_ids(test: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Class ids of the test rows; a label the model does not know names itself."""
    unknown = sorted(set(test[LABEL]) - set(labels))
    if unknown:
        raise ValueError(f"test labels {unknown} are not among the model's {labels}")
    return np.asarray([labels.index(label) for label in test[LABEL]])


def lengths(tokenizer: Any, texts: list[str], batch: int = 4096) -> np.ndarray:
    """Token count of each text without truncation (special tokens counted), a batch at a
    time so that only one batch's encodings are held."""
    out = np.zeros(len(texts), dtype=np.int64)
    with plain_encoding(tokenizer) as encoder:
        for start in range(0, len(texts), batch):
            encodings = encoder.encode_batch(texts[start : start + batch])
            out[start : start + len(encodings)] = [len(e.ids) for e in encodings]
    return out
