"""The served model under a minute of mixed load from concurrent clients, and the OpenAPI
contract checked by schemathesis: bounded in requests and time, loopback only."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import synthetic_reviews

from benchmarks import load
from benchmarks.serving import Server

pytestmark = pytest.mark.slow


def test_ten_thousand_mixed_requests_get_no_5xx_and_memory_stays_flat(
    onnx_model_dir: Path, tmp_path: Path
) -> None:
    texts = [r["text"] for r in synthetic_reviews(200, seed=4)] + ["x" * 3000, "好" * 400]
    server = Server(onnx_model_dir, 1, [])
    with server as url:
        result = asyncio.run(
            load.soak(url, server.process.pid, texts, clients=32, warmup=1000, requests=10000)
        )
    (tmp_path / "load.json").write_text(json.dumps(result, indent=2))
    print(
        load.markdown(
            {
                **result,
                "command": "tests/test_server_load.py",
                "machine": {"cpu": "this machine", "cpu_flags": []},
            }
        )
    )
    assert result["finished_in_time"], result
    assert result["statuses"] == {"200": 10000}, result["statuses"]
    # Flat: after the warm-up, the server's resident memory moves by allocator noise only.
    assert abs(result["rss_growth_mib"]) < 20 and result["rss_spread_mib"] < 30, result["rss_mib"]


@pytest.mark.parametrize("task", ["text-classification", "token-classification", "fill-mask"])
def test_schemathesis_finds_no_contract_gap(
    task: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """`st run` against the server's own /openapi.json: every response matches the schema,
    no 5xx, no undocumented status; a fixed number of examples per operation, for each task's
    request and response models."""
    folder = {"text-classification": "onnx_model_dir", "token-classification": "ner_dir"}
    with Server(request.getfixturevalue(folder.get(task, "fill_dir")), 1, []) as url:
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "60",
                "--seed",
                "1",
                "--no-color",
                "--request-timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # its example cache goes here, not into the repo
        )
    output = done.stdout + done.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    assert done.returncode == 0, output[-6000:]
