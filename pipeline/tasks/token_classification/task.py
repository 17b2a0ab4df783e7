"""Token classification (NER): a tag per word, evaluated on entities as seqeval counts them."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bertrt.contract import TRANSITIONS_FILE
from bertrt.decoding import ARGMAX, Decoder
from bertrt.predictors import TOKEN_CLASSIFICATION
from bertrt.predictors.token_classification import merge_windows
from pipeline.core.params import Params
from pipeline.core.tables import SPLITS, TableError, read_table, table_format
from pipeline.tasks.base import Task
from pipeline.tasks.confusion import confusion_png
from pipeline.tasks.percentiles import percentiles
from pipeline.tasks.token_classification import tagger
from pipeline.tasks.token_classification.checks import check_splits
from pipeline.tasks.token_classification.metrics import (
    IGNORE,
    Scores,
    compare_decodings,
    decoder_of,
    select_sentences,
    seqeval_scores,
    spans,
    text_word_log_probs,
    validation_sentences,
)
from pipeline.tasks.token_classification.report import write_report
from pipeline.tasks.token_classification.tagging import (
    entity_starts,
    entity_types,
    labels_for,
    problems,
    read_conll,
    repair,
    split_tag,
    to_iob2,
)

log = logging.getLogger(__name__)
TOKENS = "tokens"
TAGS = "tags"
TABLES = ("jsonl", "parquet")
MIN_STRATUM = 5


class TokenClassification(Task):
    name = TOKEN_CLASSIFICATION
    columns = (TOKENS, TAGS)
    selection_metric = "f1"
    gate_metric = "entity_f1"
    headline = ("f1", "precision", "recall")
    long_inputs = "read in overlapping windows"
    # Training reads the decoding and CRF head the fine-tuned model records (model_settings).
    trains_with_section = True

    def accepts(self, path: Path) -> bool:
        return table_format(path) in TABLES or not path.name.startswith(".")

    def read(self, path: Path, p: Params) -> pd.DataFrame:
        tokens, tags = p.base.text_column, p.base.label_column
        if table_format(path) not in TABLES:
            return read_conll(path, tokens, tags)
        df = read_table(path)
        for key, column in {"base.text_column": tokens, "base.label_column": tags}.items():
            if column not in df.columns:
                raise TableError(
                    f"{path}: no column {column!r} (set by {key}); the file has "
                    f"{list(df.columns)}; give each line a list of tokens and a list of tags"
                )
        return df.assign(line=np.arange(1, len(df) + 1))

    def clean(self, df: pd.DataFrame, p: Params) -> tuple[pd.DataFrame, dict[str, int]]:
        tokens, tags = p.base.text_column, p.base.label_column
        dropped: dict[str, int] = {}
        if df.empty:
            return df.reset_index(drop=True), dropped
        if p.ingest.drop_empty_text:
            empty = df[tokens].map(lambda t: isinstance(t, (list, np.ndarray)) and len(t) == 0)
            dropped["empty_sentence"] = int(empty.sum())
            df = df[~empty]
        if p.ingest.deduplicate:
            key = df[tokens].map(_key)
            conflicting = key.map(df.groupby(key)[tags].agg(lambda s: len({_key(t) for t in s})))
            conflicting = conflicting > 1
            dropped["conflicting_tags"] = int(conflicting.sum())
            df, key = df[~conflicting], key[~conflicting]
            duplicate = key.duplicated(keep="first")
            dropped["duplicate_sentence"] = int(duplicate.sum())
            df = df[~duplicate]
        return df.reset_index(drop=True), dropped

    def key(self, df: pd.DataFrame, p: Params) -> pd.Series:
        return df[p.base.text_column].map(_key)

    def stratify(self, df: pd.DataFrame, p: Params) -> pd.Series:
        """Each sentence by its rarest entity type, so every split gets every type."""
        types = [
            sorted({split_tag(str(t))[1] for t in tags if split_tag(str(t))[0] not in "O?"})
            for tags in df[p.base.label_column]
        ]
        counts = Counter(t for row in types for t in row)
        rarest = [min(row, key=lambda t: (counts[t], t)) if row else "O" for row in types]
        # A stratum too small to reach every split joins the sentences without entities.
        sizes = Counter(rarest)
        return pd.Series([t if sizes[t] >= MIN_STRATUM else "O" for t in rarest], index=df.index)

    def label_counts(self, df: pd.DataFrame, p: Params) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for tags in df[p.base.label_column]:
            if isinstance(tags, (list, np.ndarray)):
                counts.update(entity_starts([str(t) for t in tags]))
        return dict(sorted(counts.items()))

    def check(
        self, frames: dict[str, pd.DataFrame], files: dict[str, Path], p: Params
    ) -> tuple[list[str], list[dict[str, Any]]]:
        return check_splits(frames, files, p)

    def validated(self, df: pd.DataFrame, p: Params) -> pd.DataFrame:
        scheme = p.validate.tag_scheme
        tags = [to_iob2(list(map(str, t)), scheme) for t in df[p.base.label_column]]
        if p.validate.broken_tags == "repair":
            fixed = [repair(t) for t in tags]
            changed = sum(a != b for a, b in zip(tags, fixed, strict=True))
            if changed:
                log.warning(
                    "repaired the tags of %d broken sentences (validate.broken_tags)", changed
                )
            tags = fixed
        return pd.DataFrame(
            {
                TOKENS: [list(map(str, t)) for t in df[p.base.text_column]],
                TAGS: tags,
                "line": df["line"].astype("int64") if "line" in df else np.arange(1, len(df) + 1),
            }
        )

    def split_stats(self, df: pd.DataFrame, tokenizer: Any, p: Params) -> dict[str, Any]:
        words = [list(t) for t in df[TOKENS]]
        tokens = (
            np.array([len(ids) for ids in tokenizer(words, is_split_into_words=True)["input_ids"]])
            if words
            else np.zeros(0)
        )
        return {
            "rows": len(df),
            "entities": self.label_counts(df.rename(columns={TAGS: p.base.label_column}), p),
            "words": percentiles([len(w) for w in words]),
            "tokens": percentiles(tokens),
            "over_max_length": int((tokens > p.base.max_length).sum()),
        }

    def window_stride(self, p: Params) -> int:
        return p.token_classification.stride

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
        # With every subword labelled, a word's later subwords continue its entity (B- -> I-).
        inside = {i: label2id.get("I-" + label[2:], i) for label, i in label2id.items()}
        all_subwords = p.token_classification.label_all_subwords

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            enc = tokenizer(
                batch[TOKENS],
                is_split_into_words=True,
                truncation=True,
                max_length=p.base.max_length,
                stride=p.token_classification.stride,
                # stride 0 cuts at max_length, as the runtime then does.
                return_overflowing_tokens=bool(p.token_classification.stride),
                return_offsets_mapping=True,
            )
            samples = enc.get("overflow_to_sample_mapping", list(range(len(enc["input_ids"]))))
            drop = ("overflow_to_sample_mapping", "offset_mapping")
            out: dict[str, list] = {k: enc[k] for k in enc if k not in drop}
            out["labels"], out["word_ids"], out["example_id"] = [], [], []
            for w, sample in enumerate(samples):
                tags = [label2id[t] for t in batch[TAGS][sample]]
                words = [-1 if i is None else i for i in enc.word_ids(w)]
                ids, previous = [], -1
                for word, (start, _) in zip(words, enc["offset_mapping"][w], strict=True):
                    # Offsets count from the start of each word: a window that opens inside a
                    # word does not make its continuation piece a first subword.
                    first = word != previous and start == 0
                    previous = word
                    if word < 0 or not (first or all_subwords):
                        ids.append(IGNORE)
                    else:
                        ids.append(tags[word] if first else inside[tags[word]])
                out["labels"].append(ids)
                out["word_ids"].append(words)
                out["example_id"].append(indices[sample])
            return out

        out = dataset.map(
            encode,
            batched=True,
            with_indices=True,
            batch_size=p.tokenize.batch_size,
            remove_columns=dataset.column_names,
            new_fingerprint=fingerprint,
            desc="tokenizing",
        )
        windows = Counter(out["example_id"])
        lengths = np.array([len(ids) for ids in out["input_ids"]])
        return out, {
            "rows": len(dataset),
            "windows": len(out),
            "rows_split_into_windows": int(sum(1 for n in windows.values() if n > 1)),
            "token_length": percentiles(lengths),
        }

    def model_class(self) -> Any:
        return tagger.TokenTagger

    def model_settings(self, p: Params) -> dict[str, Any]:
        return tagger.settings(p.token_classification)

    def learning_rates(self, p: Params) -> dict[str, float]:
        section = p.token_classification
        return {f"{tagger.CRF_KEY}.": section.crf_learning_rate} if section.crf else {}

    def model_kwargs(self, labels: list[str]) -> dict[str, Any]:
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }

    def collator(self, tokenizer: Any, p: Params) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    def compute_metrics(self, labels: list[str]) -> Any:
        def compute(eval_pred: Any) -> dict[str, float]:
            outputs, label_ids = eval_pred
            # A CRF head adds its own decoding (`tags`, one id per position) to the logits; a
            # softmax head is read token by token.
            extra = outputs[1] if isinstance(outputs, tuple) and len(outputs) > 1 else None
            if isinstance(extra, np.ndarray) and extra.ndim == 2:
                predicted = extra
            else:
                logits = outputs[0] if isinstance(outputs, tuple) else outputs
                predicted = np.asarray(logits).argmax(axis=-1)
            truth, guess = [], []
            for row_pred, row_true in zip(predicted, np.asarray(label_ids), strict=True):
                keep = row_true != IGNORE
                truth.append([labels[i] for i in row_true[keep]])
                guess.append([labels[i] for i in row_pred[keep]])
            scores = seqeval_scores(truth, guess)
            flat_t = [t for row in truth for t in row]
            flat_p = [t for row in guess for t in row]
            accuracy = float(np.mean([a == b for a, b in zip(flat_t, flat_p, strict=True)]))
            return {
                "precision": scores["precision"],
                "recall": scores["recall"],
                "f1": scores["f1"],
                "accuracy": accuracy if flat_t else 0.0,
            }

        return compute

    def training_summary(self, dataset: Any) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "n_tokens": [len(x) for x in dataset["input_ids"]],
                "labelled": [sum(1 for i in row if i != IGNORE) for row in dataset["labels"]],
            }
        )

    def predict(self, model_dir: Path, dataset: Any, test: pd.DataFrame, p: Params) -> Scores:
        """The logits, carrying the decoding the fine-tuned model records (and its CRF's
        transitions), which evaluate decodes by."""
        tagger.check_params(model_dir, p.token_classification)
        return Scores(
            super().predict(model_dir, dataset, test, p), tagger.model_decoder(model_dir)
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
        """Entity metrics of the model's decoding, and of every other decoding on the same
        logits (argmax, viterbi, crf), on test and validation."""
        decoder = decoder_of(predictions, labels)
        truth = [list(t) for t in test[TAGS]]
        sentences = select_sentences(predictions, dataset, [len(t) for t in truth], labels)
        by_decoding, guesses = compare_decodings(truth, sentences, decoder)
        guess = guesses[decoder.mode]
        scores = seqeval_scores(truth, guess)
        flat = [
            a == b for t, g in zip(truth, guess, strict=True) for a, b in zip(t, g, strict=True)
        ]
        write_report(test, truth, guess, p.evaluate.top_mistakes, plots_dir, confusion_png, spans)
        log.info(
            "entity F1 by decoding: %s",
            {k: (round(v["f1"], 4), v["invalid_sequences"]) for k, v in by_decoding.items()},
        )
        result = {
            "overall": {
                "precision": scores["precision"],
                "recall": scores["recall"],
                "f1": scores["f1"],
                "token_accuracy": float(np.mean(flat)) if flat else 0.0,
                "rows": len(test),
                "invalid_sequences": by_decoding[decoder.mode]["invalid_sequences"],
            },
            "per_type": scores["per_type"],
            "decoding": by_decoding,
        }
        if validation is not None:
            outputs, data = validation()
            found, truth = validation_sentences(outputs, data, labels)
            on_validation, _ = compare_decodings(truth, found, decoder_of(outputs, labels))
            result["validation"] = {f"{k}_f1": v["f1"] for k, v in on_validation.items()}
        return result

    def texts(self, test: pd.DataFrame) -> list[str]:
        return [" ".join(tokens) for tokens in test[TOKENS]]

    def score(
        self,
        windows: list[list[Any]],
        outputs: np.ndarray,
        test: pd.DataFrame,
        labels: list[str],
        p: Params,
        tokenizer: Any = None,
    ) -> float:
        """Entity F1 of runtime outputs, decoded as the fine-tuned model the tokenizer was read
        from records (argmax where it records nothing)."""
        folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
        found = (folder / "config.json").is_file()
        decoder = tagger.model_decoder(folder) if found else Decoder(tuple(labels), ARGMAX)
        guess, at = [], 0
        for per_text, tokens in zip(windows, test[TOKENS], strict=True):
            outs = [outputs[at + i, : len(w.ids)] for i, w in enumerate(per_text)]
            at += len(per_text)
            offsets, scores, _ = merge_windows(per_text, outs, self.window_stride(p))
            words = text_word_log_probs(offsets, scores, list(tokens), labels)
            guess.append([labels[i] for i in decoder.decode(words)])
        return seqeval_scores([list(t) for t in test[TAGS]], guess)["f1"]

    # export ---------------------------------------------------------------------------------
    def decoding(self, model_dir: Path) -> str:
        return tagger.model_decoder(model_dir).mode

    def model_folder_files(self, model_dir: Path, folder: Path) -> list[str]:
        """A CRF head's transitions, checked against the model's labels on the way."""
        decoder = tagger.model_decoder(model_dir)
        if decoder.crf is None:
            return []
        decoder.crf.write(folder / TRANSITIONS_FILE)
        return [TRANSITIONS_FILE]


def _key(tokens: Any) -> str:
    return " ".join(map(str, tokens)).lower() if isinstance(tokens, (list, np.ndarray)) else ""


__all__ = [
    "SPLITS",
    "TokenClassification",
    "entity_types",
    "labels_for",
    "problems",
    "seqeval_scores",
    "spans",
]
