"""Command line: argparse -> config -> logs -> trio.run. Errors become exit codes, never tracebacks.

Exit codes: 0 success; 1 runtime failure (spool unusable, socket busy) or, for ``send``, some
lines rejected; 2 misuse, an invalid config, or ``send`` could not connect.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import socket
import sys
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from spoold import __version__
from spoold.errors import ConfigError, SpooldError

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Bytes per write when `spoold send` streams a file.
SEND_CHUNK = 256 * 1024
# How long `spoold send` waits for the durable acknowledgement after its last byte.
SEND_ANSWER_TIMEOUT = 120.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spoold", description="Durable line spool for Kinesis, Firehose and Yandex Data Streams.")
    parser.add_argument("--version", action="version", version=f"spoold {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", required=True, help="path of the TOML config file")

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", required=True)

    send = sub.add_parser("send", help="send lines to a running daemon and wait for the durable acknowledgement")
    send.add_argument("--socket", required=True, help="the destination's Unix socket")
    send.add_argument("files", nargs="*", help="files to send (default: standard input)")

    status = sub.add_parser("status", help="show spool depth, rates, retries and errors per destination")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the running daemon's answer (default 30)")

    dead = sub.add_parser("dead-letters", help="list, re-queue or delete records the service refused for good")
    dead.add_argument("action", choices=["list", "replay", "purge"])
    dead.add_argument("--config", required=True)
    dead.add_argument("--dest", help="only this destination")
    dead.add_argument("--limit", type=int, default=100, help="list at most this many (default 100)")
    dead.add_argument("--json", action="store_true")
    dead.add_argument("--timeout", type=float, default=30.0,
                      help="seconds to wait for the running daemon's answer (default 30)")

    sub.add_parser("demo", help="run a local end-to-end demo against moto on 127.0.0.1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "run":
            return _run(args.config)
        if args.command == "send":
            return send(args.socket, args.files)
        if args.command == "status":
            return _status(args)
        if args.command == "dead-letters":
            return _dead_letters(args)
        if args.command == "demo":
            from spoold.demo import main as demo_main

            return demo_main()
    except ConfigError as exc:
        print(f"spoold: invalid config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _check_config(path: str) -> int:
    from spoold import config, host

    cfg = host.resolve(config.load(path))
    for d in cfg.destinations:
        print(f"{d.name}: {d.kind} -> {d.stream_arn or d.stream} at {d.endpoint_url} ({d.region})"
              + (f", socket {d.socket.path}" if d.socket else "")
              + (f", files {' '.join(d.files.paths)}" if d.files.paths else ""))
    print(f"{path}: OK")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from spoold import config, control

    return control.status_command(config.load(args.config), args.json, args.timeout)


def _dead_letters(args: argparse.Namespace) -> int:
    from spoold import config, control

    cfg = config.load(args.config)
    return control.dead_letters_command(cfg, args.action, args.dest, args.limit, args.json, args.timeout)


def _lean_process() -> None:
    """Memory settings for the long-running daemon (not for the short commands)."""
    # sqlite-utils imports numpy when it happens to be installed, for column types spoold never
    # uses: 12 MiB of RSS on every host that has it. A None entry in sys.modules makes that
    # optional import fail as if numpy were absent.
    sys.modules.setdefault("numpy", None)  # type: ignore[assignment]
    # glibc raises its mmap threshold each time a large block is freed, so after a burst of
    # long lines (unfinished lines held for slow writers, multi-MiB request bodies) blocks of
    # 128 KiB and more come from the heap, and the heap does not shrink. A fixed threshold
    # keeps every large block in its own mapping, returned to the system when freed: with
    # 1,000 writers holding 255 KiB each, the peak fell from 150-190 MiB to 124 MiB.
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def _run(path: str) -> int:
    _lean_process()
    import trio

    from spoold import config, daemon, host, logs

    cfg = host.resolve(config.load(path))
    logs.configure(cfg.log_level, cfg.log_format)
    import structlog

    log = structlog.get_logger()
    try:
        trio.run(daemon.run, cfg)
    except SpooldError as exc:
        log.error("fatal", error=str(exc))
        return EXIT_FAILED
    except OSError as exc:
        log.error("fatal", error=str(exc))
        return EXIT_FAILED
    except BaseExceptionGroup as group:
        log.error("fatal", error="; ".join(str(e) for e in _leaves(group)))
        return EXIT_FAILED
    return EXIT_OK


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterable[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def send(socket_path: str, files: Sequence[str], out: BinaryIO | None = None) -> int:
    """Stream the files (or stdin) to the daemon, half-close, print its JSON answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        print(f"spoold send: cannot connect to {socket_path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        sources: list[BinaryIO] = []
        try:
            sources = [open(f, "rb") for f in files] if files else [sys.stdin.buffer]
        except OSError as exc:
            print(f"spoold send: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        last = b"\n"
        for src in sources:
            if last and not last.endswith(b"\n"):
                sock.sendall(b"\n")  # files are separate: never glue the last line of one to the next
            while chunk := src.read(SEND_CHUNK):
                sock.sendall(chunk)
                last = chunk
            if src is not sys.stdin.buffer:
                src.close()
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(SEND_ANSWER_TIMEOUT)
        answer = b""
        while not answer.endswith(b"\n"):
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    except OSError as exc:
        print(f"spoold send: connection failed: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        sock.close()
    try:
        result = json.loads(answer)
        if isinstance(result, dict) and "error" in result:  # refused, or closed before our end
            print(f"spoold send: the daemon closed the connection: {result['error']}", file=sys.stderr)
            (out or sys.stdout.buffer).write(answer)
            return EXIT_FAILED
        int(result["accepted"])
        rejected = int(result["rejected"])
    except (ValueError, KeyError, TypeError):
        print("spoold send: no acknowledgement from the daemon: lines may not be durable", file=sys.stderr)
        return EXIT_FAILED
    (out or sys.stdout.buffer).write(answer)
    (out or sys.stdout.buffer).flush()
    return EXIT_OK if rejected == 0 else EXIT_FAILED
