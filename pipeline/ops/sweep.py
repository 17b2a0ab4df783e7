"""A hyperparameter sweep as queued DVC experiments, ranked by a validation metric.

    python -m pipeline.ops.sweep configs/sweeps/cls.yaml             # queue, run one by one, rank
    python -m pipeline.ops.sweep configs/sweeps/cls.yaml --rank-only # rank the ones that have run

The file names the metric (a `validation.` key of reports/metrics.json: a sweep never chooses by
test), the last stage each experiment runs, values shared by all, and one entry per experiment
with its `section.key` values. Each experiment is `dvc exp run --queue -n NAME -S ...`, logs its
own MLflow run, and keeps its params and metrics in git refs (`dvc exp show`); the ranking reads
them from there, so it works whichever commit each experiment started from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import layout, params
from pipeline.ops.experiment import _value, dvc_executable

METRICS = str(layout.METRICS)


def load(config: Path) -> dict[str, Any]:
    """The sweep file, checked: metric, target, common values and experiments."""
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise params.ParamsError(f"{config}: cannot be read ({exc})") from None
    metric = str(raw.get("metric", ""))
    if not metric.startswith("validation."):
        raise params.ParamsError(
            f"{config}: metric {metric!r} must be a validation metric of {METRICS} "
            "(e.g. validation.macro_f1): a sweep that chooses by test overfits the test split"
        )
    experiments = raw.get("experiments") or {}
    if not isinstance(experiments, dict) or not experiments:
        raise params.ParamsError(f"{config}: experiments: give at least one NAME: {{key: value}}")
    common = raw.get("common") or {}
    for name, values in {"common": common, **experiments}.items():
        for dotted in values or {}:
            section, _, key = str(dotted).partition(".")
            fields = getattr(params.SECTIONS.get(section), "__dataclass_fields__", {})
            if key not in fields:
                raise params.ParamsError(f"{config}: {name}: {dotted!r} is not a params.yaml key")
    return {
        "metric": metric,
        "greater_is_better": bool(raw.get("greater_is_better", True)),
        "target": str(raw.get("target", "")),
        "common": common,
        "experiments": {
            name: {**common, **(values or {})} for name, values in experiments.items()
        },
    }


def metric_of(metrics: dict[str, Any], dotted: str) -> float | None:
    value: Any = metrics
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def rank(
    results: dict[str, dict[str, Any] | None], metric: str, greater_is_better: bool = True
) -> list[tuple[str, float | None]]:
    """(name, metric) best first; experiments without the metric (failed, not run) last."""
    scored = [(name, metric_of(m or {}, metric)) for name, m in results.items()]
    done = sorted(
        (s for s in scored if s[1] is not None), key=lambda s: s[1], reverse=greater_is_better
    )
    return done + [s for s in scored if s[1] is None]


def experiment_metrics(name: str) -> dict[str, Any] | None:
    """reports/metrics.json of the newest experiment called `name` (None if there is none)."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for ref in refs:
        if ref.rsplit("/", 1)[-1] == name:
            shown = subprocess.run(
                ["git", "show", f"{ref}:{METRICS}"], capture_output=True, text=True
            )
            return json.loads(shown.stdout) if shown.returncode == 0 else None
    return None


def dvc() -> str:
    found = dvc_executable()
    if found is None:
        raise SystemExit("error: dvc is not installed here; run `make venv` first")
    return found


def queue(sweep: dict[str, Any], env: dict[str, str]) -> None:
    for name, values in sweep["experiments"].items():
        cmd = [dvc(), "exp", "run", "--queue", "-n", name]
        for dotted, value in values.items():
            cmd += ["-S", f"{dotted}={_value(value)}"]
        if sweep["target"]:
            cmd.append(sweep["target"])
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)


def wait(names: list[str], env: dict[str, str], poll_s: float = 30.0) -> dict[str, str]:
    """Start one queue worker and wait until none of `names` is queued or running."""
    subprocess.run([dvc(), "queue", "start", "-j", "1"], check=True, env=env)
    while True:
        status = subprocess.run(
            [dvc(), "queue", "status"], capture_output=True, text=True, check=True, env=env
        ).stdout
        states = {}
        for line in status.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] in names:
                states[parts[1]] = parts[-1]
        if not any(state in ("Queued", "Running") for state in states.values()):
            return states
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--rank-only", action="store_true", help="rank what has already run")
    args = parser.parse_args(argv)
    try:
        sweep = load(args.config)
    except params.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    names = list(sweep["experiments"])
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path}
    if not args.rank_only:
        queue(sweep, env)
        for name, state in wait(names, env).items():
            if state != "Success":
                print(f"{name}: {state} (dvc queue logs {name})", file=sys.stderr)
    results = {name: experiment_metrics(name) for name in names}
    ranking = rank(results, sweep["metric"], sweep["greater_is_better"])
    # The test accuracy is shown for the record; it takes no part in the choice.
    print(f"\n{'experiment':<28} {sweep['metric']:>22} {'test accuracy':>14}  values")
    for name, score in ranking:
        shown = f"{score:.5f}" if score is not None else "not run"
        test = metric_of(results[name] or {}, "accuracy")
        tested = f"{test:.5f}" if test is not None else "-"
        values = ", ".join(f"{k}={v}" for k, v in sweep["experiments"][name].items())
        print(f"{name:<28} {shown:>22} {tested:>14}  {values}")
    best, score = ranking[0]
    if score is None:
        print("no experiment has the metric yet", file=sys.stderr)
        return 1
    print(
        f"\nbest by {sweep['metric']}: {best}; `dvc exp apply {best}` brings it into the "
        "workspace, or copy its values into params.yaml"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
