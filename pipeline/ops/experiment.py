"""Run the pipeline with a config file's values as a DVC experiment, leaving params.yaml as it is.

`python -m pipeline.ops.experiment configs/ner-en.yaml` runs `dvc exp run --temp` with one `-S` per
key of the file: the experiment runs in a temporary copy, logs into the repo's MLflow store, and
its params, metrics and outputs are kept by DVC (`dvc exp show`, `dvc exp apply NAME`).
`--save-model DIR` then copies the experiment's fine-tuned model to DIR, where a later config's
`base.model` can start from it (pretrain or adapt, then fine-tune). `--report FILE` writes what
the experiment measured (its eval, train and export reports, read from the experiment's commit)
with the command, the wall time and the machine into one JSON file: the docs' tables of
experiments are rendered from such files (`reports/experiments/`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import layout, lineage, params
from pipeline.core.atomic import write_json

# The experiment's reports that its record keeps (DVC outputs of evaluate, finetune and export).
REPORTS = {
    "eval": "reports/eval.json",
    "train": "reports/train.json",
    "export": "reports/export.json",
}
EXPORT_KEYS = ("variants", "rejected_variants", "seconds")  # the gates and the export's time
# What the record keeps of train.json: how the model was trained and how long it took.
TRAIN_KEYS = (
    "train_rows",
    "epochs_run",
    "global_steps",
    "train_runtime_s",
    "seconds",
    "precision",
    "processes",
    "device",
    "torch_threads",
    "model_sha256",
    "mlflow_run_id",
)


def overrides(config: Path, extra: list[str] | None = None) -> list[str]:
    """`section.key=value` for every value of `config`, then of `extra` (`section.key=value`
    strings, YAML values), checked against params.yaml's keys."""
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise params.ParamsError(f"{config}: cannot be read ({exc})") from None
    for item in extra or []:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.partition(".")
        if not (sep and dot) or not isinstance(raw, dict):
            raise params.ParamsError(f"--set {item!r}: write section.key=value")
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section][key] = yaml.safe_load(value)
    if not isinstance(raw, dict):
        raise params.ParamsError(f"{config}: must be a mapping of params.yaml sections")
    out = []
    for section, values in raw.items():
        if section not in params.SECTIONS or not isinstance(values, dict):
            sections = ", ".join(params.SECTIONS)
            raise params.ParamsError(f"{config}: {section!r} is not a section ({sections})")
        known = params.SECTIONS[section].__dataclass_fields__
        for key, value in values.items():
            if key not in known:
                raise params.ParamsError(
                    f"{config}: unknown key {section}.{key}; {section!r} takes {', '.join(known)}"
                )
            if (section, key) == ("base", "model") and Path(str(value)).is_dir():
                # A model saved here (--save-model) is git-ignored, so not in the experiment's
                # temporary copy of the repo: it is read from here.
                value = str(Path(str(value)).resolve())
            out.append(f"{section}.{key}={_value(value)}")
    return out


def _value(value: Any) -> str:
    """The value as DVC's -S reads it (YAML): JSON keeps lists, strings and booleans typed."""
    return json.dumps(value) if isinstance(value, (list, dict, str, bool)) else str(value)


def dvc_executable() -> str | None:
    """The dvc of this environment, also when its bin folder is not on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else shutil.which("dvc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path, help="a YAML file with params.yaml's layout")
    parser.add_argument("--name", help="experiment name (default: the file's stem)")
    parser.add_argument("--queue", action="store_true", help="queue it (dvc queue start runs it)")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="run again under a name this commit already has an experiment of, replacing it",
    )
    parser.add_argument(
        "--save-model", type=Path, help="copy the experiment's models/finetuned to this folder"
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="write what the experiment measured, with its command and machine, to this JSON",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value of the config (repeatable), e.g. base.model=models/base/x",
    )
    args = parser.parse_args(argv)
    if (args.save_model or args.report) and args.queue:
        print("error: --save-model and --report need the run itself, not --queue", file=sys.stderr)
        return 1
    try:
        sets = overrides(args.config, args.set)
    except params.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    dvc = dvc_executable()
    if dvc is None:
        print("error: dvc is not installed here; run `make venv` first", file=sys.stderr)
        return 1
    name = args.name or args.config.stem
    existing = baseline_experiment(name)
    if existing and not args.replace:
        print(
            f"error: this commit already has an experiment named {name!r} "
            f"({existing[:10]}); pass --name with another name, or --replace to run it again "
            f"in its place (`dvc exp show` lists them, `dvc exp remove {name}` drops it)",
            file=sys.stderr,
        )
        return 1
    cmd = exp_run_command(dvc, name, sets, queue=args.queue, replace=bool(existing))
    print(" ".join(cmd), flush=True)
    # Stages run `python -m pipeline.<stage>`: this environment's python, whatever PATH says.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path}
    started = time.perf_counter()
    code = subprocess.run(cmd, check=False, env=env).returncode
    seconds = time.perf_counter() - started
    if code == 0 and args.report:
        command = ["python", "-m", "pipeline.ops.experiment", *(argv or sys.argv[1:])]
        code = write_report(dvc, name, args.config, args.set, command, seconds, args.report, env)
    if code or not args.save_model:
        return code
    return save_model(dvc, name, args.save_model, env)


def _crf_scores(dvc: str, sha: str, tmp: Path, env: dict[str, str]) -> dict[str, float] | None:
    """How far a CRF model's learned scores moved from their start at zero: the largest |score|
    of its transitions and of its start and end scores; None for a model without a CRF."""
    out = tmp / "transitions.json"
    path = f"{layout.FINETUNED}/transitions.json"
    get = [dvc, "get", ".", path, "--rev", sha, "-o", str(out)]
    if subprocess.run(get, check=False, env=env, capture_output=True).returncode:
        return None
    table = json.loads(out.read_text(encoding="utf-8"))

    def largest(rows: Any) -> float:
        values = [abs(v) for row in rows for v in (row if isinstance(row, list) else [row])]
        return round(max(values, default=0.0), 4)

    return {
        "max_abs_transition": largest(table["transitions"]),
        "max_abs_start_end": largest([*table["start"], *table["end"]]),
    }


def write_report(
    dvc: str,
    name: str,
    config: Path,
    sets: list[str],
    command: list[str],
    seconds: float,
    target: Path,
    env: dict[str, str],
) -> int:
    """Write `target`: the experiment's REPORTS read from its commit, with the command, the wall
    time of `dvc exp run` and the machine; 1 with the reason when a report cannot be read."""
    sha = experiment_commit(name)
    if sha is None:
        print(f"error: no experiment named {name!r} in refs/exps", file=sys.stderr)
        return 1
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, path in REPORTS.items():
            out = Path(tmp) / f"{key}.json"
            get = [dvc, "get", ".", path, "--rev", sha, "-o", str(out)]
            done = subprocess.run(get, check=False, env=env, capture_output=True, text=True)
            if done.returncode:
                print(
                    f"error: {path} of experiment {name}: {done.stderr.strip()}", file=sys.stderr
                )
                return 1
            found[key] = json.loads(out.read_text(encoding="utf-8"))
        crf = _crf_scores(dvc, sha, Path(tmp), env)
    shown = ["git", "show", f"{sha}:params.yaml"]
    ran_with = yaml.safe_load(subprocess.run(shown, capture_output=True, check=True).stdout)
    train = found["train"]
    record = {
        "experiment": name,
        "commit": sha,
        "config": config.as_posix(),
        "set": sets,
        "command": " ".join(command),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(seconds, 1),
        "machine": train.get("machine") or lineage.machine(),
        "train": {key: train.get(key) for key in TRAIN_KEYS},
        "params": ran_with,  # params.yaml as the experiment ran it
        "eval": found["eval"],
        "export": {key: found["export"].get(key) for key in EXPORT_KEYS},
        **({"crf": crf} if crf else {}),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, record)
    print(f"wrote {target}: what experiment {name} measured, with its command and machine")
    return 0


def exp_run_command(
    dvc: str, name: str, sets: list[str], queue: bool = False, replace: bool = False
) -> list[str]:
    """`dvc exp run` of experiment `name` with one `-S` per set; `-f` where it replaces one of
    the same name and baseline (DVC's way to overwrite; it also reruns every stage)."""
    cmd = [dvc, "exp", "run", "--queue" if queue else "--temp", "-n", name]
    if replace:
        cmd.append("-f")
    for item in sets:
        cmd += ["-S", item]
    return cmd


def baseline_experiment(name: str) -> str | None:
    """The commit of the experiment called `name` whose baseline is HEAD, the one a new run of
    that name from here would clash with (DVC keeps it at refs/exps/<HEAD[:2]>/<HEAD[2:]>/name);
    None when there is none."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    ref = f"refs/exps/{head[:2]}/{head[2:]}/{name}"
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", ref], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def experiment_commit(name: str) -> str | None:
    """The commit of the newest experiment called `name` (DVC keeps it under refs/exps)."""
    out = subprocess.run(
        ["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname) %(objectname)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        ref, sha = line.split()
        if ref.startswith("refs/exps/") and ref.rsplit("/", 1)[-1] == name:
            return sha
    return None


def save_model(dvc: str, name: str, target: Path, env: dict[str, str]) -> int:
    """Copy experiment `name`'s models/finetuned to `target` (replacing what was there)."""
    sha = experiment_commit(name)
    if sha is None:
        print(f"error: no experiment named {name!r} in refs/exps", file=sys.stderr)
        return 1
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [dvc, "get", ".", str(layout.FINETUNED), "--rev", sha, "-o", str(tmp)]
    print(" ".join(cmd), flush=True)
    code = subprocess.run(cmd, check=False, env=env).returncode
    if code:
        shutil.rmtree(tmp, ignore_errors=True)
        return code
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    print(f"saved the model of experiment {name} ({sha[:10]}) to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
