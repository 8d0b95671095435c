"""The middleware fails closed: only public paths reach the wrapped app unguarded, websockets to the rest are
refused, the app sees the connection as the host gave it, and the pipeline closes with an app of no lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import replace

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient

from gateway.evidence.keys import Keys
from gateway.evidence.reader import LogReader
from gateway.identity import Registry
from gateway.middleware import CanarygateMiddleware
from tests.conftest import ServerThread, _settings
from tests.fake_upstream import FakeUpstream
from tests.ratelimit.conftest import limited_settings
from tests.test_hygiene import BODY, CHAT, assert_openai_error

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
}


def _model(seen: list):
    """A model server with a chat route, its own /generate, a health check and a websocket, that notes what
    it saw of each request."""

    async def answer(request: Request):
        seen.append(
            {
                "path": request.url.path,
                "host": request.headers.get("host"),
                "client": request.client.host if request.client else None,
                "state": getattr(request.state, "model", None),
            }
        )
        return JSONResponse(ANSWER)

    async def socket(websocket):
        seen.append({"path": websocket.url.path})
        await websocket.accept()
        await websocket.close()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield {"model": "loaded at startup"}

    routes = [
        Route(CHAT, answer, methods=["POST"]),
        Route("/generate", answer, methods=["POST"]),
        Route("/healthz", answer),
        WebSocketRoute("/v1/realtime", socket),
        WebSocketRoute("/healthz/ws", socket),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _middleware(tmp_path, app, passthrough=()):
    settings = _settings(tmp_path / "state", "http://unused.invalid")
    settings = replace(settings, upstream=replace(settings.upstream, passthrough=passthrough))
    return CanarygateMiddleware(app, settings=settings), Registry(tmp_path / "state").add("ada")


def test_a_model_route_the_gateway_does_not_know_is_closed_unless_listed(tmp_path):
    seen = []
    guarded, key = _middleware(tmp_path / "a", _model(seen))
    listed, listed_key = _middleware(tmp_path / "b", _model(seen), passthrough=("/generate",))
    with ServerThread(guarded) as a, ServerThread(listed) as b:
        assert_openai_error(httpx.post(a.url + "/generate", json=BODY, headers={"authorization": f"Bearer {key}"}), 404)
        assert_openai_error(httpx.post(b.url + "/generate", json=BODY), 401)
        assert httpx.post(b.url + "/generate", json=BODY, headers={"authorization": f"Bearer {listed_key}"}).is_success
        assert httpx.get(a.url + "/healthz").is_success  # public: no key
        assert_openai_error(httpx.get(a.url + "/healthz/../generate"), 404)  # a dot segment is never public
    assert [s["path"] for s in seen] == ["/generate", "/healthz"]


def test_a_websocket_to_a_guarded_path_is_refused(tmp_path):
    seen = []
    app, _ = _middleware(tmp_path, _model(seen))

    async def connect(path: str) -> str:
        scope = {"type": "websocket", "path": path, "raw_path": path.encode(), "root_path": "", "headers": []}
        scope |= {"query_string": b"", "scheme": "ws", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        sent = []
        incoming = [{"type": "websocket.connect"}]

        async def receive():
            return incoming.pop() if incoming else {"type": "websocket.disconnect", "code": 1000}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        return sent[0]["type"]

    assert asyncio.run(connect("/v1/realtime")) == "websocket.close"
    assert asyncio.run(connect("/healthz/ws")) == "websocket.accept"
    assert [s["path"] for s in seen] == ["/healthz/ws"]


def test_the_app_sees_the_connection_and_its_lifespan_state(tmp_path):
    seen = []
    app, key = _middleware(tmp_path, _model(seen))
    with ServerThread(app) as server:
        headers = {"authorization": f"Bearer {key}", "host": "models.example"}
        assert httpx.post(server.url + CHAT, json=BODY, headers=headers).is_success
    assert seen == [{"path": CHAT, "host": "models.example", "client": "127.0.0.1", "state": "loaded at startup"}]


async def _failing_on_lifespan(scope, receive, send):  # http alone, as a bare ASGI app may be
    assert scope["type"] == "http"
    await JSONResponse(ANSWER)(scope, receive, send)


async def _returning_on_lifespan(scope, receive, send):  # as common: it raises nothing, and answers nothing
    if scope["type"] == "http":
        await JSONResponse(ANSWER)(scope, receive, send)


async def _reading_then_returning(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
    else:
        await JSONResponse(ANSWER)(scope, receive, send)


@pytest.mark.parametrize("bare", [_failing_on_lifespan, _returning_on_lifespan, _reading_then_returning])
def test_the_pipeline_closes_at_shutdown_with_an_app_that_has_no_lifespan(tmp_path, bare):
    """The pipeline's close writes the last checkpoint: an app that returned on the lifespan scope without a word
    left the log with entries under no checkpoint."""
    app, key = _middleware(tmp_path, bare)
    closed = []
    close = app.pipeline.close

    async def noting_close():
        closed.append(True)
        await close()

    app.pipeline.close = noting_close
    with ServerThread(app) as server:
        assert httpx.post(server.url + CHAT, json=BODY, headers={"authorization": f"Bearer {key}"}).is_success
    assert closed == [True]


def test_an_app_that_raises_gets_the_client_a_502_and_its_traceback_logged(tmp_path, caplog):
    async def broken(request: Request):
        raise RuntimeError("model weights not found")

    guarded, key = _middleware(tmp_path, Starlette(routes=[Route(CHAT, broken, methods=["POST"])]))
    with ServerThread(guarded) as server:
        answer = httpx.post(server.url + CHAT, json=BODY, headers={"authorization": f"Bearer {key}"})
    assert_openai_error(answer, 502)
    assert "model weights" not in answer.text  # the client learns nothing of the app's insides
    raised = [r for r in caplog.records if r.name == "canarygate.upstream"]
    assert raised and "model weights not found" in str(raised[0].exc_info[1])


def test_a_host_that_cancels_again_while_the_exchange_is_recorded_still_frees_its_slot(tmp_path):
    """A host's timeout built on anyio cancels at every await, the record of the exchange's end included: its
    admission must be released all the same. It was not, and the heartbeat renewed the lease for ever, so the
    key's one concurrent request stayed taken."""
    fake = FakeUpstream()
    limits = {"identity": {"requests": "1000/minute", "tokens": "1000000/minute", "concurrency": 1}}
    app = CanarygateMiddleware(fake, settings=limited_settings(tmp_path, "http://unused.invalid", limits))

    async def host(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        with anyio.move_on_after(0.3):
            await app(scope, receive, send)

    fake.behaviour.hang = 2
    with ServerThread(host) as server:
        key = Registry(tmp_path).add("u1")
        with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"}) as client:
            with contextlib.suppress(httpx.HTTPError):  # the host ends the response without an answer
                client.post(CHAT, json=BODY, timeout=10)
            assert not app.pipeline._admit._held
            fake.behaviour.hang = 0
            assert client.post(CHAT, json=BODY, timeout=10).status_code == 200


def test_a_host_that_runs_the_lifespan_again_gets_a_working_gateway(tmp_path):
    """A host's tests run one module-level app's lifespan once per test client, each in its own event loop."""
    app, key = _middleware(tmp_path, _model([]))
    for _ in range(2):
        with TestClient(app) as client:
            answer = client.post(CHAT, json=BODY, headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
    assert [p.name for p in (tmp_path / "state" / "evidence").iterdir() if p.is_dir()] == ["0"]  # its one log


def test_workers_forked_after_the_app_is_built_each_write_a_log_of_their_own(tmp_path):
    """What a prefork server does (gunicorn --preload): build the app once, then fork the workers."""
    app, key = _middleware(tmp_path, _model([]))

    async def serve() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://host") as client:
            for _ in range(3):
                answer = await client.post(CHAT, json=BODY, headers={"authorization": f"Bearer {key}"})
                assert answer.status_code == 200, answer.text
        await app.pipeline.close()

    children = []
    for _ in range(2):
        child = os.fork()
        if child == 0:
            code = 1
            try:
                asyncio.run(serve())
                code = 0
            finally:
                os._exit(code)
        children.append(child)
    assert [os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) for child in children] == [0, 0]
    logs = sorted(p for p in (tmp_path / "state" / "evidence").iterdir() if p.is_dir())
    loaded = Keys.load(tmp_path / "state" / "keys")
    assert [p.name for p in logs] == ["0", "1"]
    assert [LogReader(p, loaded).verify().entries for p in logs] == [9, 9]  # 3 commitments, 3 exchanges of 2


def test_a_mounted_gateway_opened_by_the_outer_apps_lifespan_is_closed_with_it(tmp_path):
    """Starlette's Mount passes no lifespan on: opened at the first request, the gateway was never closed and
    its last entries went unsigned."""
    guarded, key = _middleware(tmp_path, _model([]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with guarded:
            yield

    outer = Starlette(routes=[Mount("/llm", app=guarded)], lifespan=lifespan)
    with TestClient(outer) as client:
        answer = client.post("/llm" + CHAT, json=BODY, headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
    report = LogReader(tmp_path / "state" / "evidence" / "0", Keys.load(tmp_path / "state" / "keys")).verify()
    assert report.entries == report.covered == 5  # three commitments and the exchange, all under a checkpoint


def test_concurrent_first_requests_after_a_restart_in_another_loop_are_served(tmp_path):
    guarded, key = _middleware(tmp_path, _model([]))
    outer = Starlette(routes=[Mount("/llm", app=guarded)])  # no lifespan reaches it: the requests start it

    async def first_requests() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://host") as client:
            headers = {"authorization": f"Bearer {key}"}
            answers = await asyncio.gather(*[client.post("/llm" + CHAT, json=BODY, headers=headers) for _ in range(3)])
        await guarded.__aexit__(None, None, None)
        return [answer.status_code for answer in answers]

    assert [asyncio.run(first_requests()) for _ in range(2)] == [[200] * 3] * 2
