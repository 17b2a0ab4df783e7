"""The HTTP server, through a real HTTP client against uvicorn on a loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, NotRequired, TypedDict, get_origin, get_type_hints

import httpx
import pytest
import uvicorn
from conftest import synthetic_reviews

import bertrt
from bertrt.contract import MANIFEST_FILE
from bertrt.predictors import FILL_MASK, REGISTRY, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION
from bertrt.predictors.base import Doc, Option
from bertrt.predictors.text_classification import TextClassifier
from bertrt.server import create_app

MAX_BODY = 4096
MAX_BATCH = 8
METRICS = {"accuracy": 0.875, "macro_f1": 0.86}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, onnx_model_dir: Path) -> TextClassifier:
    """The exported model with evaluation metrics recorded in its manifest."""
    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(onnx_model_dir, folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "metrics": METRICS}))
    return bertrt.load(folder, device="cpu")


@pytest.fixture(scope="module")
def url(model: TextClassifier) -> Iterator[str]:
    """Base URL of the app served by uvicorn in a thread on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    app = create_app(model, max_body_bytes=MAX_BODY, max_batch=MAX_BATCH)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as session:
        yield session


def expected(model: TextClassifier, texts: list[str], top_k: int | None = None) -> list[dict]:
    return [p.as_dict() for p in model.predict(texts, top_k=top_k)]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-6)


def test_health(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "variant": response.json()["variant"],
        "provider": "CPUExecutionProvider",
    }


def test_metadata_carries_labels_and_manifest_metrics(
    client: httpx.Client, model: TextClassifier
) -> None:
    meta = client.get("/metadata").json()
    assert meta["labels"] == ["fresh", "rotten"]
    assert meta["metrics"] == METRICS
    assert (meta["variant"], meta["provider"]) == (model.variant, "CPUExecutionProvider")
    assert meta["shipped_variants"] == sorted(model.manifest.variants)


def test_a_lone_surrogate_gets_422_naming_the_text(client: httpx.Client) -> None:
    body = '{"texts": ["fine", "\\ud800"]}'
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "text 1 cannot be tokenised" in response.json()["detail"]


def test_predict_object_body(client: httpx.Client, model: TextClassifier) -> None:
    texts = ["a brilliant charming film", "", "tedious and clumsy " * 20]
    response = client.post("/predict", json={"texts": texts})
    assert response.status_code == 200
    body = response.json()
    assert (body["variant"], body["provider"]) == (model.variant, "CPUExecutionProvider")
    assert_same(body["predictions"], expected(model, texts))
    assert all("top_k" not in p for p in body["predictions"])


def test_predict_bare_list_with_top_k_object(client: httpx.Client, model: TextClassifier) -> None:
    texts = ["fun", "weak"]
    bare = client.post("/predict", json=texts).json()["predictions"]
    assert_same(bare, expected(model, texts))
    ranked = client.post("/predict", json={"texts": texts, "top_k": 2}).json()["predictions"]
    for got, want in zip(ranked, expected(model, texts, top_k=2), strict=True):
        assert [e["label"] for e in got["top_k"]] == [e["label"] for e in want["top_k"]]
        assert got["top_k"][0]["score"] == pytest.approx(got["score"])


def test_empty_batch(client: httpx.Client) -> None:
    assert client.post("/predict", json={"texts": []}).json()["predictions"] == []


def test_twenty_concurrent_requests_get_their_own_answers(url: str, model: TextClassifier) -> None:
    batches = [
        [r["text"] for r in synthetic_reviews(1 + i % MAX_BATCH, seed=i)] for i in range(20)
    ]

    def post(texts: list[str]) -> list[dict]:
        with httpx.Client(base_url=url, timeout=60) as session:
            response = session.post("/predict", json={"texts": texts})
        assert response.status_code == 200, response.text
        return response.json()["predictions"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(post, batches))
    for texts, got in zip(batches, answers, strict=True):
        assert_same(got, expected(model, texts))


MALFORMED = [
    (b'{"texts": "one string"}', "list_type", ["body", "texts"]),
    (b'{"texts": ["fine", 7]}', "string_type", ["body", "texts", 1]),
    (b'["fine", null]', "string_type", ["body", "texts", 1]),
    (b'{"text": ["fine"]}', "missing", ["body", "texts"]),
    (b'{"texts": ["fine"], "top_k": "2"}', "int_type", ["body", "top_k"]),
    (b'{"texts": ["fine"], "top_k": 0}', "greater_than_equal", ["body", "top_k"]),
    (b"42", "model_attributes_type", ["body"]),
]


@pytest.mark.parametrize(("body", "error_type", "loc"), MALFORMED)
def test_malformed_body_is_422_naming_the_problem(
    client: httpx.Client, body: bytes, error_type: str, loc: list
) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(e["type"] == error_type and e["loc"] == loc for e in errors), errors
    assert all(e["msg"] for e in errors)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b"this is not json", "application/json"), (b'["fine"]', "text/plain")],
)
def test_a_body_that_is_not_json_is_400_as_the_schema_says(
    client: httpx.Client, body: bytes, content_type: str
) -> None:
    response = client.post("/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("the body was not read as JSON; send a JSON")
    documented = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["responses"]
    assert "not JSON" in documented["400"]["description"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b'{"texts": ["a"], "top_k": NaN}', ["body", "top_k"]),
        (b'{"texts": ["a"], "top_k": 1e400}', ["body", "top_k"]),
        (b"[Infinity]", ["body", "texts", 0]),
        (b'{"texts": [-Infinity]}', ["body", "texts", 0]),
    ],
)
def test_non_finite_numbers_are_422_naming_the_field(
    client: httpx.Client, body: bytes, loc: list
) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == loc and "send a finite JSON number" in error["msg"]


def test_the_published_body_schema_takes_the_object_and_the_bare_list(
    client: httpx.Client,
) -> None:
    body = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert set(schema) == {"anyOf"}, "nothing beside the anyOf (a $ref there forbids the list)"
    kinds = [option.get("type") or option["$ref"].rsplit("/", 1)[-1] for option in schema["anyOf"]]
    assert kinds == ["PredictRequest", "array"]
    assert client.post("/predict", json=["fine"]).status_code == 200


def test_top_k_over_the_label_count_is_422(client: httpx.Client) -> None:
    response = client.post("/predict", json={"texts": ["x"], "top_k": 3})
    assert response.status_code == 422
    assert "less than or equal to 2" in json.dumps(response.json())
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]
    assert schema["properties"]["top_k"]["anyOf"][0]["maximum"] == 2, "the bound is stated"


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    body = json.dumps({"texts": ["x" * MAX_BODY]})
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"request body of {len(body)} bytes is over the limit of {MAX_BODY} bytes"
    }


def test_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"texts": ["'
        for _ in range(6):
            yield b"y" * 1000
        yield b'"]}'

    response = client.post("/predict", content=chunks())
    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"request body of more bytes is over the limit of {MAX_BODY} bytes"
    )


def test_batch_over_the_limit_is_413(client: httpx.Client) -> None:
    response = client.post("/predict", json={"texts": ["a"] * (MAX_BATCH + 1)})
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"{MAX_BATCH + 1} texts in one request, the limit is {MAX_BATCH}; "
        "split the batch"
    }
    assert client.post("/predict", json=["a"] * MAX_BATCH).status_code == 200


def test_openapi_schema_describes_the_api(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/metadata"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["PredictRequest"]
    assert request["required"] == ["texts"]
    assert request["properties"]["texts"]["items"] == {"type": "string"}
    assert "413" in schema["paths"]["/predict"]["post"]["responses"]


def test_create_app_rejects_nonpositive_limits(model: TextClassifier) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        create_app(model, max_body_bytes=0)


def test_a_request_past_the_queue_limit_gets_503_with_retry_after(model: TextClassifier) -> None:
    from fastapi.testclient import TestClient

    from bertrt.server import Batching

    app = create_app(model, batching=Batching(max_queue=2))
    with TestClient(app) as local:
        reply = local.post("/predict", json={"texts": ["a", "b", "c"]})
        assert reply.status_code == 503
        assert int(reply.headers["retry-after"]) >= 1
        assert "limit 2" in reply.json()["detail"]
        assert local.post("/predict", json={"texts": ["a", "b"]}).status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_logs_provider_and_answers(onnx_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "bertrt", "serve", "--model", str(onnx_model_dir)]
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                *argv,
                "--device",
                "cpu",
                "--port",
                str(port),
                "--max-batch",
                "3",
                "--gather-ms",
                "700",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError(log.read_text()) from None
                time.sleep(0.1)
        assert health.json()["provider"] == "CPUExecutionProvider"
        over = httpx.post(f"http://127.0.0.1:{port}/predict", json=["a"] * 4, timeout=10)
        assert over.status_code == 413
        # SIGTERM while a request waits 0.7 s to be gathered: it is still answered.
        replies: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: replies.append(
                httpx.post(f"http://127.0.0.1:{port}/predict", json=["good"], timeout=20)
            )
        )
        sender.start()
        time.sleep(0.3)
        process.terminate()
        sender.join(timeout=20)
        assert [r.status_code for r in replies] == [200]
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=20)
    assert "on CPUExecutionProvider, max body 1048576 bytes, max batch 3" in log.read_text()


def test_token_classification_server_returns_entities_and_says_so(ner_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from bertrt.api import load
    from bertrt.server import create_app

    app = create_app(load(ner_dir, device="cpu"))
    with TestClient(app) as client:
        text = "诸葛亮 在 成都 met bob"
        response = client.post("/predict", json={"texts": [text], "tokens": True})
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        for item in prediction["entities"] + prediction["tokens"]:
            assert text[item["start"] : item["end"]] == item["text"]
        bad = client.post("/predict", json={"texts": ["a"], "aggregation": "longest"})
        assert bad.status_code == 422 and "aggregation" in bad.text
        refused = client.post("/predict", json={"texts": ["a"], "top_k": 2})
        assert refused.status_code == 422
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert {"TagRequest", "TagResponse", "EntityOut"} <= set(schema)
        assert "PredictRequest" not in schema


def test_a_token_guards_every_path_but_health(model: TextClassifier) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(model, token="s3cret")) as local:
        assert local.get("/health").status_code == 200
        refused = local.post("/predict", json={"texts": ["good"]})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in refused.json()["detail"]
        wrong = {"Authorization": "Bearer nope"}
        assert local.post("/predict", json={"texts": ["good"]}, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert local.post("/predict", json={"texts": ["good"]}, headers=right).status_code == 200
        for scheme in ("bearer", "BEARER", "bEaReR"):  # case-insensitive (RFC 7235)
            header = {"Authorization": f"{scheme} s3cret"}
            assert local.post("/predict", json=["good"], headers=header).status_code == 200
        assert (
            local.post(
                "/predict", json=["good"], headers={"Authorization": "Basic s3cret"}
            ).status_code
            == 401
        )
        assert local.get("/metadata", headers=right).status_code == 200


@contextlib.contextmanager
def served(config: uvicorn.Config) -> Iterator[int]:
    """The port of `config`'s app served by uvicorn in a thread on loopback, until exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_a_body_sent_a_byte_at_a_time_is_cut_off_and_others_are_served(
    model: TextClassifier,
) -> None:
    app = create_app(model, body_timeout_s=1.0)
    with served(uvicorn.Config(app, log_level="warning")) as port:
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as other:
            assert other.post("/predict", json={"texts": ["good"]}).status_code == 200
        reply = b""
        for _ in range(20):  # a byte every 0.2 s until the server answers
            try:
                slow.sendall(b" ")
            except OSError:
                break
            slow.settimeout(0.2)
            try:
                reply += slow.recv(4096)
            except TimeoutError:
                continue
            if reply:
                break
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert time.monotonic() - started < 4
        slow.close()


def test_binding_another_address_without_a_token_is_a_warning() -> None:
    from bertrt.server import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("no-such-host.invalid")


def test_a_flood_of_slow_header_connections_is_cut_off_and_others_are_served(
    model: TextClassifier,
) -> None:
    """Forty clients send a header line every 0.2 s, past a limit of 16 connections: within
    the header deadline they are closed, and a normal client is answered."""
    from bertrt.server import header_deadline

    config = uvicorn.Config(
        create_app(model), log_level="error", limit_concurrency=16, http=header_deadline(1.0)
    )
    slow = []
    with served(config) as port, contextlib.ExitStack() as sockets:
        for _ in range(40):
            conn = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            slow.append(conn)
        started, status = time.monotonic(), None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as other:
            while time.monotonic() - started < 6 and status != 200:
                for conn in slow:  # the flood keeps trickling
                    with contextlib.suppress(OSError):
                        conn.sendall(b"X-Slow: 1\r\n")
                status = other.post("/predict", json={"texts": ["good"]}).status_code
                time.sleep(0.2)
        assert status == 200, "a normal client is served once the slow ones are cut off"
        assert time.monotonic() - started < 4
        closed = 0
        for conn in slow:
            conn.settimeout(2)
            try:
                closed += conn.recv(1024) == b""
            except OSError:
                closed += 1
        assert closed == len(slow), f"{len(slow) - closed} slow connections still open"


# The model folder fixture of each registered task.
TASK_FOLDERS = {
    TEXT_CLASSIFICATION: "onnx_model_dir",
    TOKEN_CLASSIFICATION: "ner_dir",
    FILL_MASK: "fill_dir",
}


@pytest.mark.parametrize("task", sorted(REGISTRY))
def test_each_task_is_served_with_the_schemas_its_predictor_declares(
    task: str, request: pytest.FixtureRequest
) -> None:
    predictor = bertrt.load(request.getfixturevalue(TASK_FOLDERS[task]), device="cpu")
    cls = REGISTRY[task]
    schemas = create_app(predictor).openapi()["components"]["schemas"]
    body = schemas[f"{cls.SCHEMA_NAME}Request"]
    assert list(body["properties"]) == ["texts", *(o.name for o in cls.OPTIONS)]
    assert body["properties"]["texts"]["description"] == cls.TEXTS
    for option in cls.OPTIONS:
        field = body["properties"][option.name]
        assert (field["description"], field.get("default")) == (option.help, option.default)
        if option.choices:
            assert field["enum"] == list(option.choices)
    predictions = schemas[f"{cls.SCHEMA_NAME}Response"]["properties"]["predictions"]
    record = schemas[cls.RESULT.__name__]
    assert predictions["items"] == {"$ref": f"#/components/schemas/{cls.RESULT.__name__}"}
    hints = get_type_hints(cls.RESULT, include_extras=True)
    assert list(record["properties"]) == list(hints)
    optional = {key for key, hint in hints.items() if get_origin(hint) is NotRequired}
    assert set(record["required"]) == set(hints) - optional


class EchoOut(TypedDict):
    text: Annotated[str, Doc("the text, upper-cased on request")]
    length: NotRequired[int]


@dataclass(frozen=True)
class Echoed:
    text: str

    def as_dict(self) -> EchoOut:
        return {"text": self.text}


class Echo:
    """A task the runtime lacks, declared in one class: served without a change to the server."""

    task = "echo"
    OPTIONS = (Option("shout", bool, default=False, help="upper-case the texts"),)
    RESULT = EchoOut
    TEXTS = "texts to echo"
    SCHEMA_NAME = "Echo"
    variant, provider, folder, labels = "fp32", "CPUExecutionProvider", Path("echo"), []
    manifest = SimpleNamespace(variants={"fp32": {}})

    def predict(self, texts: Sequence[str], batch_size: int = 32, shout: bool = False) -> list:
        return [Echoed(t.upper() if shout else t) for t in texts]

    def metadata(self) -> dict[str, Any]:
        return {"task": self.task, "labels": self.labels}


def test_a_new_predictor_gets_its_request_and_response_schemas() -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(Echo())) as local:
        shouted = local.post("/predict", json={"texts": ["hi"], "shout": True})
        assert shouted.json() == {
            "predictions": [{"text": "HI"}],
            "variant": "fp32",
            "provider": "CPUExecutionProvider",
        }
        assert local.post("/predict", json=["hi"]).json()["predictions"] == [{"text": "hi"}]
        for bad, error in [({"shout": "yes"}, "bool_type"), ({"top_k": 2}, "extra_forbidden")]:
            refused = local.post("/predict", json={"texts": ["hi"], **bad})
            assert refused.status_code == 422
            assert [e["type"] for e in refused.json()["detail"]] == [error]
        schemas = local.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["EchoRequest"]["properties"]["shout"] == {
        "type": "boolean",
        "title": "Shout",
        "default": False,
        "description": "upper-case the texts",
    }
    assert schemas["EchoOut"]["required"] == ["text"]
    text = schemas["EchoOut"]["properties"]["text"]
    assert text["description"] == "the text, upper-cased on request"
