"""The configuration file, parsed once into frozen, nested dataclasses.

The file's keys are flat (each [[destination]] is one table, as users and tools write it); the
code reads them in groups (socket, files, records, limits, retry, credentials), so that each
part of the daemon is handed the group it uses. Each default is written once, on its dataclass
field; the defaults that follow the kind are computed in Limits.of_kind(). Parsing is pure: it
reads nothing but the TOML text, and spoold.host.resolve() then checks the result against the host.

Every key is checked: an unknown key, a missing required key or a bad value is a ConfigError
whose message names the file and the key (``spoold.toml: destination "app": max_in_flight:
must be an integer from 1 to 64``). Durations may be numbers of seconds or strings such as
"250ms", "10s", "5m", "7d"; sizes may be numbers of bytes or strings such as "512KiB", "1GiB".
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from spoold.errors import ConfigError

_T = TypeVar("_T")

KINDS = ("kinesis", "firehose", "yds")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
MiB = 1024 * 1024
# Room kept for the partition key (at most 256 characters) inside a Kinesis record.
PARTITION_KEY_ROOM = 256
YDS_ENDPOINT = "https://yds.serverless.yandexcloud.net"
YDS_REGION = "ru-central1"
# STS's rules (AssumeRole API reference): what a role ARN, an external id and a session name
# may hold. \w is ASCII there.
ROLE_ARN_RE = re.compile(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}")
EXTERNAL_ID_RE = re.compile(r"[A-Za-z0-9_+=,.@:/-]{2,1224}")
SESSION_NAME_RE = re.compile(r"[A-Za-z0-9_+=,.@-]{2,64}")
SESSION_NAME_MAX = 64

# Service limits per kind (the services' API references): records per request, bytes per
# request, bytes per record. Kinesis' current API allows 10 MiB requests, but 5 MiB is what
# streams and tools have long assumed and still works everywhere, so it is the default.
LIMITS = {
    "kinesis": (500, 5 * MiB, 1 * MiB),
    "yds": (500, 5 * 1000 * 1000, 1000 * 1000),
    "firehose": (500, 4 * MiB, 1000 * 1024),
}

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


@dataclass(frozen=True)
class SpoolConfig:
    path: Path
    synchronous: str = "full"
    page_size: int = 16384
    max_bytes: int = 1024 * MiB
    when_full: str = "block"
    max_age: float = 7 * 86400.0


@dataclass(frozen=True)
class SocketConfig:
    """Where a destination listens (keys socket, socket_type, socket_mode, socket_group)."""

    path: Path
    type: str = "stream"
    mode: int = 0o660
    group: str | None = None


@dataclass(frozen=True)
class FilesConfig:
    """The log files a destination follows (keys files, start_at); no paths: none."""

    paths: tuple[str, ...] = ()
    start_at: str = "end"


@dataclass(frozen=True)
class RecordConfig:
    """How lines become records: what the encoder needs besides the sizes."""

    delimiter: bytes = b""
    pack_lines: bool = False
    partition_key_field: str | None = None
    explicit_hash_key: str | None = None
    ordered: bool = False
    aggregation: str = "none"


@dataclass(frozen=True)
class Limits:
    """Sizes of lines, records and requests, and how many requests go at once.

    The sizes have no default here: they follow the kind (LIMITS) and each other, in of_kind().
    """

    max_records_per_request: int
    max_request_bytes: int
    max_record_bytes: int
    max_line_bytes: int
    max_in_flight: int = 8
    linger: float = 0.2
    request_timeout: float = 30.0

    @classmethod
    def of_kind(cls, kind: str, records: RecordConfig = RecordConfig(), **given: Any) -> Limits:
        """The limits of ``kind`` with the ``given`` values in place of the defaults; the
        defaults left follow the given ones (max_line_bytes leaves room in max_record_bytes)."""
        max_records, max_request, max_record = LIMITS[kind]
        max_record = given.setdefault("max_record_bytes", max_record)
        given.setdefault("max_records_per_request", max_records)
        # KPL: one aggregate (about 10,000 short lines) per request by default. More, smaller
        # requests run side by side within the 12 MiB of lines a destination leases, and fewer
        # multi-MiB bodies sit in memory: measured +20% lines/s and -40 MiB RSS against 5 MiB.
        given.setdefault("max_request_bytes", max_record if records.aggregation == "kpl" else max_request)
        given.setdefault("max_line_bytes", max_record - line_room(kind, records))
        return cls(**given)


def line_room(kind: str, records: RecordConfig) -> int:
    """Bytes of a record that are not the line: the delimiter, or room for the partition key."""
    return len(records.delimiter) if kind == "firehose" else PARTITION_KEY_ROOM


@dataclass(frozen=True)
class RetryConfig:
    """The backoff (keys retry_base, retry_cap_throttle, retry_cap)."""

    base: float = 0.1
    cap_throttle: float = 5.0
    cap: float = 60.0


@dataclass(frozen=True)
class CredentialConfig:
    """Who signs (keys profile, role_arn, external_id, role_session_name); none: the default chain."""

    profile: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    role_session_name: str | None = None  # with role_arn: spoold.host.resolve() fills in spoold-<hostname>


@dataclass(frozen=True)
class Destination:
    """One [[destination]]. ``region`` and ``endpoint_url`` are empty when the file leaves them
    to the AWS region chain, until spoold.host.resolve() fills them in."""

    name: str
    kind: str
    stream: str
    region: str
    endpoint_url: str
    limits: Limits
    stream_arn: str | None = None
    socket: SocketConfig | None = None
    files: FilesConfig = FilesConfig()
    records: RecordConfig = RecordConfig()
    retry: RetryConfig = RetryConfig()
    credentials: CredentialConfig = CredentialConfig()

    @property
    def signing_service(self) -> str:
        return "firehose" if self.kind == "firehose" else "kinesis"


@dataclass(frozen=True)
class Config:
    path: Path
    spool: SpoolConfig
    destinations: tuple[Destination, ...]
    shutdown_grace: float = 10.0
    sender: str = "inline"
    log_level: str = "info"
    log_format: str = "auto"
    control_socket: Path | None = None
    metrics_listen: tuple[str, int] | None = None


# The keys of a [[destination]]: the file format stays flat, whatever groups the code uses.
DESTINATION_KEYS = frozenset({
    "name", "kind", "stream", "stream_arn", "folder", "database", "region", "endpoint_url",
    "socket", "socket_type", "socket_mode", "socket_group", "files", "start_at",
    "delimiter", "pack_lines", "partition_key_field", "explicit_hash_key", "ordered", "aggregation",
    "max_records_per_request", "max_request_bytes", "max_record_bytes", "max_line_bytes",
    "max_in_flight", "linger", "request_timeout", "retry_base", "retry_cap_throttle", "retry_cap",
    "profile", "role_arn", "external_id", "role_session_name",
})


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file; raise ConfigError naming the file and the key.

    Nothing of the host is consulted: spoold.host.resolve() does that."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return parse(doc, path)


def _build(cls: type[_T], **values: Any) -> _T:
    """``cls`` from the values the file gives; a value it leaves out (None) takes the field's default."""
    return cls(**{k: v for k, v in values.items() if v is not None})


def parse(doc: dict[str, Any], path: Path) -> Config:
    """A parsed TOML document as a Config. Pure: no environment, groups, files or botocore."""
    top = _Table(doc, f"{path}:", "")
    top.allow("spool", "destination", "daemon", "log", "control", "metrics")

    spool_t = top.table("spool", required=True)
    spool_t.known({f.name for f in fields(SpoolConfig)})
    spool = _build(
        SpoolConfig,
        path=Path(spool_t.string("path", required=True)),
        synchronous=spool_t.choice("synchronous", ("full", "normal")),
        page_size=_page_size(spool_t),
        max_bytes=spool_t.size("max_bytes", minimum=MiB),
        when_full=spool_t.choice("when_full", ("block", "drop_oldest", "reject")),
        max_age=spool_t.duration("max_age", minimum=1.0),
    )
    spool_t.done()

    daemon_t, log_t, control_t, metrics_t = (top.table(n) for n in ("daemon", "log", "control", "metrics"))
    settings = {
        "shutdown_grace": daemon_t.duration("shutdown_grace", minimum=0.0),
        "sender": daemon_t.choice("sender", ("inline", "process")),
        "log_level": log_t.choice("level", ("debug", "info", "warning", "error")),
        "log_format": log_t.choice("format", ("auto", "json", "console")),
        "control_socket": Path(control_t.string("socket", default=str(spool.path.parent / "control.sock"))),
        "metrics_listen": _listen(metrics_t),
    }
    for t in (daemon_t, log_t, control_t, metrics_t):
        t.done()

    items = doc.get("destination")
    if items is None:
        raise ConfigError(f"{path}: [[destination]]: at least one destination is required")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{path}: destination: must be an array of tables ([[destination]])")
    if not items:
        raise ConfigError(f"{path}: [[destination]]: at least one destination is required")
    dests = tuple(_destination(_Table(i, f"{path}:", f"destination[{n}].")) for n, i in enumerate(items))

    seen_names: set[str] = set()
    for n, d in enumerate(dests):
        if d.name in seen_names:
            raise ConfigError(f'{path}: destination[{n}].name: "{d.name}" is used by another destination')
        seen_names.add(d.name)
    for d in dests:
        _check_files(path, spool.path, d)
    return _build(Config, path=path, spool=spool, destinations=dests, **settings)


def _page_size(t: _Table) -> int | None:
    size = t.size("page_size", minimum=4096)
    if size is not None and (size > 65536 or size & (size - 1)):
        raise t.error("page_size", "must be a power of two from 4096 to 65536 bytes")
    return size


def _listen(t: _Table) -> tuple[str, int] | None:
    listen = t.string("listen")
    if listen is None:
        return None
    m = re.fullmatch(r"\[?([0-9A-Za-z.:-]+?)\]?:([0-9]{1,5})", listen)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise t.error("listen", 'must be "HOST:PORT", such as "127.0.0.1:9464"')
    return (m.group(1), int(m.group(2)))


def _check_files(path: Path, spool: Path, dest: Destination) -> None:
    """Following the spool's own files would feed the spool into itself."""
    own = [os.path.abspath(spool) + suffix for suffix in ("", "-wal", "-shm", ".lock")]
    for pattern in dest.files.paths:
        hit = next((f for f in own if fnmatch.fnmatchcase(f, pattern)), None)
        if hit is not None:
            raise ConfigError(f'{path}: destination "{dest.name}": files: {pattern} matches {hit}, '
                              "a file of the spool ([spool].path)")


def _destination(t: _Table) -> Destination:
    t.known(DESTINATION_KEYS)
    name = t.string("name", required=True)
    if not NAME_RE.match(name):
        raise t.error("name", "must match [A-Za-z0-9_.-]+")
    t.label = f'destination "{name}": '
    kind = t.choice("kind", KINDS)
    if kind is None:
        raise t.error("kind", f"required, one of {', '.join(KINDS)}")
    credentials = _credentials(t, kind)
    files = _files(t)
    socket = _socket(t, files)
    stream, stream_arn, region, endpoint_url = _stream(t, kind)
    records = _records(t, kind)
    dest = Destination(
        name=name, kind=kind, stream=stream, stream_arn=stream_arn, region=region, endpoint_url=endpoint_url,
        socket=socket, files=files, records=records, limits=_limits(t, kind, records),
        retry=_build(
            RetryConfig,
            base=t.duration("retry_base", minimum=0.001, maximum=60.0),
            cap_throttle=t.duration("retry_cap_throttle", minimum=0.001, maximum=3600.0),
            cap=t.duration("retry_cap", minimum=0.001, maximum=3600.0),
        ),
        credentials=credentials,
    )
    t.done()
    return dest


def _socket(t: _Table, files: FilesConfig) -> SocketConfig | None:
    path = t.string("socket")
    if path is None and not files.paths:
        raise t.error("socket", "required (or files, to follow log files)")
    if path == "":
        raise t.error("socket", "must not be empty")
    socket_type = t.choice("socket_type", ("stream", "datagram"))
    mode = t.string("socket_mode")
    if mode is not None and not re.fullmatch(r"0?[0-7]{3}", mode):
        raise t.error("socket_mode", 'must be an octal string such as "0660"')
    group = t.string("socket_group")
    if path is None:
        return None
    return _build(SocketConfig, path=Path(path), type=socket_type, mode=None if mode is None else int(mode, 8),
                  group=group)


def _stream(t: _Table, kind: str) -> tuple[str, str | None, str, str]:
    """stream, stream_arn, region and endpoint_url; region and endpoint_url are empty when only
    the host can tell (spoold.host.resolve())."""
    stream = t.string("stream")
    if kind == "kinesis":
        stream_arn = t.string("stream_arn")
    else:
        t.forbid("stream_arn", "kinesis")
        stream_arn = None
    region = t.string("region", default="")
    endpoint_url = t.string("endpoint_url", default="")

    if kind == "yds":
        folder = t.string("folder")
        database = t.string("database")
        if stream is None:
            raise t.error("stream", "required")
        if not stream.startswith("/"):
            if folder is None or database is None:
                raise t.error(
                    "folder" if folder is None else "database",
                    'required for kind = "yds" unless stream is a full "/region/folder/database/stream" path',
                )
            stream = f"/{region or YDS_REGION}/{folder}/{database}/{stream}"
        elif folder is not None or database is not None:
            raise t.error("folder" if folder is not None else "database", 'not allowed when stream starts with "/"')
        region = region or YDS_REGION
        endpoint_url = endpoint_url or YDS_ENDPOINT
    else:
        t.forbid("folder", "yds")
        t.forbid("database", "yds")
        if kind == "kinesis" and stream_arn is not None:
            if stream is not None:
                raise t.error("stream_arn", "set either stream or stream_arn, not both")
            m = re.fullmatch(r"arn:aws[a-z-]*:kinesis:([a-z0-9-]+):\d{12}:stream/([A-Za-z0-9_.-]+)", stream_arn)
            if not m:
                raise t.error("stream_arn", "must look like arn:aws:kinesis:REGION:ACCOUNT:stream/NAME")
            region = region or m.group(1)
            stream = m.group(2)
        if stream is None:
            raise t.error("stream", "required" + (" (or stream_arn)" if kind == "kinesis" else ""))
        if region and not endpoint_url:
            endpoint_url = aws_endpoint(kind, region)
    if endpoint_url and not re.match(r"^https?://[^/\s]+", endpoint_url):
        raise t.error("endpoint_url", "must be an http:// or https:// URL")
    return stream, stream_arn, region, endpoint_url.rstrip("/")


def aws_endpoint(kind: str, region: str) -> str:
    suffix = ".amazonaws.com.cn" if region.startswith("cn-") else ".amazonaws.com"
    return f"https://{kind}.{region}{suffix}"


def _records(t: _Table, kind: str) -> RecordConfig:
    if kind == "firehose":
        for key in ("partition_key_field", "explicit_hash_key", "ordered", "aggregation"):
            t.forbid(key, "kinesis or yds")
        return _build(RecordConfig, delimiter=t.string("delimiter", default="\n").encode("utf-8"),
                      pack_lines=t.boolean("pack_lines"))
    t.forbid("delimiter", "firehose")
    t.forbid("pack_lines", "firehose")
    ehk = t.string("explicit_hash_key")
    if ehk is not None and not (ehk.isascii() and ehk.isdigit() and int(ehk) < 2**128):
        raise t.error("explicit_hash_key", "must be a decimal integer from 0 to 2**128-1")
    records = _build(RecordConfig, partition_key_field=t.string("partition_key_field"), explicit_hash_key=ehk,
                     ordered=t.boolean("ordered"), aggregation=t.choice("aggregation", ("none", "kpl")))
    if records.ordered and records.aggregation != "none":
        raise t.error("aggregation", "cannot be combined with ordered = true")
    return records


def _limits(t: _Table, kind: str, records: RecordConfig) -> Limits:
    given = {
        "max_records_per_request": t.integer("max_records_per_request", 1, 500),
        "max_record_bytes": t.size("max_record_bytes", minimum=1024),
        "max_request_bytes": t.size("max_request_bytes", minimum=0),
        "max_line_bytes": t.size("max_line_bytes", minimum=1),
        "max_in_flight": t.integer("max_in_flight", 1, 64),
        "linger": t.duration("linger", minimum=0.0, maximum=60.0),
        "request_timeout": t.duration("request_timeout", minimum=0.1, maximum=600.0),
    }
    limits = Limits.of_kind(kind, records, **{k: v for k, v in given.items() if v is not None})
    record = limits.max_record_bytes
    if given["max_request_bytes"] is not None and limits.max_request_bytes < record:
        raise t.error("max_request_bytes", f"must be at least {record} bytes")
    room = line_room(kind, records)
    if room >= record:  # else the default max_line_bytes is 0 or less and every line is refused
        raise t.error("delimiter", f"must be shorter than max_record_bytes ({record} bytes)")
    if limits.max_line_bytes + room > record:
        raise t.error("max_line_bytes", f"must leave {room} bytes of max_record_bytes ({record}) free")
    return limits


def _files(t: _Table) -> FilesConfig:
    """``files`` (absolute paths or globs of log files to follow) and ``start_at``."""
    value = t._get("files")
    paths: tuple[str, ...] | None = None
    if value is not None:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise t.error("files", 'must be a non-empty list of paths or globs, such as ["/var/log/app/*.log"]')
        for v in value:
            if not v.startswith("/") or "\0" in v:
                raise t.error("files", f"{v!r} is not an absolute path")
            if v.endswith("/"):
                raise t.error("files", f"{v!r} names a folder: give the files, such as {v}*.log")
        paths = tuple(dict.fromkeys(value))
    start_at = t.choice("start_at", ("end", "beginning"))
    if start_at is not None and paths is None:
        raise t.error("start_at", "only valid with files")
    return _build(FilesConfig, paths=paths, start_at=start_at)


def _credentials(t: _Table, kind: str) -> CredentialConfig:
    """profile, role_arn, external_id, role_session_name, as written (spoold.host.resolve() checks the profile)."""
    profile = t.string("profile")
    if kind == "yds":  # Yandex Data Streams takes static keys only: there is no STS to ask
        for key in ("role_arn", "external_id", "role_session_name"):
            t.forbid(key, "kinesis or firehose")
    role_arn = t.string("role_arn")
    external_id = t.string("external_id")
    session_name = t.string("role_session_name")
    if role_arn is None:
        for key, value in (("external_id", external_id), ("role_session_name", session_name)):
            if value is not None:
                raise t.error(key, "only valid with role_arn")
        return CredentialConfig(profile=profile)
    if not ROLE_ARN_RE.fullmatch(role_arn):
        raise t.error("role_arn", "must look like arn:aws:iam::123456789012:role/NAME")
    if external_id is not None and not EXTERNAL_ID_RE.fullmatch(external_id):
        raise t.error("external_id", "must be 2 to 1224 characters of A-Z a-z 0-9 _+=,.@:/-")
    if session_name is not None and not SESSION_NAME_RE.fullmatch(session_name):
        raise t.error("role_session_name", "must be 2 to 64 characters of A-Z a-z 0-9 _+=,.@-")
    return CredentialConfig(profile, role_arn, external_id, session_name)


def default_session_name(hostname: str) -> str:
    """``spoold-<hostname>`` within STS's rules for RoleSessionName."""
    name = "spoold-" + re.sub(r"[^A-Za-z0-9_+=,.@-]", "-", hostname)
    return name[:SESSION_NAME_MAX]


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m|h|d)\s*", value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError('expected seconds or a string such as "250ms", "10s", "5m", "7d"')


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS | {"": 1}:
            return int(float(m.group(1)) * _SIZE_UNITS.get(m.group(2).lower(), 1))
    raise ValueError('expected bytes or a string such as "512KiB", "4MiB", "1GiB"')


class _Table:
    """One TOML table being read; remembers which keys were used so leftovers are errors."""

    def __init__(self, data: dict[str, Any], prefix: str, where: str) -> None:
        self.data = data
        self.prefix = prefix
        self.where = where
        self.label = ""
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.prefix} {self.label or self.where}{key}: {message}")

    def allow(self, *keys: str) -> None:
        self.used.update(keys)
        self.done()

    def done(self) -> None:
        for key in self.data:
            if key not in self.used:
                raise self.error(key, "unknown key")

    def known(self, keys: Collection[str]) -> None:
        # Checked before any value: a misspelt key would otherwise surface as "required" for the
        # key it was meant to be ("region: required" when the file says "regoin").
        for key in self.data:
            if key not in keys:
                raise self.error(key, "unknown key")

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def table(self, key: str, required: bool = False) -> _Table:
        value = self._get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.prefix} [{key}]: required section is missing")
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.prefix} [{key}]: must be a table")
        return _Table(value, self.prefix, f"[{key}].")

    def forbid(self, key: str, kinds: str) -> None:
        if key in self.data:
            raise self.error(key, f"only valid for kind {kinds}")

    def string(self, key: str, required: bool = False, default: Any = None) -> Any:
        value = self._get(key)
        if value is None:
            if required:
                raise self.error(key, "required")
            return default
        if not isinstance(value, str):
            raise self.error(key, "must be a string")
        if required and not value:
            raise self.error(key, "must not be empty")
        return value

    def boolean(self, key: str, default: bool | None = None) -> bool | None:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def integer(self, key: str, low: int, high: int, default: int | None = None) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"must be an integer from {low} to {high}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str | None = None) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if value not in options:
            raise self.error(key, f"must be one of {', '.join(repr(o) for o in options)}")
        return value

    def duration(self, key: str, minimum: float, maximum: float = float("inf"),
                 default: float | None = None) -> float | None:
        value = self._get(key)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if not minimum <= seconds <= maximum:
            raise self.error(key, f"must be between {minimum:g} and {maximum:g} seconds")
        return seconds

    def size(self, key: str, minimum: int, default: int | None = None) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if size < minimum:
            raise self.error(key, f"must be at least {minimum} bytes")
        return size
