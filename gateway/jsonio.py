"""JSON on the request path: orjson, and the standard library wherever orjson would change the data.

Every request, every answer and every streamed event is decoded, and many are encoded again. With orjson a
decode takes half the time of the json module's, a decode and encode a quarter (benchmarks/results/jsonio.md,
the check below included). orjson reads the same documents to the same values, with three exceptions, each
sent to the json module instead:

- integers beyond 64 bits, which orjson would read as floats: a document holding a run of 19 digits;
- escaped lone surrogates ("\\ud800"), which JSON allows and orjson refuses: json reads them, and `dumps`
  writes them escaped again;
- NaN and Infinity, which JSON does not allow but the json module reads, and numbers too large for a
  float (1e400, which it reads as infinity): here they are refused, as orjson and the model APIs refuse
  them, so that no value is read that would be written back as null.

Writing is compact (no spaces) and UTF-8, as `json.dumps(..., ensure_ascii=False, separators=(",", ":"))`
writes it; integers beyond 64 bits and lone surrogates fall back to the json module.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

# a run of 19 digits, found as "0" * 19 in the document with every digit mapped to "0" and every other byte
# to a space: bytes.translate and a substring search, measured 4 to 8 times faster than a regular expression
_DIGITS_AS_ZEROS = bytes(b"0"[0] if b"0"[0] <= byte <= b"9"[0] else b" "[0] for byte in range(256))
_LONG_NUMBER = b"0" * 19
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _refuse(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        _refuse(text)
    return number


_DECODER = json.JSONDecoder(parse_constant=_refuse, parse_float=_finite)


def loads(document: bytes | str) -> Any:
    """The document's value. Raises ValueError (json.JSONDecodeError, with the json module's message and
    position, where the text is not JSON; UnicodeDecodeError for bytes that are not UTF-8)."""
    raw = document.encode("utf-8", "surrogatepass") if isinstance(document, str) else document
    if _LONG_NUMBER not in raw.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # a lone surrogate, a non-JSON constant, or not JSON: the json module says which
    text = document if isinstance(document, str) else document.decode("utf-8")
    return _DECODER.decode(text)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of `value`."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, or a string with a lone surrogate (kept escaped)
        try:
            return _ENCODER.encode(value).encode()
        except UnicodeEncodeError:
            return _ASCII_ENCODER.encode(value).encode()
