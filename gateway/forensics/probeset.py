"""The probe set: prompts that draw out prose, where the watermark lives, and the contexts canaries were served in.

The watermark's power grows with the number of distinct word sets a probe's answers touch, so the built-in
prompts ask for explanations, advice and essays (prose full of ordinary words) over many everyday topics,
never for code, lists of facts or translations. The prompts themselves carry no mark: they are written
here, not drawn from anything the gateway served.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..config import ConfigError
from .served import ServedCanary

TOPICS = """saving money on groceries|learning a second language as an adult|keeping houseplants alive|
training for a first 10k run|writing a good cover letter|starting a vegetable garden|making friends in a new city|
preparing for a job interview|reducing screen time|teaching a child to ride a bicycle|planning a road trip|
choosing a first car|improving sleep|cooking for one person|organising a small workshop|moving house|
learning to play the guitar|keeping a journal|running a book club|caring for an older dog|budgeting for a holiday|
working from home|studying for exams|hosting a dinner party|getting started with photography|
negotiating a salary|volunteering locally|decluttering a home|taking up birdwatching|public speaking|
giving useful feedback|managing a small team|learning to swim|baking bread at home|planning a wedding|
buying a used bicycle|staying focused while studying|writing a short story|starting a podcast|
choosing a laptop for school|keeping chickens|composting kitchen scraps|painting a room|raising a teenager|
learning to draw|travelling on a tight budget|camping with children|reading more books|
dealing with a difficult neighbour|writing a thank-you letter|starting to meditate|learning to cook rice well|
fixing a leaking tap|caring for a cat|preparing for a marathon|choosing a university course|
renting a first flat|running effective meetings|keeping a family calendar|learning chess|
teaching yourself statistics|visiting a museum with children|hiking in the mountains|growing tomatoes|
writing a persuasive essay|keeping motivated at the gym|adopting a rescue dog|learning to knit|
planning a birthday party|commuting by bicycle|saving for retirement|choosing a good mattress|
making a family recipe book|learning to sail|decorating a small flat|taking better notes|
coaching a youth football team|recovering from burnout|writing a eulogy|starting a small business|
learning about wine|keeping bees|building a birdhouse|planning meals for a week""".replace("\n", "").split("|")

FORMS = (
    "Explain {topic} to someone who is completely new to it, in a few paragraphs.",
    "Write a short essay about {topic}.",
    "What should a beginner know about {topic}? Please answer in flowing prose rather than a list.",
    "Give me some practical, friendly advice about {topic}.",
    "What are the most common mistakes people make with {topic}, and how can they be avoided?",
    "Describe how you would help a friend with {topic}.",
)


def prose_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct prose prompts (at most len(TOPICS) x len(FORMS)), in a fixed shuffled order."""
    everything = [form.format(topic=topic.strip()) for topic in TOPICS for form in FORMS]
    random.Random(seed).shuffle(everything)
    return everything[:count]


def probe_items(prose: int, samples: int, prompts_file: Path | None, served: list[ServedCanary]) -> list[dict]:
    """The probe set as JSON-ready items, each with a stable id (so that a resumed probe skips what is done);
    every prose prompt is asked `samples` times, since more text touches more word sets."""
    prompts = [(f"prose-{i}", p) for i, p in enumerate(prose_prompts(prose))]
    if prompts_file is not None:
        try:
            lines = enumerate(prompts_file.read_text("utf-8").splitlines(), 1)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{prompts_file}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
        prompts += [(f"file-{n}", _prompt(prompts_file, n, line)) for n, line in lines if line.strip()]
    items = [
        {"id": f"{name}#{sample}" if sample else name, "kind": "prose", "prompt": prompt}
        for name, prompt in prompts
        for sample in range(samples)
    ]
    for s in served:
        items.append({"id": f"canary-{s.log}-{s.entry}", "kind": "canary", **s.as_json()})
    return items


def _prompt(path: Path, number: int, line: str) -> str:
    try:
        prompt = json.loads(line)["prompt"]
    except (ValueError, KeyError, TypeError):
        prompt = None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f'{path}:{number}: expected a JSON object with a non-empty "prompt"')
    return prompt
