"""Digests and provenance: what a model was made from (data, params, code, DVC stages)."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Any

import yaml

from bertrt.manifest import sha256_file
from pipeline.core.sources import SourceError, resolve_model

log = logging.getLogger(__name__)

# The files that define a fine-tuned model; checkpoints and logs do not change its identity.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def tree_digest(paths: list[Path], root: Path) -> str:
    """sha256 over (relative name, file sha256) pairs, order-independent."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return tree_digest([p for p in path.rglob("*") if p.is_file()], path)


def model_digest(model_dir: Path) -> str:
    """The content hash that names a fine-tuned model (and finds its MLflow run)."""
    model_dir = Path(model_dir)
    files = [model_dir / name for name in MODEL_FILES if (model_dir / name).is_file()]
    if not any(f.name == "model.safetensors" for f in files):
        raise FileNotFoundError(f"{model_dir}: no model.safetensors; run the finetune stage")
    return tree_digest(files, model_dir)


def base_model_digest(spec: str) -> str | None:
    """Digest of the base checkpoint's weights when it is local (package: or folder)."""
    try:
        location = Path(resolve_model(spec))
    except SourceError:
        return None
    if not location.is_dir():
        return None
    weights = sorted(location.glob("*.safetensors")) or sorted(location.glob("*.bin"))
    return tree_digest(weights, location) if weights else None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


# What the pipeline itself writes (git pathspecs): a tree that differs from its commit only
# there is clean. DVC writes the .gitignore files that keep its outputs out of git.
OWN_OUTPUTS = (":(glob)dvc.lock", ":(glob)reports/**", ":(glob)**/.gitignore")


def except_own_outputs() -> list[str]:
    """Pathspecs for `git status` / `git diff`: the whole tree but the pipeline's outputs."""
    return [".", *(spec.replace(":(glob)", ":(exclude,glob)") for spec in OWN_OUTPUTS)]


def git_info() -> dict[str, Any]:
    """Commit, dirty flag and tag of the working tree (None outside a git repo).

    Dirty means the code or params differ from the commit; the pipeline's own outputs
    (`OWN_OUTPUTS`, rewritten by the run itself) do not count."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *except_own_outputs())
    source = _git("log", "-1", "--format=%H", "--", *except_own_outputs()) if commit else None
    return {
        "commit": commit,
        # The newest commit that changed code, params or data: the commit of a run and that of
        # its release (which adds only dvc.lock and reports) share it.
        "source_commit": source or commit,
        "dirty": bool(status) if status is not None else None,
        "tag": _git("describe", "--tags", "--exact-match") if commit else None,
    }


def dvc_lock_hashes(
    lock: Path = Path("dvc.lock"), artifacts_only: bool = False, skip: tuple[Path, ...] = ()
) -> dict[str, dict[str, str]]:
    """Per stage, the md5 of each out recorded in dvc.lock (empty before the first repro).

    `artifacts_only` keeps the outputs DVC caches (data and models), leaving out reports and
    checkpoints (`cache: false` in dvc.yaml beside the lock), whose bytes hold timings; `skip`
    leaves out the caller's own outputs (still those of the previous run while it runs)."""
    lock = Path(lock)
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    uncached = _uncached(lock.with_name("dvc.yaml")) if artifacts_only else set()
    skipped = {Path(path) for path in skip}
    hashes = {
        name: {
            out["path"]: out.get("md5", "")
            for out in stage.get("outs", [])
            if out["path"] not in uncached and Path(out["path"]) not in skipped
        }
        for name, stage in stages.items()
    }
    return {name: outs for name, outs in hashes.items() if outs}


def _declared(dvc_yaml: Path, **wanted: bool) -> set[str]:
    """Paths of the outputs (any kind: outs, metrics, plots) declared in dvc.yaml with every
    option in `wanted` (`cache=False`, `persist=True`)."""
    if not dvc_yaml.is_file():
        return set()
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    found = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                if isinstance(entry, dict):
                    for path, options in entry.items():
                        if isinstance(options, dict) and all(
                            options.get(key) is value for key, value in wanted.items()
                        ):
                            found.add(path)
    return found


def _uncached(dvc_yaml: Path) -> set[str]:
    """Paths of the outputs declared with `cache: false`."""
    return _declared(dvc_yaml, cache=False)


def resumption_state(dvc_yaml: Path = Path("dvc.yaml")) -> set[str]:
    """Outputs kept across runs only to resume a killed one (`persist: true`, `cache: false`:
    the fine-tune's checkpoints). DVC cannot restore them from its cache (`dvc exp apply`,
    `dvc checkout`), and no release or package reads them."""
    return _declared(dvc_yaml, cache=False, persist=True)


def stale_stages(status: dict[str, Any], dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, Any]:
    """`dvc status --json` without the changes that concern only resumption state: what makes
    dvc.lock stale for a release."""
    scratch = resumption_state(dvc_yaml)
    stale: dict[str, Any] = {}
    for stage, changes in status.items():
        kept = []
        for change in changes:
            if isinstance(change, dict) and set(change) == {"changed outs"}:
                outs = {p: s for p, s in change["changed outs"].items() if p not in scratch}
                if not outs:
                    continue
                change = {"changed outs": outs}
            kept.append(change)
        if kept:
            stale[stage] = kept
    return stale


LOCKS = Path("locks")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith((" ", "#", "-")):
            pins[_normal(name)] = version.split()[0].rstrip("\\").strip()
    return pins


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def cpu_isa() -> dict[str, Any]:
    """The CPU's vector instruction set, which decides the kernels (and the last bits of the
    weights) a CPU run computes with."""
    import platform

    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = [flag for flag in ISA_FLAGS if flag in present]
                break
    except OSError:
        pass
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        capability = None
    return {"machine": platform.machine(), "torch_capability": capability, "flags": flags}


def machine() -> dict[str, Any]:
    """What a stage ran on, for its report: the CPU's name and vector flags, its cores, the OS,
    Python and the versions of the packages that compute."""
    import os
    import platform
    from importlib import metadata

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "transformers", "onnxruntime-gpu", "onnxruntime", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": name,
        "cpu_flags": cpu_isa()["flags"],
        "logical_cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
    }


def environment(locks: Path = LOCKS) -> dict[str, Any]:
    """Which lock (locks/*.txt) the installed packages come from, its sha256, and the packages
    that differ from it (none in an environment made by `make venv`)."""
    from importlib import metadata

    installed = {_normal(d.metadata["Name"]): d.version for d in metadata.distributions()}
    best: dict[str, Any] = {"lock": None, "lock_sha256": None, "matches_lock": False}
    fewest = None
    for lock in sorted(locks.glob("*.txt")):
        pins = _pins(lock)
        if lock.name in ("assets.txt", "cpu-torch.txt") or not pins:
            continue
        differs = sorted(
            f"{name}=={want} (installed: {installed.get(name, 'missing')})"
            for name, want in pins.items()
            if installed.get(name) != want
        )
        if fewest is None or len(differs) < fewest:
            fewest = len(differs)
            best = {
                "lock": lock.as_posix(),
                "lock_sha256": sha256_file(lock),
                "matches_lock": not differs,
                "differs": differs[:10],
            }
    return {**best, "cpu": cpu_isa()}
