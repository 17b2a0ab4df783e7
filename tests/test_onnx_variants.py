"""Optimised, fp16 and int8 variants: built, gated against PyTorch, shipped or recorded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import synthetic_reviews

from bertrt import manifest as manifest_io
from bertrt.api import load
from pipeline import tasks
from pipeline.export import gates, graphs, int8_search, model_folder, sessions, smoothing
from pipeline.export import variants as export_variants
from pipeline.export.options import ExportOptions

VARIANTS = ("fp32-optimized", "fp16", "int8", "int8-portable")
INT8 = ("int8", "int8-portable")
INT8_PRODUCTS = ("DynamicQuantizeMatMul", "MatMulInteger")
# Max |dlogit| each variant may show against PyTorch on the tiny model (its logits are ~1e-2).
ATOL = {"fp32": 1e-5, "fp32-optimized": 1e-5, "fp16": 1e-3, "int8": 5e-3, "int8-portable": 5e-3}


def _data(n: int = 48, seed: int = 1) -> tuple[list[str], list[int]]:
    rows = synthetic_reviews(n, seed=seed)
    return [r["text"] for r in rows], [0 if r["category"] == "fresh" else 1 for r in rows]


def _accuracy(labels: list[int]) -> Any:
    """The gate's score: accuracy of runtime outputs (one row per text) against `labels`."""
    return lambda windows, outputs: float((outputs.argmax(-1) == np.asarray(labels)).mean())


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    texts, labels = _data()
    out = tmp_path_factory.mktemp("variants") / "model"
    model_folder.build(
        tiny_model_dir,
        out,
        tasks.get("text-classification"),
        texts,
        ExportOptions(64, variants=VARIANTS, batch_size=16),
        score=_accuracy(labels),
    )
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tokenizer(_data()[0], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def test_every_variant_is_built_gated_and_shipped(variant_dir: Path) -> None:
    manifest = _manifest(variant_dir)
    assert sorted(manifest["variants"]) == ["fp16", "fp32", "fp32-optimized", *INT8]
    assert manifest["rejected_variants"] == {}
    for name in VARIANTS:
        entry = manifest["variants"][name]
        assert entry["shipped"] is True
        assert entry["file"] in manifest["files"]
        assert entry["gate"]["positions"] == 48
        assert entry["gate"]["agreement"] == 1.0
        assert entry["gate"]["metric_drop"] == 0.0
        assert entry["gate"]["provider"] == "CPUExecutionProvider"
        assert entry["gate"]["bytes"] == (variant_dir / entry["file"]).stat().st_size
        assert entry["gate"]["max_abs_logit_diff"] <= ATOL[name]
    assert manifest["variants"]["fp16"]["precision"] == "fp16"
    assert "CUDA fp16 kernels not exercised" in manifest["variants"]["fp16"]["gate"]["note"]
    # Both store weights in fewer bytes. On this tiny model the quantisation parameters and the
    # unfused graph's extra nodes weigh too much to order int8 against fp16.
    sizes = {n: manifest["files"][manifest["variants"][n]["file"]]["bytes"] for n in VARIANTS}
    assert sizes["int8"] < 0.75 * sizes["fp32-optimized"]
    assert sizes["int8-portable"] < 0.75 * sizes["fp32-optimized"]
    assert sizes["fp16"] < 0.75 * sizes["fp32-optimized"]


@pytest.mark.parametrize("variant", ["fp32", *VARIANTS])
def test_shipped_variant_matches_pytorch_through_the_runtime(
    variant_dir: Path, reference: np.ndarray, variant: str
) -> None:
    runtime = load(variant_dir, device="cpu", variant=variant)
    got = runtime.logits(_data()[0], batch_size=7)
    assert runtime.variant == variant
    np.testing.assert_allclose(got, reference, atol=ATOL[variant], rtol=0)
    assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_runtime_times_the_cpu_variants_and_keeps_the_fastest(variant_dir: Path) -> None:
    from bertrt.contract import CPU, CUDA, TENSORRT
    from bertrt.engine import choose_variant

    manifest = manifest_io.read(variant_dir)
    on_cpu = {n for n, e in manifest.variants.items() if CPU in e.providers}
    assert on_cpu == {"fp32", "fp32-optimized", *INT8}  # fp16 is CUDA's
    engine = load(variant_dir, device="cpu").engine
    assert set(engine.probe_s) == on_cpu
    from bertrt.engine import PROBE_MARGIN

    fastest = min(engine.probe_s, key=engine.probe_s.__getitem__)
    preferred = engine.probe_s["fp32-optimized"]
    expected = fastest if engine.probe_s[fastest] * PROBE_MARGIN < preferred else "fp32-optimized"
    assert engine.variant == expected
    assert load(variant_dir, device="cpu", variant="fp32").variant == "fp32", "asked: no probe"
    assert choose_variant(manifest, CUDA, None) == "fp16"
    assert choose_variant(manifest, CPU, None) == "fp32-optimized"
    # TensorRT parses no fused ONNX Runtime operators: it gets the plain graph.
    assert choose_variant(manifest, TENSORRT, None) == "fp32"


def test_the_probes_dropped_sessions_are_freed_without_a_garbage_collection(
    variant_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe drops every session it does not keep and only trims the heap: that holds only
    while an engine is in no reference cycle, so each dropped one must be gone with the cyclic
    collector switched off."""
    import gc
    import weakref

    from bertrt import engine as engine_module

    started: list[tuple[str, weakref.ref]] = []
    start = engine_module._start_variant

    def spy(*args: object, **kwargs: object) -> object:
        candidate = start(*args, **kwargs)
        if candidate is not None:
            started.append((candidate.variant, weakref.ref(candidate.session)))
        return candidate

    monkeypatch.setattr(engine_module, "_start_variant", spy)
    gc.disable()
    try:
        kept = load(variant_dir, device="cpu").engine
        alive = sorted(name for name, session in started if session() is not None)
    finally:
        gc.enable()
    assert len(started) >= 2, "the probe opened the other CPU variants"
    assert alive in ([], [kept.variant]), f"dropped sessions still alive: {alive}"


def test_int8_gated_with_exact_kernels_is_not_picked_where_they_saturate(
    variant_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from bertrt import engine as engine_module
    from bertrt.session import int8_kernels

    recorded = _manifest(variant_dir)["variants"]["int8"]["gated_int8_kernels"]
    assert recorded == int8_kernels()  # the export's own CPU
    copy = shutil.copytree(variant_dir, tmp_path / "model")
    manifest = manifest_io.read(copy)  # as if exported on a CPU with exact int8 kernels
    manifest.variants["int8"].gated_int8_kernels = "exact"
    manifest_io.write(copy, manifest)
    monkeypatch.setattr(engine_module, "int8_kernels", lambda: "saturating")
    probed = load(copy, device="cpu").engine.probe_s
    assert "int8" not in probed
    assert "int8-portable" in probed, "uint8 weights are summed exactly on every CPU"
    assert load(copy, device="cpu", variant="int8").variant == "int8", "pinned: used anyway"
    monkeypatch.setattr(engine_module, "int8_kernels", lambda: "exact")
    assert "int8" in load(copy, device="cpu").engine.probe_s


def test_int8_kernels_can_be_declared_where_cpuinfo_is_not_what_onnx_runtime_sees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bertrt import session

    session.int8_kernels.cache_clear()
    try:
        monkeypatch.setenv("BERTRT_INT8_KERNELS", "saturating")
        assert session.int8_kernels() == "saturating"
        session.int8_kernels.cache_clear()
        monkeypatch.setenv("BERTRT_INT8_KERNELS", "fast")
        with pytest.raises(ValueError, match=r"BERTRT_INT8_KERNELS='fast': use one of"):
            session.int8_kernels()
    finally:
        session.int8_kernels.cache_clear()
    with pytest.raises(ValueError, match=r"int8 weights 'int4'"):
        graphs.to_int8(Path("in.onnx"), Path("out.onnx"), weights="int4")


def test_int8_variants_store_the_weight_types_they_record(variant_dir: Path) -> None:
    variants = _manifest(variant_dir)["variants"]
    want = {"int8": onnx.TensorProto.INT8, "int8-portable": onnx.TensorProto.UINT8}
    for name, dtype in want.items():
        entry = variants[name]
        assert entry["int8_weights"] == onnx.helper.tensor_dtype_to_np_dtype(dtype).name
        graph = onnx.load(str(variant_dir / entry["file"])).graph
        # The weights the int8 matrix products read (embedding tables are only looked up).
        read = {n.input[1] for n in graph.node if n.op_type in INT8_PRODUCTS}
        assert read, name
        assert {i.data_type for i in graph.initializer if i.name in read} == {dtype}, name
    assert variants["int8-portable"]["gated_int8_kernels"] == "exact"


def test_manifest_sha256_covers_variant_files(variant_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = shutil.copytree(variant_dir, tmp_path / "model")
    with (copy / "model.int8.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(manifest_io.IntegrityError, match=r"model\.int8\.onnx: \d+ bytes"):
        load(copy, device="cpu", variant="int8")


def test_optimised_graphs_fuse_bert_with_the_config_heads(variant_dir: Path) -> None:
    variants = _manifest(variant_dir)["variants"]
    # 2 layers. The CPU graph (fp32-optimized, int8) fuses the layer norms (one for the
    # embeddings, 2 per layer) and GELUs, and leaves attention and the residual adds unfused.
    cpu_fused = {"LayerNormalization": 5, "BiasGelu": 2}
    assert variants["fp32-optimized"]["fused_operators"] == cpu_fused
    for name in INT8:
        assert variants[name]["fused_operators"] == variants["fp32-optimized"]["fused_operators"]
    cpu_ops = {n.op_type for n in onnx.load(str(variant_dir / "model.optimized.onnx")).graph.node}
    assert not cpu_ops & {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"}
    # The fp16 (CUDA) graph fuses everything: one embedding, 2 attentions, 2 GELUs, 2 skip-norms
    # per layer.
    assert variants["fp16"]["fused_operators"] == {
        "EmbedLayerNormalization": 1,
        "Attention": 2,
        "BiasGelu": 2,
        "SkipLayerNormalization": 4,
    }
    graph = onnx.load(str(variant_dir / "model.fp16.onnx")).graph
    heads = [
        onnx.helper.get_attribute_value(a)
        for node in graph.node
        if node.op_type == "Attention"
        for a in node.attribute
        if a.name == "num_heads"
    ]
    assert heads == [2, 2]
    assert not list(variant_dir.glob("*.tmp.onnx")), "the fp16 graph's fused source is removed"


def test_fp16_graph_keeps_fp32_inputs_and_outputs(variant_dir: Path) -> None:
    graph = onnx.load(str(variant_dir / "model.fp16.onnx")).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dtypes = {init.data_type for init in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes


def _negate_output(path: Path) -> None:
    """Corrupt a graph so that every predicted label flips: logits -> -logits."""
    model = onnx.load(str(path))
    graph = model.graph
    name = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{name}_raw" if out == name else out for out in node.output]
    graph.node.append(onnx.helper.make_node("Neg", [f"{name}_raw"], [name]))
    onnx.save(model, str(path))


def test_failing_variants_are_deleted_and_recorded(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_int8, real_open = graphs.to_int8, sessions.engine_on

    def corrupted_int8(src: Path, dst: Path, weights: str = "int8") -> None:
        real_int8(src, dst, weights=weights)
        _negate_output(dst)

    def no_fp16_on_cpu(base: Any, graph: Path, variant: str, device: str = "cpu") -> Any:
        if variant == "fp16" and device == "cpu":
            raise RuntimeError("no fp16 kernel for Attention")
        return real_open(base, graph, variant, device)

    monkeypatch.setattr(graphs, "to_int8", corrupted_int8)
    monkeypatch.setattr(sessions, "engine_on", no_fp16_on_cpu)
    texts, labels = _data()
    out = tmp_path / "model"
    model_folder.build(
        tiny_model_dir,
        out,
        tasks.get("text-classification"),
        texts,
        ExportOptions(64, variants=("fp16", "int8")),
        score=_accuracy(labels),
    )
    manifest = _manifest(out)
    rejected = manifest["rejected_variants"]
    assert sorted(manifest["variants"]) == ["fp32"]
    assert sorted(rejected) == ["fp16", "int8"]
    int8 = manifest["rejected_variants"]["int8"]
    assert int8["shipped"] is False
    assert int8["gate"]["passed"] is False
    assert int8["gate"]["agreement"] < 0.1
    assert int8["gate"]["reason"].startswith("agreement 0.0")
    fp16 = manifest["rejected_variants"]["fp16"]["gate"]
    assert fp16["reason"].startswith("not evaluated: no CUDA, and the CPU cannot run it")
    assert fp16["provider"] is None
    # Rejected files are gone, and so is the optimised graph that was only an intermediate.
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]
    assert sorted(manifest["files"]) == ["labels.json", "model.onnx", "tokenizer.json"]
    rows = gates.table({"rejected_variants": {k: v["gate"] for k, v in rejected.items()}})
    assert rows[1].startswith("fp16 ") and "no: not evaluated: no CUDA" in rows[1]
    assert re.match(r"int8 +0\.0\d{3} +-?0\.\d{4} +\d+\.\d +no: agreement 0\.0", rows[2])
    assert load(out, device="cpu").variant == "fp32"


GATE_CASES = [
    # logits argmax, reference argmax, labels, min_agreement, max_drop, passed, reason start
    ([0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], 0.995, 0.005, True, None),
    ([0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0], 0.75, 0.5, True, None),
    ([0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0], 0.995, 0.5, False, "agreement 0.7500 < 0.995"),
    ([0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0], 0.5, 0.2, False, "metric drop 0.2500 > 0.2"),
    # Disagreeing where PyTorch was wrong raises accuracy: no drop.
    ([0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1], 0.5, 0.0, True, None),
    ([0, 1, 1, 1], [0, 1, 1, 0], None, 0.75, 0.0, True, None),
]


@pytest.mark.parametrize(
    ("got", "want", "labels", "min_agreement", "max_drop", "passed", "reason"), GATE_CASES
)
def test_gate_table(
    got: list[int],
    want: list[int],
    labels: list[int] | None,
    min_agreement: float,
    max_drop: float,
    passed: bool,
    reason: str | None,
) -> None:
    onehot = np.eye(2, dtype=np.float32)
    mask = np.ones((len(got), 1), bool)
    score = None if labels is None else lambda out: float((out.argmax(-1) == labels).mean())
    result = gates.gate(onehot[got], onehot[want], mask, min_agreement, max_drop, score)
    assert result["passed"] is passed
    assert result.get("reason", "").startswith(reason or "")
    assert result["max_abs_logit_diff"] == (1.0 if got != want else 0.0)
    assert (result["metric_drop"] is None) is (labels is None)


def test_gate_reads_per_token_outputs_only_where_the_mask_is_set() -> None:
    reference = np.zeros((2, 3, 2), np.float32)
    reference[..., 0] = 1.0
    outputs = reference.copy()
    outputs[1, 2] = [0.0, 5.0]  # a padded position: ignored
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    result = gates.gate(outputs, reference, mask, 0.99, 0.0)
    assert result["positions"] == 5 and result["agreement"] == 1.0 and result["passed"]
    outputs[0, 1] = [0.0, 5.0]  # a real token whose tag flips
    result = gates.gate(outputs, reference, mask, 0.99, 0.0)
    assert result["label_disagreements"] == 1 and not result["passed"]


def test_gate_refuses_mismatched_shapes_and_records_empty_input() -> None:
    logits = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"outputs \(3, 2\) and reference \(2, 2\) differ"):
        gates.gate(logits, logits[:2], np.ones((3, 1), bool), 0.9, 0.1)
    empty = gates.gate(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 0), bool), 0.9, 0.1)
    assert empty == {
        "positions": 0,
        "passed": False,
        "reason": "not evaluated: nothing to gate on",
    }


def _calibrated_int8(
    tiny_model_dir: Path, out: Path, variants: tuple[str, ...] = ("int8",), **int8: float
) -> Path:
    """A folder with only int8 variants, tuned on calibration texts apart from the gate's."""
    texts, labels = _data(48, seed=1)
    calibration = [r["text"] for r in synthetic_reviews(40, seed=8)]
    options = ExportOptions(64, variants=variants, min_agreement=0.0, max_metric_drop=0.9, **int8)
    task = tasks.get("text-classification")
    model_folder.build(
        tiny_model_dir, out, task, texts, options, _accuracy(labels), calibration_texts=calibration
    )
    return out


# 1.01 cannot be reached (the tiny model's labels never flip): the search runs to its end.
# The exporting CPU's int8 kernels are set, to cover both kinds on any machine.
@pytest.mark.parametrize(
    ("target", "kernels"), [(0.5, "exact"), (1.01, "exact"), (1.01, "saturating")]
)
def test_int8_search_keeps_the_most_moving_nodes_in_fp32_and_records_them(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: float,
    kernels: str,
) -> None:
    """The search measures on calibration texts (not the gate's); what it kept in fp32 is in
    the manifest and is fp32 in the shipped graph."""
    monkeypatch.setattr(export_variants, "int8_kernels", lambda: kernels)
    out = _calibrated_int8(
        tiny_model_dir,
        tmp_path / "int8",
        INT8,
        int8_search_agreement=target,
        int8_sensitivity_rows=24,
    )
    manifest = _manifest(out)
    entries = {**manifest["variants"], **manifest["rejected_variants"]}
    entry, portable = entries["int8"], entries["int8-portable"]["search"]
    search = entry["search"]
    assert search["target"] == target and 0.0 <= search["all_int8_agreement"] <= 1.0
    if target == 0.5:  # reached with every node int8: nothing is measured further
        assert search["kept_fp32"] == [] and "mean_abs_logit_shift" not in search
        assert portable["kept_fp32"] == []
        return
    assert entry["gated_int8_kernels"] == kernels
    if kernels == "exact":  # int8-portable ranks the same nodes by int8's figures
        assert portable["shift_measured_on"] == "int8" and "mean_abs_logit_shift" not in portable
        figures = search["mean_abs_logit_shift"]  # rounded: ties may fall either way
        others = [v for n, v in figures.items() if n not in portable["kept_fp32"]]
        assert min(figures[n] for n in portable["kept_fp32"]) >= max(others, default=0.0)
    else:  # int8's figures include its saturation: int8-portable measures its own
        assert "shift_measured_on" not in portable
        assert set(portable["mean_abs_logit_shift"]) == set(search["mean_abs_logit_shift"])
    assert search["sensitivity_rows"] == 24  # of 40 calibration texts; agreement on all 40
    shifts = search["mean_abs_logit_shift"]
    kept = search["kept_fp32"]
    assert 1 <= len(kept) <= len(shifts) // 2
    rest = [shifts[name] for name in shifts if name not in kept]
    assert min(shifts[name] for name in kept) >= max(rest) - 1e-6, "the most moving go first"
    if entry.get("shipped"):
        graph = onnx.load(str(out / "model.int8.onnx"), load_external_data=False).graph
        ops = {node.name: node.op_type for node in graph.node}
        fp32 = ("MatMul", "Attention", "EmbedLayerNormalization", "Gemm", "Gather")
        # A Gemm is a MatMul (and an Add) once quantised: kept, that MatMul stays fp32.
        found = {n: ops.get(n, ops.get(f"{n}{graphs.GEMM_AS_MATMUL}")) for n in kept}
        assert all(op in fp32 for op in found.values()), found


# agreement by nodes kept (index 0: all int8), where the walk starts, the k found, the ks asked
FEWEST_CASES = [
    ([0.9, 0.95, 0.99, 0.999, 1.0], 1, 3, [1, 2, 3]),
    ([0.9, 0.95, 0.99, 0.999, 1.0], 2, 3, [2, 3]),
    ([0.9, 0.95, 0.99, 0.999, 1.0], 4, 3, [4, 3, 2]),
    ([0.9, 0.999, 0.999, 0.999, 1.0], 3, 1, [3, 2, 1]),
    ([0.9, 0.9, 0.9, 0.9, 0.99], 1, 4, [1, 2, 3, 4]),  # even half the nodes kept: not reached
    ([0.9, 0.9, 0.9, 0.9, 0.99], 4, 4, [4]),
    # Not monotone (a text or two either way): the first k that reaches, from the start.
    ([0.9, 0.95, 0.999, 0.99, 0.999], 1, 2, [1, 2]),
    ([0.9, 0.95, 0.999, 0.99, 0.999], 3, 4, [3, 4]),
    ([0.9, 0.999, 0.99, 0.999, 0.999], 4, 3, [4, 3, 2]),
]


@pytest.mark.parametrize(("agreements", "start", "found", "asked"), FEWEST_CASES)
def test_the_search_keeps_the_fewest_nodes_walking_one_at_a_time(
    agreements: list[float], start: int, found: int, asked: list[int]
) -> None:
    measured: list[int] = []

    def reaches(k: int) -> bool:
        measured.append(k)
        return agreements[k] >= 0.998

    assert int8_search.fewest(reaches, len(agreements) - 1, start) == found
    assert measured == asked


def test_the_margins_that_order_the_agreement_batches() -> None:
    """Int8 flips a label only where fp32's two best are close: the batches holding those run
    first, so a graph that misses the target is known from its first batches."""
    texts = np.array([[0.0, 3.0], [1.0, 1.1], [2.0, -2.0], [0.5, 0.0]])
    margins = int8_search.margins(texts, np.ones((4, 1), bool))
    assert margins.round(3).tolist() == [3.0, 0.1, 4.0, 0.5]
    assert int8_search.margins(np.array([[7.0, 1.0, 6.0]]), np.ones((1, 1), bool)) == [1.0]
    tokens = np.zeros((2, 3, 2))
    tokens[0] = [[0, 5], [0, 4], [0, 0.01]]  # its close call is a padded position
    tokens[1] = [[0, 1], [0, 2], [0, 3]]
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    assert int8_search.margins(tokens, mask).tolist() == [4.0, 1.0]


def test_the_sensitivity_sample_is_seeded_sorted_and_all_rows_when_not_smaller() -> None:
    picked = int8_search.sample_rows(100, 10, seed=42)
    assert len(set(picked.tolist())) == 10 and list(picked) == sorted(picked)
    assert list(picked) == list(int8_search.sample_rows(100, 10, seed=42))
    assert list(picked) != list(int8_search.sample_rows(100, 10, seed=43))
    assert list(int8_search.sample_rows(5, 0, seed=42)) == list(range(5))
    assert list(int8_search.sample_rows(5, 8, seed=42)) == list(range(5))


def _spread(peaks: np.ndarray) -> float:
    return float(peaks.max() / np.median(peaks))


def test_smoothing_keeps_the_fp32_outputs_and_evens_the_activation_channels(
    variant_dir: Path, tmp_path: Path
) -> None:
    """Outliers move from the activations into the weights: the smoothed graph computes the
    same logits, and what each MatMul now reads has flatter channels (measured, not assumed)."""
    from bertrt.engine import open_engine

    src = variant_dir / "model.optimized.onnx"
    engine = open_engine(variant_dir, device="cpu", variant="fp32-optimized", verify=False)
    windows = [w for per in engine.encode(_data(40, seed=3)[0]) for w in per]
    before, outputs, _ = smoothing.activation_ranges(engine, src, windows, 16)
    # 2 layers: Q/K/V share one input; attention output, FFN in and FFN out one each; plus the
    # classifier head's dense layer.
    assert len(before) >= 8
    dst = tmp_path / "smoothed.onnx"
    summary = smoothing.smooth(src, dst, before, alpha=0.75)
    assert summary["activations"] == len(before) and summary["alpha"] == 0.75
    want, _ = engine.infer(windows, 16)
    assert np.abs(outputs - want).max() < ATOL["fp32"]  # the measuring pass's outputs
    shutil.copy(dst, tmp_path / "model.optimized.onnx")
    for name in ("manifest.json", "tokenizer.json", "labels.json", "model.onnx"):
        shutil.copy(variant_dir / name, tmp_path / name)
    smoothed = open_engine(tmp_path, device="cpu", variant="fp32-optimized", verify=False)
    got, _ = smoothed.infer(windows, 16)
    assert np.abs(got - want).max() < ATOL["fp32"]
    after, _, _ = smoothing.activation_ranges(smoothed, dst, windows, 16)
    # The MatMuls now read the Mul outputs: each measured spread is the one the summary claims.
    assert set(after) == {f"{name}/smoothed" for name in before}
    assert np.median([_spread(p) for p in after.values()]) == pytest.approx(
        summary["max_over_median_after"], rel=1e-2
    )
    flatter = [_spread(after[f"{n}/smoothed"]) < _spread(before[n]) for n in before]
    assert sum(flatter) > len(flatter) / 2, "smoothing should flatten most activations"


def test_smoothing_leaves_a_shared_weight_alone(tmp_path: Path) -> None:
    """A weight read by two nodes (a tied embedding table) is not rescaled for one of them."""
    helper, tp = onnx.helper, onnx.TensorProto
    shared = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    own = onnx.numpy_helper.from_array(np.ones((3, 2), dtype=np.float32), "V")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="tied"),
            helper.make_node("Gather", ["W", "ids"], ["g"], name="lookup"),
            helper.make_node("MatMul", ["h", "V"], ["y"], name="own"),
        ],
        "g",
        [helper.make_tensor_value_info("x", tp.FLOAT, [1, 4]),
         helper.make_tensor_value_info("ids", tp.INT64, [1])],
        [helper.make_tensor_value_info("y", tp.FLOAT, [1, 2]),
         helper.make_tensor_value_info("g", tp.FLOAT, [1, 3])],
        [shared, own],
    )  # fmt: skip
    src = tmp_path / "g.onnx"
    onnx.save(
        helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]),
        str(src),
    )
    assert set(smoothing._smoothable(onnx.load(str(src)).graph)) == {"h"}
    dst = tmp_path / "s.onnx"
    summary = smoothing.smooth(src, dst, {"h": np.array([8.0, 1.0, 1.0])}, alpha=0.5)
    assert summary["activations"] == 1
    out = onnx.load(str(dst)).graph
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in out.initializer}
    np.testing.assert_array_equal(weights["W"], onnx.numpy_helper.to_array(shared))
    assert not np.array_equal(weights["V"], np.ones((3, 2)))
    import onnxruntime as ort

    x = np.array([[1.0, -2.0, 0.5, 3.0]], dtype=np.float32)
    feeds = {"x": x, "ids": np.array([1])}
    run = [ort.InferenceSession(str(p)).run(None, feeds) for p in (src, dst)]
    np.testing.assert_allclose(run[1][0], run[0][0], rtol=1e-5)


def test_smoothed_int8_is_recorded_and_its_source_removed(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    out = _calibrated_int8(tiny_model_dir, tmp_path / "int8", int8_smooth_alpha=0.6)
    texts = _data(48, seed=1)[0]
    entry = _manifest(out)["variants"]["int8"]
    assert entry["smoothing"]["alpha"] == 0.6 and entry["smoothing"]["activations"] >= 8
    assert entry["search"] is None
    ops = [n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node]
    assert ops.count("Mul") >= entry["smoothing"]["activations"]
    assert not list(out.glob("*.tmp.onnx")) and not (out / "model.optimized.onnx").exists()
    got = load(out, device="cpu", variant="int8").predict(texts)
    fp32 = load(out, device="cpu", variant="fp32").predict(texts)
    agree = np.mean([a.label == b.label for a, b in zip(got, fp32, strict=True)])
    assert agree >= 0.9


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_a_load_without_cuda_never_opens_the_cuda_only_graph(
    variant_dir: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bertrt import engine as engine_module
    from bertrt.contract import CPU, VARIANTS

    cuda_only = {v.file for v in VARIANTS.values() if CPU not in v.providers}
    assert cuda_only & {e.file for e in manifest_io.read(variant_dir).variants.values()}
    opened: list[str] = []
    start = engine_module.start_session

    def recording(path: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(path.name)
        return start(path, *args, **kwargs)

    monkeypatch.setattr(engine_module, "start_session", recording)
    monkeypatch.setattr(engine_module, "cuda_possible", lambda: False)
    load(variant_dir, device=device)
    assert opened and not set(opened) & cuda_only, opened
