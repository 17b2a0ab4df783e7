"""Print what the last pipeline run produced, which graph the runtime picks here, and where to
look next (the end of `make run`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bertrt.contract import MANIFEST_FILE
from pipeline.core import layout
from pipeline.export.gates import table


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def quality(evaluation: dict[str, Any]) -> list[str]:
    """The test metrics; the ECE named as uncalibrated and, where a temperature ships, after it."""
    overall = evaluation.get("overall", {})
    calibration = evaluation.get("calibration", {})
    lines = []
    if overall:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in overall.items() if isinstance(v, float) and k != "ece"
        )
        lines.append(f"  test {shown} on {overall.get('rows')} rows")
    if "ece_after" in calibration:
        lines.append(
            f"  calibration (ECE, test): {calibration['ece_before']:.4f} uncalibrated, "
            f"{calibration['ece_after']:.4f} with the shipped temperature "
            f"{calibration['temperature']:.3f} (fitted on validation)"
        )
    elif "ece" in overall:
        lines.append(f"  calibration (ECE, test): {overall['ece']:.4f} uncalibrated")
    return lines


def duration(seconds: float) -> str:
    """Seconds as "42 s" or "23 min 55 s"."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def stage_times(reports: dict[str, dict[str, Any]]) -> str | None:
    """The time of each stage whose report records one (the fine-tune's whole stage and, in
    brackets, its training loop)."""
    train = reports["train"]
    loop, whole = train.get("train_runtime_s"), train.get("seconds")
    shown = []
    if loop is not None:
        shown.append(
            f"finetune (training loop) {duration(loop)}"
            if whole is None
            else f"finetune {duration(whole)} (training loop {duration(loop)})"
        )
    for report, stage in (("eval", "evaluate"), ("export", "export")):
        seconds = reports[report].get("seconds")
        if seconds is not None:
            shown.append(f"{stage} {duration(seconds)}")
    return f"  stage times: {', '.join(shown)}" if shown else None


def picked_here(model: Path) -> str:
    """The graph `bertrt.load` chooses on this machine, and why (its probe's timings)."""
    import bertrt

    logging.getLogger("bertrt").setLevel(logging.WARNING)
    engine = bertrt.load(model).engine
    if not engine.probe_s:
        return f"{engine.variant} on {engine.provider} (the only candidate there)"
    timed = ", ".join(f"{n} {s * 1000:.1f} ms" for n, s in sorted(engine.probe_s.items()))
    return (
        f"{engine.variant} on {engine.provider}, timed on a probe batch at load ({timed}; "
        "the preferred graph stays unless another is 15% faster)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--model", type=Path, default=layout.ONNX_MODEL)
    args = parser.parse_args(argv)
    train = read(args.reports / "train.json")
    evaluation = read(args.reports / "eval.json")
    export = read(args.reports / "export.json")
    print("\nPipeline finished.")
    for line in quality(evaluation):
        print(line)
    if export:
        parity = export.get("parity", {})
        print(f"  ONNX parity: max |dlogit| {parity.get('max_abs_logit_diff', float('nan')):.2e}")
        print("  graphs, gated against PyTorch on the test split:")
        for line in table(export):
            print(f"    {line}")
    if (args.model / MANIFEST_FILE).is_file():
        print(f"  the runtime picks here: {picked_here(args.model)}")
    times = stage_times({"train": train, "eval": evaluation, "export": export})
    if times:
        print(times)
    if train:
        print(f"  MLflow run {train.get('mlflow_run_id')} in {train.get('tracking_uri')}")
    print("Next:")
    print(
        "  make mlflow-ui            # http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    )
    print("  dvc metrics show          # the headline metrics (reports/metrics.json)")
    print("  dvc plots show --json     # training curves and confusion matrix")
    print(f'  python -m bertrt predict --model {args.model} "a warm, funny film"')
    print(f"  python -m bertrt serve --model {args.model}")
    print("  make docs                 # the documentation site on http://127.0.0.1:8001")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
