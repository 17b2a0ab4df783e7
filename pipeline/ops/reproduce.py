"""`make reproduce TAG=v1 [RERUN=1]`: bring back a tagged experiment, and prove it re-runs.

The tag is checked out into its own worktree (`.reproduce/<tag>`, sharing this repo's DVC cache
and remote), its data and models are restored from the cache or the remote, and its headline
metrics are printed. With `--rerun` the whole pipeline runs again there (`dvc repro --force`,
into a store of its own) and is compared with the tag, stage by stage: every output's hash, the
test metrics and the exported model's predictions on the test split.

On the machine that made the tag (same CPU instruction set and package lock, read from the
manifest) everything must be equal. Elsewhere the data stages (ingest, validate, tokenize) must
still be byte-identical, the weights may differ in their last bits, and metrics and logits must
agree within `export.parity_atol`. Exit 1, naming the first stage that diverged, otherwise.

A machine that would train the tag's params in another precision (`finetune.precision: bf16`
is bf16 where it is native and fp32 elsewhere) cannot repeat its training run: there only the
data stages are re-run and compared, and the exit is 1 with that reason.
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

from bertrt.contract import BASE_VARIANT, MANIFEST_FILE
from pipeline import tasks
from pipeline.core import layout, lineage, params, precision
from pipeline.ops.release import ReleaseError, _run

WORKTREES = Path(".reproduce")
DATA_STAGES = ("ingest", "validate", "tokenize")  # byte-identical on any machine


def default_remote() -> tuple[str, str] | None:
    """(name, resolved url) of the default DVC remote of this repo, read from its merged config
    as `dvc remote list` reads it: that command's output wraps at 80 columns when it is not a
    terminal, which moves "(default)" of a long url onto a line of its own."""
    from dvc.config import Config

    conf = Config.from_cwd(validate=False).read(None)
    name = conf["core"].get("remote")
    if not name or name not in conf["remote"]:
        return None
    return name, str(conf["remote"][name]["url"])


def checkout(tag: str, where: Path) -> Path:
    """A worktree of `tag` at `where` with its DVC outputs restored (cache, then remote)."""
    if not _run(["git", "tag", "--list", tag]).strip():
        raise ReleaseError(f"no tag {tag}; `git tag` lists the releases")
    if where.exists():
        _run(["git", "worktree", "remove", "--force", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)
    _run(["git", "worktree", "prune"])
    _run(["git", "worktree", "add", "-q", "--detach", str(where), tag])
    cache = Path(_run(["dvc", "cache", "dir"]).strip()).resolve()
    _in(where, ["dvc", "cache", "dir", "--local", str(cache)])
    remote = default_remote()
    if remote:  # a relative url in .dvc/config would resolve from the worktree
        _in(where, ["dvc", "remote", "modify", "--local", remote[0], "url", remote[1]])
    _in(where, ["dvc", "pull", "--run-cache"] if remote else ["dvc", "checkout"])
    return where


def _in(folder: Path, cmd: list[str], **env: str) -> str:
    done = subprocess.run(
        cmd, cwd=folder, capture_output=True, text=True, env={**os.environ, **env}
    )
    if done.returncode != 0:
        raise ReleaseError(f"{' '.join(cmd)} in {folder} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def training_precisions(folder: Path) -> tuple[str | None, str]:
    """The precision the checked-out run trained in (its `reports/train.json`; None where that
    is not recorded) and the one this machine trains its params in."""
    report = folder / "reports" / "train.json"
    tagged = json.loads(report.read_text("utf-8")).get("precision") if report.is_file() else None
    return tagged, precision.precision_here(
        params.load(folder / "params.yaml", "finetune").finetune.precision
    )


def untrainable_here(tag: str, tagged: str | None, here: str) -> str | None:
    """Why this machine cannot repeat `tag`'s training run (None when it can)."""
    if tagged is None or tagged == here:
        return None
    return (
        f"{tag} trained in {tagged} and this machine trains its params in {here} "
        f"(finetune.precision bf16 is bf16 only where bf16 is native: AMX, AVX512-BF16 or the "
        f"GPU); that is another training run, whose metrics differ as two seeds would. Re-run "
        f"{tag} on a machine that trains in {tagged}, or release with finetune.precision: fp32 "
        f"to reproduce across machines"
    )


def _table(rows: list[list[str]], tag: str) -> None:
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in [["stage", "output", tag, "re-run", ""], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)))


def _diverged(tag: str, first: str) -> None:
    print(f"{tag} did not reproduce: the first stage that diverged is {first}", file=sys.stderr)


def outputs(folder: Path) -> dict[str, dict[str, str]]:
    """Per stage (in pipeline order), the md5 of each data and model output in dvc.lock."""
    return lineage.dvc_lock_hashes(folder / "dvc.lock", artifacts_only=True)


def predictions_of(folder: Path, exact: bool) -> list[str]:
    """The exported model's predictions on the test split, one JSON string per text; without
    `exact`, scores are left out (labels, spans and fills must agree, scores may move)."""
    import pandas as pd

    import bertrt

    # The base graph: the variant a load picks by timing could differ between the two loads.
    predictor = bertrt.load(folder / "models" / "onnx", device="cpu", variant=BASE_VARIANT)
    test = pd.read_parquet(layout.split_file(folder / layout.VALIDATED, layout.TEST))
    texts = tasks.get(predictor.engine.manifest.task).texts(test)
    return [
        json.dumps(_strip(p.as_dict(), exact), sort_keys=True) for p in predictor.predict(texts)
    ]


def _strip(value: Any, exact: bool) -> Any:
    if exact:
        return value
    if isinstance(value, dict):
        return {k: _strip(v, exact) for k, v in value.items() if not isinstance(v, float)}
    if isinstance(value, list):
        return [_strip(v, exact) for v in value if not isinstance(v, float)]
    return value


def compare(
    tagged: dict[str, dict[str, str]],
    again: dict[str, dict[str, str]],
    same_machine: bool,
    atol: float,
    metrics: tuple[dict[str, Any], dict[str, Any]],
) -> tuple[list[list[str]], str | None]:
    """Rows of (stage, output, tag, re-run, verdict) and the first stage outside the
    tolerance (None when everything is inside it)."""
    rows, first = [], None
    for stage, outs in tagged.items():
        for path, md5 in outs.items():
            other = again.get(stage, {}).get(path, "")
            if md5 == other:
                verdict = "equal"
            elif same_machine or stage in DATA_STAGES:
                verdict = "DIFFERS"
            else:
                verdict = "differs (allowed: weights by instruction set)"
            if verdict == "DIFFERS" and first is None:
                first = stage
            rows.append([stage, path, md5[:12], other[:12], verdict])
    before, after = (_flat(m) for m in metrics)
    for key, value in before.items():
        other = after.get(key)
        numbers = isinstance(value, (int, float)) and isinstance(other, (int, float))
        inside = value == other or (not same_machine and numbers and abs(value - other) <= atol)
        verdict = "equal" if value == other else ("within tolerance" if inside else "DIFFERS")
        shown = [f"{v:.6g}" if isinstance(v, (int, float)) else str(v) for v in (value, other)]
        rows.append(["metrics", key, *shown, verdict])
        if not inside and first is None:
            first = "evaluate"
    return rows, first


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metric groups (`{"validation": {"macro_f1": ...}}`) as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run(tag: str, rerun: bool) -> int:
    where = checkout(tag, WORKTREES / tag)
    headline = where / "reports" / "metrics.json"
    metrics = json.loads(headline.read_text(encoding="utf-8")) if headline.is_file() else {}
    print(f"{tag} restored in {where}: {json.dumps(metrics)}")
    if not rerun:
        return 0
    # Read as plain JSON: the tag may have written an older manifest schema than this code reads.
    manifest = json.loads((where / layout.ONNX_MODEL / MANIFEST_FILE).read_text("utf-8"))
    made_on = manifest.get("provenance", {}).get("environment", {})
    here = lineage.environment()
    same = (
        bool(made_on)
        and made_on.get("cpu") == here["cpu"]
        and (made_on.get("lock_sha256") == here["lock_sha256"])
    )
    atol = float(yaml.safe_load((where / "params.yaml").read_text())["export"]["parity_atol"])
    tagged = outputs(where)
    store = f"sqlite:///{(where / 'reproduce-mlflow.db').resolve()}"
    trained, here_trains = training_precisions(where)
    print(f"training precision: {trained or 'not recorded'} at {tag}, {here_trains} here")
    why = untrainable_here(tag, trained, here_trains)
    if why:
        return data_stages_only(where, tag, tagged, same, atol, store, why)
    before_labels = predictions_of(where, same)
    shutil.rmtree(where / "models" / "checkpoints", ignore_errors=True)
    print(f"re-running every stage of {tag} (MLflow store {store}) ...", flush=True)
    _in(where, ["dvc", "repro", "--force", "--no-run-cache"], MLFLOW_TRACKING_URI=store)
    again = outputs(where)
    after_metrics = json.loads(headline.read_text(encoding="utf-8"))
    rows, first = compare(tagged, again, same, atol, (metrics, after_metrics))
    after_labels = predictions_of(where, same)
    changed = sum(a != b for a, b in zip(before_labels, after_labels, strict=True))
    rows.append(
        [
            "predictions",
            f"{len(before_labels)} test texts",
            "",
            f"{changed} differ",
            "equal" if not changed else "DIFFERS",
        ]
    )
    if changed and first is None:
        first = "export"
    print(
        f"same machine as {tag}: {same} (cpu {here['cpu']['flags']}, lock "
        f"{str(here['lock_sha256'])[:12]})"
    )
    _table(rows, tag)
    if first:
        _diverged(tag, first)
        return 1
    print(f"{tag} reproduced: every output {'is equal' if same else 'within tolerance'}")
    return 0


def data_stages_only(
    where: Path,
    tag: str,
    tagged: dict[str, dict[str, str]],
    same: bool,
    atol: float,
    store: str,
    why: str,
) -> int:
    """Re-run and compare the data stages, which are byte-identical on any machine; exit 1 with
    `why` the training run cannot be repeated here."""
    stages = [stage for stage in DATA_STAGES if stage in tagged]
    print(f"{why}.\nre-running the data stages of {tag} only ({', '.join(stages)}) ...")
    _in(
        where,
        ["dvc", "repro", "--force", "--no-run-cache", "--single-item", *stages],
        MLFLOW_TRACKING_URI=store,
    )
    again = outputs(where)
    rows, first = compare({s: tagged[s] for s in stages}, again, same, atol, ({}, {}))
    _table(rows, tag)
    if first:
        _diverged(tag, first)
    else:
        print(
            f"{tag}'s data stages reproduced: every output is equal; its training was not "
            f"re-run here",
            file=sys.stderr,
        )
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tag", help="a release tag, e.g. v1")
    parser.add_argument("--rerun", action="store_true", help="re-run every stage and compare")
    args = parser.parse_args(argv)
    try:
        return run(args.tag, args.rerun)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
