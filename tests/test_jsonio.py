"""gateway.jsonio reads every document to the value the json module reads, and writes back what it read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import jsonio

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(values)
def test_it_reads_what_the_json_module_reads_and_writes_it_back(value):
    for written in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert jsonio.loads(written) == value
        try:
            document = written.encode()
        except UnicodeEncodeError:  # a raw lone surrogate: text, never bytes on the wire
            continue
        assert jsonio.loads(document) == value
    assert jsonio.loads(jsonio.dumps(value)) == value


@pytest.mark.parametrize(
    "document, value",
    [
        (b'{"seed": 123456789012345678901234567890}', 123456789012345678901234567890),  # orjson: a float
        (b'{"seed": -9223372036854775809}', -9223372036854775809),
        (b'{"seed": 18446744073709551615}', 18446744073709551615),
        (b'{"seed": "\\ud800"}', "\ud800"),  # orjson refuses a lone surrogate
    ],
)
def test_what_orjson_would_change_is_read_by_the_json_module(document, value):
    (read,) = jsonio.loads(document).values()
    assert read == value and type(read) is type(value)
    assert jsonio.loads(jsonio.dumps({"seed": read})) == {"seed": value}


def test_a_lone_surrogate_is_written_escaped():
    assert jsonio.dumps({"a": "\ud800é"}) == b'{"a":"\\ud800\\u00e9"}'
    assert jsonio.dumps({"a": "é"}) == '{"a":"é"}'.encode()


@pytest.mark.parametrize("document", [b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}', b"[1,", b"\xff"])
def test_what_is_not_json_or_no_float_is_refused(document):
    with pytest.raises(ValueError):
        jsonio.loads(document)
