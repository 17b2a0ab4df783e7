"""Read, write and verify `manifest.json`, the model folder's table of contents."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from bertrt.contract import MANIFEST_FILE, SCHEMA_VERSION


class IntegrityError(RuntimeError):
    """A model folder whose files do not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each named file in the folder."""
    return {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in sorted(names)
    }


def write(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temporary file, then rename)."""
    manifest = {"schema_version": SCHEMA_VERSION, **manifest}
    path = folder / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read(folder: Path) -> dict[str, Any]:
    """Load manifest.json and check its schema version."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise IntegrityError(
            f"{path}: no manifest; point at a model folder written by the export stage"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc}); re-run the export stage") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise IntegrityError(
            f"{path}: schema_version {version!r}, this runtime reads {SCHEMA_VERSION}; "
            "re-export the model or install a matching runtime"
        )
    return manifest


def verify(folder: Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check the sha256 and size of the named files (all listed files when None)."""
    files = manifest.get("files", {})
    for name in names if names is not None else sorted(files):
        entry = files.get(name)
        path = Path(folder) / name
        if entry is None:
            raise IntegrityError(f"{path}: not listed in {MANIFEST_FILE}; re-run the export")
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MANIFEST_FILE} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IntegrityError(
                f"{path}: {size} bytes, the manifest says {entry['bytes']} "
                "(truncated or replaced); restore the folder from the export"
            )
        if sha256_file(path) != entry["sha256"]:
            raise IntegrityError(
                f"{path}: sha256 does not match the manifest (tampered or corrupted); "
                "restore the folder from the export"
            )
