"""Admission in a running gateway (memory storage): limits, their headers and errors in each API's shape,
reservations and settlement, tiers, tarpits, concurrency, and unauthenticated floods."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import anthropic
import httpx
import openai
import pytest

from gateway.evidence.keys import Keys
from gateway.evidence.reader import LogReader
from tests.conftest import exchanges
from tests.ratelimit.conftest import running_gateway

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
MESSAGE = {"model": "claude", "max_tokens": 100, "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(autouse=True)
def clean_upstream(fake_upstream):
    fake_upstream.reset()
    yield fake_upstream


def test_an_answer_carries_the_limits_in_force_in_openai_headers(limited):
    _, key = limited.identity()
    with limited.client(key) as http:
        response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    h = response.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("3", "2")
    assert h["x-ratelimit-reset-requests"].endswith("ms")  # one request back every 667 ms
    assert h["x-ratelimit-limit-tokens"] == "20000"
    assert '"requests-2s";q=3;w=2' in h["ratelimit-policy"] and '"concurrency";q=2' in h["ratelimit-policy"]
    assert '"requests-2s";r=2;t=1' in h["ratelimit"]


def test_the_request_over_the_limit_gets_429_in_openai_shape_and_may_retry_when_told(limited):
    name, key = limited.identity()
    with limited.client(key) as http:
        statuses = [http.post("/v1/chat/completions", json=CHAT).status_code for _ in range(3)]
        refused = http.post("/v1/chat/completions", json=CHAT)
        assert statuses == [200, 200, 200] and refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert "requests per 2 seconds (limit 3)" in error["message"]
        wait_ms = int(refused.headers["retry-after-ms"])
        assert 0 < wait_ms <= 667 and refused.headers["retry-after"] == "1"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        time.sleep(wait_ms / 1000)
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    mine = [e for e in exchanges(limited.state_dir) if e["identity"] == name]
    assert [e["status"] for e in mine] == [200, 200, 200, 429, 200]  # refusals are on record too


def test_anthropic_routes_get_anthropic_headers_and_error_shape(limited):
    _, key = limited.identity()
    with limited.client(key) as http:
        first = http.post("/v1/messages", json=MESSAGE)
        for _ in range(2):
            http.post("/v1/messages", json=MESSAGE)
        refused = http.post("/v1/messages", json=MESSAGE)
    assert first.headers["anthropic-ratelimit-requests-limit"] == "3"
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "2"
    assert first.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")
    assert "x-ratelimit-limit-requests" not in first.headers
    assert refused.status_code == 429
    assert refused.json() == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": refused.json()["error"]["message"]},
    }
    assert "retry-after" in refused.headers


def test_output_limit_is_set_when_missing_and_capped_by_the_tier(limited, clean_upstream):
    _, normal = limited.identity()
    with limited.client(normal) as http:
        http.post("/v1/chat/completions", json=CHAT)
        http.post(
            "/v1/chat/completions",
            content=json.dumps({**CHAT, "max_tokens": 1000}),
            headers={"content-type": "application/json"},
        )
    with limited.client(limited.identity("suspect")[1]) as http:  # one request per 6.7 s: one each
        http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1000})
    with limited.client(limited.identity("suspect")[1]) as http:
        http.post("/v1/messages", json={**MESSAGE, "max_tokens": 10})
    sent = [r.json() for r in clean_upstream.requests]
    assert sent[0]["max_completion_tokens"] == 500  # [limits] default_max_tokens
    assert sent[1]["max_tokens"] == 1000 and "max_completion_tokens" not in sent[1]  # within every cap: untouched
    assert sent[2]["max_tokens"] == 64  # the suspect tier's cap
    assert sent[3]["max_tokens"] == 10
    assert clean_upstream.requests[1].body == json.dumps({**CHAT, "max_tokens": 1000}).encode()  # byte for byte


def test_a_stream_asks_for_usage_and_the_client_only_sees_it_if_it_asked(limited, clean_upstream):
    name, key = limited.identity()
    with limited.client(key) as http:
        plain = http.post("/v1/chat/completions", json={**CHAT, "stream": True}).text
        asked = http.post(
            "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        ).text
    assert clean_upstream.requests[0].json()["stream_options"] == {"include_usage": True}
    assert '"usage"' not in plain and plain.rstrip().endswith("data: [DONE]")
    assert '"usage"' in asked
    records = [e for e in exchanges(limited.state_dir) if e["identity"] == name]
    assert records[0]["usage"]["total_tokens"] > 0  # recorded, though the client never saw it


def test_token_reservations_are_settled_by_the_real_usage(limited):
    _, key = limited.identity()
    with limited.client(key) as http:
        first = http.post("/v1/chat/completions", json=CHAT)
        used = first.json()["usage"]["total_tokens"]
        second = http.post("/v1/chat/completions", json=CHAT)
    reserved = 20000 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert reserved > 500 >= used  # the prompt's estimate plus the output limit
    # the first reservation was replaced by what it used; the second is still reserved
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 20000 - used - reserved


def test_too_large_a_request_for_the_whole_budget_is_refused_for_good(limited):
    _, key = limited.identity()
    with limited.client(key) as http:
        refused = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 50000})
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "request_too_large" and "retry-after" not in refused.headers


def test_a_request_for_several_answers_reserves_each_one(limited):
    """n answers of up to max_tokens each: the reservation, and the check against the whole budget, count all."""
    _, key = limited.identity()
    with limited.client(key) as http:
        one = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8000})
        three = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8000, "n": 3})
        bad = http.post("/v1/chat/completions", json={**CHAT, "n": 0})
    assert one.status_code == 200 and three.status_code == 413  # 24,000 tokens: more than the budget of 20,000
    with limited.client(key) as http:  # a list of prompts is answered n times each, as a batch of requests
        batch = {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 8000}
        assert http.post("/v1/completions", json={**batch, "prompt": "a"}).status_code == 200
        assert http.post("/v1/completions", json=batch).status_code == 413
    assert bad.status_code == 400 and "'n' must be an integer from 1 to 128" in bad.json()["error"]["message"]


def test_an_output_limit_beyond_any_token_count_is_a_bad_request(limited):
    """JSON allows an integer of a thousand digits; the limits' arithmetic (doubles) would overflow on it."""
    _, key = limited.identity()
    with limited.client(key) as http:
        chat = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**400})
        message = http.post("/v1/messages", json={"model": "c", "max_tokens": 10**400, "messages": CHAT["messages"]})
    assert chat.status_code == 400 and "from 0 to 2**53" in chat.json()["error"]["message"]
    assert message.status_code == 400 and message.json()["error"]["type"] == "invalid_request_error"


def test_an_unlimited_identity_cannot_give_its_tenant_tokens_back():
    """A tier that does not enforce reserves nothing (its usage is debited once known): a reservation it never
    had to fit, refunded, gave back tokens never taken, and reset the budget its tenant's others share."""
    from gateway import config
    from gateway.exchange import Exchange, GatewayError, Identity
    from gateway.ratelimit import open_admitter

    limits = {"identity": {"requests": "1000/minute"}, "tenant": {"tokens": "1000/day"}}
    settings = config.parse({"limits": limits}, "t")
    admitter = open_admitter(settings)
    alice, ci = Identity("alice", "normal", "acme"), Identity("ci", "unlimited", "acme")

    async def request(identity: Identity, max_tokens: int, used: int) -> int:
        exchange = Exchange(f"r{id(object())}", "POST", "/v1/chat/completions", "openai", None, "192.0.2.1")
        exchange.identity, exchange.prompt_tokens, exchange.requested_output = identity, 10, max_tokens
        try:
            await admitter.admit(exchange)
        except GatewayError as refused:
            return refused.status
        exchange.upstream_status, exchange.tokens_used = 200, used
        await admitter.release(exchange)
        return 200

    async def run() -> tuple[list[int], int, list[int]]:
        first = [await request(alice, 490, 500) for _ in range(3)]
        unlimited = await request(ci, 10**6, 20)
        return first, unlimited, [await request(alice, 490, 500) for _ in range(2)]

    assert asyncio.run(run()) == ([200, 200, 429], 200, [429, 429])


def test_blocked_identities_are_refused_and_unlimited_ones_never_are(limited):
    _, blocked = limited.identity("blocked")
    _, unlimited = limited.identity("unlimited")
    with limited.client(blocked) as http:
        refused = http.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert "x-ratelimit-limit-requests" not in refused.headers
    with limited.client(unlimited) as http:
        answers = [http.post("/v1/chat/completions", json=CHAT) for _ in range(8)]
    assert [r.status_code for r in answers] == [200] * 8
    assert "x-ratelimit-limit-requests" not in answers[0].headers  # the tier sends no headers


def test_a_tier_change_applies_to_the_next_request(limited):
    name, key = limited.identity()
    with limited.client(key) as http:
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        limited.registry.set_tier(name, "blocked")
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 403
        limited.registry.set_tier(name, "normal")
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_tarpit_delays_a_suspect_and_tells_it_nothing(limited):
    _, suspect = limited.identity("suspect")
    with limited.client(suspect) as http:
        started = time.perf_counter()
        response = http.post("/v1/chat/completions", json=CHAT)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200 and elapsed >= 0.3
    assert not any("tarpit" in k or "tier" in k or "suspect" in v for k, v in response.headers.items())
    # the limits told are the ones in force: 3 per 2 seconds at scale 0.1 is one request per 7 (6.67) seconds
    assert response.headers["x-ratelimit-limit-requests"] == "1"
    assert '"requests-7s";q=1;w=7' in response.headers["ratelimit-policy"]


def test_concurrency_is_limited_and_released(limited, clean_upstream):
    _, key = limited.identity()
    clean_upstream.behaviour.hang = 0.6
    with concurrent.futures.ThreadPoolExecutor(3) as pool:

        def call(delay):
            time.sleep(delay)
            with limited.client(key) as http:
                return http.post("/v1/chat/completions", json=CHAT)

        answers = list(pool.map(call, [0, 0, 0.2]))
    refused = answers[2]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert "concurrent" in refused.json()["error"]["message"]
    clean_upstream.behaviour.hang = 0
    time.sleep(0.4)
    with limited.client(key) as http:
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200  # the leases were returned


def test_unauthenticated_requests_are_limited_per_address(limited):
    with limited.client("cg_nothere_wrong") as http:
        statuses = [http.post("/v1/chat/completions", json=CHAT).status_code for _ in range(7)]
        last = http.post("/v1/chat/completions", json=CHAT)
    assert statuses[:5] == [401] * 5 and statuses[5:] == [429, 429]
    assert last.json()["error"]["code"] == "rate_limit_exceeded" and int(last.headers["retry-after"]) > 0


@pytest.mark.parametrize("method, path", [("POST", "/v1/nothing"), ("GET", "/v1/chat/completions")])
def test_requests_for_unknown_routes_or_methods_are_limited_per_address(fake_upstream, tmp_path, method, path):
    limits = {"unauthenticated": "5/minute"}
    with running_gateway(tmp_path / "state", fake_upstream.url, limits) as gateway, gateway.client("x") as http:
        statuses = [http.request(method, path, json=CHAT).status_code for _ in range(7)]
    assert statuses[:5] == [404 if method == "POST" else 405] * 5 and statuses[5:] == [429, 429]


@pytest.mark.parametrize(
    "headers, body, status",
    [
        ({"content-type": "application/json"}, b"{not json", 400),
        ({"content-type": "text/plain"}, b"hi", 415),
        ({"content-type": "application/json"}, b" " * (4 * 1024 * 1024 + 1), 413),  # over max_body_bytes
    ],
)
def test_an_identified_callers_bad_requests_count_against_its_request_limit_with_no_tokens(
    fake_upstream, tmp_path, headers, body, status
):
    """Refused before admission (400, 415, 413), they were refused, and recorded, without limit. A bad request
    that reserved the default output (500 tokens, over the day's 100) would be refused as too large instead."""
    limits = {"identity": {"requests": "5/minute", "tokens": "100/day"}, "default_max_tokens": 500}
    with running_gateway(tmp_path / "state", fake_upstream.url, limits) as gateway:
        _, key = gateway.identity()
        with gateway.client(key) as http:
            bad = [http.post("/v1/chat/completions", content=body, headers=headers).status_code for _ in range(4)]
            good = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10})
            last = http.post("/v1/chat/completions", content=body, headers=headers)
    assert bad == [status] * 4
    assert good.status_code == 200 and last.status_code == 429
    assert last.json()["error"]["code"] == "rate_limit_exceeded"


def test_an_identity_in_a_tier_the_configuration_no_longer_defines_is_refused_not_served_as_normal(limited):
    """A tier renamed or removed from [limits.tiers] (or mistyped) lifted its identities' restrictions."""
    _, key = limited.identity(tier="banned")
    with limited.client(key) as http:
        refused = [http.post("/v1/chat/completions", json=CHAT) for _ in range(2)]
    assert [r.status_code for r in refused] == [403, 403]
    assert refused[0].json()["error"]["code"] != "rate_limit_exceeded"


def test_openai_sdk_retries_a_429_as_told_and_gets_through(limited):
    name, key = limited.identity()
    client = openai.OpenAI(base_url=limited.url + "/v1", api_key=key, max_retries=3)
    for _ in range(5):
        assert client.chat.completions.create(model="m", messages=CHAT["messages"]).choices[0].message.content
    statuses = [e["status"] for e in exchanges(limited.state_dir) if e["identity"] == name]
    assert statuses.count(200) == 5 and 429 in statuses  # it was refused, waited as told, and succeeded


def test_anthropic_sdk_reads_the_rate_limit_headers(limited):
    _, key = limited.identity()
    client = anthropic.Anthropic(base_url=limited.url, api_key=key, max_retries=3)
    raw = client.messages.with_raw_response.create(**MESSAGE)
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "2"
    assert raw.parse().content[0].text


def test_unauthenticated_floods_are_summarised_not_recorded_one_by_one(fake_upstream, tmp_path):
    limits = {"unauthenticated": "1000/minute"}
    with running_gateway(tmp_path / "state", fake_upstream.url, limits) as gateway, gateway.client("x") as http:
        statuses = [http.post("/v1/chat/completions", json=CHAT).status_code for _ in range(40)]
    assert statuses == [401] * 40
    publics = [p for p in _publics(tmp_path / "state")]
    assert [p["kind"] for p in publics].count("begin") == 10  # [evidence] unauthenticated_records, 10/minute
    summary = [p for p in publics if p["kind"] == "summary"]
    assert len(summary) == 1 and summary[0]["requests"] == 30 and summary[0]["addresses"] == 1  # at shutdown
    assert "127.0.0.1" not in json.dumps(summary)  # which addresses is sealed


def _publics(state_dir):
    keys = Keys.load(state_dir / "keys")
    return [
        item.public for f in sorted((state_dir / "evidence").glob("[0-9]*")) for item in LogReader(f, keys).entries()
    ]


def test_an_answer_cut_short_keeps_its_reservation_whatever_part_of_its_usage_came():
    """Anthropic's message_start counts one output token; the real count comes at the end. A client that reads
    the text and leaves before it, or a stream that fails, must not be refunded down to that first count."""
    from gateway import config
    from gateway.exchange import Exchange, GatewayError, Identity, Outcome
    from gateway.ratelimit import open_admitter

    settings = config.parse({"limits": {"identity": {"requests": "1000/minute", "tokens": "1000/day"}}}, "t")
    admitter = open_admitter(settings)
    alice = Identity("alice", "normal")

    async def request(outcome: Outcome) -> int:
        exchange = Exchange(f"r{id(object())}", "POST", "/v1/messages", "anthropic", None, "192.0.2.1")
        exchange.identity, exchange.prompt_tokens, exchange.requested_output = alice, 10, 390
        try:
            await admitter.admit(exchange)
        except GatewayError as refused:
            return refused.status
        exchange.upstream_status, exchange.tokens_used, exchange.outcome = 200, 11, outcome
        await admitter.release(exchange)
        return 200

    async def run() -> list[int]:
        return [await request(outcome) for outcome in [Outcome.CLIENT_CANCELLED, Outcome.UPSTREAM_FAILED] * 2]

    assert asyncio.run(run()) == [200, 200, 429, 429]  # 400 reserved and kept by each of the first two


def test_every_part_of_a_request_counts_toward_its_prompt_but_base64_data_does_not(limited):
    """Tools, tool results and list inputs are prompt too: 100 KB of them is beyond a budget of 20,000 tokens.
    An image's base64 is not: the upstream counts an image by its tiles, not its size."""
    _, key = limited.identity()
    big = "word " * 20000
    tools = [{"type": "function", "function": {"name": "f", "description": big, "parameters": {"type": "object"}}}]
    result = [{"type": "tool_result", "tool_use_id": "t", "content": big}]
    image = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 300_000}}]  # fmt: skip
    asks = [
        ("/v1/chat/completions", {**CHAT, "tools": tools}),
        ("/v1/messages", {**MESSAGE, "messages": [{"role": "user", "content": result}]}),
        ("/v1/embeddings", {"model": "e", "input": [big]}),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": image}]}),
    ]
    # text that starts like a data URI is text; a CJK prompt sent with \\u escapes is six bytes a character on the
    # wire but three as the model reads it (15,000 characters fit the budget of 20,000); nesting deeper than
    # the recursion limit is a 400, not a 500
    text_as_data = [{"type": "text", "text": "data:" + big}]
    # nor does text shaped like a payload where the model reads it (a tool call's input), or with the base64
    # alphabet at its start only
    b64_then_text = "A" * 4096 + big
    shaped = {"image_url": "data:image/png;base64," + b64_then_text, "source": {"type": "base64", "data": big}}
    tool_use = {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": shaped}]}
    asks += [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "data:" + big}]}),
        ("/v1/messages", {**MESSAGE, "messages": [{"role": "user", "content": text_as_data}]}),
        (
            "/v1/messages",
            {**MESSAGE, "messages": [{"role": "user", "content": "hi"}, tool_use, {"role": "user", "content": "and?"}]},
        ),  # fmt: skip
    ]
    escaped = json.dumps({**CHAT, "messages": [{"role": "user", "content": "猫" * 15000}]}).encode()  # ensure_ascii
    with limited.client(key) as http:
        statuses = [http.post(path, json=body).status_code for path, body in asks]
        headers = {"content-type": "application/json"}
        statuses.append(http.post("/v1/chat/completions", content=escaped, headers=headers).status_code)
        image = b'{"type": "image", "source": {"type": "base64", "data": "QUFB"}}'
        deep_body = json.dumps(CHAT).encode()[:-1] + b', "x": ' + b"[" * 1000 + image + b"]" * 1000 + b"}"
        statuses.append(http.post("/v1/chat/completions", content=deep_body, headers=headers).status_code)
    assert statuses == [413, 413, 413, 200, 413, 413, 413, 200, 400]


def test_a_request_setting_both_output_fields_is_held_to_what_was_reserved(limited, fake_upstream):
    """Admission reserves the smaller of max_tokens and max_completion_tokens; an upstream that honours the
    other must not be asked for more."""
    _, key = limited.identity()
    with limited.client(key) as http:
        http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10, "max_completion_tokens": 100_000})
    sent = json.loads(fake_upstream.requests[-1].body)
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (10, 10)


def test_a_request_refused_by_one_address_window_is_not_counted_in_the_others():
    from gateway.config import rates
    from gateway.exchange import GatewayError
    from gateway.ratelimit.addresses import AddressLimiter

    limiter = AddressLimiter(rates("10/hour; 2/minute"))

    async def run() -> list[str]:
        seen = []
        for _ in range(12):
            try:
                await limiter.check("192.0.2.1")
                seen.append("ok")
            except GatewayError as refused:
                seen.append("minute" if "per minute" in refused.message else "hour")
        return seen

    assert asyncio.run(run()) == ["ok", "ok"] + ["minute"] * 10
    stats = asyncio.run(limiter._local.get_window_stats(limiter._items[0], "unauthenticated", "192.0.2.1"))
    assert stats.remaining == 8  # the hour's window counted the two admitted only


def test_a_client_that_leaves_in_the_tarpit_sends_nothing_upstream(limited, clean_upstream):
    _, suspect = limited.identity("suspect")  # a tarpit of 300 ms (and one request in 7 s)
    _, warm = limited.identity()
    with limited.client(warm) as http:
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200  # a pooled upstream connection
    sent = len(clean_upstream.requests)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=limited.url, timeout=0.1) as http:
        http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {suspect}"})
    time.sleep(0.6)
    assert len(clean_upstream.requests) == sent
