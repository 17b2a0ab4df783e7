"""Print what the last pipeline run produced and where to look next."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.core import layout


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--model", type=Path, default=layout.ONNX_MODEL)
    args = parser.parse_args(argv)
    evaluation = read(args.reports / "eval.json").get("overall", {})
    train = read(args.reports / "train.json")
    export = read(args.reports / "export.json")
    print("\nPipeline finished.")
    if evaluation:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items() if isinstance(v, float))
        print(f"  test {shown} on {evaluation.get('rows')} rows")
    if export:
        parity = export.get("parity", {})
        print(f"  ONNX parity: max |dlogit| {parity.get('max_abs_logit_diff', float('nan')):.2e}")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
