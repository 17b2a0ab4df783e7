"""`python -m bertrt batch`: real Dask clusters on 127.0.0.1 score a table into Parquet parts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

pytest.importorskip("distributed")

from conftest import REPO, synthetic_reviews

import bertrt
from bertrt import cli
from bertrt.batch import result_columns, result_layout
from bertrt.predictors.text_classification import TextClassifier

# 4,000 texts in 8 files here; the killed-worker test scores 20,000.
TEXTS = 4000
FILES = 8


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return [r["text"] for r in synthetic_reviews(TEXTS, seed=7)]


@pytest.fixture(scope="module")
def expected(onnx_model_dir: Path, reviews: list[str]) -> list[dict[str, object]]:
    return [p.as_dict() for p in bertrt.load(onnx_model_dir).predict(reviews, 32)]


def write_csvs(folder: Path, texts: list[str]) -> str:
    """The texts in FILES CSV files (a partition each); the glob that names them."""
    folder.mkdir()
    size = len(texts) // FILES
    for i in range(FILES):
        chunk = texts[i * size : (i + 1) * size]
        pd.DataFrame({"text": chunk}).to_csv(folder / f"reviews-{i}.csv", index=False)
    return str(folder / "reviews-*.csv")


def read_parts(folder: Path) -> pd.DataFrame:
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(FILES)]  # no .tmp left behind
    return pd.concat([pd.read_parquet(folder / n) for n in names], ignore_index=True)


def batch(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, int]:
    assert cli.main(["batch", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_local_cluster_scores_every_row_once_and_a_rerun_writes_only_missing_parts(
    tmp_path: Path,
    onnx_model_dir: Path,
    reviews: list[str],
    expected: list[dict[str, object]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = write_csvs(tmp_path / "in", reviews)
    out = tmp_path / "out"
    args = ["--model", str(onnx_model_dir), "--input", source, "--output", str(out)]

    summary = batch(capsys, *args, "--local", "2")

    assert summary == {"partitions": FILES, "written": FILES, "skipped": 0, "rows_written": TEXTS}
    got = read_parts(out)
    assert got["row"].tolist() == list(range(TEXTS))  # every row once, in input order
    assert got["label"].tolist() == [e["label"] for e in expected]
    assert got["score"].tolist() == pytest.approx([e["score"] for e in expected], abs=1e-5)

    # A crash that left part 3 unwritten (and a stray temporary file): only part 3 is redone.
    (out / "part-00003.parquet").unlink()
    (out / ".part-00003.parquet.dead.tmp").write_bytes(b"half")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    time.sleep(0.01)

    summary = batch(capsys, *args, "--local", "1")

    assert summary == {
        "partitions": FILES,
        "written": 1,
        "skipped": FILES - 1,
        "rows_written": 500,
    }
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert {n: after[n] for n in before} == before
    assert read_parts(out).equals(got)  # the stray temporary file is gone too


@dataclass
class Cluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]

    def processes(self) -> list[psutil.Process]:
        """The scheduler, the workers' nannies and the worker processes they started."""
        found = []
        for proc in [self.scheduler, *self.workers]:
            try:
                top = psutil.Process(proc.pid)
                found += [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return found


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A `dask scheduler` and two one-thread `dask worker` processes, all on 127.0.0.1; each
    worker in its own process group, so a test can kill one whole (nanny and worker)."""
    file = tmp_path / "scheduler.json"
    # --no-dashboard alone still leaves an HTTP server (health, metrics) on 0.0.0.0.
    http = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    common = ["--host", "127.0.0.1", *http, "--scheduler-file", str(file)]
    worker = ["--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1", *http]
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0", *common],
        cwd=REPO,
    )
    workers: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for _ in range(2):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", address, *worker],
                    cwd=REPO,
                    start_new_session=True,
                )
            )
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)
            hosts = {w.split("://")[1].split(":")[0] for w in client.scheduler_info()["workers"]}
        assert hosts == {"127.0.0.1"}
        yield Cluster(address, scheduler, workers)
    finally:
        # Killed, not asked to close: a worker's graceful close waits seconds for a scheduler
        # that is going away too, and nothing after a test needs the cluster's state.
        for proc in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        scheduler.kill()
        for proc in [*workers, scheduler]:
            proc.wait()


def sockets_of(pids: set[int]) -> list[tuple[str, str]]:
    """(local, peer) address of every TCP socket the processes `pids` hold, from `ss -tnp`."""
    out = subprocess.run(["ss", "-Htnap"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            fields = line.split()
            found.append((fields[3], fields[4]))
    return found


@pytest.mark.slow
def test_scheduler_address_scores_a_jsonl_folder_with_ids_and_options(
    tmp_path: Path,
    cluster: Cluster,
    onnx_model_dir: Path,
    reviews: list[str],
    expected: list[dict[str, object]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    size = TEXTS // FILES
    for i in range(FILES):
        rows = [{"id": f"r{n}", "body": reviews[n]} for n in range(i * size, (i + 1) * size)]
        (source / f"{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"

    summary = batch(
        capsys,
        *["--model", str(onnx_model_dir), "--input", str(source), "--output", str(out)],
        *["--scheduler", cluster.address, "--text-column", "body", "--id-column", "id"],
        *["--top-k", "2"],
    )

    assert summary["rows_written"] == TEXTS
    got = read_parts(out)
    assert sorted(got["id"], key=lambda s: int(s[1:])) == [f"r{n}" for n in range(TEXTS)]
    got = got.set_index("id").loc[[f"r{n}" for n in range(TEXTS)]]
    assert got["label"].tolist() == [e["label"] for e in expected]
    top = [json.loads(t) for t in got["top_k"]]
    assert [t[0]["label"] for t in top] == [e["label"] for e in expected]
    assert all(len(t) == 2 for t in top)


def test_result_columns_keep_scalars_and_write_nested_values_as_json() -> None:
    results = [
        {"label": "fresh", "score": 0.9, "top_k": [{"label": "fresh", "score": 0.9}]},
        {"label": "rotten", "score": 0.6, "top_k": [{"label": "rotten", "score": 0.6}]},
    ]
    layout = result_layout(TextClassifier, {"top_k": 1})
    assert layout == {"label": "string", "score": "float64", "top_k": "string"}
    columns = {key: list(values) for key, values in result_columns(results, layout).items()}
    assert columns == {
        "label": ["fresh", "rotten"],
        "score": [0.9, 0.6],
        "top_k": ['[{"label": "fresh", "score": 0.9}]', '[{"label": "rotten", "score": 0.6}]'],
    }
    assert list(result_layout(TextClassifier, {})) == ["label", "score"]


def test_an_empty_partition_is_written_with_the_columns_and_dtypes_of_the_others(
    tmp_path: Path, onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    pd.DataFrame({"text": ["a warm funny film", "dull"]}).to_parquet(source / "0.parquet")
    pd.DataFrame({"text": pd.Series([], dtype="string")}).to_parquet(source / "1.parquet")
    out = tmp_path / "out"
    args = ["--model", str(onnx_model_dir), "--input", str(source), "--output", str(out)]

    summary = batch(capsys, *args, "--local", "1", "--top-k", "2")

    assert summary["partitions"] == 2 and summary["rows_written"] == 2
    full, empty = (pd.read_parquet(out / f"part-{i:05d}.parquet") for i in range(2))
    assert len(empty) == 0
    assert list(empty.columns) == list(full.columns) == ["row", "label", "score", "top_k"]
    assert dict(empty.dtypes) == dict(full.dtypes)
    both = pd.read_parquet(out)  # one dataset: the parts' schemas agree
    assert both["row"].tolist() == [0, 1]


def test_a_missing_column_is_named_with_the_columns_there(
    tmp_path: Path, onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.csv"
    pd.DataFrame({"review": ["good film"]}).to_csv(source, index=False)
    args = ["batch", "--model", str(onnx_model_dir), "--input", str(source)]

    assert cli.main([*args, "--output", str(tmp_path / "out"), "--local", "1"]) == 1

    err = capsys.readouterr().err
    assert "no column ['text'] (columns: ['review'])" in err
    assert "--text-column" in err


def test_without_dask_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, onnx_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.delitem(sys.modules, "bertrt.batch", raising=False)
    args = ["--model", str(onnx_model_dir), "--input", "x.csv", "--output", "out"]

    assert cli.main(["batch", *args]) == 1

    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "[dask] extra" in err and "pip install 'dask[dataframe]' distributed" in err


def test_the_runtime_does_not_import_dask() -> None:
    code = (
        "import sys, bertrt, bertrt.cli; print(sorted({'dask', 'distributed'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_no_row_and_repeats_none_all_on_loopback(
    tmp_path: Path, cluster: Cluster, onnx_model_dir: Path
) -> None:
    """20,000 texts in 40 files on the scheduler and two workers; one worker (nanny and process)
    is killed once the first parts are written: the scheduler gives its tasks to the other, the
    job ends with every row once, equal to `bertrt predict` row by row; no process of the job
    holds a socket to anything but 127.0.0.1."""
    texts = [r["text"] for r in synthetic_reviews(20_000, seed=13)]
    expected = [p.as_dict() for p in bertrt.load(onnx_model_dir).predict(texts, 32)]
    source = tmp_path / "in"
    source.mkdir()
    files = 40
    size = len(texts) // files
    for i in range(files):
        chunk = texts[i * size : (i + 1) * size]
        pd.DataFrame({"text": chunk}).to_csv(source / f"reviews-{i:02d}.csv", index=False)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bertrt", "batch", "--model", str(onnx_model_dir)]
    argv += ["--input", str(source / "reviews-*.csv"), "--output", str(out)]
    job = subprocess.Popen(
        [*argv, "--scheduler", cluster.address],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed_at, sockets = None, []
    try:
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            written = len(list(out.glob("part-*.parquet"))) if out.is_dir() else 0
            pids = {p.pid for p in cluster.processes()} | {job.pid}
            sockets += sockets_of(pids)
            if killed_at is None and written >= 2:
                os.killpg(cluster.workers[1].pid, signal.SIGKILL)
                killed_at = written
            time.sleep(0.05)
        stdout, stderr = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, stderr[-3000:]
    assert killed_at is not None and killed_at < files, "the worker died before the job ended"
    assert cluster.workers[1].wait(timeout=20) == -signal.SIGKILL
    assert json.loads(stdout)["rows_written"] == len(texts)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(files)]
    got = pd.concat([pd.read_parquet(out / n) for n in names], ignore_index=True)
    assert got["row"].tolist() == list(range(len(texts)))
    assert got["label"].tolist() == [e["label"] for e in expected]
    assert got["score"].tolist() == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert sockets, "ss saw the job's sockets"
    # A listening socket's peer is a wildcard; every address that is one must be loopback.
    outside = {
        (local, peer)
        for local, peer in sockets
        if not local.startswith("127.0.0.1:")
        or (peer not in ("0.0.0.0:*", "*:*") and not peer.startswith("127.0.0.1:"))
    }
    assert not outside, f"sockets off loopback: {sorted(outside)[:5]}"
