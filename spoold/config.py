"""The configuration file, parsed once into frozen dataclasses.

Every key is checked: an unknown key, a missing required key or a bad value is a ConfigError
whose message names the file and the key (``spoold.toml: destination "app": max_in_flight:
must be an integer from 1 to 64``). Durations may be numbers of seconds or strings such as
"250ms", "10s", "5m", "7d"; sizes may be numbers of bytes or strings such as "512KiB", "1GiB".
"""

from __future__ import annotations

import fnmatch
import grp
import os
import re
import socket as stdsocket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from spoold.errors import ConfigError

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
    page_size: int = 4096
    max_bytes: int = 1024 * MiB
    when_full: str = "block"
    max_age: float = 7 * 86400.0


@dataclass(frozen=True)
class Destination:
    name: str
    kind: str
    socket: Path | None
    stream: str
    region: str
    endpoint_url: str
    stream_arn: str | None = None
    socket_type: str = "stream"
    socket_mode: int = 0o660
    socket_group: str | None = None
    partition_key_field: str | None = None
    explicit_hash_key: str | None = None
    ordered: bool = False
    aggregation: str = "none"
    delimiter: bytes = b"\n"
    pack_lines: bool = False
    max_records_per_request: int = 500
    max_request_bytes: int = 5 * MiB
    max_record_bytes: int = 1 * MiB
    max_line_bytes: int = 1 * MiB - PARTITION_KEY_ROOM
    max_in_flight: int = 8
    linger: float = 0.2
    request_timeout: float = 30.0
    retry_base: float = 0.1
    retry_cap_throttle: float = 5.0
    retry_cap: float = 60.0
    profile: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    role_session_name: str | None = None
    files: tuple[str, ...] = ()
    start_at: str = "end"

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


def load(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Config:
    """Read and validate the config file; raise ConfigError naming the file and the key."""
    path = Path(path)
    env = dict(os.environ if environ is None else environ)
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
    return parse(doc, path, env)


def group_id(group: str) -> int:
    """The id of a group given by name or number; KeyError (or ValueError, for a name that
    cannot be one, e.g. with a NUL) when no such group exists."""
    if re.fullmatch(r"[0-9]+", group):
        return int(group)
    return grp.getgrnam(group).gr_gid


def _page_size(t: _Table) -> int:
    size = t.size("page_size", 4096, minimum=4096)
    if size > 65536 or size & (size - 1):
        raise t.error("page_size", "must be a power of two from 4096 to 65536 bytes")
    return size


def parse(doc: dict[str, Any], path: Path, env: dict[str, str]) -> Config:
    top = _Table(doc, f"{path}:", "")
    top.allow("spool", "destination", "daemon", "log", "control", "metrics")

    spool_t = top.table("spool", required=True)
    spool_t.known({f.name for f in fields(SpoolConfig)})
    spool = SpoolConfig(
        path=Path(spool_t.string("path", required=True)),
        synchronous=spool_t.choice("synchronous", ("full", "normal"), "full"),
        page_size=_page_size(spool_t),
        max_bytes=spool_t.size("max_bytes", 1024 * MiB, minimum=MiB),
        when_full=spool_t.choice("when_full", ("block", "drop_oldest", "reject"), "block"),
        max_age=spool_t.duration("max_age", 7 * 86400.0, minimum=1.0),
    )
    spool_t.done()

    daemon_t = top.table("daemon")
    grace = daemon_t.duration("shutdown_grace", 10.0, minimum=0.0)
    sender = daemon_t.choice("sender", ("inline", "process"), "inline")
    daemon_t.done()

    log_t = top.table("log")
    level = log_t.choice("level", ("debug", "info", "warning", "error"), "info")
    fmt = log_t.choice("format", ("auto", "json", "console"), "auto")
    log_t.done()

    control_t = top.table("control")
    control = Path(control_t.string("socket", default=str(spool.path.parent / "control.sock")))
    control_t.done()

    metrics_t = top.table("metrics")
    listen = metrics_t.string("listen", default=None)
    metrics: tuple[str, int] | None = None
    if listen is not None:
        m = re.fullmatch(r"\[?([0-9A-Za-z.:-]+?)\]?:([0-9]{1,5})", listen)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise metrics_t.error("listen", 'must be "HOST:PORT", such as "127.0.0.1:9464"')
        metrics = (m.group(1), int(m.group(2)))
    metrics_t.done()

    items = doc.get("destination")
    if items is None:
        raise ConfigError(f"{path}: [[destination]]: at least one destination is required")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{path}: destination: must be an array of tables ([[destination]])")
    if not items:
        raise ConfigError(f"{path}: [[destination]]: at least one destination is required")
    dests = tuple(_destination(_Table(i, f"{path}:", f"destination[{n}]."), env) for n, i in enumerate(items))

    seen_names: set[str] = set()
    for n, d in enumerate(dests):
        if d.name in seen_names:
            raise ConfigError(f'{path}: destination[{n}].name: "{d.name}" is used by another destination')
        seen_names.add(d.name)
    _check_socket_paths(path, spool.path, control, dests)
    for d in dests:
        _check_files(path, spool.path, d)
    return Config(path=path, spool=spool, destinations=dests, shutdown_grace=grace,
                  sender=sender, log_level=level,
                  log_format=fmt, control_socket=control, metrics_listen=metrics)


def _check_socket_paths(path: Path, spool: Path, control: Path, dests: tuple[Destination, ...]) -> None:
    """A socket path must name nothing else the daemon owns: replacing a stale socket there, or
    unlinking it at shutdown, would destroy the spool (acknowledged lines) or another socket."""
    def beside(suffix: str) -> str:
        return os.path.realpath(spool.with_name(spool.name + suffix))

    taken = {
        os.path.realpath(spool): "the spool file ([spool].path)",
        beside("-wal"): 'the spool\'s WAL ([spool].path + "-wal")',
        beside("-shm"): 'the spool\'s shared-memory file ([spool].path + "-shm")',
        beside(".lock"): 'the spool\'s lock file ([spool].path + ".lock")',
    }
    sockets = [("[control].socket", "the control socket ([control].socket)", control)]
    sockets += [(f'destination "{d.name}": socket', f'the socket of destination "{d.name}"', d.socket)
                for d in dests if d.socket is not None]
    for key, description, sock in sockets:
        where = os.path.realpath(sock)
        if where in taken:
            raise ConfigError(f"{path}: {key}: {sock} is also {taken[where]}; choose another path")
        taken[where] = description


def _check_files(path: Path, spool: Path, dest: Destination) -> None:
    """Following the spool's own files would feed the spool into itself."""
    own = [os.path.abspath(spool) + suffix for suffix in ("", "-wal", "-shm", ".lock")]
    for pattern in dest.files:
        hit = next((f for f in own if fnmatch.fnmatchcase(f, pattern)), None)
        if hit is not None:
            raise ConfigError(f'{path}: destination "{dest.name}": files: {pattern} matches {hit}, '
                              "a file of the spool ([spool].path)")


def _destination(t: _Table, env: dict[str, str]) -> Destination:
    t.known({f.name for f in fields(Destination)} | {"folder", "database"})
    name = t.string("name", required=True)
    if not NAME_RE.match(name):
        raise t.error("name", "must match [A-Za-z0-9_.-]+")
    t.label = f'destination "{name}": '
    kind = t.choice("kind", KINDS, None)
    if kind is None:
        raise t.error("kind", f"required, one of {', '.join(KINDS)}")
    credentials = _credentials(t, kind, env)
    files, start_at = _files(t)
    socket_s = t.string("socket", default=None)
    if socket_s is None and not files:
        raise t.error("socket", "required (or files, to follow log files)")
    if socket_s == "":
        raise t.error("socket", "must not be empty")
    socket = Path(socket_s) if socket_s is not None else None
    socket_type = t.choice("socket_type", ("stream", "datagram"), "stream")
    mode_s = t.string("socket_mode", default="0660")
    if not re.fullmatch(r"0?[0-7]{3}", mode_s):
        raise t.error("socket_mode", 'must be an octal string such as "0660"')
    socket_group = t.string("socket_group", default=None)
    if socket_group is not None:
        try:
            group_id(socket_group)
        except (KeyError, ValueError):
            raise t.error("socket_group", f"no group {socket_group!r} on this host") from None

    stream = t.string("stream", default=None)
    if kind == "kinesis":
        stream_arn = t.string("stream_arn", default=None)
    else:
        t.forbid("stream_arn", "kinesis")
        stream_arn = None
    region = t.string("region", default=None)
    endpoint_url = t.string("endpoint_url", default=None)

    if kind == "yds":
        folder = t.string("folder", default=None)
        database = t.string("database", default=None)
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
        region = region or _default_region(env, credentials["profile"])
        if region is None:
            raise t.error("region", "required: set it here or in AWS_REGION / AWS_DEFAULT_REGION / the AWS config")
        if endpoint_url is None:
            suffix = ".amazonaws.com.cn" if region.startswith("cn-") else ".amazonaws.com"
            endpoint_url = f"https://{kind}.{region}{suffix}"
    if not re.match(r"^https?://[^/\s]+", endpoint_url):
        raise t.error("endpoint_url", "must be an http:// or https:// URL")

    if kind == "firehose":
        delimiter = t.string("delimiter", default="\n").encode("utf-8")
        pack_lines = t.boolean("pack_lines", False)
    else:
        t.forbid("delimiter", "firehose")
        t.forbid("pack_lines", "firehose")
        delimiter, pack_lines = b"", False
    if kind == "firehose":
        t.forbid("partition_key_field", "kinesis or yds")
        t.forbid("explicit_hash_key", "kinesis or yds")
        t.forbid("ordered", "kinesis or yds")
        t.forbid("aggregation", "kinesis or yds")
        pk_field = ehk = None
        ordered = False
        aggregation = "none"
    else:
        pk_field = t.string("partition_key_field", default=None)
        ehk = t.string("explicit_hash_key", default=None)
        if ehk is not None and not (ehk.isascii() and ehk.isdigit() and int(ehk) < 2**128):
            raise t.error("explicit_hash_key", "must be a decimal integer from 0 to 2**128-1")
        ordered = t.boolean("ordered", False)
        aggregation = t.choice("aggregation", ("none", "kpl"), "none")
        if ordered and aggregation != "none":
            raise t.error("aggregation", "cannot be combined with ordered = true")

    max_records, max_request, max_record = LIMITS[kind]
    max_records = t.integer("max_records_per_request", max_records, 1, 500)
    max_record = t.size("max_record_bytes", max_record, minimum=1024)
    # KPL: one aggregate (about 10,000 short lines) per request by default. More, smaller
    # requests run side by side within the 12 MiB of lines a destination leases, and fewer
    # multi-MiB bodies sit in memory: measured +20% lines/s and -40 MiB RSS against 5 MiB.
    max_request = t.size("max_request_bytes", max_record if aggregation == "kpl" else max_request,
                         minimum=max_record)
    room = len(delimiter) if kind == "firehose" else PARTITION_KEY_ROOM
    if room >= max_record:  # else the default max_line_bytes is 0 or less and every line is refused
        raise t.error("delimiter", f"must be shorter than max_record_bytes ({max_record} bytes)")
    max_line = t.size("max_line_bytes", max_record - room, minimum=1)
    if max_line + room > max_record:
        raise t.error("max_line_bytes", f"must leave {room} bytes of max_record_bytes ({max_record}) free")

    dest = Destination(
        name=name,
        kind=kind,
        socket=socket,
        socket_type=socket_type,
        socket_mode=int(mode_s, 8),
        socket_group=socket_group,
        stream=stream,
        stream_arn=stream_arn,
        region=region,
        endpoint_url=endpoint_url.rstrip("/"),
        partition_key_field=pk_field,
        explicit_hash_key=ehk,
        ordered=ordered,
        aggregation=aggregation,
        delimiter=delimiter,
        pack_lines=pack_lines,
        max_records_per_request=max_records,
        max_request_bytes=max_request,
        max_record_bytes=max_record,
        max_line_bytes=max_line,
        max_in_flight=t.integer("max_in_flight", 8, 1, 64),
        linger=t.duration("linger", 0.2, minimum=0.0, maximum=60.0),
        request_timeout=t.duration("request_timeout", 30.0, minimum=0.1, maximum=600.0),
        retry_base=t.duration("retry_base", 0.1, minimum=0.001, maximum=60.0),
        retry_cap_throttle=t.duration("retry_cap_throttle", 5.0, minimum=0.001, maximum=3600.0),
        retry_cap=t.duration("retry_cap", 60.0, minimum=0.001, maximum=3600.0),
        files=files,
        start_at=start_at,
        **credentials,
    )
    t.done()
    return dest


def _files(t: _Table) -> tuple[tuple[str, ...], str]:
    """``files`` (absolute paths or globs of log files to follow) and ``start_at``."""
    value = t._get("files")
    if value is None:
        files: tuple[str, ...] = ()
    else:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise t.error("files", 'must be a non-empty list of paths or globs, such as ["/var/log/app/*.log"]')
        for v in value:
            if not v.startswith("/") or "\0" in v:
                raise t.error("files", f"{v!r} is not an absolute path")
            if v.endswith("/"):
                raise t.error("files", f"{v!r} names a folder: give the files, such as {v}*.log")
        files = tuple(dict.fromkeys(value))
    start_at = t.choice("start_at", ("end", "beginning"), "end")
    if "start_at" in t.data and not files:
        raise t.error("start_at", "only valid with files")
    return files, start_at


def default_session_name(hostname: str) -> str:
    """``spoold-<hostname>`` within STS's rules for RoleSessionName."""
    name = "spoold-" + re.sub(r"[^A-Za-z0-9_+=,.@-]", "-", hostname)
    return name[:SESSION_NAME_MAX]


def _credentials(t: _Table, kind: str, env: dict[str, str]) -> dict[str, Any]:
    """profile, role_arn, external_id, role_session_name: checked without the network."""
    profile = t.string("profile", default=None)
    if profile is not None:
        _check_profile(t, profile, env)
    if kind == "yds":  # Yandex Data Streams takes static keys only: there is no STS to ask
        for key in ("role_arn", "external_id", "role_session_name"):
            t.forbid(key, "kinesis or firehose")
    role_arn = t.string("role_arn", default=None)
    external_id = t.string("external_id", default=None)
    session_name = t.string("role_session_name", default=None)
    if role_arn is None:
        for key, value in (("external_id", external_id), ("role_session_name", session_name)):
            if value is not None:
                raise t.error(key, "only valid with role_arn")
        return {"profile": profile}
    if not ROLE_ARN_RE.fullmatch(role_arn):
        raise t.error("role_arn", "must look like arn:aws:iam::123456789012:role/NAME")
    if external_id is not None and not EXTERNAL_ID_RE.fullmatch(external_id):
        raise t.error("external_id", "must be 2 to 1224 characters of A-Z a-z 0-9 _+=,.@:/-")
    if session_name is None:
        session_name = default_session_name(stdsocket.gethostname())
    elif not SESSION_NAME_RE.fullmatch(session_name):
        raise t.error("role_session_name", "must be 2 to 64 characters of A-Z a-z 0-9 _+=,.@-")
    return {"profile": profile, "role_arn": role_arn, "external_id": external_id,
            "role_session_name": session_name}


def _check_profile(t: _Table, profile: str, env: dict[str, str]) -> None:
    """The profile must be in the shared config or credentials file (read as botocore reads
    them, systemd credentials included); so must the source_profile it names, and a profile
    that assumes a role needs a region for STS."""
    import botocore.configloader
    from botocore.exceptions import BotoCoreError

    from spoold.signing import shared_files

    config_file, credentials_file = shared_files(env)
    profiles: dict[str, dict[str, Any]] = {}
    try:
        found = []
        if config_file.is_file():
            found.append(botocore.configloader.load_config(str(config_file)).get("profiles", {}))
        if credentials_file.is_file():
            found.append(botocore.configloader.raw_config_parse(str(credentials_file)))
    except (BotoCoreError, OSError) as exc:
        raise t.error("profile", f"cannot read the AWS shared files: {exc}") from None
    for doc in found:
        for name, values in doc.items():
            profiles.setdefault(name, {}).update(values if isinstance(values, dict) else {})
    where = f"{config_file} or {credentials_file}"
    if profile not in profiles:
        raise t.error("profile", f"no profile {profile!r} in {where}")
    source = profiles[profile].get("source_profile")
    if isinstance(source, str) and source not in profiles:
        raise t.error("profile", f"profile {profile!r} names source_profile {source!r}, which is not in {where}")
    if "role_arn" in profiles[profile] and not profiles[profile].get("region") and not env.get("AWS_DEFAULT_REGION"):
        # botocore asks STS in the profile's region and stops with NoRegionError without one.
        raise t.error("profile", f"profile {profile!r} assumes a role: give it a region (region = ...) "
                                 "or set AWS_DEFAULT_REGION")


def _default_region(env: dict[str, str], profile: str | None = None) -> str | None:
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if env.get(key):
            return env[key]
    try:  # the shared config file and profiles (the destination's own, if any), as the AWS CLI reads them
        import botocore.session

        region = botocore.session.Session(profile=profile).get_config_variable("region")
    except Exception:  # a broken ~/.aws/config must not hide the real message
        return None
    return str(region) if region else None


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

    def known(self, keys: set[str]) -> None:
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

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"must be an integer from {low} to {high}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str | None) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if value not in options:
            raise self.error(key, f"must be one of {', '.join(repr(o) for o in options)}")
        return value

    def duration(self, key: str, default: float, minimum: float, maximum: float = float("inf")) -> float:
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

    def size(self, key: str, default: int, minimum: int) -> int:
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
