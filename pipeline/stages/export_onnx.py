"""Stage export: the fine-tuned model as an ONNX package, parity-checked on the test set."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bertrt import manifest as manifest_io
from bertrt.contract import (
    BASE_VARIANT,
    INPUT_NAMES,
    LABELS_FILE,
    TEXT_CLASSIFICATION,
    TOKENIZER_FILE,
    VARIANT_FILES,
    dynamic_axes,
    output_names,
)
from bertrt.engine import Engine, open_engine
from bertrt.manifest import Manifest
from pipeline import tasks
from pipeline.core import entry, lineage, params, tracking
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.export import model_card
from pipeline.export.variants import add_variants

log = logging.getLogger(__name__)
# The gate's task metric of runtime outputs (one row per window), for a variant or the reference.
Score = Callable[[list[list[Any]], np.ndarray], float]


class ParityError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch model."""


def export_graph(model: Any, tokenizer: Any, path: Path, opset: int, task: str) -> tuple[str, ...]:
    """Write the fp32 graph with the task's dynamic axes; return the input names used."""
    import torch

    sample = tokenizer(["a sample text", "another"], padding=True, return_tensors="pt")
    inputs = tuple(name for name in INPUT_NAMES if name in sample)
    model.eval()
    with torch.no_grad():
        # dynamo=False: the TorchScript exporter's graph is the one ORT's optimizer fully fuses.
        torch.onnx.export(
            model,
            (dict(sample.items()),),
            str(path),
            input_names=list(inputs),
            output_names=list(output_names(task)),
            dynamic_axes=dynamic_axes(inputs, task),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return inputs


def torch_outputs(model: Any, engine: Engine, encodings: list[Any], batch_size: int) -> np.ndarray:
    """The PyTorch model's outputs on exactly the runtime's batches, shaped as `engine.infer`."""
    import torch

    def forward(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            return model(**tensors).logits.float().numpy()

    return engine.collect(encodings, batch_size, forward)[0]


def compare(
    got: np.ndarray, reference: np.ndarray, mask: np.ndarray, atol: float = 0.0
) -> tuple[float, int, int, int]:
    """(max |difference|, positions whose argmax differs, positions compared, near ties), where
    valid. A flip between two scores closer than 2 * atol in the reference is a near tie, not a
    mismatch: any difference within atol may reorder them (one in millions of positions of a
    30,000-token vocabulary)."""
    if got.ndim == 3:
        got, reference = got[mask], reference[mask]
    if not len(got):
        return 0.0, 0, 0, 0
    diff = float(np.abs(got - reference).max())
    flipped = got.argmax(-1) != reference.argmax(-1)
    if reference.shape[-1] > 1:
        top2 = np.partition(reference, -2, axis=-1)
        tied = flipped & (top2[..., -1] - top2[..., -2] <= 2 * atol)
    else:
        tied = np.zeros_like(flipped)
    return diff, int((flipped & ~tied).sum()), len(got), int(tied.sum())


def build_model_folder(
    model_dir: Path,
    out: Path,
    texts: list[str],
    max_length: int,
    opset: int,
    parity_atol: float = 1e-4,
    batch_size: int = 32,
    provenance: dict[str, Any] | None = None,
    score: Score | None = None,
    variants: tuple[str, ...] = (),
    min_agreement: float = 0.995,
    max_metric_drop: float = 0.005,
    task: str = TEXT_CLASSIFICATION,
    window_stride: int = 0,
    metrics: dict[str, Any] | None = None,
    long_text: dict[str, Any] | None = None,
    temperature: float = 1.0,
    calibration_texts: list[str] | None = None,
    int8_search_agreement: float = 0.0,
    int8_smooth_alpha: float = 0.0,
) -> dict[str, Any]:
    """Export, check parity on `texts`, and write the complete model folder atomically.

    Args:
        calibration_texts: texts (not the test split's) on which the int8 variant's search for
            nodes to keep in fp32 measures agreement with the fp32 graph, up to
            `int8_search_agreement` (0: no search, everything int8), and whose activation
            ranges set the smoothing before int8 (`int8_smooth_alpha`; 0: none).
        score: the task metric of runtime outputs on `texts`, for the variants' metric-drop gate.
        long_text: how a classifier reads long texts (bertrt.long_text.Reading), as evaluated.
        temperature: divides a classifier's logits before the softmax (fitted on validation).
        variants: optimised, fp16 and int8 graphs to add; each ships only if its gate passes,
            and every gate result is recorded in the manifest.

    Returns the parity results; raises ParityError (leaving `out` untouched) when they fail.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = (
        tasks.get(task)
        .model_class()
        .from_pretrained(model_dir, attn_implementation="eager", use_safetensors=True)
    )
    label_names = tasks.get(task).output_labels(model.config)
    with atomic_dir(out) as tmp:
        inputs = export_graph(model, tokenizer, tmp / VARIANT_FILES[BASE_VARIANT], opset, task)
        shutil.copy(Path(model_dir) / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        write_json(tmp / LABELS_FILE, label_names)
        files = [VARIANT_FILES[BASE_VARIANT], TOKENIZER_FILE, LABELS_FILE]
        manifest = Manifest(
            task=task,
            labels=label_names,
            max_length=max_length,
            pad_token_id=tokenizer.pad_token_id or 0,
            inputs=list(inputs),
            outputs=list(output_names(task)),
            opset=opset,
            window_stride=window_stride,
            long_text=long_text or {},
            temperature=temperature,
            variants={
                BASE_VARIANT: {
                    "file": VARIANT_FILES[BASE_VARIANT],
                    "precision": "fp32",
                    "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                }
            },
            files=manifest_io.file_entries(tmp, files),
            metrics=metrics or {},
            provenance=provenance or {},
        )
        manifest_io.write(tmp, manifest)
        engine = open_engine(tmp, device="cpu", variant=BASE_VARIANT)
        windows = engine.encode(texts)
        flat = [w for per_text in windows for w in per_text]
        reference = torch_outputs(model, engine, flat, batch_size)
        got, mask = engine.infer(flat, batch_size)
        parity = check_parity(got, reference, mask, len(texts), parity_atol)
        manifest.variants[BASE_VARIANT].update(gate=parity, shipped=True)
        calibration = None
        if (
            calibration_texts
            and "int8" in variants
            and (int8_search_agreement > 0 or int8_smooth_alpha > 0)
        ):
            cal = [w for per_text in engine.encode(calibration_texts) for w in per_text]
            calibration = (cal, *engine.infer(cal, batch_size))
        if variants:
            files += add_variants(
                tmp,
                manifest,
                variants,
                flat,
                reference,
                mask,
                (lambda outputs: score(windows, outputs)) if score else None,
                num_heads=model.config.num_attention_heads,
                hidden_size=model.config.hidden_size,
                min_agreement=min_agreement,
                max_metric_drop=max_metric_drop,
                batch_size=batch_size,
                calibration=calibration,
                int8_search_agreement=int8_search_agreement,
                int8_smooth_alpha=int8_smooth_alpha,
            )
            manifest.files = manifest_io.file_entries(tmp, files)
        manifest_io.write(tmp, manifest)
    return parity


def check_parity(
    got: np.ndarray, reference: np.ndarray, mask: np.ndarray, texts: int, atol: float
) -> dict[str, Any]:
    """The exported graph (through the runtime, on CPU) against PyTorch, on valid positions."""
    max_diff, mismatched, positions, ties = compare(got, reference, mask, atol)
    result = {
        "texts": texts,
        "positions": positions,
        "max_abs_logit_diff": max_diff,
        "label_mismatches": mismatched,
        "near_tie_flips": ties,
        "atol": atol,
        "passed": max_diff <= atol and mismatched == 0,
    }
    log.info(
        "parity on %d texts (%d positions): max |dlogit| %.2e, %d label mismatches",
        texts,
        positions,
        max_diff,
        mismatched,
    )
    if not result["passed"]:
        raise ParityError(
            f"ONNX parity failed on {texts} texts: max |dlogit| {max_diff:.3e} "
            f"(allowed {atol:.0e}), {mismatched} different labels; the graph is not shipped"
        )
    return result


def run(
    model_dir: Path,
    test_path: Path,
    eval_report: Path,
    params_path: Path,
    out_dir: Path,
    report: Path,
    calibration_path: Path | None = None,
) -> dict[str, Any]:
    """Export the fine-tuned model to `out_dir` and record the result in `report` and MLflow;
    the int8 variant is tuned on `calibration_path` (the validation split), never on test."""
    from transformers import AutoConfig, AutoTokenizer

    p = params.load(params_path, "base", "tokenize", "long_text", "export", "tracking")
    task = tasks.get(p.base.task)
    test = pd.read_parquet(test_path)
    config = AutoConfig.from_pretrained(model_dir)
    labels = task.output_labels(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stride = task.window_stride(p)
    reading = task.reading(p)
    model_hash = lineage.model_digest(model_dir)
    metrics = json.loads(Path(eval_report).read_text(encoding="utf-8"))
    git = lineage.git_info()
    provenance = {
        "base_model": {"name": p.base.model, "sha256": lineage.base_model_digest(p.base.model)},
        "vocab_size": config.vocab_size,
        "finetuned_sha256": model_hash,
        "data_sha256": lineage.file_digest(test_path.parent),
        "params_sha256": params.load(params_path).digest(),
        # Only what the inputs decide, so that re-running a tag gives the same bytes: the source
        # commit (not the release commit or tag, given later), and the MLflow run is found by
        # the model's hash (tag model_sha256), as a re-run in another store makes another run.
        "git": {k: git[k] for k in ("source_commit", "dirty")},
        "mlflow_experiment": p.tracking.experiment,
        # The data and model this package comes from (reports hold timings; checkpoints are
        # scratch; this stage's own entry is still the previous run's).
        "dvc_stages": lineage.dvc_lock_hashes(artifacts_only=True, skip=(out_dir,)),
        "environment": lineage.environment(),
    }
    with tracking.run_for_model(p.tracking, model_hash):
        tracking.log_params_once(p.flat())
        parity = build_model_folder(
            model_dir,
            out_dir,
            task.export_texts(test),
            p.base.max_length,
            p.export.opset,
            p.export.parity_atol,
            p.export.batch_size,
            provenance,
            score=lambda windows, outputs: task.score(
                windows, outputs, test, labels, p, tokenizer
            ),
            variants=tuple(p.export.variants),
            min_agreement=p.export.min_agreement,
            max_metric_drop=p.export.max_metric_drop,
            task=task.name,
            window_stride=stride,
            metrics=metrics.get("overall", metrics),
            long_text=reading.as_dict() if reading else {},
            temperature=float(metrics.get("calibration", {}).get("temperature", 1.0)),
            calibration_texts=(
                task.export_texts(pd.read_parquet(calibration_path)) if calibration_path else None
            ),
            int8_search_agreement=p.export.int8_search_agreement,
            int8_smooth_alpha=p.export.int8_smooth_alpha,
        )
        manifest = manifest_io.read(out_dir)
        model_card.write(out_dir, manifest)
        result = {
            "parity": parity,
            "gate_metric": task.gate_metric,
            "variants": {k: v.get("gate", {}) for k, v in manifest.variants.items()},
            "rejected_variants": {
                k: v.get("gate", {}) for k, v in manifest.rejected_variants.items()
            },
        }
        write_json(report, result)
        tracking.log_export(result, out_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="fine-tuned model folder")
    parser.add_argument("--test", type=Path, required=True, help="validated test split (Parquet)")
    parser.add_argument("--eval-report", type=Path, required=True, help="evaluate's metrics JSON")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, help="texts the int8 search measures on")
    args = parser.parse_args(argv)
    return entry.guarded(
        lambda: run(
            args.model,
            args.test,
            args.eval_report,
            args.params,
            args.out,
            args.report,
            args.calibration,
        ),
        writes=[args.out, args.report],
    )


if __name__ == "__main__":
    raise SystemExit(main())
