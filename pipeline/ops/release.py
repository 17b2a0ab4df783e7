"""`make release TAG=v1`: freeze a finished run as a tag, its artifacts and a registered model.

Refuses a tree whose code or params differ from the commit, and a `dvc.lock` that does not match
the workspace (`dvc status`); then commits `dvc.lock` and `reports/`, tags, pushes data, models
and the run cache to the DVC remote, and registers the exported package in the MLflow Model
Registry: logged as a model of its training run (signature and input example), the tag, commit
and lineage in the version's description and tags, the wheel attached, and the alias
`candidate`, which a person moves to `production` once they trust it.

With a signing key (`--signing-key`, `BERTRT_SIGNING_KEY`; its password, if any, in
`BERTRT_SIGNING_KEY_PASSWORD`) the registered folder and the wheel's folder carry a signature
(bertrt.signing) that `bertrt.load(..., public_key=)` checks. The workspace's `models/onnx`, a
DVC output, is left as the export wrote it: a signed copy is registered. Without a key the
release says it is unsigned and goes on; `--signed` refuses instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tasks
from pipeline.core import entry, layout, lineage, params, tracking

log = logging.getLogger(__name__)
CANDIDATE = "candidate"
EXAMPLES = 3  # test texts used as the registered model's input example
SIGNING_KEY_ENV = "BERTRT_SIGNING_KEY"
SIGNING_PASSWORD_ENV = "BERTRT_SIGNING_KEY_PASSWORD"


class ReleaseError(RuntimeError):
    """The tree or the pipeline is not in a state that can be released."""


def _run(cmd: list[str], check: bool = True) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ReleaseError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def check_tree(tag: str) -> None:
    """The tag is new, the code and params are committed, and dvc.lock matches the workspace."""
    if _run(["git", "tag", "--list", tag]).strip():
        raise ReleaseError(f"tag {tag} exists already; choose another name")
    changed = _run(["git", "status", "--porcelain", "--", *lineage.except_own_outputs()])
    changed = changed.splitlines()
    if changed:
        listed = ", ".join(line[3:] for line in changed[:8])
        raise ReleaseError(
            f"the tree has changes that are not committed ({listed}); commit or stash them, "
            "then run the pipeline (make run) and release"
        )
    # Checkpoints (resumption state) differ after `dvc exp apply`; they are not released.
    status = lineage.stale_stages(json.loads(_run(["dvc", "status", "--json"]) or "{}"))
    if status:
        raise ReleaseError(
            f"dvc.lock is stale: {', '.join(sorted(status))} changed since the last run; "
            "run `make run` (dvc repro) first"
        )


def commit_and_tag(tag: str, message: str) -> str:
    """Commit dvc.lock and reports/ if the run changed them; an annotated tag; the commit."""
    _run(["git", "add", "--", *lineage.OWN_OUTPUTS])
    if _run(["git", "diff", "--cached", "--name-only"]).strip():
        _run(["git", "commit", "-q", "-m", f"Release {tag}: dvc.lock and reports"])
    _run(["git", "tag", "-a", tag, "-m", message or f"Release {tag}"])
    return _run(["git", "rev-parse", "HEAD"]).strip()


def push() -> None:
    """Data, models and the run cache to the default DVC remote."""
    if not _run(["dvc", "remote", "list"]).strip():
        raise ReleaseError(
            "no DVC remote is configured (.dvc/config); add one with dvc remote add"
        )
    _run(["dvc", "push", "--run-cache"])


@dataclass(frozen=True)
class SigningKey:
    """The private key a release signs with, checked before anything is tagged or pushed."""

    path: Path
    password: str | None
    fingerprint: str  # sha256 of its public key: which key signed a version


def signing_key(path: str | None, required: bool) -> SigningKey | None:
    """The key named by `path`, loaded and checked; None (with one line saying the release is
    unsigned) when there is none, or a ReleaseError when `required`."""
    from bertrt import signing

    if not path:
        if required:
            raise ReleaseError(
                f"--signed asks for a signature but no key is given; pass --signing-key KEY.pem "
                f"(make release SIGNING_KEY=KEY.pem) or set {SIGNING_KEY_ENV}"
            )
        print(
            f"release: unsigned: no signing key (SIGNING_KEY=KEY.pem or {SIGNING_KEY_ENV}); "
            "the registered model and the wheel carry no signature"
        )
        return None
    password = os.environ.get(SIGNING_PASSWORD_ENV) or None
    try:
        pem = signing.public_pem(path, password)
    except signing.SignatureError as exc:
        raise ReleaseError(f"signing key {exc}") from None
    return SigningKey(Path(path), password, signing.fingerprint(pem))


def signed_copy(model_dir: Path, key: SigningKey, into: Path) -> Path:
    """`model_dir` copied into `into` (hard links where the file system allows) and signed
    there, then checked with the key's public half; returns the copy."""
    from bertrt import signing

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system: a copy
            shutil.copy2(src, dst)

    folder = into / model_dir.name
    ignore = shutil.ignore_patterns(signing.SIGNATURE_FILE)
    shutil.copytree(model_dir, folder, copy_function=link, ignore=ignore)
    signing.sign(folder, key.path, key.password)
    public = into / "public.pem"
    public.write_bytes(signing.public_pem(key.path, key.password))
    signing.verify(folder, public)
    public.unlink()
    return folder


def register(
    model_dir: Path,
    test_path: Path,
    tag: str,
    commit: str,
    name: str,
    cfg: params.Tracking,
    wheel: bool = True,
    key: SigningKey | None = None,
) -> dict[str, Any]:
    """Log `model_dir` as a model of its MLflow run, register it as `name`, alias `candidate`;
    signed with `key` when given."""
    if key is None:
        return _register(model_dir, test_path, tag, commit, name, cfg, wheel, None)
    with tempfile.TemporaryDirectory(prefix="release-signed-") as tmp:
        folder = signed_copy(model_dir, key, Path(tmp))
        return _register(folder, test_path, tag, commit, name, cfg, wheel, key)


def _register(
    model_dir: Path,
    test_path: Path,
    tag: str,
    commit: str,
    name: str,
    cfg: params.Tracking,
    wheel: bool,
    signer: SigningKey | None,
) -> dict[str, Any]:
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    import bertrt
    from bertrt import manifest as manifests
    from bertrt.bundle import SIGNING_REQUIREMENTS

    found = manifests.read(model_dir)
    provenance = found.provenance
    if provenance is None:
        raise ReleaseError(
            f"{model_dir}: its manifest records no provenance (exported outside the pipeline); "
            "release a folder that `make run` exported"
        )
    model_hash = provenance.finetuned_sha256
    tracking.connect(cfg)
    run_id = tracking.find_run(cfg, model_hash)
    if not run_id:
        raise ReleaseError(
            f"{model_dir}: no run of the MLflow store {tracking.tracking_uri(cfg)} holds model "
            f"{model_hash[:12]}; release where the pipeline ran, or set MLFLOW_TRACKING_URI"
        )
    predictor = bertrt.load(model_dir, device="cpu")
    texts = _examples(found.task, test_path)
    outputs = pd.DataFrame(
        {"prediction": [json.dumps(p.as_dict()) for p in predictor.predict(texts)]}
    )
    signature = infer_signature(pd.DataFrame({"text": texts}), outputs)
    code = Path(__file__).with_name("registry_model.py")
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="package",
            python_model=str(code),
            artifacts={"package": str(model_dir)},
            code_paths=[str(Path(bertrt.__file__).parent)],
            signature=signature,
            input_example=pd.DataFrame({"text": texts}),
            pip_requirements=[
                "onnxruntime",
                "tokenizers",
                "numpy",
                "pandas",
                *(SIGNING_REQUIREMENTS if signer else ()),
            ],
        )
        wheel_path = _log_wheel(model_dir, tag, signer) if wheel else None
        mlflow.set_tags({"git_tag": tag, "release_commit": commit})
    version = mlflow.register_model(info.model_uri, name)
    client = mlflow.MlflowClient()
    dvc = provenance.dvc_stages
    environment = provenance.environment
    description = (
        f"Release {tag} (commit {commit[:10]}) of task {found.task}: model "
        f"{model_hash[:12]}, run {run_id}. Test metrics: "
        + ", ".join(f"{k} {v:.4f}" for k, v in found.metrics.items() if isinstance(v, float))
    )
    client.update_model_version(name, version.version, description=description)
    tags = {
        "git_tag": tag,
        "git_commit": commit,
        "mlflow_run_id": run_id,
        "model_sha256": model_hash,
        "task": found.task,
        "env_lock_sha256": str(environment.get("lock_sha256")),
        "dvc_stages_sha256": hashlib.sha256(json.dumps(dvc, sort_keys=True).encode()).hexdigest(),
        "signed": "true" if signer else "false",
    }
    if signer:
        tags["signing_key_sha256"] = signer.fingerprint
    if wheel_path:
        tags["wheel"] = f"runs:/{run_id}/wheel/{wheel_path.name}"
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    log.info("registered %s version %s (alias %s)", name, version.version, CANDIDATE)
    return {
        "name": name,
        "version": int(version.version),
        "alias": CANDIDATE,
        "uri": f"models:/{name}/{version.version}",
        "tags": tags,
    }


def _examples(task: str, test_path: Path) -> list[str]:
    """A few real test texts, for the signature and the input example."""
    import pandas as pd

    if not test_path.is_file():
        raise ReleaseError(f"{test_path}: no test split; run the pipeline (make run) first")
    return tasks.get(task).export_texts(pd.read_parquet(test_path))[:EXAMPLES]


def _log_wheel(model_dir: Path, tag: str, signer: SigningKey | None) -> Path:
    import mlflow

    from bertrt.bundle import build_wheel

    with tempfile.TemporaryDirectory(prefix="release-wheel-") as tmp:
        version = tag.lstrip("v") if tag.lstrip("v")[:1].isdigit() else None
        signed = {"private_key": signer.path, "password": signer.password} if signer else {}
        wheel = build_wheel(model_dir, tmp, version=version, **signed)
        mlflow.log_artifact(str(wheel), artifact_path="wheel")
        return Path(wheel)


def run(
    tag: str,
    params_path: Path,
    model_dir: Path,
    test_path: Path,
    name: str = "",
    message: str = "",
    key_path: str | None = None,
    signed: bool = False,
) -> dict[str, Any]:
    """Release `tag`; `key_path` signs the registered folder and wheel, `signed` refuses to go
    on without one. The key is checked before anything is tagged or pushed."""
    p = params.load(params_path, "tracking")
    key = signing_key(key_path, signed)
    check_tree(tag)
    commit = commit_and_tag(tag, message)
    push()
    registered = register(
        model_dir, test_path, tag, commit, name or p.tracking.experiment, p.tracking, key=key
    )
    how = f"signed with key {key.fingerprint[:12]}" if key else "unsigned"
    print(
        f"released {tag} ({commit[:10]}): artifacts pushed to the DVC remote; registered "
        f"{registered['uri']} with alias {CANDIDATE}, {how}\n"
        f"  promote it: make promote MODEL={registered['name']} VERSION={registered['version']}"
    )
    return {"tag": tag, "commit": commit, "registered": registered}


def promote(name: str, version: str, cfg: params.Tracking, alias: str = "production") -> None:
    import mlflow

    tracking.connect(cfg)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    print(f"models:/{name}@{alias} -> version {version}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tag", nargs="?", help="the git tag to create, e.g. v1")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, default=layout.ONNX_MODEL)
    parser.add_argument(
        "--test", type=Path, default=layout.split_file(layout.VALIDATED, layout.TEST)
    )
    parser.add_argument("--name", default="", help="registered model (default: the experiment)")
    parser.add_argument("--message", default="", help="the tag's message")
    parser.add_argument(
        "--promote", nargs=2, metavar=("NAME", "VERSION"), help="move `production` to a version"
    )
    parser.add_argument(
        "--signing-key",
        metavar="PEM",
        default=os.environ.get(SIGNING_KEY_ENV) or None,
        help=f"EC private key that signs the released model folder (default: ${SIGNING_KEY_ENV})",
    )
    parser.add_argument(
        "--signed", action="store_true", help="refuse to release without a signing key"
    )
    args = parser.parse_args(argv)
    if args.promote:
        cfg = params.load(args.params, "tracking").tracking
        return entry.guarded(lambda: promote(*args.promote, cfg))
    if not args.tag:
        parser.error("give the tag to release, e.g. v1")
    return entry.guarded(
        lambda: run(
            args.tag,
            args.params,
            args.model,
            args.test,
            args.name,
            args.message,
            args.signing_key,
            args.signed,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
