"""`manifest.json`, the model folder's table of contents: a typed object, read and verified."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertrt.contract import MANIFEST_FILE, SCHEMA_VERSION, TRANSITIONS_FILE, VARIANTS
from bertrt.decoding import ARGMAX, CRF, DECODINGS
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
class VariantEntry:
    """One variant's record in the manifest: the graph, where it runs, how it was built, its gate.

    Args:
        file: the graph's file in the folder (bertrt.contract.VARIANTS names it).
        providers: the ONNX Runtime providers it is built to run on.
        gate: its comparison with PyTorch on the test split (the export's figures).
        shipped: whether the gate passed and the file ships.
        fused_operators: operator counts after ONNX Runtime's fusions (optimised graphs).
        int8_weights: "int8" or "uint8" for int8 graphs.
        gated_int8_kernels: "exact" or "saturating": the int8 arithmetic the gate ran on.
        smoothing: the SmoothQuant scales applied before int8, when any.
        search: the int8 search's nodes kept in fp32 and its agreement, when it ran.
    """

    file: str
    precision: str
    providers: list[str]
    gate: dict[str, Any] = field(default_factory=dict)
    shipped: bool = False
    fused_operators: dict[str, Any] | None = None
    int8_weights: str | None = None
    gated_int8_kernels: str | None = None
    smoothing: dict[str, Any] | None = None
    search: dict[str, Any] | None = None

    @classmethod
    def of(cls, name: str, **values: Any) -> VariantEntry:
        """A new entry for the declared variant `name` (its file, precision and providers)."""
        spec = VARIANTS[name]
        return cls(spec.file, spec.precision, list(spec.providers), **values)


@dataclass
class BaseModel:
    """The checkpoint fine-tuning started from."""

    name: str
    sha256: str


@dataclass
class Git:
    """The source commit the model was made from (not the release commit or tag, given later)."""

    source_commit: str | None
    dirty: bool | None


@dataclass
class Provenance:
    """Where the model came from: a record for people and audits; the runtime shows it and acts
    on none of it.

    Args:
        finetuned_sha256: the fine-tuned weights' digest; the MLflow run is tagged with it.
        dvc_stages: the DVC outputs this package comes from (path -> md5).
        environment: the machine, Python, lock file and packages that made it.
    """

    base_model: BaseModel
    vocab_size: int
    finetuned_sha256: str
    data_sha256: str
    params_sha256: str
    git: Git
    mlflow_experiment: str
    dvc_stages: dict[str, Any]
    environment: dict[str, Any]


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
        decoding: how per-token scores become tags (bertrt.decoding): argmax, viterbi (the
            best sequence IOB2 allows), or crf (the same over a CRF's emissions, with the
            transitions in TRANSITIONS_FILE).
        variants: shipped graphs by name.
        rejected_variants: graphs built and gated but not shipped, with the gate that refused them.
        files: sha256 and size of every file the folder ships.
        provenance: base model, data and params digests, git, DVC stages, MLflow experiment;
            None for a folder exported outside the pipeline.
    """

    task: str
    labels: list[str]
    max_length: int
    pad_token_id: int
    inputs: list[str]
    outputs: list[str]
    opset: int
    variants: dict[str, VariantEntry]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    window_stride: int = 0
    long_text: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    decoding: str = ARGMAX
    metrics: dict[str, Any] = field(default_factory=dict)
    rejected_variants: dict[str, VariantEntry] = field(default_factory=dict)
    provenance: Provenance | None = None
    # sha256 of the settings the runtime acts on (settings_digest); `write` sets it, `read`
    # checks it, so that a hand edit of one of them (swapped labels, another temperature) is
    # refused rather than served. Only a signature (bertrt.signing) stops an editor who also
    # recomputes it.
    settings_sha256: str = ""
    schema_version: int = SCHEMA_VERSION

    def settings_digest(self) -> str:
        """sha256 of every field the runtime acts on: task, labels, lengths, input and output
        names, long-text reading, temperature, decoding, and each variant's file, precision,
        providers and int8 facts (not the gate figures, metrics or provenance it only shows;
        the files' digests are checked against the files themselves)."""
        acted_on = {
            "task": self.task,
            "labels": self.labels,
            "max_length": self.max_length,
            "pad_token_id": self.pad_token_id,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "opset": self.opset,
            "window_stride": self.window_stride,
            "long_text": self.long_text,
            "temperature": self.temperature,
            "decoding": self.decoding,
            "variants": {
                name: [v.file, v.precision, v.providers, v.int8_weights, v.gated_int8_kernels]
                for name, v in sorted(self.variants.items())
            },
        }
        blob = json.dumps(acted_on, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()

    def problems(self) -> list[str]:
        """What makes the values unusable, beyond their JSON types."""
        found = []
        if not self.outputs:
            found.append("outputs must name at least one graph output")
        if not self.inputs:
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
        if self.decoding not in DECODINGS:
            found.append(f"decoding {self.decoding!r} is not one of {list(DECODINGS)}")
        if self.decoding == CRF and TRANSITIONS_FILE not in self.files:
            found.append(f"decoding {CRF!r} needs {TRANSITIONS_FILE} listed in files")
        if not self.variants:
            found.append("variants must list at least one graph")
        for name, entry in {**self.variants, **self.rejected_variants}.items():
            spec = VARIANTS.get(name)
            if spec is None:
                found.append(f"variants[{name!r}] is not a variant this runtime knows")
            elif (entry.file, entry.precision) != (spec.file, spec.precision):
                found.append(
                    f"variants[{name!r}] must be {spec.file} in {spec.precision}, "
                    f"got {entry.file} in {entry.precision}"
                )
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
        """Check every key and type; a missing, unknown or mistyped one is an IntegrityError
        naming the file and the key."""
        if not isinstance(data, dict):
            raise IntegrityError(f"{where}: must be a JSON object; re-run the export stage")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise IntegrityError(
                f"{where}: schema_version {version!r}, this runtime reads {SCHEMA_VERSION}; "
                "re-export the model or install a matching runtime"
            )
        try:
            manifest = _typed(cls, data, "")
        except _KeyProblem as exc:
            raise IntegrityError(f"{where}: {exc}; re-run the export stage") from None
        problems = manifest.problems()
        if problems:
            raise IntegrityError(f"{where}: {'; '.join(problems)}; re-run the export stage")
        if manifest.settings_sha256 != manifest.settings_digest():
            raise IntegrityError(
                f"{where}: the settings the runtime acts on (labels, temperature, decoding, "
                "reading, lengths, variants) do not match their digest: edited or damaged; "
                "restore the folder from the export"
            )
        return manifest


class _KeyProblem(ValueError):
    """A key of the manifest missing, unknown or of the wrong JSON type."""


_JSON_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array"}


def _typed(cls: type, data: Any, path: str) -> Any:
    """`data` as the dataclass `cls`: every field's key present, no other key, each value of its
    declared type (nested dataclasses and `dict[str, <dataclass>]` included)."""
    if not isinstance(data, dict):
        raise _KeyProblem(f"key {path!r} must be a JSON object, got {data!r:.60}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in data]
    if missing:
        raise _KeyProblem(f"key {_join(path, missing[0])!r} is missing")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise _KeyProblem(f"key {_join(path, unknown[0])!r} is not one this runtime reads")
    return cls(**{n: _value(hints[n], data[n], _join(path, n)) for n in names})


def _value(hint: Any, value: Any, path: str) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if dataclasses.is_dataclass(origin):
        return _typed(origin, value, path)
    kinds = (int, float) if origin is float else (origin,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and origin is not bool):
        name = _JSON_NAMES.get(origin, "object")
        raise _KeyProblem(f"key {path!r} must be a JSON {name}, got {value!r:.60}")
    if origin is list and args and args[0] is str and not all(isinstance(x, str) for x in value):
        raise _KeyProblem(f"key {path!r} must be a list of strings")
    if origin is dict and args and dataclasses.is_dataclass(args[1]):
        return {k: _typed(args[1], v, f"{path}[{k!r}]") for k, v in value.items()}
    return float(value) if origin is float else value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def write(folder: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (temporary file, then rename)."""
    path = folder / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    manifest.settings_sha256 = manifest.settings_digest()
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


def inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused unless it resolves inside the folder (symlinks followed), before
    anything is read from it."""
    root = Path(folder).resolve()
    path = Path(folder) / name
    try:
        path.resolve().relative_to(root)
    except ValueError:
        raise IntegrityError(
            f"{Path(folder) / MANIFEST_FILE}: {name!r} points outside the model folder; "
            "restore the folder from the export"
        ) from None
    return path


def verify(folder: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check the sha256 and size of the named files (all listed files when None)."""
    files = manifest.files
    for name in names if names is not None else sorted(files):
        path = inside(folder, name)
        if name not in files:
            raise IntegrityError(f"{path}: not listed in {MANIFEST_FILE}; re-run the export")
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MANIFEST_FILE} but missing")
        entry = files[name]
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
