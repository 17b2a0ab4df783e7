"""The GPU check rehearsed on the CPU: the same script on the tiny model, carried in pieces, each
part in a process that sees only the GPU machine's stack; and the import audit that fails a part
which reached past it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO, synthetic_reviews, write_splits

from benchmarks import gpu_carry, gpu_check, gpu_stack
from benchmarks.train_cls import PLAIN, bf16_available

BACKENDS = {
    "ort cpu fp16",
    "ort cpu fp32-optimized",
    "pytorch fp32",
    "pytorch fp16",
    "pytorch bf16",
}


@pytest.fixture(scope="module")
def carry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model, exported with the two variants the check runs, bundled with its weights
    and small splits, and split into pieces as `make gpu-check-prepare` does."""
    from pipeline import tasks
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    root = tmp_path_factory.mktemp("gpu-check")
    texts = [r["text"] for r in synthetic_reviews(48, seed=3)]
    options = ExportOptions(64, variants=("fp32-optimized", "fp16"), batch_size=16)
    onnx = root / "onnx"
    model_folder.build(tiny_model_dir, onnx, tasks.get("text-classification"), texts, options)

    def rows(n: int, seed: int) -> list[dict[str, str]]:
        return [{"text": r["text"], "label": r["category"]} for r in synthetic_reviews(n, seed)]

    splits = {"train": rows(64, 1), "validation": rows(24, 2), "test": rows(40, 3)}
    validated = write_splits(root / "validated", splits)
    carry = root / "carry"
    tar = gpu_carry.bundle_model(onnx, tiny_model_dir, validated, carry / gpu_carry.WHOLE)
    gpu_carry.write_manifest(carry, [{**gpu_carry.split(tar, carry, 256 * 1024), "kind": "model"}])
    return carry


@pytest.mark.slow  # about 45 s on 2 cores: each part imports torch and transformers
def test_rehearsal_runs_every_part_on_the_cpu_with_only_the_gpu_machines_stack(
    carry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--strict-imports", "--carry", str(carry), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    data = json.loads((out / gpu_check.JSON_FILE).read_text())
    states = {name: part["status"] for name, part in data["parts"].items()}
    errors = {name: part.get("error") for name, part in data["parts"].items()}
    assert states == dict.fromkeys(["receive", *gpu_check.PARTS], "ok"), errors
    assert done.returncode == 0, done.stderr[-3000:]
    parts = data["parts"]
    assert parts["receive"]["bundles"] == {"model.tar": f"unpacked into {carry / gpu_carry.MODEL}"}
    assert not any("outside_stack" in part for part in parts.values())

    model = carry / gpu_carry.MODEL / "onnx"
    shipped = json.loads((model / "manifest.json").read_text())["variants"]
    assert sorted(shipped) == ["fp16", "fp32-optimized"] and not (model / "model.onnx").exists()

    facts = parts["env"]["facts"]
    assert facts["cuda_available"] is False
    assert facts["onnxruntime"]["session"] == {"provider": "CPUExecutionProvider"}
    assert {"torch", "transformers", "pandera"} <= set(facts["versions"])

    tests = parts["tests"]
    assert "tests/test_runtime.py" in tests["files"] and tests["exit_code"] == 0
    assert len(tests["tests"]) >= 3  # each recorded, skipped here with its reason
    assert all(t["outcome"] == "skipped" and t["reason"] for t in tests["tests"])
    assert "no CUDA device on this machine" in {t["reason"] for t in tests["tests"]}

    inference = parts["inference"]["inference"]
    rows = inference["results"]
    assert {r["backend"] for r in rows} == BACKENDS
    assert len(rows) == len(BACKENDS) * 2 * 2  # two workloads, batch 1 and 4
    assert {r["workload"] for r in rows} == {"test texts", "64 tokens"}
    assert all(r["texts_per_s"] > 0 and 0 <= r["agreement"] <= 1 for r in rows)
    assert len(inference["model_only"]) == len(BACKENDS) * 2
    best = max(inference["model_only"], key=lambda r: r["sequences_per_s"])
    assert parts["inference"]["headline"]["model_only"]["backend"] == best["backend"]

    training = parts["training"]["training"]["results"]
    ours = "+ bf16 autocast" if bf16_available("cpu")[0] else "+ batch 32 (the default)"
    assert [r["setting"] for r in training] == [PLAIN, ours]
    assert all(r["samples_per_s"] > 0 for r in training) and training[0]["speedup"] == 1.0

    text = (out / gpu_check.MARKDOWN_FILE).read_text()
    for heading in ("## Machine", "## gpu-marked tests", "## Inference", "## Fine-tuning"):
        assert heading in text
    assert "the model alone: **" in text
    # The GPU machine gives back at most 8 files, 2 folders down.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)


def test_a_part_past_its_limit_is_killed_and_its_log_tail_kept(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"]
    spec = {"out": str(tmp_path)}
    state = gpu_check.run_part("training", spec, dict(os.environ), 1, sleeper, tmp_path)
    assert (state["status"], state["limit_s"], state["exit_code"]) == ("timeout", 1, None)
    assert state["seconds"] < 10 and state["error"] == "started"
    assert (tmp_path / gpu_check.LOG_FILE).read_text().startswith("===== training (limit 1 s)")


def test_parts_past_the_budget_are_skipped_and_reported(tmp_path: Path) -> None:
    """Two parts that need no carried model, so nothing is carried: the failed receive is
    reported, and each part is skipped for the budget, not started."""
    out = tmp_path / "out"
    data = gpu_check.run(tmp_path / "nothing", out, "cpu", budget=5, parts=("env", "tests"))
    assert data["parts"]["receive"]["status"] == "failed"
    for name in ("env", "tests"):
        assert data["parts"][name]["status"] == "skipped"
        assert data["parts"][name]["error"].startswith("the 5 s budget is spent")
    reported = json.loads((out / gpu_check.JSON_FILE).read_text())
    assert reported["parts"] == json.loads(json.dumps(data["parts"]))
    assert "| tests | skipped |" in (out / gpu_check.MARKDOWN_FILE).read_text()
    assert not (out / gpu_check.PARTS_DIR).exists(), "no part was started"


def test_the_stack_mirror_hides_what_the_gpu_machine_lacks(tmp_path: Path) -> None:
    dists, missing = gpu_stack.closure(gpu_stack.STACK + gpu_stack.CARRIED)
    assert missing == []
    mirror = gpu_stack.mirror(dists, tmp_path / "stack")
    code = (
        "import importlib\n"
        "for name in ['yaml', 'pandera', 'mlflow', 'datasets', 'dvc']:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        print(name, 'ok')\n"
        "    except ModuleNotFoundError as exc:\n"
        "        print(name, 'missing', exc.name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(mirror)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == [
        "yaml ok",
        "pandera ok",
        "mlflow missing mlflow",
        "datasets missing datasets",
        "dvc missing dvc",
    ]


def test_the_audit_fails_a_part_that_imported_past_the_stack_and_names_the_module() -> None:
    dists, _ = gpu_stack.closure(gpu_stack.STACK + gpu_stack.CARRIED)
    allowed = gpu_stack.allowed_locations(dists, list(gpu_stack.PROJECT))
    mlflow = str(metadata.distribution("mlflow").locate_file("mlflow/__init__.py"))
    modules = {
        "torch": str(metadata.distribution("torch").locate_file("torch/__init__.py")),
        "json": json.__file__,
        "sys": None,
        "benchmarks": str(REPO / "benchmarks" / "__init__.py"),
        "mlflow": mlflow,
    }
    lenient = {"status": "ok", "modules": dict(modules)}
    gpu_check.audit(lenient, allowed, strict=False)
    assert lenient == {"status": "ok", "outside_stack": {"mlflow": mlflow}}
    strict = {"status": "ok", "modules": dict(modules)}
    gpu_check.audit(strict, allowed, strict=True)
    assert strict["status"] == "failed"
    assert strict["error"] == f"imported from outside the GPU machine's stack: mlflow ({mlflow})"


def test_the_carried_wheels_are_pandera_and_what_it_needs_not_the_stack() -> None:
    wanted = gpu_stack.carried_specifiers()
    assert {"pandera", "pydantic", "pydantic-core"} <= set(wanted)
    assert not {"torch", "transformers", "numpy", "mlflow"} & set(wanted)
    assert wanted["pandera"] == ""
