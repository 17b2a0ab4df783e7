"""The model folder's README.md, written from its manifest."""

from __future__ import annotations

from pathlib import Path

from bertrt.contract import MODEL_CARD_FILE
from bertrt.manifest import Manifest, Provenance
from pipeline.core.atomic import atomic_file


def render(manifest: Manifest) -> str:
    """Markdown: what the model is, how it was made, how well it does, how to run it."""
    metrics = manifest.metrics
    info = manifest.provenance
    reading = manifest.reading()
    if manifest.window_stride:
        long_texts = f"longer texts are read in windows sharing {manifest.window_stride} tokens"
    elif reading.strategy == "windows":
        long_texts = (
            f"longer texts are read in windows sharing {reading.stride} tokens, their logits "
            f"combined by {reading.aggregate}"
        )
    elif reading.strategy == "head+tail":
        long_texts = (
            f"of longer texts the first {reading.head_fraction:.0%} and the last "
            f"{1 - reading.head_fraction:.0%} of the tokens are read"
        )
    else:
        long_texts = "longer texts are cut"
    if manifest.temperature != 1.0:
        long_texts += (
            f". Scores are calibrated: logits / {manifest.temperature:.3f} (temperature "
            "fitted on validation) before the softmax"
        )
    lines = [
        f"# {manifest.task} model",
        "",
        f"Labels (in output order): {', '.join(manifest.labels)}. "
        f"Maximum length: {manifest.max_length} tokens; {long_texts}.",
        "",
        "## Provenance",
        "",
        *(_provenance(info) if info else ["Not recorded: exported outside the pipeline."]),
        "",
        "## Test metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in sorted(metrics.items())
        ],
        "",
        "## Graphs",
        "",
        "| variant | file | precision | providers | gate |",
        "|---|---|---|---|---|",
    ]
    for name, entry in manifest.variants.items():
        gate = entry.gate
        summary = (
            f"max abs logit diff {gate['max_abs_logit_diff']:.1e}"
            if "max_abs_logit_diff" in gate
            else ""
        )
        if gate.get("agreement") is not None:
            summary += f", agreement {gate['agreement']:.4f}"
        lines.append(
            f"| {name} | `{entry.file}` | {entry.precision} | "
            f"{', '.join(entry.providers)} | {summary} |"
        )
    for name, entry in manifest.rejected_variants.items():
        lines.append(f"| {name} (not shipped) | | | | {entry.gate.get('reason', '')} |")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        'python -m bertrt predict --model . "some text"',
        "python -m bertrt serve --model .",
        "```",
        "",
        "Every file's sha256 is listed in `manifest.json` and checked when the model loads.",
        "",
    ]
    return "\n".join(lines)


def write(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MODEL_CARD_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(render(manifest), encoding="utf-8")
    return path


def _provenance(info: Provenance) -> list[str]:
    return [
        f"- base model: `{info.base_model.name}` (weights sha256 `{info.base_model.sha256}`); "
        f"vocabulary {info.vocab_size} tokens",
        f"- fine-tuned weights sha256: `{info.finetuned_sha256}`",
        f"- data sha256: `{info.data_sha256}`; params sha256: `{info.params_sha256}`",
        f"- git commit `{info.git.source_commit}`"
        + (" (uncommitted changes)" if info.git.dirty else ""),
        f"- MLflow: the run tagged `model_sha256` = `{info.finetuned_sha256}` in "
        f"experiment `{info.mlflow_experiment}`",
    ]
