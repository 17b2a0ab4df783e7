"""Wheels that bundle the runtime with an exported model folder (`python -m bertrt package`)."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
from pathlib import Path

import bertrt.manifest as manifest_io
from bertrt import __version__, signing
from bertrt.contract import CPU, CUDA, MANIFEST_FILE, MODEL_CARD_FILE
from bertrt.engine import choose_variant
from bertrt.locate import BundleError

log = logging.getLogger(__name__)

ORT_VERSION = "1.31.1"
ONNXRUNTIMES = ("onnxruntime-gpu", "onnxruntime")
# ONNX Runtime as an extra (`pip install bertrt-model-x[cpu]` or `[gpu]`): a CPU host does not
# pull the CUDA build. `onnxruntime=` puts one of them into the plain dependencies instead.
EXTRAS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
REQUIREMENTS = ("tokenizers==0.23.3", "numpy>=1.26")
SERVE_REQUIREMENTS = ("fastapi>=0.115", "uvicorn>=0.30")
# `python -m bertrt batch`: the versions of requirements.txt.
DASK_REQUIREMENTS = ("dask[dataframe]==2026.8.0", "distributed==2026.8.0")
# `bertrt.load(..., public_key=)`: the versions of requirements.txt; model-signing 1.1.1 imports
# pyOpenSSL without declaring it.
SIGNING_REQUIREMENTS = ("model-signing==1.1.1", "pyopenssl>=25")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=70.1"]
build-backend = "setuptools.build_meta"

[project]
name = "bertrt-model-{dist_name}"
version = "{version}"
description = "ONNX Runtime model '{name}' with the bertrt runtime"
requires-python = ">=3.10"
dependencies = {dependencies}
{readme}
[project.optional-dependencies]
serve = {serve}
dask = {dask}
cpu = {cpu}
gpu = {gpu}
signing = {signing}

[project.scripts]
bertrt = "bertrt.cli:main"

[tool.setuptools]
packages = ["bertrt", "bertrt.predictors", "bertrt.models", "bertrt.models.{name}"]

[tool.setuptools.package-data]
"bertrt.models.{name}" = ["*"]
"""


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def default_variants(manifest: manifest_io.Manifest) -> list[str]:
    """The graphs a wheel carries by default: every shipped CPU graph, because which of them is
    fastest depends on the CPU the wheel lands on (the runtime times them there at load), and
    the graph the runtime starts on under CUDA."""
    on_cpu = {name for name, entry in manifest.variants.items() if CPU in entry.providers}
    return sorted(on_cpu | {choose_variant(manifest, CUDA, None)})


def bundled_manifest(
    manifest: manifest_io.Manifest, variants: list[str] | None
) -> manifest_io.Manifest:
    """The manifest of the bundled folder: only the chosen variants and their files."""
    chosen = default_variants(manifest) if variants is None else list(dict.fromkeys(variants))
    unknown = [v for v in chosen if v not in manifest.variants]
    if unknown or not chosen:
        raise BundleError(
            f"variants {unknown or chosen} are not shipped in this folder; shipped: "
            f"{sorted(manifest.variants)}"
        )
    graphs = {entry.file for entry in manifest.variants.values()}
    keep = {manifest.variants[v].file for v in chosen}
    files = {f: e for f, e in manifest.files.items() if f not in graphs or f in keep}
    kept = {v: e for v, e in manifest.variants.items() if v in chosen}
    return dataclasses.replace(manifest, variants=kept, files=files)


def write_project(
    model_dir: Path,
    project: Path,
    name: str,
    version: str,
    onnxruntime: str | None,
    variants: list[str] | None = None,
    private_key: str | Path | None = None,
    password: str | None = None,
) -> None:
    """Lay out a setuptools project with the runtime's modules and the verified model folder;
    the bundled folder is signed with `private_key` when given (bertrt.signing)."""
    manifest = manifest_io.read(model_dir)
    manifest_io.verify(model_dir, manifest)
    bundled = bundled_manifest(manifest, variants)
    package = project / "bertrt"
    package.mkdir(parents=True)
    runtime = Path(__file__).resolve().parent
    for module in sorted(runtime.rglob("*.py")):
        relative = module.relative_to(runtime)
        if relative.parts[0] in ("models", "__pycache__"):
            continue
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, package / relative)
    target = package / "models" / name
    target.mkdir(parents=True)
    # Only what the manifest lists (plus the model card): no stray temporary files.
    for file in [*bundled.files, MODEL_CARD_FILE]:
        if (model_dir / file).is_file():
            shutil.copy2(model_dir / file, target / file)
    manifest_io.write(target, bundled)
    manifest_io.verify(target, bundled)
    if private_key is not None:
        signing.sign(target, private_key, password)
    else:
        carry_signature(model_dir, target)
    readme = ""
    if (model_dir / MODEL_CARD_FILE).is_file():
        shutil.copy2(model_dir / MODEL_CARD_FILE, project / MODEL_CARD_FILE)
        readme = f'readme = "{MODEL_CARD_FILE}"\n'
    runtime = [f"{onnxruntime}=={ORT_VERSION}"] if onnxruntime else []
    (project / "pyproject.toml").write_text(
        PYPROJECT.format(
            name=name,
            dist_name=name.replace("_", "-"),
            version=version,
            dependencies=_toml_list([*runtime, *REQUIREMENTS]),
            serve=_toml_list(list(SERVE_REQUIREMENTS)),
            dask=_toml_list(list(DASK_REQUIREMENTS)),
            cpu=_toml_list([f"{EXTRAS['cpu']}=={ORT_VERSION}"]),
            gpu=_toml_list([f"{EXTRAS['gpu']}=={ORT_VERSION}"]),
            signing=_toml_list(list(SIGNING_REQUIREMENTS)),
            readme=readme,
        ),
        encoding="utf-8",
    )


def carry_signature(source: Path, target: Path) -> None:
    """Copy the source folder's signature into the bundled folder when it still covers it: the
    same files, the same manifest (so every listed file has the same digest) and model card.
    A bundle of fewer graphs is another set of files: it is signed with a key or not at all."""
    signature = source / signing.SIGNATURE_FILE
    if not signature.is_file():
        return
    names = {p.name for p in source.iterdir()} - {signing.SIGNATURE_FILE}
    same = names == {p.name for p in target.iterdir()} and all(
        (source / f).read_bytes() == (target / f).read_bytes()
        for f in (MANIFEST_FILE, MODEL_CARD_FILE)
        if (source / f).is_file()
    )
    if same:
        shutil.copy2(signature, target / signing.SIGNATURE_FILE)
        return
    log.warning(
        "%s is signed, but the bundle holds other files (fewer graphs): its signature is left "
        "out; sign the bundle with a private key (--private-key) to carry one",
        source,
    )


def build_wheel(
    model_dir: str | Path,
    out_dir: str | Path,
    name: str = "default",
    version: str | None = None,
    onnxruntime: str | None = None,
    variants: list[str] | None = None,
    private_key: str | Path | None = None,
    password: str | None = None,
) -> Path:
    """Build `bertrt-model-<name>`: the runtime plus the model folder as `bertrt/models/<name>/`.

    Args:
        name: the bundled model's name, a lower-case Python identifier.
        version: the wheel's version; the runtime's own version by default.
        onnxruntime: None leaves ONNX Runtime to the extras `[cpu]` (onnxruntime) and `[gpu]`
            (onnxruntime-gpu); "onnxruntime" or "onnxruntime-gpu" makes it a plain dependency.
        variants: the graphs to bundle; by default those the runtime picks on CPU and on CUDA.
        private_key: a PEM EC private key that signs the bundled folder (`password` if it is
            encrypted); without one, the folder's signature is carried only where it still
            covers the bundle (`carry_signature`).
    """
    if not NAME_PATTERN.fullmatch(name):
        raise BundleError(
            f"bundle name {name!r}: start with a lower-case letter; then letters, digits or _"
        )
    if onnxruntime is not None and onnxruntime not in ONNXRUNTIMES:
        raise BundleError(f"onnxruntime {onnxruntime!r} is not one of {list(ONNXRUNTIMES)}")
    try:
        import build
        import pyproject_hooks
    except ModuleNotFoundError as exc:
        raise BundleError(
            f"building a wheel needs the `build` package ({exc}); pip install build setuptools"
        ) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bertrt-bundle-") as tmp:
        project = Path(tmp) / "project"
        write_project(
            Path(model_dir),
            project,
            name,
            version or __version__,
            onnxruntime,
            variants,
            private_key,
            password,
        )
        # No isolation: the installed setuptools builds it, so no index is needed.
        builder = build.ProjectBuilder(project, runner=pyproject_hooks.quiet_subprocess_runner)
        missing = builder.check_dependencies("wheel")
        if missing:
            raise BundleError(f"building a wheel needs {sorted(map(str, missing))}; pip install")
        try:
            wheel = builder.build("wheel", out)
        except build.BuildBackendException as exc:
            raise BundleError(f"setuptools could not build the wheel: {exc}") from exc
    return Path(wheel)
