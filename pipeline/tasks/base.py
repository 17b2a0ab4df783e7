"""The `Task` interface: everything a stage needs to know about what the model predicts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bertrt.decoding import ARGMAX
from bertrt.long_text import Reading
from pipeline.core.params import Params
from pipeline.core.sources import load_options


class Task(ABC):
    """One task (text classification, token classification, ...) behind every stage.

    Stages call these hooks and never branch on the task name. Data travels between stages as
    Parquet tables whose columns the task defines (`columns`).
    """

    name: str
    # Columns of the validated tables: the model input and its label(s).
    columns: tuple[str, str]
    # The Trainer's model-selection metric (a key of `compute_metrics`) and its direction.
    selection_metric: str
    greater_is_better: bool = True
    # What happens to an input over base.max_length tokens, for the validate stage's warning.
    long_inputs: str = "truncated"
    # Whether ingest reads a folder without train/validation/test files as one input.
    reads_folders: bool = False
    # Whether ingest reads this task's files in pieces (`read_chunks`, `drop_rows`, `targets`)
    # and keeps only a narrow index of the rows in memory; otherwise it reads them whole.
    streams: bool = False
    # The reasons a streaming task's rows are dropped as (conflicting, duplicate) inputs.
    dedupe_reasons: tuple[str, str] = ("conflicting_targets", "duplicate_input")
    # Whether its validation split may be its training text (`ingest.validate_on_train`): true
    # where training means storing the text (a masked LM taught facts), never for a classifier,
    # whose selection would then reward memorised rows.
    validates_on_train: bool = False

    # ingest ---------------------------------------------------------------------------------
    @abstractmethod
    def accepts(self, path: Path) -> bool:
        """Whether `path` is an input file this task reads (by its suffixes)."""

    @abstractmethod
    def read(self, path: Path, p: Params) -> pd.DataFrame:
        """One source file as rows with the configured columns; errors name the file and fix."""

    def read_chunks(self, path: Path, p: Params, rows: int) -> Iterator[pd.DataFrame]:
        """The file as `read` gives it, in pieces of at most `rows` rows whose index counts rows
        from the file's start (a task that does not stream: the whole file as one piece)."""
        yield self.read(path, p)

    @abstractmethod
    def clean(self, df: pd.DataFrame, p: Params) -> tuple[pd.DataFrame, dict[str, int]]:
        """Rows that are not part of the task dropped; the counts dropped, by reason."""

    def drop_rows(self, df: pd.DataFrame, p: Params) -> tuple[pd.DataFrame, dict[str, int]]:
        """A streaming task: what `clean` drops by looking at each row alone (the index kept);
        duplicates across the whole file are found by ingest from `key` and `targets`."""
        raise NotImplementedError(f"{self.name} does not stream")

    def targets(self, df: pd.DataFrame, p: Params) -> pd.Series | None:
        """A streaming task: per row, what rows with equal keys must agree on (None: nothing)."""
        return None

    @abstractmethod
    def key(self, df: pd.DataFrame, p: Params) -> pd.Series:
        """Per row, the case- and space-insensitive key of its input: equal keys are duplicates."""

    def finish_splits(self, frames: dict[str, pd.DataFrame], p: Params) -> dict[str, pd.DataFrame]:
        """The splits as written, after any rows the task adds (e.g. probes to the test split)."""
        return frames

    def stratify(self, df: pd.DataFrame, p: Params) -> pd.Series | None:
        """Labels to stratify a seeded split by, or None for a plain seeded split."""
        return None

    @abstractmethod
    def label_counts(self, df: pd.DataFrame, p: Params) -> dict[str, int]:
        """What a split holds, for reports and logs (classes, or entity types)."""

    # validate -------------------------------------------------------------------------------
    @abstractmethod
    def check(
        self, frames: dict[str, pd.DataFrame], files: dict[str, Path], p: Params
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """(label list, failures): every failure has file, row, column, reason and value."""

    @abstractmethod
    def validated(self, df: pd.DataFrame, p: Params) -> pd.DataFrame:
        """The validated table of one split, in `columns` (tags normalised, labels as text)."""

    def check_pieces(
        self,
        pieces: dict[str, Callable[[], Iterator[pd.DataFrame]]],
        files: dict[str, Path],
        p: Params,
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """`check` over splits given as pieces (each call of `pieces[split]` reads the split
        again); a task that does not stream checks each split whole."""
        return self.check({split: whole(read) for split, read in pieces.items()}, files, p)

    def split_stats_pieces(
        self, pieces: Iterator[pd.DataFrame], tokenizer: Any, p: Params
    ) -> dict[str, Any]:
        """`split_stats` of a validated split given as pieces."""
        return self.split_stats(whole(lambda: pieces), tokenizer, p)

    @abstractmethod
    def split_stats(self, df: pd.DataFrame, tokenizer: Any, p: Params) -> dict[str, Any]:
        """Sizes, balance and token lengths of one validated split (warns about long inputs)."""

    # tokenize -------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(
        self,
        dataset: Any,
        tokenizer: Any,
        labels: list[str],
        p: Params,
        fingerprint: str,
        split: str = "train",
    ) -> tuple[Any, dict[str, Any]]:
        """(model-ready dataset with `labels`, stats) for one split (`split` names it); no
        padding.

        `fingerprint` becomes the saved dataset's fingerprint, so the output is a function of
        the inputs alone (datasets' own fingerprint changes with the environment)."""

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
        """`tokenize` over a split given as Arrow tables or record batches; a task that streams
        writes its windows to the Arrow file `spool` as they come and returns a dataset read
        from it. A task that does not stream tokenizes the pieces joined, in memory."""
        import pyarrow as pa
        from datasets import Dataset

        tables = [
            pa.Table.from_batches([piece]) if isinstance(piece, pa.RecordBatch) else piece
            for piece in pieces
        ]
        dataset = Dataset(pa.concat_tables(tables), fingerprint=fingerprint)
        return self.tokenize(dataset, tokenizer, labels, p, fingerprint, split)

    def window_stride(self, p: Params) -> int:
        """Tokens shared by consecutive windows of a long input; 0 cuts inputs at max_length."""
        return 0

    def reading(self, p: Params) -> Reading | None:
        """How a text over max_length is read and its windows' outputs combined, when the task
        reads one output per text (bertrt.long_text); None for the tokenizer's own windows."""
        return None

    # finetune -------------------------------------------------------------------------------
    @abstractmethod
    def model_class(self) -> Any:
        """The transformers Auto class of the model with this task's head."""

    @abstractmethod
    def model_kwargs(self, labels: list[str]) -> dict[str, Any]:
        """from_pretrained arguments for the head: label count, id2label, label2id."""

    def model_settings(self, p: Params) -> dict[str, Any]:
        """from_pretrained arguments the task's params section sets at fine-tuning, which the
        model records in its config (e.g. its decoding and head); {} for none."""
        return {}

    def learning_rates(self, p: Params) -> dict[str, float]:
        """Parameter-name prefixes the task trains at a rate of their own (e.g. a CRF head's
        transitions, which start at zero); {} for none."""
        return {}

    def prepare_training(self, model: Any) -> None:
        """Adjust the model for training only (hooks that are not saved with it)."""
        return None

    # Whether training reads the task's params section (the masking): the tokenize stage then
    # hands it to the fine-tune beside the data, so that other tasks' fine-tunes do not depend
    # on it.
    trains_with_section: bool = False

    # Whether the Trainer drops dataset columns the model's forward() does not take; a task
    # whose collator reads extra columns (and whose datasets hold nothing else) sets False.
    remove_unused_columns: bool = True

    @abstractmethod
    def collator(self, tokenizer: Any, p: Params) -> Any:
        """The data collator that pads a batch (and its labels)."""

    def reduce_logits(self) -> Any:
        """The Trainer's `preprocess_logits_for_metrics`, or None to keep the logits whole."""
        return None

    @abstractmethod
    def compute_metrics(self, labels: list[str]) -> Any:
        """The Trainer's `compute_metrics` (it must return `selection_metric`)."""

    @abstractmethod
    def training_summary(self, dataset: Any) -> pd.DataFrame:
        """A small table describing the training rows, logged as the MLflow dataset."""

    # evaluate -------------------------------------------------------------------------------
    def predict(self, model_dir: Path, dataset: Any, test: pd.DataFrame, p: Params) -> Any:
        """The model's outputs on the tokenized test split, as `evaluate` reads them."""
        from transformers import AutoTokenizer

        trust = p.base.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **load_options(trust, False))
        model = self.model_class().from_pretrained(model_dir, **load_options(trust))
        collator = self.collator(tokenizer, p)
        return forward_sorted(
            model, dataset, collator, p.evaluate.batch_size, self.remove_unused_columns
        )

    @abstractmethod
    def evaluate(
        self,
        predictions: np.ndarray,
        dataset: Any,
        test: pd.DataFrame,
        labels: list[str],
        p: Params,
        plots_dir: Path,
        validation: Callable[[], tuple[np.ndarray, Any]] | None = None,
    ) -> dict[str, Any]:
        """Test metrics ({"overall": ..., ...}) from `predict`'s outputs on the tokenized test
        split; writes its tables and plots (every file is logged to MLflow) into `plots_dir`.

        `validation()` gives `predict`'s outputs on the tokenized validation split and that
        split, for what is fitted on it (a classifier's temperature) and the selection metric."""

    # export ---------------------------------------------------------------------------------
    def decoding(self, model_dir: Path) -> str:
        """How the runtime turns the graph's outputs into labels (bertrt.decoding), as the
        fine-tuned model at `model_dir` records it."""
        return ARGMAX

    def model_folder_files(self, model_dir: Path, folder: Path) -> list[str]:
        """Files besides the graph, tokenizer and labels that the runtime reads, written into
        the model `folder` from the fine-tuned model (e.g. a CRF's transitions); their names."""
        return []

    def output_labels(self, config: Any) -> list[str]:
        """What the graph's output columns mean, for labels.json and the manifest."""
        return [config.id2label[i] for i in range(config.num_labels)]

    @abstractmethod
    def texts(self, test: pd.DataFrame) -> list[str]:
        """The rows as the raw strings the runtime receives."""

    def export_texts(self, test: pd.DataFrame) -> list[str]:
        """The strings export checks parity and gates on (`score` gets their outputs)."""
        return self.texts(test)

    @abstractmethod
    def score(
        self,
        windows: list[list[Any]],
        outputs: np.ndarray,
        test: pd.DataFrame,
        labels: list[str],
        p: Params,
        tokenizer: Any,
    ) -> float:
        """The task metric of runtime outputs (one row per window of `windows`, cut as `p` says)
        on the test rows, for the variant gates: accuracy, or entity F1. `tokenizer` is the
        exported model's."""

    gate_metric: str = "accuracy"
    # The few metrics in reports/metrics.json: keys of `evaluate`'s "overall", or
    # "group.key" for another group of it (e.g. "validation.macro_f1").
    headline: tuple[str, ...] = ("accuracy",)


# What the Trainer pads per-token outputs with when it joins batches of different widths.
PAD_OUTPUT = -100.0


def whole(read: Callable[[], Iterator[pd.DataFrame]]) -> pd.DataFrame:
    """A table given as pieces, as one frame (the piece itself when there is one)."""
    pieces = list(read())
    return pieces[0] if len(pieces) == 1 else pd.concat(pieces)


def forward_sorted(
    model: Any, dataset: Any, collator: Any, batch_size: int, model_inputs_only: bool = True
) -> np.ndarray:
    """The model's logits on every row of `dataset`, in its order, as float64; per-token
    logits are padded with PAD_OUTPUT to the widest batch (as the Trainer's `predict` returns
    them).

    Rows run in batches sorted by length, so that each pads to its own longest row.
    `model_inputs_only` keeps only the columns `forward` takes (the Trainer's
    `remove_unused_columns`), so that the collator sees what it saw in training.
    """
    import inspect

    import torch

    columns = list(dataset.column_names)
    if model_inputs_only:
        takes = set(inspect.signature(model.forward).parameters) | {"label", "label_ids"}
        columns = [c for c in columns if c in takes]
    rows = dataset.select_columns(columns)
    order = np.argsort([len(ids) for ids in rows["input_ids"]], kind="stable")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collator([rows[int(i)] for i in idx])
            # The logits do not depend on the labels; given them, the model adds a loss.
            feeds = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            batches.append((idx, model(**feeds).logits.float().cpu().numpy()))
    if not batches:
        raise ValueError("nothing to predict on: the tokenized split has no rows")
    first = batches[0][1]
    width = (max(b.shape[1] for _, b in batches),) if first.ndim == 3 else ()
    out = np.full((len(order), *width, first.shape[-1]), PAD_OUTPUT, dtype=np.float64)
    for idx, logits in batches:
        if logits.ndim == 3:
            out[idx, : logits.shape[1]] = logits
        else:
            out[idx] = logits
    return out
