"""A lean HTTP/1.1 load client for loopback benchmarks: one keep-alive connection per client on
asyncio streams, the request bytes built once per body, the reply read by its Content-Length.

The server and its clients share the machine's cores in these benchmarks, so the client's own
cost per request is taken from the server: a general client (httpx) spends a few milliseconds of
CPU on each one, about as much as a short text's inference. This one does only what a benchmark
needs: POST a JSON body, read the status and the body, reconnect when the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit


class ProtocolError(RuntimeError):
    """The server's reply was not the HTTP/1.1 this client reads."""


class Connection:
    """One keep-alive connection to `url` (http only)."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r}: only http://host:port URLs are supported")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout_s = timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request(self, path: str, payload: Any) -> bytes:
        """The bytes of a POST of `payload` as JSON (build once, send many times)."""
        body = json.dumps(payload, ensure_ascii=False).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send one request built by `request`; return the status and the body."""
        return await asyncio.wait_for(self._send(raw), self.timeout_s)

    async def _send(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"not an HTTP status line: {lines[0]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise ProtocolError(f"reply without Content-Length (headers: {sorted(headers)})")
        body = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None
