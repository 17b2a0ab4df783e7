"""Files for a machine without network, in pieces small enough to carry one command at a time.

`prepare` (here, in the venv) downloads the pinned onnxruntime-gpu wheel and the small wheels the
GPU check needs, for CPython 3.12 on manylinux x86-64, checked against the lock's digests;
exports the fine-tuned model as the export stage does but with only the two variants the check
runs on CUDA (or takes `--model-dir`, an exported folder, and keeps only those two); bundles it
with the fine-tuned weights and the validated splits; splits everything into numbered pieces
under 60 MiB with a manifest of sha256 digests; and prints which pieces each command carries.
`receive` (there, with the system Python) checks every piece that has come against the
manifest, joins each file whose pieces are all there, checks the whole, then installs a wheel
the machine lacks (`pip install --no-index --no-deps --target`) or unpacks the model.

    python -m benchmarks.gpu_carry prepare --dir gpu-carry --lock locks/gpu.txt \
        --finetuned models/finetuned --validated data/validated --params params.yaml
    python3 -m benchmarks.gpu_carry receive --dir gpu-carry

Standard library only at import time (the GPU machine runs it before anything is installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import gpu_stack

MANIFEST = "manifest.json"
PIECES = "pieces"  # what is carried
WHOLE = "whole"  # the files before splitting (here) or after joining (there)
SITE = "site"  # the carried wheels, installed; first on the checked processes' PYTHONPATH
MODEL = "model"  # the model bundle, unpacked: onnx/, finetuned/, validated/
MODEL_TAR = "model.tar"
MIB = 2**20
PIECE_BYTES = 59 * MIB  # pieces under 60 MiB
# What one command carries: the machine takes 64 MiB a command, the working tree included.
CARRY_BYTES = 60 * MIB
GPU_WHEEL = "onnxruntime-gpu"
# Test texts the export gates its variants on: enough to catch a broken graph, few enough for
# well under a minute on two cores (the check measures agreement on every test text there).
EXPORT_TEXTS = 256
PYTHON_VERSION = "3.12"
# pip 23 does not widen a manylinux_2_28 platform to the older tags most wheels carry.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class CarryError(RuntimeError):
    """A piece or joined file that is missing or not what the manifest says; the message names
    it and how to fix it. `missing_only`: nothing is wrong but pieces still to come."""

    def __init__(self, message: str, missing_only: bool = False) -> None:
        super().__init__(message)
        self.missing_only = missing_only


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lock(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 digests) from a pip-compile/uv lock with hashes."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in lock.read_text(encoding="utf-8").splitlines():
        pin = re.match(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", line)
        if pin:
            name = gpu_stack.canonical(pin.group(1))
            pins[name] = (pin.group(2), [])
        elif name and (digest := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[name][1].append(digest.group(1))
        elif not line.startswith(" "):
            name = None
    return pins


def download(lock: Path, wanted: dict[str, str], dest: Path) -> list[dict[str, Any]]:
    """The wheels of `wanted` (name -> version specifier the check needs there) at the lock's
    versions for CPython 3.12 on manylinux x86-64, checked against the lock's digests by pip."""
    pins = read_lock(lock)
    absent = sorted(set(wanted) - set(pins))
    if absent:
        raise CarryError(f"{lock}: no pin for {absent}; run `make lock` or pass another --lock")
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirements.txt"
    requirements.write_text(
        "".join(
            f"{name}=={pins[name][0]} "
            + " ".join(f"--hash=sha256:{h}" for h in pins[name][1])
            + "\n"
            for name in sorted(wanted)
        ),
        encoding="utf-8",
    )
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps"]
    subprocess.run(
        [
            *pip,
            *("--require-hashes", "--only-binary=:all:", "--implementation", "cp"),
            *("--python-version", PYTHON_VERSION),
            *platforms,
            *("-d", str(dest), "-r", str(requirements)),
        ],
        check=True,
    )
    wheels = []
    for name, spec in sorted(wanted.items()):
        version = pins[name][0]
        found = [
            w
            for w in dest.glob("*.whl")
            if gpu_stack.canonical(w.name.split("-")[0]) == name
            and w.name.split("-")[1] == version
        ]
        if len(found) != 1:
            raise CarryError(f"{dest}: expected one wheel of {name}=={version}, found {found}")
        wheels.append(
            {"path": found[0], "distribution": name, "version": version, "requires": spec}
        )
    return wheels


def export_model(
    finetuned: Path, validated: Path, params_path: Path, out: Path, texts: int
) -> Path:
    """The fine-tuned model exported as the export stage does (params.yaml's export settings),
    with only the variants the GPU check runs, gated on the first `texts` test texts."""
    import dataclasses

    import pandas as pd

    from benchmarks.gpu import ORT_VARIANTS
    from pipeline import tasks
    from pipeline.core import layout, params
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    p = params.load(params_path, "base", params.TASK_SECTION, "export")
    task = tasks.get(p.base.task)
    options = ExportOptions.from_params(
        p.export,
        p.base.max_length,
        window_stride=task.window_stride(p),
        long_text=task.reading(p),
    )
    test = pd.read_parquet(layout.split_file(validated, layout.TEST))
    model_folder.build(
        finetuned,
        out,
        task,
        task.export_texts(test)[:texts],
        dataclasses.replace(options, variants=ORT_VARIANTS),
    )
    return out


def bundle_model(model_dir: Path, finetuned: Path, validated: Path, staging: Path) -> Path:
    """One tar of the model folder (only the variants the GPU check runs, its manifest rewritten
    to list just those), the fine-tuned weights and the validated splits."""
    from benchmarks.gpu import ORT_VARIANTS
    from bertrt import manifest as manifest_io
    from bertrt.contract import LABELS_FILE, TOKENIZER_FILE

    stage = staging / MODEL
    shutil.rmtree(stage, ignore_errors=True)
    manifest = manifest_io.read(model_dir)
    missing = [v for v in ORT_VARIANTS if v not in manifest.variants]
    if missing:
        raise CarryError(f"{model_dir}: ships no {missing}; export them (params export.variants)")
    manifest.variants = {v: manifest.variants[v] for v in ORT_VARIANTS}
    keep = [TOKENIZER_FILE, LABELS_FILE, *(e.file for e in manifest.variants.values())]
    manifest.files = {name: manifest.files[name] for name in keep}
    (stage / "onnx").mkdir(parents=True)
    for name in keep:
        shutil.copy2(model_dir / name, stage / "onnx" / name)
    manifest_io.write(stage / "onnx", manifest)
    for source, into in ((finetuned, "finetuned"), (validated, "validated")):
        (stage / into).mkdir()
        for path in sorted(source.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                shutil.copy2(path, stage / into / path.name)

    def same_every_time(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    tar = staging / MODEL_TAR
    with tarfile.open(tar, "w") as out:
        for path in sorted(stage.rglob("*")):
            out.add(
                path, arcname=str(path.relative_to(stage)), recursive=False, filter=same_every_time
            )
    shutil.rmtree(stage)
    return tar


def split(whole: Path, carry: Path, piece_bytes: int = PIECE_BYTES) -> dict[str, Any]:
    """Cut `whole` into numbered pieces of `piece_bytes` (the last one shorter) under
    carry/pieces; its manifest entry with the digest of each piece and of the whole."""
    size = whole.stat().st_size
    count = max(1, math.ceil(size / piece_bytes))
    (carry / PIECES).mkdir(parents=True, exist_ok=True)
    pieces = []
    with open(whole, "rb") as f:
        for number in range(1, count + 1):
            piece = carry / PIECES / f"{whole.name}.part{number:02d}of{count:02d}"
            data = f.read(piece_bytes)
            piece.write_bytes(data)
            pieces.append(
                {
                    "file": f"{PIECES}/{piece.name}",
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
    return {"file": whole.name, "bytes": size, "sha256": sha256_of(whole), "pieces": pieces}


def plan(bundles: list[dict[str, Any]], room: int = CARRY_BYTES) -> list[list[str]]:
    """Pieces grouped into as few commands as fit `room` each (largest first, first fit); the
    commands with wheels' pieces first, so that the slow install is done before the last
    command, which runs the check."""
    pieces = sorted((p for b in bundles for p in b["pieces"]), key=lambda p: -p["bytes"])
    commands: list[tuple[int, list[str]]] = []
    for piece in pieces:
        for i, (used, files) in enumerate(commands):
            if used + piece["bytes"] <= room:
                commands[i] = (used + piece["bytes"], [*files, piece["file"]])
                break
        else:
            commands.append((piece["bytes"], [piece["file"]]))
    wheels = {p["file"] for b in bundles if b["kind"] == "wheel" for p in b["pieces"]}
    commands.sort(key=lambda command: not wheels.intersection(command[1]))
    return [sorted(files) for _, files in commands]


def write_manifest(carry: Path, bundles: list[dict[str, Any]]) -> dict[str, Any]:
    """Each command's pieces moved into a folder of their own, pieces/NN (a command then
    carries two paths: that folder and the manifest), and the manifest written."""
    folders = []
    for number, files in enumerate(plan(bundles), 1):
        folder = f"{PIECES}/{number:02d}"
        (carry / folder).mkdir(parents=True, exist_ok=True)
        for piece in (p for b in bundles for p in b["pieces"] if p["file"] in files):
            target = f"{folder}/{Path(piece['file']).name}"
            os.replace(carry / piece["file"], carry / target)
            piece["file"] = target
        folders.append(folder)
    manifest = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundles": bundles,
        "commands": folders,
    }
    (carry / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def prepare(
    carry: Path,
    lock: Path,
    finetuned: Path,
    validated: Path,
    params_path: Path,
    model_dir: Path | None = None,
    export_texts: int = EXPORT_TEXTS,
    piece_bytes: int = PIECE_BYTES,
) -> dict[str, Any]:
    """Download, export (unless `model_dir` is an exported folder already), bundle and split
    into `carry`; returns the manifest (also written there)."""
    shutil.rmtree(carry / PIECES, ignore_errors=True)
    wanted = {GPU_WHEEL: f"=={read_lock(lock)[GPU_WHEEL][0]}", **gpu_stack.carried_specifiers()}
    bundles = []
    for wheel in download(lock, wanted, carry / WHOLE / "wheels"):
        entry = split(wheel.pop("path"), carry, piece_bytes)
        bundles.append({**entry, "kind": "wheel", **wheel})
    source = {"finetuned": str(finetuned), "validated": str(validated)}
    if model_dir is None:
        model_dir = carry / WHOLE / "export"
        export_model(finetuned, validated, params_path, model_dir, export_texts)
        source["export"] = f"exported by prepare, gated on {export_texts} test texts"
    else:
        source["export"] = str(model_dir)
    tar = bundle_model(model_dir, finetuned, validated, carry / WHOLE)
    bundles.append({**split(tar, carry, piece_bytes), "kind": "model", "source": source})
    return write_manifest(carry, bundles)


def describe(carry: Path, manifest: dict[str, Any], tree: int | None) -> list[str]:
    """What to carry in which command (paths from the repository root) and what each runs."""
    root = os.path.relpath(carry)
    size = {p["file"]: p["bytes"] for b in manifest["bundles"] for p in b["pieces"]}
    commands = manifest["commands"]
    lines = [
        f"{len(size)} pieces, {sum(size.values()) / MIB:.1f} MiB, in {len(commands)} commands; "
        f"each carries {root}/{MANIFEST} too. Commands 1 to {len(commands) - 1} run "
        f"`python3 -m benchmarks.gpu_carry receive --dir {root}` (it checks what has come, "
        f"joins and installs what is complete); the last runs the check, "
        f'`python3 -m benchmarks.gpu_check --carry {root} --out "$OUT"`. Keep the machine warm '
        "between them: what was carried is lost when it goes back.",
    ]
    sent = {
        folder: sum(b for f, b in size.items() if f.startswith(folder + "/"))
        for folder in commands
    }
    for number, folder in enumerate(commands, 1):
        names = sorted(Path(f).name for f in size if f.startswith(folder + "/"))
        lines.append(
            f"{number}. carry {json.dumps([f'{root}/{MANIFEST}', f'{root}/{folder}'])} "
            f"({sent[folder] / MIB:.1f} MiB: {', '.join(names)})"
        )
    if tree is not None:
        worst = max(sent.values()) + tree
        lines.append(
            f"The working tree travels with each command too ({tree / MIB:.1f} MiB): the "
            f"largest sends {worst / MIB:.1f} MiB of the 64 MiB a command may."
        )
    return lines


def tree_bytes(repo: Path) -> int | None:
    """What the working tree sends with every command (tracked and untracked, not ignored)."""
    done = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
    )
    if done.returncode != 0:
        return None
    files = [repo / name for name in done.stdout.decode().split("\0") if name]
    return sum(f.stat().st_size for f in files if f.is_file())


def load_manifest(carry: Path) -> dict[str, Any]:
    path = carry / MANIFEST
    if not path.is_file():
        raise CarryError(
            f"{path}: missing; carry it with every command (run `make gpu-check-prepare` first)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def problems(carry: Path, bundle: dict[str, Any]) -> list[tuple[bool, str]]:
    """What is wrong with each piece of `bundle` here, with the fix; True for a missing one."""
    found: list[tuple[bool, str]] = []  # (only missing, message)
    count = len(bundle["pieces"])
    for number, piece in enumerate(bundle["pieces"], 1):
        path = carry / piece["file"]
        which = f"piece {number} of {count} of {bundle['file']}"
        folder = Path(piece["file"]).parent.name  # pieces/NN: the plan's command NN
        command = int(folder) if folder.isdigit() else "?"
        if not path.is_file():
            found.append(
                (
                    True,
                    f"{path}: missing ({which}); carry it (command {command} of the plan that "
                    "prepare printed), then run again",
                )
            )
            continue
        size = path.stat().st_size
        digest = sha256_of(path) if size == piece["bytes"] else None
        if digest != piece["sha256"]:
            got = f"{size} bytes" if digest is None else f"sha256 {digest[:16]}…"
            found.append(
                (
                    False,
                    f"{path}: corrupted ({which}: {got}, the manifest says {piece['bytes']} "
                    f"bytes, sha256 {piece['sha256'][:16]}…); carry it again (command {command})",
                )
            )
    return found


def join(carry: Path, bundle: dict[str, Any]) -> Path:
    """The whole file from its checked pieces, checked against the manifest's digest."""
    found = problems(carry, bundle)
    if found:
        raise CarryError("; ".join(m for _, m in found), all(only for only, _ in found))
    target = carry / WHOLE / bundle["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for piece in bundle["pieces"]:
            data = (carry / piece["file"]).read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != bundle["sha256"]:
        tmp.unlink()
        raise CarryError(
            f"{target}: the joined pieces' sha256 {digest.hexdigest()[:16]}… is not the "
            f"manifest's {bundle['sha256'][:16]}… (pieces from different prepare runs); run "
            "prepare again and carry every piece with its manifest"
        )
    os.replace(tmp, target)
    return target


def there(distribution: str, requires: str) -> str | None:
    """The installed version of `distribution` when it satisfies `requires`, else None."""
    try:
        version = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
    if not requires:
        return version
    try:
        from packaging.specifiers import SpecifierSet  # in the machine's stack (transformers)
    except ModuleNotFoundError:  # cannot tell: install the carried one
        return None
    return version if SpecifierSet(requires).contains(version, prereleases=True) else None


def install(wheel: Path, site: Path) -> str:
    """pip install --no-index --no-deps --target; unzipped by hand where pip is absent."""
    site.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    if subprocess.run([*pip, "--version"], capture_output=True).returncode == 0:
        args = ["install", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target"]
        done = subprocess.run(
            [*pip, *args, str(site), str(wheel)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise CarryError(f"{wheel}: pip install failed: {done.stderr.strip()[-500:]}")
        return "installed with pip"
    # No pip on the machine: a wheel is a zip of site-packages entries (PEP 427), its
    # purelib/platlib data folders moved to the top.
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts and headers: not needed to import it
                parts = parts[2:]
            target = site.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return "unzipped (no pip here)"


def take(carry: Path, bundle: dict[str, Any]) -> str:
    """Join, check and install or unpack one bundle, unless that was done already; what was
    done, in words."""
    done = carry / WHOLE / f"{bundle['file']}.done"
    if done.is_file() and done.read_text() == bundle["sha256"]:
        return "ready (joined and checked before)"
    if bundle["kind"] == "wheel":
        version = there(bundle["distribution"], bundle["requires"])
        if version is not None:
            return f"not needed: {bundle['distribution']} {version} is installed"
        how = install(join(carry, bundle), carry / SITE)
    else:
        whole = join(carry, bundle)
        unpacked = carry / MODEL
        shutil.rmtree(unpacked, ignore_errors=True)
        with tarfile.open(whole) as tar:
            tar.extractall(unpacked, filter="data")
        how = f"unpacked into {unpacked}"
    done.write_text(bundle["sha256"])
    return how


def receive(carry: Path) -> dict[str, str | CarryError]:
    """Each bundle's state: what was done with it, or the CarryError that stops it."""
    manifest = load_manifest(carry)
    states: dict[str, str | CarryError] = {}
    for bundle in manifest["bundles"]:
        try:
            states[bundle["file"]] = take(carry, bundle)
        except CarryError as exc:
            states[bundle["file"]] = exc
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download, bundle and split (here)")
    prep.add_argument("--dir", type=Path, required=True, help="the git-ignored carry folder")
    prep.add_argument("--lock", type=Path, required=True, help="lock with the pins and hashes")
    prep.add_argument("--finetuned", type=Path, required=True, help="fine-tuned HF folder")
    prep.add_argument("--validated", type=Path, required=True, help="validated splits folder")
    prep.add_argument("--params", type=Path, required=True, help="params.yaml (export settings)")
    prep.add_argument(
        "--model-dir", type=Path, help="an exported model folder to carry (default: export one)"
    )
    prep.add_argument("--export-texts", type=int, default=EXPORT_TEXTS)
    prep.add_argument("--piece-mib", type=float, default=PIECE_BYTES / MIB)
    rec = sub.add_parser("receive", help="check, join, install what has arrived (there)")
    rec.add_argument("--dir", type=Path, required=True)
    rec.add_argument("--complete", action="store_true", help="fail unless every bundle is ready")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if args.piece_mib >= 60:
            parser.error("--piece-mib must be under 60")
        manifest = prepare(
            args.dir,
            args.lock,
            args.finetuned,
            args.validated,
            args.params,
            args.model_dir,
            args.export_texts,
            int(args.piece_mib * MIB),
        )
        print("\n".join(describe(args.dir, manifest, tree_bytes(gpu_stack.REPO))))
        return 0
    try:
        states = receive(args.dir)
    except CarryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, state in states.items():
        print(f"{name}: {'waiting: ' if isinstance(state, CarryError) else ''}{state}")
    errors = [s for s in states.values() if isinstance(s, CarryError)]
    broken = [e for e in errors if not e.missing_only]
    return 1 if broken or (args.complete and errors) else 0


if __name__ == "__main__":
    raise SystemExit(main())
