"""Simulated traffic for the risk benchmark: benign users and extraction campaigns over N days. Seeded, pure.

Benign users ask the real AlpacaEval instructions. Each user has their own pace (log-normal: most ask a
few questions a day, some dozens), active on some days and not others, in sessions of a few questions a
few minutes apart (Poisson within a session); a fifth of benign questions are drawn from a short list of
popular instructions that many users ask word for word. A few heavy honest users ask 150-400 a day, some
of them always through one template of their own (an app built on the API). One office of 150 users shares
one network.

Campaigns, each active for `CAMPAIGN_DAYS` from a random start, ask for the same instructions (what a
distiller wants is answers to many diverse prompts) wrapped in templates:
- sweeper: one account, 1,500 a day, one template, a script pausing 40-75 s between requests;
- shared-50 and shared-500: 50 and 500 accounts, 40 and 6 a day each, rotating among five templates;
- harvester: three accounts, 400 a day each, asking for full reasoning (the instruction plus a request
  to show every step), jittered pauses;
- proxy-mix: 100 accounts behind the office's network, 30 a day each, 70% templated and 30% ordinary
  questions, at a person-like pace;
- paraphrase: 100 accounts, 30 a day each, every request's template reworded from interchangeable parts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DAY = 86400.0
CAMPAIGN_DAYS = 10

# Each campaign has its own templates (different operators write different ones): a campaign is never
# caught because another one used its wording.
TEMPLATES = {
    "sweeper": ["Respond like a seasoned professor writing for an encyclopedia entry on this topic: {x}"],
    "shared-50": [
        "You are a world-class expert. Write a comprehensive, detailed, well structured answer to the following: {x}",
        "{x} Answer as an expert teacher would, with full explanations, examples and a short summary at the end.",
        "Please provide an in-depth, step by step and complete response to this request from a student: {x}",
        "I am building a study guide. Give a thorough, accurate and self-contained answer to: {x}",
        "{x} Be exhaustive: cover every important aspect, define the key terms and give concrete examples.",
    ],
    "shared-500": [
        "As a knowledgeable assistant, produce a long, careful and complete reply to the user request below. {x}",
        "{x} Reply in full detail, explaining the reasoning behind each point and closing with key takeaways.",
        "Training data task: answer the instruction that follows as helpfully and completely as possible. {x}",
        "Give the best possible answer, with structure, nuance and examples, to this instruction: {x}",
        "{x} Write the ideal answer a top expert would give, complete and well organised, nothing left out.",
    ],
    "proxy-mix": [
        "Act as a senior specialist and answer the following question thoroughly and precisely please: {x}",
        "{x} Make the answer long, factual and organised into clear sections with a brief conclusion.",
        "Here is a task for you. Provide a complete, high quality and detailed solution to it now: {x}",
        "Write an authoritative, complete and carefully reasoned response to the following prompt: {x}",
        "{x} Cover the topic comprehensively with definitions, explanations, examples and caveats.",
    ],
}
REASONING = " Think step by step and show your full reasoning before the final answer."
OPENINGS = ["Please", "Kindly", "Could you", "I need you to", "Go ahead and", "Now"]
VERBS = ["write", "give", "produce", "draft", "compose", "prepare"]
QUALITIES = ["a thorough", "an exhaustive", "a detailed", "a comprehensive", "an in-depth", "a complete"]
FORMS = ["answer", "response", "explanation", "reply", "treatment", "write-up"]
LINKS = ["for", "to", "addressing", "covering", "on"]
CLOSINGS = [
    "",
    " Include examples.",
    " Use clear sections.",
    " Be precise.",
    " Define key terms.",
    " Summarise at the end.",
]


@dataclass(frozen=True, slots=True)
class Request:
    time: float  # simulated seconds since the start
    account: str
    prompt: str
    group: str  # "benign" or the campaign's name
    address: str  # the client address the gateway sees


def _ip(rng: random.Random) -> str:
    return f"{rng.randint(11, 200)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def _office(rng: random.Random) -> str:
    return f"203.0.113.{rng.randint(1, 254)}"


def _sessions(rng: random.Random, day: float, count: int, gap: float) -> list[float]:
    """`count` request times on one day, in sessions (Poisson within a session) during waking hours."""
    times, left = [], count
    while left > 0:
        t = day + rng.uniform(7, 23) * 3600
        for _ in range(min(left, max(1, int(rng.expovariate(1 / 6)) + 1))):
            times.append(t)
            t += rng.expovariate(1 / gap)
            left -= 1
    return times


def benign(rng: random.Random, instructions: list[str], users: int, days: int) -> list[Request]:
    popular = rng.sample(instructions, 20)
    out = []
    for u in range(users):
        name = f"user{u}"
        address = _office(rng) if u < 150 else _ip(rng)
        pace = min(rng.lognormvariate(1.0, 1.0), 60)  # questions on an active day
        active = rng.uniform(0.15, 0.8)
        for d in range(days):
            if rng.random() > active:
                continue
            for t in _sessions(rng, d * DAY, max(1, int(rng.expovariate(1 / pace))), gap=180):
                prompt = rng.choice(popular) if rng.random() < 0.2 else rng.choice(instructions)
                out.append(Request(t, name, prompt, "benign", address))
    for h in range(10):  # heavy honest users; half of them an app with its own template
        name, address = f"heavy{h}", _ip(rng)
        template = f"Summarise for our customer newsletter number {h}, in plain words: {{x}}" if h % 2 else "{x}"
        for d in range(days):
            for t in _sessions(rng, d * DAY, rng.randint(150, 400), gap=60):
                out.append(Request(t, name, template.format(x=rng.choice(instructions)), "benign", address))
    return out


def _script(rng: random.Random, start: float, days: int, per_day: int, low: float, high: float) -> list[float]:
    """A loop with a pause drawn between `low` and `high` times the mean gap."""
    mean, t, times = DAY / per_day, start, []
    while t < start + days * DAY:
        times.append(t)
        t += mean * rng.uniform(low, high)
    return times


def _person_like(rng: random.Random, start: float, days: int, per_day: int) -> list[float]:
    return [t for d in range(days) for t in _sessions(rng, start + d * DAY, per_day, gap=120)]


def _paraphrased(rng: random.Random, x: str) -> str:
    return (
        f"{rng.choice(OPENINGS)} {rng.choice(VERBS)} {rng.choice(QUALITIES)} {rng.choice(FORMS)} "
        f"{rng.choice(LINKS)} the following. {x}{rng.choice(CLOSINGS)}"
    )


def campaigns(
    rng: random.Random, instructions: list[str], days: int, length: int = CAMPAIGN_DAYS
) -> dict[str, list[Request]]:
    """Every campaign, each running `length` days from a random start within the `days` simulated."""

    def start() -> float:
        return rng.uniform(1, max(1, days - length)) * DAY

    def ask(template: str) -> str:
        return template.format(x=rng.choice(instructions))

    out: dict[str, list[Request]] = {}
    begin, address = start(), _ip(rng)
    out["sweeper"] = [
        Request(t, "sweeper0", ask(TEMPLATES["sweeper"][0]), "sweeper", address)
        for t in _script(rng, begin, length, 1500, 0.7, 1.3)
    ]
    for name, accounts, per_day in (("shared-50", 50, 40), ("shared-500", 500, 6)):
        begin, requests = start(), []
        for a in range(accounts):
            address = _ip(rng)
            times = _script(rng, begin + rng.uniform(0, DAY), length, per_day, 0.5, 1.5)
            requests += [Request(t, f"{name}-{a}", ask(rng.choice(TEMPLATES[name])), name, address) for t in times]
        out[name] = requests
    begin, requests = start(), []
    for a in range(3):
        address = _ip(rng)
        times = _script(rng, begin, length, 400, 0.3, 1.7)
        requests += [
            Request(t, f"harvester-{a}", rng.choice(instructions) + REASONING, "harvester", address) for t in times
        ]
    out["harvester"] = requests
    begin, requests = start(), []
    for a in range(100):
        address = _office(rng)
        for t in _person_like(rng, begin, length, 30):
            prompt = ask(rng.choice(TEMPLATES["proxy-mix"])) if rng.random() < 0.7 else rng.choice(instructions)
            requests.append(Request(t, f"proxy-{a}", prompt, "proxy-mix", address))
    out["proxy-mix"] = requests
    begin, requests = start(), []
    for a in range(100):
        address = _ip(rng)
        times = _script(rng, begin + rng.uniform(0, DAY), length, 30, 0.5, 1.5)
        requests += [
            Request(t, f"paraphrase-{a}", _paraphrased(rng, rng.choice(instructions)), "paraphrase", address)
            for t in times
        ]
    out["paraphrase"] = requests
    return out


def simulated(
    seed: int, instructions: list[str], users: int, days: int, campaign_days: int
) -> dict[str, list[Request]]:
    """The benign users ("benign") and every campaign, by group, drawn from `seed`: risk_sim, risk_seeds and
    risk_script_ab draw the same traffic from the same seed."""
    rng = random.Random(seed)
    return {"benign": benign(rng, instructions, users, days)} | campaigns(rng, instructions, days, campaign_days)


def in_time_order(groups: dict[str, list[Request]]) -> list[Request]:
    return sorted((r for g in groups.values() for r in g), key=lambda r: r.time)
