"""The daemon's status snapshot, built in one place, and its pure renderings: a table for people,
Prometheus text for scrapers. The snapshot is the JSON the control socket answers (``spoold
status --json``); without a running daemon, ``spoold status`` builds it from the spool file alone
(``running`` false, and only the fields the file can tell)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Live:
    """What only a running daemon knows, for :func:`build_snapshot`."""

    version: str
    pid: int
    uptime: float
    spool: Mapping[str, Any]  # max_bytes, when_full, write_errors, last_error, bytes
    dropped: Mapping[str, int]
    expired: Mapping[str, int]
    # Per configured destination: kind, stream, socket, ingest and flusher counters, rates.
    configured: Mapping[str, Mapping[str, Any]]
    sender: Mapping[str, Any] | None = None
    # Per listening surface ("control", "metrics"): accepted, refused, bad_requests, ...
    listeners: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


def build_snapshot(*, now: float, path: str, page_size: int, held: Mapping[str, tuple[int, int]],
                   summary: Mapping[str, tuple[float | None, int]], live: Live | None = None) -> dict[str, Any]:
    """The status snapshot. ``held``: destination -> (lines, bytes) in the spool; ``summary``:
    destination -> (oldest row's creation time, dead letters); ``live`` is None offline."""
    names = set(held) | set(summary) | (set(live.configured) if live else set())
    dests: dict[str, Any] = {}
    for name in sorted(names):
        lines, nbytes = held.get(name, (0, 0))
        oldest, dead = summary.get(name, (None, 0))
        d: dict[str, Any] = {
            "spooled_lines": lines,
            "spooled_bytes": nbytes,
            "oldest_age": max(0.0, now - oldest) if oldest is not None else None,
            "dead_letters": dead,
        }
        if live is not None:
            d.update(dropped=live.dropped.get(name, 0), expired=live.expired.get(name, 0),
                     configured=name in live.configured)
            d.update(live.configured.get(name, {}))
        dests[name] = d
    spool: dict[str, Any] = {"path": path, "bytes": sum(b for _, b in held.values()), "page_size": page_size}
    if live is None:
        return {"running": False, "spool": spool, "destinations": dests}
    spool.update(live.spool)
    return {
        "running": True,
        "version": live.version,
        "pid": live.pid,
        "uptime": round(live.uptime, 1),
        "spool": spool,
        "destinations": dests,
        "sender": dict(live.sender) if live.sender is not None else None,
        "listeners": {k: dict(v) for k, v in live.listeners.items()},
    }

# Gauges and counters exported per destination: (snapshot field, metric name, type, help).
_METRICS = [
    ("spooled_lines", "spoold_spool_lines", "gauge", "Lines waiting in the spool."),
    ("spooled_bytes", "spoold_spool_bytes", "gauge", "Bytes of lines waiting in the spool."),
    ("oldest_age", "spoold_oldest_line_age_seconds", "gauge", "Age of the oldest unsent line (0 when none)."),
    ("lines_in", "spoold_lines_received_total", "counter", "Lines accepted from clients and made durable."),
    ("lines_sent", "spoold_lines_sent_total", "counter", "Lines the service accepted."),
    ("records_sent", "spoold_records_sent_total", "counter", "Records the service accepted."),
    ("requests", "spoold_requests_total", "counter", "Requests sent to the service."),
    ("retried_records", "spoold_records_retried_total", "counter", "Records resent after a per-record failure."),
    ("dropped", "spoold_lines_dropped_total", "counter", "Lines dropped by when_full = drop_oldest."),
    ("expired", "spoold_lines_expired_total", "counter", "Lines dropped for exceeding max_age."),
    ("dead_letters", "spoold_dead_letters", "gauge", "Lines in the dead-letter table."),
    ("in_flight", "spoold_requests_in_flight", "gauge", "Requests in flight."),
    ("pace_records_per_s", "spoold_pace_records_per_second", "gauge",
     "Current send pace (records/s at the recent record size), learned from throttling."),
    ("throttled_records", "spoold_records_throttled_total", "counter",
     "Records the service throttled (ProvisionedThroughputExceeded and whole-request throttles)."),
    ("pace_wait_seconds", "spoold_pace_wait_seconds_total", "counter",
     "Seconds records waited for the pace before being sent."),
    ("pace_shards", "spoold_pace_shards", "gauge",
     "Shards paced one by one (0: the destination is paced as a whole, no shard map)."),
]

# Counters of the control socket and the metrics port: (field, metric name, help).
_LISTENER_METRICS = [
    ("accepted", "spoold_listener_connections_total", "Connections accepted, by listener."),
    ("refused", "spoold_listener_refused_total",
     "Connections closed at once because the listener had its maximum open."),
    ("bad_requests", "spoold_listener_bad_requests_total", "Requests answered with an error."),
    ("timeouts", "spoold_listener_timeouts_total", "Connections closed for sending no request in time."),
]


def render_table(snap: dict[str, Any]) -> str:
    """A readable table, one row per destination."""
    head = ["DESTINATION", "KIND", "SPOOLED", "BYTES", "OLDEST", "IN/s", "OUT/s", "PACE/s", "SENT", "RETRIED",
            "THROTTLED", "REJECTED", "LAST ERROR"]
    rows = [head]
    for name, d in sorted(snap.get("destinations", {}).items()):
        rows.append([
            name, d.get("kind", "?"), str(d.get("spooled_lines", 0)), _size(d.get("spooled_bytes", 0)),
            _age(d.get("oldest_age")), f"{d.get('lines_in_per_s', 0):.0f}", f"{d.get('lines_out_per_s', 0):.0f}",
            _pace(d), str(d.get("lines_sent", 0)), str(d.get("retried_records", 0)), str(d.get("throttled_records", 0)),
            str(sum((d.get("rejected") or {}).values())), _last_error(d),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    source = "running daemon" if snap.get("running") else "spool file (daemon not running)"
    spool = snap.get("spool", {})
    footer = f"spool {spool.get('path', '?')}: {_size(spool.get('bytes', 0))} ({source})"
    failures = [f"  {n}: " + ", ".join(f"{k}={v}" for k, v in sorted(d["failures"].items()))
                for n, d in sorted(snap.get("destinations", {}).items()) if d.get("failures")]
    if failures:
        footer += "\nfailures by error code:\n" + "\n".join(failures)
    identities = [f"  {n}: {_identity(d['identity'])}"
                  for n, d in sorted(snap.get("destinations", {}).items()) if d.get("identity")]
    if identities:
        footer += "\nsigning as:\n" + "\n".join(identities)
    followed = [f"  {n}: {f['path']} at {f['offset']} of {f['size']} ({_size(f.get('lag_bytes') or 0)} behind, "
                f"read {_age(time.time() - f['last_read']) + ' ago' if f.get('last_read') else 'never'}"
                + (", parked)" if f.get("state") == "parked" else ")")
                for n, d in sorted(snap.get("destinations", {}).items()) for f in d.get("files") or ()]
    if followed:
        footer += "\nfollowed files:\n" + "\n".join(followed)
    return "\n".join(line.rstrip() for line in lines) + "\n" + footer + "\n"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _pace(d: dict[str, Any]) -> str:
    pace = d.get("pace_records_per_s")
    if pace is None:
        return "-"
    shards = d.get("pace_shards")
    return f"{pace:.0f}" + ("+" if d.get("pace_slow_start") else "") + (f"/{shards}sh" if shards else "")


def _last_error(d: dict[str, Any]) -> str:
    err = d.get("last_error") or ""
    if not err:
        return "-"
    at = d.get("last_error_at")
    return f"{err[:80]} ({_age(time.time() - at)} ago)" if at else err[:80]


def _identity(identity: dict[str, Any]) -> str:
    parts = [f"key {identity['access_key']}" if identity.get("access_key") else "key not known yet"]
    parts += [f"{label} {identity[field]}" for field, label in
              (("profile", "profile"), ("role_arn", "role"), ("method", "from")) if identity.get(field)]
    return ", ".join(parts)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(snap: dict[str, Any]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []
    dests = snap.get("destinations", {})
    for field, metric, kind, help_ in _METRICS:
        out.append(f"# HELP {metric} {help_}")
        out.append(f"# TYPE {metric} {kind}")
        for name, d in sorted(dests.items()):
            value = d.get(field) or 0
            out.append(f'{metric}{{destination="{_escape(name)}"}} {float(value):.17g}')
    out.append("# HELP spoold_failures_total Failed requests or records, by error code.")
    out.append("# TYPE spoold_failures_total counter")
    for name, d in sorted(dests.items()):
        for code, n in sorted((d.get("failures") or {}).items()):
            out.append(f'spoold_failures_total{{destination="{_escape(name)}",code="{_escape(code)}"}} {n}')
    out.append("# HELP spoold_lines_rejected_total Lines refused at the socket, by reason.")
    out.append("# TYPE spoold_lines_rejected_total counter")
    for name, d in sorted(dests.items()):
        for reason, n in sorted((d.get("rejected") or {}).items()):
            out.append(f'spoold_lines_rejected_total{{destination="{_escape(name)}",reason="{_escape(reason)}"}} {n}')
    for key, metric, help_ in (("offset", "spoold_file_offset_bytes", "Where a followed file was read up to."),
                               ("size", "spoold_file_size_bytes", "Size of a followed file."),
                               ("lag_bytes", "spoold_file_lag_bytes", "Bytes of a followed file not read yet."),
                               ("last_read", "spoold_file_last_read_timestamp_seconds",
                                "When lines were last read from a followed file.")):
        out.append(f"# HELP {metric} {help_}")
        out.append(f"# TYPE {metric} gauge")
        for name, d in sorted(dests.items()):
            for f in d.get("files") or ():
                out.append(f'{metric}{{destination="{_escape(name)}",path="{_escape(f["path"])}"}} '
                           f'{float(f.get(key) or 0):.17g}')
    out.append("# HELP spoold_connections_closed_total Writers' connections the daemon refused or closed, by reason.")
    out.append("# TYPE spoold_connections_closed_total counter")
    for name, d in sorted(dests.items()):
        for reason, n in sorted((d.get("connections_closed") or {}).items()):
            out.append(f'spoold_connections_closed_total{{destination="{_escape(name)}",reason="{_escape(reason)}"}} {n}')
    spool = snap.get("spool", {})
    out.append("# HELP spoold_spool_total_bytes Bytes of lines in the spool, all destinations.")
    out.append("# TYPE spoold_spool_total_bytes gauge")
    out.append(f"spoold_spool_total_bytes {spool.get('bytes', 0)}")
    out.append("# HELP spoold_spool_write_errors_total Failed spool commits (disk full, I/O errors).")
    out.append("# TYPE spoold_spool_write_errors_total counter")
    out.append(f"spoold_spool_write_errors_total {spool.get('write_errors', 0)}")
    listeners = snap.get("listeners") or {}
    for field_, metric, help_ in _LISTENER_METRICS:
        out.append(f"# HELP {metric} {help_}")
        out.append(f"# TYPE {metric} counter")
        for name, counts in sorted(listeners.items()):
            out.append(f'{metric}{{listener="{_escape(name)}"}} {counts.get(field_, 0)}')
    return "\n".join(out) + "\n"
