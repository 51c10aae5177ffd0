"""A loopback TCP proxy that breaks the network between spoold and tests/tools/fakeaws.py.

    with FaultProxy(upstream_port=srv.port) as proxy:   # listens on 127.0.0.1, an ephemeral port
        proxy.set(latency=5.0)                          # point the daemon at proxy.url
        ...
        proxy.set()                                     # a clean network again

Faults (``set`` replaces them all, and cuts every open connection, as a network change would:
the daemon's keep-alive connections would otherwise never meet the new fault):

- ``reset=True``: forward the request, forward the first ``reset_after`` bytes of the answer,
  then reset the daemon's connection (SO_LINGER 0). The service has stored the records.
- ``latency=S``: every chunk, both ways, is delivered S seconds after it was read; bytes already
  "on the wire" are delivered even when their sender has gone (as TCP would).
- ``bandwidth=B``: at most B bytes/s each way, per connection.
- ``hang=True``: accept and read the request, never forward it, never answer.
- ``refuse()`` / ``accept_again()``: close the listening socket (connections are refused), then
  listen on the same port again.

Each connection is recorded (``conns``): when it opened, when the daemon's side ended, the bytes
each way and the fault it met, so a test can check that the daemon's timeouts are bounded.
Runs its own asyncio loop on a daemon thread; ``stop()`` ends everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Callable

HOST = "127.0.0.1"  # never anything else
READ_SIZE = 64 * 1024
START_TIMEOUT = 10.0
# Bandwidth is metered in slices this many times a second.
BANDWIDTH_TICKS = 20


@dataclasses.dataclass
class Conn:
    opened: float
    fault: str
    client_done: float | None = None  # the daemon closed or reset its side
    bytes_up: int = 0  # daemon -> service
    bytes_down: int = 0  # service -> daemon
    reset_sent: bool = False

    @property
    def held(self) -> float | None:
        """How long the daemon kept this connection open."""
        return None if self.client_done is None else self.client_done - self.opened


@dataclasses.dataclass(frozen=True)
class _Faults:
    reset: bool = False
    reset_after: int = 40
    latency: float = 0.0
    bandwidth: int | None = None
    hang: bool = False

    def name(self) -> str:
        parts = [k for k in ("reset", "hang") if getattr(self, k)]
        if self.latency:
            parts.append(f"latency={self.latency}")
        if self.bandwidth:
            parts.append(f"bandwidth={self.bandwidth}")
        return ",".join(parts) or "none"


class FaultProxy:
    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.faults = _Faults()
        self._lock = threading.Lock()
        self._conns: list[Conn] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def conns(self) -> list[Conn]:
        with self._lock:
            return list(self._conns)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> FaultProxy:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT) or self._server is None:
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(START_TIMEOUT)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        finally:
            ready.set()
            loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        await self._listen()
        ready.set()
        await self._stopping.wait()
        self._cut_all()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    # -- control, from the test thread --------------------------------------------------
    def _call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (a coroutine function or not) on the proxy's loop; raise what it raises."""
        assert self._loop is not None

        async def run() -> None:
            result = fn()
            if asyncio.iscoroutine(result):
                await result

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(START_TIMEOUT)

    def set(self, *, reset: bool = False, reset_after: int = 40, latency: float = 0.0,
            bandwidth: int | None = None, hang: bool = False) -> None:
        """Replace the faults; open connections are cut so that new ones meet them."""
        faults = _Faults(reset, reset_after, latency, bandwidth, hang)

        def apply() -> None:
            self.faults = faults
            self._cut_all()

        self._call(apply)

    def refuse(self) -> None:
        """Stop listening: connecting now fails with ECONNREFUSED."""
        def close() -> None:
            assert self._server is not None
            self._server.close()
            self._cut_all()

        self._call(close)

    def accept_again(self) -> None:
        self._call(self._listen)

    # -- connections --------------------------------------------------------------------
    def _cut_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        faults = self.faults
        conn = Conn(opened=time.monotonic(), fault=faults.name())
        with self._lock:
            self._conns.append(conn)
        up_writer: asyncio.StreamWriter | None = None
        try:
            if faults.hang:
                while data := await reader.read(READ_SIZE):
                    conn.bytes_up += len(data)
                conn.client_done = time.monotonic()
                return
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
            up = asyncio.ensure_future(self._pump(reader, up_writer, conn, faults, upward=True))
            down = asyncio.ensure_future(self._pump(up_reader, writer, conn, faults, upward=False))
            try:
                await asyncio.gather(up, down)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            _reset(writer)  # a fault change or stop: the connection is cut
        finally:
            if conn.client_done is None:
                conn.client_done = time.monotonic()
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, conn: Conn,
                    faults: _Faults, *, upward: bool) -> None:
        # Reading and delivering are separate so that latency delays chunks without slowing reads.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await src.read(READ_SIZE):
                    queue.put_nowait((time.monotonic(), data))
            except OSError:
                pass
            if upward:
                conn.client_done = time.monotonic()
            queue.put_nowait((time.monotonic(), b""))

        reading = asyncio.ensure_future(read())
        try:
            while True:
                at, data = await queue.get()
                if faults.latency:
                    await asyncio.sleep(max(0.0, at + faults.latency - time.monotonic()))
                if not data:
                    if upward and dst.can_write_eof():
                        dst.write_eof()
                    return
                if not upward and faults.reset:
                    room = faults.reset_after - conn.bytes_down
                    if room > 0:
                        dst.write(data[:room])
                        conn.bytes_down += min(room, len(data))
                        await dst.drain()
                        await asyncio.sleep(0.05)
                    _reset(dst)
                    conn.reset_sent = True
                    return
                await self._deliver(dst, data, faults.bandwidth)
                if upward:
                    conn.bytes_up += len(data)
                else:
                    conn.bytes_down += len(data)
        finally:
            reading.cancel()

    @staticmethod
    async def _deliver(dst: asyncio.StreamWriter, data: bytes, bandwidth: int | None) -> None:
        if not bandwidth:
            dst.write(data)
            await dst.drain()
            return
        step = max(1, bandwidth // BANDWIDTH_TICKS)
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            dst.write(piece)
            await dst.drain()
            await asyncio.sleep(len(piece) / bandwidth)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
