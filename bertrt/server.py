"""HTTP serving of a predictor: FastAPI with body and batch limits, run by uvicorn; the request
and response schemas are built from what the predictor declares (its OPTIONS and RESULT)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    model_validator,
)

from bertrt import __version__
from bertrt.batcher import Batcher, DeadlineExceeded, Overloaded
from bertrt.long_text import TextTooLong
from bertrt.predictors import Predictor
from bertrt.predictors.base import Doc, Option

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _integral(value: Any) -> Any:
    """2.0 is the integer 2 in JSON Schema (and to JavaScript clients); 2.5 and "2" are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(ge: int | None = None, le: int | None = None) -> Any:
    """A strict integer in [ge, le] (no "2" for 2, no true for 1) that takes JSON's 2.0; the
    bounds come before the validator, so that the schema states them as minimum/maximum."""
    return Annotated[int, Field(strict=True, ge=ge, le=le), BeforeValidator(_integral)]


class TextsRequest(BaseModel):
    """What every request model shares: no unknown keys, and a bare list taken as the texts."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def bare_list(cls, data: Any) -> Any:
        """Accept `["a", "b"]` as `{"texts": ["a", "b"]}`; explain a body that was not JSON."""
        if isinstance(data, str | bytes):
            raise ValueError(f"{NOT_JSON}; send it with Content-Type: application/json")
        return {"texts": data} if isinstance(data, list) else data


def option_field(option: Option, maximum: int | None) -> tuple[Any, Any]:
    """The request field of one predict() option: its type, bounds or choices, and default."""
    strict: dict[str, Any] = {}
    if option.type is int:
        annotation = integer(option.minimum, maximum)
    elif option.choices:
        annotation = Literal[option.choices]
    else:
        annotation = option.type
        strict = {"strict": True}  # true, not 1 or "true"; a string, not a number
    if option.default is None:
        annotation = annotation | None
    return annotation, Field(default=option.default, description=option.help, **strict)


def request_model(predictor: Predictor) -> type[BaseModel]:
    """The body of POST /predict: the texts, and the predictor's options with what this model
    accepts stated in the schema (`top_k` capped at its label count, texts that must hold the
    mask token of a fill-mask model)."""
    texts: Any = list[str]
    mask = getattr(predictor, "mask_token", None)
    if mask:
        texts = list[Annotated[str, Field(pattern=re.escape(mask))]]
    fields: dict[str, Any] = {"texts": (texts, Field(description=predictor.TEXTS))}
    for option in predictor.OPTIONS:
        maximum = len(predictor.labels) if option.maximum_labels else option.maximum
        fields[option.name] = option_field(option, maximum)
    example = "".join(f', "{o.name}": {json.dumps(o.default)}' for o in predictor.OPTIONS)
    what = predictor.TEXTS[:1].upper() + predictor.TEXTS[1:]
    return create_model(
        f"{predictor.SCHEMA_NAME}Request",
        __base__=TextsRequest,
        __doc__=f'{what}: `{{"texts": [...]{example}}}`, or a bare JSON list of strings.',
        **fields,
    )


def _response_type(hint: Any) -> Any:
    """`hint` with each TypedDict in it, in lists or not, made a pydantic model."""
    if is_typeddict(hint):
        return record_model(hint)
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        return list[_response_type(item)]
    return hint


@cache
def record_model(record: type) -> type[BaseModel]:
    """The pydantic model of a result TypedDict, named as it is: its `Doc`s the descriptions,
    its NotRequired keys optional (left out of responses, which exclude None)."""
    fields: dict[str, Any] = {}
    # The hints, not __required_keys__: under `from __future__ import annotations` Python 3.11
    # counts a NotRequired key as required there.
    for name, hint in get_type_hints(record, include_extras=True).items():
        required, description = True, None
        while get_origin(hint) in (NotRequired, Annotated):
            if get_origin(hint) is NotRequired:
                required, (hint,) = False, get_args(hint)
            else:
                hint, *extras = get_args(hint)
                description = next((e.text for e in extras if isinstance(e, Doc)), description)
        annotation = _response_type(hint)
        if required:
            fields[name] = (annotation, Field(description=description))
        else:
            fields[name] = (annotation | None, Field(default=None, description=description))
    return create_model(record.__name__, **fields)


def response_model(predictor: Predictor) -> type[BaseModel]:
    """The body POST /predict answers with: the predictor's RESULT per text, variant, provider."""
    return create_model(
        f"{predictor.SCHEMA_NAME}Response",
        predictions=(list[record_model(predictor.RESULT)], ...),
        variant=(str, ...),
        provider=(str, ...),
    )


class Health(BaseModel):
    status: str
    variant: str
    provider: str


class Problem(BaseModel):
    detail: str


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether declared or streamed, and
    bodies not received within `timeout_s` (a client sending a byte a second) with 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, receive, send, int(declared))
            return
        # Chunked bodies carry no length: read up to the limit, then hand the body on.
        chunks, size, more = [], 0, True
        until = time.monotonic() + self.timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), until - time.monotonic())
            except TimeoutError:
                detail = f"the request body was not received within {self.timeout_s:g} s"
                await JSONResponse({"detail": detail}, status_code=408)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self.refuse(scope, receive, send, None)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        got = f"{size} bytes" if size is not None else "more bytes"
        detail = f"request body of {got} is over the limit of {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


@dataclass(frozen=True)
class Batching:
    """How requests share runs (bertrt.batcher.Batcher): gather for at most `max_wait_ms` or
    until `max_texts` texts wait; at most `max_queue` texts wait (then 503 with Retry-After);
    a request not answered in `deadline_s` gets 504. `max_texts=1` runs each request alone."""

    max_texts: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 2048
    deadline_s: float = 30.0


class BearerAuth:
    """Every path but /health needs `Authorization: Bearer <token>` (401 otherwise)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credentials = given.partition(b" ")
        # The scheme is case-insensitive (RFC 7235 section 2.1); the token is compared in
        # constant time.
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
            await self.app(scope, receive, send)
            return
        reply = JSONResponse(
            {"detail": "missing or wrong bearer token; send Authorization: Bearer <token>"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await reply(scope, receive, send)


def create_app(
    predictor: Predictor,
    max_body_bytes: int = 1 << 20,
    max_batch: int = 256,
    batch_size: int = 32,
    max_concurrency: int = 2,
    batching: Batching | None = None,
    token: str | None = None,
    body_timeout_s: float = 10.0,
) -> FastAPI:
    """The HTTP API over one loaded predictor.

    Args:
        max_body_bytes: larger request bodies get 413.
        max_batch: requests with more texts get 413.
        max_concurrency: inferences running at once in worker threads; ONNX Runtime sessions are
            thread-safe, and each run already uses every intra-op thread it was given.
        batching: how concurrent requests are gathered into shared runs (`Batching()`).
        token: when given, every path but /health needs `Authorization: Bearer <token>`.
        body_timeout_s: a request body not received within this long gets 408.
    """
    if max_body_bytes <= 0 or max_batch <= 0 or max_concurrency <= 0:
        raise ValueError("max_body_bytes, max_batch and max_concurrency must be > 0")
    batching = batching or Batching()
    batcher = Batcher(
        partial(predictor.predict, batch_size=batch_size),
        max_texts=batching.max_texts,
        max_wait_ms=batching.max_wait_ms,
        max_queue=batching.max_queue,
        deadline_s=batching.deadline_s,
        workers=max_concurrency,
    )
    meta = predictor.metadata()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "serving %s: %s variant on %s, max body %d bytes, max batch %d, %s",
            predictor.folder,
            predictor.variant,
            predictor.provider,
            max_body_bytes,
            max_batch,
            batching,
        )
        await batcher.start()
        yield
        await batcher.stop()  # what is queued is answered first

    app = FastAPI(
        title="bertrt",
        version=__version__,
        summary=f"{meta['task']} over {meta['labels']}",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    if token:
        app.add_middleware(BearerAuth, token=token)
    too_large = {
        413: {"model": Problem, "description": "body, batch or a text's windows over the limit"}
    }

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """400 for a body that is not JSON, else 422 naming each field; the offending input is
        echoed JSON-safe (NaN, Infinity and 1e400 are valid to Python's parser, not to JSON)."""
        errors = [_json_safe(error) for error in jsonable_encoder(exc.errors())]
        if any(e["type"] == "json_invalid" or NOT_JSON in str(e["msg"]) for e in errors):
            return JSONResponse({"detail": f"{NOT_JSON}; {SEND_JSON}"}, status_code=400)
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/health")
    async def health() -> Health:
        """The server is up and its model is loaded."""
        return Health(status="ok", variant=predictor.variant, provider=predictor.provider)

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        """Labels, variant, provider and the metrics recorded in the model's manifest."""
        return {**meta, "shipped_variants": sorted(predictor.manifest.variants)}

    body_model = request_model(predictor)

    async def predict(request: BaseModel) -> dict[str, Any]:
        """The model's prediction per text (a label, entities, or fills), in the order sent;
        the body is the object, or just the list of texts."""
        if len(request.texts) > max_batch:
            raise HTTPException(
                413,
                f"{len(request.texts)} texts in one request, the limit is {max_batch}; "
                "split the batch",
            )
        options = request.model_dump(exclude={"texts"}, exclude_none=True)
        try:
            # Gathered with other requests' texts; run in a worker thread, so the event loop
            # keeps serving while ONNX Runtime computes.
            predictions = await batcher.submit(request.texts, **options)
        except TextTooLong as exc:  # past max_windows, or no word break near an end
            raise HTTPException(413, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except Overloaded as exc:
            raise HTTPException(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except DeadlineExceeded as exc:
            raise HTTPException(504, str(exc)) from None
        return {
            "predictions": [p.as_dict() for p in predictions],
            "variant": predictor.variant,
            "provider": predictor.provider,
        }

    # The body's schema depends on the task, so the annotation is set before FastAPI reads it.
    predict.__annotations__["request"] = body_model
    # The bare list takes what the object's texts take (a fill-mask text must hold the mask).
    texts = body_model.model_json_schema()["properties"]["texts"]
    body_schema: dict[str, Any] = {
        "anyOf": [
            {"$ref": f"#/components/schemas/{body_model.__name__}"},
            {"type": "array", "items": texts["items"], "description": "just the texts"},
        ]
    }
    app.post(
        "/predict",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            }
        },
        response_model=response_model(predictor),
        response_model_exclude_none=True,
        responses={
            **too_large,
            400: {"model": Problem, "description": "the body is not JSON (or not UTF-8)"},
            # FastAPI's own default, listed for the fields' messages; non-finite numbers too.
            408: {"model": Problem, "description": "the body was not received in time"},
            422: {"description": "malformed request"},
            503: {"model": Problem, "description": "queue full; retry after Retry-After s"},
            504: {"model": Problem, "description": "not answered within the deadline"},
        },
    )(predict)
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the body as declared: the request object or a bare list
        (FastAPI also puts a `$ref` beside the `anyOf`, which forbids the list)."""
        if app.openapi_schema is None:
            schema = generated()
            content = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
            content["application/json"]["schema"] = body_schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


NOT_JSON = "the body was not read as JSON"
SEND_JSON = 'send a JSON object or list with Content-Type: application/json, e.g. ["a text"]'


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats as strings ("NaN", "Infinity"), the message saying so."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        safe = {k: _json_safe(v) for k, v in value.items()}
        if "input" in value and value["input"] != safe["input"] and "msg" in safe:
            safe["msg"] = f"{safe['msg']}; got {safe['input']}: send a finite JSON number"
        return safe
    return value


def serve(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_body_bytes: int = 1 << 20,
    max_batch: int = 256,
    batch_size: int = 32,
    max_concurrency: int = 2,
    batching: Batching | None = None,
    token: str | None = None,
    max_connections: int = 512,
    header_timeout_s: float = 10.0,
) -> None:
    """Run the API with uvicorn until interrupted (SIGTERM finishes in-flight requests).

    Binds loopback unless `host` says otherwise; another address is logged as a warning, and
    without `token` (`BERTRT_API_TOKEN`) anyone who reaches it may call it. Past
    `max_connections` open connections new ones get 503; idle keep-alive connections close
    after 5 s, and a connection whose request headers take longer than `header_timeout_s` is
    closed (a slow-loris client cannot hold a connection)."""
    import uvicorn

    if not _is_loopback(host):
        log.warning(
            "listening on %s: reachable from other machines, %s",
            host,
            "bearer token required" if token else "WITHOUT authentication (set BERTRT_API_TOKEN)",
        )
    app = create_app(
        predictor, max_body_bytes, max_batch, batch_size, max_concurrency, batching, token
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=logging.getLogger().level or logging.INFO,
        limit_concurrency=max_connections,
        http=header_deadline(header_timeout_s),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,
    )


def header_deadline(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline on each request's headers, from the connection's
    start or the end of the previous response. uvicorn has none: a client sending a header line
    a second held its connection for ever, and enough of them locked everyone else out (503)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request on this connection gets the same time
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: what it resolves to
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False
