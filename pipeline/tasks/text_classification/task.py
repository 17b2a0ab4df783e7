"""Sequence classification: one label per text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandera.errors import SchemaErrors

from bertrt import long_text
from bertrt.long_text import aggregate
from bertrt.predictors import TEXT_CLASSIFICATION
from pipeline.core.params import Params
from pipeline.core.tables import SPLITS, TableError, read_table, table_format, text_key
from pipeline.tasks.base import Task
from pipeline.tasks.columns import Columns, plain_encoding
from pipeline.tasks.confusion import confusion_png
from pipeline.tasks.percentiles import percentiles
from pipeline.tasks.text_classification.calibration import (
    calibration,
    expected_calibration_error,
    softmax,
)
from pipeline.tasks.text_classification.schema import (
    as_label,
    at_source,
    failures_from,
    has_kind,
    label_kind,
    refuse_mixed,
    schema,
)

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
    long_inputs = "read as text-classification.strategy says (truncate, head+tail or windows)"
    headline = ("accuracy", "macro_f1", "ece", "calibration.ece_after", "validation.macro_f1")

    def accepts(self, path: Path) -> bool:
        return table_format(path) is not None

    def read(self, path: Path, p: Params) -> pd.DataFrame:
        df = read_table(path, texts=(p.base.text_column,))
        keys = {"base.text_column": p.base.text_column, "base.label_column": p.base.label_column}
        for key, column in keys.items():
            if column not in df.columns:
                raise TableError(
                    f"{path}: no column {column!r} (set by {key}); the file has "
                    f"{list(df.columns)}; fix {key} in params.yaml"
                )
        return refuse_mixed(path, df, p.base.text_column, p.base.label_column)

    def clean(self, df: pd.DataFrame, p: Params) -> tuple[pd.DataFrame, dict[str, int]]:
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
        if cfg.deduplicate:
            key = text_key(df[text])
            conflicting = key.map(df.groupby(key)[label].nunique()) > 1
            dropped["conflicting_labels"] = int(conflicting.sum())
            df, key = df[~conflicting], key[~conflicting]
            duplicate = key.duplicated(keep="first")
            dropped["duplicate_text"] = int(duplicate.sum())
            df = df[~duplicate]
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
        text, label = p.base.text_column, p.base.label_column
        frames = {s: df.astype(object).replace({np.nan: None}) for s, df in frames.items()}
        train = frames["train"]
        kind = "str" if p.validate.labels else label_kind(train.get(label, pd.Series()))
        labels = list(p.validate.labels) or sorted(
            {as_label(v) for v in train.get(label, []) if v is not None and has_kind(v, kind)}
        )
        found: list[dict[str, Any]] = []
        if len(labels) == 1:
            found.append(
                {
                    "file": str(files["train"]),
                    "row": None,
                    "column": label,
                    "reason": f"one class only ({labels[0]!r}): a classifier needs at least two "
                    "labels; check base.label_column, ingest.drop_labels and validate.labels",
                    "value": None,
                }
            )
        seen: dict[str, set[str]] = {}
        for split in SPLITS:
            df = frames[split]
            try:
                schema(split, text, label, labels, kind, seen).validate(df, lazy=True)
            except SchemaErrors as err:
                limit = p.validate.max_duplicate_report
                found += at_source(failures_from(err, files[split], text, limit), df)
            if text in df:
                seen[split] = set(text_key(df[text]).dropna())
        return labels, found

    def validated(self, df: pd.DataFrame, p: Params) -> pd.DataFrame:
        return pd.DataFrame(
            {
                TEXT: df[p.base.text_column].astype(str),
                LABEL: df[p.base.label_column].map(as_label),
            }
        )

    def split_stats(self, df: pd.DataFrame, tokenizer: Any, p: Params) -> dict[str, Any]:
        tokens = lengths(tokenizer, df[TEXT].tolist())
        return {
            "rows": len(df),
            "class_balance": {
                k: round(v, 4) for k, v in df[LABEL].value_counts(normalize=True).items()
            },
            "class_counts": {k: int(v) for k, v in df[LABEL].value_counts().items()},
            "chars": percentiles(df[TEXT].str.len()),
            "words": percentiles(df[TEXT].str.split().str.len()),
            "tokens": percentiles(tokens),
            "over_max_length": int((tokens > p.base.max_length).sum()),
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
        label2id = {label: i for i, label in enumerate(labels)}
        max_length, reading = p.base.max_length, self.reading(p)
        problems = reading.problems(max_length)
        if problems:
            raise ValueError(f"long_text: {'; '.join(problems)} (base.max_length {max_length})")
        has_types = "token_type_ids" in tokenizer.model_input_names

        columns = Columns(["labels", "doc"], token_types=has_types)
        unk_id, added = tokenizer.unk_token_id, tokenizer.num_special_tokens_to_add()
        tokens, unk, windows = [], 0, []
        texts, targets = dataset.data.column(TEXT), dataset.data.column(LABEL)
        step = p.tokenize.batch_size
        with plain_encoding(tokenizer) as encoder:
            for start in range(0, len(dataset), step):
                # Whole texts, cut by the same code as the runtime's (bertrt.long_text); `doc`
                # numbers the text each window comes from, to aggregate them again. The one
                # encoding also gives each text's length and its [UNK] count for the report.
                encodings = encoder.encode_batch(texts.slice(start, step).to_pylist())
                cuts: list[list[int]] = []
                out: dict[str, list] = {"labels": [], "doc": []}
                for doc, (encoding, label) in enumerate(
                    zip(encodings, targets.slice(start, step).to_pylist(), strict=True), start
                ):
                    ids = encoding.ids
                    tokens.append(len(ids))
                    unk += ids.count(unk_id)
                    # long_text.split returns a text that fits as its one window; checked here
                    # too so that the special-tokens mask is built only for the texts it cuts.
                    if len(ids) <= max_length:
                        cut = [ids]
                    else:
                        special = encoding.special_tokens_mask
                        cut = long_text.split(ids, special, max_length, reading)
                    windows.append(len(cut))
                    cuts += cut
                    out["labels"] += [label2id[label]] * len(cut)
                    out["doc"] += [doc] * len(cut)
                columns.add(cuts, out)
        out = columns.dataset(fingerprint)
        tokens, windows = np.asarray(tokens, dtype=np.int64), np.asarray(windows, dtype=np.int64)
        content = int(tokens.sum()) - added * len(tokens)  # the texts' own tokens
        over = tokens > max_length
        read = tokens if reading.strategy == long_text.WINDOWS else np.minimum(tokens, max_length)
        return out, {
            "rows": len(dataset),
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


def lengths(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Token count of each text without truncation."""
    return np.array([len(ids) for ids in tokenizer(list(texts))["input_ids"]], dtype=np.int64)
