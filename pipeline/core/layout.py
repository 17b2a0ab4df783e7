"""Where the pipeline's artifacts live: the split files inside a data folder, and the repository
paths that `dvc.yaml` gives the stages' outputs (for the operations tools and benchmarks that
read a repository's artifacts; tests/test_dvc_deps.py checks them against `dvc.yaml`)."""

from __future__ import annotations

from pathlib import Path

from bertrt.contract import LABELS_FILE
from pipeline.core.tables import SPLITS

TRAIN, VALIDATION, TEST = SPLITS

# Stage outputs, as dvc.yaml writes them (relative to the repository root).
RAW = Path("data/raw")
VALIDATED = Path("data/validated")
TOKENIZED = Path("data/tokenized")
FINETUNED = Path("models/finetuned")
ONNX_MODEL = Path("models/onnx")
METRICS = Path("reports/metrics.json")
OUTPUTS = (RAW, VALIDATED, TOKENIZED, FINETUNED, ONNX_MODEL, METRICS)


def split_file(folder: Path, split: str) -> Path:
    """A split's Parquet file in a data folder (ingest's, validate's)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {list(SPLITS)}")
    return Path(folder) / f"{split}.parquet"


def task_params_file(tokenized: Path) -> Path:
    """{section: values} of the task params training reads (a masked LM's masking), as the
    tokenize stage used them, beside the tokenized data: the fine-tune reads them there."""
    return Path(tokenized) / "task_params.json"


def labels_file(validated: Path) -> Path:
    """The label order the validate stage fixed, beside the validated splits."""
    return Path(validated) / LABELS_FILE
