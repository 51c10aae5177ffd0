"""One destination's sender: the trio loop around its state machine (spoold.machine.Outbox), which
decides. This does the I/O it asks for (read rows, sign and post batches, fetch the shard map, delete rows,
write dead letters) and feeds results back with the time. Fresh commits come from the committer (offer)."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import httpx
import structlog
import trio

from spoold.aggregation import ShardMap, next_shard_page, shard_map_request
from spoold.committer import Committer
from spoold.config import Destination, SpoolConfig
from spoold.errors import FatalSendError, RetryableSendError, SendError, SpoolCorrupt, SpoolError
from spoold.machine import Effects, Outbox, Read, Send
from spoold.protocol import KINESIS_PREFIX, Api, reply_document
from spoold.sender import InlineSender, Sender, post
from spoold.signing import CredentialSource, sign
from spoold.spool import Row, Spool, Worker
from spoold.transport import Reply

logger = structlog.get_logger()

# How often a release (spool full) checks whether the requests in flight have ended.
RELEASE_POLL = 0.01
# How often the shard map is refreshed, and retried after a failure or a reply that shows it stale.
SHARD_MAP_REFRESH, SHARD_MAP_RETRY = 60.0, 10.0


class Flusher:
    def __init__(self, dest: Destination, spool_cfg: SpoolConfig, spool: Spool, reader: Worker,
                 committer: Committer, client: httpx.AsyncClient, credentials: CredentialSource,
                 rng: random.Random | None = None, sender: Sender | None = None) -> None:
        self.dest, self.spool, self.reader, self.committer = dest, spool, reader, committer
        self.client, self.credentials = client, credentials
        self.sender: Sender = sender or InlineSender(client)
        self.api, self.url = Api.for_destination(dest.kind, dest.stream, dest.stream_arn), dest.endpoint_url + "/"
        self.machine = Outbox.for_destination(dest, spool_cfg.max_age, trio.current_time(), rng)
        self.log, self._wake = logger.bind(dest=dest.name), trio.Event()
        self.requests = 0  # signed, including shard map calls
        self._map_failed, self._stale = False, trio.Event()  # the map's last fetch; a reply saw it stale

    def offer(self, row_id: int, lines: list[bytes], nbytes: int, created: float) -> None:
        """A row was just committed; take it from memory if we are caught up and have room."""
        self.machine.offer(row_id, lines, nbytes, created, trio.current_time(), time.time())
        self._wake.set()  # the loop applies its effects (an expired row's delete)

    async def release(self) -> bool:
        """Give every leased row back to the spool (when_full = "drop_oldest" drops the oldest rows,
        the leased ones) once no request or dead letter is under way; read again later, lines
        partly sent may be sent twice (at-least-once)."""
        m = self.machine
        if not m.leased:
            return False
        m.holding = True  # start no request meanwhile
        try:
            with trio.move_on_after(self.dest.limits.request_timeout + 1.0):
                while m.busy:  # noqa: ASYNC110 (bounded, and only when the spool is full)
                    await trio.sleep(RELEASE_POLL)
            if not m.release():
                return False
            await self.reader.run(self.spool.forget_reads, self.dest.name)
            self.log.info("leased_rows_released", reason="spool full")
        finally:
            m.holding = False
            self._wake.set()
        return True

    def drain(self) -> None:
        """Shutdown: send whatever is waiting now, without lingering."""
        self.machine.drain()
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            if self.dest.kind != "firehose" and not self.dest.records.ordered:  # before the first batch: per shard
                nursery.start_soon(self._shard_map_loop, await self._refresh_shard_map())
            while True:
                self._wake = trio.Event()  # a wake before this is seen by next()
                decision = self.machine.next(trio.current_time(), time.time())
                self._apply(self.machine.take_effects())
                if isinstance(decision, Send):
                    nursery.start_soon(self._send, decision)
                elif isinstance(decision, Read):
                    await self._read(decision)
                else:
                    with trio.move_on_at(decision.until):
                        await self._wake.wait()

    async def _read(self, read: Read) -> None:
        m = self.machine
        try:
            rows: list[Row] = await self.reader.run(self.spool.read, self.dest.name, read.cursor, read.room)
        except SpoolCorrupt:
            raise  # exit non-zero: the restart recovers the file, rather than a daemon that forwards nothing
        except SpoolError as exc:
            m.note_error("SpoolReadError", str(exc), trio.current_time(), time.time(), fatal=True)
            await trio.sleep(1.0)
            return
        m.rows_read(read, [(r.id, r.created, r.lines, r.nbytes) for r in rows], trio.current_time(), time.time())

    def _apply(self, effects: Effects) -> None:
        if effects.accepted:  # lines of rows not finished: a restart skips them
            self.committer.accepted(effects.accepted)
        if effects.expired:
            self.committer.count_expired(self.dest.name, effects.expired)
        for chunk in effects.deleted:
            self.committer.delete(chunk.id, self.dest.name, len(chunk.lines), chunk.nbytes)
        for level, event, fields in effects.logs:
            getattr(self.log, level)(event, **fields)
        if effects.stale_map and not self._stale.is_set():  # resharded: _shard_map_loop refreshes
            self.log.info("shard_map_stale", predicted=effects.stale_map[0], reply=effects.stale_map[1])
            self._stale.set()

    async def _send(self, send: Send) -> None:
        m = self.machine
        try:
            if send.ordered:
                body = self.api.single_body(send.batch[0], send.sequence)
                response = await self._post(body, target=KINESIS_PREFIX + "PutRecord")
                m.on_single(send, self.api.parse_single(response.status_code, response.content),
                            trio.current_time(), time.time())
            else:
                body = self.api.body(send.items, self.machine.encoder.hex_keys)
                signed = await self._signed(body)
                outcomes = await self.sender.put(self.url, signed, body, self.dest.limits.request_timeout,
                                                 self.api.firehose, send.records)
                m.on_reply(send, outcomes, trio.current_time(), time.time())
        except SendError as exc:
            m.on_error(send, exc, trio.current_time(), time.time())
        self._apply(effects := m.take_effects())  # dead letters are the only effect a reply leaves for this task
        if effects.dead:
            await self._dead_letter(effects.dead)
        self._wake.set()

    async def _dead_letter(self, refused: list[Any]) -> None:
        m, items = self.machine, [(e.created, error, line) for e, error in refused for line in e.lines]
        try:
            await self.committer.worker.run(self.spool.add_dead_letters, self.dest.name, items)
        except SpoolError as exc:
            m.dead_letter_failed(refused, RetryableSendError(str(exc), code="SpoolWriteError"),
                                 trio.current_time(), time.time())
        else:
            m.dead_lettered(refused)
        self._apply(m.take_effects())

    async def _signed(self, body: bytes, target: str | None = None) -> dict[str, str]:
        try:
            with trio.fail_after(self.dest.limits.request_timeout):
                creds = await self.credentials.get()
        except trio.TooSlowError:
            raise RetryableSendError("getting AWS credentials timed out", code="NoCredentials") from None
        headers = {**self.api.headers(), **({"X-Amz-Target": target} if target else {})}
        self.requests += 1
        return sign(creds, url=self.url, body=body, headers=headers,
                    region=self.dest.region, service=self.dest.signing_service)

    async def _post(self, body: bytes, target: str | None = None) -> Reply:
        """A request on the daemon's own client (ordered mode, shard maps)."""
        signed = await self._signed(body, target)
        return await post(self.client, self.url, signed, body, self.dest.limits.request_timeout)

    async def _shard_map_loop(self, delay: float, gap: float = SHARD_MAP_RETRY) -> None:
        while True:  # every ``delay``, and on a stale sign (a reply) at most once per ``gap``
            with trio.move_on_at((fetched := trio.current_time()) + delay):
                await self._stale.wait()
                await trio.sleep_until(fetched + gap)
            old, delay = self.machine.shard_map, await self._refresh_shard_map()
            # Signs the new map does not confirm (an endpoint routing otherwise): logged once, the periodic pace.
            gap = SHARD_MAP_REFRESH if self._stale.is_set() and self.machine.shard_map is old else SHARD_MAP_RETRY
            self._stale = self._stale if gap == SHARD_MAP_REFRESH else trio.Event()  # else signs of the old map

    async def _refresh_shard_map(self) -> float:
        """Fetch the shard map into the machine (a failure keeps the last one); seconds until the next."""
        operation, body = shard_map_request(self.dest.kind, self.api.stream_field, self.api.stream)
        pages: list[dict[str, Any]] = []
        try:
            with trio.fail_after(self.dest.limits.request_timeout * 2):
                while body is not None:
                    response = await self._post(json.dumps(body).encode(), target=KINESIS_PREFIX + operation)
                    pages.append(reply_document(response.status_code, response.content))
                    body = next_shard_page(operation, self.api.stream_field, self.api.stream, pages[-1])
            self.machine.set_shard_map(ShardMap.from_pages(operation, pages), trio.current_time())
        except (SendError, ValueError, KeyError, trio.TooSlowError) as exc:
            if not self._map_failed:
                self.log.warning("shard_map_unavailable", error=str(exc) or repr(exc),
                                 hint="paced per destination until ListShards (DescribeStream on YDS) works")
            self._map_failed = True  # refused (no permission): asking often will not help
            return SHARD_MAP_REFRESH if isinstance(exc, FatalSendError) else SHARD_MAP_RETRY
        self._map_failed = False
        self._wake.set()
        return SHARD_MAP_REFRESH

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, **self.machine.figures(trio.current_time())}
