"""The whole-answer path and the streaming scanner are two readings of one specification: the same output,
sites and changes on every text, so that a stream and the same answer whole are marked identically."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.watermark import whole
from gateway.watermark.sites import Scanner, prompt_trigrams
from gateway.watermark.whole import WholeText
from gateway.watermark.wordsets import default_sets

SETS = default_sets()
WHOLE = WholeText(SETS)
SAMPLE = [json.loads(line) for line in (Path(__file__).parent.parent / "data" / "alpaca_eval_sample.jsonl").open()]
PIECES = ["it", "is", "It", "IS", "large", "Large", "big", "however", "However", "quickly", "for", "example",
          "all", "of", "the", "them", "don't", "don’t", "it's", "been", "not", "colors", "I", "am", "in", "addition",
          " ", "  ", "\n", ",", ";", ".", ":", "!", "`", "```", '"', "“", "”", "(", "—", "-", "'", "{", "[", "3",
          "é", "café", "e-mail", "x'large", "large-scale", "\u212a", "\u0130", "É", "LARGE", "²", "½", "a", "an",
          "An", "appropriate", "suitable", "\ud800", "~", "~~~", "~~~~", ">", "> ", "\t", "    ", "\n\n", "\n    ",
          "\n>", "\n\t", "``", "<", "/", "pre", "code", "<pre>", "</code>", "<code "]  # fmt: skip


def both(text: str, prompt: str = "") -> None:
    trigrams = prompt_trigrams(prompt, SETS) if prompt else frozenset()
    flip = lambda site: (site.member + 1) % len(SETS.sets[site.set_index].members)  # noqa: E731
    scanner = Scanner(SETS, trigrams, flip)
    streamed = scanner.feed(text) + scanner.flush()
    whole, sites, changed = WHOLE.scan(text, trigrams, flip)
    assert whole == streamed
    assert (sites, changed) == (scanner.sites, scanner.changed)


def test_real_answers_give_the_same_result_both_ways():
    for row in SAMPLE:
        both(row["output"], row["instruction"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.lists(st.sampled_from(PIECES), max_size=8))
def test_any_text_gives_the_same_result_both_ways(pieces, prompt):
    both("".join(pieces), "".join(prompt))


# what lines are made of: indentation, block quotes, fences, blank lines, and prose with members in it
LINE_PIECES = ["\n", "\n\n", "\n \n", " ", "  ", "    ", "\t", ">", "~~~", "~~", "```", "``", "`", '"', "it is large",
               "However, it is large", "x", "done.", "quickly, all of them"]  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(LINE_PIECES), max_size=30))
@example(["\n\n", "    ", "x", "\n", "done.", "\n", "    ", "it is large"])  # prose ends indented code
def test_lines_give_the_same_result_both_ways(pieces):
    both("".join(pieces))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30).map(" ".join))
def test_spaced_text_gives_the_same_result_both_ways(text):
    both(text, "the dog is large")


def test_long_stretches_and_numerals_give_the_same_result_both_ways():
    """The whole path reads the last 80 characters before a member backwards: words the window's start cuts
    (through letters, at a hyphen or an apostrophe), windows with no letter, and numerals such as "²"
    (neither word nor sentence end) must read as the scanner reads them."""
    for gap in range(60, 100):
        for before in ("alpha well-known", "alpha don't", "Done.", "x ²", "x²"):
            text = before + " " * gap + "large dog. Large dog"
            both(text, before + " large")
    for text in ("x ² Large big", "x² Large dog", "end. ² Large dog", "it is ½ Large, and big"):
        both(text)
    both("It is an appropriate and a suitable, an especially calm and a large dog. An appropriate one.")


def test_a_joined_word_two_before_a_member_is_read_whole():
    """The whole path reads the two words before a member from the end of the text before it; a word joined
    by a hyphen or an apostrophe must be read whole there ("well-known", not "known"), or a prompt that
    holds the same three words would not keep the member from being marked."""
    for joined in ("well-known", "x'large", "don’t", "e-mail"):
        for text in (f"We saw a {joined} the large dog.", f"{joined} the large dog", f"a {joined}, the large one"):
            both(text, f"{joined} the large")


_CHUNK_PIECES = ["the", "large", "Dog", "x", " ", "  ", ", ", ". ", "! ", ": ", "\n", "(", ")", "*", "#", "3", "_",
                 "-", "'", "’", "well-known", "don't", "é", "naïve", "²", "İ", "\u212a", "\t"]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_CHUNK_PIECES), max_size=12).map("".join))
def test_reading_back_a_chunk_takes_the_shortcut_only_where_it_gives_the_same(chunk):
    """The text before a member is read back in one match where it ends in two plain words: what reading
    every token backwards gives (the words, and the signal of a sentence start)."""
    assert whole._read_back(chunk) == whole._read_backwards(chunk, 0)
