"""Wheels bundling the runtime with a model folder: contents, bundled loading, a clean install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import bertrt
from bertrt import locate
from bertrt.api import load_bundled
from bertrt.bundle import build_wheel
from bertrt.cli import main
from bertrt.locate import BundleError, bundled_dir, resolve_model
from bertrt.manifest import IntegrityError

# What the clean environment gets: the runtime's pinned stack and nothing else.
RUNTIME_STACK = ["onnxruntime-gpu==1.31.1", "tokenizers==0.23.3", "numpy==2.4.6"]
TEXTS = ["a wonderful charming film", "boring and bland", "", "the cast was weak " * 30]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory, onnx_model_dir: Path) -> Path:
    return build_wheel(onnx_model_dir, tmp_path_factory.mktemp("dist"), name="tiny")


@pytest.fixture(scope="module")
def variants_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with its optimised, fp16 and int8 graphs (gates wide open: this is about
    which files a wheel carries, not about the graphs' quality)."""
    from conftest import synthetic_reviews

    from pipeline import tasks
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    out = tmp_path_factory.mktemp("variants") / "model"
    texts = [r["text"] for r in synthetic_reviews(16, seed=2)]
    options = ExportOptions(
        64, variants=("fp32-optimized", "fp16", "int8"), min_agreement=0.0, max_metric_drop=1.0
    )
    model_folder.build(tiny_model_dir, out, tasks.get("text-classification"), texts, options)
    return out


def wheel_text(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name).decode("utf-8")


def test_wheel_holds_the_runtime_and_the_model_folder(wheel: Path, onnx_model_dir: Path) -> None:
    assert wheel.name == f"bertrt_model_tiny-{bertrt.__version__}-py3-none-any.whl"
    full = json.loads((onnx_model_dir / "manifest.json").read_text())
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        model_files = {n.removeprefix("bertrt/models/tiny/") for n in names if "/models/" in n}
        bundled = json.loads(archive.read("bertrt/models/tiny/manifest.json"))
        assert bundled["variants"] == full["variants"]
        assert model_files == {*bundled["files"], "manifest.json"} | (
            {"README.md"} if (onnx_model_dir / "README.md").is_file() else set()
        )
        for file in model_files - {"manifest.json"}:
            data = archive.read(f"bertrt/models/tiny/{file}")
            assert data == (onnx_model_dir / file).read_bytes(), file
    # Every runtime module, the predictors package included, and nothing of the pipeline.
    runtime = Path(bertrt.__file__).parent
    sources = {f"bertrt/{f.relative_to(runtime).as_posix()}" for f in runtime.rglob("*.py")}
    assert {"bertrt/predictors/fill_mask.py", "bertrt/server.py"} <= sources
    assert sources == {n for n in names if n.endswith(".py")}
    assert not any(n.startswith(("pipeline/", "tests/")) for n in names)


def test_wheel_depends_on_the_runtime_stack_only(wheel: Path) -> None:
    metadata = wheel_text(wheel, f"bertrt_model_tiny-{bertrt.__version__}.dist-info/METADATA")
    requires = [
        line.split(": ", 1)[1] for line in metadata.splitlines() if "Requires-Dist" in line
    ]
    assert requires == [  # ONNX Runtime through an extra: a CPU host skips the CUDA build
        "tokenizers==0.23.3",
        "numpy>=1.26",
        'fastapi>=0.115; extra == "serve"',
        'uvicorn>=0.30; extra == "serve"',
        'dask[dataframe]==2026.8.0; extra == "dask"',
        'distributed==2026.8.0; extra == "dask"',
        'onnxruntime==1.31.1; extra == "cpu"',
        'onnxruntime-gpu==1.31.1; extra == "gpu"',
        'model-signing==1.1.1; extra == "signing"',
        'pyopenssl>=25; extra == "signing"',
    ]
    entry_points = wheel_text(
        wheel, f"bertrt_model_tiny-{bertrt.__version__}.dist-info/entry_points.txt"
    )
    assert "bertrt = bertrt.cli:main" in entry_points


def test_cpu_only_onnxruntime_and_version(tmp_path: Path, onnx_model_dir: Path) -> None:
    built = build_wheel(onnx_model_dir, tmp_path, "reviews_v2", "2.0.1", "onnxruntime")
    assert built.name == "bertrt_model_reviews_v2-2.0.1-py3-none-any.whl"
    metadata = wheel_text(built, "bertrt_model_reviews_v2-2.0.1.dist-info/METADATA")
    assert "Requires-Dist: onnxruntime==1.31.1\n" in metadata
    assert "Requires-Dist: onnxruntime-gpu==1.31.1\n" not in metadata


def onnx_files(wheel: Path, name: str) -> tuple[dict, set[str]]:
    with zipfile.ZipFile(wheel) as archive:
        bundled = json.loads(archive.read(f"bertrt/models/{name}/manifest.json"))
        names = {n.rsplit("/", 1)[-1] for n in archive.namelist() if n.endswith(".onnx")}
    return bundled, names


def test_a_wheel_carries_every_graph_the_runtime_may_pick_on_cpu_and_cuda(
    tmp_path: Path, variants_dir: Path
) -> None:
    full = json.loads((variants_dir / "manifest.json").read_text())
    assert {"fp32", "fp32-optimized", "fp16", "int8"} <= set(full["variants"])
    built = build_wheel(variants_dir, tmp_path, "small")
    bundled, names = onnx_files(built, "small")
    # Every CPU graph (the fastest depends on the CPU it lands on) and CUDA's.
    assert set(bundled["variants"]) == {"fp32", "fp32-optimized", "int8", "fp16"}
    with zipfile.ZipFile(built) as archive:  # the bundled folder passes its own integrity check
        archive.extractall(tmp_path / "unpacked")
    unpacked = bertrt.load(tmp_path / "unpacked" / "bertrt" / "models" / "small", device="cpu")
    source = bertrt.load(variants_dir, device="cpu")
    assert set(unpacked.engine.probe_s) == set(source.engine.probe_s), "the same candidates"
    same = bertrt.load(variants_dir, device="cpu", variant=unpacked.engine.variant)
    assert [p.label for p in unpacked.predict(TEXTS)] == [p.label for p in same.predict(TEXTS)]
    assert names == {"model.onnx", "model.optimized.onnx", "model.int8.onnx", "model.fp16.onnx"}
    assert set(bundled["files"]) == set(full["files"])
    chosen, names = onnx_files(build_wheel(variants_dir, tmp_path, "q", variants=["int8"]), "q")
    assert list(chosen["variants"]) == ["int8"] and names == {"model.int8.onnx"}
    with pytest.raises(BundleError, match=r"variants \['fp64'\] are not shipped"):
        build_wheel(variants_dir, tmp_path / "x", "small", variants=["fp64"])


@pytest.mark.parametrize(
    ("name", "onnxruntime", "message"),
    [
        ("Tiny", "onnxruntime-gpu", "bundle name 'Tiny': start with a lower-case letter"),
        ("my-model", "onnxruntime-gpu", "bundle name 'my-model'"),
        ("tiny", "onnxruntime-cpu", "onnxruntime 'onnxruntime-cpu' is not one of"),
    ],
)
def test_bad_bundle_options(
    tmp_path: Path, onnx_model_dir: Path, name: str, onnxruntime: str, message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        build_wheel(onnx_model_dir, tmp_path, name, onnxruntime=onnxruntime)
    assert list(tmp_path.iterdir()) == []


def test_damaged_folder_is_not_packaged(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(IntegrityError, match=r"tokenizer\.json: 2 bytes, the manifest says"):
        build_wheel(model_copy, tmp_path / "dist")
    assert not list((tmp_path / "dist").glob("*.whl"))


def test_package_command_prints_the_wheel(
    onnx_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["package", "--model", str(onnx_model_dir), "--out", str(tmp_path), "--name", "cli"]
    assert main(argv) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == tmp_path / f"bertrt_model_cli-{bertrt.__version__}-py3-none-any.whl"
    assert printed.is_file()


@pytest.fixture
def bundled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, onnx_model_dir: Path) -> Path:
    """An installation layout with one bundled model, as the wheel lays it out."""
    models = tmp_path / "models"
    shutil.copytree(onnx_model_dir, models / "tiny")
    monkeypatch.setattr(locate, "MODELS_DIR", models)
    return models


def test_nothing_bundled_in_a_source_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(locate, "MODELS_DIR", tmp_path / "models")
    with pytest.raises(BundleError, match="no model is bundled with this bertrt"):
        load_bundled()


def test_load_bundled_matches_the_folder(bundled: Path, onnx_model_dir: Path) -> None:
    got = load_bundled(device="cpu").predict(TEXTS)
    want = bertrt.load(onnx_model_dir, device="cpu").predict(TEXTS)
    assert [p.label for p in got] == [p.label for p in want]
    assert [p.score for p in got] == pytest.approx([p.score for p in want], abs=1e-9)
    assert bertrt.load_bundled is load_bundled
    by_name = bertrt.load("tiny", device="cpu").predict(TEXTS)  # a bundled model by its name
    assert [p.label for p in by_name] == [p.label for p in want]


def test_bundled_names_resolve(bundled: Path) -> None:
    shutil.copytree(bundled / "tiny", bundled / "other")
    assert resolve_model("bundled:other") == bundled / "other"
    assert resolve_model("./bundled") == Path("bundled")
    assert resolve_model("other") == bundled / "other"  # a bundled model by its bare name
    assert resolve_model("./other") == Path("other")
    assert bundled_dir("tiny") == bundled / "tiny"
    with pytest.raises(
        BundleError, match=r"2 models are bundled, name one of \['other', 'tiny'\]"
    ):
        resolve_model("bundled")
    with pytest.raises(
        BundleError, match=r"no bundled model 'nope'; bundled: \['other', 'tiny'\]"
    ):
        bundled_dir("nope")


def test_cli_predicts_with_the_bundled_model(
    bundled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--model", "bundled", "--device", "cpu", *TEXTS[:2]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = load_bundled(device="cpu").predict(TEXTS[:2])
    assert [line["label"] for line in lines] == [p.label for p in want]


@pytest.fixture(scope="session")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with only the runtime's stack (no torch, no transformers)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *RUNTIME_STACK],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if install.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        pytest.skip(
            f"the package index is unreachable for {RUNTIME_STACK}: {install.stderr[-800:]}"
        )
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


def run_in(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the venv's python away from the source tree, so only installed code is found."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


CHECK = """
import importlib.util, json, sys
import bertrt
model = bertrt.load_bundled(device="cpu")
predictions = [p.as_dict() for p in model.predict(json.loads(sys.argv[1]))]
absent = [m for m in ("torch", "transformers", "pipeline") if importlib.util.find_spec(m) is None]
print(json.dumps({"predictions": predictions, "absent": absent, "file": bertrt.__file__}))
"""


@pytest.mark.slow
def test_wheel_installs_and_predicts_without_the_training_stack(
    clean_venv: Path, wheel: Path, onnx_model_dir: Path, tmp_path: Path
) -> None:
    install = run_in(clean_venv, tmp_path, "-m", "pip", "install", "-q", str(wheel))
    assert install.returncode == 0, install.stderr
    want = bertrt.load(onnx_model_dir, device="cpu").predict(TEXTS)

    result = run_in(clean_venv, tmp_path, "-c", CHECK, json.dumps(TEXTS))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["absent"] == ["torch", "transformers", "pipeline"]
    assert report["file"].startswith(str(clean_venv))
    got = report["predictions"]
    assert [g["label"] for g in got] == [p.label for p in want]
    assert [g["score"] for g in got] == pytest.approx([p.score for p in want], abs=1e-6)

    cli = run_in(clean_venv, tmp_path, "-m", "bertrt", "predict", "--model", "tiny", *TEXTS)
    assert cli.returncode == 0, cli.stderr
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [line["label"] for line in lines] == [p.label for p in want]
    assert [line["score"] for line in lines] == pytest.approx([p.score for p in want], abs=1e-6)

    info = subprocess.run(
        [str(clean_venv / "bin" / "bertrt"), "info", "--model", "bundled", "--device", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["labels"] == ["fresh", "rotten"]

    serve = run_in(clean_venv, tmp_path, "-m", "bertrt", "serve", "--model", "bundled")
    assert serve.returncode == 1
    assert "serving needs fastapi and uvicorn" in serve.stderr
    assert "[serve] extra" in serve.stderr
