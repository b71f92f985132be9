"""Sending bodies over HTTP without letting a client pin the server: Range requests (pure), and
writes that give up on a client that stops reading.

Every body goes out in `CHUNK_BYTES` pieces; a piece that cannot be handed to the kernel within
`stall_timeout_s` (the client stopped reading, so the socket buffer never drains) aborts the
connection. That is also the slowest reader served: CHUNK_BYTES per stall_timeout_s (256 KiB per
30 s by default, under 9 kB/s). No torch, no hivemind.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

CHUNK_BYTES = 256 << 10
_RANGE = re.compile(r"^bytes=([0-9]{0,18})-([0-9]{0,18})$")  # ASCII digits, at most 18 of them


class StalledError(ConnectionError):
    """The client stopped reading; the connection was aborted."""


@dataclass(frozen=True)
class Span:
    """Bytes `start`..`end` (inclusive) of a file; `partial` means 206 with Content-Range."""

    start: int
    end: int
    partial: bool

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def byte_span(header: str | None, size: int) -> tuple[Span | None, str]:
    """What to send of a `size`-byte file for a Range header: (span, "") or (None, why not) for a
    416. One range only, `bytes=A-`, `bytes=A-B` or a suffix `bytes=-N`; numbers are ASCII digits
    (no '²'), at most 18 of them (no 4,300-digit numbers reaching int())."""
    if not header:
        return Span(0, size - 1, False), ""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None, "unsupported Range (one range of ASCII digits: bytes=START-END or bytes=-SUFFIX)"
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:  # suffix range: the last N bytes
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or start > end:
        return None, f"range {header.strip()[:60]!r} is outside the file's {size} bytes"
    return Span(start, end, True), ""


async def _guarded(request: web.BaseRequest, write, stall_timeout_s: float) -> None:
    try:
        await asyncio.wait_for(write, stall_timeout_s)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise StalledError(f"client stopped reading for {stall_timeout_s:g}s") from None


async def send_bytes(
    request: web.BaseRequest,
    body: bytes,
    content_type: str,
    stall_timeout_s: float,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    close: bool = False,
) -> web.StreamResponse:
    """A complete response, written here (not after the handler returns) so that its writes are
    bounded by the stall timeout too. HEAD gets the headers only. `close`: with `Connection:
    close`, and the connection is closed after it."""
    headers = {"Server": "crowdtrain", "Content-Type": content_type, **(headers or {})}
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = len(body)
    if close:
        response.force_close()
    await _send(request, response, _pieces(body), stall_timeout_s)
    return response


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), CHUNK_BYTES):
        yield body[i : i + CHUNK_BYTES]


async def _send(
    request: web.BaseRequest,
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes],
    stall_timeout_s: float,
) -> None:
    await _guarded(request, response.prepare(request), stall_timeout_s)
    if request.method != "HEAD":
        async for chunk in chunks:
            await _guarded(request, response.write(chunk), stall_timeout_s)
    await _guarded(request, response.write_eof(), stall_timeout_s)


async def send_file(request: web.BaseRequest, path: Path, stall_timeout_s: float) -> web.StreamResponse:
    """The file (or the Range asked for), read off the event loop; 404 when it is gone, 416 for a
    range it cannot satisfy."""
    try:
        f = await asyncio.to_thread(open, path, "rb")  # opened first so that a pruned file is a 404
    except FileNotFoundError:
        return await send_bytes(request, b"file is gone\n", "text/plain", stall_timeout_s, 404)
    try:
        size = (await asyncio.to_thread(path.stat)).st_size
        span, reason = byte_span(request.headers.get("Range"), size)
        if span is None:
            return await send_bytes(
                request,
                f"{reason}\n".encode(),
                "text/plain",
                stall_timeout_s,
                416,
                {"Content-Range": f"bytes */{size}"},
            )
        headers = {
            "Server": "crowdtrain",
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if span.partial:
            headers["Content-Range"] = f"bytes {span.start}-{span.end}/{size}"
        response = web.StreamResponse(status=206 if span.partial else 200, headers=headers)
        response.content_length = span.length
        await _send(request, response, _read_chunks(f, span), stall_timeout_s)
        return response
    finally:
        f.close()


async def _read_chunks(f, span: Span) -> AsyncIterator[bytes]:
    await asyncio.to_thread(f.seek, span.start)
    remaining = span.length
    while remaining > 0:
        chunk = await asyncio.to_thread(f.read, min(CHUNK_BYTES, remaining))
        if not chunk:
            break
        yield chunk
        remaining -= len(chunk)
