"""Where the watermark writes: the same decisions for a stream in any pieces as for the whole text, a
bounded hold-back, and never in code, quotations, URLs, data, names, negations, after an article another
member would not take, or in the prompt's spans."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.watermark.scheme import LexicalKey
from gateway.watermark.sites import _TOKEN, _WORDS, Scanner, _is_word, _normal, canonical_words, prompt_trigrams
from gateway.watermark.whole import WholeText
from gateway.watermark.wordsets import MAX_WORDS, WordSets, default_sets

SETS = default_sets()
WHOLE = WholeText(SETS)
SAMPLE = [json.loads(line) for line in (Path(__file__).parent.parent / "data" / "alpaca_eval_sample.jsonl").open()]


def flip(site):
    """A marking that always writes another member, so that every site shows in the output."""
    return (site.member + 1) % len(SETS.sets[site.set_index].members)


def mark(text: str, prompt: str = "", pieces: list[str] | None = None) -> str:
    scanner = Scanner(SETS, prompt_trigrams(prompt, SETS) if prompt else frozenset(), flip)
    return "".join(scanner.feed(p) for p in (pieces or [text])) + scanner.flush()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(range(len(SAMPLE))), st.lists(st.integers(min_value=1, max_value=40), max_size=60))
def test_a_stream_in_any_pieces_gives_the_whole_text_result(index, cuts):
    text = SAMPLE[index]["output"]
    pieces, at = [], 0
    for size in cuts:
        pieces.append(text[at : at + size])
        at += size
    pieces.append(text[at:])
    assert mark(text, pieces=pieces) == mark(text)


# letters of several kinds, joiners, numerals that are alphanumeric but not letters, marks, spaces, backticks
_TRICKY = "aZq'’-`_ 9²½éßİ\u0301\u00adçΩж中😀\n.,!?\"“”\ud800"


@given(st.text(alphabet=_TRICKY, max_size=80))
def test_the_word_pattern_finds_the_words_the_tokens_hold(text):
    """canonical_words reads words with _WORDS, not _TOKEN: the same words, in the same order."""
    assert [t for t in _WORDS.findall(text) if _is_word(t)] == [t for t in _TOKEN.findall(text) if _is_word(t)]


def test_canonical_words_reads_the_longest_member_at_each_word():
    words = [" ".join(member) for member in SETS.lookup]
    phrase = next(w for w in words if w.count(" ") == 2)  # a three-word member
    first_word = phrase.split()[0]
    text = f"Oh {phrase} and {first_word} alone."
    index = SETS.lookup[tuple(phrase.split())][0]
    expected_first = SETS.lookup.get((first_word,))
    assert canonical_words(text, SETS) == [
        "oh",
        f"§{index}",
        "and",
        first_word if expected_first is None else f"§{expected_first[0]}",
        "alone",
    ]


def _canonical_by_definition(text: str) -> list[str]:
    """canonical_words as its docstring defines it, word by word: the oracle."""
    tokens = [m for m in _WORDS.finditer(text) if _is_word(m.group())]
    words = [_normal(m.group()) for m in tokens]
    out, i = [], 0
    while i < len(words):
        n = 1
        for longer in range(MAX_WORDS, 1, -1):
            span = tokens[i : i + longer]
            spaced = all(text[a.end() : b.start()] == " " for a, b in zip(span, span[1:], strict=False))
            if len(span) == longer and spaced and tuple(words[i : i + longer]) in SETS.lookup:
                n = longer
                break
        found = SETS.lookup.get(tuple(words[i : i + n]))
        out.append(words[i] if found is None else f"§{found[0]}")
        i += n
    return out


_MEMBER_WORDS = sorted({word for member in SETS.lookup for word in member})
_PIECES = st.one_of(st.sampled_from(_MEMBER_WORDS), st.sampled_from(["The", "NOT", "a", "well-known", "it’s"]))
_SEPARATORS = st.sampled_from([" ", " ", " ", "  ", ", ", ". ", "\n", "-", "'", "’", " 9 ", "é", " İ ", "`", '"', "“"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_PIECES, _SEPARATORS), max_size=30), st.text(alphabet=_TRICKY, max_size=20))
def test_canonical_words_and_trigrams_are_what_they_are_defined_to_be(pieces, tail):
    """The definition's words, and of its trigrams exactly those that end in a member, both from the
    definition (which detection reads) and from the members alone (which the marks read)."""
    for text in ("".join(a + b for a, b in pieces), "".join(a + b for a, b in pieces) + tail):
        words = _canonical_by_definition(text)
        assert canonical_words(text, SETS) == words
        ending_in_a_member = {t for t in zip(words, words[1:], words[2:], strict=False) if t[2].startswith("§")}
        assert prompt_trigrams(text, SETS) == ending_in_a_member == WHOLE.prompt_trigrams(text)


def scan(text: str, pieces: list[str]) -> tuple[str, list]:
    scanner = Scanner(SETS, frozenset(), flip)
    return "".join(scanner.feed(p) for p in pieces) + scanner.flush(), scanner.sites


# members right after a negation, capitalised in mid-sentence, after each article: what the words read
# before a member decide
RULES = " ".join(
    f"They do not {m} it. We saw the {m.title()} one, an {m} and a {m}, {m} indeed."
    for m in (" ".join(s.members[0]) for s in SETS.sets[:300])
)


@pytest.mark.parametrize("piece", [r"\S+\s*", r"\s*\S+"])  # "word " pieces, and " word" as OpenAI sends them
def test_word_by_word_streams_give_the_whole_text_result(piece):
    for text in [row["output"] for row in SAMPLE] + [RULES]:
        assert scan(text, re.findall(piece, text)) == scan(text, [text])  # the same text, sites and contexts


def test_a_word_no_member_begins_goes_out_while_it_is_being_typed():
    scanner = Scanner(SETS, frozenset(), flip)
    pieces = ["Many", " people", " visit", " museums", "'s", " halls"]  # as OpenAI streams words
    assert [scanner.feed(p) for p in pieces] == pieces
    assert not scanner.holding and scanner.flush() == ""
    scanner = Scanner(SETS, frozenset(), flip)
    assert [scanner.feed(p) for p in ["Many", " large", " dogs", " run"]] == ["Many", " ", "", "big dogs run"]


def test_hold_back_is_at_most_three_words_and_what_decides_them():
    text = " ".join(r["output"] for r in SAMPLE[:6])
    scanner = Scanner(SETS, frozenset(), flip)
    held_words = []
    for ch in text:  # one character at a time: the worst case for holding back
        scanner.feed(ch)
        held = "".join(scanner._tokens) + scanner._buffer[scanner._sent :]  # the part of a word sent early is out
        held_words.append(sum(1 for token in held.split() if token[:1].isalpha()))
    assert max(held_words) <= MAX_WORDS + 1  # three words, and the word that tells whether a site ends


@pytest.mark.parametrize(
    "text",
    [
        "```\nit is large and we are done\n```",
        "Use `it is large` here.",
        'He said "it is large and we are done" today.',
        "See https://example.com/large-files/it-is for more.",
        '{"size": "large", "note": "it is large"}',
        "[1, 2, 3] it is large",
        "We visited Large Lake yesterday and walked.",
        "THE DOG IS LARGE AND QUICK",
        "And so it is. We are.",
        "It's been a while since it's got done.",
        "~~~\nit is large and we are done\n~~~",
        "~~~\n```\nit is large\n~~~",  # a backtick run inside a tilde fence is text
        "> it is large and we are done",
        "Quote:\n\n  > it is large and we are done\n> we are done",
        "Run this:\n\n    # it is large\n    we_are = done\n\n    # it is large and we are done",
        "\tit is large and we are done",  # indented code at the start of the text
        "Steps:\n\n    ```\nit is large\n```",  # a fence opened on an indented line closes where it would
        "```python\nx.replace('```', '')\nit is large\n```",  # a run inside a line closes no fence
        "````markdown\n```js\nit is large\n```\nit is large\n````",  # nor a shorter run
        "```\n```js\nit is large\n```",  # nor a run with text after it on its line
        "Use the ` mark.\n```\n# it is large and we are done\n```",  # a lone backtick opens no span a fence closes
        "Type `a ``` it is large` here.",  # a code span closes at a run of its own length only
        "Type ``a ` it is large`` here.",
        "<pre><code>it is large and we are done</code></pre>",  # HTML's code
        "Use <code class='x'>it is large</code> here.\n<PRE>\nit is large\n</PRE>",
        # CommonMark: a run at a line's head less indented than the block's opening ends its list item and opens
        # a block; one indented more than three columns is code; a fence opened within a line does not take a
        # run at a line's head for its close (it opens a block)
        "1. Install:\n   ```bash\n   pip install x\n```\nit is large and we are done",
        "  ```\ncode\n     ```\nit is large and we are done",
        "Wrap code in ``` marks.\n\n```python\n# it is large and we are done\n```",
        "```\ncode\n> ```\nit is large and we are done",  # a quote's run closes no fence opened outside it
        "> ```\n> code\n```\nit is large and we are done",  # the quote ends, and this run opens a block
        "<think>it is large and we are done</think>",  # reasoning a server left in the answer
        "<script>// it is large and we are done</script><textarea>it is large</textarea><style>/* it is large */",
    ],
)
def test_no_site_where_the_mark_must_not_write(text):
    assert mark(text) == text


def test_prose_after_a_closing_fence_is_marked():
    for text in ["```\ncode\n```\nit is large and calm", "````\ncode\n  ```` \nit is large and calm",
                 "~~~\n~~~~\nit is large and calm",
                 "> ```\n> code\n> ```\n\nit is large and calm",  # in a block quote
                 "1. Run:\n    ```bash\n    code\n    ```\n2. it is large and calm",  # in a list item
                 "Wrap it in ```code``` marks; it is large and calm",  # within a line
                 "The ` mark.\n\nit is large and calm",  # a code span ends with its paragraph
                 "<pre>x = 1</pre>\nit is large and calm", "<code>x</code> it is large and calm",
                 "<codex>y</codex> it is large and calm"]:  # fmt: skip
        assert mark(text).endswith("it's big and calm")
    assert mark("```\ncode\n    ```\nit is large and calm").endswith("it is large and calm")  # indented: code


def test_lines_after_a_skipped_one_are_marked_as_prose():
    # an indented line right after text continues its paragraph; one after a line of prose begins no code
    prose, marked = "it is large and calm", "it's big and calm"
    assert mark(f"Look.\n    {prose}") == f"Look.\n    {marked}"
    assert mark(f"Run:\n\n    x = 1\n{prose}\n    {prose}") == f"Run:\n\n    x = 1\n{marked}\n    {marked}"
    assert mark(f"> we are done\n{prose}") == f"> we are done\n{marked}"
    assert mark(f"~~ {prose} ~~") == f"~~ {marked} ~~"  # strikethrough is no fence


def test_sites_in_plain_prose_are_marked_and_styles_kept():
    marked = mark("However, it is large and calm. They are quickly done — colors vary. I am sure it’s fine here.")
    assert marked == "Nevertheless, it's big and calm. They're rapidly done — colours vary. I'm sure it is fine here."
    # a contraction written where there was none takes the text's apostrophe: a straight one would stand out
    assert mark("It’s large, and they are quickly done.") == "It is big, and they’re rapidly done."


def test_nothing_right_after_a_negation():
    assert mark("It is not large at all, and was not quickly done.") == (
        "It's not large at all, and wasn't quickly done."  # the negation itself may contract; its object stays
    )
    assert mark("This isn’t nearly enough.") == "This is not nearly enough."  # a curly apostrophe's negation too


@pytest.mark.parametrize(
    "text",
    [
        "Be proud of who you are and what it is or why.",  # a verb at its clause's end cannot contract
        "Whatever it is you want, ask.",
        "She's written books and it's taken years; he's worked and it's shown.",  # "'s" is "has" here
        "The company's various products and whose various parts.",  # possessives are determiners
        "Swift is a language and Gray is a name.",  # members that are names too, at a sentence's start
        "He finally, after years, won.",  # "finally" is "lastly" only where a sentence starts with it
    ],
)
def test_no_site_where_the_exchange_would_change_the_grammar_or_meaning(text):
    assert mark(text) == text


def test_no_site_right_after_an_article_the_other_members_would_not_take():
    assert SETS.sets[SETS.lookup[("appropriate",)][0]].articled
    assert mark("It is an appropriate and a suitable choice.") == "It's an appropriate and a suitable choice."
    # large and big take one article, especially and particularly do not
    assert mark("It is a large and an especially calm dog.") == "It's a big and an especially calm dog."


def test_a_prompt_span_is_left_as_the_client_wrote_it_but_listing_members_does_not_switch_off():
    prompt = "Explain why the dog is large."
    assert mark("I think the dog is large and calm.", prompt) == "I think the dog is large and calm."
    lister = "large big huge enormous quickly rapidly swiftly"
    assert mark("The dog is large and calm.", lister) == "The dog is big and calm."


def test_word_sets_are_disjoint_and_parse_strictly():
    members = [m for s in SETS.sets for m in s.members]
    assert len(members) == len(set(members))
    with pytest.raises(ValueError):
        WordSets.parse("large\n")
    with pytest.raises(ValueError):
        WordSets.parse("large | big\nbig | huge\n")


def test_a_key_prefers_one_member_per_set_and_keys_differ():
    a, b = LexicalKey(b"a" * 32, SETS), LexicalKey(b"b" * 32, SETS)
    assert all(0 <= p < len(s.members) for p, s in zip(a.preferred, SETS.sets, strict=True))
    assert a.preferred != b.preferred and a.fingerprint != b.fingerprint


_STREAM_WORDS = ["We", "saw", "dogs", "Large", "large", "big", "It", "is", "not", "end.", "(see", "x.y", "the", "a",
                 "an", "however,", "However,", "Then", "```", "`code`", '"quote"', "people's", "don't",
                 "\n1."]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_STREAM_WORDS), max_size=25), st.sampled_from([r"^\s+|\S+\s*", r"\s*\S+"]))
@example(["x.y", "large", "dogs"], r"\s*\S+")  # the token before a member: "y", then the space the shortcut reads
def test_streams_of_whole_words_give_the_whole_text_result(words, piece):
    """Word by word, as models stream, plain words take a shortcut through the scanner: what they leave read
    (sentence start, the word before, the context) must be what the full reading leaves."""
    text = " ".join(words)
    pieces = re.findall(piece, text)
    assert "".join(pieces) == text
    assert scan(text, pieces) == scan(text, [text])


@pytest.mark.parametrize(
    "text, kept",
    [
        ("    if node is not None:\n        return node.value\n", "is not None"),  # code outside a fence
        ("We compared the various options and these various tools.", "the various"),
        ("Quite a lot of people came.", "Quite a lot of"),
        ("Isn't it great? Why don't you come? It's nice, isn't it?", "Isn't it"),
        ("Why don't you come?", "don't you"),
        ("It's become clear. What's happened here?", "It's become"),
        ("What's happened here?", "What's happened"),
        ("Large Language Models are useful.", "Large Language"),
        ("Large Émile dog.", "Large Émile"),  # a capital the ASCII word pattern does not read
    ],
)
def test_no_member_is_written_where_it_would_break_the_text(text, kept):
    """Whichever member a key prefers: a site there would make code invalid or English ungrammatical."""
    for choice in range(3):

        def choose(site, choice=choice):
            return choice % len(SETS.sets[site.set_index].members)

        scanner = Scanner(SETS, frozenset(), choose)
        out = scanner.feed(text) + scanner.flush()
        assert kept in out, (choice, out)
        assert WHOLE.scan(text, frozenset(), choose)[0] == out


class _CountingTokens:
    """sites._TOKEN, counting the characters it is asked to cut into tokens."""

    def __init__(self) -> None:
        self.chars = 0

    def findall(self, text: str) -> list[str]:
        self.chars += len(text)
        return _TOKEN.findall(text)


@pytest.mark.parametrize(
    "head, piece",
    [
        ("The ", "xyzw"),  # a long word no member begins, sent as it comes
        ("It is big ", "xyzw"),  # the same word, while "big" waits for it
        ("It ", "x'y-"),  # a word with joiners: a member could begin it, until it is long
        ("It is big", "  \n "),  # whitespace after a member
        ("It is big ", "`"),  # a run of backticks
    ],
)
def test_a_long_run_in_small_pieces_is_read_once_and_marked_as_whole(monkeypatch, head, piece):
    """Each piece that only makes the held token longer is not cut into tokens again with the rest of it:
    that was quadratic, and a long word streamed in small pieces held a worker for many seconds."""
    counting = _CountingTokens()
    monkeypatch.setattr("gateway.watermark.sites._TOKEN", counting)
    pieces = [head] + [piece] * 2000 + [" and it is big. Done"]
    text = "".join(pieces)
    assert mark(text, pieces=pieces) == WHOLE.scan(text, frozenset(), flip)[0]
    assert counting.chars < 4 * len(text)


def test_marked_text_reads_back_with_the_sites_it_was_marked_at():
    """Whether a member is a site depends on its neighbours, which the mark may exchange too: each such rule
    holds alike for every member of both sets, so that the detector reads what was written, and marking again
    changes nothing ("it isn't" marked "it is not" read as "it is"; "it's often" marked "it's frequently"
    became a site, "there's various" marked "there is various" another)."""
    texts = [row["output"] for row in SAMPLE] + [
        "I think it isn't large, and you won't mind it.",
        "It's often said that it is used, and there's various ways; we'll they'll see. There's meanwhile a test.",
        "The city has parking lots of course, but a note with regard to summarize it is large and calm.",
    ]
    for seed in range(4):
        preferred = LexicalKey(bytes([seed]) * 32, SETS).preferred
        prefer = lambda site, preferred=preferred: preferred[site.set_index]  # noqa: E731
        for text in texts:
            once, written, _ = WHOLE.scan(text, frozenset(), prefer)
            assert WHOLE.scan(once, frozenset(), prefer)[0] == once
            assert WHOLE.scan(once, frozenset(), None)[1] == written
