"""The model folder as a library: the fp32 graph exported and checked against PyTorch, the
tokenizer and labels beside it, the gated variants, the manifest; written atomically."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bertrt import manifest as manifest_io
from bertrt.contract import BASE_VARIANT, INPUT_NAMES, LABELS_FILE, TOKENIZER_FILE, VARIANTS
from bertrt.engine import Engine, open_engine
from bertrt.manifest import Manifest, Provenance, VariantEntry
from bertrt.predictors import dynamic_axes, output_names
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.export import quiet
from pipeline.export.options import ExportOptions, ExportTask, Reference, Score
from pipeline.export.variants import Shape, add_variants

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch model."""


def export_graph(model: Any, tokenizer: Any, path: Path, opset: int, task: str) -> tuple[str, ...]:
    """Write the fp32 graph with the task's dynamic axes; return the input names used."""
    import torch

    sample = tokenizer(["a sample text", "another"], padding=True, return_tensors="pt")
    inputs = tuple(name for name in INPUT_NAMES if name in sample)
    model.eval()
    with torch.no_grad(), quiet.onnx_export():
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


def build(
    model_dir: Path,
    out: Path,
    task: ExportTask,
    texts: list[str],
    options: ExportOptions,
    score: Score | None = None,
    calibration_texts: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    provenance: Provenance | None = None,
) -> dict[str, Any]:
    """Export, check parity on `texts`, add the gated variants, and write the complete model
    folder atomically.

    Args:
        score: the task metric of runtime outputs on `texts`, for the variants' metric-drop gate.
        calibration_texts: texts (not the test split's) on which the int8 search and smoothing
            measure (`options.int8_search_agreement`, `options.int8_smooth_alpha`).
        metrics: the evaluation's figures, recorded in the manifest.

    Returns the parity results; raises ParityError (leaving `out` untouched) when they fail.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = task.model_class().from_pretrained(
        model_dir, attn_implementation="eager", use_safetensors=True
    )
    label_names = task.output_labels(model.config)
    base = VARIANTS[BASE_VARIANT]
    with atomic_dir(out) as tmp:
        inputs = export_graph(model, tokenizer, tmp / base.file, options.opset, task.name)
        shutil.copy(Path(model_dir) / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        write_json(tmp / LABELS_FILE, label_names)
        files = [base.file, TOKENIZER_FILE, LABELS_FILE]
        files += task.model_folder_files(Path(model_dir), tmp)
        manifest = Manifest(
            task=task.name,
            labels=label_names,
            max_length=options.max_length,
            pad_token_id=tokenizer.pad_token_id or 0,
            inputs=list(inputs),
            outputs=list(output_names(task.name)),
            opset=options.opset,
            window_stride=options.window_stride,
            long_text=options.long_text.as_dict() if options.long_text else {},
            temperature=options.temperature,
            decoding=task.decoding(Path(model_dir)),
            variants={BASE_VARIANT: VariantEntry.of(BASE_VARIANT)},
            files=manifest_io.file_entries(tmp, files),
            metrics=metrics or {},
            provenance=provenance,
        )
        manifest_io.write(tmp, manifest)
        with quiet.loggers("bertrt"):  # the parity line below says which graph ran where
            engine = open_engine(tmp, device="cpu", variant=BASE_VARIANT)
        windows = engine.encode(texts)
        flat = [w for per_text in windows for w in per_text]
        outputs = torch_outputs(model, engine, flat, options.batch_size)
        got, mask = engine.infer(flat, options.batch_size)
        parity = check_parity(got, outputs, mask, len(texts), options.parity_atol)
        manifest.variants[BASE_VARIANT].gate = parity
        manifest.variants[BASE_VARIANT].shipped = True
        calibration = None
        if calibration_texts and options.calibrates_int8():
            calibration = [w for per_text in engine.encode(calibration_texts) for w in per_text]
        if options.variants:
            reference = Reference(
                flat,
                outputs,
                mask,
                (lambda got: score(windows, got)) if score else None,
            )
            files += add_variants(
                engine,
                manifest,
                options,
                reference,
                Shape(model.config.num_attention_heads, model.config.hidden_size),
                calibration,
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
