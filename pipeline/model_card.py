"""The model folder's README.md, written from its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bertrt.contract import MODEL_CARD_FILE
from pipeline.atomic import atomic_file


def render(manifest: dict[str, Any]) -> str:
    """Markdown: what the model is, how it was made, how well it does, how to run it."""
    metrics = manifest.get("metrics", {})
    git = manifest.get("git", {})
    lines = [
        f"# {manifest['task']} model",
        "",
        f"Labels (in output order): {', '.join(manifest['labels'])}. "
        f"Maximum length: {manifest['max_length']} tokens.",
        "",
        "## Provenance",
        "",
        f"- base model: `{manifest.get('base_model', {}).get('name')}` "
        f"(weights sha256 `{manifest.get('base_model', {}).get('sha256')}`)",
        f"- fine-tuned weights sha256: `{manifest.get('finetuned_sha256')}`",
        f"- data sha256: `{manifest.get('data_sha256')}`; params sha256: "
        f"`{manifest.get('params_sha256')}`",
        f"- git commit `{git.get('commit')}`"
        + (" (uncommitted changes)" if git.get("dirty") else "")
        + (f", tag `{git['tag']}`" if git.get("tag") else ""),
        f"- MLflow run `{manifest.get('mlflow_run_id')}`",
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
    for name, entry in manifest.get("variants", {}).items():
        gate = entry.get("gate", {})
        summary = (
            f"max abs logit diff {gate['max_abs_logit_diff']:.1e}"
            if "max_abs_logit_diff" in gate
            else ""
        )
        if gate.get("agreement") is not None:
            summary += f", agreement {gate['agreement']:.4f}"
        lines.append(
            f"| {name} | `{entry['file']}` | {entry['precision']} | "
            f"{', '.join(entry.get('providers', []))} | {summary} |"
        )
    for name, entry in manifest.get("rejected_variants", {}).items():
        lines.append(f"| {name} (not shipped) | | | | {entry.get('gate', {}).get('reason', '')} |")
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


def write(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MODEL_CARD_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(render(manifest), encoding="utf-8")
    return path
