"""Stage export: the fine-tuned model as an ONNX package, parity-checked on the test set."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bertrt import manifest as manifest_io
from bertrt.manifest import BaseModel, Git, Provenance
from pipeline import tasks
from pipeline.core import entry, lineage, params, tracking
from pipeline.core.atomic import write_json
from pipeline.core.sources import quiet_load_bars
from pipeline.export import gates, model_card, model_folder
from pipeline.export.options import ExportOptions

log = logging.getLogger(__name__)

# The params.yaml sections this stage reads (dvc.yaml lists the same).
SECTIONS = ("base", params.TASK_SECTION, "export", "tracking")


def run(
    model_dir: Path,
    test_path: Path,
    eval_report: Path,
    p: params.Params,
    out_dir: Path,
    report: Path,
    calibration_path: Path | None = None,
) -> dict[str, Any]:
    """Export the fine-tuned model to `out_dir` and record the result in `report` and MLflow;
    the int8 variant is tuned on `calibration_path` (the validation split), never on test."""
    from transformers import AutoConfig, AutoTokenizer

    started = time.perf_counter()
    quiet_load_bars()
    params_sha256 = p.digest()  # every section the caller gave: main loads them all
    p = p.select(*SECTIONS)
    task = tasks.get(p.base.task)
    test = pd.read_parquet(test_path)
    config = AutoConfig.from_pretrained(model_dir)
    labels = task.output_labels(config)
    metrics = json.loads(Path(eval_report).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    options = ExportOptions.from_params(
        p.export,
        p.base.max_length,
        seed=p.base.seed,
        window_stride=task.window_stride(p),
        long_text=task.reading(p),
        temperature=float(metrics.get("calibration", {}).get("temperature", 1.0)),
    )
    model_hash = lineage.model_digest(model_dir)
    git = lineage.git_info()
    provenance = Provenance(
        base_model=BaseModel(p.base.model, lineage.base_model_digest(p.base.model)),
        vocab_size=config.vocab_size,
        finetuned_sha256=model_hash,
        data_sha256=lineage.file_digest(test_path.parent),
        params_sha256=params_sha256,
        # Only what the inputs decide, so that re-running a tag gives the same bytes: the source
        # commit (not the release commit or tag, given later), and the MLflow run is found by
        # the model's hash (tag model_sha256), as a re-run in another store makes another run.
        git=Git(git["source_commit"], git["dirty"]),
        mlflow_experiment=p.tracking.experiment,
        # The data and model this package comes from (reports hold timings; checkpoints are
        # scratch; this stage's own entry is still the previous run's).
        dvc_stages=lineage.dvc_lock_hashes(artifacts_only=True, skip=(out_dir,)),
        environment=lineage.environment(),
    )
    with tracking.run_for_model(p.tracking, model_hash):
        tracking.log_params_once(p.flat())
        parity = model_folder.build(
            model_dir,
            out_dir,
            task,
            task.export_texts(test),
            options,
            score=lambda windows, outputs: task.score(
                windows, outputs, test, labels, p, tokenizer
            ),
            calibration_texts=(
                task.export_texts(pd.read_parquet(calibration_path)) if calibration_path else None
            ),
            metrics=metrics.get("overall", metrics),
            provenance=provenance,
        )
        manifest = manifest_io.read(out_dir)
        model_card.write(out_dir, manifest)
        result = {
            "parity": parity,
            "gate_metric": task.gate_metric,
            "variants": {k: v.gate for k, v in manifest.variants.items()},
            "rejected_variants": {k: v.gate for k, v in manifest.rejected_variants.items()},
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_json(report, result)
        tracking.log_export(result, out_dir)
    rejected = bool(result["rejected_variants"])
    (log.warning if rejected else log.info)(
        "graphs gated against PyTorch on %d test texts (%s), in %.0f s:\n%s",
        parity["texts"],
        task.gate_metric,
        result["seconds"],
        "\n".join(f"  {line}" for line in gates.table(result)),
    )
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
            params.load(args.params),
            args.out,
            args.report,
            args.calibration,
        ),
        writes=[args.out, args.report],
    )


if __name__ == "__main__":
    raise SystemExit(main())
