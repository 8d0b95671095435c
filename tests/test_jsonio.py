"""gateway.jsonio reads every document to the value the json module reads, and writes back what it read."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import jsonio

texts = st.text() | st.text(st.characters(categories=["Cs", "Ll", "Zs", "Cc"]))  # the second: lone surrogates
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda children: st.lists(children) | st.dictionaries(texts, children),
    max_leaves=20,
)


def identical(a, b) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 nor True; -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or a != a and b != b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(identical, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    return a == b


@given(values)
def test_it_reads_what_the_json_module_reads_and_writes_it_back(value):
    for written in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        documents = [written]
        with contextlib.suppress(UnicodeEncodeError):  # a raw lone surrogate: text, never bytes on the wire
            documents.append(written.encode())
        for document in documents:
            reference = json.loads(document)  # not always `value`: an escaped surrogate pair reads as one character
            assert identical(jsonio.loads(document), reference)
            read, write = jsonio.read(document)
            assert identical(read, reference)
            # written back, it reads as what the json module's own writing reads as (two raw surrogates that
            # form a pair are escaped, and then read as one character, by either)
            assert identical(json.loads(write(read)), json.loads(json.dumps(reference)))
    assert identical(jsonio.loads(jsonio.dumps(value)), json.loads(json.dumps(value)))


@pytest.mark.parametrize(
    "document, value",
    [
        (b'{"seed": 123456789012345678901234567890}', 123456789012345678901234567890),  # orjson: a float
        (b'{"seed": -9223372036854775809}', -9223372036854775809),
        (b'{"seed": 18446744073709551615}', 18446744073709551615),
        (b'{"seed": "\\ud800"}', "\ud800"),  # orjson refuses a lone surrogate
        (b'{"seed": -0.0}', -0.0),
    ],
)
def test_what_orjson_would_change_is_read_by_the_json_module(document, value):
    (read,) = jsonio.loads(document).values()
    assert identical(read, value)
    assert identical(jsonio.loads(jsonio.dumps({"seed": read})), {"seed": value})


def test_a_lone_surrogate_is_written_escaped():
    assert jsonio.dumps({"a": "\ud800é"}) == b'{"a":"\\ud800\\u00e9"}'
    assert jsonio.dumps({"a": "é"}) == '{"a":"é"}'.encode()


@pytest.mark.parametrize(
    "document", [b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}', b"[1,", b"\xff", b"[" * 1100 + b"]" * 1100]
)
def test_a_client_document_that_is_not_json_or_holds_no_float_is_refused(document):
    with pytest.raises(ValueError):
        jsonio.loads(document)


@pytest.mark.parametrize(
    "document, written",
    [
        (b'{"logprob": -Infinity, "p": NaN}', b'{"logprob":-Infinity,"p":NaN}'),
        (b'{"big": 1e400}', b'{"big":Infinity}'),
        ('\ufeff{"a": "b"}'.encode(), b'{"a":"b"}'),  # a byte-order mark
        ('{"a": "é"}'.encode("utf-16"), '{"a":"é"}'.encode()),
    ],
)
def test_an_upstream_document_is_read_as_the_json_module_reads_it_and_written_back_the_same(document, written):
    value, write = jsonio.read(document)
    assert identical(value, json.loads(document))
    assert write(value) == written
