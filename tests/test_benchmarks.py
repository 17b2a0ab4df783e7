"""The benchmarks' report sections and a CPU run on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, synthetic_reviews

from benchmarks import cpu, gpu, report

DOC = "# Benchmarks\n\nIntro.\n\n## CPU\n\nold numbers\n\n## GPU\n\ngpu numbers\n"


@pytest.mark.parametrize(
    ("doc", "heading", "expected"),
    [
        (DOC, "CPU", "# Benchmarks\n\nIntro.\n\n## CPU\n\nnew\n\n## GPU\n\ngpu numbers\n"),
        (DOC, "GPU", "# Benchmarks\n\nIntro.\n\n## CPU\n\nold numbers\n\n## GPU\n\nnew\n"),
        ("# Benchmarks\n", "CPU", "# Benchmarks\n\n## CPU\n\nnew\n"),
        ("", "GPU", "# Benchmarks\n\n## GPU\n\nnew\n"),
        # A heading that merely starts with the name is another section.
        ("## CPU notes\n\nkeep\n", "CPU", "## CPU notes\n\nkeep\n\n## CPU\n\nnew\n"),
    ],
)
def test_replace_section(doc: str, heading: str, expected: str) -> None:
    assert report.replace_section(doc, heading, "new\n") == expected


def test_table_formats_numbers_and_gaps() -> None:
    rows = [{"backend": "a", "x": 1.23456, "y": None}, {"backend": "b", "x": 1234.5, "y": 3}]
    assert report.table(rows, {"backend": "name", "x": "X", "y": "Y"}) == (
        "| name | X | Y |\n|---|---|---|\n| a | 1.235 | – |\n| b | 1234.5 | 3 |\n"
    )


def test_cpu_benchmark_on_the_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, onnx_model_dir: Path
) -> None:
    test = tmp_path / "test.parquet"
    pd.DataFrame(synthetic_reviews(40, seed=5)).to_parquet(test)
    docs, out_json = tmp_path / "docs" / "benchmarks.md", tmp_path / "bench_cpu.json"
    docs.parent.mkdir()
    docs.write_text(DOC, encoding="utf-8")
    argv = [
        *("--model-dir", str(onnx_model_dir), "--finetuned", str(tiny_model_dir)),
        *("--test", str(test), "--out", str(docs), "--json", str(out_json)),
        *("--latency-texts", "10", "--batch-sizes", "32", "--threads", "1"),
    ]
    assert cpu.main(argv) == 0
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert sorted(data["results"]) == ["ort fp32", "pytorch"]
    assert data["texts"] == 40 and data["latency_texts"] == 10 and data["threads"] == 1
    ort = data["results"]["ort fp32"]
    assert ort["agreement"] == 1.0
    assert ort["ratio_32"] == pytest.approx(
        ort["texts_per_s_32"] / data["results"]["pytorch"]["texts_per_s_32"]
    )
    assert 0 < ort["p50_ms"] <= ort["p95_ms"] <= ort["p99_ms"]
    text = docs.read_text(encoding="utf-8")
    assert "old numbers" not in text and "## GPU\n\ngpu numbers\n" in text
    assert "| ort fp32 |" in text and "python -m benchmarks.cpu --model-dir" in text


def test_gpu_benchmark_exits_with_the_reason_without_cuda(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    argv = [
        *("--model-dir", "m", "--finetuned", "f", "--test", "t.parquet"),
        *("--out", str(tmp_path / "b.md"), "--json", str(tmp_path / "b.json")),
    ]
    with pytest.raises(SystemExit, match=r"benchmarks\.gpu: no CUDA device visible to torch"):
        gpu.main(argv)
    assert not (tmp_path / "b.md").exists()


def test_the_masked_lm_step_benchmark_compares_the_two_heads_on_one_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from benchmarks import train_mlm

    out = tmp_path / "benchmarks.md"
    assert (
        train_mlm.main(
            [
                "--model",
                str(tiny_model_dir),
                "--batch-size",
                "4",
                "--length",
                "16",
                "--steps",
                "1",
                "--out",
                str(out),
                "--json",
                str(tmp_path / "train_mlm.json"),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "## Masked-LM training step (CPU)" in text and "masked positions only" in text
    losses = [float(x) for x in re.findall(r"Loss on it: ([0-9.]+) .* and ([0-9.]+) ", text)[0]]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the same loss, less work


def test_pseudo_reviews_join_one_movies_snippets_of_one_label_in_a_seeded_order() -> None:
    from benchmarks.long_documents import documents

    rows = pd.DataFrame(synthetic_reviews(90, seed=7))
    rows["movie_name"] = [f"m{i % 4}" for i in range(90)]
    built = documents(rows, "text", "category", "movie_name", 5, seed=1)
    assert built.equals(documents(rows, "text", "category", "movie_name", 5, seed=1))
    assert not built.equals(documents(rows, "text", "category", "movie_name", 5, seed=2))
    source = {(r.movie_name, r.text): r.category for r in rows.itertuples()}
    for doc in built.itertuples():
        parts = [t for (movie, t), label in source.items() if movie == doc.group and t in doc.text]
        assert {source[(doc.group, t)] for t in parts} == {doc.label}
        assert len(parts) >= 2  # at least half of 5 snippets (rounded down)
    assert len(built) >= 90 // 5 - 8  # at most one short piece per (movie, label) dropped


def test_long_document_benchmark_on_the_tiny_model(tmp_path: Path, onnx_model_dir: Path) -> None:
    from conftest import write_params

    from benchmarks import long_documents

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = synthetic_reviews(240, seed=8)
    for name, part in (("train", rows[:120]), ("validation", rows[120:180]), ("test", rows[180:])):
        pd.DataFrame(part).to_parquet(raw / f"{name}.parquet")
    params = write_params(tmp_path, {"ingest.drop_labels": []})
    out, out_json = tmp_path / "benchmarks.md", tmp_path / "long.json"
    argv = ["--raw", str(raw), "--params", str(params), "--model-dir", str(onnx_model_dir)]
    argv += ["--snippets", "6", "--out", str(out), "--json", str(out_json)]
    assert long_documents.main(argv) == 0
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert len(data["readings"]) == len(long_documents.READINGS)
    windows = {r["reading"]: r["windows"] for r in data["readings"]}
    assert windows["truncate"] == 1.0 and windows["windows, stride 32, mean"] >= 1.0
    assert 0.0 <= data["tfidf"]["accuracy"] <= 1.0
    assert "## Long documents (CPU)" in out.read_text(encoding="utf-8")


@pytest.mark.slow
def test_serving_benchmark_runs_both_modes_on_loopback(
    tmp_path: Path, onnx_model_dir: Path
) -> None:
    from benchmarks import serving

    test = tmp_path / "test.parquet"
    pd.DataFrame(synthetic_reviews(40, seed=9)).to_parquet(test)
    out, out_json = tmp_path / "benchmarks.md", tmp_path / "serving.json"
    argv = ["--model-dir", str(onnx_model_dir), "--test", str(test), "--clients", "4"]
    argv += ["--seconds", "1", "--threads", "1", "--out", str(out), "--json", str(out_json)]
    assert serving.main(argv) == 0
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert len(data["results"]) == 2
    for values in data["results"].values():
        assert values["requests"] > 0 and values["server_errors"] == 0
        assert 0 < values["p50_ms"] <= values["p99_ms"]
    bound = data["ceiling"]
    assert bound["one_per_s"] > 0 and bound["grouped_per_s"] > 0
    assert bound["ratio"] == pytest.approx(bound["grouped_per_s"] / bound["one_per_s"])
    if bound["ratio"] > 1:
        gain = (data["ratio"] - 1) / (bound["ratio"] - 1)
        assert data["share_of_gain"] == pytest.approx(gain)
    text = out.read_text(encoding="utf-8")
    assert "## Serving (CPU, HTTP on loopback)" in text and "Ceiling, measured first" in text


def test_encoder_training_flops_match_torchs_count_of_a_training_step() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertForSequenceClassification

    from benchmarks import measure

    config = BertConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=160,
        num_labels=3,
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(config)
    lengths = [7, 19, 33]
    counted = 0
    for length in lengths:  # one text per step: no padding for either count
        ids = torch.randint(5, 120, (1, length))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=torch.tensor([1])).loss.backward()
        counted += counter.get_total_flops()
    ours = measure.encoder_training_flops(config, lengths, num_labels=3)
    assert ours == pytest.approx(counted, rel=1e-9)
    # Quadratic in length: one text of 66 tokens costs more than two of 33.
    assert measure.encoder_training_flops(config, [66], 3) > measure.encoder_training_flops(
        config, [33, 33], 3
    )


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", None),
        ("NVIDIA A10", 125.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_bf16_peak_is_looked_up_by_the_most_specific_name(name: str, peak: float | None) -> None:
    from benchmarks import measure

    assert measure.bf16_peak_tflops(name) == peak


def test_gpu_training_benchmark_exits_with_the_reason_without_cuda(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from benchmarks import train_cls

    argv = ["--device", "cuda", "--validated", str(tmp_path), "--out", str(tmp_path / "b.md")]
    with pytest.raises(SystemExit, match=r"--device cuda: no CUDA device visible to torch"):
        train_cls.main([*argv, "--json", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.md").exists()


@pytest.fixture(scope="module")
def gpu_variants_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with the two variants the GPU benchmark runs."""
    from pipeline import tasks
    from pipeline.export import model_folder
    from pipeline.export.options import ExportOptions

    out = tmp_path_factory.mktemp("gpu-variants") / "model"
    texts = [r["text"] for r in synthetic_reviews(48, seed=3)]
    options = ExportOptions(64, variants=("fp32-optimized", "fp16"), batch_size=16)
    model_folder.build(tiny_model_dir, out, tasks.get("text-classification"), texts, options)
    return out


def test_fixed_length_texts_have_exactly_that_many_tokens(gpu_variants_dir: Path) -> None:
    from tokenizers import Tokenizer

    texts = [r["text"] for r in synthetic_reviews(30, seed=4)]
    made = gpu.fixed_length_texts(texts, gpu_variants_dir, 40, 25)
    assert len(made) == 25
    tokenizer = Tokenizer.from_file(str(gpu_variants_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    assert {len(tokenizer.encode(t).ids) for t in made} == {40}
    assert all(len(t) > max(map(len, texts)) // 2 for t in made)  # joined, not one short text


def test_gpu_benchmark_harness_runs_on_the_cpu(
    tmp_path: Path, tiny_model_dir: Path, gpu_variants_dir: Path
) -> None:
    test = tmp_path / "test.parquet"
    pd.DataFrame(synthetic_reviews(40, seed=7)).to_parquet(test)
    out, out_json = tmp_path / "b.md", tmp_path / "b.json"
    data = gpu.run(
        gpu_variants_dir,
        tiny_model_dir,
        test,
        out,
        out_json,
        batch_sizes=(1, 8),
        batches=2,
        device="cpu",
        fixed_batch_sizes=(1, 4),
        model_only_batch_sizes=(2, 4),
        model_only_runs=2,
    )
    backends = ["ort cpu fp16", "ort cpu fp32-optimized", "pytorch fp32", "pytorch fp16"]
    backends += ["pytorch bf16"]
    assert sorted({r["backend"] for r in data["results"]}) == sorted(backends)
    assert data["fixed_tokens"] == 64 and data["fixed_texts"] > 0
    for workload, sizes in (("test texts", [1, 8]), ("64 tokens", [1, 4])):
        rows = [r for r in data["results"] if r["workload"] == workload]
        assert len(rows) == len(backends) * len(sizes)
        for row in rows:
            assert row["texts_per_s"] > 0 and 0.0 <= row["agreement"] <= 1.0
            if row["backend"] == "pytorch fp32":
                assert row["agreement"] == 1.0 and row["ratio"] == 1.0
    model_only = data["model_only"]
    assert len(model_only) == len(backends) * 2
    assert all(r["sequences_per_s"] > 0 for r in model_only)
    text = gpu.markdown(data)
    assert "### 64 tokens" in text and "### The model alone, 64 tokens" in text
    assert not out.exists() and not out_json.exists()  # a CPU run writes no GPU section


LEAF7 = r"""
#include <stdio.h>
int main(void) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    printf("avx2=%u avx512f=%u avx512_vnni=%u amx_int8=%u\n",
           (b >> 5) & 1, (b >> 16) & 1, (c >> 11) & 1, (d >> 25) & 1);
    return 0;
}
"""


def test_isa_hides_avx512_vnni_and_amx_from_cpuid_and_keeps_avx2(tmp_path: Path) -> None:
    """What a program reads from CPUID under `benchmarks.isa avx2`, compared with without it;
    Python with numpy and ONNX Runtime runs under it, and the benchmarks leave the hidden
    flags out of what they report."""
    import subprocess
    import sys

    from benchmarks import isa

    reason = isa.unavailable()
    if reason:
        pytest.skip(reason)
    source, probe = tmp_path / "leaf7.c", tmp_path / "leaf7"
    source.write_text(LEAF7)
    subprocess.run(["cc", "-O2", "-o", str(probe), str(source)], check=True)

    def read(env: dict[str, str] | None = None) -> dict[str, int]:
        out = subprocess.run([str(probe)], env=env, capture_output=True, text=True, check=True)
        return {k: int(v) for k, v in (f.split("=") for f in out.stdout.split())}

    native = read()
    if not native["avx512f"]:
        pytest.skip("this CPU has no AVX-512 to hide")
    hidden = read(isa.environment())
    assert hidden == {**native, "avx512f": 0, "avx512_vnni": 0, "amx_int8": 0}
    # numpy reads CPUID itself when it loads; the runtime is told which int8 kernels it gets.
    code = (
        "import numpy, onnxruntime; from numpy._core._multiarray_umath import __cpu_features__;"
        "from bertrt.session import int8_kernels;"
        "a = numpy.ones((64, 64), numpy.float32); assert (a @ a)[0, 0] == 64;"
        "print(__cpu_features__['AVX512F'], __cpu_features__['AVX2'], int8_kernels())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=isa.environment(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True", "saturating"]


def test_the_overhead_benchmark_runs_the_tokenize_stage_on_its_data(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from conftest import write_params, write_splits

    from benchmarks import overhead
    from pipeline.core import params
    from pipeline.stages import validate

    rows = synthetic_reviews(60, seed=8)
    raw = write_splits(
        tmp_path / "raw", {"train": rows[:40], "validation": rows[40:50], "test": rows[50:]}
    )
    overrides = {"base.model": str(tiny_model_dir), "base.max_length": 16}
    params_path = write_params(tmp_path, {**overrides, "base.label_column": "category"})
    validated = tmp_path / "validated"
    reports = (tmp_path / "v.json", tmp_path / "f.json")
    validate.run(raw, params.load(params_path), validated, *reports)
    rates = overhead.tokenize_rates(validated, params_path)
    assert rates["texts"] == 60
    assert rates["stage_texts_per_s"] > 0 and rates["batched_texts_per_s"] > 0


def test_synthetic_rows_follow_the_real_texts_and_keep_distinct(tmp_path: Path) -> None:
    from benchmarks import data_stages

    texts = [f"{w} plot and a {w} cast" for w in ("dull", "fine", "warm", "cold")] * 10
    train = pd.DataFrame({"text": texts, "label": ["fresh", "rotten"] * 20})
    validated = tmp_path / "validated"
    validated.mkdir()
    train.to_parquet(validated / "train.parquet")
    csv = data_stages.synthetic_csv(tmp_path / "d.csv", 450, validated)
    table = pd.read_csv(csv)
    assert list(table.columns) == ["category", "text", "movie_name"] and len(table) == 450
    assert (table["text"].str.split().str.len() == 6).all(), "word counts from the real texts"
    vocabulary = {w for t in texts for w in t.split()}
    assert set(" ".join(table["text"]).split()) <= vocabulary
    assert table["text"].nunique() > 440, "texts are distinct, so deduplication keeps them"
    assert set(table["category"]) == {"fresh", "rotten"}
    assert table["movie_name"].nunique() == 45
    again = pd.read_csv(data_stages.synthetic_csv(tmp_path / "e.csv", 450, validated))
    assert again.equals(table), "seeded"


@pytest.mark.slow
def test_the_data_stage_benchmark_runs_each_stage_and_reads_its_peak(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from conftest import write_params

    from benchmarks import data_stages

    validated = tmp_path / "validated"
    validated.mkdir()
    validated_rows = pd.DataFrame(synthetic_reviews(60, seed=3))
    validated_rows.rename(columns={"category": "label"}).to_parquet(validated / "train.parquet")
    overrides = {"base.model": str(tiny_model_dir), "base.max_length": 16}
    params_path = write_params(tmp_path, {**overrides, "base.label_column": "category"})
    out, json_path = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = ["--validated", str(validated), "--params", str(params_path), "--rows", "300"]
    assert data_stages.main([*argv, "--out", str(out), "--json", str(json_path)]) == 0
    record = json.loads(json_path.read_text(encoding="utf-8"))
    (row,) = record["results"]
    assert row["rows"] == 300
    for stage in ("ingest", "validate", "tokenize"):
        assert row[stage]["seconds"] > 0 and row[stage]["peak_rss_mib"] > 50, stage
        assert "failed" not in row[stage], row[stage].get("output_tail")
    assert "| 300 |" in out.read_text(encoding="utf-8")
    # An earlier checkout (here: this one) runs on the same CSV in the same run and has its
    # own table; a stage that fails is recorded with its exit, and the stages after it are not
    # run.
    (tmp_path / "broken").mkdir()
    broken = write_params(tmp_path / "broken", {**overrides, "base.label_column": "nothing"})
    argv = ["--validated", str(validated), "--params", str(broken), "--rows", "200"]
    argv += ["--before", str(REPO), "--out", str(out), "--json", str(tmp_path / "b.json")]
    assert data_stages.main(argv) == 0
    again = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    (failed,) = again["results"]
    for found in (failed, failed["before"]):
        assert found["ingest"]["failed"] == "exit code 1"
        assert "nothing" in found["ingest"]["output_tail"]
        assert "validate" not in found and "tokenize" not in found
    assert again["before_commit"] == again["commit"]
    text = out.read_text(encoding="utf-8")
    assert text.count("| 200 |") == 2 and text.count("exit code 1 after") == 2
    assert f"in the same run, through commit {again['before_commit']}" in text


@pytest.mark.slow
def test_the_memory_benchmark_reads_each_processs_own_peak(
    tmp_path: Path, onnx_model_dir: Path
) -> None:
    from benchmarks import memory

    out, out_json = tmp_path / "benchmarks.md", tmp_path / "memory.json"
    argv = ["--model-dir", str(onnx_model_dir), "--words-chars", "2000000"]
    argv += ["--cjk-chars", "500000", "--clients", "3", "--server-chars", "100000"]
    assert memory.main([*argv, "--out", str(out), "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text(encoding="utf-8"))
    rows = {(row["model"], row["text"]): row for row in data["predict"]}
    # The tiny folder ships fp32 only, so there is no int8 row.
    assert len(rows) == 3 and all(row["exit_code"] == 0 for row in rows.values())
    small = rows["default variant", "three words"]
    for text in ("words", "cjk"):
        big = rows["default variant", text]
        assert big["chars"] == (2_000_000 if text == "words" else 500_000)
        # Tokenizing a text whole costs about 190 bytes a character; the runtime reads its ends.
        assert big["peak_rss_mb"] - small["peak_rss_mb"] < 25 * big["utf8_mb"], (big, small)
    served = data["server"]
    assert served["statuses"] == {"200": 3}
    assert served["peak_rss_after_mb"] >= served["peak_rss_ready_mb"] > 0
    assert "## Memory of long texts (CPU)" in out.read_text(encoding="utf-8")
