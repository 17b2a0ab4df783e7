"""The inference runtime: import isolation, providers, integrity checks and batching behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_reviews

import bertrt
from bertrt.contract import (
    CPU,
    CUDA,
    LABELS_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    TENSORRT,
    TOKENIZER_FILE,
)
from bertrt.engine import ModelFolderError
from bertrt.manifest import IntegrityError
from bertrt.predictors import text_classification as predictor_module
from bertrt.predictors.text_classification import TextClassifier
from bertrt.session import DeviceError, start_session, tensorrt_options

HEAVY = ["torch", "transformers", "pipeline", "sklearn", "pandas", "mlflow", "dvc"]
SERVER_STACK = ["fastapi", "uvicorn", "starlette", "pydantic"]


@cache
def cuda_starts(model_file: Path) -> bool:
    """Whether a CUDA session really starts here (not the silent CPU fallback)."""
    try:
        start_session(model_file, "cuda")
    except DeviceError:
        return False
    return True


@pytest.fixture(scope="module")
def model(onnx_model_dir: Path) -> TextClassifier:
    return bertrt.load(onnx_model_dir, device="cpu")


def imported_after(statement: str) -> set[str]:
    """Top-level module names in sys.modules after running `statement` in a fresh interpreter."""
    report = "import json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    code = f"{statement}\n{report}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_runtime_and_cli_import_neither_training_code_nor_server_stack() -> None:
    modules = imported_after("import bertrt, bertrt.cli, bertrt.bundle")
    assert {"bertrt", "onnxruntime", "tokenizers", "numpy"} <= modules
    assert modules.isdisjoint(HEAVY + SERVER_STACK), sorted(modules & {*HEAVY, *SERVER_STACK})


def test_server_imports_no_training_code() -> None:
    modules = imported_after("import bertrt.server")
    assert {"fastapi", "onnxruntime"} <= modules
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))


def test_cpu_device_runs_on_cpu(model: TextClassifier) -> None:
    assert model.provider == CPU
    assert model.engine.session.get_providers() == [CPU]


def test_auto_device_falls_back_to_cpu_without_a_gpu(onnx_model_dir: Path) -> None:
    if cuda_starts(onnx_model_dir / "model.onnx"):
        pytest.skip("a CUDA device is present: auto picks it")
    loaded = bertrt.load(onnx_model_dir, device="auto")
    assert loaded.provider == CPU
    assert loaded.engine.session.get_providers()[0] == CPU


def test_a_host_without_a_cuda_driver_loads_without_cuda_errors(onnx_model_dir: Path) -> None:
    from bertrt.session import cuda_driver

    if cuda_driver():
        pytest.skip("this host has an NVIDIA driver")
    code = f"import bertrt; print(bertrt.load({str(onnx_model_dir)!r}).provider)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == CPU
    assert "cuda" not in done.stderr.lower(), done.stderr


def test_cuda_device_refuses_to_fall_back(onnx_model_dir: Path) -> None:
    if cuda_starts(onnx_model_dir / "model.onnx"):
        pytest.skip("a CUDA device is present")
    with pytest.raises(DeviceError, match=r"device='cuda' was asked for .* device='cpu'"):
        bertrt.load(onnx_model_dir, device="cuda")


@pytest.fixture(scope="module")
def cuda_variants_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, onnx_model_dir: Path
) -> Path:
    """The tiny model with its fp16 variant (built only where CUDA starts)."""
    if not cuda_starts(onnx_model_dir / "model.onnx"):
        pytest.skip("no CUDA device on this machine")
    from pipeline import tasks
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    out = tmp_path_factory.mktemp("cuda-variants") / "model"
    texts = [r["text"] for r in synthetic_reviews(48, seed=3)]
    options = ExportOptions(64, variants=("fp16",), batch_size=16)
    model_folder.build(tiny_model_dir, out, tasks.get("text-classification"), texts, options)
    return out


@pytest.mark.gpu
def test_cuda_times_its_variants_and_fp16_matches_cpu(
    cuda_variants_dir: Path, model: TextClassifier
) -> None:
    from bertrt.engine import PROBE_MARGIN

    timed = bertrt.load(cuda_variants_dir, device="cuda")
    assert timed.provider == CUDA
    probe = timed.engine.probe_s
    assert set(probe) == {"fp32", "fp16"}  # the graphs built for CUDA in this folder
    fastest = min(probe, key=probe.__getitem__)
    assert timed.variant == (fastest if probe[fastest] * PROBE_MARGIN < probe["fp16"] else "fp16")
    gpu = bertrt.load(cuda_variants_dir, device="cuda", variant="fp16")
    assert (gpu.variant, gpu.provider) == ("fp16", CUDA)
    gate = json.loads((cuda_variants_dir / MANIFEST_FILE).read_text())["variants"]["fp16"]
    assert gate["gate"]["provider"] == CUDA  # gated where it runs, and the manifest says so
    texts = [r["text"] for r in synthetic_reviews(40, seed=3)]
    np.testing.assert_allclose(gpu.logits(texts), model.logits(texts), atol=2e-2)


@pytest.mark.gpu
def test_tensorrt_runs_fp16_and_keeps_its_engines(
    cuda_variants_dir: Path, model: TextClassifier, tmp_path: Path, monkeypatch
) -> None:
    import onnxruntime as ort

    if TENSORRT not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT provider")
    monkeypatch.setenv("BERTRT_TENSORRT_CACHE", str(tmp_path / "trt"))
    gpu = bertrt.load(cuda_variants_dir, device="cuda", variant="fp16", tensorrt=True)
    if gpu.provider != TENSORRT:
        pytest.skip(f"TensorRT's libraries did not load (the session runs on {gpu.provider})")
    texts = [r["text"] for r in synthetic_reviews(40, seed=3)]
    np.testing.assert_allclose(gpu.logits(texts), model.logits(texts), atol=2e-2)
    assert any((tmp_path / "trt").iterdir()), "no engine was written to the cache"


def test_tensorrt_options_keep_engines_where_the_environment_says(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("BERTRT_TENSORRT_CACHE", str(tmp_path / "cache" / "trt"))
    options = tensorrt_options()
    assert options["trt_fp16_enable"] and options["trt_engine_cache_enable"]
    assert options["trt_engine_cache_path"] == str(tmp_path / "cache" / "trt")
    assert (tmp_path / "cache" / "trt").is_dir()
    assert "trt_profile_max_shapes" not in options  # no graph given: TensorRT's own ranges
    sized = tensorrt_options(["input_ids", "attention_mask"], 128)
    assert sized["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert sized["trt_profile_opt_shapes"] == "input_ids:32x128,attention_mask:32x128"
    assert sized["trt_profile_max_shapes"] == "input_ids:1024x128,attention_mask:1024x128"


def test_unknown_device_names_the_choices(onnx_model_dir: Path) -> None:
    with pytest.raises(DeviceError, match=r"'gpu' is not one of \['auto', 'cuda', 'cpu'\]"):
        bertrt.load(onnx_model_dir, device="gpu")


@pytest.mark.gpu
def test_cuda_runs_with_io_binding_and_matches_cpu(
    onnx_model_dir: Path, model: TextClassifier
) -> None:
    if not cuda_starts(onnx_model_dir / "model.onnx"):
        pytest.skip("no CUDA device on this machine")
    gpu = bertrt.load(onnx_model_dir, device="cuda", variant="fp32")
    assert gpu.provider == CUDA
    session, bindings = gpu.session, []

    class Spy:
        """Forward to the session, counting IO bindings."""

        def __getattr__(self, name: str) -> object:
            return getattr(session, name)

        def io_binding(self) -> object:
            bindings.append(1)
            return session.io_binding()

    gpu.session = Spy()
    texts = [r["text"] for r in synthetic_reviews(40, seed=3)]
    np.testing.assert_allclose(gpu.logits(texts, batch_size=16), model.logits(texts), atol=1e-4)
    assert len(bindings) == 3


def tamper_model(folder: Path) -> str:
    path = folder / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "model.onnx: sha256 does not match"


def truncate_tokenizer(folder: Path) -> str:
    path = folder / TOKENIZER_FILE
    path.write_bytes(path.read_bytes()[:100])
    return "tokenizer.json: 100 bytes, the manifest says"


def remove_labels(folder: Path) -> str:
    (folder / LABELS_FILE).unlink()
    return "labels.json: listed in manifest.json but missing"


def bump_schema(folder: Path) -> str:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 99
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return f"manifest.json: schema_version 99, this runtime reads {SCHEMA_VERSION}"


def unlist_model(folder: Path) -> str:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["files"]["model.onnx"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return "model.onnx: not listed in manifest.json"


def remove_manifest(folder: Path) -> str:
    (folder / MANIFEST_FILE).unlink()
    return "manifest.json: no manifest"


@pytest.mark.parametrize(
    "damage",
    [tamper_model, truncate_tokenizer, remove_labels, bump_schema, unlist_model, remove_manifest],
)
def test_damaged_folder_raises_integrity_error_naming_the_file(model_copy: Path, damage) -> None:
    expected = damage(model_copy)
    with pytest.raises(IntegrityError) as caught:
        bertrt.load(model_copy, device="cpu")
    assert expected in str(caught.value)


def test_verify_false_skips_the_hash_check(model_copy: Path) -> None:
    manifest = json.loads((model_copy / MANIFEST_FILE).read_text())
    manifest["files"][TOKENIZER_FILE]["sha256"] = "0" * 64
    (model_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert bertrt.load(model_copy, device="cpu", verify=False).labels == ["fresh", "rotten"]


def test_unshipped_variant_lists_the_shipped_ones(onnx_model_dir: Path) -> None:
    shipped = sorted(json.loads((onnx_model_dir / MANIFEST_FILE).read_text())["variants"])
    with pytest.raises(ModelFolderError) as caught:
        bertrt.load(onnx_model_dir, device="cpu", variant="bf16")
    assert f"variant 'bf16' is not shipped in this folder; shipped: {shipped}" in str(caught.value)


MIXED = ["good", "", "the plot was dull and the cast was weak " * 6, "fun", "a b c d e f g h"]


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_batched_logits_equal_each_text_alone(model: TextClassifier, batch_size: int) -> None:
    alone = np.concatenate([model.logits([text]) for text in MIXED])
    together = model.logits(MIXED, batch_size=batch_size)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    # The untrained model's logits differ little, but enough that a mix-up would show.
    gaps = [np.abs(alone[i] - alone[j]).max() for i in range(5) for j in range(i)]
    assert min(gaps) > 2e-5


def _padded_cost(lengths: list[int], groups: list[tuple[int, int]], run_cost: float) -> float:
    return sum((b - a) * lengths[b - 1] + run_cost for a, b in groups)


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_are_the_cheapest_cut_of_the_sorted_lengths(seed: int) -> None:
    """Against every way to cut the sorted lengths into runs of at most batch_size."""
    from itertools import combinations, pairwise

    from bertrt.engine import length_groups

    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(3, 90, size=9).tolist())
    batch_size, run_cost = 4, float(rng.choice([0.0, 8.0, 32.0, 500.0]))
    groups = length_groups(np.asarray(lengths), batch_size, run_cost)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a < b <= a + batch_size for a, b in groups)
    assert all(left[1] == right[0] for left, right in pairwise(groups))
    n = len(lengths)
    every_cut = [
        list(pairwise((0, *cuts, n))) for k in range(n) for cuts in combinations(range(1, n), k)
    ]
    cheapest = min(
        _padded_cost(lengths, cut, run_cost)
        for cut in every_cut
        if all(b - a <= batch_size for a, b in cut)
    )
    assert _padded_cost(lengths, groups, run_cost) == pytest.approx(cheapest)


def test_length_groups_split_off_a_long_text_unless_runs_are_dear() -> None:
    from bertrt.engine import length_groups

    lengths = np.asarray([5, 5, 6, 120])
    assert length_groups(lengths, 32, 10.0) == [(0, 3), (3, 4)]
    assert length_groups(lengths, 32, 1000.0) == [(0, 4)]
    assert length_groups(lengths, 2, 1000.0) == [(0, 2), (2, 4)]


def test_cpu_batches_cut_mixed_lengths_and_cover_every_text(model: TextClassifier) -> None:
    engine = model.engine
    texts = ["good"] * 6 + ["the plot was dull and the cast was weak " * 8]
    encodings = [w for windows in engine.encode(texts) for w in windows]
    batches = engine.batches(encodings, 32)
    assert sorted(i for b in batches for i in b.tolist()) == list(range(len(texts)))
    assert [len(b) for b in batches] == [6, 1]


def test_chunks_are_stitched_back_in_order(
    model: TextClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [r["text"] for r in synthetic_reviews(23, seed=2)]
    expected = model.logits(texts)
    monkeypatch.setattr(predictor_module, "CHUNK", 5)
    np.testing.assert_allclose(model.logits(texts, batch_size=2), expected, atol=1e-5)


def test_empty_and_whitespace_texts_are_the_empty_input(model: TextClassifier) -> None:
    logits = model.logits(["", "   ", "\n\t"])
    np.testing.assert_allclose(logits[1:], np.repeat(logits[:1], 2, axis=0), atol=1e-6)
    assert [p.label for p in model.predict(["", " "])] == [model.predict([""])[0].label] * 2


def test_megabyte_text_is_truncated_like_its_prefix(model: TextClassifier) -> None:
    huge = "great " * 200_000
    assert len(huge) > 1_000_000
    prefix = "great " * 100  # past max_length (64 tokens) already
    np.testing.assert_allclose(model.logits([huge]), model.logits([prefix]), atol=1e-6)


def test_ten_thousand_texts(model: TextClassifier) -> None:
    unique = [r["text"] for r in synthetic_reviews(100, seed=4)]
    expected = model.predict(unique)
    got = model.predict(unique * 100, batch_size=64)
    assert len(got) == 10_000
    assert [p.label for p in got] == [p.label for p in expected] * 100
    scores = np.array([p.score for p in got]).reshape(100, 100)
    np.testing.assert_allclose(scores, np.tile([p.score for p in expected], (100, 1)), atol=1e-6)


def test_no_texts_give_no_predictions(model: TextClassifier) -> None:
    assert model.predict([]) == []
    assert model.logits([]).shape == (0, 2)


def test_top_k_ranks_every_label(model: TextClassifier) -> None:
    (prediction,) = model.predict(["a wonderful brilliant film"], top_k=2)
    scores = [score for _, score in prediction.top_k]
    assert scores == sorted(scores, reverse=True)
    assert {label for label, _ in prediction.top_k} == set(model.labels)
    assert prediction.top_k[0] == (prediction.label, prediction.score)
    assert sum(score for _, score in prediction.top_k) == pytest.approx(1.0)
    assert prediction.as_dict()["top_k"][0] == {
        "label": prediction.label,
        "score": prediction.score,
    }
    (one,) = model.predict(["a wonderful brilliant film"], top_k=1)
    assert one.top_k == prediction.top_k[:1]
    assert model.predict(["x"])[0].top_k is None


@pytest.mark.parametrize("top_k", [0, 3])
def test_top_k_out_of_range(model: TextClassifier, top_k: int) -> None:
    with pytest.raises(ValueError, match=f"top_k must be between 1 and 2, got {top_k}"):
        model.predict(["x"], top_k=top_k)


def test_wrong_input_types(model: TextClassifier) -> None:
    with pytest.raises(TypeError, match="not one string"):
        model.predict("a single string")
    with pytest.raises(TypeError, match="text 1 is int, expected str"):
        model.predict(["ok", 7])
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        model.predict(["ok"], batch_size=0)


def test_metadata(model: TextClassifier, onnx_model_dir: Path) -> None:
    meta = model.metadata()
    assert meta["labels"] == ["fresh", "rotten"]
    assert meta["task"] == "text-classification"
    assert (meta["provider"], meta["max_length"]) == (CPU, 64)
    assert model.folder == onnx_model_dir


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    change(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


MANIFEST_DAMAGE = [
    (lambda m: m.pop("outputs"), "key 'outputs' is missing"),
    (
        lambda m: m["files"]["model.onnx"].pop("bytes"),
        "files['model.onnx'] needs sha256 and bytes",
    ),
    (lambda m: m.update(outputs=[]), "outputs must name at least one graph output"),
    (lambda m: m.update(labels=[1, 2]), "key 'labels' must be a list of strings"),
    (lambda m: m.update(max_length="64"), "key 'max_length' must be a JSON integer"),
    (lambda m: m.update(max_lenght=64), "key 'max_lenght' is not one this runtime reads"),
    (lambda m: m.pop("temperature"), "key 'temperature' is missing"),
    (lambda m: m.update(window_stride=-1), "window_stride -1 must be in [0, max_length / 2)"),
    (lambda m: m["variants"]["fp32"].update(file=5), "key \"variants['fp32'].file\" must be a"),
    (
        lambda m: m["variants"]["fp32"].update(provider=["CPUExecutionProvider"]),
        "key \"variants['fp32'].provider\" is not one this runtime reads",
    ),
    (lambda m: m["variants"]["fp32"].pop("shipped"), "variants['fp32'].shipped\" is missing"),
    (
        lambda m: m["variants"]["fp32"].update(file="model.int8.onnx"),
        "variants['fp32'] must be model.onnx in fp32, got model.int8.onnx in fp32",
    ),
    (
        lambda m: m["variants"].update(int4=m["variants"]["fp32"]),
        "variants['int4'] is not a variant this runtime knows",
    ),
]


@pytest.mark.parametrize(
    ("change", "message"), MANIFEST_DAMAGE, ids=[m for _, m in MANIFEST_DAMAGE]
)
def test_a_broken_manifest_is_an_integrity_error_naming_the_key(
    model_copy: Path, change, message: str
) -> None:
    _edit_manifest(model_copy, change)
    with pytest.raises(IntegrityError) as caught:
        bertrt.load(model_copy, device="cpu", verify=False)
    assert message in str(caught.value) and "manifest.json" in str(caught.value)


def test_an_unreadable_tokenizer_without_verification_names_the_file(model_copy: Path) -> None:
    from bertrt.engine import ModelFolderError

    path = model_copy / TOKENIZER_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelFolderError, match=r"tokenizer\.json: not a readable tokenizer"):
        bertrt.load(model_copy, device="cpu", verify=False)


# --- a model folder edited, pointed outside itself, or inconsistent with its graph -------------


def test_swapped_labels_in_the_manifest_are_refused(model_copy: Path) -> None:
    _edit_manifest(model_copy, lambda m: m.update(labels=m["labels"][::-1]))
    with pytest.raises(IntegrityError, match="do not match their digest"):
        bertrt.load(model_copy, device="cpu", verify=False)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(temperature=m["temperature"] * 2),
        lambda m: m.update(max_length=m["max_length"] // 2),
        lambda m: m["variants"]["fp32"].update(providers=["CPUExecutionProvider"]),
    ],
    ids=["temperature", "max_length", "providers"],
)
def test_every_setting_the_runtime_acts_on_is_covered(model_copy: Path, change) -> None:
    _edit_manifest(model_copy, change)
    with pytest.raises(IntegrityError, match="do not match their digest"):
        bertrt.load(model_copy, device="cpu")


def test_labels_json_must_say_what_the_manifest_says(model_copy: Path) -> None:
    from bertrt import manifest as manifest_io

    (model_copy / LABELS_FILE).write_text(json.dumps(["rotten", "fresh"]))
    manifest = manifest_io.read(model_copy)
    manifest.files = manifest_io.file_entries(model_copy, sorted(manifest.files))
    manifest_io.write(model_copy, manifest)  # its digest updated too: only the labels differ
    with pytest.raises(IntegrityError, match="labels.json: .* differs from manifest.json"):
        bertrt.load(model_copy, device="cpu")


def test_more_labels_than_the_graph_scores_are_refused_at_load(model_copy: Path) -> None:
    from bertrt import manifest as manifest_io

    labels = ["fresh", "rotten", "stale"]
    (model_copy / LABELS_FILE).write_text(json.dumps(labels))
    manifest = manifest_io.read(model_copy)
    manifest.labels = labels
    manifest.files = manifest_io.file_entries(model_copy, sorted(manifest.files))
    manifest_io.write(model_copy, manifest)
    with pytest.raises(ModelFolderError, match="the graph scores 2 labels, manifest.json names 3"):
        bertrt.load(model_copy, device="cpu")


def test_a_graph_onnx_runtime_cannot_load_is_one_line_naming_it(model_copy: Path) -> None:
    import onnx

    from bertrt import manifest as manifest_io
    from bertrt.session import GraphError

    graph = onnx.load(str(model_copy / "model.onnx"))
    graph.opset_import[0].version = 99
    onnx.save(graph, str(model_copy / "model.onnx"))
    manifest = manifest_io.read(model_copy)
    manifest.files = manifest_io.file_entries(model_copy, sorted(manifest.files))
    manifest_io.write(model_copy, manifest)
    with pytest.raises(GraphError) as caught:
        bertrt.load(model_copy, device="cpu", variant="fp32")
    message = str(caught.value)
    assert "model.onnx: ONNX Runtime" in message and "cannot load this graph" in message
    assert "\n" not in message and caught.value.__cause__ is None


@pytest.mark.parametrize("outside", ["/etc/passwd", "../../../../../../etc/passwd", "0-link"])
def test_a_path_outside_the_folder_is_refused_before_it_is_read(
    model_copy: Path, outside: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bertrt import manifest as manifest_io

    if outside == "0-link":  # a symlink inside the folder that resolves outside it
        (model_copy / outside).symlink_to("/etc/passwd")
    target = Path("/etc/passwd")
    manifest = manifest_io.read(model_copy)
    manifest.files[outside] = {"sha256": manifest_io.sha256_file(target), "bytes": 1}
    manifest_io.write(model_copy, manifest)
    read = []
    monkeypatch.setattr(manifest_io, "sha256_file", lambda path, *a: read.append(path) or "")
    with pytest.raises(IntegrityError) as caught:
        bertrt.load(model_copy, device="cpu")
    assert f"{outside!r} points outside the model folder" in str(caught.value)
    assert str(target.stat().st_size) not in str(caught.value).split("points")[1]
    assert all(Path(p).resolve() != target for p in read), "refused before reading"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("task", "summarization", "task 'summarization' is not one this runtime serves"),
        ("labels", [], "labels must not be empty for task 'text-classification'"),
    ],
)
def test_a_folder_this_runtime_cannot_serve_is_refused_naming_the_manifest(
    model_copy: Path, field: str, value: object, message: str
) -> None:
    """Written by an exporter (its digest consistent), yet not servable here."""
    from bertrt import manifest as manifest_io

    manifest = manifest_io.read(model_copy)
    setattr(manifest, field, value)
    manifest_io.write(model_copy, manifest)
    with pytest.raises(IntegrityError) as caught:
        bertrt.load(model_copy, device="cpu", verify=False)
    assert message in str(caught.value) and "manifest.json" in str(caught.value)
