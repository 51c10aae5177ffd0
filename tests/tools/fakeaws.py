"""A loopback, fault-injecting Kinesis / Firehose endpoint (AWS JSON 1.1) for spoold's tests.

moto is a faithful store but never checks signatures, never throttles, never fails a record and
handles ~3,000 records/s; this endpoint does those things and is fast enough for benchmarks.
It speaks just enough HTTP/1.1 (keep-alive, pipelining, Content-Length bodies, Expect:
100-continue) on asyncio Protocols; a framework would cost more than the whole request handling.

In-process use (the server runs on its own thread with its own event loop)::

    with FakeAWS(access_key="AKIDSPOOLDTEST", secret_key="spoold-test-secret", shards=4) as srv:
        srv.faults.record_fail_rate = 0.3       # read per request, change any time
        ...                                     # point a client at srv.url
        srv.wait_for(lambda s: s.count_accepted >= 10, timeout=5)
        srv.records("my-stream")                # accepted records, in acceptance order

As a script (benchmarks, subprocess tests); stops on SIGTERM/SIGINT or when its parent dies::

    python tests/tools/fakeaws.py --port 0 --port-file PATH [--no-verify] [--no-store] ...
    curl http://127.0.0.1:PORT/_stats

Order in which a request meets the faults (each read when the request gets there):
hang, then latency (both before anything else: a request whose client hangs up meanwhile is
dropped unprocessed and logged with status 0), down (503, every call), signature and
expect_scope, unknown target; then for Put* only: scripted, fatal, JSON parsing
(SerializationException), stream name and known_streams (ResourceNotFoundException), record
validation (ValidationException), throttle_rate, http500_rate, record_fail_rate (batch calls).
ListShards / DescribeStream meet the same checks but never scripted, fatal or the rates; any
operation named in ``denied`` is refused with AccessDeniedException.
GET /_stats is exempt from every fault and is not counted as a request.

Beyond the per-record limits, a request's total of decoded data (+ partition keys) is capped at
KINESIS_MAX_REQUEST_BYTES (5 MiB) / FIREHOSE_MAX_REQUEST_BYTES (4 MiB): ValidationException.
stop() then start() binds the same port again, for "the endpoint went away and came back".

Several identities: ``keys`` maps access key ids to secrets (static keys). STS AssumeRole
(the query protocol: a form-encoded POST, an XML answer) issues temporary keys for the roles in
``roles`` (each with the external id its trust policy demands); requests signed with a temporary
key must carry its session token and are refused with ExpiredTokenException once it expires.
``sts_lifetime`` sets how long the issued credentials live (default: DurationSeconds, or 3600).
Every AssumeRole call is kept (``assume_role_calls()``) with what it asked for.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # `python tests/tools/fakeaws.py` puts tests/tools/ first on sys.path, where a helper named like
    # a stdlib module would shadow it. Put the repository root there instead, as
    # `-m tests.tools.fakeaws` would.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
        sys.path[0] = os.path.dirname(os.path.dirname(_HERE))

import argparse
import asyncio
import binascii
import bisect
import collections
import dataclasses
import hashlib
import hmac
import inspect
import random
import re
import signal
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

HOST = "127.0.0.1"  # never anything else: this must not be reachable from outside the machine
ACCOUNT_ID = "123456789012"  # account named in ARNs and error messages
DEFAULT_REGION = "us-east-1"  # region used in ARNs when a request carries no credential scope

MAX_RECORDS = 500  # records per PutRecords / PutRecordBatch, both services
KINESIS_MAX_RECORD_BYTES = 1024 * 1024  # data + partition key, default stream maximum
KINESIS_MAX_REQUEST_BYTES = (
    5 * 1024 * 1024
)  # sum of data + keys; the historical limit tools assume
FIREHOSE_MAX_RECORD_BYTES = 1_024_000  # "1,000 KiB" per record
FIREHOSE_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # "4 MB" per PutRecordBatch, counted on decoded data
MAX_PARTITION_KEY_CHARS = 256
HASH_SPACE = 2**128  # Kinesis hash keys are 0 .. 2**128-1
SEQUENCE_BASE = 49_590_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000
# The status of Firehose's whole-request throttle (ServiceUnavailableException). Real Firehose may
# send it with a 5xx; a 400 checks that the daemon goes by the error code, not the status.
FIREHOSE_THROTTLE_STATUS = 400

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; more is answered 431 and the socket closed
MAX_BODY_BYTES = 32 * 1024 * 1024  # larger than any valid request (10 MiB of data in base64)
MAX_PENDING_BYTES = (
    64 * 1024 * 1024
)  # unread pipelined input per connection before we stop reading
REQUEST_LOG_SIZE = 10_000  # RequestLog entries kept (and AssumeRole calls, and issued keys)
STS_DEFAULT_LIFETIME = 3600  # what STS grants without DurationSeconds
STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
STS_TARGET = "STS.AssumeRole"  # RequestLog.target of an AssumeRole call (STS has no X-Amz-Target)
JSON_TYPE = "application/x-amz-json-1.1"  # the Content-Type of every answer but STS's (XML)
HANG_POLL_SECONDS = 0.01  # how often a hung request looks at faults.hang
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0
WAIT_FOR_POLL_SECONDS = 0.01

_PUT_OPS = frozenset({"PutRecords", "PutRecord", "PutRecordBatch"})
_OPERATIONS: dict[str, tuple[str, str]] = {
    "Kinesis_20131202.PutRecords": ("kinesis", "PutRecords"),
    "Kinesis_20131202.PutRecord": ("kinesis", "PutRecord"),
    "Kinesis_20131202.ListShards": ("kinesis", "ListShards"),
    "Kinesis_20131202.DescribeStream": ("kinesis", "DescribeStream"),
    "Firehose_20150804.PutRecordBatch": ("firehose", "PutRecordBatch"),
    "Firehose_20150804.PutRecord": ("firehose", "PutRecord"),
}
_STREAM_ARN = re.compile(r"arn:aws[a-z-]*:kinesis:[^:]*:[^:]*:stream/(.+)")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,128}")
_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclasses.dataclass
class Faults:
    """What to break, read afresh by every request; assign any field at any time."""

    record_fail_rate: float = 0.0
    throttle_rate: float = 0.0
    http500_rate: float = 0.0
    down: bool = False
    latency: float = 0.0
    hang: bool = False
    scripted: collections.deque[tuple[int, bytes]] = dataclasses.field(
        default_factory=collections.deque
    )
    fatal: str | None = None
    # Operations refused with 400 AccessDeniedException (e.g. {"ListShards"}: no IAM permission).
    denied: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One accepted record. For Firehose, sequence_number holds the RecordId and the Kinesis-only
    fields are None."""

    stream: str
    partition_key: str | None
    explicit_hash_key: str | None
    data: bytes
    sequence_number: str
    shard_id: str | None
    ordering: str | None
    api: str = "kinesis"  # "kinesis" or "firehose"


@dataclasses.dataclass(frozen=True, slots=True)
class RequestLog:
    """One answered (or dropped: status 0) request. signature_ok is None when not checked."""

    target: str
    stream: str | None
    n_records: int
    status: int
    signature_ok: bool | None
    region: str | None
    service: str | None
    access_key: str | None
    n_failed: int = 0  # records answered with a per-record error
    error: str | None = None  # the __type answered, "scripted", or None


@dataclasses.dataclass
class Role:
    """A role AssumeRole may grant: its trust policy's sts:ExternalId condition (None: none) and
    the access keys it trusts (None: any key this endpoint knows)."""

    external_id: str | None = None
    trusted_keys: frozenset[str] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AssumeRoleCall:
    """One AssumeRole request as received; issued_key is None when it was refused."""

    access_key: str | None  # who signed the call
    role_arn: str | None
    external_id: str | None
    role_session_name: str | None
    duration_seconds: int | None
    at: float  # time.time() when answered
    status: int
    error: str | None = None
    issued_key: str | None = None
    expiration: float | None = None  # time.time() at which the issued key expires


@dataclasses.dataclass(frozen=True, slots=True)
class IssuedKey:
    """Temporary credentials handed out by AssumeRole."""

    access_key: str
    secret_key: str
    session_token: str
    role_arn: str
    role_session_name: str
    expiration: float  # time.time() at which the key stops working


def shard_ranges(shards: int) -> list[tuple[int, int]]:
    """Inclusive hash key ranges of ``shards`` shards evenly splitting 0 .. 2**128-1."""
    return [
        ((HASH_SPACE * i) // shards, (HASH_SPACE * (i + 1)) // shards - 1) for i in range(shards)
    ]


def shard_id(index: int) -> str:
    return f"shardId-{index:012d}"


class _ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str = "") -> None:
        super().__init__(type_, message)
        self.status = status
        self.type = type_
        self.message = message

    def body(self) -> bytes:
        doc = {"__type": self.type}
        if self.message:
            doc["message"] = self.message
        return orjson.dumps(doc)

    def xml_body(self, request_id: str) -> bytes:
        """The query protocol's error document (STS)."""
        kind = "Receiver" if self.status >= 500 else "Sender"
        return (
            f'<ErrorResponse xmlns="{STS_NAMESPACE}"><Error><Type>{kind}</Type>'
            f"<Code>{xml_escape(self.type)}</Code><Message>{xml_escape(self.message)}</Message>"
            f"</Error><RequestId>{request_id}</RequestId></ErrorResponse>"
        ).encode()


def _validation(message: str) -> _ApiError:
    return _ApiError(400, "ValidationException", "1 validation error detected: " + message)


def _check_total(total: int, limit: int) -> None:
    if total > limit:
        raise _validation(f"Records total {total} bytes, more than {limit}")


def _null(path: str) -> _ApiError:
    return _validation(
        f"Value null at '{path}' failed to satisfy constraint: Member must not be null"
    )


def _serialization(
    message: str = "Start of structure or map found where not expected.",
) -> _ApiError:
    return _ApiError(400, "SerializationException", message)


@dataclasses.dataclass(frozen=True, slots=True)
class _Auth:
    access_key: str
    date: str
    region: str
    service: str
    signed_headers: str
    signature: str


def _parse_authorization(value: str | None) -> _Auth | None:
    if not value:
        return None
    algorithm, _, rest = value.partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        return None
    parts: dict[str, str] = {}
    for item in rest.split(","):
        key, sep, val = item.strip().partition("=")
        if not sep:
            return None
        parts[key] = val
    credential = parts.get("Credential", "").split("/")
    signed, signature = parts.get("SignedHeaders"), parts.get("Signature")
    if len(credential) != 5 or credential[4] != "aws4_request" or not signed or not signature:
        return None
    return _Auth(credential[0], credential[1], credential[2], credential[3], signed, signature)


@dataclasses.dataclass(slots=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ","
    body: bytes = b""
    keep_alive: bool = True
    content_length: int = 0
    reply_type: str = JSON_TYPE  # Content-Type of the answer


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse_head(head: bytes) -> _Request:
    """Request line and headers (without the blank line) -> _Request; raises _HttpError."""
    lines = head.decode("latin-1").split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3:
        raise _HttpError(400, "bad request line")
    method, target, version = request_line
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _HttpError(505, "only HTTP/1.0 and HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise _HttpError(400, "bad header line")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            if name == "content-length" and headers[name] != value:
                raise _HttpError(400, "conflicting Content-Length")
            if name in ("content-length", "host"):
                continue
            headers[name] = headers[name] + "," + value
        else:
            headers[name] = value
    if "transfer-encoding" in headers:
        raise _HttpError(501, "only Content-Length bodies are supported")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise _HttpError(400, "bad Content-Length")
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    request = _Request(method, target, headers, keep_alive=keep_alive, content_length=int(length))
    if request.content_length > MAX_BODY_BYTES:
        raise _HttpError(413, "body too large")
    return request


def _http_response(
    status: int, body: bytes, request_id: str, close: bool = False, content_type: str = JSON_TYPE
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amzn-RequestId: {request_id}\r\n"
    )
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode("latin-1") + body


class _Connection(asyncio.Protocol):
    """One client connection: frames requests, answers them strictly in order."""

    def __init__(self, server: FakeAWS) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scanned = 0  # bytes of buffer already searched for the end of the head
        self.pending: _Request | None = None  # head parsed, body not complete yet
        self.busy = False  # a delayed request is outstanding: later ones wait their turn
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.reading_paused = False
        self.writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        if self.task is not None:
            self.task.cancel()

    def eof_received(self) -> bool:
        return False  # the client is done sending: close once answered (answers are synchronous)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()
        self._drain()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        self._drain()
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        stop = self.writing_paused or (self.busy and len(self.buffer) > MAX_PENDING_BYTES)
        if stop and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        elif not stop and self.reading_paused:
            self.transport.resume_reading()
            self.reading_paused = False

    def _drain(self) -> None:
        buffer = self.buffer
        while not self.busy and not self.closed and not self.writing_paused:
            request = self.pending
            if request is None:
                end = buffer.find(b"\r\n\r\n", max(0, self.scanned - 3))
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        self._fail(431, "request head too large")
                    self.scanned = len(buffer)
                    return
                if end > MAX_HEAD_BYTES:
                    self._fail(431, "request head too large")
                    return
                try:
                    request = _parse_head(bytes(buffer[:end]))
                except _HttpError as exc:
                    self._fail(exc.status, str(exc))
                    return
                del buffer[: end + 4]
                self.scanned = 0
                self.pending = request
                if (
                    request.headers.get("expect", "").lower() == "100-continue"
                    and len(buffer) < request.content_length
                ):
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = request.content_length
            if len(buffer) < length:
                return
            if len(buffer) == length:
                request.body = bytes(buffer)
                buffer.clear()
            else:
                request.body = bytes(buffer[:length])
                del buffer[:length]
            self.pending = None
            self._dispatch(request)

    def _dispatch(self, request: _Request) -> None:
        server = self.server
        if request.target == "/_stats" and request.method == "GET":
            self._answer(request, 200, orjson.dumps(server.stats()))
            return
        server._note_request()
        faults = server.faults
        if faults.hang or faults.latency > 0:
            self.busy = True
            self.task = asyncio.get_running_loop().create_task(self._delay(request))
            return
        status, body = server._handle(request)
        self._answer(request, status, body)

    async def _delay(self, request: _Request) -> None:
        try:
            while self.server.faults.hang:  # noqa: ASYNC110 (a test flips the flag from another thread)
                await asyncio.sleep(HANG_POLL_SECONDS)
            latency = self.server.faults.latency
            if latency > 0:
                await asyncio.sleep(latency)
        except asyncio.CancelledError:
            self.server._log_dropped(request)
            return  # the connection is gone (or the server is stopping): nothing to answer
        self.task = None
        self.busy = False
        if self.closed:
            self.server._log_dropped(request)
            return
        status, body = self.server._handle(request)
        self._answer(request, status, body)
        self._drain()
        self._update_reading()

    def _answer(self, request: _Request, status: int, body: bytes) -> None:
        close = not request.keep_alive
        self._write(
            _http_response(status, body, self.server._request_id(), close, request.reply_type)
        )
        if close:
            self._close()

    def _fail(self, status: int, message: str) -> None:
        body = orjson.dumps({"__type": "HttpError", "message": message})
        self._write(_http_response(status, body, self.server._request_id(), close=True))
        self._close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _close(self) -> None:
        self.closed = True
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()


@dataclasses.dataclass(slots=True)
class _Ctx:
    """What one request did, committed to the shared state in one locked step."""

    target: str
    stream: str | None = None
    n_records: int = 0
    n_failed: int = 0
    signature_ok: bool | None = None
    region: str | None = None
    service: str | None = None
    access_key: str | None = None
    error: str | None = None
    bad_signature: bool = False
    accepted: int = 0
    stored: list[Record] | None = None
    sts: bool = False  # answered in the query protocol (XML)


class FakeAWS:
    """The endpoint. Configure attributes freely; read state through the locked accessors."""

    def __init__(
        self,
        access_key: str = "AKIDSPOOLDTEST",
        secret_key: str = "spoold-test-secret",
        *,
        verify: bool = True,
        store: bool = True,
        seed: int = 1,
        shards: int = 1,
        port: int = 0,
        keys: dict[str, str] | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be >= 1")
        # Static keys: access key id -> secret. Assign more at any time.
        self.keys: dict[str, str] = {access_key: secret_key, **(keys or {})}
        # STS: the roles AssumeRole grants, and how long what it issues lives (None: as asked).
        self.roles: dict[str, Role] = {}
        self.sts_lifetime: float | None = None
        self.verify = verify
        self.store = store
        self.faults = Faults()
        self.known_streams: set[str] | None = None
        self.expect_scope: tuple[str, str] | None = None
        self.port = port
        self.shards = shards
        self._ranges = shard_ranges(shards)
        self._starts = [start for start, _ in self._ranges]
        self._shard_ids = [shard_id(i) for i in range(shards)]
        # Shards closed by reshard(): still listed (with an EndingSequenceNumber), never written.
        self._closed: list[dict[str, Any]] = []
        self._listing: list[dict[str, Any]] | None = None  # reshard(listed=False): the map listed still
        self._rng = random.Random(seed)
        self._created = time.time()
        # Only the loop thread touches these.
        self._next_sequence = 0
        self._next_record_id = 0
        self._next_request_id = 0
        self._fail_toggle = 0
        self._connections: set[_Connection] = set()
        # Shared with the test thread, under _lock.
        self._lock = threading.Lock()
        self._all: list[Record] = []
        self._by_stream: dict[str, list[Record]] = {}
        self._accepted_by_stream: dict[str, int] = {}
        self._log: collections.deque[RequestLog] = collections.deque(maxlen=REQUEST_LOG_SIZE)
        self._count_accepted = 0
        self._count_requests = 0
        self._bad_signatures = 0
        self._issued: dict[str, IssuedKey] = {}
        self._assume_calls: collections.deque[AssumeRoleCall] = collections.deque(
            maxlen=REQUEST_LOG_SIZE
        )
        # Thread plumbing.
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> FakeAWS:
        """Bind 127.0.0.1:port on a new thread; return once listening."""
        if self._thread is not None:
            raise RuntimeError("FakeAWS already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name=f"fakeaws-{id(self):x}", daemon=True
        )
        self._thread.start()
        if not ready.wait(START_TIMEOUT_SECONDS):
            raise RuntimeError("FakeAWS did not start listening in time")
        if failure:
            self._thread.join(STOP_TIMEOUT_SECONDS)
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection (hung requests included); idempotent."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass  # the loop already closed
        thread.join(STOP_TIMEOUT_SECONDS)
        if thread.is_alive():
            raise RuntimeError("FakeAWS thread did not stop")
        self._thread = None

    def __enter__(self) -> FakeAWS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:  # reported to start() if we never got to listen
            if not ready.is_set():
                failure.append(exc)
            else:
                raise
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await loop.create_server(
            lambda: _Connection(self), HOST, self.port, backlog=1024, reuse_address=True
        )
        self.port = server.sockets[0].getsockname()[1]
        self._loop = loop
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for connection in list(self._connections):
                if connection.transport is not None:
                    connection.transport.abort()
            tasks = [c.task for c in self._connections if c.task is not None]
            for task in tasks:
                task.cancel()
            await server.wait_closed()
            await asyncio.sleep(0)  # let connection_lost callbacks and cancellations run
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def reshard(self, shards: int, listed: bool = True) -> list[str]:
        """Reshard while running: every open shard closes (ListShards and DescribeStream still list
        it, with an EndingSequenceNumber, as Kinesis does for its retention period) and ``shards``
        new ones, numbered after the last, split the hash key space evenly. Requests answered after
        this returns use the new map. ``listed=False``: records go by the new map but ListShards
        and DescribeStream keep listing the current one (a listing that lags, or never shows it).
        Returns the new shard ids."""
        if shards < 1:
            raise ValueError("shards must be >= 1")
        done = threading.Event()

        def swap() -> None:  # on the loop thread: no request sees half of the new map
            first = len(self._closed) + self.shards
            ending = str(SEQUENCE_BASE + self._next_sequence)
            self._listing = None if listed else self._shard_docs()
            self._closed += [{**doc, "SequenceNumberRange": {**doc["SequenceNumberRange"],
                                                             "EndingSequenceNumber": ending}}
                             for doc in self._open_docs()]
            self.shards, self._ranges = shards, shard_ranges(shards)
            self._starts = [start for start, _ in self._ranges]
            self._shard_ids = [shard_id(first + i) for i in range(shards)]
            done.set()

        loop = self._loop
        if loop is None or self._thread is None:
            swap()
        else:
            loop.call_soon_threadsafe(swap)
            if not done.wait(START_TIMEOUT_SECONDS):
                raise RuntimeError("FakeAWS did not reshard in time")
        return list(self._shard_ids)

    # ---- state, read from any thread -----------------------------------------------------------

    def records(self, stream: str) -> list[Record]:
        with self._lock:
            return list(self._by_stream.get(stream, ()))

    def all_records(self) -> list[Record]:
        with self._lock:
            return list(self._all)

    @property
    def requests(self) -> list[RequestLog]:
        with self._lock:
            return list(self._log)

    @property
    def count_accepted(self) -> int:
        with self._lock:
            return self._count_accepted

    @property
    def count_requests(self) -> int:
        with self._lock:
            return self._count_requests

    @property
    def bad_signatures(self) -> int:
        with self._lock:
            return self._bad_signatures

    def assume_role_calls(self) -> list[AssumeRoleCall]:
        with self._lock:
            return list(self._assume_calls)

    def issued_keys(self) -> dict[str, IssuedKey]:
        """Temporary keys handed out by AssumeRole, by access key id."""
        with self._lock:
            return dict(self._issued)

    def stats(self) -> dict[str, Any]:
        """The document GET /_stats answers."""
        with self._lock:
            return {
                "requests": self._count_requests,
                "accepted": self._count_accepted,
                "bad_signatures": self._bad_signatures,
                "records_by_stream": dict(self._accepted_by_stream),
            }

    def wait_for(self, predicate: Callable[[FakeAWS], bool], timeout: float) -> None:
        """Poll predicate(self) until true; AssertionError naming it and the state on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(WAIT_FOR_POLL_SECONDS)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {_describe(predicate)}; "
            f"stats={self.stats()}; last requests={self.requests[-5:]}"
        )

    # ---- request handling, on the loop thread ---------------------------------------------

    def _note_request(self) -> None:
        with self._lock:
            self._count_requests += 1

    def _request_id(self) -> str:
        self._next_request_id += 1
        return str(uuid.UUID(int=self._next_request_id))

    def _log_dropped(self, request: _Request) -> None:
        ctx = _Ctx(target=request.headers.get("x-amz-target", ""))
        self._commit(ctx, 0)

    def _handle(self, request: _Request) -> tuple[int, bytes]:
        ctx = _Ctx(target=request.headers.get("x-amz-target", ""))
        try:
            status, body = self._handle_aws(request, ctx)
        except _ApiError as exc:
            status = exc.status
            body = exc.xml_body(self._request_id()) if ctx.sts else exc.body()
            ctx.error = exc.type
            ctx.accepted = 0
            ctx.stored = None
        except Exception as exc:
            # A bug here must not kill the connection silently, nor pass for an injected fault.
            traceback.print_exc()
            status, body = 500, _ApiError(500, "InternalFailure", f"fakeaws bug: {exc!r}").body()
            ctx.error = "fakeaws-bug"
            ctx.accepted = 0
            ctx.stored = None
        self._commit(ctx, status)
        return status, body

    def _commit(self, ctx: _Ctx, status: int) -> None:
        entry = RequestLog(
            ctx.target,
            ctx.stream,
            ctx.n_records,
            status,
            ctx.signature_ok,
            ctx.region,
            ctx.service,
            ctx.access_key,
            ctx.n_failed,
            ctx.error,
        )
        with self._lock:
            self._log.append(entry)
            if ctx.bad_signature:
                self._bad_signatures += 1
            if ctx.accepted and status == 200 and ctx.stream is not None:
                self._count_accepted += ctx.accepted
                by_stream = self._accepted_by_stream
                by_stream[ctx.stream] = by_stream.get(ctx.stream, 0) + ctx.accepted
                if ctx.stored:
                    self._all.extend(ctx.stored)
                    self._by_stream.setdefault(ctx.stream, []).extend(ctx.stored)

    def _handle_aws(self, request: _Request, ctx: _Ctx) -> tuple[int, bytes]:
        faults = self.faults
        if faults.down:
            raise _ApiError(503, "ServiceUnavailable", "fakeaws: service is down")
        auth = _parse_authorization(request.headers.get("authorization"))
        if auth is not None:
            ctx.region, ctx.service, ctx.access_key = auth.region, auth.service, auth.access_key
        if _is_sts(request, ctx.target):
            ctx.sts = True
            ctx.target = STS_TARGET
            request.reply_type = "text/xml"
            return self._assume_role(request, auth, ctx)
        operation = _OPERATIONS.get(ctx.target) if request.method == "POST" else None
        self._authenticate(request, auth, operation, ctx)
        if operation is None:
            raise _ApiError(400, "UnknownOperationException", f"unknown operation {ctx.target!r}")
        api, name = operation
        if name in faults.denied:
            _describe_payload(request.body, api, ctx)
            raise _ApiError(400, "AccessDeniedException", f"fakeaws: not authorized to perform {name}")
        if name in _PUT_OPS:
            if faults.scripted:
                try:
                    status, body = faults.scripted.popleft()
                except IndexError:
                    pass  # emptied by another thread meanwhile
                else:
                    ctx.error = "scripted"
                    _describe_payload(request.body, api, ctx)
                    return status, body
            if faults.fatal:
                _describe_payload(request.body, api, ctx)
                raise _ApiError(400, faults.fatal, f"fakeaws: injected {faults.fatal}")
        try:
            payload = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            raise _serialization("Unable to parse the request body as JSON") from None
        if not isinstance(payload, dict):
            raise _serialization()
        handler = getattr(self, "_op_" + api + "_" + name)
        result: tuple[int, bytes] = handler(payload, ctx)
        return result

    def _authenticate(
        self, request: _Request, auth: _Auth | None, operation: tuple[str, str] | None, ctx: _Ctx
    ) -> None:
        scope = self.expect_scope if not ctx.sts else None
        if scope is not None and (auth is None or (auth.region, auth.service) != tuple(scope)):
            ctx.signature_ok = False
            ctx.bad_signature = True
            got = "none" if auth is None else f"{auth.region}/{auth.service}"
            raise _ApiError(
                400,
                "InvalidSignatureException",
                f"Credential should be scoped to {scope[0]}/{scope[1]}, not {got}",
            )
        if not self.verify:
            return
        try:
            self._check_signature(request, auth, operation)
        except _ApiError:
            ctx.signature_ok = False
            ctx.bad_signature = True
            raise
        ctx.signature_ok = True

    def _check_signature(
        self, request: _Request, auth: _Auth | None, operation: tuple[str, str] | None
    ) -> None:
        def invalid(message: str) -> _ApiError:
            return _ApiError(400, "InvalidSignatureException", message)

        if auth is None:
            raise invalid("Missing or malformed Authorization header")
        unknown = _ApiError(
            400 if operation is None or operation[0] != "sts" else 403,
            "UnrecognizedClientException" if operation is None or operation[0] != "sts"
            else "InvalidClientTokenId",
            "The security token included in the request is invalid.",
        )
        token = request.headers.get("x-amz-security-token")
        with self._lock:
            issued = self._issued.get(auth.access_key)
        if issued is not None:
            if token is None or not hmac.compare_digest(token, issued.session_token):
                raise unknown
            if "x-amz-security-token" not in auth.signed_headers.split(";"):
                raise invalid("X-Amz-Security-Token must be signed")
            if time.time() >= issued.expiration:
                raise _ApiError(
                    400 if operation is None or operation[0] != "sts" else 403,
                    "ExpiredTokenException" if operation is None or operation[0] != "sts"
                    else "ExpiredToken",
                    "The security token included in the request is expired",
                )
            secret = issued.secret_key
        else:
            secret = self.keys.get(auth.access_key)
            if secret is None or token is not None:
                raise unknown
        if operation is not None and auth.service != operation[0]:
            raise invalid(f"Credential should be scoped to correct service: '{operation[0]}'.")
        amz_date = request.headers.get("x-amz-date", "")
        if not _AMZ_DATE.fullmatch(amz_date) or amz_date[:8] != auth.date:
            raise invalid("X-Amz-Date is missing or does not match the credential scope date")
        names = auth.signed_headers.split(";")
        if "host" not in names or "x-amz-date" not in names:
            raise invalid("host and x-amz-date must be signed")
        missing = [name for name in names if name not in request.headers]
        if missing:
            raise invalid(f"signed headers missing from the request: {missing}")
        claimed_hash = request.headers.get("x-amz-content-sha256")
        if claimed_hash is not None and claimed_hash != hashlib.sha256(request.body).hexdigest():
            raise invalid("X-Amz-Content-SHA256 does not match the body")
        signed = {name: request.headers[name] for name in names}
        aws_request = AWSRequest(
            method=request.method,
            url="http://" + request.headers["host"] + request.target,
            headers=signed,
            data=request.body,
        )
        aws_request.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(auth.access_key, secret), auth.service, auth.region)
        canonical = signer.canonical_request(aws_request)
        if signer.signed_headers(signer.headers_to_sign(aws_request)) != auth.signed_headers:
            raise invalid("SignedHeaders is not in canonical form")
        expected = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
        if not hmac.compare_digest(expected, auth.signature):
            raise invalid(
                "The request signature we calculated does not match the signature you provided."
            )

    # ---- STS ----------------------------------------------------------------------------

    def _assume_role(
        self, request: _Request, auth: _Auth | None, ctx: _Ctx
    ) -> tuple[int, bytes]:
        """AssumeRole, query protocol: verify, check the role's trust, issue temporary keys."""
        try:
            form = urllib.parse.parse_qs(
                request.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
            )
        except UnicodeDecodeError:
            raise _ApiError(400, "MalformedQueryString", "the body is not UTF-8") from None
        args = {name: values[-1] for name, values in form.items()}
        duration_text = args.get("DurationSeconds")
        duration = int(duration_text) if duration_text and duration_text.isdigit() else None
        caller = auth.access_key if auth is not None else None
        call = AssumeRoleCall(
            caller, args.get("RoleArn"), args.get("ExternalId"), args.get("RoleSessionName"),
            duration, time.time(), 0,
        )
        try:
            status, body, issued = self._grant(request, auth, ctx, args, duration)
        except _ApiError as exc:
            self._note_assume(dataclasses.replace(call, status=exc.status, error=exc.type))
            raise
        self._note_assume(
            dataclasses.replace(
                call, status=status, issued_key=issued.access_key, expiration=issued.expiration
            )
        )
        return status, body

    def _note_assume(self, call: AssumeRoleCall) -> None:
        with self._lock:
            self._assume_calls.append(call)

    def _grant(
        self,
        request: _Request,
        auth: _Auth | None,
        ctx: _Ctx,
        args: dict[str, str],
        duration: int | None,
    ) -> tuple[int, bytes, IssuedKey]:
        self._authenticate(request, auth, ("sts", "AssumeRole"), ctx)
        if args.get("Action") != "AssumeRole":
            raise _ApiError(400, "InvalidAction", f"Could not find operation {args.get('Action')}")
        role_arn, session = args.get("RoleArn"), args.get("RoleSessionName")
        if not role_arn or not session:
            missing = "roleArn" if not role_arn else "roleSessionName"
            raise _validation(f"Value null at '{missing}' failed to satisfy constraint")
        if not re.fullmatch(r"[\w+=,.@-]{2,64}", session, re.ASCII):
            raise _validation(f"Value '{session}' at 'roleSessionName' failed to satisfy constraint")
        role = self.roles.get(role_arn)
        caller = auth.access_key if auth is not None else "anonymous"
        denied = _ApiError(
            403,
            "AccessDenied",
            f"User: arn:aws:iam::{ACCOUNT_ID}:user/{caller} is not authorized to perform: "
            f"sts:AssumeRole on resource: {role_arn}",
        )
        if role is None or (role.trusted_keys is not None and caller not in role.trusted_keys):
            raise denied
        if role.external_id is not None and args.get("ExternalId") != role.external_id:
            raise denied
        lifetime = self.sts_lifetime
        if lifetime is None:
            lifetime = duration or STS_DEFAULT_LIFETIME
        expiration = float(int(time.time() + lifetime))  # whole seconds, as STS writes them
        suffix = uuid.uuid4().hex
        issued = IssuedKey(
            "ASIA" + suffix[:16].upper(),
            "fake-secret-" + uuid.uuid4().hex,
            "fake-token-" + suffix,
            role_arn,
            session,
            expiration,
        )
        with self._lock:
            if len(self._issued) >= REQUEST_LOG_SIZE:
                self._issued.pop(next(iter(self._issued)))
            self._issued[issued.access_key] = issued
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiration))
        role_name = role_arn.rsplit("/", 1)[-1]
        body = (
            f'<AssumeRoleResponse xmlns="{STS_NAMESPACE}"><AssumeRoleResult>'
            f"<Credentials><AccessKeyId>{issued.access_key}</AccessKeyId>"
            f"<SecretAccessKey>{issued.secret_key}</SecretAccessKey>"
            f"<SessionToken>{issued.session_token}</SessionToken>"
            f"<Expiration>{stamp}</Expiration></Credentials>"
            f"<AssumedRoleUser><AssumedRoleId>AROA{suffix[16:32].upper()}:{xml_escape(session)}"
            f"</AssumedRoleId><Arn>arn:aws:sts::{ACCOUNT_ID}:assumed-role/{xml_escape(role_name)}/"
            f"{xml_escape(session)}</Arn></AssumedRoleUser>"
            f"</AssumeRoleResult><ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId>"
            f"</ResponseMetadata></AssumeRoleResponse>"
        ).encode()
        return 200, body, issued

    # ---- operations ----------------------------------------------------------------------

    def _kinesis_stream(self, payload: dict[str, Any], ctx: _Ctx) -> str:
        name = payload.get("StreamName")
        arn = payload.get("StreamARN")
        if (name is not None and not isinstance(name, str)) or (
            arn is not None and not isinstance(arn, str)
        ):
            raise _serialization()
        if arn is not None:
            match = _STREAM_ARN.fullmatch(arn)
            if match is None:
                raise _validation(f"Value '{arn}' at 'streamARN' failed to satisfy constraint")
            if name is not None and name != match.group(1):
                raise _ApiError(400, "InvalidArgumentException", "StreamName and StreamARN differ")
            name = match.group(1)
        if not name:
            raise _validation("Either StreamName or StreamARN should be provided.")
        return self._known_stream(name, "Stream", ctx)

    def _firehose_stream(self, payload: dict[str, Any], ctx: _Ctx) -> str:
        name = payload.get("DeliveryStreamName")
        if name is None:
            raise _null("deliveryStreamName")
        if not isinstance(name, str):
            raise _serialization()
        if not name:
            raise _validation(
                "Value '' at 'deliveryStreamName' failed to satisfy constraint: "
                "Member must have length greater than or equal to 1"
            )
        return self._known_stream(name, "Firehose", ctx)

    def _known_stream(self, name: str, noun: str, ctx: _Ctx) -> str:
        """``name``, recorded on the request; ResourceNotFoundException if not a known stream."""
        ctx.stream = name
        if self.known_streams is not None and name not in self.known_streams:
            raise _ApiError(400, "ResourceNotFoundException", f"{noun} {name} under account {ACCOUNT_ID} not found.")
        return name

    def _record_list(self, payload: dict[str, Any], field: str, ctx: _Ctx) -> list[Any]:
        records = payload.get("Records")
        if records is None:
            raise _null(field)
        if not isinstance(records, list):
            raise _serialization()
        ctx.n_records = len(records)
        if not 1 <= len(records) <= MAX_RECORDS:
            raise _validation(
                f"Value '{len(records)} records' at '{field}' failed to satisfy constraint: "
                f"Member must have length between 1 and {MAX_RECORDS}"
            )
        return records

    def _whole_request_faults(self, api: str, stream: str) -> None:
        faults, rng = self.faults, self._rng
        if faults.throttle_rate > 0 and rng.random() < faults.throttle_rate:
            if api == "kinesis":
                raise _ApiError(
                    400,
                    "ProvisionedThroughputExceededException",
                    f"Rate exceeded for stream {stream} under account {ACCOUNT_ID}.",
                )
            raise _ApiError(FIREHOSE_THROTTLE_STATUS, "ServiceUnavailableException", "Slow down.")
        if faults.http500_rate > 0 and rng.random() < faults.http500_rate:
            raise _ApiError(500, "InternalFailure", "fakeaws: injected internal failure")

    def _kinesis_record(
        self, record: Any, index: int
    ) -> tuple[bytes, str, str | None, int | None, int]:
        """Validate one Kinesis record -> (data, key, explicit hash key, its int, size).

        index is the 0-based position in Records, or -1 for PutRecord's top-level fields.
        """
        if not isinstance(record, dict):
            raise _serialization()
        data_b64 = record.get("Data")
        key = record.get("PartitionKey")
        explicit = record.get("ExplicitHashKey")
        if data_b64 is None:
            raise _null(_where(index) + "data")
        if key is None:
            raise _null(_where(index) + "partitionKey")
        if not isinstance(data_b64, str) or not isinstance(key, str):
            raise _serialization()
        try:
            data = binascii.a2b_base64(data_b64, strict_mode=True)
        except (binascii.Error, ValueError):
            raise _serialization("Data is not valid base64") from None
        if not 1 <= len(key) <= MAX_PARTITION_KEY_CHARS:
            raise _validation(
                f"Value '{key}' at '{_where(index)}partitionKey' failed to satisfy constraint: "
                f"Member must have length between 1 and {MAX_PARTITION_KEY_CHARS}"
            )
        size = len(data) + (len(key) if key.isascii() else len(key.encode()))
        if size > KINESIS_MAX_RECORD_BYTES:
            raise _validation(
                f"Value at '{_where(index)}data' failed to satisfy constraint: "
                f"data and partition key must be at most {KINESIS_MAX_RECORD_BYTES} bytes"
            )
        hash_key = None
        if explicit is not None:
            if not isinstance(explicit, str):
                raise _serialization()
            if not _DECIMAL.fullmatch(explicit) or int(explicit) >= HASH_SPACE:
                raise _validation(
                    f"Value '{explicit}' at '{_where(index)}explicitHashKey' failed to satisfy "
                    "constraint: Member must be a decimal integer in 0 .. 2**128-1"
                )
            hash_key = int(explicit)
        return data, key, explicit, hash_key, size

    def _shard_of(self, key: str, hash_key: int | None) -> int:
        if self.shards == 1:
            return 0
        if hash_key is None:
            hash_key = int.from_bytes(hashlib.md5(key.encode()).digest(), "big")
        return bisect.bisect_right(self._starts, hash_key) - 1

    def _kinesis_put_request(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[str, list[Any]]:
        """A PutRecords request checked as Kinesis checks it: the stream and the parsed records
        (data, key, explicit hash key, hash key, bytes counted), within the request's limit."""
        stream = self._kinesis_stream(payload, ctx)
        records = self._record_list(payload, "records", ctx)
        parsed = [self._kinesis_record(r, i) for i, r in enumerate(records)]
        _check_total(sum(item[4] for item in parsed), KINESIS_MAX_REQUEST_BYTES)
        return stream, parsed

    def _op_kinesis_PutRecords(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        stream, parsed = self._kinesis_put_request(payload, ctx)
        self._whole_request_faults("kinesis", stream)
        fail_rate = self.faults.record_fail_rate
        rng = self._rng
        shard_ids = self._shard_ids
        store = self.store
        stored: list[Record] = []
        results: list[dict[str, str]] = []
        failed = 0
        sequence = self._next_sequence
        for data, key, explicit, hash_key, _ in parsed:
            shard = shard_ids[self._shard_of(key, hash_key)]
            if fail_rate > 0 and rng.random() < fail_rate:
                failed += 1
                self._fail_toggle ^= 1
                if self._fail_toggle:
                    results.append(
                        {
                            "ErrorCode": "ProvisionedThroughputExceededException",
                            "ErrorMessage": f"Rate exceeded for shard {shard} in stream {stream} "
                            f"under account {ACCOUNT_ID}.",
                        }
                    )
                else:
                    results.append(
                        {
                            "ErrorCode": "InternalFailure",
                            "ErrorMessage": "Internal service failure.",
                        }
                    )
                continue
            sequence += 1
            number = str(SEQUENCE_BASE + sequence)
            results.append({"SequenceNumber": number, "ShardId": shard})
            if store:
                stored.append(Record(stream, key, explicit, data, number, shard, None))
        self._next_sequence = sequence
        ctx.n_failed = failed
        ctx.accepted = len(parsed) - failed
        ctx.stored = stored
        return 200, orjson.dumps({"FailedRecordCount": failed, "Records": results})

    def _op_kinesis_PutRecord(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        stream = self._kinesis_stream(payload, ctx)
        ctx.n_records = 1
        data, key, explicit, hash_key, _ = self._kinesis_record(payload, -1)
        ordering = payload.get("SequenceNumberForOrdering")
        if ordering is not None:
            if not isinstance(ordering, str):
                raise _serialization()
            if not _DECIMAL.fullmatch(ordering):
                raise _validation(
                    f"Value '{ordering}' at 'sequenceNumberForOrdering' failed to satisfy "
                    "constraint: Member must be a decimal integer"
                )
            # The new record's number must exceed the one it is ordered after.
            self._next_sequence = max(self._next_sequence, int(ordering) - SEQUENCE_BASE)
        self._whole_request_faults("kinesis", stream)
        self._next_sequence += 1
        number = str(SEQUENCE_BASE + self._next_sequence)
        shard = self._shard_ids[self._shard_of(key, hash_key)]
        ctx.accepted = 1
        if self.store:
            ctx.stored = [Record(stream, key, explicit, data, number, shard, ordering)]
        return 200, orjson.dumps({"SequenceNumber": number, "ShardId": shard})

    def _firehose_data(self, record: Any, index: int) -> bytes:
        if not isinstance(record, dict):
            raise _serialization()
        data_b64 = record.get("Data")
        if data_b64 is None:
            raise _null(_where(index, "record.") + "data")
        if not isinstance(data_b64, str):
            raise _serialization()
        try:
            data = binascii.a2b_base64(data_b64, strict_mode=True)
        except (binascii.Error, ValueError):
            raise _serialization("Data is not valid base64") from None
        if len(data) > FIREHOSE_MAX_RECORD_BYTES:
            raise _validation(
                f"Value at '{_where(index, 'record.')}data' failed to satisfy constraint: "
                f"Member must have length less than or equal to {FIREHOSE_MAX_RECORD_BYTES}"
            )
        return data

    def _record_id(self) -> str:
        self._next_record_id += 1
        return f"{self._next_record_id:048x}"

    def _op_firehose_PutRecordBatch(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        stream = self._firehose_stream(payload, ctx)
        records = self._record_list(payload, "records", ctx)
        blobs = [self._firehose_data(r, i) for i, r in enumerate(records)]
        _check_total(sum(map(len, blobs)), FIREHOSE_MAX_REQUEST_BYTES)
        self._whole_request_faults("firehose", stream)
        fail_rate = self.faults.record_fail_rate
        rng = self._rng
        store = self.store
        stored: list[Record] = []
        results: list[dict[str, str]] = []
        failed = 0
        for data in blobs:
            if fail_rate > 0 and rng.random() < fail_rate:
                failed += 1
                results.append(
                    {"ErrorCode": "ServiceUnavailableException", "ErrorMessage": "Slow down."}
                )
                continue
            record_id = self._record_id()
            results.append({"RecordId": record_id})
            if store:
                stored.append(Record(stream, None, None, data, record_id, None, None, "firehose"))
        ctx.n_failed = failed
        ctx.accepted = len(blobs) - failed
        ctx.stored = stored
        return 200, orjson.dumps(
            {"FailedPutCount": failed, "Encrypted": False, "RequestResponses": results}
        )

    def _op_firehose_PutRecord(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        stream = self._firehose_stream(payload, ctx)
        record = payload.get("Record")
        if record is None:
            raise _null("record")
        ctx.n_records = 1
        data = self._firehose_data(record, -1)
        self._whole_request_faults("firehose", stream)
        record_id = self._record_id()
        ctx.accepted = 1
        if self.store:
            ctx.stored = [Record(stream, None, None, data, record_id, None, None, "firehose")]
        return 200, orjson.dumps({"RecordId": record_id, "Encrypted": False})

    def _shard_docs(self) -> list[dict[str, Any]]:
        return self._listing if self._listing is not None else self._closed + self._open_docs()

    def _open_docs(self) -> list[dict[str, Any]]:
        return [
            {
                "ShardId": self._shard_ids[i],
                "HashKeyRange": {"StartingHashKey": str(start), "EndingHashKey": str(end)},
                "SequenceNumberRange": {"StartingSequenceNumber": str(SEQUENCE_BASE)},
            }
            for i, (start, end) in enumerate(self._ranges)
        ]

    def _listed_ids(self) -> list[str]:
        return [doc["ShardId"] for doc in self._shard_docs()]

    def _page_limit(self, payload: dict[str, Any], field: str, default: int) -> int:
        limit = payload.get(field, default)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise _serialization()
        if not 1 <= limit <= 10_000:
            raise _validation(
                f"Value '{limit}' at '{field}' failed to satisfy constraint: "
                "Member must be between 1 and 10000"
            )
        return limit

    def _op_kinesis_ListShards(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        token = payload.get("NextToken")
        limit = self._page_limit(payload, "MaxResults", 1000)
        if token is not None:
            if not isinstance(token, str):
                raise _serialization()
            try:
                stream, offset = orjson.loads(binascii.a2b_base64(token, strict_mode=True))
                assert isinstance(stream, str) and isinstance(offset, int)
            except (ValueError, TypeError, AssertionError, binascii.Error):
                raise _ApiError(400, "InvalidArgumentException", "NextToken is invalid") from None
            ctx.stream = stream
        else:
            stream = self._kinesis_stream(payload, ctx)
            offset = 0
            start_after = payload.get("ExclusiveStartShardId")
            if isinstance(start_after, str) and start_after in (listed := self._listed_ids()):
                offset = listed.index(start_after) + 1
        shards = self._shard_docs()
        doc: dict[str, Any] = {"Shards": shards[offset : offset + limit]}
        if offset + limit < len(shards):
            doc["NextToken"] = binascii.b2a_base64(
                orjson.dumps([stream, offset + limit]), newline=False
            ).decode()
        return 200, orjson.dumps(doc)

    def _op_kinesis_DescribeStream(self, payload: dict[str, Any], ctx: _Ctx) -> tuple[int, bytes]:
        stream = self._kinesis_stream(payload, ctx)
        limit = self._page_limit(payload, "Limit", 100)
        offset = 0
        start_after = payload.get("ExclusiveStartShardId")
        if isinstance(start_after, str) and start_after in (listed := self._listed_ids()):
            offset = listed.index(start_after) + 1
        shards = self._shard_docs()
        region = ctx.region or DEFAULT_REGION
        description = {
            "StreamName": stream,
            "StreamARN": f"arn:aws:kinesis:{region}:{ACCOUNT_ID}:stream/{stream}",
            "StreamStatus": "ACTIVE",
            "StreamModeDetails": {"StreamMode": "PROVISIONED"},
            "Shards": shards[offset : offset + limit],
            "HasMoreShards": offset + limit < len(shards),
            "RetentionPeriodHours": 24,
            "StreamCreationTimestamp": self._created,
            "EnhancedMonitoring": [{"ShardLevelMetrics": []}],
            "EncryptionType": "NONE",
        }
        return 200, orjson.dumps({"StreamDescription": description})


def _is_sts(request: _Request, target: str) -> bool:
    """The query protocol: a form-encoded POST with no X-Amz-Target."""
    content_type = request.headers.get("content-type", "")
    return (
        request.method == "POST"
        and not target
        and content_type.startswith("application/x-www-form-urlencoded")
    )


def _where(index: int, single: str = "") -> str:
    """The member path AWS names in validation messages."""
    return single if index < 0 else f"records.{index + 1}.member."


def _describe_payload(body: bytes, api: str, ctx: _Ctx) -> None:
    """Best effort stream name and record count for the log of a request we do not process."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(payload, dict):
        return
    name = payload.get("DeliveryStreamName") if api == "firehose" else payload.get("StreamName")
    if name is None and api == "kinesis" and isinstance(payload.get("StreamARN"), str):
        match = _STREAM_ARN.fullmatch(payload["StreamARN"])
        name = match.group(1) if match else None
    ctx.stream = name if isinstance(name, str) else None
    records = payload.get("Records")
    ctx.n_records = len(records) if isinstance(records, list) else 1


def _describe(predicate: Callable[..., Any]) -> str:
    name = getattr(predicate, "__name__", repr(predicate))
    if name == "<lambda>":
        try:
            return inspect.getsource(predicate).strip()
        except (OSError, TypeError):
            pass
    return name


# ---- command line ------------------------------------------------------------------------------


def serve_until_stopped(server: FakeAWS, args: argparse.Namespace) -> int:
    """The CLI's life: faults from ``args``, the port file, then serve until SIGTERM/SIGINT or
    until whoever started us is gone (an orphan would listen forever)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parent = os.getppid()
    server.faults.record_fail_rate = args.record_fail_rate
    server.faults.throttle_rate = args.throttle_rate
    server.faults.http500_rate = args.http500_rate
    server.faults.latency = args.latency
    server.start()
    try:
        if args.port_file:
            temporary = args.port_file + ".tmp"
            with open(temporary, "w") as f:
                f.write(f"{server.port}\n")
            os.replace(temporary, args.port_file)  # readers never see a half-written file
        print(f"{type(server).__name__} listening on {server.url}", file=sys.stderr, flush=True)
        while not stop.wait(0.5) and os.getppid() == parent:
            pass
    finally:
        server.stop()
    return 0


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every script that serves a FakeAWS (this one, tests/bench/endpoint.py):
    where it listens, its key, and the faults serve_until_stopped applies."""
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--access-key", default="AKIDSPOOLDTEST")
    parser.add_argument("--secret-key", default="spoold-test-secret")
    parser.add_argument("--record-fail-rate", type=float, default=0.0)
    parser.add_argument("--throttle-rate", type=float, default=0.0)
    parser.add_argument("--http500-rate", type=float, default=0.0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_server_arguments(parser)
    parser.add_argument(
        "--key", action="append", default=[], metavar="ACCESS=SECRET", help="another static key"
    )
    parser.add_argument("--no-verify", action="store_true", help="do not check SigV4 signatures")
    parser.add_argument("--no-store", action="store_true", help="count records, do not keep them")
    args = parser.parse_args(argv)

    server = FakeAWS(
        args.access_key,
        args.secret_key,
        verify=not args.no_verify,
        store=not args.no_store,
        seed=args.seed,
        shards=args.shards,
        port=args.port,
        keys=dict(item.split("=", 1) for item in args.key),
    )
    return serve_until_stopped(server, args)


if __name__ == "__main__":
    raise SystemExit(main())
