"""Pure batching: lines -> entries (what the service calls records) -> batches under the limits.

An *entry* is one record as the service sees it: one line for Kinesis, one line plus the
delimiter (or many packed lines) for Firehose. An entry remembers which spool chunks its lines
came from, so that when the service accepts it the flusher can count those lines as sent, and a
chunk leaves the spool only once every one of its lines was accepted.

A *run* is the columnar form of the hot case (Kinesis, one line per record, random keys): the
consecutive lines of one chunk, their keys and sizes in two buffers shared by every run of the
chunk, and no object per line. Queues and batches hold runs and entries alike (``records`` says how
many records an item is); whatever needs single records (a reply with failures, bisecting,
expiry, dead letters) first turns runs into entries with ``explode()``.
"""

from __future__ import annotations

import json
import random
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import accumulate, count, islice, repeat, starmap
from operator import add, attrgetter
from typing import Any

from spoold.aggregation import AggregateBuilder, ShardMap, hash_key

# Hex digits of a random partition key: 64 bits spread keys evenly over any number of shards.
RANDOM_KEY_HEX = 16
# A run's keys are one buffer: each key's hex digits, then a space.
KEY_STRIDE = RANDOM_KEY_HEX + 1
# Kinesis partition keys are at most 256 Unicode characters.
MAX_PARTITION_KEY = 256


# The bytes an entry or run counts against the service's limits (sum(map(entry_size, items)) runs in C).
entry_size = attrgetter("size")
# The records an entry (one) or a run (one per line) stands for.
record_count = attrgetter("records")


class Chunk:
    """One spool row in memory: its lines and how many of them are still unsent."""

    __slots__ = ("id", "created", "lines", "nbytes", "remaining")

    def __init__(self, id: int, created: float, lines: list[bytes], nbytes: int) -> None:
        self.id = id
        self.created = created
        self.lines = lines
        self.nbytes = nbytes
        self.remaining = len(lines)


class Entry:
    """One record to send: its exact Data, its partition key, and the lines it carries.

    ``at`` says which lines of its chunks those are (positions in ``Chunk.lines``), so that the
    spool can record lines accepted from a row that still has unsent ones: an int when they are
    contiguous (the first ref's lines from ``at`` on, every later ref's from 0: an aggregate that
    went on into the next row), or the list of positions when they are not (one ref only: keyed
    KPL aggregates group a row's lines by shard).
    """

    __slots__ = ("data", "key", "hash_key", "refs", "nlines", "attempts", "created", "_lines", "size", "at")
    records = 1  # one record, however many lines it carries

    def __init__(
        self,
        data: bytes,
        key: str,
        refs: list[tuple[Chunk, int]],
        nlines: int,
        created: float,
        hash_key: str | None = None,
        lines: list[bytes] | None = None,
        at: int | list[int] = 0,
    ) -> None:
        self.data = data
        self.at = at
        self.key = key
        self.hash_key = hash_key
        self.refs = refs
        self.nlines = nlines
        self.attempts = 0
        self.created = created
        self._lines = lines  # None when data is the line itself
        # Bytes the service counts against its limits: data plus partition key (UTF-8).
        self.size = len(data) + (len(key) if key.isascii() else len(key.encode()))

    @property
    def lines(self) -> list[bytes]:
        """The original lines this entry carries (for dead letters)."""
        return self._lines if self._lines is not None else [self.data]


class Run:
    """Lines ``start:stop`` of one chunk, one record each with a random key: many records, no
    object per line. ``keys`` (each key's hex digits and a space, KEY_STRIDE bytes a line) and
    ``cum`` (running sums of the records' counted sizes, from 0) are the whole chunk's, indexed
    like ``chunk.lines`` and shared by its runs."""

    __slots__ = ("chunk", "start", "stop", "keys", "cum", "created", "hash_key", "records", "size")

    def __init__(self, chunk: Chunk, start: int, stop: int, keys: bytes, cum: array[int],
                 hash_key: str | None = None) -> None:
        self.chunk = chunk
        self.start = start
        self.stop = stop
        self.keys = keys
        self.cum = cum
        self.created = chunk.created
        self.hash_key = hash_key
        self.records = stop - start
        self.size = cum[stop] - cum[start]

    @classmethod
    def of(cls, chunk: Chunk, keys: bytes, hash_key: str | None = None) -> Run:
        """The run of all of ``chunk``'s lines (``keys``: KEY_STRIDE bytes a line)."""
        cum = array("q", accumulate(map(add, map(len, chunk.lines), repeat(RANDOM_KEY_HEX)), initial=0))
        return cls(chunk, 0, len(chunk.lines), keys, cum, hash_key)

    def key_list(self) -> list[bytes]:
        return self.keys[self.start * KEY_STRIDE:self.stop * KEY_STRIDE - 1].split(b" ")

    def lines(self) -> list[bytes]:
        return self.chunk.lines[self.start:self.stop]

    def fit(self, max_records: int, max_bytes: int) -> int:
        """How many of the leading records fit in both limits."""
        start, cum = self.start, self.cum
        stop = min(self.stop, start + max_records)
        return max(bisect_right(cum, cum[start] + max_bytes, start, stop + 1) - 1 - start, 0)

    def split(self, n: int) -> tuple[Run, Run]:
        """The first ``n`` records, and the rest."""
        cut = self.start + n
        return (Run(self.chunk, self.start, cut, self.keys, self.cum, self.hash_key),
                Run(self.chunk, cut, self.stop, self.keys, self.cum, self.hash_key))

    def entries(self) -> list[Entry]:
        """One entry per record, as Encoder.entries() would have made them."""
        start, stop = self.start, self.stop
        return list(map(Entry, self.chunk.lines[start:stop], map(bytes.decode, self.key_list()),
                        repeat([(self.chunk, 1)]), repeat(1), repeat(self.created), repeat(self.hash_key),
                        repeat(None), range(start, stop)))


def first_size(item: Entry | Run) -> int:
    """The counted size of the first record of an entry (itself) or a run."""
    if type(item) is Run:
        return item.cum[item.start + 1] - item.cum[item.start]
    return item.size


def explode(items: Iterable[Entry | Run]) -> list[Entry]:
    """``items`` with every run turned into its entries, in order: for whatever needs single records."""
    out: list[Entry] = []
    for item in items:
        if type(item) is Run:
            out += item.entries()
        else:
            out.append(item)  # type: ignore[arg-type]
    return out



def partition_key_from_json(line: bytes, field: str) -> str | None:
    """The line's top-level JSON field as a partition key, or None to fall back to random."""
    if not line.startswith(b"{"):
        return None
    try:
        doc: Any = json.loads(line)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return None
    if not isinstance(doc, dict):
        return None
    value = doc.get(field)
    if value is None or isinstance(value, (dict, list)):
        return None
    key = value if isinstance(value, str) else json.dumps(value)
    if not key.isascii():  # at most 256 characters, and at most 256 UTF-8 bytes (the room kept for it)
        try:
            key = key.encode()[:MAX_PARTITION_KEY].decode("utf-8", "ignore")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") cannot be a key: random instead
            return None
    return key[:MAX_PARTITION_KEY] or None


class Encoder:
    """Turns spool chunks into entries for one destination's kind and options."""

    def __init__(
        self,
        kind: str,
        *,
        delimiter: bytes = b"",
        pack_lines: bool = False,
        max_record_bytes: int,
        partition_key_field: str | None = None,
        explicit_hash_key: str | None = None,
        aggregation: str = "none",
        rng: random.Random | None = None,
    ) -> None:
        self.kind = kind
        self.delimiter = delimiter
        self.pack_lines = pack_lines
        self.max_record_bytes = max_record_bytes
        self.partition_key_field = partition_key_field
        self.explicit_hash_key = explicit_hash_key
        self.aggregation = aggregation
        # Set by the flusher from ListShards/DescribeStream; None groups keyed lines by key.
        self.shard_map: ShardMap | None = None
        self._open: _OpenAggregate | None = None
        self._rng = rng or random.Random()

    @property
    def hex_keys(self) -> bool:
        """Every partition key this encoder makes is a random hex key (JSON-safe as it is)."""
        return not self.partition_key_field

    def random_key(self) -> str:
        return f"{self._rng.getrandbits(RANDOM_KEY_HEX * 4):0{RANDOM_KEY_HEX}x}"

    @property
    def columnar(self) -> bool:
        """Chunks become runs (items()), not one entry per line: Kinesis records of one line each
        with random keys."""
        return self.kind != "firehose" and self.aggregation != "kpl" and not self.partition_key_field

    def items(self, chunk: Chunk, now: float = 0.0) -> Iterator[Entry | Run]:
        """What entries() yields, but as one run per chunk when the encoder is columnar (made
        when first asked for, as entries are)."""
        if not self.columnar:
            yield from self.entries(chunk, now)
        elif chunk.lines:
            yield Run.of(chunk, (self._random_keys(len(chunk.lines)) + " ").encode(), self.explicit_hash_key)

    def _random_keys(self, n: int) -> str:
        # Drawn for a whole chunk at once and cut apart by hex()'s separator: no Python step per line.
        half = RANDOM_KEY_HEX // 2
        return self._rng.randbytes(half * n).hex(" ", half)

    def entries(self, chunk: Chunk, now: float = 0.0) -> Iterator[Entry]:
        """The entries for every line of ``chunk``, in order (``now``: the caller's clock, which
        dates an aggregate left open for more lines)."""
        created = chunk.created
        if self.kind == "firehose":
            delim = self.delimiter
            if self.pack_lines:
                yield from self._packed(chunk)
                return
            for i, line in enumerate(chunk.lines):
                if delim:
                    yield Entry(line + delim, "", [(chunk, 1)], 1, created, lines=[line], at=i)
                else:
                    yield Entry(line, "", [(chunk, 1)], 1, created, at=i)
            return
        if self.aggregation == "kpl":
            yield from self._aggregated(chunk, now)
            return
        field = self.partition_key_field
        ehk = self.explicit_hash_key
        keys = self._random_keys(len(chunk.lines)).split(" ")
        one = [(chunk, 1)]  # shared: refs are only read
        if not field:  # the hot path: map() calls Entry with no Python step of its own per line
            yield from map(Entry, chunk.lines, keys, repeat(one), repeat(1), repeat(created), repeat(ehk),
                           repeat(None), count())
            return
        for i, line in enumerate(chunk.lines):
            key = (field and partition_key_from_json(line, field)) or keys[i]
            yield Entry(line, key, one, 1, created, ehk, at=i)

    def _aggregated(self, chunk: Chunk, now: float) -> Iterator[Entry]:
        # KPL aggregation. Every sub-record of one aggregate must hash into the shard that
        # receives it, or KCL 2.x consumers silently drop it. Random keys: the lines of an
        # aggregate share its one key. A configured explicit_hash_key: all lines go to that one
        # shard. Keyed lines: one aggregate per shard (from the shard map), sent with the shard's
        # first hash key as ExplicitHashKey; with no shard map yet, one aggregate per key.
        field = self.partition_key_field
        limit = self.max_record_bytes
        if not field:
            yield from self._aggregated_unkeyed(chunk, now)
            return
        open_: dict[object, tuple[AggregateBuilder, list[bytes], list[int]]] = {}
        for i, line in enumerate(chunk.lines):
            key = field and partition_key_from_json(line, field)
            if not key:
                group: object = None
                outer_key, outer_ehk, sub_key = "", self.explicit_hash_key, None  # key drawn when needed
            elif self.explicit_hash_key is not None:
                group, outer_key, outer_ehk, sub_key = None, key, self.explicit_hash_key, key
            elif self.shard_map is not None:
                shard = self.shard_map.shard_for(hash_key(key))
                group, outer_key, outer_ehk, sub_key = shard.shard_id, key, str(shard.start), key
            else:
                group, outer_key, outer_ehk, sub_key = ("key", key), key, None, key
            pair = open_.get(group)
            if pair is not None and pair[0].try_add(line, sub_key):
                pair[1].append(line)
                pair[2].append(i)
                continue
            if pair is not None:
                yield self._aggregate_entry(chunk, *pair)
            outer_key = outer_key or self.random_key()
            builder = AggregateBuilder(limit, outer_key, outer_ehk)
            if builder.try_add(line, sub_key):
                open_[group] = (builder, [line], [i])
            else:
                # Too big to aggregate (the framing costs ~30 bytes): send it plain.
                open_.pop(group, None)
                yield Entry(line, outer_key, [(chunk, 1)], 1, chunk.created, outer_ehk, at=i)
        for builder, lines, at in open_.values():
            yield self._aggregate_entry(chunk, builder, lines, at)

    def _aggregated_unkeyed(self, chunk: Chunk, now: float) -> Iterator[Entry]:
        # Every line shares the aggregate's own random key (or the configured hash key). The
        # last aggregate stays open across rows, so aggregates fill up to the record limit
        # rather than to the size of one commit; flush() closes it (the flusher calls it
        # once it has waited linger for more lines).
        lines = chunk.lines
        i = 0
        while i < len(lines):
            agg = self._open
            if agg is None:
                builder = AggregateBuilder(self.max_record_bytes, self.random_key(), self.explicit_hash_key)
                agg = self._open = _OpenAggregate(builder, chunk.created, i, now)
            if not agg.refs:  # still empty (a line too big for it went plain): it starts here
                agg.at = i
            n = agg.builder.extend(lines, i)
            if n:
                agg.lines.extend(lines[i:i + n])
                agg.refs.append((chunk, n))
                i += n
            if i < len(lines):
                if len(agg.builder):
                    yield self._close_open()  # full
                else:  # too big to aggregate (the framing costs ~30 bytes): send it plain
                    yield Entry(lines[i], agg.builder.partition_key, [(chunk, 1)], 1, chunk.created,
                                self.explicit_hash_key, at=i)
                    i += 1

    @property
    def open_since(self) -> float | None:
        """When the open aggregate was started (the clock passed to entries()), or None."""
        return self._open.opened if self._open is not None and len(self._open.builder) else None

    def flush(self) -> list[Entry]:
        """Close the open aggregate, if it holds anything."""
        if self._open is None or not len(self._open.builder):
            return []
        return [self._close_open()]

    def discard_open(self) -> None:
        """Forget the open aggregate (its rows were given back to the spool)."""
        self._open = None

    def _close_open(self) -> Entry:
        agg = self._open
        assert agg is not None
        self._open = None
        b = agg.builder
        return Entry(b.build(), b.partition_key, agg.refs, len(agg.lines), agg.created, b.explicit_hash_key, agg.lines,
                     agg.at)

    @staticmethod
    def _aggregate_entry(chunk: Chunk, builder: AggregateBuilder, lines: list[bytes], at: list[int]) -> Entry:
        return Entry(builder.build(), builder.partition_key, [(chunk, len(lines))], len(lines), chunk.created,
                     builder.explicit_hash_key, lines, at)

    def _packed(self, chunk: Chunk) -> Iterator[Entry]:
        # Lines of one chunk are packed into records of at most max_record_bytes; a line is
        # never split, and each keeps its delimiter so the destination sees the same bytes.
        delim = self.delimiter
        limit = self.max_record_bytes
        parts: list[bytes] = []
        size = 0
        start = 0
        for i, line in enumerate(chunk.lines):
            n = len(line) + len(delim)
            if parts and size + n > limit:
                yield Entry(delim.join(parts) + delim, "", [(chunk, len(parts))], len(parts), chunk.created,
                            lines=parts, at=start)
                parts, size, start = [], 0, i
            parts.append(line)
            size += n
        if parts:
            yield Entry(delim.join(parts) + delim, "", [(chunk, len(parts))], len(parts), chunk.created,
                        lines=parts, at=start)


class _OpenAggregate:
    """An aggregate still filling, possibly from several rows."""

    __slots__ = ("builder", "lines", "refs", "created", "opened", "at")

    def __init__(self, builder: AggregateBuilder, created: float, at: int, opened: float) -> None:
        self.builder = builder
        self.at = at  # the first line's position in the first row; later rows' lines start at 0
        self.lines: list[bytes] = []
        self.refs: list[tuple[Chunk, int]] = []
        self.created = created
        self.opened = opened


def take_batch(
    sources: Iterable[deque[Any]], max_records: int, max_bytes: int
) -> tuple[list[Any], int]:
    """Pop entries and runs from the sources, in order, into one request under both limits.

    Returns the batch and its counted size. An entry that does not fit ends the batch and stays
    at the head of its source, so nothing is reordered within a source; a run is cut at the
    record that does not fit (its rest stays at the head). The batch's first record is taken
    whatever its size.
    """
    batch: list[Any] = []
    size = records = 0
    for source in sources:
        # The usual case first, in C loops: the next items all fit in both limits.
        n = min(len(source), max_records - records)
        head = list(islice(source, n))
        total = sum(map(entry_size, head))
        got = sum(map(record_count, head))
        if size + total <= max_bytes and records + got <= max_records:
            deque(starmap(source.popleft, repeat((), n)), maxlen=0)
            batch += head
            size += total
            records += got
        while source and records < max_records:
            item = source[0]
            n = item.size
            if records + item.records > max_records or (size + n > max_bytes and item.records > 1):
                k = item.fit(max_records - records, max_bytes - size) or (0 if batch else 1)
                if k:
                    taken, source[0] = item.split(k)
                    batch.append(taken)
                    size += taken.size
                return batch, size
            if batch and size + n > max_bytes:
                return batch, size
            source.popleft()
            batch.append(item)
            size += n
            records += item.records
        if records >= max_records:
            break
    return batch, size
