"""Where the watermark may write, found the same way when marking (as text streams) and when detecting.

A `Scanner` reads one text part token by token. At each word it looks for the longest member of a word set starting
there (up to three words, joined by single spaces) and decides whether that place is a site:

- not inside fenced (``` or ~~~: `fences_after` says where a fence ends) or inline code, HTML's code elements (<pre>,
  <code>), quotations, or a part that is structured data (it starts with { or [); nor on a line of a block quote
  ("> ", after at most three spaces) or of an indented code block (indented by four columns or more, a tab counting
  four, after a blank line, the start of the text or another such line: a list's continuation indented so after a
  blank line is left unmarked too);
- not glued to a URL, path, address or identifier (a space or an opening bracket before it, and a space and a word,
  or a comma or semicolon and a space, after it; before the end of a sentence it is no site);
- not a name (capitalised other than at the start of a sentence, or there before another capital; never capitalised
  for an "@lower" set) nor written in capitals; an "@start" set only at a sentence's start;
- not right after a negation, nor right after "a" or "an" where the set's members take different articles, nor after
  a determiner or possessive where a member begins with an article ("the various", never "the a variety of"), nor
  after a word it would join into another set's phrase ("it isn't", read "it is not");
- a connector set ("@comma") only where a comma follows, a contraction only before a following word, and never a
  "'s" that could stand for "has" ("it's been"), nor a negative one before a subject ("isn't it"), nor one that
  would leave its verb at a clause's end ("who you are and");
- where a neighbour decides, alike for every member of its set and of the neighbour's (WordSet's neighbour fields),
  so that marked text reads back with the sites it was marked at;
- never before a literal of code ("x is not None": code outside a fence, which "isn't" would break);
- not where its two preceding words and itself, with set members read as their set, appear so in the prompt (a
  prompt that lists members cannot switch the mark off, but a quoted phrase is kept).

When marking, `choose(site)` names the member to write; the scanner writes it in the case and apostrophe style of
what it replaces (where that has no apostrophe, in the style of the last one read). It holds back at most one
incomplete token plus three words and the two tokens after them, so a stream is delayed by at most three words, and
its output is the same whatever the split of the text into pieces (the tokens, and so every decision, do not depend
on where pieces end). An incomplete word that no member begins, with nothing held before it, is not held: it goes
out as it comes.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from .wordsets import MAX_WORDS, WordSets, participle

_WORD = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*")  # a word: letters, joined by an apostrophe or hyphen
_TOKEN = re.compile(rf"`+|~+|{_WORD.pattern}|\s+|.", re.S)
# _TOKEN's word tokens and more (numerals such as "²", which _is_word drops), at the same places: no other token
# of _TOKEN takes a letter, so the words are found without cutting the text into every token
# what goes on with a word that has come so far (up to a letter, or an apostrophe or hyphen after one)
_WORD_GOES_ON = re.compile(r"[A-Za-z]*(?:['’-][A-Za-z]+)*['’-]?")
_WORDS = re.compile(rf"{_WORD.pattern}|[^\W\d_A-Za-z]")
_NEGATORS = frozenset({"not", "no", "never", "nor", "cannot", "without"})
_OPENERS = frozenset({"(", "[", "“", "‘", "—"})
_SENTENCE_ENDS = frozenset({".", "!", "?", ":"})
# "the various": "a variety of" cannot follow these
_DETERMINERS = frozenset(
    {"the", "these", "those", "this", "that", "my", "your", "his", "her", "its", "our", "their", "such", "quite",
     "what", "rather", "many", "several", "some", "any", "all", "no", "each", "every", "whose"}
)  # fmt: skip
_POSSESSIVE = ("'s", "’s", "s'", "s’")  # "the company's various products": a determiner too (not "there's")
# code's literals: "x is not None" is code, where "isn't" would break it, even outside a fence
_CODE_WORDS = frozenset({"None", "True", "False", "null", "nil", "undefined", "NULL", "nullptr", "NaN"})
# HTML elements whose text is code, or read as such (a textarea's, a script's), or a model's reasoning that a
# server left in its answer (<think>): what their tags hold is left alone
CODE_TAGS = ("pre", "code", "script", "style", "textarea", "think")


class Site(NamedTuple):  # a tuple: made twice per site when marking, in half a frozen dataclass's time (measured)
    set_index: int
    member: int  # the member found in the text
    context: str  # the word before it (lower case), for context-keyed schemes


def _is_word(token: str) -> bool:
    return token[0].isalpha()


def fences_after(run: str, fence: str, length: int, indent: int | None, inline: int, skipped_line: bool,
                 head: int | None):  # fmt: skip
    """(fence, its length, its indent, inline, closing) after a run of backticks or tildes: `fence` is "" or the
    character that opened the fenced block (`length` of them). `head` is the width of what precedes the run on
    its line when that is only whitespace and ">" (block quotes: head_width), else None. Any run of three or
    more opens a fence (where code may begin, the mark rather leaves text alone), and at a line's head it does
    so even within a code span (a lone backtick in prose, "the ` mark", must not leave the next block's code to
    be marked).
    `inline` is the length of the backtick run that opened a code span (0: none), which only a run of that
    length closes; a blank line ends it too (the callers look). On a skipped line (quote or indented code) only
    fences count, so that a fence opened there closes where it would.

    Where a fence is open, CommonMark's reading is taken wherever the mark cannot tell a list item's indent from
    the document's, so that no reading of the text has code where the mark writes:
    - one opened within a line ("wrap it in ``` marks") closes at the next run of its character, at least as
      long, within a line; a run of three or more at a line's head opens a fenced block instead, as it does in
      CommonMark (a fenced block may interrupt a paragraph);
    - one opened at a line's head (`indent` its width) closes at a run of its character, at least as long, at
      a line's head indented at least as much and at most three columns (or as much, if more), where nothing
      but whitespace follows on its line (`closing`: the caller looks), so "text.replace('```', '')" closes
      nothing. A run of three or more at a line's head indented less ends the list item the block was in, and
      opens another block."""
    char = run[0]
    if fence:
        if head is not None and len(run) >= 3 and (indent is None or head < indent):
            return char, len(run), head, 0, False
        if char != fence or len(run) < length:
            return fence, length, indent, inline, False
        if indent is None:
            return "", 0, None, inline, False
        return fence, length, indent, inline, head is not None and indent <= head <= max(indent, 3)
    if len(run) >= 3 and (not inline or head is not None):
        return char, len(run), head, 0, False
    if char == "`" and not skipped_line:
        if not inline:
            return fence, length, indent, len(run), False
        return fence, length, indent, 0 if len(run) == inline else inline, False
    return fence, length, indent, inline, False


# What a block quote's ">" adds to a line head's width: more than any indentation, so that a fence opened in a
# quote closes only at the same depth, and one opened outside does not close at "> ```" (fences_after)
QUOTE_COLUMNS = 1 << 16


def head_width(head: str) -> int:
    """The width of a line's head (whitespace and ">" only): its indentation, and QUOTE_COLUMNS per quote."""
    return indent_width(head.replace(">", "")) + QUOTE_COLUMNS * head.count(">")


def indent_width(space: str) -> int:
    """Columns of a line's indentation (a tab counts four)."""
    return len(space) + 3 * space.count("\t")


def skipped_line(width: int, first: str, blank_before: bool, in_code_block: bool) -> tuple[bool, bool]:
    """(whether the mark skips the line, whether it is indented code), for a line outside fenced code that is
    indented `width` columns and whose first character is `first`; `blank_before`: the line before it is
    blank, or it is the text's first; `in_code_block`: the last line with text before it was indented code."""
    code = width >= 4 and (blank_before or in_code_block)
    return code or (first == ">" and width <= 3), code


def _normal(word: str) -> str:
    return word.lower().replace("’", "'")


def canonical_words(text: str, sets: WordSets) -> list[str]:
    """The text's words, lower case, with each set member read as its set's name: at each word the longest
    member first, a phrase only where its words are joined by single spaces (as the scanner reads text)."""
    return _canonical(text, sets)[0]


def prompt_trigrams(prompt: str, sets: WordSets) -> frozenset[tuple[str, str, str]]:
    """The prompt's trigrams of canonical words that end in a member: the only ones a site asks about (is_site).
    The definition; the marks read it faster, from the members alone (whole.WholeText.prompt_trigrams)."""
    words, members = _canonical(prompt, sets)
    return frozenset((words[k - 2], words[k - 1], words[k]) for k in members if k >= 2)


def prompt_sets(prompt: str, sets: WordSets) -> frozenset[int]:
    """The sets any of whose members the prompt uses: a detector passes over them (scoring.vote_counts). The
    prompt is read loosely, since a set passed over is only a vote lost: a prompt holding marked text in
    another typography (no-break or double spaces, soft hyphens or zero-width characters inside words, another
    apostrophe, a phrase broken across lines) must hide it as well as the plain copy does."""
    words, members = _canonical(loosened(prompt), sets, any_gap=True)
    return frozenset(int(words[k][1:]) for k in members)


_APOSTROPHES = str.maketrans({"\u02bc": "'", "\u2018": "'", "\u2032": "'", "\u00b4": "'", "\u2010": "-", "\u2011": "-"})


def loosened(text: str) -> str:
    """Compatibility forms folded (NFKC: a no-break space is a space), format characters (soft hyphens,
    zero-width ones) dropped, apostrophes and hyphens of other shapes read as the plain ones."""
    if text.isascii():
        return text
    text = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")
    return text.translate(_APOSTROPHES)


def _canonical(text: str, sets: WordSets, any_gap: bool = False) -> tuple[list[str], list[int]]:
    """(canonical_words, the positions in it of members). Only a word that begins a phrase is tried for one
    (most begin none); its words are joined by one space (as the scanner reads text) or, with `any_gap`, by
    anything but letters and digits."""
    spans = [m.span() for m in _WORDS.finditer(text) if _is_word(m.group())]
    words = [_normal(text[start:end]) for start, end in spans]
    lookup, single, heads = sets.lookup, sets.single, sets.heads
    out, members, i, count = [], [], 0, len(words)
    while i < count:
        found, n = single.get(words[i]), 1
        if words[i] in heads:
            for longer in range(min(MAX_WORDS, count - i), 1, -1):
                gaps = (text[spans[j - 1][1] : spans[j][0]] for j in range(i + 1, i + longer))
                joined = all(not any(c.isalnum() for c in gap) if any_gap else gap == " " for gap in gaps)
                phrase = lookup.get(tuple(words[i : i + longer])) if joined else None
                if phrase is not None:
                    found, n = phrase, longer
                    break
        if found is None:
            out.append(words[i])
        else:
            members.append(len(out))
            out.append(f"§{found[0]}")
        i += n
    return out, members


class Scanner:
    """One text part: `feed` pieces, `flush` at the end; `sites` lists what it found (or wrote)."""

    def __init__(self, sets: WordSets, prompt: frozenset = frozenset(), choose: Callable[[Site], int] | None = None):
        self._sets = sets
        self._prompt = prompt
        self._choose = choose
        self.sites: list[Site] = []
        self.changed = 0  # sites whose member was exchanged (marking)
        self._buffer = ""  # text not yet cut into complete tokens (its first `_sent` characters are out)
        self._sent = 0  # how much of the buffer went out already (a word no member begins)
        self._tokens: deque[str] = deque()  # complete tokens not yet decided
        self._final = False
        # what has been read so far
        self._started = False
        self._data = False  # the part is structured data: no sites at all
        self._fence = ""  # the character of the open fence (` or ~), or ""
        self._fence_length = 0  # how many opened it
        self._fence_indent: int | None = None  # the width before it on its line (None: it opened within a line)
        self._closing = False  # a run that closes the fence if its line holds nothing more has been read
        self._inline = 0  # the length of the backtick run that opened a code span (0: none)
        self._quote = False
        self._html = False  # within an HTML code element (<pre> or <code>, until a closing tag of either)
        self._tag = ""  # "<" or "</" just read: the word after it may name a code element
        # lines: the current one has had no text yet (it is `_indent` columns in), the one before it was blank,
        # the last line with text was indented code, the current one is skipped (a quote or indented code)
        self._line_pending, self._indent, self._blank_before = True, 0, True
        # the width of what the current line holds so far, while that is only whitespace and ">" (else None)
        self._head_width: int | None = 0
        self._in_code_block = self._skipped_line = False
        self._sentence_start = True
        self._previous = ""  # the last token emitted
        self._curly = False  # the last apostrophe read was ’ (a replacement's apostrophes follow the text's)
        self._last_word = ""
        self._context: list[str] = ["", ""]  # the last two canonical words

    @property
    def holding(self) -> bool:
        return bool(self._tokens) or len(self._buffer) > self._sent

    def feed(self, text: str) -> str:
        if not self._tokens and text.isascii():
            plain = self._plain_word(text)
            if plain is not None:
                return plain
        grown = self._grow_held_token(text)
        if grown is not None:
            return grown
        self._buffer += text
        tokens = _TOKEN.findall(self._buffer)
        keep = _incomplete_tail(tokens)
        self._buffer = "".join(tokens[len(tokens) - keep :]) if keep else ""
        self._tokens.extend(tokens[: len(tokens) - keep])
        out = self._unsent(self._drain(), completed=len(tokens) > keep)
        if not self._tokens and self._buffer.isspace():
            # Trailing space may go on, but with no word waiting for what follows it, how it ends changes
            # no decision: send it now, so that a stream of "word " pieces flows through unshifted.
            out += self._buffer
            self._after(self._buffer)
            self._buffer = ""
        elif not self._tokens:
            out += self._typed_word_out()
        return out

    def _grow_held_token(self, text: str) -> str | None:
        """What `feed` gives for a piece that only makes the incomplete token held at the buffer's end longer (a
        word, or a run of whitespace, backticks or tildes), or None for any other piece. Nothing is decided
        until that token ends, so the buffer is not cut into tokens again: for every piece of a long run it
        would be read whole, quadratic in the run's length (a 160 KB word in 4-letter pieces took 37 s).
        A buffer ending in a letter, whitespace, a backtick or a tilde is that one token; one ending in an
        apostrophe or hyphen is a word and that joiner (_incomplete_tail)."""
        last = self._buffer[-1:]
        if not last or not text:
            return None
        joined = last in "'’-"
        if (joined or (last.isascii() and last.isalpha())) and _WORD_GOES_ON.fullmatch(last + text if joined else text):
            if self._tokens:  # what is held waits for this word's end
                self._buffer += text
                return ""
            # a word no member begins (sent as it comes, but for a joiner that may end it); a word longer than
            # every member's first word (less its joiner, if it has one) is one
            if self._sent or len(self._buffer) > self._sets.longest_start + 1:
                self._buffer += text
                if text[-1] in "'’-":
                    return ""
                out, self._sent = self._buffer[self._sent :], len(self._buffer)
                return out
            return None  # a member may begin with it: is it still one? (feed asks, for a word this short)
        if (last.isspace() and text.isspace() and self._tokens) or (last in "`~" and not text.strip(last)):
            self._buffer += text
            return ""
        return None

    def _typed_word_out(self) -> str:
        """The part not yet sent of a word still being typed (the buffer) that no member begins, or "".

        Such a word ("people", which the next piece may go on as "people's") is sent as it comes: whatever
        follows, it goes out as written, so a stream of " word" pieces flows through unshifted. What it is
        decides later words: that waits until it is complete. Only with nothing held before it (the caller's
        part), so that it is the next thing out."""
        if not _WORD.fullmatch(self._buffer) or _normal(self._buffer) in self._sets.starts:
            return ""
        out, self._sent = self._buffer[self._sent :], len(self._buffer)
        return out

    def _plain_word(self, text: str) -> str | None:
        """A piece that is one plain word and a space (" word" or "word "), with nothing held before the word
        being typed: what `feed` would give, in fewer steps, or None for any other piece. A word that no member
        begins is no site and changes nothing but what has been read; one that a member may begin waits, as
        in `feed`."""
        if text[:1] == " " and text[1:].isalpha():  # OpenAI's way: the word goes on in the next piece or not
            out = self._completed_word()
            if out is None:
                return None
            self._buffer, self._sent = text[1:], 0
            return out + " " + self._typed_word_out()
        word = text[:-1]
        if not self._buffer and text[-1:] == " " and self._plain_non_member(word):
            self._after_plain_word(word)
            return text
        return None

    def _completed_word(self) -> str | None:
        """The word being typed, complete now that a space follows it: read, and what of it is still to be
        sent; None where a member may begin with it (then `feed` decides it)."""
        word = self._buffer
        if self._plain_non_member(word):
            self._after_plain_word(word)
        elif self._sent < len(word):
            return None  # held, for a member may begin with it
        else:  # nothing, or a word sent early (no member begins it) that is not plain ("people's")
            if word:
                self._after(word)
            self._after(" ")
        return word[self._sent :]

    def _after_plain_word(self, word: str) -> None:
        """`_after` of a plain ASCII word and of the space after it, in one step (most pieces of a stream)."""
        if not self._started:
            self._started, self._data = True, False
        if self._line_pending:
            self._begin_line(word)
        if not self._fence and not self._inline and not self._skipped_line and not self._html:
            self._sentence_start = False
        self._last_word = lower = word.lower()
        self._context = [self._context[1], lower]
        self._previous = " "
        self._head_width, self._closing = None, False

    def _plain_non_member(self, word: str) -> bool:
        """A complete word (a space follows it) of ASCII letters only, which no member begins, and no tag's
        name (nothing before it is "<" or "</")."""
        if self._tag or not (word.isascii() and word.isalpha()):
            return False
        lower = word.lower()
        return lower not in self._sets.single and lower not in self._sets.heads

    def flush(self) -> str:
        self._final = True
        self._tokens.extend(_TOKEN.findall(self._buffer))
        completed = bool(self._buffer)
        self._buffer = ""
        return self._unsent(self._drain(), completed)

    def _unsent(self, out: str, completed: bool) -> str:
        """`out` less the part of a word sent early, once that word has left the buffer: nothing was held
        before it and it is no member, so the drain sent it first and unchanged."""
        if not (self._sent and completed):
            return out
        sent, self._sent = self._sent, 0
        return out[sent:]

    # --- deciding, token by token ---

    def _drain(self) -> str:
        out = []
        tokens = self._tokens
        while tokens:
            token = tokens[0]
            if self._line_pending and not token[0].isspace():  # a line's first text decides what the line is
                self._begin_line(token)
            if not _is_word(token) or self._excluded():
                tokens.popleft()
                out.append(token)
                self._after(token)
                continue
            match = self._match()
            if match is None:  # the next tokens decide: wait for them
                break
            length, found = match
            words = [tokens[i] for i in range(length)]
            eligible = found is not None and self._eligible(words, found)
            for _ in range(length):
                tokens.popleft()
            text = "".join(words)
            out.append(self._site(words, found, text) if eligible else text)
            before = self._context[1]
            for word in words[::2]:
                self._after(word)
            if found is not None:  # a member, of one word or several, is one unit of context
                self._context = [before, f"§{found[0]}"]
        return "".join(out)

    def _excluded(self) -> bool:
        return self._data or self._fence or self._inline or self._quote or self._skipped_line or self._html

    def _match(self):
        """(tokens taken, (set index, member index) or None), or None while more tokens are needed."""
        tokens, sets = self._tokens, self._sets
        words = (_normal(tokens[0]),)
        best = (1, sets.lookup.get(words))
        i = 1
        while words in sets.prefixes:
            if i + 1 >= len(tokens):
                if not self._final:
                    return None
                break
            if tokens[i] != " " or not _is_word(tokens[i + 1]):
                break
            words += (_normal(tokens[i + 1]),)
            i += 2
            if words in sets.lookup:
                best = (i, sets.lookup[words])
        if best[1] is not None and best[0] + 1 >= len(tokens) and not self._final:
            return None  # the two tokens after a member decide whether it is a site
        return best

    def _eligible(self, words: list[str], found: tuple[int, int]) -> bool:
        tokens, end = self._tokens, len(words)
        after = tokens[end] if end < len(tokens) else ""
        then = tokens[end + 1] if end + 1 < len(tokens) else ""
        return is_site(
            self._sets.sets[found[0]],
            words[::2],
            self._previous,
            after,
            then,
            then,
            self._sentence_start,
            self._last_word,
            self._context,
            self._prompt,
        )

    def _site(self, words: list[str], found: tuple[int, int], text: str) -> str:
        set_index, member = found
        site = Site(set_index, member, self._context[1])
        if self._choose is None:
            self.sites.append(site)
            return text
        chosen = self._choose(site)
        self.sites.append(Site(set_index, chosen, site.context))
        if chosen == member:
            return text
        self.changed += 1
        return _styled(" ".join(self._sets.sets[set_index].members[chosen]), text, self._curly)

    def _after(self, token: str) -> None:
        """Update what has been read with one emitted token."""
        if "'" in token or "’" in token:
            self._curly = last_apostrophe(token, self._curly)
        if not self._started and not token.isspace():
            self._started = True
            self._data = token in ("{", "[")
        if token[0].isspace():  # whitespace tokens are whitespace only
            if "\n" in token:
                if self._closing:
                    self._fence, self._closing = "", False
                self._head_width = indent_width(token[token.rindex("\n") + 1 :])
            elif self._head_width is not None:
                self._head_width += indent_width(token)
            self._space(token)
        elif self._line_pending:
            self._begin_line(token)
        if _is_word(token):
            if not self._fence and not self._inline and not self._skipped_line and not self._html:
                self._sentence_start = False
            self._last_word = token.lower()
            self._context = [self._context[1], _normal(token)]
        elif token[0] in "`~":
            if not self._html:  # HTML's code holds backticks as text
                self._fence, self._fence_length, self._fence_indent, self._inline, self._closing = fences_after(
                    token, self._fence, self._fence_length, self._fence_indent, self._inline, self._skipped_line,
                    self._head_width,
                )  # fmt: skip
        elif not self._fence and not self._inline and not self._skipped_line and not self._html:
            if token == '"':
                self._quote = not self._quote
            elif token in ("“", "”"):
                self._quote = token == "“"
            elif token in _SENTENCE_ENDS or "\n" in token:
                self._sentence_start = True
        if not token[0].isspace():
            if token != ">":
                self._head_width = None
            elif self._head_width is not None:
                self._head_width += QUOTE_COLUMNS
            self._closing = self._closing and token[0] in "`~"  # a closing run's own (fences_after said)
        self._previous = token
        if self._tag or token == "<":  # else nothing changes: most tokens, whose call this saves
            self._read_tag(token)

    def _read_tag(self, token: str) -> None:
        """Follow HTML's code elements: "<pre" or "<code" opens one (outside Markdown's code), "</pre" or
        "</code" closes it. After the token's own reading, as the whole path reads a tag's name before it."""
        tag, self._tag = self._tag, ("<" if token == "<" else "</" if token == "/" and self._tag == "<" else "")
        if tag and token.lower() in CODE_TAGS and not self._fence and not self._inline:
            self._html = tag == "<"

    def _space(self, run: str) -> None:
        """Follow the lines through a run of whitespace (a run may come in several tokens)."""
        newlines = run.count("\n")
        if newlines:
            self._blank_before = newlines > 1 or self._line_pending
            if self._blank_before:  # a paragraph's end: no code span goes on past it
                self._inline = 0
            self._line_pending, self._skipped_line, self._indent = True, False, 0
            run = run[run.rindex("\n") + 1 :]
        elif not self._line_pending:
            return
        self._indent += indent_width(run)

    def _begin_line(self, first: str) -> None:
        """The line's first token (not whitespace) has come: a fenced block's lines are its own, not skipped."""
        self._line_pending = False
        if self._fence:
            self._in_code_block = False
            return
        self._skipped_line, self._in_code_block = skipped_line(
            self._indent, first[0], self._blank_before, self._in_code_block
        )


def is_site(
    word_set,
    words: list[str],
    previous: str,
    after: str,
    then: str,
    next_word: str,
    sentence_start: bool,
    last_word: str,
    context: list[str],
    prompt: frozenset,
) -> bool:
    """The rules for a member found in the text (its `words`, as written): `previous` is what comes just
    before it, `after` and `then` the two tokens (or characters) just after it, `next_word` the word that
    `then` begins; the rest is what has been read. Both readings, streamed and whole, ask this."""
    if previous and not (previous.isspace() or previous in _OPENERS):
        return False
    if word_set.comma:
        if not (after == "," and then[:1].isspace()):
            return False
    elif after == " " and then[:1].isalpha():
        following = next_word.lower()
        if next_word in _CODE_WORDS or (word_set.negative and following in word_set.not_before):
            return False
        if word_set.contraction and not word_set.negative and following in word_set.not_before:
            return False
        if word_set.has_s and participle(following):
            return False
    elif word_set.contraction or after not in (",", ";") or not then[:1].isspace():
        return False
    first = words[0]
    if (word_set.lower and any(word[0].isupper() for word in words)) or (word_set.start and not sentence_start):
        return False
    if len(words) == 1:  # most members: the checks below for one word, without a generator each
        if len(first) > 1 and first.isupper():
            return False
    else:
        for i, word in enumerate(words):
            if (len(word) > 1 and word.isupper()) or (i and word[0].isupper()):
                return False
    # a capital is a name's, but at the start of a sentence; there, one followed by another is a title's or a
    # name's too ("Large Language Models")
    if (first[0].isupper() and _normal(first) not in ("i", "i'm", "i'll")) and (
        not sentence_start or (then[:1].isupper() and next_word != "I" and not next_word.startswith("I'"))
    ):
        return False
    if last_word in _NEGATORS or last_word.endswith(("n't", "n’t")):
        return False
    if word_set.article_inside and (
        last_word in _DETERMINERS or (last_word.endswith(_POSSESSIVE) and _normal(last_word) not in word_set.s_members)
    ):
        return False
    if last_word in word_set.joins:
        return False
    if word_set.articled and last_word in ("a", "an"):  # the article is sent already: it cannot follow
        return False
    return (context[0], context[1], f"§{word_set.index}") not in prompt


def _incomplete_tail(tokens: list[str]) -> int:
    """How many trailing tokens the next piece of text could still change (a word or space run may go on;
    a word with an apostrophe or hyphen may continue as one word)."""
    if not tokens:
        return 0
    last = tokens[-1]
    if last[0] in "'’-" and len(tokens) > 1 and _is_word(tokens[-2]):
        return 2
    return 1 if _is_word(last) or last.isspace() or last[0] in "`~" else 0


def _styled(replacement: str, original: str, curly: bool) -> str:
    """The replacement in the original's style: its first capital, a capital I, and its apostrophes, or where
    it has none, the text's (`curly`: the last apostrophe before it was ’): a straight one among curly ones
    would show which words the mark wrote."""
    words = replacement.split(" ")
    words = [w.capitalize() if w in ("i", "i'm", "i'll") else w for w in words]
    text = " ".join(words)
    if original[0].isupper():
        text = text[0].upper() + text[1:]
    if "’" in original or (curly and "'" not in original):
        text = text.replace("'", "’")
    return text


def last_apostrophe(text: str, curly: bool) -> bool:
    """Whether the last apostrophe read is curly, after reading `text` (`curly`: before it)."""
    straight, bent = text.rfind("'"), text.rfind("’")
    return curly if straight == bent else bent > straight
