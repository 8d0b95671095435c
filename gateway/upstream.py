"""The forward stage: send a request to the model API and hand back its answer as it arrives.

Two implementations behind one interface (`gateway.stages.Upstream`):
- `HTTPUpstream`, an aiohttp client session. It was measured against httpx for this job (the core issue:
  about 8,300 req/s against 650 with httpx's default transport on a 2-core machine) and is used only here;
  it never follows redirects.
- `ASGIUpstream`, which calls a model server's ASGI app in-process (the middleware mode, and the demo),
  with no network hop.
A client that goes away cancels the upstream request: `close()` drops the connection (HTTP) or cancels
the app's task (ASGI), which the upstream observes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from urllib.parse import unquote, urlsplit

import aiohttp
from yarl import URL

from .config import UpstreamSettings

log = logging.getLogger("canarygate.upstream")


class UpstreamError(Exception):
    """The upstream could not answer: `reason` is one of refused, timeout, broken, too_large."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


async def _read_all(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UpstreamError("too_large", f"answer larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


class _HTTPResponse:
    __slots__ = ("_response", "status", "headers")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = [(k.lower(), v) for k, v in response.headers.items()]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError:
            raise UpstreamError("timeout", "no data within the read timeout") from None
        except aiohttp.ClientError as e:
            raise UpstreamError("broken", type(e).__name__) from None

    async def read(self, limit: int) -> bytes:
        return await _read_all(self.chunks(), limit)

    def close(self) -> None:
        self._response.close()

    def release(self) -> None:
        self._response.release()


class HTTPUpstream:
    def __init__(self, settings: UpstreamSettings) -> None:
        self._base = settings.url
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None
        parts = urlsplit(settings.url)
        self._address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    async def start(self) -> None:
        s = self._settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout, sock_read=s.read_timeout),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def ready(self) -> str | None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*self._address), self._settings.connect_timeout)
        except (OSError, TimeoutError) as e:
            return f"upstream {self._address[0]}:{self._address[1]} unreachable ({type(e).__name__})"
        writer.close()
        return None

    async def send(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> _HTTPResponse:
        try:
            response = await self._session.request(
                method,
                URL(self._base + path, encoded=True),
                data=body or None,
                headers=[(k, _for_aiohttp(v)) for k, v in headers],
                allow_redirects=False,
            )
        except TimeoutError:
            raise UpstreamError("timeout", "no answer within the timeout") from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError("refused", type(e).__name__) from None
        except aiohttp.ClientError as e:
            raise UpstreamError("broken", type(e).__name__) from None
        return _HTTPResponse(response)


def _for_aiohttp(value: str) -> str:
    """A header value held as its bytes read as latin-1 (as ASGI gives them), as aiohttp must be given it to write
    those bytes: it writes UTF-8, so "café" sent in UTF-8 reached the upstream as "cafÃ©". Bytes that are not
    UTF-8 have no such string, and go as aiohttp writes their latin-1 reading."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode()
    except UnicodeError:
        return value


_END = object()  # put on the queue when the app returns, whatever it sent
DISCONNECT_GRACE = 1.0  # seconds an app may take to stop after it is told the client left


class _ASGIResponse:
    def __init__(
        self,
        task: asyncio.Task,
        messages: asyncio.Queue,
        status: int,
        headers,
        read_timeout: float,
        disconnect: asyncio.Event,
    ):
        self._task = task
        self._messages = messages
        self._disconnect = disconnect
        self._read_timeout = read_timeout
        self.status = status
        self.headers = headers

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await _next_message(self._messages, self._task, self._read_timeout)
            if message is _END:
                raise UpstreamError("broken", "the app returned before finishing its answer")
            if isinstance(message, BaseException):
                raise UpstreamError("broken", type(message).__name__)
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return

    async def read(self, limit: int) -> bytes:
        return await _read_all(self.chunks(), limit)

    def close(self) -> None:
        # Tell the app the way ASGI does (its receive() returns http.disconnect); cancel it if it lingers.
        self._disconnect.set()
        if not self._task.done():
            asyncio.get_running_loop().call_later(DISCONNECT_GRACE, self._task.cancel)

    def release(self) -> None:
        """The app finished; there is no connection to return."""


# The request's scope as the host server gave it (middleware.py sets it): the app called in-process sees the
# connection it would have seen without the gateway (client, server, scheme, Host) and its lifespan state.
HOST_SCOPE: ContextVar[dict | None] = ContextVar("canarygate_host_scope", default=None)
_FROM_HOST = ("client", "server", "scheme", "http_version", "state")


class ASGIUpstream:
    """Calls an ASGI app in-process as if it were the model API behind the gateway."""

    def __init__(self, app, read_timeout: float = 300.0) -> None:
        self._app = app
        self._read_timeout = read_timeout

    async def start(self) -> None:
        """Nothing to open: the app's own lifespan is run by whoever hosts it."""

    async def close(self) -> None:
        """Nothing to close."""

    async def ready(self) -> str | None:
        return None

    async def send(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> _ASGIResponse:
        path_only, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(path_only),
            "raw_path": path_only.encode("latin-1"),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("canarygate", 0),
        }
        host = HOST_SCOPE.get()
        if host is not None:
            scope |= {name: host[name] for name in _FROM_HOST if name in host}
            scope["headers"] += [(k, v) for k, v in host["headers"] if k == b"host"]
        messages: asyncio.Queue = asyncio.Queue()
        request = [{"type": "http.request", "body": body, "more_body": False}]
        disconnect = asyncio.Event()

        async def receive():
            if request:
                return request.pop()
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def run():
            try:
                await self._app(scope, receive, messages.put)
            except Exception as e:  # a crashing app gets the client a 502; it never crashes the gateway
                log.exception("the app behind the gateway raised on %s %s", method, path_only)  # its own error
                messages.put_nowait(e)
            finally:
                disconnect.set()
                messages.put_nowait(_END)

        task = asyncio.get_running_loop().create_task(run())
        try:
            start = await _next_message(messages, task, self._read_timeout)
        except BaseException:  # the client left (or the wait timed out) before the app answered
            disconnect.set()
            task.cancel()
            raise
        if not isinstance(start, dict) or start.get("type") != "http.response.start":
            task.cancel()
            raise UpstreamError("broken", "the app sent no response")
        headers_out = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in start.get("headers", [])]
        return _ASGIResponse(task, messages, start["status"], headers_out, self._read_timeout, disconnect)


async def _next_message(messages: asyncio.Queue, task: asyncio.Task, timeout: float):
    try:
        async with asyncio.timeout(timeout):
            return await messages.get()
    except TimeoutError:
        task.cancel()
        raise UpstreamError("timeout", "no data within the read timeout") from None
