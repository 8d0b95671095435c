"""The whole-answer path: the scanner's decisions, taken at C speed where nothing can happen.

A non-streamed answer is marked in one call, so it need not be read token by token: one compiled regular
expression (a trie of every set member, plus backtick runs and double quotes) finds the few places where
something happens, and the ordinary text between them is summarised with a few more searches (its last two
words, and whether a word or a sentence end came last). The decisions are the scanner's, by construction
and by test: tests/watermark/test_whole.py runs both on the same texts and requires the same output, so a
stream (scanned) and the same answer whole (here) stay identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .sites import _HAS_WORDS, _NEGATORS, _OPENERS, Site, _normal, _styled
from .wordsets import WordSets

_WORDS = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*|[^\W\d_A-Za-z]")  # the scanner's word tokens
_SIGNAL = re.compile(r"[^\W\d_]|[.!?:\n]")  # what sets or clears a sentence start: a letter, an end, a newline
_NEXT_WORD = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*")
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _trie_pattern(members: list[str]) -> str:
    """A regular expression matching any member, longest first, from a character trie of them."""
    trie: dict = {}
    for member in members:
        node = trie
        for ch in member:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        ends = "" in node
        branches = [(_char(ch) + build(child)) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 and not ends else "(?:" + "|".join(branches) + ")"
        return body + "?" if ends else body

    return build(trie)


def _ascii_lower(text: str) -> str:
    """Lower-cased as the scanner compares words (ASCII letters only), at the same offsets. str.lower is
    much faster; it agrees unless the text holds a character it lower-cases into ASCII or into two."""
    lowered = text.lower()
    if len(lowered) == len(text) and "\u212a" not in text:  # KELVIN SIGN lower-cases to "k"
        return lowered
    return text.translate(_LOWER)


def _char(ch: str) -> str:
    return "['’]" if ch == "'" else re.escape(ch)


class WholeText:
    def __init__(self, sets: WordSets) -> None:
        self._sets = sets
        members = [" ".join(m) for m in sets.lookup]
        self._events = re.compile(
            r"(?P<tick>`+)|(?P<quote>[\"“”])|(?<![A-Za-z])(?<![A-Za-z]['’-])(?P<member>"
            + _trie_pattern(members)
            + r")(?![A-Za-z]|['’-][A-Za-z])",
            re.ASCII,
        )

    def scan(self, text: str, prompt: frozenset, choose: Callable[[Site], int] | None) -> tuple[str, list, int]:
        """(the text as marked, the sites, how many were changed): what a Scanner would give."""
        lookup, sets = self._sets.lookup, self._sets.sets
        data = text.lstrip()[:1] in ("{", "[")
        fence = inline = quote = False
        sentence_start, last_word, context = True, "", ["", ""]
        out, sites, changed, at = [], [], 0, 0
        # matched on an ASCII-lower-cased copy (same length; faster than a case-insensitive pattern),
        # read from the original
        for event in self._events.finditer(_ascii_lower(text)):
            start = event.start()
            if start > at:
                chunk = text[at:start]
                out.append(chunk)
                words = _WORDS.findall(chunk)
                if words:
                    last_word = words[-1].lower()
                    context = [*context, *(_normal(w) for w in words[-2:])][-2:]
                if not (fence or inline):
                    signal = _SIGNAL.search(chunk[::-1])
                    if signal is not None:
                        sentence_start = not signal.group().isalpha()
            kind = event.lastgroup
            at = event.end()
            token = text[start:at]
            if kind == "tick":
                if len(token) >= 3 and not inline:
                    fence = not fence
                elif not fence:
                    inline = not inline
                out.append(token)
                continue
            if kind == "quote":
                if not (fence or inline):
                    quote = not quote if token == '"' else token == "“"
                out.append(token)
                continue
            words = token.split(" ")
            if data or fence or inline or quote:
                for word in words:
                    context = [context[1], _normal(word)]
                last_word = words[-1].lower()
                if not (fence or inline):
                    sentence_start = False
                out.append(token)
                continue
            found = lookup[tuple(_normal(w) for w in words)]
            replacement = token
            if self._eligible(text, start, at, words, found, sentence_start, last_word, context, prompt):
                site = Site(found[0], found[1], context[1])
                if choose is None:
                    sites.append(site)
                else:
                    chosen = choose(site)
                    sites.append(Site(found[0], chosen, site.context))
                    if chosen != found[1]:
                        changed += 1
                        replacement = _styled(" ".join(sets[found[0]].members[chosen]), token)
            out.append(replacement)
            context = [context[1], f"§{found[0]}"]
            last_word = words[-1].lower()
            sentence_start = False
        out.append(text[at:])
        return "".join(out), sites, changed

    def _eligible(self, text, start, end, words, found, sentence_start, last_word, context, prompt) -> bool:
        word_set = self._sets.sets[found[0]]
        if start > 0 and not (text[start - 1].isspace() or text[start - 1] in _OPENERS):
            return False
        after = text[end : end + 1]
        then = text[end + 1 : end + 2]
        if word_set.comma:
            if not (after == "," and then.isspace()):
                return False
        elif after == " " and then.isalpha():
            if word_set.contraction and _normal(words[-1]).endswith("'s"):
                following = _NEXT_WORD.match(text, end + 1)
                if following is not None and following.group().lower() in _HAS_WORDS:
                    return False
        elif word_set.contraction or after not in (",", ";") or not then.isspace():
            return False
        if any(len(w) > 1 and w.isupper() for w in words):
            return False
        first = words[0]
        if first[0].isupper() and not sentence_start and _normal(first) not in ("i", "i'm", "i'll"):
            return False
        if any(w[0].isupper() for w in words[1:]):
            return False
        if last_word in _NEGATORS or last_word.endswith("n't"):
            return False
        return (context[0], context[1], f"§{found[0]}") not in prompt
