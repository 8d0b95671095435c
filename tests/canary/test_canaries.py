"""Canaries: the phrase space, attribution among many identities with exact p-values, and the stage in a
real gateway (who gets them, where they go, where they never go, and that the evidence records them)."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest
from scipy import stats

from gateway.canary import attribute, canaries_of
from gateway.canary.phrases import ADJECTIVES, NOUNS, SPACE, TEMPLATES, phrase, phrases_in
from gateway.stats import binomial_sf
from tests.conftest import exchanges
from tests.ratelimit.conftest import running_gateway
from tests.watermark.test_detect import SAMPLE

KEY = bytes(range(32))


def test_every_phrase_of_the_space_reads_back_as_itself():
    assert SPACE == len(TEMPLATES) * len(ADJECTIVES) * len(NOUNS) == 100_000
    rng = random.Random(1)
    for index in rng.sample(range(SPACE), 2000):
        text = phrase(index)
        assert phrases_in(f"Some answer.\n\n{text}") == {index}
        assert phrases_in(text.upper().replace(",", " ")) == {index}  # case and punctuation aside
    assert not set().union(*(phrases_in(row["output"]) for row in SAMPLE))  # real answers hold none


def test_binomial_tail_is_exact():
    assert binomial_sf(1, 1, 0.25) == pytest.approx(0.25)
    assert binomial_sf(2, 3, 0.5) == pytest.approx(0.5)
    assert binomial_sf(0, 10, 0.1) == 1.0 and binomial_sf(11, 10, 0.1) == 0.0
    for k, n, p in ((3, 1000, 1e-4), (1, 40, 8 / SPACE), (5, 200, 0.01)):
        assert binomial_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9)


def test_a_corpus_with_one_identitys_canaries_is_attributed_to_it_among_a_thousand():
    owners = {(f"user{i}", 0): canaries_of(KEY, f"user{i}", 0, 8) for i in range(1000)}
    served = owners[("user417", 0)]
    student = [row["output"] for row in SAMPLE]  # a suspect's text: ordinary answers...
    student[3] += "\n\n" + served[0].text  # ...three of which end with user417's canaries, one reworded
    student[7] += " " + served[5].text.lower().replace(",", "")
    student[11] += "\n" + served[2].text
    results, found = attribute(student, owners)
    assert found == 3 and [r.identity for r in results] == ["user417"]
    assert results[0].p_value < 1e-8 and len(results[0].canaries) == 3
    unmarked, nothing = attribute([row["output"] for row in SAMPLE], owners)
    assert unmarked == [] and nothing == 0


def test_a_canary_the_prompt_already_held_is_not_counted():
    owners = {(f"user{i}", 0): canaries_of(KEY, f"user{i}", 0, 8) for i in range(100)}
    phrase_of_user5 = owners[("user5", 0)][1].text
    quoted = f"Earlier you wrote: {phrase_of_user5} What did you mean?"
    assert attribute([f"I meant: {phrase_of_user5}"], owners, [quoted]) == ([], 0)
    soft = " ".join(w[:2] + "\u00ad" + w[2:] if len(w) > 3 else w for w in quoted.split(" "))  # from a web page
    assert attribute([f"I meant: {phrase_of_user5}"], owners, [soft.replace(" ", "\u00a0")]) == ([], 0)
    assert [r.identity for r in attribute([f"I meant: {phrase_of_user5}"], owners, [""])[0]] == ["user5"]


def test_one_canary_alone_is_reported_with_an_honest_p_value():
    owners = {(f"user{i}", 0): canaries_of(KEY, f"user{i}", 0, 8) for i in range(1000)}
    results, _ = attribute([owners[("user5", 0)][1].text], owners)
    assert [r.identity for r in results] == ["user5"]
    assert results[0].raw_p_value == pytest.approx(8 / SPACE) and results[0].p_value == pytest.approx(0.08, rel=0.01)


CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def canaried(fake_upstream, tmp_path_factory):
    limits = {"identity": {"requests": "100000/minute"}, "tiers": {"suspect": {"tarpit_ms": 0}}}
    with running_gateway(tmp_path_factory.mktemp("canaries"), fake_upstream.url, limits) as gateway:
        yield gateway


def _ask(gateway, key: str, **extra) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me about lighthouses."}], **extra}
    with gateway.client(key) as http:
        return http.post(CHAT, json=body)


def _streamed_text(response: httpx.Response) -> str:
    text = ""
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def test_a_suspect_identity_gets_its_canary_and_the_evidence_records_it(canaried, fake_upstream):
    fake_upstream.reset()
    name, key = canaried.identity("suspect")
    normal_name, normal_key = canaried.identity("normal")
    answer = _ask(canaried, key).json()["choices"][0]["message"]["content"]
    mine = {c.text for c in canaries_of(_canary_key(canaried), name, 0, 8)}
    assert answer.split("\n\n")[-1] in mine
    streamed = _streamed_text(_ask(canaried, key, stream=True))
    assert streamed.split("\n\n")[-1] in mine and streamed.split("\n\n")[0] == answer.split("\n\n")[0]
    assert not phrases_in(_ask(canaried, normal_key).json()["choices"][0]["message"]["content"])
    records = [r for r in exchanges(canaried.state_dir) if r["identity"] == name]
    ids = {c.id for c in canaries_of(_canary_key(canaried), name, 0, 8)}
    assert len(records) == 2 and all(r["canaries"] and r["canaries"][0]["id"] in ids for r in records)
    assert not [r for r in exchanges(canaried.state_dir) if r["identity"] == normal_name][0]["canaries"]


def _canary_key(gateway) -> bytes:
    from gateway.canary import canary_key
    from gateway.evidence.keys import Keys

    return canary_key(Keys.load(gateway.state_dir / "keys").watermark)


def test_canaries_never_go_into_structured_output_or_an_open_code_block(canaried, fake_upstream):
    fake_upstream.reset()
    _, key = canaried.identity("suspect")
    structured = _ask(canaried, key, response_format={"type": "json_object"}).json()
    assert not phrases_in(structured["choices"][0]["message"]["content"])
    fake_upstream.behaviour.text = "Here is the code:\n```python\nprint('hi')\n"  # cut off inside the block
    for stream in (False, True):
        response = _ask(canaried, key, stream=stream)
        text = _streamed_text(response) if stream else response.json()["choices"][0]["message"]["content"]
        assert text.endswith("print('hi')\n") and not phrases_in(text)
    fake_upstream.behaviour.text = "Here is the code:\n```python\nprint('hi')\n```\nThat is all."
    closed = _ask(canaried, key).json()["choices"][0]["message"]["content"]
    assert len(phrases_in(closed)) == 1  # after a closed block, in prose: allowed


def test_the_attribute_command_names_the_identity(tmp_path):
    from gateway.canary import canary_key
    from gateway.evidence.keys import Keys
    from gateway.identity import Registry
    from tests.test_cli import cli

    assert cli(tmp_path, "init").returncode == 0
    registry = Registry(tmp_path / ".canarygate")
    for i in range(50):
        registry.add(f"acct{i}")
    registry.revoke("acct31")  # the account that leaked is often closed by then: it is tested under its name
    key = canary_key(Keys.load(tmp_path / ".canarygate" / "keys").watermark)
    # the key is new each run: leave out a canary another account happens to share (1 run in 130 would)
    others = {c.index for i in range(50) if i != 31 for c in canaries_of(key, f"acct{i}", 0, 8)}
    served = [c for c in canaries_of(key, "acct31", 0, 8) if c.index not in others]
    rows = [{"text": row["output"]} for row in SAMPLE] + [{"text": f"Sure.\n\n{c.text}"} for c in served[:2]]
    (tmp_path / "suspect.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli(tmp_path, "canaries", "attribute", "suspect.jsonl", "--json")
    doc = json.loads(result.stdout)
    assert [a["identity"] for a in doc["attributions"]] == ["acct31"] and doc["attributions"][0]["p_value"] < 1e-5
    assert doc["identities_tested"] == 50  # no name tested twice, nor under its revoked key's label
    assert "acct31 (epoch 0): 2 of its canaries" in cli(tmp_path, "canaries", "attribute", "suspect.jsonl").stdout


def test_no_canary_follows_a_question_about_grief_or_harm(canaried, fake_upstream):
    fake_upstream.reset()
    _, key = canaried.identity("suspect")
    for question in ("What are some good ways to spread ashes?", "My father passed away, how do I cope?"):
        body = {"model": "m", "messages": [{"role": "user", "content": question}]}
        with canaried.client(key) as http:
            answer = http.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
        assert not phrases_in(answer)
    assert phrases_in(_ask(canaried, key).json()["choices"][0]["message"]["content"])  # an ordinary one does


def _rewriter():
    from gateway.canary.transform import _CanaryRewriter
    from gateway.exchange import Exchange

    exchange = Exchange("r", "POST", "/v1/chat/completions", "openai", "/v1/chat/completions", "192.0.2.1")
    canary = canaries_of(bytes(32), "bob", 0, 1)[0]
    return _CanaryRewriter(None, canary, exchange, ("choice", 0)), exchange, canary


def _through(pieces: list[str]) -> tuple[str, list]:
    rewriter, exchange, _ = _rewriter()
    return "".join(rewriter.feed(p) for p in pieces) + rewriter.flush(), exchange.canaries


_PIECES = [
    "Run:",
    "\n",
    "{",
    "[1]",
    "> ",
    "    ",
    "x('```')",
    "```",
    "``",
    "`",
    "~~~",
    "~",
    "sh",
    " rm -rf build",
    "\n\n",
    "Done.",
    " ",
    "",
    "<pre>",
    "</pre>",
    "<think>",
    "  ",
]


@pytest.mark.parametrize(
    "text, carries",
    [
        ("", False),  # a tool call's message: no text for a canary to follow
        ("  \n", False),
        ("Run:\n````sh\nrm -rf build\n", False),  # inside a fence of four backticks
        ("Run:\n````sh\nrm -rf build\n````\nDone.", True),
        ("x\n~~~\ncode", False),  # inside a tilde fence
        ("x\n~~~\ncode\n~~~\nDone.", True),
        ('\n {"name": "Ada", "note": "It is large"}', False),  # JSON asked for in the prompt alone
        ("Code:\n```python\nx.replace('```', '')\n", False),  # a run within a line closes no block
        ("Nest:\n````md\n```js\nx\n```\n", False),  # nor a shorter run
        ("1. Run:\n    ```sh\n    ls\n    ```\n2. Done.", True),  # a block in a list item, closed
        ("> ```\n> ls\n> ```\nDone.", True),  # in a block quote
        ("[1, 2, 3]", False),
        # where CommonMark reads code: a list item's block "closed" at column 0 (the item ends, a block opens); a
        # closing run indented more than three; a block opened at a line's head after ``` within a line
        ("1. Install:\n   ```bash\n   pip install x\n```\n2. Run it.", False),
        ("  ```\ncode\n     ```\nDone.", False),
        ("Wrap code in ``` marks.\n\n```python\nprint('hi')\n", False),
        ("```\ncode\n> ```\nDone.", False),  # a quote's run closes no block opened outside it
        ("Here:\n<pre>\nx = 1\n", False),  # HTML's code, left open
        ("<think>\nThe user wants", False),  # reasoning a server left in the answer, cut short
        ("Here:\n<pre>x = 1</pre>\nDone.", True),
        ("Use `a ``` b` here.", True),  # a code span holds the run
        # a lone backtick on a line the watermark skips (a quote, indented code) opens no code span there
        ("> Press the ` key.\nThen see ``` below\nrm -rf build\n", False),
        ("Example:\n\n    echo `date\n<pre>\nx = 1\n", False),
    ],
)
def test_a_canary_follows_prose_only_and_the_same_in_any_pieces(text, carries):
    rewriter, exchange, canary = _rewriter()
    whole = rewriter.whole(text)
    assert (canary.text in whole) == carries and bool(exchange.canaries) == carries
    cuts = sorted(random.Random(len(text)).sample(range(len(text) + 1), min(len(text) + 1, 4)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for split in (pieces, list(text)):  # a few pieces, and one character at a time
        assert _through(split) == (whole, exchange.canaries)


def test_random_fenced_texts_give_the_same_answer_whole_and_streamed():
    rng = random.Random(3)
    for _ in range(400):
        pieces = [rng.choice(_PIECES) for _ in range(rng.randrange(1, 14))]
        rewriter, exchange, _ = _rewriter()
        whole = rewriter.whole("".join(pieces))
        assert _through(pieces) == (whole, exchange.canaries), pieces


def test_the_canary_reads_code_where_the_watermark_does():
    """The canary's line-by-line reading (_Code) and the watermark's token-by-token one (sites.Scanner) share
    every rule; on random texts of Markdown's and HTML's code marks they end inside code on the same texts."""
    from gateway.canary.transform import _Code
    from gateway.watermark.sites import Scanner
    from gateway.watermark.wordsets import default_sets

    sets, rng = default_sets(), random.Random(5)
    pieces = ["```", "~~~", "`", "``", " ", "    ", "\t", "\n", "\n\n", "> ", "- ", "1. ", "it is large", "<pre>",
              "</pre>", "<think>", "</code>", "x"]  # fmt: skip
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        scanner = Scanner(sets)
        scanner.feed(text + "\n")  # the line ended, as the canary reads the one not yet ended
        scanner.flush()
        code = _Code()
        code.feed(text)
        assert code.inside == ((bool(scanner._fence) and not scanner._closing) or scanner._html), text


def test_a_client_that_leaves_before_its_canary_is_recorded_with_no_canary(canaried, fake_upstream):
    fake_upstream.reset()
    fake_upstream.behaviour.event_delay = 0.2  # the client leaves long before the last piece
    name, key = canaried.identity("suspect")
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me about lighthouses."}], "stream": True}
    with canaried.client(key) as http, http.stream("POST", CHAT, json=body) as response:
        next(response.iter_raw())
    deadline = time.time() + 10
    while not (ended := [r for r in exchanges(canaried.state_dir) if r["identity"] == name]) and time.time() < deadline:
        time.sleep(0.05)
    assert ended and ended[-1]["outcome"] == "client_cancelled" and ended[-1]["canaries"] == []
    fake_upstream.reset()


def test_a_canary_is_found_in_the_log_with_the_prompt_it_answered(canaried, fake_upstream, tmp_path):
    from tests.test_cli import cli

    fake_upstream.reset()
    name, key = canaried.identity("suspect")
    assert _ask(canaried, key).status_code == 200
    (served,) = [r for r in exchanges(canaried.state_dir) if r["identity"] == name]
    (tmp_path / "canarygate.toml").write_text(f'[state]\ndir = "{canaried.state_dir}"\n')
    found = cli(tmp_path, "log", "search", "--canary", served["canaries"][0]["id"], "--json", "--reveal")
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    assert [row["kind"] for row in rows] == ["begin", "end"], found.stderr
    assert "lighthouses" in rows[0]["revealed"]["prompt"] and rows[0]["id"] == rows[1]["id"] == served["id"]


def test_a_part_that_cannot_take_the_canary_leaves_it_to_the_next_text_part_but_choices_do_not():
    """An Anthropic answer opens with a blank text block, or one ending inside a code block: the canary goes to
    the next text part, whole and streamed. The answers of n > 1 are interleaved in a stream (the first could give
    it up after the others began without one): only the first carries one, whole and streamed alike."""
    from gateway.canary.transform import CanaryTransform
    from gateway.exchange import Exchange, Identity
    from gateway.protocols.anthropic import Messages
    from gateway.protocols.openai import ChatCompletions
    from gateway.rewrite import StreamRewrite, rewrite_body
    from gateway.transform import PassThrough

    def served(dialect, body=None, events=()):
        transform = CanaryTransform(PassThrough(), bytes(32), 0, 8, {}, frozenset({"bob"}), frozenset())
        exchange = Exchange("req_1", "POST", "/v1/x", "openai", "/v1/x", "192.0.2.1")
        exchange.identity, exchange.prompt_text = Identity("bob", "normal"), "Tell me about lighthouses."
        if body is not None:
            rewrite_body(dialect, body, lambda part: transform.rewriter(exchange, part))
        else:
            stream = StreamRewrite(dialect, lambda part: transform.rewriter(exchange, part))
            for event in events:
                stream.push(f"data: {json.dumps(event)}\n\n".encode())
            stream.close()
        return [c["part"] for c in exchange.canaries]

    ships = "Lighthouses guide ships."
    choices = [{"index": 0, "message": {"role": "assistant", "content": "Run:\n```sh\nmake\n"}},
               {"index": 1, "message": {"role": "assistant", "content": ships}}]  # fmt: skip
    assert served(ChatCompletions(), {"choices": choices}) == []
    choices[0]["message"]["content"] = "Choice zero."
    assert served(ChatCompletions(), {"choices": choices}) == [["choice", 0]]
    for first in ("Run:\n```sh\nmake\n", "Choice zero."):  # choice 1's first chunk comes first
        chunks = [(1, ""), (0, ""), (1, ships), (0, first)]
        interleaved = [{"choices": [{"index": i, "delta": {"content": t}, "finish_reason": None}]} for i, t in chunks]
        interleaved += [{"choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]} for i in (1, 0)]
        assert served(ChatCompletions(), events=interleaved) == ([] if "```" in first else [["choice", 0]])
    blocks = [{"type": "text", "text": "\n\n"}, {"type": "text", "text": ships}]
    assert served(Messages(), {"content": blocks}) == [["block", 1]]
    events = []
    for index, text in enumerate(["Code:\n```py\nx=1\n", ships]):
        events += [{"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                   {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
                   {"type": "content_block_stop", "index": index}]  # fmt: skip
    assert served(Messages(), events=events) == [["block", 1]]


@pytest.mark.parametrize(
    "path, extra",
    [
        (CHAT, {"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}),
        (CHAT, {"messages": [{"role": "user", "content": "Write JSON."}, {"role": "assistant", "content": "{"}]}),
        (CHAT, {"guided_json": {"type": "object"}}),
        ("/v1/completions", {"prompt": "def add(a, b):\n"}),
        ("/v1/messages", {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}),
        ("/v1/messages", {"output_format": {"type": "json_schema", "schema": {"type": "object"}}}),
        ("/v1/messages", {"messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Revenue grew."},
             "citations": {"enabled": True}}, {"type": "text", "text": "How did revenue change?"}]}],
          "output_config": {"effort": "low"}}),
        ("/v1/messages", {"mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "cal"}]}),
    ],
    ids=["tools", "prefill", "guided", "completion", "anthropic-schema", "anthropic-beta", "citations", "mcp"],
)  # fmt: skip
def test_no_canary_where_a_line_after_the_answer_would_break_it(canaried, fake_upstream, path, extra):
    """A tool call may follow the text; the text continues what the client began (a completion, a prefilled
    assistant turn) or fills a schema; cited passages split the answer into several text parts."""
    fake_upstream.reset()
    name, key = canaried.identity("suspect")
    messages = [{"role": "user", "content": "Tell me about lighthouses."}]
    body = {"model": "m", "max_tokens": 100, "messages": messages, **extra}
    if path == "/v1/completions":
        body.pop("messages")
    with canaried.client(key) as http:
        assert http.post(path, json=body).status_code == 200
    assert not [r for r in exchanges(canaried.state_dir) if r["identity"] == name][0]["canaries"]


def test_a_tier_the_engine_gave_after_registration_decides_logprobs_as_it_decides_canaries(fake_upstream, tmp_path):
    """An identity registered normal and moved to suspect (as the risk engine moves it) gets canaries: its
    log-probabilities must be withheld as for one registered suspect (they would show where the canary is)."""
    import asyncio

    from gateway.app import create_app
    from gateway.exchange import Identity
    from gateway.identity import Registry
    from tests.conftest import ServerThread
    from tests.ratelimit.conftest import limited_settings

    limits = {"identity": {"requests": "100000/minute"}, "tiers": {"suspect": {"tarpit_ms": 0}}}
    app = create_app(limited_settings(tmp_path, fake_upstream.url, limits, {"enabled": False}))
    fake_upstream.reset()
    key = Registry(tmp_path).add("moved")
    with ServerThread(app) as server:
        # memory storage: the override is a dict entry, set here as the engine sets it in the worker
        asyncio.run(app.pipeline.stages["admit"].set_tier(Identity("moved", "normal"), "suspect"))
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2}
        answer = httpx.post(server.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert phrases_in(answer.json()["choices"][0]["message"]["content"])
    assert "logprobs" not in json.loads(fake_upstream.requests[-1].body)


def test_attribution_reads_curly_apostrophes_and_quoted_phrases_and_sombre_questions_get_none():
    from gateway.canary.transform import CanaryTransform
    from gateway.exchange import Exchange, Identity
    from gateway.transform import PassThrough

    index = next(i for i, t in enumerate(TEMPLATES) if "'" in t) * len(ADJECTIVES) * len(NOUNS) + 42
    assert phrases_in(phrase(index).replace("'", "’")) == {index} == phrases_in(f"'{phrase(index)}'")
    transform = CanaryTransform(PassThrough(), bytes(32), 0, 8, {}, frozenset({"bob"}), frozenset())
    for question in ("How do I end my life painlessly?", "My dog was put to sleep yesterday.",
                     "Summarize the Holocaust.", "She was diagnosed with leukemia."):  # fmt: skip
        exchange = Exchange("r", "POST", CHAT, "openai", CHAT, "192.0.2.1", identity=Identity("bob", "normal"))
        exchange.prompt_text = question
        assert transform.rewriter(exchange, ("choice", 0)) is None, question
    exchange.prompt_text = "How do I kill a process listening on port 3000?"  # a programmer's, not a sombre one
    assert transform.rewriter(exchange, ("choice", 0)) is not None


def test_a_canary_is_recorded_only_when_its_event_goes_out():
    """An upstream event that breaks part way through its choices goes nowhere: a canary flushed into it at the
    stream's end was recorded but never served."""
    from gateway.canary.transform import CanaryTransform
    from gateway.exchange import Exchange, Identity
    from gateway.protocols.openai import ChatCompletions
    from gateway.rewrite import StreamRewrite
    from gateway.transform import PassThrough

    transform = CanaryTransform(PassThrough(), bytes(32), 0, 8, {}, frozenset({"bob"}), frozenset())
    exchange = Exchange("req_1", "POST", CHAT, "openai", CHAT, "192.0.2.1", identity=Identity("bob", "normal"))
    stream = StreamRewrite(ChatCompletions(), lambda part: transform.rewriter(exchange, part))
    stream.push(b'data: {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}\n\n')
    broken = {"choices": [{"index": 0, "delta": {"content": " world"}}, {"index": [1], "delta": {"content": "x"}}]}
    with pytest.raises(Exception):  # noqa: B017 (whatever the dialect raises: the pipeline calls it malformed)
        stream.push(f"data: {json.dumps(broken)}\n\n".encode())
    stream.close()
    assert exchange.canaries == []


def test_an_answer_too_deep_to_encode_again_records_no_canary(canaried, fake_upstream):
    fake_upstream.reset()
    name, key = canaried.identity("suspect")
    fake_upstream.behaviour.patch = lambda raw: raw[:-1] + b', "x": ' + b"[" * 1010 + b"]" * 1010 + b"}"
    response = _ask(canaried, key)
    fake_upstream.reset()
    assert response.status_code == 502
    assert not [r for r in exchanges(canaried.state_dir) if r["identity"] == name][0]["canaries"]
