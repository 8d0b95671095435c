"""The request path: identify, admit, forward, transform, record, as one ASGI callable.

The pipeline owns the order of stages and the gateway's hygiene (what may cross to the upstream and back);
the stages own their decisions and the protocol modules own the wire shapes. Both faces of the product,
the sidecar app and the middleware, are thin wrappers around one `Pipeline`.

Rules kept here:
- Every exchange is recorded exactly once, whatever its outcome, and admission is always released.
- Nothing a client sends can crash a worker: unexpected errors become a 500 in the API's shape.
- A client that goes away cancels the upstream request.
- The upstream's own credential failures, quota and rate limits never reach the client as such.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from dataclasses import replace

from . import jsonio, metrics
from .body import read_body
from .config import Settings
from .exchange import ErrorKind, Exchange, GatewayError, Identity, Outcome
from .protocols import ROUTES, Api, Dialect, api_for
from .protocols.base import estimate_tokens, total_tokens, usage_of
from .protocols.sse import SSEEvent, SSEFramer
from .rewrite import StreamRewrite, rewrite_body
from .risk import Decision, RiskEngine
from .stages import Admitter, Identifier, Recorder, RequestMark, Transform, Upstream, UpstreamResponse
from .upstream import UpstreamError

log = logging.getLogger("canarygate.pipeline")

# Never forwarded upstream: hop-by-hop headers, the client's credentials and cookies, its OpenAI account
# scoping, and what the gateway itself recomputes (length, encodings, forwarding chain).
_REQUEST_HEADERS_DROPPED = frozenset(
    h.encode()
    for h in (
        "host", "content-length", "connection", "keep-alive", "proxy-connection", "proxy-authorization",
        "te", "trailer", "transfer-encoding", "upgrade", "expect", "authorization", "x-api-key", "api-key",
        "cookie", "openai-organization", "openai-project", "content-encoding", "accept-encoding",
        "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
        "x-forwarded-prefix", "x-real-ip", "true-client-ip", "cf-connecting-ip", "via",
    )
)  # fmt: skip
DRAIN_SECONDS = 1.0  # the most a complete stream's end waits for the upstream to end its body
_PAGE_LABELS = ("text/html", "application/xhtml+xml", "text/xml", "application/xml")  # a proxy's error page, no stream
_UPSTREAM_REASONS = {
    "refused": (ErrorKind.UPSTREAM_UNAVAILABLE, "the upstream model API could not be reached"),
    "timeout": (ErrorKind.UPSTREAM_TIMEOUT, "the upstream model API did not answer in time"),
    "broken": (ErrorKind.UPSTREAM_FAILED, "the upstream model API failed while answering"),
    "too_large": (ErrorKind.UPSTREAM_FAILED, "the upstream model API's answer was too large"),
    "malformed": (ErrorKind.UPSTREAM_FAILED, "the upstream model API's answer was not valid JSON"),
}


def under_prefixes(path: str, prefixes) -> bool:
    """Whether `path` is one of `prefixes` or below one, matched on whole path segments, in a path without dot
    segments (which an HTTP client or a router would resolve into another endpoint) nor backslashes (which
    some servers take for a slash, and so for more dot segments)."""
    if "\\" in path or any(segment in (".", "..") for segment in path.split("/")):
        return False
    return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in prefixes)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        identifier: Identifier,
        admitter: Admitter,
        upstream: Upstream,
        transform: Transform,
        recorder: Recorder,
        risk: RiskEngine | None = None,
        bias: RequestMark | None = None,
    ) -> None:
        self._settings = settings
        self.stages = {"identify": identifier, "admit": admitter, "forward": upstream, "transform": transform,
                       "record": recorder}  # fmt: skip
        self._identify = identifier
        self._admit = admitter
        self._upstream = upstream
        self._transform = transform
        self._record = recorder
        self._risk = risk
        self._bias = bias
        if risk is not None:
            risk.on_decision = self._apply_decision
        self._upstream_key = settings.upstream.api_key()
        self._passthrough = settings.upstream.passthrough
        self._trusted = settings.server.trusted_proxies
        self._draining: set[asyncio.Task] = set()  # streams answered in full whose upstream body is read to its end

    async def start(self) -> None:
        await self._record.start()
        marks = self._transform.commitments() + (self._bias.commitments() if self._bias else [])
        await self._record.commit(marks)  # on disk before the first answer is marked
        if self._risk is not None:
            await self._risk.start()
        await self._admit.start()
        await self._upstream.start()

    async def close(self) -> None:
        try:
            if self._risk is not None:
                await self._risk.close()
            await self._drained()
            await self._upstream.close()
            await self._admit.close()
        finally:  # whatever failed above, the log gets its final checkpoint
            await self._record.close()

    async def readiness(self) -> dict[str, str]:
        """Each backend's state: "ok" or why not ("degraded: ..." still serves)."""
        return {
            "upstream": await self._upstream.ready() or "ok",
            "limits": await self._admit.ready() or "ok",
            "record": self._record.ready() or "ok",
        }

    def _is_passthrough(self, path: str) -> bool:
        return under_prefixes(path, self._passthrough)

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"]
        headers = scope["headers"]
        api = api_for(path, headers)
        dialect = ROUTES.get(path)
        exchange = Exchange(
            id=f"req_{os.urandom(12).hex()}",
            method=scope["method"],
            path=path,
            api=api.name,
            route=path if dialect is not None else None,
            client_ip=self._client_ip(scope),
        )
        reply = _Reply(send, exchange, api, dialect, self._finish)
        try:
            body = await self._screen(exchange, scope, receive, dialect)
            biased = dialect is not None and self._bias is not None and self._bias.applies(exchange, dialect)
            await self._admit.admit(exchange)
            exchange.admitted = True
            # at once, so that a request refused after admission (one too deep to re-encode) has its begin too;
            # with durability "fsync", on disk before anything goes upstream
            await self._record.begin(exchange)
            marked = None
            if dialect is not None:
                # after admission, which may move the identity to a tier that gets canaries
                hide_logprobs = self._logprobs_hidden(exchange, dialect, biased)
                body = _fit(exchange, dialect, body, hide_logprobs)
                marked = self._marked_request(exchange) if biased else None
            await self._forward_watching(exchange, scope, receive, reply, api, dialect, (marked, body))
        except GatewayError as error:
            exchange.outcome = exchange.outcome or Outcome.REJECTED
            exchange.error = exchange.error or error.kind.value
            await reply.error(api, error)
        except ConnectionAbortedError:
            exchange.outcome = Outcome.CLIENT_CANCELLED
        except Exception:
            log.exception("request %s failed inside the gateway", exchange.id)
            exchange.outcome = Outcome.INTERNAL_ERROR
            exchange.error = ErrorKind.INTERNAL.value
            await reply.error(api, GatewayError(ErrorKind.INTERNAL, "internal gateway error"))
        finally:
            try:
                if not reply.ended:
                    if exchange.status == 0:
                        exchange.status = 499  # the client left before any answer
                    await self._finish(exchange)
            finally:  # a host that cancels at every await (anyio) cancels the record too: the slot is freed still
                if exchange.admitted:
                    await self._admit.release(exchange)
                    if self._risk is not None:
                        self._risk.observe(exchange)  # queued: scored off the request path

    async def _apply_decision(self, decision: Decision) -> None:
        """A risk decision: recorded, then applied where admission reads tiers; not applied in shadow mode, nor
        where, since the request that moved it was admitted, an operator pinned the identity or set its tier
        (a decision scored from an older request must not undo `tier set bot blocked`) or its name was
        registered anew (the registry says so now). A decision that could not be applied is recorded again, so."""
        was, now = decision.identity, self._identify.current(decision.identity.name)
        if decision.applied and (
            now is None or now.pinned or now.registered != was.registered or now.tier_set != was.tier_set
        ):
            decision = replace(decision, applied=False)
        if decision.applied:
            decision = await self._from_tier_in_force(decision, now)
            if decision is None:  # where another worker moved it, it stays
                return
        await self._record.decision(decision.identity, {"decision": decision.as_json()})  # no change unrecorded
        if decision.applied:
            try:
                await self._admit.set_tier(decision.identity, decision.tier)
            except Exception:
                failed = {**decision.as_json(), "applied": False, "error": "the tier could not be stored"}
                await self._record.decision(decision.identity, {"decision": failed})
                raise

    async def _from_tier_in_force(self, decision: Decision, now: Identity) -> Decision | None:
        """The decision made from the tier the identity is in now (an override, or its registry tier), where
        another worker moved it since the request behind the decision was admitted. Where the tier in force
        cannot be read, the decision stands (applying it will fail the same way, and is recorded so)."""
        try:
            in_force = await self._admit.tier_override(decision.identity) or now.tier
        except Exception:
            return decision
        return decision if in_force == decision.previous else self._risk.moved_from(decision, in_force)

    async def _finish(self, exchange: Exchange) -> bool:
        """Record the end of the exchange: once, just before its last byte is sent (or when it is abandoned).
        Whether it is on record: where not (the evidence log failed), the answer must not go out.

        An admitted exchange's begin entry was written at admission; a rejected one gets it here, first."""
        if not exchange.admitted:
            try:
                await self._record.begin(exchange)
            except Exception:
                log.exception("could not record the start of exchange %s", exchange.id)
        if exchange.route is not None and 200 <= (exchange.upstream_status or 0) < 300:
            streamed = exchange.events > 0  # relayed as events (an upstream may answer a stream request whole)
            if streamed or exchange.usage is None:  # a whole answer the transform decoded has its usage read
                try:
                    found = usage_of(exchange.answer(), streamed, ROUTES[exchange.route])
                    # merged with a usage event kept out of the stream, which came last
                    exchange.usage = {**(found or {}), **(exchange.usage or {})} or None
                except Exception:  # whatever the answer holds, the exchange is recorded (without its usage)
                    log.exception("could not read the usage of exchange %s", exchange.id)
            exchange.tokens_used = total_tokens(exchange.usage)
        recorded = True
        try:
            await self._record.end(exchange)
        except Exception:
            log.exception("could not record exchange %s; its answer is withheld", exchange.id)
            recorded = False
        metrics.observe(exchange)
        return recorded

    def _check_route(self, exchange: Exchange, dialect: Dialect | None) -> None:
        if dialect is None:
            if self._is_passthrough(exchange.path):
                return
            raise GatewayError(ErrorKind.NOT_FOUND, f"unknown route {exchange.method} {exchange.path}")
        if exchange.method != dialect.method:
            raise GatewayError(
                ErrorKind.METHOD_NOT_ALLOWED,
                f"{exchange.path} accepts {dialect.method}, not {exchange.method}",
                {"allow": dialect.method},
            )

    async def _screen(self, exchange: Exchange, scope, receive, dialect: Dialect | None) -> bytes:
        """Check the route, identify the caller and read the request. A request refused here still counts: against
        its address's unauthenticated limit where no one is identified yet (an unknown route, a refused key), or
        its caller's request limits, reserving no tokens (a body not JSON, too large): a flood of either was
        refused, and recorded, without limit; counted, it turns into cheap 429s."""
        try:
            self._check_route(exchange, dialect)
            exchange.identity = self._identify.identify(exchange, _credential(scope["headers"]))
            return await self._read_request(exchange, scope, receive, dialect)
        except GatewayError:
            exchange.prompt_tokens = exchange.requested_output = 0  # nothing goes upstream
            await self._admit.admit(exchange)
            await self._admit.release(exchange)
            raise

    async def _read_request(self, exchange: Exchange, scope, receive, dialect: Dialect | None) -> bytes:
        if exchange.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return b""
        content_type = _header(scope["headers"], b"content-type")
        if dialect is not None and (content_type or "").split(";")[0].strip().lower() != "application/json":
            raise GatewayError(ErrorKind.UNSUPPORTED_MEDIA, "send the request body as Content-Type: application/json")
        body = exchange.request_body = await _read_body(scope, receive, self._settings.server.max_body_bytes)
        if dialect is not None:
            exchange.request = _parse_json(body)
            facts = dialect.facts(exchange.request)
            exchange.model, exchange.stream = facts.model, facts.stream
            if dialect.output_fields:
                exchange.requested_output, exchange.choices = facts.max_output, facts.choices
            exchange.prompt_text = dialect.prompt_text(exchange.request)
            exchange.question = dialect.question(exchange.request)
            exchange.prompt_tokens = estimate_tokens(body, exchange.request)
            honoured = self._settings.upstream.constrained_decoding
            exchange.structured = dialect.structured_output(exchange.request, honoured)
            exchange.cited = dialect.cites_by_offset(exchange.request)
            exchange.free_ending = dialect.free_ending(exchange.request)
        return body

    def _logprobs_hidden(self, exchange: Exchange, dialect: Dialect, biased: bool) -> bool:
        """Log-probabilities would reveal the unmarked tokens of a marked answer (or, under the sampling-bias
        mark, the favoured ones): they are removed from the request, or, with `[watermark] logprobs =
        "refuse"`, the request is refused (after admission: the tier it admits decides whether canaries apply)."""
        asked = dialect.asks_logprobs(exchange.request) and (biased or self._transform.applies(exchange))
        if asked and self._settings.watermark.logprobs == "refuse":
            raise GatewayError(ErrorKind.INVALID_REQUEST, "log-probabilities are not available from this API")
        return asked

    def _marked_request(self, exchange: Exchange) -> bytes | None:
        """The request body asking the upstream for the sampling-bias mark (None if no slot is left for it)."""
        marked = self._bias.request(exchange)
        try:
            return None if marked is None else jsonio.dumps(marked)
        except ValueError:  # nested too deeply to write again: the client's own bytes go as they came
            self._bias.withdraw(exchange)
            return None

    async def _forward_watching(self, exchange, scope, receive, reply, api, dialect, bodies) -> None:
        """Forward while watching for the client to leave; if it does, cancel the upstream request. The forwarding
        runs in this task and a watch beside it cancels this one: one task a request, not two and a wait."""
        forwarding, left = asyncio.current_task(), False
        before = forwarding.cancelling()  # cancellations already asked for from outside

        async def watch() -> None:
            nonlocal left
            await _disconnected(receive)
            left = True
            forwarding.cancel("the client left")

        watcher = asyncio.ensure_future(watch())
        try:
            # the watch's first look, before anything is sent: a client that left while it was admitted (a
            # tarpit) is gone already, and a pooled connection would carry the request at once
            await asyncio.sleep(0)
            await self._forward(exchange, scope, reply, api, dialect, bodies)
        except asyncio.CancelledError:
            # the client's leaving ends here; one from outside as well (a shutdown) goes on
            if not left or forwarding.cancelling() > before + 1:
                raise
        finally:
            watcher.cancel()
            if left:  # the watch's cancellation is spent, however the forwarding ended
                forwarding.uncancel()
                if not reply.ended:  # an answer sent in full stays answered
                    exchange.outcome = Outcome.CLIENT_CANCELLED

    async def _forward(self, exchange, scope, reply, api: Api, dialect, bodies: tuple[bytes | None, bytes]) -> None:
        """Send the request (`bodies`: with the sampling-bias mark, or None; without it) and relay the answer."""
        # the path as the client encoded it: decoding it here could turn %2F or %3F into structure upstream
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = self._upstream_headers(scope["headers"], api)
        marked, plain = bodies
        response = await self._send(exchange, target, headers, marked or plain)
        if marked is not None and response.status in (400, 422):
            response = await self._unless_mark_refused(exchange, response, target, headers, plain)
        exchange.upstream_status = response.status
        completed = handed_on = False
        try:
            _check_status(exchange, response.status)
            content_type = _content_type(response.headers)
            # a stream asked for, and answered under another label (text/plain, x-ndjson, octet-stream, none): read
            # as one, so that it is marked and its usage read; a JSON answer to it is taken as whole; a page (a
            # proxy's error page sent as 200) is no answer
            asked_stream = exchange.stream and dialect is not None and response.status < 300
            if asked_stream and content_type in _PAGE_LABELS:
                raise _upstream_failure(exchange, UpstreamError("malformed", f"a stream answered as {content_type}"))
            streamed = content_type == "text/event-stream" or (asked_stream and content_type != "application/json")
            if streamed and response.status != 304:  # a 304 has no body, whatever its label says
                handed_on = await self._relay_stream(exchange, response, reply, api, dialect)
            else:
                await self._relay_whole(exchange, response, reply, dialect)
            completed = True
        finally:
            if handed_on:
                self._drain_later(response)
            elif completed:
                response.release()
            else:
                response.close()

    async def _send(self, exchange: Exchange, target: str, headers, body: bytes) -> UpstreamResponse:
        try:
            return await self._upstream.send(exchange.method, target, headers, body)
        except UpstreamError as e:
            raise _upstream_failure(exchange, e) from None

    async def _unless_mark_refused(self, exchange, response: UpstreamResponse, target, headers, plain: bytes):
        """A 400 or 422 to the marked request: the client's own request, whose answer the client gets. The
        marked request's error is never relayed (an upstream that echoes the request would show the green
        list); if it refused the mark and the plain request went through, the model is skipped from now on."""
        try:
            refusal = await response.read(self._settings.server.max_response_bytes)
        except UpstreamError as e:
            response.close()
            raise _upstream_failure(exchange, e) from None
        except BaseException:  # cancelled: the client left
            response.close()
            raise
        response.release()
        self._bias.withdraw(exchange)
        again = await self._send(exchange, target, headers, plain)
        if again.status < 400 and self._bias.is_refusal(exchange, refusal):
            self._bias.note_refusal(exchange)
        return again

    def _upstream_headers(self, headers, api: Api) -> list[tuple[str, str]]:
        dropped = _REQUEST_HEADERS_DROPPED
        # headers the client marked hop-by-hop, in every Connection line it sent
        marked = b",".join(value for name, value in headers if name == b"connection")
        if marked:
            dropped = dropped | {token.strip().lower() for token in marked.split(b",")}
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k not in dropped]
        if self._upstream_key:
            out.append((api.upstream_auth_header, api.upstream_auth_value(self._upstream_key)))
        return out

    def _rewriters(self, exchange: Exchange):
        """The rewriter factory of the answer's text parts, or None where the answer is passed as it came. Its
        log-probabilities go wherever the text is marked or the sampling-bias mark was asked for (they would show
        the unmarked text, or the favoured tokens); the factory gives None for a part only they leave. Asked once
        per answer: a canary's `applies` reads the prompt."""
        if self._transform.applies(exchange):
            return lambda part: self._transform.rewriter(exchange, part)
        if self._bias is not None and self._bias.marked(exchange):
            return lambda part: None
        return None

    async def _relay_whole(self, exchange, response: UpstreamResponse, reply, dialect) -> None:
        try:
            body = await response.read(self._settings.server.max_response_bytes)
        except UpstreamError as e:
            raise _upstream_failure(exchange, e) from None
        # An API's answer is a JSON object whatever its label (text/plain, none): read, so that it is marked and
        # its usage read, or the upstream's failure. Under another label it went out unmarked; not JSON, as a
        # success where nothing was to be marked. Its usage is read here, where it is decoded anyway.
        if response.status == 200 and dialect is not None:
            try:
                data, write = jsonio.read(body)
            except ValueError:
                raise _upstream_failure(exchange, UpstreamError("malformed", "answer is not JSON")) from None
            if not isinstance(data, dict):  # JSON, but no answer of this route's shape
                raise _upstream_failure(exchange, UpstreamError("malformed", "answer is not a JSON object"))
            exchange.usage = dialect.usage(data)
            rewriters = self._rewriters(exchange)
            if rewriters is not None and rewrite_body(dialect, data, rewriters):
                try:
                    body = write(data)
                except ValueError:  # not delivered: the marks and canaries put in it were not served
                    exchange.marks.clear()
                    exchange.canaries.clear()
                    raise _upstream_failure(exchange, UpstreamError("malformed", "answer nested too deeply")) from None
        exchange.outcome = Outcome.COMPLETED
        if response.status == 304:  # a conditional request's answer (a passthrough route): no body, its validators
            await reply.whole(304, b"", None, _validators(response.headers))
            return
        label = _passed_content_type(response.headers)  # as the upstream wrote it, parameters and all
        await reply.whole(response.status, body, label, _head_length(exchange, response))

    async def _drained(self) -> None:
        """At shutdown, the bodies still being read after their streams' ends: left DRAIN_SECONDS to end as they
        would (an upstream that saw its connection cut right after its last event would take it for a client
        that left), then closed."""
        running = list(self._draining)
        if running:
            await asyncio.wait(running, timeout=DRAIN_SECONDS)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _drain_later(self, response: UpstreamResponse) -> None:
        task = asyncio.create_task(_drain(response))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _relay_stream(self, exchange, response: UpstreamResponse, reply, api: Api, dialect) -> bool:
        """Forward events as they complete. The terminal event (or our error event) goes out last, in the
        same message that ends the body, after the exchange is recorded. True where the upstream sent its
        terminal event: what it sends after it is to be read beside, without holding up the client's answer."""
        framer = SSEFramer()
        rewrite = None
        rewriters = self._rewriters(exchange) if dialect is not None else None
        if rewriters is not None:
            rewrite = StreamRewrite(dialect, rewriters)
        await reply.start_stream(response.status)
        held: list[bytes] = []  # from the terminal event on: sent last, once the exchange is recorded
        complete = False  # the terminal event came before the body's end
        received, limit = 0, self._settings.server.max_response_bytes
        last = b""  # the upstream's last complete event

        def downstream(events: list[bytes], ended: bool) -> list[bytes]:
            """Upstream events as the client gets them: the usage event it did not ask for kept out, the text
            rewritten, and at the end (the rewriter may hold the terminal event behind text) all it holds."""
            if exchange.strip_usage:
                events = _strip_usage(exchange, dialect, events)
            if rewrite is None:
                return events
            events = _rewritten(rewrite, events)
            return events + _held_back(rewrite) if ended else events

        try:
            async for chunk in response.chunks():
                received += len(chunk)
                if received > limit:  # an endless stream would grow the exchange's record without bound
                    raise UpstreamError("too_large", f"streamed answer larger than {limit} bytes")
                events = framer.feed(chunk)
                last = events[-1] if events else last
                terminal = _terminal_at(dialect, events)
                ended = terminal < len(events)
                if ended:  # what came after it in this read goes the way of what comes in later reads
                    events = events[: terminal + 1]
                    _note_failure(exchange, dialect, events[terminal])
                events = downstream(events, ended)
                end = _terminal_at(dialect, events)
                await reply.events(events[:end])
                if ended:  # the answer is complete: whatever the upstream does next changes nothing
                    held, complete = events[end:], True
                    break
            else:
                tail = _completed_tail(framer.remainder(), dialect)
                last = tail[-1] if tail else last
                if dialect is not None and _cut_short(dialect, tail, last):
                    held = downstream(tail, ended=False)
                    raise UpstreamError("broken", "the stream ended before its terminal event")
                if tail:
                    _note_failure(exchange, dialect, tail[-1])
                held = downstream(tail, ended=True)
        except UpstreamError as e:
            error = _upstream_failure(exchange, e)
            try:
                closing = _held_back(rewrite) if rewrite is not None else []
            except _Malformed:  # nothing more of it can be sent
                closing = []
            released = e.released if isinstance(e, _Malformed) else []
            await reply.events([*released, *held, *closing, _stream_error_event(dialect, api, error)], last=True)
            return False
        exchange.outcome = exchange.outcome or Outcome.COMPLETED
        await reply.events(held, last=True)
        return complete

    def _client_ip(self, scope) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if not self._trusted:
            return peer
        # a proxy may append its own X-Forwarded-For line rather than extend the first: read them all, in order
        forwarded = ", ".join(v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for")
        if not forwarded or not self._is_trusted(peer):
            return peer
        # Walk from the nearest hop outwards; the first address that is not our own proxy is the client.
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            if not self._is_trusted(hop):
                return hop
        return peer

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)


class _Reply:
    """Sends the answer over ASGI and notes on the exchange what was sent.

    `on_end` runs before the last message goes out, so that an exchange is on record before the client
    has the whole answer; where it could not be recorded, the client gets an error in its place.
    """

    __slots__ = ("_send", "_exchange", "_api", "_dialect", "_on_end", "started", "streaming", "ended")

    def __init__(self, send, exchange: Exchange, api: Api, dialect: Dialect | None, on_end) -> None:
        self._send = send
        self._exchange = exchange
        self._api = api
        self._dialect = dialect
        self._on_end = on_end
        self.started = False
        self.streaming = False
        self.ended = False

    def _headers(self, content_type: str | None, extra: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
        rid = self._exchange.id.encode()
        headers = [(b"x-request-id", rid), (b"request-id", rid)]
        if content_type is not None:
            headers.insert(0, (b"content-type", content_type.encode()))
        if self._exchange.quotas:
            headers += self._api.rate_limit_headers(self._exchange.quotas)
        if extra:
            headers.extend((k.encode(), v.encode()) for k, v in extra.items())
        return headers

    async def _start(self, status: int, headers) -> None:
        self.started = True
        self._exchange.status = status
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def whole(self, status: int, body: bytes, content_type: str | None, extra: dict | None = None) -> None:
        """Send a whole answer. A HEAD's content-length, for the body not sent, comes in `extra` if known."""
        self._exchange.status = status
        self._exchange.delivered.append(body)
        self.ended = True
        if not await self._on_end(self._exchange):  # recorded before a byte of the answer goes out, or not sent
            self._exchange.status = status = _UNRECORDED.status
            body, content_type, extra = self._error_body(_UNRECORDED), "application/json", None
        headers = self._headers(content_type, extra)
        # a 304 has no body, and a length would describe the body it stands for; so does a HEAD's (_head_length)
        if status != 304 and self._exchange.method != "HEAD":
            headers.append((b"content-length", str(len(body)).encode()))
        await self._start(status, headers)
        self._note_first_byte(body)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def start_stream(self, status: int) -> None:
        self.streaming = True
        extra = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        await self._start(status, self._headers("text/event-stream; charset=utf-8", extra))

    async def events(self, events: list[bytes], last: bool = False) -> None:
        self._exchange.events += len(events)
        if events or last:
            await self._body(b"".join(events), not last)

    def _note_first_byte(self, data: bytes) -> None:
        if data and self._exchange.first_byte_at is None:
            self._exchange.first_byte_at = time.perf_counter()

    async def _body(self, data: bytes, more: bool) -> None:
        self._note_first_byte(data)
        if data:
            self._exchange.delivered.append(data)
        if not more:
            self.ended = True
            if not await self._on_end(self._exchange):  # the stream's end is withheld: an error event instead
                data = _stream_error_event(self._dialect, self._api, _UNRECORDED)
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def error(self, api: Api, error: GatewayError) -> None:
        if self.streaming:  # headers are gone: end the stream with an error event instead
            await self.events([_stream_error_event(self._dialect, api, error)], last=True)
        elif not self.started:
            await self.whole(error.status, self._error_body(error), "application/json", error.headers)

    def _error_body(self, error: GatewayError) -> bytes:
        return json.dumps(self._api.error_body(error)).encode()


def _note_failure(exchange: Exchange, dialect: Dialect | None, event: bytes) -> None:
    """The upstream's own error event ends the stream: no completed answer."""
    if dialect is not None and dialect.is_failure(event):
        exchange.outcome, exchange.error = Outcome.UPSTREAM_FAILED, "broken"


async def _drain(response: UpstreamResponse) -> None:
    """Read the upstream's body to its end after the terminal event (it is usually there at once), so that
    its connection can be used again; an upstream that does not end it within DRAIN_SECONDS, or that fails
    then, has its connection closed. Beside the request, once the client has its answer: it is not held up,
    nor turned into an error, nor does it keep its admission's slot (the reviewer's upstream that ended its
    body 3 s after [DONE] held the SDK's answer for 1 s)."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in response.chunks():
                pass
    except (UpstreamError, TimeoutError):
        response.close()
        return
    except asyncio.CancelledError:  # the gateway is shutting down
        response.close()
        raise
    response.release()


class _Malformed(UpstreamError):
    """An upstream event the transform cannot read; `released`: the events before it, ready to go out."""

    def __init__(self, message: str, released: list[bytes]) -> None:
        super().__init__("malformed", message)
        self.released = released


def _rewritten(rewrite: StreamRewrite, events: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    try:
        for event in events:
            out += rewrite.push(event)
    # the upstream's fault, not the gateway's: bytes that are not UTF-8, JSON of another shape (an index that
    # is a list, a delta that is a string), or JSON that orjson reads (1,024 levels) nested too deeply to write
    except (ValueError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise _Malformed(f"a streamed event the gateway cannot read or write ({type(e).__name__})", out) from None
    return out


def _held_back(rewrite: StreamRewrite) -> list[bytes]:
    """What the rewriter still holds, at the end of a stream."""
    try:
        return rewrite.close()
    except ValueError:  # an event nested too deeply to write back
        raise _Malformed("a streamed event the gateway cannot write (ValueError)", []) from None


def _completed_tail(tail: bytes, dialect: Dialect | None) -> list[bytes]:
    """What the upstream sent after its last complete event, when its body ended without a terminal event:
    an event it only failed to end with a blank line is completed; on an API's route, one whose data is cut
    off in the middle (not JSON) is a failure. A passthrough route's events are not the gateway's to read."""
    if not tail.strip():
        return []
    if dialect is not None:
        try:
            data = SSEEvent.parse(tail + b"\n\n").data.strip()
            if data and data != "[DONE]":
                jsonio.read(data)
        except ValueError:  # UnicodeDecodeError too
            raise UpstreamError("broken", "the stream ended inside an event") from None
    return [tail + b"\n\n"]


# the answer of an exchange the evidence log could not record (it fails-stop, and /readyz says so)
_UNRECORDED = GatewayError(ErrorKind.INTERNAL, "the gateway could not record this exchange; nothing was sent")


def _stream_error_event(dialect: Dialect | None, api: Api, error: GatewayError) -> bytes:
    """An error once a stream has begun, in its route's shape (the Responses API has an error event of its own)."""
    return dialect.stream_error_event(api, error) if dialect is not None else api.stream_error_event(error)


def _fit(exchange: Exchange, dialect: Dialect, body: bytes, strip_logprobs: bool) -> bytes:
    """The request as the upstream gets it: with the output limit admission reserved for; on a stream,
    asking for the token usage that settles the reservation; without log-probabilities when the answer
    will be marked. Re-encoded only when something changed."""
    request = exchange.request
    changed = exchange.output_cap is not None and dialect.cap_output(request, exchange.output_cap)
    if exchange.stream and dialect.ask_usage(request):
        exchange.strip_usage = changed = True
    if strip_logprobs:
        dialect.strip_logprobs(request)
        changed = True
    if not changed:
        return body
    try:
        return jsonio.dumps(request)
    except ValueError:  # read (orjson reads 1,024 levels), but too deep to write again
        raise GatewayError(ErrorKind.INVALID_REQUEST, "malformed JSON in request body: nested too deeply") from None


def _strip_usage(exchange: Exchange, dialect: Dialect, events: list[bytes]) -> list[bytes]:
    """Keep the usage event the client did not ask for out of its stream (its usage is still recorded)."""
    kept = []
    for event in events:
        if dialect.is_usage_only(event):
            exchange.usage = usage_of(event, True, dialect)
        else:
            kept.append(event)
    return kept


def _cut_short(dialect: Dialect, tail: list[bytes], last: bytes) -> bool:
    """A stream whose body ended cleanly between events, before the API's own end (its terminal event, or for
    servers that send none, the event saying the answer finished): the answer was cut short."""
    return dialect.streams and _terminal_at(dialect, tail) == len(tail) and not dialect.finished_at(last)


def _terminal_at(dialect: Dialect | None, events: list[bytes]) -> int:
    """The position of the stream's terminal event in `events`, or len(events) if it is not there."""
    if dialect is not None:
        for position, event in enumerate(events):
            if dialect.is_terminal(event):
                return position
    return len(events)


def _header(headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _credential(headers) -> str | None:
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif key == b"x-api-key" and value:
            return value.decode("latin-1").strip()
    return None


async def _read_body(scope, receive, limit: int) -> bytes:
    headers = scope["headers"]
    return await read_body(receive, _header(headers, b"content-length"), _header(headers, b"content-encoding"), limit)


def _parse_json(body: bytes) -> dict:
    try:
        data = jsonio.loads(body)
    except UnicodeDecodeError as e:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"request body is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"malformed JSON in request body: {e.msg} at {e.pos}") from None
    except ValueError as e:  # NaN, Infinity, a number too large for a float, nesting too deep
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"malformed JSON in request body: {e}") from None
    if not isinstance(data, dict):
        raise GatewayError(ErrorKind.INVALID_REQUEST, "request body must be a JSON object")
    return data


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _upstream_failure(exchange: Exchange, error: UpstreamError) -> GatewayError:
    exchange.outcome = Outcome.UPSTREAM_FAILED
    exchange.error = error.reason
    kind, message = _UPSTREAM_REASONS[error.reason]
    log.warning("upstream failure on %s: %s", exchange.id, error)
    return GatewayError(kind, message)


def _check_status(exchange: Exchange, status: int) -> None:
    """Refuse upstream statuses that must not reach the client as they are.

    The upstream's authentication, quota and rate-limit failures say nothing about the client's request
    and would leak the gateway's account details, so they become a 502 or 503; so do redirects and server
    errors. Other 4xx answers are about the client's request and pass through, as does a 304 (not modified:
    the answer to a client's conditional request on a passthrough route, not a redirect).
    """
    if status < 300 or status == 304 or (400 <= status < 500 and status not in (401, 402, 403, 407, 429)):
        return
    exchange.outcome = Outcome.UPSTREAM_FAILED
    exchange.error = f"upstream_{status}"
    log.warning("upstream answered %s on %s", status, exchange.id)
    if status in (401, 403, 407):
        raise GatewayError(ErrorKind.UPSTREAM_AUTH, "the gateway could not authenticate to the upstream model API")
    if status in (402, 429, 503, 529):
        raise GatewayError(ErrorKind.UPSTREAM_OVERLOADED, "the upstream model API is over capacity; retry later")
    if status < 400:
        raise GatewayError(ErrorKind.UPSTREAM_FAILED, "the upstream model API redirected; the gateway does not follow")
    if status == 504:
        raise GatewayError(ErrorKind.UPSTREAM_TIMEOUT, "the upstream model API timed out")
    raise GatewayError(ErrorKind.UPSTREAM_FAILED, "the upstream model API failed")


def _content_type(headers: list[tuple[str, str]]) -> str:
    for key, value in headers:
        if key == "content-type":
            return value.split(";")[0].strip().lower()
    return ""


_VALIDATORS = frozenset(("etag", "last-modified", "cache-control", "expires", "vary", "content-location"))


def _validators(headers: list[tuple[str, str]]) -> dict[str, str]:
    """The headers a 304 carries for the client's cache (RFC 9110, 15.4.5)."""
    return {key: value for key, value in headers if key in _VALIDATORS}


def _head_length(exchange: Exchange, response: UpstreamResponse) -> dict[str, str] | None:
    """A HEAD's answer has no body; its length is that of the body a GET would get, as the upstream says, unless
    the upstream compressed it: the client gets a GET's body decompressed, of a length no header tells."""
    if exchange.method != "HEAD" or any(key == "content-encoding" for key, _ in response.headers):
        return None
    length = next((value for key, value in response.headers if key == "content-length"), None)
    return None if length is None else {"content-length": length}


def _passed_content_type(headers: list[tuple[str, str]]) -> str:
    for key, value in headers:
        if key == "content-type":
            return value
    return "application/octet-stream"
