"""The whole-answer path: the scanner's decisions, taken at C speed where nothing can happen.

A non-streamed answer is marked in one call, so it need not be read token by token: an Aho-Corasick
automaton of every set member (compiled to a DFA), and a search for backtick runs and double quotes, find the few places
where something happens, and the ordinary text between them is summarised with a few more searches (its
last two words, and whether a word or a sentence end came last). The decisions are the scanner's, by construction
and by test: tests/watermark/test_whole.py runs both on the same texts and requires the same output, so a
stream (scanned) and the same answer whole (here) stay identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import ahocorasick_rs

from .sites import (
    _WORD,
    CODE_TAGS,
    Site,
    _normal,
    _styled,
    fences_after,
    head_width,
    indent_width,
    is_site,
    last_apostrophe,
    skipped_line,
)
from .wordsets import WordSets

_TAIL = 80
# Read backwards: the scanner's word tokens, and what sets a sentence start (a sentence end or a newline;
# a letter clears it). The scanner calls a character a word when str.isalpha() says so; the class of single
# characters also takes numerals such as "²" (alphanumeric but not alphabetic), which the reader skips.
_BACKWARDS = re.compile(rf"{_WORD.pattern}|[^\W\d_A-Za-z]|[.!?:\n]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# The lines a skipped line may start: a ">" after at most three whitespace characters, or an indentation with a tab
# in its first four characters or of four of them. A fixed-length filter (no nested repetition to backtrack
# on); sites.skipped_line decides.
_LINE_HEAD = r"(?:[^\S\n]{0,3}[>\t]|[^\S\n]{4})"
_FIRST_LINE = re.compile(_LINE_HEAD)
_LATER_LINE = re.compile(r"\n" + _LINE_HEAD)
_INDENT = re.compile(r"[^\S\n]*")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")  # a paragraph's end, which ends a code span


# What most chunks end in (", the " or "end. " before a member): two plain ASCII words with ASCII marks, spaces
# or digits after each, read from the reversed chunk with one anchored match: what _read_backwards finds there
# (the first sentence end after the last word, if any, is its signal). The word before the last must begin
# where it appears to (no letter, apostrophe or hyphen just before it); where the end of the chunk is not of
# that shape (an apostrophe, a hyphen or a character beyond ASCII among the last two words or after them), it
# is left to _read_backwards. A test holds the two equal on random chunks.
_MARK = r"[^A-Za-z'’\-\x80-\U0010ffff]"  # ASCII, not a letter, an apostrophe or a hyphen
_PLAIN_MARK = r"[^A-Za-z'’\-\x80-\U0010ffff.!?:\n]"  # nor a sentence end
_TWO_WORDS_BACK = re.compile(rf"(?:{_PLAIN_MARK}*([.!?:\n]))?{_MARK}*([A-Za-z]+){_MARK}+([A-Za-z]+)(?![A-Za-z'’-])")


def _read_back(chunk: str) -> tuple[list[str], str]:
    """(the chunk's last two word tokens, fewer if it has fewer; its last letter or sentence end, or ""), in
    one match where the chunk ends in two plain words, else read backwards from its last _TAIL characters, or
    from all of it where they cannot tell."""
    plain = _TWO_WORDS_BACK.match(chunk[::-1])
    if plain is not None:
        end, last, before = plain.groups()
        return [before[::-1], last[::-1]], end or last[0]
    found = _read_backwards(chunk, len(chunk) - _TAIL) if len(chunk) > _TAIL else None
    return found if found is not None else _read_backwards(chunk, 0)


def _read_backwards(chunk: str, start: int) -> tuple[list[str], str] | None:
    """`_read_back` over chunk[start:] in one backward pass: the word pattern reads the same both ways, so
    the words found backwards are the scanner's. None when a window that starts inside the chunk cannot
    tell: it cuts a word (through its letters, or at an apostrophe or hyphen), or holds fewer than two."""
    words, signal = [], ""
    for match in _BACKWARDS.finditer(chunk[start:][::-1]):
        token = match.group()
        if not token[0].isalpha():
            if not token.isalnum():  # a sentence end; numerals such as "²" are neither word nor end
                signal = signal or token
            continue
        if start and not _word_edge_before(chunk, len(chunk) - match.end()):
            return None
        signal = signal or token[0]
        words.append(token[::-1])
        if len(words) == 2:
            return words[::-1], signal
    return None if start else (words[::-1], signal)


def _read_into(context: list[str], words: list[str]) -> list[str]:
    """The last two canonical words after reading `words` (at most two, as _read_back gives them)."""
    if len(words) == 2:
        return [_normal(words[0]), _normal(words[1])]
    return [context[1], _normal(words[0])] if words else context


def _marks(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every backtick run and run of three tildes or more ("tick"), double quote ("quote"),
    and line that may be skipped: its first character ("line") and its end ("eol"). They are rare, and
    str.find skips to them at memchr speed: measured 25 times faster than one regular expression."""
    found = _lines(text) + _tags(text)
    for quote in '"“”':
        at = text.find(quote)
        while at >= 0:
            found.append((at, at + 1, "quote"))
            at = text.find(quote, at + 1)
    at = text.find("`")
    while at >= 0:
        end = at + 1
        while end < len(text) and text[end] == "`":
            end += 1
        found.append((at, end, "tick"))
        at = text.find("`", end)
    at = text.find("~~~") if "~" in text else -1  # one character is found at memchr speed, three are not
    while at >= 0:  # the first three of a run are the first found (a shorter run is no fence: no event)
        end = at + 3
        while end < len(text) and text[end] == "~":
            end += 1
        found.append((at, end, "tick"))
        at = text.find("~~~", end)
    return found


def _tags(text: str) -> list[tuple[int, int, str]]:
    """("open" or "close", where the name ends) of each tag that may open or close an HTML code element: "<pre"
    or "<code", "</pre" or "</code", then no more of a word (Scanner._read_tag)."""
    found = []
    if "<" not in text:
        return found
    for name in CODE_TAGS:
        for tag, kind in (("<" + name, "open"), ("</" + name, "close")):
            at = text.find(tag)
            while at >= 0:
                at += len(tag)
                if _word_edge_after(text, at):
                    found.append((at, at, kind))
                at = text.find(tag, at)
    return found


def _lines(text: str) -> list[tuple[int, int, str]]:
    """("line" at its first character, "eol" at its newline) of each line with text that may be skipped: a
    quote, or indented four columns after a blank line or after another such line (sites.skipped_line).
    Whether it is, the fences around it tell (Scanner._begin_line, as the events are read)."""
    found, chain = [], -1  # the newline of the last line that may be indented code
    heads = [m.start() + 1 for m in _LATER_LINE.finditer(text)]
    if _FIRST_LINE.match(text):
        heads.insert(0, 0)
    for start in heads:
        first = _INDENT.match(text, start).end()
        if first == len(text) or text[first] == "\n":
            continue
        width = indent_width(text[start:first])
        indented = width >= 4 and (chain == start - 1 or _blank_before(text, start))
        if indented or (width <= 3 and text[first] == ">"):
            end = text.find("\n", first)
            found.append((first, first, "line"))
            if end >= 0:
                found.append((end, end, "eol"))
            chain = end if indented else -1
    return found


def _line_kind(text: str, first: int, in_code_block: bool, code_end: int) -> tuple[bool, bool]:
    """sites.skipped_line of the line whose first character is at `first`, outside fenced code; `code_end`: the
    newline of the last line read as indented code, which it continues if no line with text came between."""
    line = text.rfind("\n", 0, first) + 1
    in_code_block = in_code_block and text[code_end:line].isspace()
    return skipped_line(indent_width(text[line:first]), text[first], _blank_before(text, line), in_code_block)


def _blank_before(text: str, line: int) -> bool:
    """The line starting at `line` is the text's first, or the line before it is whitespace only."""
    if line == 0:
        return True
    before = text[text.rfind("\n", 0, line - 1) + 1 : line - 1]
    return not before or before.isspace()


def _line_head(text: str, start: int) -> int | None:
    """The width of what precedes `start` on its line where that is only whitespace and ">" (Scanner._head_width),
    else None. Read backwards until the first other character: only a line's first run has more to read."""
    at = start
    while at and (text[at - 1] == ">" or (text[at - 1] != "\n" and text[at - 1].isspace())):
        at -= 1
    if at and text[at - 1] != "\n":
        return None
    return head_width(text[at:start])


def _paragraph_end(text: str, start: int) -> int:
    """Where what follows the first blank line after `start` begins (past the text's end where none follows)."""
    blank = _BLANK_LINE.search(text, start)
    return blank.end() if blank else len(text) + 1


def _rest_of_line_blank(text: str, end: int) -> bool:
    """Nothing but whitespace from `end` to the end of its line (or of the text)."""
    eol = text.find("\n", end)
    rest = text[end:] if eol < 0 else text[end:eol]
    return not rest or rest.isspace()


def _word_edge_before(text: str, start: int) -> bool:
    """No word goes on before `start`: not a letter, nor a letter with an apostrophe or hyphen."""
    if start == 0:
        return True
    before = text[start - 1]
    if before in _LETTERS:
        return False
    return not (before in "'’-" and start > 1 and text[start - 2] in _LETTERS)


def _word_edge_after(text: str, end: int) -> bool:
    """No word goes on after `end`: not a letter, nor an apostrophe or hyphen and a letter."""
    if end >= len(text):
        return True
    after = text[end]
    if after in _LETTERS:
        return False
    return not (after in "'’-" and end + 1 < len(text) and text[end + 1] in _LETTERS)


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    """Lower-cased as the scanner compares words (ASCII letters only), at the same offsets. str.lower is
    much faster; it agrees unless the text holds a character it lower-cases into ASCII or into two."""
    lowered = text.lower()
    if len(lowered) == len(text) and "\u212a" not in text:  # KELVIN SIGN lower-cases to "k"
        return lowered
    return text.translate(_LOWER)


class WholeText:
    def __init__(self, sets: WordSets) -> None:
        self._sets = sets
        spellings = set()
        for words in sets.lookup:
            member = " ".join(words)
            spellings.update((member, member.replace("'", "’")))
        # A DFA: 9 µs a 1.5 KB answer against 23 µs for the default NFA and 35 µs for pyahocorasick (measured)
        self._members = ahocorasick_rs.AhoCorasick(sorted(spellings), implementation=ahocorasick_rs.Implementation.DFA)

    def _events(self, lowered: str) -> list[tuple[int, int, str]]:
        """(start, end, kind) of every backtick run, double quote and member, in order."""
        events = self._member_events(lowered)
        marks = _marks(lowered)
        if marks:
            events += marks
            events.sort()
        return events

    def _member_events(self, lowered: str) -> list[tuple[int, int, str]]:
        """(start, end, "member") of every member, in order. Members are found with an Aho-Corasick automaton
        (one compiled pass; measured five times faster than one regular expression of all members) and kept
        where they stand as whole words, leftmost and longest first, without overlapping: the scanner's
        reading. Every match is asked for (overlapping), so that one inside a word cannot hide a whole-word
        member it overlaps."""
        # A lone surrogate (JSON allows them) has no UTF-8, which the automaton needs: such a text is searched
        # with U+FFFD in its place, like it one code point and no letter, so every offset and word edge stays.
        try:
            matches = self._members.find_matches_as_indexes(lowered, overlapping=True)
        except UnicodeEncodeError:
            matches = self._members.find_matches_as_indexes(_SURROGATE.sub("\ufffd", lowered), overlapping=True)
        found = []
        for _, start, end in matches:
            if _word_edge_before(lowered, start) and _word_edge_after(lowered, end):
                found.append((start, start - end))
        found.sort()
        events, reach = [], 0
        for start, negative_length in found:
            if start >= reach:
                reach = start - negative_length
                events.append((start, reach, "member"))
        return events

    def scan(self, text: str, prompt: frozenset, choose: Callable[[Site], int] | None) -> tuple[str, list, int]:
        """(the text as marked, the sites, how many were changed): what a Scanner would give."""
        lookup, sets = self._sets.lookup, self._sets.sets
        data = text.lstrip()[:1] in ("{", "[")
        fence, inline, quote, skipped, in_code_block, code_end = "", 0, False, False, False, 0
        fence_length, fence_indent, inline_end = 0, None, 0  # inline_end: where the open code span's paragraph ends
        html = False  # within an HTML code element
        sentence_start, last_word, context, curly = True, "", ["", ""], False
        out, sites, changed, at = [], [], 0, 0
        # found on an ASCII-lower-cased copy (same offsets), read from the original
        for start, end, kind in self._events(_ascii_lower(text)):
            if inline and start >= inline_end:
                inline = 0
            if start > at:
                chunk = text[at:start]
                out.append(chunk)
                curly = last_apostrophe(chunk, curly)
                words, signal = _read_back(chunk)
                if words:
                    last_word = words[-1].lower()
                    context = _read_into(context, words)
                if signal and not (fence or inline or skipped or html):
                    sentence_start = not signal.isalpha()
            at = end
            token = text[start:at]
            if kind != "member":
                if kind == "line":
                    if fence:  # as Scanner._begin_line
                        in_code_block = False
                    else:
                        skipped, in_code_block = _line_kind(text, start, in_code_block, code_end)
                        code_end = text.find("\n", start)
                elif kind == "eol":
                    skipped = False
                elif kind in ("open", "close"):
                    if not (fence or inline):
                        html = kind == "open"
                elif kind == "tick":
                    if html:  # HTML's code holds backticks as text
                        out.append(token)
                        continue
                    fence, fence_length, fence_indent, inline, closing = fences_after(
                        token, fence, fence_length, fence_indent, inline, skipped, _line_head(text, start)
                    )
                    if closing and _rest_of_line_blank(text, at):
                        fence = ""
                    if inline:
                        inline_end = _paragraph_end(text, at)
                elif not (fence or inline or skipped or html):
                    quote = not quote if token == '"' else token == "“"
                out.append(token)
                continue
            words = token.split(" ")
            if data or fence or inline or quote or skipped or html:
                for word in words:
                    context = [context[1], _normal(word)]
                last_word = words[-1].lower()
                if not (fence or inline or skipped or html):
                    sentence_start = False
                out.append(token)
                curly = last_apostrophe(token, curly)
                continue
            found = lookup[(_normal(token),) if len(words) == 1 else tuple(map(_normal, words))]
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
                        replacement = _styled(" ".join(sets[found[0]].members[chosen]), token, curly)
            out.append(replacement)
            curly = last_apostrophe(token, curly)
            context = [context[1], f"§{found[0]}"]
            last_word = words[-1].lower()
            sentence_start = False
        out.append(text[at:])
        return "".join(out), sites, changed

    def prompt_trigrams(self, prompt: str) -> frozenset[tuple[str, str, str]]:
        """sites.prompt_trigrams (the canonical trigrams that end in a member), from the members found at C
        speed and the two words read back before each, not from every word (a prompt is every message of a
        conversation: thousands of words, where the definition reads each in Python). A test holds the two equal."""
        lookup, found, context, units, at = self._sets.lookup, set(), ["", ""], 0, 0
        for start, end, _ in self._member_events(_ascii_lower(prompt)):  # backticks and quotes: read as marks
            words = _read_back(prompt[at:start])[0]
            context = _read_into(context, words)
            member = f"§{lookup[tuple(map(_normal, prompt[start:end].split(' ')))][0]}"
            if units + len(words) >= 2:
                found.add((context[0], context[1], member))
            context, units, at = [context[1], member], units + len(words) + 1, end
        return frozenset(found)

    def _eligible(self, text, start, end, words, found, sentence_start, last_word, context, prompt) -> bool:
        then = text[end + 1 : end + 2]
        following = _WORD.match(text, end + 1) if then.isalpha() else None
        return is_site(
            self._sets.sets[found[0]],
            words,
            text[start - 1] if start else "",
            text[end : end + 1],
            then,
            following.group() if following else "",
            sentence_start,
            last_word,
            context,
            prompt,
        )
