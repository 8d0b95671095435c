"""The admin endpoint: an operator sets an identity's tier over HTTP, with a token, as `tier set` does."""

from __future__ import annotations

import asyncio

import httpx

from gateway import config
from gateway.admin import GUESS_WINDOW, GUESSES, Refusals, TierAdmin
from gateway.app import create_app
from gateway.identity import Registry
from tests.conftest import STATE_DIRS, ServerThread


def _gateway_settings(tmp_path, fake_upstream, monkeypatch, token: str) -> tuple:
    monkeypatch.setenv("CG_TEST_ADMIN_TOKEN", token)
    state = tmp_path / "state"
    STATE_DIRS.append(state)
    settings = config.parse({"upstream": {"url": fake_upstream.url}, "state": {"dir": str(state)},
                             "server": {"admin_token_env": "CG_TEST_ADMIN_TOKEN"}}, "admin test")  # fmt: skip
    return state, settings


def test_the_admin_endpoint_sets_a_tier_for_the_token_holder_only_and_keeps_a_pin(
    tmp_path, fake_upstream, monkeypatch, caplog
):
    state, settings = _gateway_settings(tmp_path, fake_upstream, monkeypatch, "s3cret-token")
    registry = Registry(state)
    key = registry.add("carol")
    registry.set_tier("carol", "normal", pin="our partner")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url) as http:
        admin = {"authorization": "Bearer s3cret-token"}
        assert http.get("/admin/tiers/carol").status_code == 401
        assert (
            http.put("/admin/tiers/carol", json={"tier": "blocked"}, headers={"authorization": "Bearer x"}).status_code
            == 401
        )
        assert http.get("/admin/tiers/carol", headers=admin).json() == {"name": "carol", "tier": "normal"}
        assert http.get("/admin/tiers/nobody", headers=admin).status_code == 404
        assert http.put("/admin/tiers/carol", json={"tier": "Blocked"}, headers=admin).status_code == 400
        deep = http.put("/admin/tiers/carol", content=b"[" * 4000, headers=admin)  # a 500 and a traceback before
        assert deep.status_code == 400 and "error" in deep.json()
        assert http.put("/admin/tiers/carol", json={"tier": "blocked"}, headers=admin).json()["tier"] == "blocked"
        refused = http.post("/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {key}"})
    assert refused.status_code == 403  # in force on the next request
    warned = [r.getMessage() for r in caplog.records if r.name == "canarygate.admin"]  # a guess is seen, not its token
    assert len(warned) == 2 and "refused PUT /admin/tiers/carol" in warned[1] and "Bearer x" not in str(warned)
    assert (registry.get("carol").tier, registry.get("carol").pin) == ("blocked", "our partner")


def test_an_address_that_keeps_guessing_is_locked_out_even_with_the_token(tmp_path, fake_upstream, monkeypatch):
    state, settings = _gateway_settings(tmp_path, fake_upstream, monkeypatch, "s3cret-token")
    Registry(state).add("carol")
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url) as http:
        guesses = [http.get("/admin/tiers/carol", headers={"authorization": f"Bearer {i}"}) for i in range(GUESSES)]
        locked = http.get("/admin/tiers/carol", headers={"authorization": "Bearer s3cret-token"})
    assert {r.status_code for r in guesses} == {401}
    assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= GUESS_WINDOW
    assert "error" in locked.json()


def test_refusals_are_counted_per_address_in_windows_and_forgotten_oldest_first():
    refusals = Refusals()
    for _ in range(GUESSES):
        assert refusals.locked_for("a", 100.0) == 0
        refusals.note("a", 100.0)
    assert refusals.locked_for("a", 130.0) == GUESS_WINDOW - 30 and refusals.locked_for("b", 130.0) == 0
    assert refusals.locked_for("a", 100.0 + GUESS_WINDOW) == 0  # the window is over
    refusals.note("a", 100.0 + GUESS_WINDOW)  # a new window, with one refusal
    assert refusals.locked_for("a", 100.0 + GUESS_WINDOW) == 0
    for _ in range(GUESSES):
        refusals.note("b", 190.0)
    for i in range(4095):
        refusals.note(f"10.0.{i // 256}.{i % 256}", 200.0)
    assert refusals.locked_for("b", 200.0) == GUESS_WINDOW - 10  # kept: "a" went first
    refusals.note("10.99.0.1", 200.0)
    assert refusals.locked_for("b", 200.0) == 0 and len(refusals._windows) == 4096  # memory stays bounded


def test_a_token_read_from_a_file_with_its_newline_still_works(tmp_path, fake_upstream, monkeypatch):
    state, settings = _gateway_settings(tmp_path, fake_upstream, monkeypatch, "s3cret-token\n")
    Registry(state).add("carol")
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/admin/tiers/carol", headers={"authorization": "Bearer s3cret-token"}).status_code == 200


def test_a_tier_written_while_another_operator_pins_or_revokes_keeps_their_change(tmp_path):
    """The registry record was read before the limit storage's round trip and written back after it: a pin set
    meanwhile was erased, and a revocation meanwhile raised out of the handler (a bare 500)."""
    registry = Registry(tmp_path)
    registry.add("bot")
    registry.add("gone")

    class Meanwhile:  # the limit storage's round trip, during which another operator acts
        async def set_tier(self, identity, tier):
            if identity.name == "bot":
                Registry(tmp_path).set_tier("bot", "suspect", pin="campaign")
            else:
                Registry(tmp_path).revoke("gone")

    admin = TierAdmin(registry, Meanwhile(), config.Settings().limits.tiers, "tok")

    async def put(name: str):
        body = [{"type": "http.request", "body": b'{"tier": "watch"}', "more_body": False}]
        scope = {"type": "http", "method": "PUT", "path": f"/admin/tiers/{name}", "client": ("127.0.0.1", 1),
                 "headers": [(b"authorization", b"Bearer tok")]}  # fmt: skip
        return await admin.handle(scope, lambda: asyncio.sleep(0, body.pop(0)))

    assert asyncio.run(put("bot"))[0] == 200
    assert (Registry(tmp_path).get("bot").tier, Registry(tmp_path).get("bot").pin) == ("watch", "campaign")
    assert asyncio.run(put("gone"))[0] == 404
