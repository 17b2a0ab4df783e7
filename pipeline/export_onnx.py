"""Stage export: the fine-tuned model as an ONNX package, parity-checked on the test set."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bertrt import manifest as manifest_io
from bertrt.contract import (
    INPUT_NAMES,
    LABELS_FILE,
    OUTPUT_NAMES,
    TOKENIZER_FILE,
    VARIANT_FILES,
    dynamic_axes,
)
from bertrt.predictor import load as load_runtime
from pipeline import entry, lineage, model_card, onnx_variants, params, tracking
from pipeline.atomic import atomic_dir, write_json

log = logging.getLogger(__name__)
TASK = "text-classification"


class ParityError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch model."""


def export_graph(model: Any, tokenizer: Any, path: Path, opset: int) -> tuple[str, ...]:
    """Write the fp32 graph with dynamic batch and sequence axes; return the input names used."""
    import torch

    sample = tokenizer(["a sample text", "another"], padding=True, return_tensors="pt")
    inputs = tuple(name for name in INPUT_NAMES if name in sample)
    outputs = OUTPUT_NAMES[TASK]
    model.eval()
    with torch.no_grad():
        # dynamo=False: the TorchScript exporter's graph is the one ORT's optimizer fully fuses.
        torch.onnx.export(
            model,
            (dict(sample.items()),),
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic_axes(inputs, outputs),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return inputs


def torch_logits(model: Any, tokenizer: Any, texts: list[str], max_length: int, batch: int) -> Any:
    """Reference logits from the PyTorch model, batch by batch, dynamic padding."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(
                texts[start : start + batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out.append(model(**enc).logits.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels), np.float32)


def build_model_folder(
    model_dir: Path,
    out: Path,
    texts: list[str],
    max_length: int,
    opset: int,
    parity_atol: float = 1e-4,
    batch_size: int = 32,
    extra: dict[str, Any] | None = None,
    labels: list[int] | None = None,
    variants: tuple[str, ...] = (),
    min_agreement: float = 0.995,
    max_accuracy_drop: float = 0.005,
) -> dict[str, Any]:
    """Export, check parity on `texts`, and write the complete model folder atomically.

    Args:
        labels: true label ids of `texts`, for the variants' accuracy-drop gate.
        variants: optimised, fp16 and int8 graphs to add; each ships only if its gate passes,
            and every gate result is recorded in the manifest.

    Returns the parity results; raises ParityError (leaving `out` untouched) when they fail.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, attn_implementation="eager"
    )
    label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with atomic_dir(out) as tmp:
        inputs = export_graph(model, tokenizer, tmp / VARIANT_FILES["fp32"], opset)
        shutil.copy(Path(model_dir) / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        write_json(tmp / LABELS_FILE, label_names)
        files = [VARIANT_FILES["fp32"], TOKENIZER_FILE, LABELS_FILE]
        manifest: dict[str, Any] = {
            "task": TASK,
            "labels": label_names,
            "max_length": max_length,
            "pad_token_id": tokenizer.pad_token_id or 0,
            "inputs": list(inputs),
            "outputs": list(OUTPUT_NAMES[TASK]),
            "opset": opset,
            "variants": {
                "fp32": {
                    "file": VARIANT_FILES["fp32"],
                    "precision": "fp32",
                    "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                }
            },
            "files": manifest_io.file_entries(tmp, files),
            **(extra or {}),
        }
        manifest_io.write(tmp, manifest)
        reference = torch_logits(model, tokenizer, texts, max_length, batch_size)
        parity = check_parity(
            model, tokenizer, tmp, texts, max_length, parity_atol, batch_size, reference
        )
        manifest["variants"]["fp32"].update(gate=parity, shipped=True)
        if variants:
            files += onnx_variants.add_variants(
                tmp,
                manifest,
                variants,
                texts,
                reference,
                labels,
                num_heads=model.config.num_attention_heads,
                hidden_size=model.config.hidden_size,
                min_agreement=min_agreement,
                max_accuracy_drop=max_accuracy_drop,
                batch_size=batch_size,
            )
            manifest["files"] = manifest_io.file_entries(tmp, files)
        manifest_io.write(tmp, manifest)
    return parity


def check_parity(
    model: Any,
    tokenizer: Any,
    folder: Path,
    texts: list[str],
    max_length: int,
    atol: float,
    batch_size: int,
    reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compare the exported graph (through the runtime, on CPU) with PyTorch on `texts`."""
    if reference is None:
        reference = torch_logits(model, tokenizer, texts, max_length, batch_size)
    runtime = load_runtime(folder, device="cpu", variant="fp32")
    got = runtime.logits(texts, batch_size=batch_size)
    max_diff = float(np.abs(got - reference).max()) if len(texts) else 0.0
    mismatched = int((got.argmax(-1) != reference.argmax(-1)).sum())
    result = {
        "texts": len(texts),
        "max_abs_logit_diff": max_diff,
        "label_mismatches": mismatched,
        "atol": atol,
        "passed": max_diff <= atol and mismatched == 0,
    }
    log.info(
        "parity on %d texts: max |dlogit| %.2e, %d label mismatches",
        len(texts),
        max_diff,
        mismatched,
    )
    if not result["passed"]:
        raise ParityError(
            f"ONNX parity failed on {len(texts)} texts: max |dlogit| {max_diff:.3e} "
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
) -> dict[str, Any]:
    """Export the fine-tuned model to `out_dir` and record the result in `report` and MLflow."""
    import pandas as pd
    from transformers import AutoConfig

    p = params.load(params_path, "base", "export", "tracking")
    test = pd.read_parquet(test_path)
    label2id = AutoConfig.from_pretrained(model_dir).label2id
    unknown = sorted(set(test["label"]) - set(label2id))
    if unknown:
        raise ValueError(f"{test_path}: labels {unknown} are not among the model's {label2id}")
    metrics = json.loads(Path(eval_report).read_text(encoding="utf-8"))
    model_hash = lineage.model_digest(model_dir)
    extra = {
        "base_model": {"name": p.base.model, "sha256": lineage.base_model_digest(p.base.model)},
        "finetuned_sha256": model_hash,
        "metrics": metrics.get("overall", metrics),
        "data_sha256": lineage.file_digest(test_path.parent),
        "params_sha256": params.load(params_path).digest(),
        "git": lineage.git_info(),
        "dvc_stages": lineage.dvc_lock_hashes(),
    }
    with tracking.run_for_model(p.tracking, model_hash) as run_id:
        extra["mlflow_run_id"] = run_id
        tracking.log_params_once(p.flat())
        parity = build_model_folder(
            model_dir,
            out_dir,
            test["text"].tolist(),
            p.base.max_length,
            p.export.opset,
            p.export.parity_atol,
            p.export.batch_size,
            extra,
            labels=[label2id[label] for label in test["label"]],
            variants=tuple(p.export.variants),
            min_agreement=p.export.min_agreement,
            max_accuracy_drop=p.export.max_accuracy_drop,
        )
        manifest = manifest_io.read(out_dir)
        model_card.write(out_dir, manifest)
        result = {
            "parity": parity,
            "variants": manifest["variants"],
            "rejected_variants": manifest.get("rejected_variants", {}),
            "files": manifest["files"],
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
    args = parser.parse_args(argv)
    return entry.guarded(
        lambda: run(args.model, args.test, args.eval_report, args.params, args.out, args.report)
    )


if __name__ == "__main__":
    raise SystemExit(main())
