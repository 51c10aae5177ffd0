"""framing.LineBuffer: table-driven cases, each fed whole, split at every position and byte by byte,
plus a hypothesis property over arbitrary lines and feed boundaries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.framing import LineBuffer, split_datagram


def run(max_line: int, chunks: list[bytes]) -> tuple[list[bytes], list[int]]:
    """Feed ``chunks``, then close; return every line and every oversized size, in order.

    Checks on the way that the buffer never holds more than the limit.
    """
    buf = LineBuffer(max_line)
    lines: list[bytes] = []
    for chunk in chunks:
        lines += buf.feed(chunk)
        assert buf.buffered <= max_line
    lines += buf.close()
    assert buf.buffered == 0
    return lines, buf.take_oversized()


def splits(data: bytes) -> list[tuple[str, list[bytes]]]:
    """The same stream as one feed, as two feeds cut at every position, and byte by byte."""
    out: list[tuple[str, list[bytes]]] = [("whole", [data])]
    out += [(f"cut@{i}", [data[:i], data[i:]]) for i in range(len(data) + 1)]
    out.append(("bytewise", [data[i:i + 1] for i in range(len(data))]))
    return out


ALL_BUT_NL = bytes(b for b in range(256) if b != 0x0A)

# (id, max_line_bytes, stream, expected lines, expected oversized sizes)
CASES = [
    ("empty input", 4, b"", [], []),
    ("only newlines", 4, b"\n\n\n", [], []),
    ("two lines", 4, b"ab\ncd\n", [b"ab", b"cd"], []),
    ("cr kept", 4, b"ab\r\ncd\r\n", [b"ab\r", b"cd\r"], []),
    ("lone cr is not a separator", 8, b"a\rb\n", [b"a\rb"], []),
    ("empty lines skipped", 4, b"\n\nab\n\n\ncd\n\n", [b"ab", b"cd"], []),
    ("unterminated last line", 4, b"ab\ncd", [b"ab", b"cd"], []),
    ("unterminated only line", 4, b"abc", [b"abc"], []),
    ("exactly max", 4, b"abcd\n", [b"abcd"], []),
    ("exactly max unterminated", 4, b"abcd", [b"abcd"], []),
    ("max plus one", 4, b"abcde\n", [], [5]),
    ("max plus one unterminated", 4, b"abcde", [], [5]),
    ("lines after oversized arrive", 4, b"abcdefghij\nxy\n", [b"xy"], [10]),
    ("oversized between lines", 4, b"ab\nabcdef\ncd\n", [b"ab", b"cd"], [6]),
    ("two oversized in a row", 4, b"abcdef\nabcdefghi\nz", [b"z"], [6, 9]),
    ("oversized then empty lines", 4, b"abcdefg\n\n\nq\n", [b"q"], [7]),
    ("limit one", 1, b"a\nbb\nc", [b"a", b"c"], [2]),
    ("every byte but newline", 255, ALL_BUT_NL + b"\n", [ALL_BUT_NL], []),
    ("every byte but newline, over", 254, ALL_BUT_NL + b"\nok", [b"ok"], [255]),
    ("nul and high bytes", 8, b"\x00\xff\x80\n\x00\n", [b"\x00\xff\x80", b"\x00"], []),
]


@pytest.mark.parametrize(("max_line", "stream", "want_lines", "want_oversized"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_line_buffer_cases(max_line: int, stream: bytes, want_lines: list[bytes], want_oversized: list[int]) -> None:
    for how, chunks in splits(stream):
        assert run(max_line, chunks) == (want_lines, want_oversized), how


def test_oversized_reported_once_when_its_newline_arrives() -> None:
    buf = LineBuffer(4)
    for b in b"abcdefg":  # dribbles in: nothing to report until the line ends
        assert buf.feed(bytes([b])) == []
        assert buf.take_oversized() == []
        assert buf.buffered <= 4
    assert buf.feed(b"\nok\n") == [b"ok"]
    assert buf.take_oversized() == [7]
    assert buf.take_oversized() == []
    assert buf.close() == []
    assert buf.take_oversized() == []


def test_oversized_unterminated_reported_at_close_once() -> None:
    buf = LineBuffer(4)
    assert buf.feed(b"ok\nabcdefgh") == [b"ok"]
    assert buf.take_oversized() == []
    assert buf.close() == []
    assert buf.take_oversized() == [8]
    assert buf.take_oversized() == []


def test_lines_are_bytes_not_views() -> None:
    buf = LineBuffer(16)
    data = bytearray(b"abc\ndef")
    lines = buf.feed(bytes(data))
    data[:] = b"xxxxxxx"
    lines += buf.close()
    assert lines == [b"abc", b"def"]
    assert all(type(line) is bytes for line in lines)


@settings(max_examples=300, deadline=None)
@given(
    max_line=st.integers(min_value=1, max_value=8),
    lines=st.lists(st.binary(max_size=14).map(lambda b: b.replace(b"\n", b"x")), max_size=12),
    trailing_newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_any_lines_any_chunking(max_line: int, lines: list[bytes], trailing_newline: bool, cuts: list[int]) -> None:
    stream = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    got_lines, got_oversized = run(max_line, chunks)
    assert got_lines == [line for line in lines if 0 < len(line) <= max_line]
    assert got_oversized == [len(line) for line in lines if len(line) > max_line]


@pytest.mark.parametrize(("data", "want_lines", "want_oversized"), [
    (b"", [], []),
    (b"\n", [], []),
    (b"abcd", [b"abcd"], []),
    (b"abcd\n", [b"abcd"], []),  # the longest line with its newline
    (b"abcde", [], [5]),
    (b"abcde\n", [], [5]),
    (b"ab\ncd\n", [b"ab", b"cd"], []),
    (b"ab\n\ncdefgh\nz", [b"ab", b"z"], [6]),
    (b"ab\r\n", [b"ab\r"], []),
])
def test_split_datagram(data: bytes, want_lines: list[bytes], want_oversized: list[int]) -> None:
    assert split_datagram(data, 4) == (want_lines, want_oversized)


def test_abandon_drops_the_unfinished_line_and_reports_a_skipped_one() -> None:
    buf = LineBuffer(4)
    assert buf.feed(b"ok\nabc") == [b"ok"]
    assert buf.abandon() == 3 and buf.buffered == 0 and buf.close() == []
    buf = LineBuffer(4)
    assert buf.feed(b"abcdefg") == []
    assert buf.abandon() == 0 and buf.take_oversized() == [7]
    buf = LineBuffer(4)
    assert buf.feed(b"abc") == [] and buf.discard_partial() == 3
    assert buf.abandon() == 0 and buf.take_discarded() == [3] and buf.take_oversized() == []
