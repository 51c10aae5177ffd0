"""Pure line framing: bytes in, complete lines out. No I/O.

A line is every byte up to a "\\n", kept exactly. Empty lines are skipped. A line longer than
``max_line_bytes`` is never split or truncated: its bytes are discarded as they arrive (so a
client cannot make us buffer more than the limit) and it is reported once, with its size.
"""

from __future__ import annotations


class LineBuffer:
    """Incremental splitter for one connection.

    ``feed(data)`` returns the complete lines found so far; ``oversized`` lists the sizes of
    lines rejected since the last call to ``take_oversized()``; ``close()`` returns the last
    unterminated line at EOF (if any and if it fits).
    """

    __slots__ = ("max_line_bytes", "_partial", "_skipping", "_oversized", "_discarding", "_discarded")

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._partial = bytearray()
        self._skipping = -1  # bytes of an oversized line seen so far, or -1 when not skipping
        self._oversized: list[int] = []
        self._discarding = False  # the line being skipped was given up by discard_partial()
        self._discarded: list[int] = []

    def feed(self, data: bytes) -> list[bytes]:
        limit = self.max_line_bytes
        start = 0
        lines: list[bytes] = []
        if self._skipping >= 0:
            nl = data.find(b"\n")
            if nl < 0:
                self._skipping += len(data)
                return lines
            self._skipped(self._skipping + nl)
            start = nl + 1
        elif self._partial:
            nl = data.find(b"\n")
            if nl < 0:
                if len(self._partial) + len(data) > limit:
                    self._skipping = len(self._partial) + len(data)
                    self._partial.clear()
                else:
                    self._partial += data
                return lines
            self._partial += data[:nl]
            self._emit(bytes(self._partial), lines)
            self._partial.clear()
            start = nl + 1
        end = data.rfind(b"\n")
        if end >= start:
            found = data[start:end].split(b"\n")
            # The common case in C loops: no empty and no oversized line among them (none can be
            # oversized when all of them together are not).
            if b"" not in found and (end - start <= limit or max(map(len, found)) <= limit):
                if lines:
                    lines += found
                else:
                    lines = found
            else:
                for line in found:
                    self._emit(line, lines)
            start = end + 1
        rest = len(data) - start
        if rest:
            if rest > limit:
                self._skipping = rest
            else:
                self._partial += data[start:]
        return lines

    def _emit(self, line: bytes, out: list[bytes]) -> None:
        n = len(line)
        if n > self.max_line_bytes:
            self._oversized.append(n)
        elif n:
            out.append(line)

    def close(self) -> list[bytes]:
        """End of input: the last unterminated line counts."""
        lines: list[bytes] = []
        if self._skipping >= 0:
            self._skipped(self._skipping)
        elif self._partial:
            self._emit(bytes(self._partial), lines)
            self._partial.clear()
        return lines

    def _skipped(self, size: int) -> None:
        (self._discarded if self._discarding else self._oversized).append(size)
        self._skipping = -1
        self._discarding = False

    def discard_partial(self) -> int:
        """Give up the incomplete line held so far (memory is short): the rest of it is skipped,
        and its size is reported by take_discarded() once it ends. Returns the bytes freed."""
        held = len(self._partial)
        if held:
            self._skipping = held
            self._discarding = True
            self._partial = bytearray()
        return held

    def abandon(self) -> int:
        """The input stops before its end (the daemon closes the connection): a line being
        skipped is reported as usual, and the unfinished line is dropped. Returns the dropped
        line's size so far (0 when there was none)."""
        if self._skipping >= 0:
            self._skipped(self._skipping)
            return 0
        held = len(self._partial)
        self._partial = bytearray()
        return held

    def take_discarded(self) -> list[int]:
        sizes, self._discarded = self._discarded, []
        return sizes

    def take_oversized(self) -> list[int]:
        sizes, self._oversized = self._oversized, []
        return sizes

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete line."""
        return len(self._partial)


def split_datagram(data: bytes, max_line_bytes: int) -> tuple[list[bytes], list[int]]:
    """One datagram's lines: a trailing newline is stripped, embedded newlines split it, empty
    lines are skipped. Returns the lines that fit and the sizes of those longer than the limit."""
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return [], []
    if len(data) <= max_line_bytes and b"\n" not in data:
        return [data], []
    lines: list[bytes] = []
    oversized: list[int] = []
    for line in data.split(b"\n"):
        if len(line) > max_line_bytes:
            oversized.append(len(line))
        elif line:
            lines.append(line)
    return lines, oversized
