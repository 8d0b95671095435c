"""JSON on the request path: orjson, and the standard library wherever orjson would change the data.

Every request, every answer and every streamed event is decoded, and many are encoded again. With orjson a
decode takes about 60% of the json module's time, a decode and encode about a quarter (results/jsonio.md,
the check below included). orjson reads the same documents to the same values, except:

- integers beyond 64 bits, which orjson reads as floats: a document holding a run of 19 digits goes to the
  json module;
- documents orjson refuses and the json module reads: escaped lone surrogates ("\\ud800"), NaN and
  Infinity (which JSON does not allow), numbers too large for a float (1e400), a byte-order mark, UTF-16,
  nesting deeper than 1024.

A client's request is read with `loads`, which refuses NaN, Infinity and overflowing numbers (as orjson and
the model APIs refuse them) and reads the rest as the json module does. An upstream's answer is read with
`read`, which accepts whatever the json module accepts and returns the function that writes the value
back: `dumps` when orjson read it, the json module when it did not (so that NaN stays NaN).

`dumps` writes compact UTF-8 (`json.dumps(value, ensure_ascii=False, separators=(",", ":"))` gives the same
values, though floats may be spelt differently: 1e-7 for 1e-07). It is for values `loads` or `read` gave
and values the gateway builds: orjson writes a NaN or an infinity as null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import orjson

# a run of 19 digits, found as "0" * 19 in the document with every digit mapped to "0" and every other byte
# to a space: bytes.translate and a substring search, measured 4 to 8 times faster than a regular expression
_DIGITS_AS_ZEROS = bytes(b"0"[0] if b"0"[0] <= byte <= b"9"[0] else b" "[0] for byte in range(256))
_LONG_NUMBER = b"0" * 19


def _refuse(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        _refuse(text)
    return number


_STRICT = json.JSONDecoder(parse_constant=_refuse, parse_float=_finite)


def orjson_reads(document: bytes | str) -> tuple[bool, Any]:
    """(True, the value) where orjson reads the document as the json module would; (False, None) if not."""
    raw = document.encode("utf-8", "surrogatepass") if isinstance(document, str) else document
    if _LONG_NUMBER in raw.translate(_DIGITS_AS_ZEROS):
        return False, None
    try:
        return True, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, None


def loads(document: bytes | str) -> Any:
    """A client's document. Raises ValueError where it is not JSON (json.JSONDecodeError with the json
    module's message and position; UnicodeDecodeError for bytes that are not UTF-8), holds NaN, Infinity
    or a number too large for a float, or is nested too deeply."""
    done, value = orjson_reads(document)
    if done:
        return value
    try:
        return _STRICT.decode(document if isinstance(document, str) else document.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read(document: bytes | str) -> tuple[Any, Callable[[Any], bytes]]:
    """An upstream's document, read as the json module reads it, and the function that writes it back.
    Raises ValueError where the json module cannot read it (nesting too deep included)."""
    done, value = orjson_reads(document)
    if done:
        return value, dumps
    try:
        return json.loads(document), _stdlib_dumps
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of `value`; ValueError where it is nested too deeply to write."""
    try:
        return orjson.dumps(value)
    except TypeError:  # what orjson does not write (an integer beyond 64 bits, a lone surrogate, deep nesting)
        return _stdlib_dumps(value)


def _stdlib_dumps(value: Any) -> bytes:
    """The json module's compact UTF-8, lone surrogates kept escaped. Raises ValueError for nesting deeper
    than it writes (about 1,000 levels: orjson reads up to 1,024)."""
    try:
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:
            return json.dumps(value, separators=(",", ":")).encode()
    except RecursionError:
        raise ValueError("JSON nested too deeply to write") from None
