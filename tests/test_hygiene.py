"""Bad input and gateway hygiene: each case checks the status, the error's shape, what reached the
upstream, and that the next request still succeeds."""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from dataclasses import replace

import anthropic
import httpx
import openai
import pytest

from gateway import config
from gateway.app import create_app
from gateway.evidence.keys import Keys, address_hash
from gateway.identity import Registry
from tests.conftest import UPSTREAM_KEY, ServerThread, _settings, exchanges
from tests.transforms import WordCaps

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    return error


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]


def assert_still_serves(gw) -> None:
    with gw.client() as http:
        assert http.post(CHAT, headers=gw.headers(), json=BODY).status_code == 200


def post_raw(gw, content: bytes, path: str = CHAT, **headers: str) -> httpx.Response:
    with gw.client() as http:
        return http.post(path, headers=gw.headers(**headers), content=content)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"model": "m", "messages": [', "malformed JSON"),
        (b'{"model": "\xff\xfe"}', "UTF-8"),
        (b"[1, 2]", "object"),
        (b'{"model": "m", "messages": [], "temperature": NaN}', "NaN is not valid JSON"),
        (b'{"model": "m", "messages": [], "temperature": 1e999}', "1e999 is not valid JSON"),
        # read, but too deep to write again (a stream asks for its usage: the request is re-encoded)
        (b'{"model": "m", "stream": true, "messages": [], "x": ' + b"[" * 1020 + b"]" * 1020 + b"}", "too deeply"),
    ],
)
def test_bad_json_is_400(gw, content, message):
    error = assert_openai_error(post_raw(gw, content), 400, "invalid_request")
    assert message in error["message"]
    assert gw.upstream.requests == []
    assert gw.records()[-1]["status"] == 400 and gw.records()[-1]["outcome"] == "rejected"
    assert_still_serves(gw)


def test_bad_json_on_anthropic_route_has_anthropic_shape(gw):
    assert_anthropic_error(post_raw(gw, b"{nope", "/v1/messages"), 400, "invalid_request_error")
    assert_still_serves(gw)


def test_body_over_limit_is_413_by_length_and_while_reading(gw):
    big = b'{"model": "m", "pad": "' + b"x" * 70_000 + b'"}'
    assert_openai_error(post_raw(gw, big), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit must hold while reading
        yield big[:40_000]
        yield big[40_000:]

    with gw.client() as http:
        response = http.post(CHAT, headers=gw.headers(), content=chunks())
    assert_openai_error(response, 413, "request_too_large")
    assert gw.upstream.requests == []
    assert_still_serves(gw)


def test_gzip_bomb_is_413_and_honest_gzip_is_forwarded(gw):
    bomb = gzip.compress(b'{"model": "' + b"a" * 20_000_000 + b'"}')
    assert len(bomb) < 64 * 1024
    assert_openai_error(post_raw(gw, bomb, **{"content-encoding": "gzip"}), 413)
    assert gw.upstream.requests == []
    honest = gzip.compress(b'{"model": "m", "messages": [{"role": "user", "content": "zip"}]}')
    assert post_raw(gw, honest, **{"content-encoding": "gzip"}).status_code == 200
    assert gw.upstream.requests[-1].json()["messages"][0]["content"] == "zip"
    assert "content-encoding" not in gw.upstream.requests[-1].headers


def test_gzip_members_are_read_in_turn_and_data_after_the_end_is_refused(gw):
    """RFC 1952 allows several members (gzip.decompress reads them all); what follows the end is no body."""
    whole = b'{"model": "m", "messages": [{"role": "user", "content": "two members"}]}'
    members = gzip.compress(whole[:20]) + gzip.compress(whole[20:])
    assert post_raw(gw, members, **{"content-encoding": "gzip"}).status_code == 200
    assert gw.upstream.requests[-1].json()["messages"][0]["content"] == "two members"
    sent = len(gw.upstream.requests)
    error = assert_openai_error(post_raw(gw, gzip.compress(whole) + b"junk", **{"content-encoding": "gzip"}), 400)
    assert "corrupt" in error["message"]
    deflated = zlib.compress(whole) + b"junk"
    error = assert_openai_error(post_raw(gw, deflated, **{"content-encoding": "deflate"}), 400)
    assert "after the end" in error["message"] and len(gw.upstream.requests) == sent


def test_wrong_content_type_is_415(gw):
    assert_openai_error(post_raw(gw, b"a=b", **{"content-type": "application/x-www-form-urlencoded"}), 415)
    assert gw.upstream.requests == []
    assert_still_serves(gw)


def test_unknown_route_is_404_in_each_shape(gw):
    with gw.client() as http:
        assert_openai_error(http.get("/v1/nothing", headers=gw.headers()), 404, "unknown_url")
        r = http.post("/v1/nothing", headers=gw.headers(**{"anthropic-version": "2023-06-01"}), json={})
        assert_anthropic_error(r, 404, "not_found_error")
        r = http.get(CHAT, headers=gw.headers())
        assert_openai_error(r, 405)
        assert r.headers["allow"] == "POST"
    assert gw.upstream.requests == []
    assert_still_serves(gw)


def test_missing_or_unknown_key_is_401(gw):
    with gw.client() as http:
        assert_openai_error(http.post(CHAT, json=BODY), 401, "invalid_api_key")
        assert_openai_error(http.post(CHAT, json=BODY, headers={"authorization": "Bearer cg_00_nope"}), 401)
        r = http.post("/v1/messages", json=BODY, headers={"x-api-key": gw.key[:-2] + "xx"})
        assert_anthropic_error(r, 401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.url, api_key="wrong", max_retries=0).messages.create(
            model="c", max_tokens=5, messages=BODY["messages"]
        )
    assert gw.upstream.requests == []
    assert_still_serves(gw)


def test_client_credentials_cookies_and_hop_by_hop_headers_never_go_upstream(gw):
    headers = gw.headers(
        **{
            "cookie": "session=abc",
            "openai-organization": "org-client",
            "openai-project": "proj-client",
            "connection": "x-private-hop",
            "x-private-hop": "1",
            "proxy-authorization": "Basic Zm9v",
            "x-custom-keep": "kept",
            "anthropic-version": "2023-06-01",
        }
    )
    headers["x-api-key"] = gw.key
    with gw.client() as http:
        assert http.post(CHAT, headers=headers, json=BODY).status_code == 200
    seen = gw.upstream.requests[-1].headers
    for name in (
        "cookie",
        "openai-organization",
        "openai-project",
        "x-private-hop",
        "proxy-authorization",
        "x-api-key",
    ):
        assert name not in seen, name
    assert gw.key not in str(seen)
    assert seen["x-custom-keep"] == "kept"
    with gw.client() as http:  # a value beyond ASCII goes as its bytes came (aiohttp wrote them as UTF-8 again)
        assert http.post(CHAT, headers={**gw.headers(), "x-title": "café".encode()}, json=BODY).status_code == 200
    assert gw.upstream.requests[-1].headers["x-title"] == "café"
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the gateway's own credential
    r = post_raw(gw, b'{"model": "c", "max_tokens": 5, "messages": []}', "/v1/messages")
    assert r.status_code == 200 and gw.upstream.requests[-1].headers["x-api-key"] == UPSTREAM_KEY
    # every Connection line counts (RFC 9110), not the first alone
    lines = [*gw.headers().items(), ("connection", "keep-alive"), ("connection", "x-hop-two"), ("x-hop-two", "1")]
    with gw.client() as http:
        assert http.post(CHAT, headers=lines, json=BODY).status_code == 200
    assert "x-hop-two" not in gw.upstream.requests[-1].headers


@pytest.mark.parametrize("status, expected", [(401, 502), (403, 502), (429, 503), (402, 503), (500, 502), (529, 503)])
def test_upstream_account_failures_are_hidden(gw, status, expected):
    gw.upstream.behaviour.status = status
    gw.upstream.behaviour.error_body = {
        "error": {"message": f"Incorrect API key sk-...{UPSTREAM_KEY[-4:]} org-upstream"}
    }
    gw.upstream.behaviour.headers = [
        ("x-ratelimit-remaining-requests", "0"),
        ("openai-organization", "org-upstream"),
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("retry-after", "20"),
    ]
    with gw.client() as http:
        r = http.post(CHAT, headers=gw.headers(), json=BODY)
    assert_openai_error(r, expected)
    leaked = r.text + str(r.headers)
    for secret in ("org-upstream", UPSTREAM_KEY[-4:], "ratelimit", "Incorrect API key"):
        assert secret not in leaked
    assert "retry-after" not in r.headers
    assert gw.records()[-1]["outcome"] == "upstream_failed"
    gw.upstream.behaviour.status = None
    assert_still_serves(gw)


@pytest.mark.parametrize("status", [400, 404, 422])
def test_upstream_client_errors_pass_through(gw, status):
    gw.upstream.behaviour.status = status
    gw.upstream.behaviour.error_body = {
        "error": {
            "message": "model foo does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    with gw.client() as http:
        r = http.post(CHAT, headers=gw.headers(), json=BODY)
    assert r.status_code == status and r.json() == gw.upstream.behaviour.error_body
    gw.upstream.behaviour.status = None
    assert_still_serves(gw)


def test_upstream_redirect_is_not_followed(gw):
    gw.upstream.behaviour.status = 302
    gw.upstream.behaviour.headers = [("location", gw.upstream.url + "/v1/models")]
    with gw.client() as http:
        assert_openai_error(http.post(CHAT, headers=gw.headers(), json=BODY), 502)
    assert len(gw.upstream.requests) == 1
    gw.upstream.behaviour.status = None
    assert_still_serves(gw)


def test_endless_stream_is_cut_at_the_response_limit(tmp_path, fake_upstream):
    fake_upstream.reset()
    fake_upstream.behaviour.text = "word " * 4000  # 20 KB of text, far more in events
    state = tmp_path / "state"
    key = Registry(state).add("hank")
    settings = config.parse(
        {"server": {"max_response_bytes": 4096}, "upstream": {"url": fake_upstream.url}, "state": {"dir": str(state)}},
        "test",
    )
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url) as http:
        r = http.post(CHAT, headers={"authorization": f"Bearer {key}"}, json={**BODY, "stream": True})
        assert r.status_code == 200 and len(r.content) < 8192
        assert b'"code": "upstream_error"' in r.content.splitlines()[-2]  # ends with an error event


class _FailingOnFox(WordCaps):
    def feed(self, text: str) -> str:
        if "fox" in text:
            raise RuntimeError("a fault inside the gateway, mid-stream")
        return super().feed(text)


@pytest.mark.parametrize(
    "path, body, error_event",
    [
        (CHAT, BODY, lambda event: json.loads(event.removeprefix("data: "))["error"]["code"] == "internal_error"),
        ("/v1/responses", {"model": "m", "input": "hi"}, lambda event: event.startswith("event: error\n")),
    ],
    ids=["chat", "responses"],
)
def test_a_fault_mid_stream_ends_it_with_an_error_event_of_the_routes_shape(gw, monkeypatch, path, body, error_event):
    gw.transform.enabled = True
    monkeypatch.setattr(gw.transform, "rewriter", lambda exchange, part: _FailingOnFox())
    with gw.client() as http:
        r = http.post(path, headers=gw.headers(), json={**body, "stream": True})
    last = r.text.strip().split("\n\n")[-1]
    assert r.status_code == 200 and error_event(last), last
    assert gw.records()[-1]["outcome"] == "internal_error"


def test_an_upstream_event_that_is_not_utf8_is_an_upstream_failure(gw):
    gw.transform.enabled = True  # the transform reads each event's text
    gw.upstream.behaviour.patch = lambda raw: raw.replace(b"fox", b"f\xffx")
    with gw.client() as http:
        r = http.post(CHAT, headers=gw.headers(), json={**BODY, "stream": True})
    last = r.content.strip().split(b"\n\n")[-1]
    assert r.status_code == 200 and json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_error"
    assert gw.records()[-1]["outcome"] == "upstream_failed"


@pytest.mark.parametrize("marked", [True, False])
@pytest.mark.parametrize("answer", [b"[]", b'"oops"', b"null", b"[1]", b"<html>busy</html>", b""])
def test_a_whole_answer_that_is_no_json_object_is_the_upstreams_failure(gw, answer, marked):
    """Whether or not a transform reads the answer's parts: an answer that is not JSON went out as a success
    where none did."""
    gw.transform.enabled = marked
    gw.upstream.behaviour.patch = lambda raw: answer
    with gw.client() as http:
        for path, body in ((CHAT, BODY), ("/v1/messages", {"model": "c", "max_tokens": 50, **BODY})):
            r = http.post(path, headers=gw.headers(), json=body)
            assert r.status_code == 502, (path, r.text)
            assert gw.records()[-1]["outcome"] == "upstream_failed"
    gw.upstream.behaviour.patch = None


@pytest.mark.parametrize("label", ["text/plain", None])
def test_a_whole_answer_under_another_label_is_read_and_marked(gw, label):
    gw.transform.enabled = True
    gw.upstream.behaviour.answer_type = label
    with gw.client() as http:
        r = http.post(CHAT, headers=gw.headers(), json=BODY)
    gw.upstream.behaviour.answer_type = "application/json"
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("THE quick brown FOX")
    assert gw.records()[-1]["outcome"] == "completed"


def test_upstream_timeout_is_504(gw):
    gw.upstream.behaviour.hang = 3.0  # read timeout is 1.5 s
    with gw.client() as http:
        assert_openai_error(http.post(CHAT, headers=gw.headers(), json=BODY), 504, "upstream_timeout")
    assert gw.records()[-1]["error"] == "timeout"
    gw.upstream.behaviour.hang = 0
    assert_still_serves(gw)


def test_upstream_dying_mid_stream_ends_with_an_error_event(gw):
    gw.upstream.behaviour.die_after_events = 4
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    with pytest.raises(openai.APIError, match="failed while answering"):
        for _ in client.chat.completions.create(model="m", messages=BODY["messages"], stream=True):
            pass
    ant = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    with (
        pytest.raises(anthropic.APIStatusError, match="failed while answering"),
        ant.messages.stream(model="c", max_tokens=5, messages=BODY["messages"]) as stream,
    ):
        for _ in stream:
            pass
    assert [r["outcome"] for r in gw.records()[-2:]] == ["upstream_failed", "upstream_failed"]
    gw.upstream.behaviour.die_after_events = None
    assert_still_serves(gw)


def test_client_disconnect_cancels_the_upstream_request(gw):
    gw.upstream.behaviour.event_delay = 0.2
    with gw.client() as http, http.stream("POST", CHAT, headers=gw.headers(), json={**BODY, "stream": True}) as r:
        for _ in r.iter_raw():
            break  # read one piece, then hang up
    assert gw.upstream.cancelled.wait(5), "the upstream never saw the request cancelled"
    assert gw.upstream.completed_streams == 0
    deadline = time.time() + 5
    while gw.records()[-1]["outcome"] != "client_cancelled" and time.time() < deadline:
        time.sleep(0.05)
    assert gw.records()[-1]["outcome"] == "client_cancelled"
    gw.upstream.behaviour.event_delay = 0
    assert_still_serves(gw)


def test_forwarded_for_is_believed_only_from_trusted_proxies(gw, untrusted):
    with gw.client() as http:
        http.post(CHAT, headers=gw.headers(**{"x-forwarded-for": "198.51.100.7, 203.0.113.9"}), json=BODY)
    assert gw.records()[-1]["client"] == gw.address("203.0.113.9")
    with httpx.Client(base_url=untrusted.url) as http:
        http.post(
            CHAT,
            headers={**gw.headers(**{"x-forwarded-for": "203.0.113.9"}), "authorization": f"Bearer {untrusted.key}"},
            json=BODY,
        )
    assert untrusted.records()[-1]["client"] == untrusted.address("127.0.0.1")


def test_revocation_reaches_the_running_gateway(gw):
    key = Registry(gw.state_dir).add("bob")
    with gw.client() as http:
        assert http.post(CHAT, headers=gw.headers(authorization=f"Bearer {key}"), json=BODY).status_code == 200
        Registry(gw.state_dir).revoke("bob")
        deadline = time.time() + 3
        while time.time() < deadline:
            status = http.post(CHAT, headers=gw.headers(authorization=f"Bearer {key}"), json=BODY).status_code
            if status == 401:
                break
            time.sleep(0.05)
    assert status == 401
    assert_still_serves(gw)


class Untrusted:
    """A sidecar with no trusted proxies, whose upstream port refuses connections."""

    def __init__(self, url, key, state_dir):
        self.url, self.key, self.state_dir = url, key, state_dir

    def records(self):
        return exchanges(self.state_dir)

    def address(self, ip: str) -> str:
        return address_hash(Keys.load(self.state_dir / "keys").address_key, ip)


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    state = tmp_path_factory.mktemp("untrusted")
    key = Registry(state).add("carol")
    with ServerThread(create_app(_settings(state, f"http://127.0.0.1:{dead_port}"))) as server:
        yield Untrusted(server.url, key, state)


def test_refused_upstream_is_502_and_readyz_says_so(untrusted):
    with httpx.Client(base_url=untrusted.url) as http:
        r = http.post(CHAT, headers={"authorization": f"Bearer {untrusted.key}"}, json=BODY)
        assert_openai_error(r, 502, "upstream_unavailable")
        r = http.post(CHAT, headers={"authorization": f"Bearer {untrusted.key}"}, json=BODY)
        assert r.status_code == 502  # and the worker is still there
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json()["checks"]["upstream"]
        assert http.get("/healthz").status_code == 200
    assert untrusted.records()[-1]["error"] == "refused"


@pytest.fixture(scope="module")
def passthrough(tmp_path_factory, fake_upstream):
    state = tmp_path_factory.mktemp("passthrough")
    settings = _settings(state, fake_upstream.url, trusted_proxies=[])
    settings = config.parse(
        {
            "upstream": {"url": fake_upstream.url, "passthrough": ["/v1/files", "/custom/"]},
            "state": {"dir": str(state)},
        },
        "test",
    )
    key = Registry(state).add("frank")
    with ServerThread(create_app(settings)) as server:
        yield server.url, key


def test_configured_passthrough_is_forwarded_as_is_to_identified_callers(passthrough, fake_upstream):
    url, key = passthrough
    fake_upstream.reset()
    with httpx.Client(base_url=url) as http:
        r = http.post("/v1/files?purpose=x", headers={"authorization": f"Bearer {key}"}, content=b"not json")
        assert r.status_code == 200 and r.json() == {"echo": "/v1/files", "body": "not json"}
        assert fake_upstream.requests[-1].query == "purpose=x"
        assert http.get("/custom/thing", headers={"authorization": f"Bearer {key}"}).status_code == 200
        assert_openai_error(http.get("/custom/thing"), 401)
        assert_openai_error(http.get("/v1/batches", headers={"authorization": f"Bearer {key}"}), 404)
    assert len(fake_upstream.requests) == 2


def test_passthrough_relays_not_modified_and_the_length_a_head_stands_for(tmp_path):
    async def files(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["method"] == "HEAD":
            headers = [(b"content-type", b"application/json"), (b"content-length", b"1234")]
            if scope["path"].endswith("gz"):  # the length of a body the client would get decompressed
                headers += [(b"content-encoding", b"gzip")]
        else:  # the client's If-None-Match matched
            headers = [(b"etag", b'"v1"'), (b"cache-control", b"max-age=60"), (b"set-cookie", b"up=1")]
            if scope["path"].endswith("sse"):
                headers += [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200 if scope["method"] == "HEAD" else 304,
                    "headers": headers})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})

    with ServerThread(files) as upstream:
        settings = _settings(tmp_path / "state", upstream.url)
        settings = replace(settings, upstream=replace(settings.upstream, passthrough=("/v1/files",)))
        auth = {"authorization": f"Bearer {Registry(tmp_path / 'state').add('ann')}"}
        with ServerThread(create_app(settings)) as gateway, httpx.Client(base_url=gateway.url) as http:
            cached = http.get("/v1/files/f1", headers={**auth, "if-none-match": '"v1"'})
            labelled = http.get("/v1/files/sse", headers={**auth, "if-none-match": '"v1"'})
            head = http.head("/v1/files/f1", headers=auth)
            compressed = http.head("/v1/files/gz", headers=auth)
    for answer in (cached, labelled):
        assert answer.status_code == 304 and answer.content == b""
        assert (answer.headers["etag"], answer.headers["cache-control"]) == ('"v1"', "max-age=60")
        assert not {"set-cookie", "content-type", "content-length"} & set(answer.headers)
    assert (head.status_code, head.headers["content-length"]) == (200, "1234")
    assert compressed.status_code == 200 and "content-length" not in compressed.headers


def test_strings_json_allows_but_utf8_cannot_encode_are_still_recorded(gw):
    body = b'{"model": "\\ud800", "messages": [{"role": "user", "content": "lone \\udfff surrogate"}]}'
    assert post_raw(gw, body).status_code == 200
    assert gw.records()[-1]["status"] == 200
    assert_still_serves(gw)


def test_passthrough_cannot_climb_out_of_its_prefix(passthrough, fake_upstream):
    url, key = passthrough
    fake_upstream.reset()
    with httpx.Client(base_url=url) as http:
        for path in ("/v1/files/%2e%2e/organization/admin_api_keys", "/v1/files/../x", "/v1/files-x",
                     "/v1/files/..%5c..%5cv1/organization"):  # fmt: skip
            r = http.get(path, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 404, path
    assert fake_upstream.requests == []


def test_every_forwarded_for_line_counts(gw):
    headers = [
        ("authorization", f"Bearer {gw.key}"),
        ("content-type", "application/json"),
        ("x-forwarded-for", "198.51.100.66"),
        ("x-forwarded-for", "203.0.113.77"),
    ]
    with gw.client() as http:
        assert http.post(CHAT, headers=headers, json=BODY).status_code == 200
    assert gw.records()[-1]["client"] == gw.address("203.0.113.77")  # the nearest hop, not the client's first line


def test_middleware_under_a_root_path_still_guards_the_api(tmp_path):
    from gateway.middleware import CanarygateMiddleware
    from tests.fake_upstream import FakeUpstream

    model = FakeUpstream()
    state = tmp_path / "state"
    key = Registry(state).add("ida")
    app = CanarygateMiddleware(model, settings=_settings(state, "http://unused.invalid"))
    # uvicorn puts root_path in front of the path it receives (a proxy in front strips the prefix)
    with ServerThread(app, root_path="/api") as server, httpx.Client(base_url=server.url) as http:
        assert_openai_error(http.post(CHAT, json=BODY), 401)  # no bypass under the mount point
        assert http.post(CHAT, json=BODY, headers={"authorization": f"Bearer {key}"}).is_success
    assert [r.path for r in model.requests] == ["/v1/chat/completions"]


def test_middleware_client_leaving_before_the_answer_stops_the_model(tmp_path):
    from gateway.middleware import CanarygateMiddleware
    from tests.fake_upstream import FakeUpstream

    model = FakeUpstream()
    model.behaviour.hang = 30  # a long generation before the first byte
    state = tmp_path / "state"
    key = Registry(state).add("jo")
    app = CanarygateMiddleware(model, settings=_settings(state, "http://unused.invalid"))
    with ServerThread(app) as server:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.5) as http:
            http.post(CHAT, json=BODY, headers={"authorization": f"Bearer {key}"})
        assert model.cancelled.wait(5), "the model kept generating for a client that had left"
        deadline = time.time() + 5
        while not exchanges(state) and time.time() < deadline:
            time.sleep(0.05)
    assert exchanges(state)[-1]["outcome"] == "client_cancelled"
