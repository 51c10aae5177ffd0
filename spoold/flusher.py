"""One destination's sender: lease rows, batch, sign, send, ack or back off.

Rows reach the flusher two ways. Fresh commits are handed over in memory by the committer while
the flusher is caught up (the hot path never re-reads SQLite); otherwise it reads rows above its
cursor from the spool. Either way it holds at most LEASE_BYTES of lines; the backlog stays on disk.

Lines become entries lazily, a few batches ahead of the sender. When the service rejects some
entries of a batch, only those go back into the retry queue, each with its own exponential
backoff (full jitter). When a request fails as a whole (5xx, throttling, timeout, a fatal error
such as a missing stream), the whole destination backs off and every entry of the batch is
retried. A row is deleted from the spool only when every one of its lines has been accepted.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import httpx
import structlog
import trio

from spoold.aggregation import ShardMap
from spoold.batching import Chunk, Encoder, Entry, backoff, take_batch
from spoold.committer import Committer
from spoold.config import Destination, SpoolConfig
from spoold.errors import FatalSendError, RetryableSendError, SendError, SpoolCorrupt, SpoolError
from spoold.protocol import KINESIS_PREFIX, Api, is_throttle, reply_document
from spoold.sender import InlineSender, Sender, post
from spoold.signing import CredentialSource, sign
from spoold.spool import Row, Spool, Worker

logger = structlog.get_logger()

# Bytes of lines one destination holds in memory (leased rows, in flight, waiting to retry).
LEASE_BYTES = 12 * 1024 * 1024
# Entries encoded ahead of the sender, in batches (records and bytes), a step at a time.
ENCODE_AHEAD_BATCHES = 2
ENCODE_STEP = 256
# How often a release (spool full) checks whether the requests in flight have ended.
RELEASE_POLL = 0.01
# How often the shard map is refreshed (resharding), and retried after a failure.
SHARD_MAP_REFRESH = 60.0
SHARD_MAP_RETRY = 10.0
# Whole-request errors that one bad record can cause: the batch is bisected to find it.
BISECT_CODES = frozenset({"ValidationException", "InvalidArgumentException", "SerializationException"})
# Per-record errors that no retry can fix: the record goes to the dead-letter table.
PERMANENT_RECORD_CODES = frozenset({"ValidationException", "InvalidArgumentException"})
# Partition keys remembered for ordered mode's SequenceNumberForOrdering.
ORDERED_KEYS_MAX = 10_000


class Flusher:
    def __init__(
        self,
        dest: Destination,
        spool_cfg: SpoolConfig,
        spool: Spool,
        reader: Worker,
        committer: Committer,
        client: httpx.AsyncClient,
        credentials: CredentialSource,
        rng: random.Random | None = None,
        sender: Sender | None = None,
    ) -> None:
        self.dest = dest
        self.spool_cfg = spool_cfg
        self.spool = spool
        self.reader = reader
        self.committer = committer
        self.client = client
        self.sender: Sender = sender or InlineSender(client)
        self.credentials = credentials
        self.rng = rng or random.Random()
        self.api = Api.for_destination(dest.kind, dest.stream, dest.stream_arn)
        self.url = dest.endpoint_url + "/"
        self.encoder = Encoder(
            dest.kind,
            delimiter=dest.delimiter,
            pack_lines=dest.pack_lines,
            max_record_bytes=dest.max_record_bytes,
            partition_key_field=dest.partition_key_field,
            explicit_hash_key=dest.explicit_hash_key,
            aggregation=dest.aggregation,
            rng=self.rng,
        )
        self.log = logger.bind(dest=dest.name)
        # Rows
        self.cursor = 0  # highest row id leased (or known gone)
        self.highest_offered = 0
        self.caught_up = False
        self.leased: dict[int, Chunk] = {}
        self.leased_bytes = 0
        self._to_encode: deque[tuple[Chunk, Iterator[Entry]]] = deque()
        # Entries
        self.fresh: deque[Entry] = deque()
        self._fresh_bytes = 0
        self._due: deque[Entry] = deque()
        self._retry: list[tuple[float, int, Entry]] = []
        self._seq = itertools.count()
        self.in_flight = 0
        # Ordered mode sends one record at a time, so each key's records keep their order.
        self._slots = trio.Semaphore(1 if dest.ordered else dest.max_in_flight)
        self.blocked_until = 0.0
        self._whole_attempt = 0
        self._wake = trio.Event()
        self._fresh_since: float | None = None
        self.draining = False
        self._holding = False
        self._epoch = 0  # bumped by release(): reads begun before it are stale
        self._ordered_seq: dict[str, str] = {}
        self._next_error_log = 0.0
        # Figures for status and metrics
        self.lines_sent = 0
        self.records_sent = 0
        self.requests = 0
        self.retried_records = 0
        self.dead_letters = 0
        self.failures: Counter[str] = Counter()
        self.last_error = ""
        self.last_error_at = 0.0
        self.last_success_at = 0.0

    # -- rows in --------------------------------------------------------------------------
    def offer(self, row_id: int, lines: list[bytes], nbytes: int, created: float) -> None:
        """A row was just committed; take it from memory if we are caught up and have room."""
        self.highest_offered = max(self.highest_offered, row_id)
        if self.caught_up and row_id > self.cursor and self.leased_bytes < LEASE_BYTES:
            self._lease(Chunk(row_id, created, lines, nbytes))
        else:
            self.caught_up = False
        self._wake.set()

    def _lease(self, chunk: Chunk) -> None:
        self.cursor = max(self.cursor, chunk.id)
        if chunk.created < time.time() - self.spool_cfg.max_age:
            self.committer.count_expired(self.dest.name, len(chunk.lines))
            self.committer.delete(chunk.id, self.dest.name, len(chunk.lines), chunk.nbytes)
            return
        self.leased[chunk.id] = chunk
        self.leased_bytes += chunk.nbytes
        self._to_encode.append((chunk, self.encoder.entries(chunk)))

    async def _read_rows(self) -> None:
        room = LEASE_BYTES - self.leased_bytes
        epoch = self._epoch
        # Rows offered so far were committed before this read starts, so the read sees them.
        offered = self.highest_offered
        rows: list[Row] = await self.reader.run(self.spool.read, self.dest.name, self.cursor, room)
        if epoch != self._epoch:
            return  # a release() gave every row back meanwhile: this read is stale
        for row in rows:
            if row.id > self.cursor:
                self._lease(Chunk(row.id, row.created, row.lines, row.nbytes))
        if not rows:
            # Nothing above the cursor: rows offered earlier were dropped or expired since.
            self.cursor = max(self.cursor, offered)
            self.caught_up = self.cursor >= self.highest_offered

    def _encode_ahead(self) -> None:
        # A few batches ahead, counted in records and in bytes (aggregates are big records).
        target = self.dest.max_records_per_request * ENCODE_AHEAD_BATCHES
        byte_target = self.dest.max_request_bytes * ENCODE_AHEAD_BATCHES
        while len(self.fresh) < target and self._fresh_bytes < byte_target and self._to_encode:
            _, entries = self._to_encode[0]
            step = min(target - len(self.fresh), ENCODE_STEP)
            got = list(itertools.islice(entries, step))
            self.fresh.extend(got)
            self._fresh_bytes += sum(e.size for e in got)
            if len(got) < step:
                self._to_encode.popleft()
        since = self.encoder.open_since
        if since is not None and not self._to_encode and len(self.fresh) < target and (
            self.draining or time.monotonic() - since >= self.dest.linger
        ):
            for entry in self.encoder.flush():  # an aggregate that waited linger for more lines
                self.fresh.append(entry)
                self._fresh_bytes += entry.size
        if self.fresh and self._fresh_since is None:
            self._fresh_since = trio.current_time()

    async def release(self) -> bool:
        """Give every leased row back to the spool (when_full = "drop_oldest" needs to drop the
        oldest rows, which are the leased ones). Only while nothing is in flight; the rows are
        read again from disk later, so lines partly sent may be sent twice (at-least-once)."""
        if not self.leased:
            return False
        self._holding = True  # start no request meanwhile
        try:
            with trio.move_on_after(self.dest.request_timeout + 1.0):
                while self.in_flight:  # noqa: ASYNC110 (bounded, and only when the spool is full)
                    await trio.sleep(RELEASE_POLL)
            if self.in_flight:
                return False
            await self._release_all()
        finally:
            self._holding = False
            self._wake.set()
        return True

    async def _release_all(self) -> None:
        self._epoch += 1
        self.leased.clear()
        self.leased_bytes = 0
        self._to_encode.clear()
        self.fresh.clear()
        self._fresh_bytes = 0
        self._fresh_since = None
        self._due.clear()
        self._retry.clear()
        self.encoder.discard_open()
        self.cursor = 0
        self.caught_up = False
        await self.reader.run(self.spool.forget_reads, self.dest.name)
        self.log.info("leased_rows_released", reason="spool full")

    def drain(self) -> None:
        """Shutdown: send whatever is waiting now, without lingering."""
        self.draining = True
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Nothing leased, nothing on disk that we know of, nothing in flight."""
        return self.caught_up and not self.leased and self.in_flight == 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            d = self.dest
            if d.aggregation == "kpl" and d.partition_key_field and d.explicit_hash_key is None:
                nursery.start_soon(self._shard_map_loop)
            task_status.started()
            while True:
                await self._slots.acquire()
                try:
                    batch = await self._next_batch()
                except BaseException:
                    self._slots.release()
                    raise
                self.in_flight += 1
                nursery.start_soon(self._send, batch)

    async def _next_batch(self) -> list[Entry]:
        d = self.dest
        while True:
            if self._wake.is_set():
                self._wake = trio.Event()
            now = trio.current_time()
            if self._holding:
                await self._wake.wait()
                continue
            if now < self.blocked_until:
                # Backing off: no reads either, so that rows wait on disk, where a full spool
                # can drop them, rather than in memory.
                with trio.move_on_at(self.blocked_until):
                    await trio.sleep_forever()
                continue
            if not self.caught_up and self.leased_bytes < LEASE_BYTES:
                try:
                    await self._read_rows()
                except SpoolCorrupt:
                    raise  # exit non-zero: the restart recovers the file, rather than a daemon that forwards nothing
                except SpoolError as exc:
                    self._note_error("SpoolReadError", str(exc), fatal=True)
                    await trio.sleep(1.0)
                    continue
            self._collect_due(now)
            self._encode_ahead()
            waiting = len(self._due) + len(self.fresh)
            if waiting:
                full = (waiting >= d.max_records_per_request or self._to_encode
                        or self._fresh_bytes >= d.max_request_bytes)
                lingered = self._fresh_since is None or now - self._fresh_since >= d.linger
                if full or lingered or self.draining or self._due:
                    if d.ordered:
                        if self._due:
                            batch = [self._due.popleft()]
                        else:
                            batch = [self.fresh.popleft()]
                            self._fresh_bytes -= batch[0].size
                    else:
                        due = len(self._due)
                        batch, _ = take_batch((self._due, self.fresh), d.max_records_per_request,
                                              d.max_request_bytes)
                        self._fresh_bytes -= sum(e.size for e in batch[due - len(self._due):])
                    if not self.fresh:
                        self._fresh_since = None
                    return batch
            deadline = float("inf")
            if self._retry:
                deadline = self._retry[0][0]
            if self.fresh and self._fresh_since is not None:
                deadline = min(deadline, self._fresh_since + d.linger)
            since = self.encoder.open_since
            if since is not None:
                deadline = min(deadline, now + max(0.0, since + d.linger - time.monotonic()))
            if not self.caught_up and self.leased_bytes < LEASE_BYTES:
                deadline = now  # more rows to read
            with trio.move_on_at(deadline):
                await self._wake.wait()

    def _collect_due(self, now: float) -> None:
        cutoff = time.time() - self.spool_cfg.max_age
        if self._due and self._due[0].created < cutoff:  # retried as a whole batch for too long
            kept = [e for e in self._due if not self._expire(e, cutoff)]
            self._due = deque(kept)
        while self._retry and self._retry[0][0] <= now:
            entry = heapq.heappop(self._retry)[2]
            if not self._expire(entry, cutoff):
                self._due.append(entry)

    def _expire(self, entry: Entry, cutoff: float) -> bool:
        if entry.created >= cutoff:
            return False
        self.committer.count_expired(self.dest.name, entry.nlines)
        self._ack(entry, sent=False)
        return True

    # -- sending --------------------------------------------------------------------------
    async def _send(self, batch: list[Entry]) -> None:
        try:
            if self.dest.ordered:
                await self._send_ordered(batch[0])
            else:
                await self._send_batch(batch)
        finally:
            self.in_flight -= 1
            self._slots.release()
            self._wake.set()

    async def _signed(self, body: bytes, target: str | None = None) -> dict[str, str]:
        try:
            with trio.fail_after(self.dest.request_timeout):
                creds = await self.credentials.get()
        except trio.TooSlowError:
            raise RetryableSendError("getting AWS credentials timed out", code="NoCredentials") from None
        headers = self.api.headers()
        if target:
            headers["X-Amz-Target"] = target
        self.requests += 1
        return sign(creds, url=self.url, body=body, headers=headers,
                    region=self.dest.region, service=self.dest.signing_service)

    async def _post(self, body: bytes, target: str | None = None) -> httpx.Response:
        """A request on the daemon's own client (ordered mode, shard maps)."""
        signed = await self._signed(body, target)
        return await post(self.client, self.url, signed, body, self.dest.request_timeout)

    async def _send_batch(self, batch: list[Entry]) -> None:
        refused: list[tuple[Entry, str]] = []
        ok = await self._attempt(batch, refused)
        if not refused:
            return
        if ok or self.records_sent:
            # Other records of this destination went through: these ones are refused for good.
            await self._dead_letter(refused)
        else:
            # Nothing passes: the request, not a record, is wrong (a stream name, say).
            entries = [e for e, _ in refused]
            self._whole_failure(entries, FatalSendError(refused[0][1], code="ValidationException"))

    async def _attempt(self, batch: list[Entry], refused: list[tuple[Entry, str]]) -> bool:
        """Send one batch; True if any of it was accepted. A validation error of the whole request
        is bisected to find the records at fault, which are collected in ``refused``."""
        try:
            body = self.api.body(batch, self.encoder.hex_keys)
            signed = await self._signed(body)
            outcomes = await self.sender.put(self.url, signed, body, self.dest.request_timeout,
                                             self.api.firehose, len(batch))
        except FatalSendError as exc:
            if exc.code not in BISECT_CODES:
                self._whole_failure(batch, exc)
                return False
            self.failures[exc.code] += 1
            if len(batch) == 1:
                refused.append((batch[0], str(exc)))
                return False
            half = len(batch) // 2
            first = await self._attempt(batch[:half], refused)
            second = await self._attempt(batch[half:], refused)
            return first or second
        except SendError as exc:
            self._whole_failure(batch, exc)
            return False
        self._whole_attempt = 0
        self.last_success_at = time.time()
        now = trio.current_time()
        d = self.dest
        failed = 0
        if not any(outcomes):  # the common case, kept tight: every entry accepted
            self._ack_all(batch)
            return True
        for entry, code in zip(batch, outcomes):
            if code is None:
                self._ack(entry)
                continue
            self.failures[code] += 1
            if code in PERMANENT_RECORD_CODES:
                refused.append((entry, code))
                continue
            failed += 1
            cap = d.retry_cap_throttle if is_throttle(code) else d.retry_cap
            self._schedule(entry, now + backoff(entry.attempts, d.retry_base, cap, self.rng))
            entry.attempts += 1
        if failed:
            self.retried_records += failed
            self.log.debug("records_retried", failed=failed, batch=len(batch))
        return failed + len(refused) < len(batch)

    async def _dead_letter(self, refused: list[tuple[Entry, str]]) -> None:
        items = [(e.created, error, line) for e, error in refused for line in e.lines]
        try:
            await self.committer.worker.run(self.spool.add_dead_letters, self.dest.name, items)
        except SpoolError as exc:
            self._whole_failure([e for e, _ in refused], RetryableSendError(str(exc), code="SpoolWriteError"))
            return
        for entry, error in refused:
            self.dead_letters += entry.nlines
            self.log.error("dead_lettered", lines=entry.nlines, size=len(entry.data), error=error[:200],
                           hint="spoold dead-letters list|replay|purge")
            self._ack(entry, sent=False)

    async def _send_ordered(self, entry: Entry) -> None:
        key = entry.key
        body = self.api.single_body(entry, self._ordered_seq.get(key))
        try:
            response = await self._post(body, target="Kinesis_20131202.PutRecord")
            seq = self.api.parse_single(response.status_code, response.content)
        except SendError as exc:
            if isinstance(exc, FatalSendError) and exc.code in BISECT_CODES and self.records_sent:
                # Other records went through: this one is refused for good. Keeping it first in
                # line would block the destination forever.
                self.failures[exc.code] += 1
                await self._dead_letter([(entry, str(exc))])
                return
            self._whole_failure([entry], exc)
            return
        self._whole_attempt = 0
        self.last_success_at = time.time()
        self._ordered_seq.pop(key, None)
        self._ordered_seq[key] = seq
        if len(self._ordered_seq) > ORDERED_KEYS_MAX:
            self._ordered_seq.pop(next(iter(self._ordered_seq)))
        self._ack(entry)

    def _whole_failure(self, batch: list[Entry], exc: SendError) -> None:
        d = self.dest
        fatal = isinstance(exc, FatalSendError)
        cap = d.retry_cap if fatal or not is_throttle(exc.code) else d.retry_cap_throttle
        delay = backoff(self._whole_attempt, d.retry_base, cap, self.rng)
        self._whole_attempt += 1
        self.blocked_until = max(self.blocked_until, trio.current_time() + delay)
        self.failures[exc.code or "Error"] += 1
        for entry in batch:
            entry.attempts += 1
        # Retried first, in their original order, once the destination's backoff is over.
        self._due.extendleft(reversed(batch))
        self._note_error(exc.code, str(exc), fatal=fatal, retry_in=round(delay, 3), records=len(batch))

    def _note_error(self, code: str, message: str, *, fatal: bool, **fields: Any) -> None:
        self.last_error = message
        self.last_error_at = time.time()
        now = trio.current_time()
        if now >= self._next_error_log:
            # At most one line per backoff period (and per second), however many requests fail.
            self._next_error_log = now + max(1.0, self.blocked_until - now)
            level = self.log.error if fatal else self.log.warning
            level("send_failed", code=code, error=message, **fields)

    def _schedule(self, entry: Entry, due: float) -> None:
        heapq.heappush(self._retry, (due, next(self._seq), entry))

    def _ack_all(self, batch: list[Entry]) -> None:
        done: list[Chunk] = []
        nlines = 0
        for entry in batch:
            nlines += entry.nlines
            for chunk, n in entry.refs:
                chunk.remaining -= n
                if chunk.remaining == 0:
                    done.append(chunk)
        self.committer.accepted(batch)  # lines of rows not finished: a restart skips them
        self.lines_sent += nlines
        self.records_sent += len(batch)
        for chunk in done:
            if self.leased.pop(chunk.id, None) is not None:
                self.leased_bytes -= chunk.nbytes
                self.committer.delete(chunk.id, self.dest.name, len(chunk.lines), chunk.nbytes)

    def _ack(self, entry: Entry, sent: bool = True) -> None:
        if sent:
            self.lines_sent += entry.nlines
            self.records_sent += 1
        for chunk, n in entry.refs:
            chunk.remaining -= n
            if chunk.remaining == 0 and self.leased.pop(chunk.id, None) is not None:
                self.leased_bytes -= chunk.nbytes
                self.committer.delete(chunk.id, self.dest.name, len(chunk.lines), chunk.nbytes)
        self.committer.accepted_one(entry)

    # -- the shard map, for aggregating keyed lines ----------------------------------------
    async def _shard_map_loop(self) -> None:
        while True:
            try:
                self.encoder.shard_map = await self._fetch_shard_map()
                self.log.debug("shard_map_refreshed", shards=len(self.encoder.shard_map))
                delay = SHARD_MAP_REFRESH
            except (SendError, ValueError) as exc:
                self.log.warning("shard_map_failed", error=str(exc),
                                 hint="keyed lines are aggregated per key until it works")
                delay = SHARD_MAP_RETRY
            await trio.sleep(delay)

    async def _fetch_shard_map(self) -> ShardMap:
        # Yandex Data Streams has no ListShards: DescribeStream pages there.
        stream = {self.api.stream_field: self.api.stream}
        pages: list[dict[str, Any]] = []
        if self.dest.kind == "yds":
            body: dict[str, Any] = dict(stream)
            while True:
                page = await self._call("DescribeStream", body)
                pages.append(page)
                desc = page.get("StreamDescription") or {}
                shards = desc.get("Shards") or []
                if not desc.get("HasMoreShards") or not shards:
                    return ShardMap.from_describe_stream(pages)
                body = {**stream, "ExclusiveStartShardId": shards[-1]["ShardId"]}
        body = dict(stream)
        while True:
            page = await self._call("ListShards", body)
            pages.append(page)
            token = page.get("NextToken")
            if not token:
                return ShardMap.from_list_shards(pages)
            body = {"NextToken": token}

    async def _call(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._post(json.dumps(body).encode(), target=KINESIS_PREFIX + operation)
        return reply_document(response.status_code, response.content)

    # -- figures --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "lines_sent": self.lines_sent,
            "records_sent": self.records_sent,
            "requests": self.requests,
            "retried_records": self.retried_records,
            "dead_lettered": self.dead_letters,
            "failures": dict(self.failures),
            "in_flight": self.in_flight,
            "leased_bytes": self.leased_bytes,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at or None,
            "last_success_at": self.last_success_at or None,
            "backing_off": max(0.0, self.blocked_until - trio.current_time()),
        }
