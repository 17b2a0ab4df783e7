"""Run the pipeline with a config file's values as a DVC experiment, leaving params.yaml as it is.

`python -m pipeline.ops.experiment configs/ner-en.yaml` runs `dvc exp run --temp` with one `-S` per
key of the file: the experiment runs in a temporary copy, logs into the repo's MLflow store, and
its params, metrics and outputs are kept by DVC (`dvc exp show`, `dvc exp apply NAME`).
`--save-model DIR` then copies the experiment's fine-tuned model to DIR, where a later config's
`base.model` can start from it (pretrain or adapt, then fine-tune).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import layout, params


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
        "--save-model", type=Path, help="copy the experiment's models/finetuned to this folder"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value of the config (repeatable), e.g. base.model=models/base/x",
    )
    args = parser.parse_args(argv)
    if args.save_model and args.queue:
        print("error: --save-model needs the run itself, not --queue", file=sys.stderr)
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
    cmd = [dvc, "exp", "run", "--queue" if args.queue else "--temp", "-n", name]
    for item in sets:
        cmd += ["-S", item]
    print(" ".join(cmd), flush=True)
    # Stages run `python -m pipeline.<stage>`: this environment's python, whatever PATH says.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path}
    code = subprocess.run(cmd, check=False, env=env).returncode
    if code or not args.save_model:
        return code
    return save_model(dvc, name, args.save_model, env)


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
