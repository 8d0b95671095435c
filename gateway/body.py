"""Reading a request body from ASGI within a size limit, decompressing gzip or deflate as it comes.

The limit applies to what is read and again to what it decompresses to, so neither a large upload nor a
small gzip bomb can make a worker hold more than the limit in memory.
"""

from __future__ import annotations

import zlib

from .exchange import ErrorKind, GatewayError

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _too_large(limit: int) -> GatewayError:
    return GatewayError(ErrorKind.TOO_LARGE, f"request body exceeds the gateway's limit of {limit} bytes")


async def read_body(receive, content_length: str | None, content_encoding: str | None, limit: int) -> bytes:
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise GatewayError(ErrorKind.INVALID_REQUEST, "Content-Length is not a number") from None
        if declared > limit:
            raise _too_large(limit)
    encoding = (content_encoding or "identity").strip().lower()
    if encoding != "identity" and encoding not in _WBITS:
        raise GatewayError(
            ErrorKind.UNSUPPORTED_MEDIA, f"unsupported Content-Encoding {encoding!r}; use gzip or deflate"
        )
    inflater = _Inflater(encoding) if encoding in _WBITS else None
    parts, size = [], 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("client went away while sending the body")
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if inflater is not None:
            chunk = inflater.feed(chunk, limit - size, limit)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    if inflater is not None and not inflater.complete:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"the {encoding} body is truncated")
    return b"".join(parts)


class _Inflater:
    """A compressed body, decompressed as it comes. Gzip may hold several members one after another (RFC
    1952), as `gzip.decompress` reads them: each is read in turn. Anything else after the end is refused,
    not dropped: what the gateway forwards must be all that the client sent."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._stream = zlib.decompressobj(_WBITS[encoding])

    @property
    def complete(self) -> bool:
        return self._stream.eof

    def feed(self, chunk: bytes, room: int, limit: int) -> bytes:
        out = []
        while True:
            out.append(_inflate(self._stream, chunk, room, limit))
            room -= len(out[-1])
            chunk = self._stream.unused_data
            if not chunk:
                return b"".join(out)
            if self._encoding == "deflate":
                raise GatewayError(ErrorKind.INVALID_REQUEST, "data after the end of the deflate body")
            self._stream = zlib.decompressobj(_WBITS[self._encoding])  # the next gzip member


def _inflate(inflater, chunk: bytes, room: int, limit: int) -> bytes:
    try:
        out = inflater.decompress(chunk, room + 1)
    except zlib.error:
        raise GatewayError(ErrorKind.INVALID_REQUEST, "the compressed body is corrupt") from None
    if len(out) > room or inflater.unconsumed_tail:
        raise _too_large(limit)
    return out
