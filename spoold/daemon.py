"""``spoold run``: the only place that opens long-lived nurseries and handles signals.

Lifetimes nest: services (committer, flushers, expiry) outlive the front (listeners and
connections). Shutdown goes front to back: stop accepting and reading, make every line already
read durable, then let the flushers send what they can within the grace period, then commit the
last deletes and close the spool. Whatever was not sent stays spooled for the next start.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import httpx
import structlog
import trio

from spoold import systemd
from spoold.committer import Committer
from spoold.config import Config
from spoold.flusher import Flusher
from spoold.ingest import Ingest, bind_socket
from spoold.signing import CredentialSource, use_systemd_credentials
from spoold.spool import Spool, Worker

logger = structlog.get_logger()

# How often rows older than max_age are looked for on disk.
EXPIRY_INTERVAL = 60.0
# How often the shutdown drain checks whether every flusher is idle.
DRAIN_POLL = 0.05


class Daemon:
    """Everything a running spoold holds; ``status()`` reads it for operators."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool.path, cfg.spool.synchronous)
        self.writer = Worker("spoold-spool-writer")
        self.reader = Worker("spoold-spool-reader")
        self.flushers: dict[str, Flusher] = {}
        self.ingests: dict[str, Ingest] = {}
        self.committer: Committer | None = None
        self.started = time.time()

    def _on_rows(self, rows: list[tuple[int, str, list[bytes], int]], created: float) -> None:
        for row_id, dest, lines, nbytes in rows:
            flusher = self.flushers.get(dest)
            if flusher is not None:
                flusher.offer(row_id, lines, nbytes, created)

    def _cursor_of(self, dest: str) -> int:
        flusher = self.flushers.get(dest)
        return flusher.cursor if flusher is not None else 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            use_systemd_credentials()
            try:
                stats = await self.writer.run(self.spool.open_writer)
                await self.reader.run(self.spool.open_reader)
                known = {d.name for d in cfg.destinations}
                for dest, s in stats.items():
                    level = logger.info if dest in known else logger.warning
                    level("spool_backlog", dest=dest, lines=s.lines, bytes=s.bytes,
                          kept_for_unknown_destination=dest not in known)
                sockets = {d.name: bind_socket(d) for d in cfg.destinations}
                await self._serve(stats, sockets, signals, task_status)
            finally:
                with trio.CancelScope(shield=True):
                    for d in cfg.destinations:
                        _unlink_socket(d.socket)
                    await self.reader.run(lambda: None)
                    await self.writer.run(self.spool.close)
                self.reader.stop()
                self.writer.stop()

    async def _serve(self, stats, sockets, signals, task_status) -> None:  # type: ignore[no-untyped-def]
        cfg = self.cfg
        credentials = CredentialSource()
        rng = random.Random()
        self.committer = committer = Committer(
            self.spool, self.writer, cfg.spool, stats, self._on_rows, self._cursor_of
        )
        limits = httpx.Limits(max_connections=sum(d.max_in_flight for d in cfg.destinations) + 4)
        async with httpx.AsyncClient(limits=limits, http2=False, trust_env=False) as client:
            async with trio.open_nursery() as services:
                await services.start(committer.run)
                for d in cfg.destinations:
                    flusher = Flusher(d, cfg.spool, self.spool, self.reader, committer, client, credentials, rng)
                    self.flushers[d.name] = flusher
                    await services.start(flusher.run)
                services.start_soon(self._expire_loop)
                async with trio.open_nursery() as front:
                    for d in cfg.destinations:
                        ingest = Ingest(d, committer)
                        self.ingests[d.name] = ingest
                        await front.start(ingest.serve, sockets[d.name])
                    logger.info("ready", destinations=[d.name for d in cfg.destinations],
                                spool=str(cfg.spool.path))
                    systemd.notify("READY=1", f"STATUS={self.status_line()}")
                    task_status.started()
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            logger.warning("reload_not_supported", hint="restart to apply config changes")
                            continue
                        logger.info("stopping", signal=signal.Signals(signum).name, grace=cfg.shutdown_grace)
                        systemd.notify("STOPPING=1")
                        break
                    for ingest in self.ingests.values():
                        ingest.stop_reading()
                committer.close()
                await committer.commit_once()
                with trio.move_on_after(cfg.shutdown_grace):
                    for flusher in self.flushers.values():
                        flusher.drain()
                    while not all(f.idle for f in self.flushers.values()):
                        await trio.sleep(DRAIN_POLL)
                services.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await committer.commit_once()
        unsent = {n: len(f.leased) for n, f in self.flushers.items() if f.leased}
        logger.info("stopped", rows_left_in_flight=unsent)

    async def _expire_loop(self) -> None:
        assert self.committer is not None
        while True:
            cutoff = time.time() - self.cfg.spool.max_age
            for name in list(self.committer.stats):
                await self.committer.expire(name, cutoff)
            await trio.sleep(EXPIRY_INTERVAL)

    def status_line(self) -> str:
        parts = []
        for name, f in self.flushers.items():
            s = self.committer.stats.get(name) if self.committer else None
            parts.append(f"{name}: {s.lines if s else 0} spooled, {f.lines_sent} sent")
        return "; ".join(parts)


def _unlink_socket(path: Path) -> None:
    try:
        Path(path).unlink()
    except OSError:
        pass


async def run(cfg: Config) -> None:
    await Daemon(cfg).run()
