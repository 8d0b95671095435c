"""The admission arithmetic: GCRA budgets, leases and tiers, the same in memory and in the Redis script."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway import config
from gateway.exchange import Identity
from gateway.ratelimit import open_admitter
from gateway.ratelimit.budget import Ask, Check, MemoryBudget, Plan, Status, TierTable, TierTerms
from gateway.ratelimit.redis_budget import RedisBudget
from gateway.redis_client import connect
from tests import redis_servers

TIERS = TierTable(
    normal=TierTerms(1.0, True, 0),
    watch=TierTerms(0.5, True, 300),
    blocked=TierTerms(0.0, True, 0),
    unlimited=TierTerms(1.0, False, 0),
)


def ask(name="a", tier="normal", prompt=10, output=None, lease="l1", checks=None, choices=1) -> Ask:
    checks = checks or (
        Check(f"{{{name}}}:r:1000", "requests", 5, 1000),
        Check(f"{{{name}}}:r:60000", "requests", 20, 60000),
        Check(f"{{{name}}}:t:60000", "tokens", 2000, 60000),
        Check(f"{{{name}}}:c", "concurrent", 3),
    )
    return Ask(plan(f"{{{name}}}:tier", checks), tier, TIERS, lease, 30000, prompt, output, 100, choices)


def plan(tier_key: str, checks) -> Plan:
    return Plan(tier_key, tuple(c for c in checks if c.period_ms), tuple(c for c in checks if not c.period_ms))


def test_requests_budget_admits_its_burst_then_refills_one_per_interval():
    budget = MemoryBudget()
    check = (Check("k", "requests", 5, 1000),)
    verdicts = [budget.decide(ask(checks=check, lease=str(i)), now=0) for i in range(6)]
    assert [v.status for v in verdicts] == [Status.ADMITTED] * 5 + [Status.LIMITED]
    assert [v.remaining[0] for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    assert verdicts[5].retry_ms == 200  # one unit every 1000 / 5 ms
    assert budget.decide(ask(checks=check), now=199).status is Status.LIMITED
    assert budget.decide(ask(checks=check), now=200).status is Status.ADMITTED


def test_token_reservation_is_corrected_by_real_usage():
    budget = MemoryBudget()
    check = (Check("t", "tokens", 1000, 60000),)
    first = budget.decide(ask(checks=check, prompt=100, output=400), now=0)
    assert (first.status, first.reserved, first.remaining[0]) == (Status.ADMITTED, 500, 500)
    budget.correct(ask(checks=check), first, -450, now=0)  # it used 50 tokens: 450 come back
    assert budget.decide(ask(checks=check, prompt=0, output=0), now=0).remaining[0] == 950
    budget.correct(ask(checks=check), first, +2000, now=0)  # debt beyond the budget: refused until repaid
    refused = budget.decide(ask(checks=check, prompt=1, output=0), now=0)
    assert refused.status is Status.LIMITED and refused.retry_ms > 60000


def test_an_unlimited_identity_is_debited_at_most_one_period_ahead_at_its_end_as_at_its_admission():
    """It reserves nothing, so its whole usage is a debt at the end; uncapped, one long answer pushed a shared
    (tenant) budget hours ahead and locked the tenant's other identities out for longer than its period."""
    budget = MemoryBudget()
    check = (Check("tenant", "tokens", 10_000, 3_600_000),)
    bench = budget.decide(ask(checks=check, tier="unlimited", prompt=100, output=100), now=0)
    budget.correct(ask(checks=check, tier="unlimited"), bench, 30_000, now=0)
    refused = budget.decide(ask(checks=check, prompt=100, output=400), now=0)
    assert refused.status is Status.LIMITED and refused.retry_ms <= 3_600_000


def test_a_request_larger_than_the_whole_budget_is_refused_as_too_large():
    verdict = MemoryBudget().decide(ask(checks=(Check("t", "tokens", 1000, 60000),), prompt=10, output=5000), now=0)
    assert verdict.status is Status.TOO_LARGE


def test_tier_cap_limits_the_reserved_output_and_scale_shrinks_budgets():
    verdict = MemoryBudget().decide(ask(tier="watch", prompt=10, output=None), now=0)
    assert verdict.output_cap == 100  # the default output, under the cap of 300
    verdict = MemoryBudget().decide(ask(tier="watch", prompt=10, output=1000), now=0)
    assert (verdict.output_cap, verdict.reserved) == (300, 310)
    assert verdict.remaining[0] == 1  # 5 per second at scale 0.5, one taken


def test_blocked_and_unlimited_tiers():
    budget = MemoryBudget()
    assert budget.decide(ask(tier="blocked"), now=0).status is Status.BLOCKED
    statuses = {budget.decide(ask(tier="unlimited", lease=str(i)), now=0).status for i in range(50)}
    assert statuses == {Status.ADMITTED}  # evaluated, never refused
    assert budget.decide(ask(tier="normal"), now=0).status is Status.LIMITED  # ... but it did spend the budget


def test_concurrency_leases_are_released_and_lapse():
    budget = MemoryBudget()
    held = [budget.decide(ask(lease=f"l{i}"), now=0) for i in range(3)]
    assert all(v.status is Status.ADMITTED for v in held)
    assert budget.decide(ask(lease="l3"), now=1).failed == 4  # the lease set refused
    budget.correct(ask(lease="l0"), held[0], 0, now=1)
    assert budget.decide(ask(lease="l4"), now=2).status is Status.ADMITTED
    # leases whose holder stopped its heartbeat lapse after their ttl
    assert budget.decide(ask(lease="l5"), now=30001 + 1000).status is Status.ADMITTED


def test_a_lease_kept_alive_by_its_heartbeat_holds_its_slot_in_both_engines():
    """A request longer than the lease's ttl (a long stream) keeps its slot while its heartbeat runs, even when
    no other admission renews the lease set (on Redis the set's own expiry lapsed and took the lease with it)."""
    slots = plan("{a}:tier", (Check("{a}:c", "concurrent", 1, 0),))

    def one_second_lease(lease: str) -> Ask:
        return Ask(slots, "normal", TIERS, lease, 1000, 10, None, 100)

    async def run(budget) -> list[Status]:
        assert (await budget.admit(one_second_lease("long"))).status is Status.ADMITTED
        statuses = []
        for _ in range(4):
            await asyncio.sleep(0.4)
            await budget.extend([("{a}:c", "long")], 1000)  # every ttl / 2.5; the ttl itself passes twice
            statuses.append((await budget.admit(one_second_lease("other"))).status)
        return statuses

    assert asyncio.run(run(MemoryBudget())) == [Status.LIMITED] * 4
    with redis_servers.standalone() as server:

        async def remote() -> list[Status]:
            client = connect(server.url, timeout=1.0)
            try:
                return await run(RedisBudget(client))
            finally:
                await client.aclose()

        assert asyncio.run(remote()) == [Status.LIMITED] * 4


def test_memory_share_divides_every_limit():
    budget = MemoryBudget(divisor=5)
    check = (Check("k", "requests", 10, 1000),)
    assert [budget.decide(ask(checks=check, lease=str(i)), now=0).status for i in range(3)] == [
        Status.ADMITTED,
        Status.ADMITTED,
        Status.LIMITED,
    ]


def test_redis_script_and_memory_engine_agree_on_random_sequences():
    """The same random admissions, corrections and tier overrides, with the same clock, give the same answers."""
    with redis_servers.standalone() as server:
        asyncio.run(_compare(server.url))


async def _compare(url: str) -> None:
    client = connect(url, timeout=1.0)
    remote, local = RedisBudget(client), MemoryBudget()
    rng = random.Random(7)
    now = 1_700_000_000_000.0
    open_leases = []
    try:
        for step in range(1500):
            now += rng.choice([0, 0, 1, 7, 50, 333, 2000])
            roll = rng.random()
            name = rng.choice("ab")
            if roll < 0.05:
                tier = rng.choice([None, *TIERS, "retired-tier"])
                await remote.set_tier(f"{{{name}}}:tier", tier)
                await local.set_tier(f"{{{name}}}:tier", tier)
            elif roll < 0.3 and open_leases:
                held_ask, verdict = open_leases.pop(rng.randrange(len(open_leases)))
                correction = rng.randint(-verdict.reserved, 500)
                await remote.settle(held_ask, verdict, correction, now_ms=now)
                local.correct(held_ask, verdict, correction, now=now)
            else:
                a = ask(
                    name,
                    tier=rng.choice(["normal", "watch", "unlimited"]),
                    prompt=rng.randint(0, 400),
                    output=rng.choice([None, 0, 50, 250, 900]),
                    lease=f"l{step}",
                    choices=rng.choice([1, 1, 1, 2, 5]),
                )
                expected = local.decide(a, now=now)
                got = await remote.admit(a, now_ms=now)
                assert got == expected, f"step {step}"
                if got.status is Status.ADMITTED:
                    open_leases.append((a, got))
    finally:
        await client.aclose()


def test_remaining_counts_whole_units_where_the_interval_is_not_a_whole_number_of_ms():
    """3 per 2 s is one request every 666.67 ms: at epoch milliseconds, 2000 - 666.67 ms is 1.9999999 intervals
    in floats. Both engines must still say 2 left (they said 1)."""
    checks = (Check("{k}:r:2000", "requests", 3, 2000), Check("{k}:r:60000", "requests", 7, 60000))
    now = 1_764_300_000_123.0
    expected = [(2, 6), (1, 5), (0, 4)]
    local = MemoryBudget()
    assert [local.decide(ask(checks=checks, lease=str(i)), now=now).remaining for i in range(3)] == expected
    with redis_servers.standalone() as server:

        async def run():
            client = connect(server.url, timeout=1.0)
            budget = RedisBudget(client)
            verdicts = [await budget.admit(ask(checks=checks, lease=str(i)), now_ms=now) for i in range(3)]
            await client.aclose()
            return [v.remaining for v in verdicts]

        assert asyncio.run(run()) == expected


@pytest.mark.parametrize("blocked", [True, False])
def test_redis_tier_override_is_read_by_the_script(blocked):
    with redis_servers.standalone() as server:

        async def run():
            client = connect(server.url, timeout=1.0)
            budget = RedisBudget(client)
            if blocked:
                await budget.set_tier("{a}:tier", "blocked")
            verdict = await budget.admit(ask())
            await client.aclose()
            return verdict

        verdict = asyncio.run(run())
    assert verdict.status is (Status.BLOCKED if blocked else Status.ADMITTED)
    assert verdict.tier == ("blocked" if blocked else "normal")


def test_a_requests_budget_scaled_below_one_per_period_admits_one_per_interval():
    budget = MemoryBudget()
    check = (Check("k", "requests", 3, 1000),)
    tiers = TierTable(TIERS, slow=TierTerms(0.1, True, 0))
    slow = Ask(plan("tier", check), "slow", tiers, "l", 1000, 0, 0, 0)
    first, second = budget.decide(slow, now=0), budget.decide(slow, now=1)
    assert (first.status, second.status) == (Status.ADMITTED, Status.LIMITED)
    assert second.retry_ms == 3333  # 0.3 per second: one every 3.33 s
    assert budget.decide(slow, now=3334).status is Status.ADMITTED


def test_no_two_owners_share_keys_whatever_their_names_hold():
    """Names with braces (which would end a Redis hash tag) or escapes in them keep keys of their own."""
    admitter = open_admitter(config.parse({"limits": {"tenant": {"requests": "10/minute", "concurrency": 2}}}, "t"))
    tenants = ["acme{eu}", "acme(eu)", "acme%7Beu%7D", "acme%257Beu%257D", "acme}{", "acme"]
    keys = [tuple(c.key for c in admitter._plan(Identity("a", "normal", t, False, 0.0, 0.0)).checks) for t in tenants]
    assert len(set(keys)) == len(tenants)
    assert all(key.count("{") == 1 and key.count("}") == 1 for plan in keys for key in plan)
