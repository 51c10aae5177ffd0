"""The HTTP sender: POST a signed batch, parse the reply into per-record outcomes.

Two ways to run it, with the same code and the same results:

- inline, on the daemon's own event loop (``[daemon] sender = "inline"``, the default);
- in a helper process, ``python -m spoold.sender``, a child of the daemon that reads signed
  requests on its stdin and writes outcomes on its stdout (``sender = "process"``). With one
  line per record, posting 500-record requests and parsing their verbose replies is about a
  third of the daemon's CPU; in a second process it runs on another core instead of sharing
  the daemon's one (Python runs one thread at a time). Only for destinations of one line per
  record (see many_records_per_request): with few, large records per request (KPL aggregates,
  packed Firehose lines) or ordered mode, the helper's copy of each body would cost more
  memory than it saves CPU. On the 2-core development machine, shared with the endpoint and
  the clients, it did not raise end-to-end throughput (it costs IPC and a second interpreter:
  about +1.3 s of CPU per million lines and +37 MiB), so it is off by default; it lets the
  daemon accept lines about 1.5x faster than it sends them, and may help on hosts whose other
  cores are idle.

The daemon keeps every decision: it builds and signs each body, and only turns the outcomes it
gets back into acks and retries. The helper holds nothing durable. If it dies, every request it
had is failed as retryable (those lines are sent again: at-least-once, as after any network
error) and a new helper is started. It exits when its stdin closes, so it never outlives the
daemon, even after kill -9.

Wire format, both ways: a little-endian u32 length, then that many bytes. A request is two
frames: a JSON head {id, url, headers, timeout, firehose, count} and the body. A reply is one
frame: JSON {id, outcomes} (null for accepted, else the error code), or {id, all: true} when
every record was accepted, or {id, error: "retry" | "fatal", message, code, status}; an
answer with outcomes may carry shard: [position, ShardId] (protocol.Outcomes.shard).
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
import orjson
import outcome
import structlog
import trio

from spoold.config import Destination
from spoold.errors import FatalSendError, RetryableSendError, SendError
from spoold.protocol import Api, Outcomes
from spoold.transport import Reply, Transport

logger = structlog.get_logger()

_LEN = struct.Struct("<I")
# Bigger than any request spoold makes (PutRecords: 5 MiB of data, ~6.7 MiB as JSON).
MAX_FRAME = 64 * 1024 * 1024
READ_SIZE = 1024 * 1024
# How long a request may wait to be written to the helper before the helper counts as hung.
WRITE_TIMEOUT = 10.0
# Pause before starting a new helper after one exited: none after a helper that ran a while;
# doubling from RESTART_DELAY while helpers keep dying within QUICK_EXIT of their start.
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 30.0
QUICK_EXIT = 5.0
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1024 * 1024
# How long a stopping helper may take to finish its requests before it is killed.
STOP_TIMEOUT = 5.0

# What a response read in full keeps as its stream (see uncycled).
_READ = httpx.ByteStream(b"")


def many_records_per_request(dest: Destination) -> bool:
    """One line per record in PutRecords/PutRecordBatch requests: the helper process pays off."""
    records = dest.records
    if records.ordered or records.aggregation != "none":
        return False
    return not (dest.kind == "firehose" and records.pack_lines)


def uncycled(response: httpx.Response) -> httpx.Response:
    """``response`` (read in full) cut out of the reference cycle httpx leaves it in.

    httpx binds each response's stream to the response itself, so every request and reply
    body stays in memory until the cycle collector runs: about 150 KiB a request, 300 MiB per
    million lines with the collector off, and most of the collector's work with it on. The
    body is read and the stream closed by then, so the stream is no longer needed.
    """
    response.stream = _READ
    return response


@functools.lru_cache(maxsize=64)
def _parsed(url: str) -> httpx.URL:
    # httpx parses a str URL on every request (in Python): about 30 µs of the daemon's thread.
    return httpx.URL(url)


@functools.lru_cache(maxsize=16)
def _timeouts(request_timeout: float) -> dict[str, float | None]:
    return httpx.Timeout(request_timeout).as_dict()


Http = httpx.AsyncClient | Transport


async def post(http: Http, url: str, headers: dict[str, str], body: bytes, request_timeout: float) -> Reply:
    """One POST; every failure to get a reply becomes a RetryableSendError.

    Given the client's transport, the request goes straight to it, through httpx's transport
    API (an ``httpx.Request`` in, an ``httpx.Response`` out): the client's own layers (default
    headers, cookies, auth and redirect flows, event hooks) do nothing for a signed AWS call,
    yet cost about 0.4 µs of CPU per record of a 500-record request.
    """
    try:
        with trio.fail_after(request_timeout + 1.0):
            if isinstance(http, Transport):
                request = httpx.Request("POST", _parsed(url), headers=headers, content=body,
                                        extensions={"timeout": _timeouts(request_timeout)})
                response = await http.handle_async_request(request)
            else:
                response = await http.post(_parsed(url), content=body, headers=headers, timeout=request_timeout)
    except trio.TooSlowError:
        raise RetryableSendError("request timed out", code="Timeout") from None
    except httpx.TimeoutException as exc:
        raise RetryableSendError(f"request timed out ({type(exc).__name__})", code="Timeout") from exc
    except httpx.HTTPError as exc:
        raise RetryableSendError(f"connection failed: {type(exc).__name__}: {exc}",
                                 code="ConnectionError") from exc
    return Reply(response.status_code, response.headers.raw, uncycled(response).content)


async def post_batch(http: Http, url: str, headers: dict[str, str], body: bytes,
                     request_timeout: float, firehose: bool, count: int) -> list[str | None]:
    """POST a PutRecords/PutRecordBatch body; the outcome of each of its ``count`` records."""
    response = await post(http, url, headers, body, request_timeout)
    return _parser(firehose).parse(response.status_code, response.content, count)


def _parser(firehose: bool) -> Api:
    return Api("", "", "", firehose)  # parse() reads only the reply shape


class Sender(Protocol):
    async def put(self, url: str, headers: dict[str, str], body: bytes, request_timeout: float,
                  firehose: bool, count: int) -> list[str | None]: ...


def new_transport() -> Transport:
    """The daemon's one connection pool: its client's transport, which InlineSender posts to."""
    return Transport()


class InlineSender:
    """Sends on the daemon's own event loop (through the transport, when given it)."""

    def __init__(self, client: Http) -> None:
        self.client = client

    async def put(self, url: str, headers: dict[str, str], body: bytes, request_timeout: float,
                  firehose: bool, count: int) -> list[str | None]:
        return await post_batch(self.client, url, headers, body, request_timeout, firehose, count)


class _Pending:
    __slots__ = ("count", "done", "result")

    def __init__(self, count: int) -> None:
        self.count = count
        self.done = trio.Event()
        self.result: outcome.Outcome[list[str | None]] | None = None


class ProcessSender:
    """Sends through a helper process; ``run`` starts it (and restarts it when it exits)."""

    def __init__(self, command: list[str] | None = None) -> None:
        # -P: the daemon's working directory does not go first on the helper's sys.path.
        self.command = command or [sys.executable, "-P", "-m", "spoold.sender"]
        self._process: trio.Process | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._write_lock = trio.Lock()
        self._up = trio.Event()  # set while a helper runs
        self._last_reply = 0.0
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # put() waits (within its deadline) for a helper to be up
        quick_exits = 0
        while True:
            started_at = trio.current_time()
            try:
                process = await trio.lowlevel.open_process(
                    self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            except OSError as exc:
                process = None
                logger.error("sender_start_failed", error=str(exc))
            if process is not None:
                await self._serve_replies(process)
            # A helper that dies at once again and again (a broken install) is retried ever
            # more slowly, up to RESTART_DELAY_MAX; one that ran a while is replaced at once.
            quick = trio.current_time() - started_at < QUICK_EXIT
            quick_exits = min(quick_exits + 1, 20) if quick else 0
            delay = min(RESTART_DELAY_MAX, RESTART_DELAY * (2 ** quick_exits - 1))
            logger.warning("sender_exited", returncode=process.returncode if process else None,
                           restart_in=round(delay, 2))
            await trio.sleep(delay)

    async def _serve_replies(self, process: trio.Process) -> None:
        self.starts += 1
        for pipe in (process.stdin, process.stdout):
            _widen(pipe)
        self._process = process
        self._up.set()
        logger.debug("sender_started", pid=process.pid)
        try:
            assert process.stdout is not None
            async for frame in _frames(process.stdout):
                self._deliver(orjson.loads(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError, KeyError, TypeError, ValueError) as exc:
            logger.error("sender_reply_unreadable", error=str(exc))
        finally:
            self._process = None
            self._up = trio.Event()
            self._fail_all(RetryableSendError("the sender process exited", code="SenderExited"))
            with trio.CancelScope(shield=True):
                await _stop(process)

    def _deliver(self, reply: dict[str, Any]) -> None:
        self._last_reply = trio.current_time()
        slot = self._pending.get(reply["id"])
        if slot is None:
            return  # its caller gave up (timed out or cancelled)
        result: outcome.Outcome[list[str | None]]
        if "error" in reply:
            kind = FatalSendError if reply["error"] == "fatal" else RetryableSendError
            result = outcome.Error(kind(str(reply["message"]), code=str(reply["code"]), status=int(reply["status"])))
        elif reply.get("all") is True:
            result = outcome.Value(Outcomes([None] * slot.count, _shard(reply.get("shard"), slot.count)))
        else:
            outcomes = reply["outcomes"]
            # Trusted no more than a service reply: exactly one outcome per record, or retry all.
            if not (isinstance(outcomes, list) and len(outcomes) == slot.count
                    and all(o is None or (isinstance(o, str) and o) for o in outcomes)):
                result = outcome.Error(RetryableSendError("malformed reply from the sender process",
                                                          code="MalformedReply"))
            else:
                result = outcome.Value(Outcomes(outcomes, _shard(reply.get("shard"), slot.count)))
        del self._pending[reply["id"]]
        slot.result = result
        slot.done.set()

    def _fail_all(self, exc: SendError) -> None:
        pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.result = outcome.Error(exc)
            slot.done.set()

    async def put(self, url: str, headers: dict[str, str], body: bytes, request_timeout: float,
                  firehose: bool, count: int) -> list[str | None]:
        if self._process is None:
            with trio.move_on_after(request_timeout):
                await self._up.wait()
        process = self._process
        if process is None or process.stdin is None:
            raise RetryableSendError("the sender process is not running", code="SenderExited")
        if len(body) > MAX_FRAME:
            raise FatalSendError(f"a {len(body)}-byte request is over the sender process's limit"
                                 f" ({MAX_FRAME}): lower max_request_bytes", code="RequestTooBig")
        rid = next(self._ids)
        slot = self._pending[rid] = _Pending(count)
        head = orjson.dumps({"id": rid, "url": url, "headers": headers, "timeout": request_timeout,
                             "firehose": firehose, "count": count})
        try:
            async with self._write_lock:
                # A frame half written would garble every later one: written whole or the
                # helper is replaced.
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + WRITE_TIMEOUT
                    try:
                        await process.stdin.send_all(b"".join((_LEN.pack(len(head)), head,
                                                               _LEN.pack(len(body)), body)))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        raise RetryableSendError("the sender process exited", code="SenderExited") from None
                if scope.cancelled_caught:
                    process.kill()
                    raise RetryableSendError("the sender process is not reading", code="SenderHung")
            written = trio.current_time()
            with trio.fail_after(request_timeout + 2.0):  # the helper's own deadline is timeout + 1
                await slot.done.wait()
        except trio.TooSlowError:
            if self._last_reply < written and process is self._process:
                # Not one reply since this request went out, past the helper's own deadline:
                # the helper is stuck. A new one replaces it.
                logger.error("sender_unresponsive", pid=process.pid, waited=request_timeout + 2.0)
                process.kill()
            raise RetryableSendError("request timed out", code="Timeout") from None
        finally:
            self._pending.pop(rid, None)
        assert slot.result is not None
        return slot.result.unwrap()


def _shard(hint: Any, count: int) -> tuple[int, str] | None:
    """The helper's shard hint, if well formed (a wrong one is dropped: it is only a hint)."""
    if (isinstance(hint, list) and len(hint) == 2 and type(hint[0]) is int and 0 <= hint[0] < count
            and isinstance(hint[1], str) and hint[1]):
        return hint[0], hint[1]
    return None


def _widen(pipe: Any) -> None:
    """A pipe as wide as Linux allows unprivileged (1 MiB by default, vs 64 KiB): a request
    body goes in one write rather than many turns of both event loops."""
    try:
        fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
    except (AttributeError, OSError, ValueError):
        pass  # not Linux, or the limit is lower: narrower pipes work too, a little slower


async def _stop(process: trio.Process) -> None:
    if process.stdin is not None:
        await process.stdin.aclose()
    with trio.move_on_after(STOP_TIMEOUT):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


async def _frames(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    """Length-prefixed frames until a clean end of stream; ValueError for a broken one."""
    buf = bytearray()
    while True:
        while len(buf) >= 4:
            (size,) = _LEN.unpack_from(buf)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes")
            if len(buf) < 4 + size:
                break
            frame = bytes(buf[4:4 + size])
            del buf[:4 + size]
            yield frame
        data = await stream.receive_some(READ_SIZE)
        if not data:
            if buf:
                raise ValueError("the stream ended inside a frame")
            return
        buf += data


# -- the helper process ------------------------------------------------------------------


async def _serve(stdin: trio.abc.ReceiveStream, stdout: trio.abc.SendStream) -> None:
    lock = trio.Lock()

    async def answer(reply: dict[str, Any]) -> None:
        frame = orjson.dumps(reply)
        async with lock:
            try:
                await stdout.send_all(_LEN.pack(len(frame)) + frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                os._exit(0)  # the daemon is gone: nobody to answer, nothing to finish

    async def handle(head: dict[str, Any], body: bytes) -> None:
        reply: dict[str, Any] = {"id": head["id"]}
        try:
            outcomes = await post_batch(transport, head["url"], head["headers"], body, head["timeout"],
                                        head["firehose"], head["count"])
        except SendError as exc:
            reply.update(error="fatal" if isinstance(exc, FatalSendError) else "retry",
                         message=str(exc), code=exc.code, status=exc.status)
        except Exception as exc:  # a bug here fails this request only, never the others
            reply.update(error="retry", message=f"sender process error: {exc!r}", code="SenderError", status=0)
        else:
            if getattr(outcomes, "shard", None):
                reply["shard"] = outcomes.shard
            if any(outcomes):
                reply["outcomes"] = outcomes
            else:
                reply.update(all=True, count=len(outcomes))
        await answer(reply)

    async with new_transport() as transport:
        async with trio.open_nursery() as nursery:
            frames = _frames(stdin)
            async for head_frame in frames:
                body = await anext(frames, None)
                if body is None:
                    break  # the daemon stopped in the middle of a request: nobody waits for it
                nursery.start_soon(handle, orjson.loads(head_frame), body)
            # stdin closed: the daemon is stopping; finish what was asked, then exit


def main() -> None:
    # Stopping is the daemon's call: it closes our stdin once its own shutdown has drained
    # (systemd's SIGTERM to the whole service, a terminal's Ctrl-C or hang-up, or a SIGHUP sent
    # to the process group to reload the daemon would cut requests short).
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    try:
        trio.run(_serve, stdin, stdout)
    except* (BrokenPipeError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the daemon is gone


if __name__ == "__main__":
    main()
