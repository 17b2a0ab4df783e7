"""`manifest.json`, the model folder's table of contents: a typed object, read and verified."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertrt.contract import LABELLED_TASKS, MANIFEST_FILE, SCHEMA_VERSION, TASKS
from bertrt.long_text import Reading


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


@dataclass
class Manifest:
    """What the runtime needs to serve a model folder, and where the model came from.

    Args:
        window_stride: 0 cuts texts at `max_length`; > 0 reads a longer text as overlapping
            windows of `max_length` tokens that share `window_stride` tokens (the tokenizer's
            own windows, for per-token tasks).
        long_text: how a classifier reads a text over `max_length` (bertrt.long_text.Reading:
            truncate, head+tail, or windows whose logits are aggregated); {} truncates.
        temperature: a classifier's logits are divided by it before the softmax (calibration).
        variants: shipped graphs by name: file, precision, providers, gate.
        files: sha256 and size of every file the folder ships.
        provenance: base model, data and params digests, git, DVC stages, MLflow run.
    """

    task: str
    labels: list[str]
    max_length: int
    pad_token_id: int
    inputs: list[str]
    outputs: list[str]
    opset: int
    variants: dict[str, dict[str, Any]]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    window_stride: int = 0
    long_text: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    rejected_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def problems(self) -> list[str]:
        """What makes the values unusable, beyond their JSON types."""
        found = []
        if not all(isinstance(x, str) for x in self.labels):
            found.append("labels must be a list of strings")
        elif self.task in LABELLED_TASKS and not self.labels:
            found.append(f"labels must not be empty for task {self.task!r}")
        if not self.outputs or not all(isinstance(x, str) for x in self.outputs):
            found.append("outputs must name at least one graph output")
        if not self.inputs or not all(isinstance(x, str) for x in self.inputs):
            found.append("inputs must name the graph's inputs")
        if self.max_length < 4:
            found.append(f"max_length {self.max_length} must be at least 4")
        if not 0 <= self.window_stride < self.max_length // 2:
            found.append(f"window_stride {self.window_stride} must be in [0, max_length / 2)")
        try:
            found += [f"long_text {x}" for x in self.reading().problems(self.max_length)]
        except TypeError:
            found.append(f"long_text {self.long_text!r:.80} has keys this runtime does not know")
        if not 0.0 < self.temperature < 1000.0:
            found.append(f"temperature {self.temperature} must be in (0, 1000)")
        for name, entry in self.variants.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                found.append(f"variants[{name!r}] needs a file name")
        for name, entry in self.files.items():
            if not isinstance(entry, dict) or not {"sha256", "bytes"} <= set(entry):
                found.append(f"files[{name!r}] needs sha256 and bytes")
        return found

    def reading(self) -> Reading:
        """How a text over `max_length` is read (truncated when the folder does not say)."""
        return Reading.from_dict(self.long_text)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: Path | str = MANIFEST_FILE) -> Manifest:
        """Check every key and type; a missing or wrong one is an IntegrityError naming it."""
        if not isinstance(data, dict):
            raise IntegrityError(f"{where}: must be a JSON object; re-run the export stage")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise IntegrityError(
                f"{where}: schema_version {version!r}, this runtime reads {SCHEMA_VERSION}; "
                "re-export the model or install a matching runtime"
            )
        values = {}
        for item in dataclasses.fields(cls):
            if item.name not in data:
                if item.default is dataclasses.MISSING and item.default_factory is (
                    dataclasses.MISSING
                ):
                    raise IntegrityError(
                        f"{where}: key {item.name!r} is missing; re-run the export stage"
                    )
                continue
            value = data[item.name]
            kind = {"int": int, "str": str, "float": (int, float)}.get(str(item.type))
            kind = kind or (list if str(item.type).startswith("list") else dict)
            if not isinstance(value, kind) or isinstance(value, bool):
                name = "number" if kind in (int, (int, float)) else kind.__name__
                raise IntegrityError(
                    f"{where}: key {item.name!r} must be a JSON {name}, got {value!r:.60}"
                )
            values[item.name] = value
        manifest = cls(**values)
        problems = manifest.problems()
        if problems:
            raise IntegrityError(f"{where}: {'; '.join(problems)}; re-run the export stage")
        if manifest.task not in TASKS:
            raise IntegrityError(
                f"{where}: task {manifest.task!r} is not one this runtime serves ({list(TASKS)}); "
                "install a newer runtime"
            )
        return manifest


def write(folder: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (temporary file, then rename)."""
    path = folder / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read(folder: Path) -> Manifest:
    """Load manifest.json and check its schema."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise IntegrityError(
            f"{path}: no manifest; point at a model folder written by the export stage"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc}); re-run the export stage") from None
    return Manifest.from_dict(data, path)


def verify(folder: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check the sha256 and size of the named files (all listed files when None)."""
    files = manifest.files
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
