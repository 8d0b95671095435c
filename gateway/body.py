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
    inflater = zlib.decompressobj(_WBITS[encoding]) if encoding in _WBITS else None
    parts, size = [], 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("client went away while sending the body")
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if inflater is not None:
            chunk = _inflate(inflater, chunk, limit - size, limit)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    if inflater is not None and not inflater.eof:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"the {encoding} body is truncated")
    return b"".join(parts)


def _inflate(inflater, chunk: bytes, room: int, limit: int) -> bytes:
    try:
        out = inflater.decompress(chunk, room + 1)
    except zlib.error:
        raise GatewayError(ErrorKind.INVALID_REQUEST, "the compressed body is corrupt") from None
    if len(out) > room or inflater.unconsumed_tail:
        raise _too_large(limit)
    return out
