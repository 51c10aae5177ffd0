"""config: the example file, defaults, durations and sizes, regions, yds names, every invalid shape
(each message names the file and the key), and the check-config command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spoold import config, host
from spoold.config import Config, parse_duration, parse_size
from spoold.errors import ConfigError
from spoold.sender import many_records_per_request

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
SPOOL = '[spool]\npath = "/var/lib/spoold/spool.db"\n'


def destination(**keys: str) -> str:
    """One [[destination]] table of string keys, in the order given."""
    return "[[destination]]\n" + "".join(f'{key} = "{value}"\n' for key, value in keys.items())


KINESIS = destination(name="a", kind="kinesis", socket="/run/a.sock", stream="s", region="us-east-1")
FIREHOSE = destination(name="f", kind="firehose", socket="/run/f.sock", stream="fh", region="us-east-1")
YDS = destination(name="y", kind="yds", socket="/run/y.sock", folder="fo", database="db", stream="s")


@pytest.fixture(autouse=True)
def no_ambient_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # With no region in `environ`, config falls back to botocore, which reads os.environ and
    # ~/.aws/config: keep this machine's AWS setup out of the tests.
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def load(tmp_path: Path, text: str | bytes, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "spoold.toml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return host.resolve(config.load(path), {} if environ is None else environ)


def only(tmp_path: Path, dest: str, environ: dict[str, str] | None = None) -> config.Destination:
    cfg = load(tmp_path, SPOOL + dest, environ)
    assert len(cfg.destinations) == 1
    return cfg.destinations[0]


# ---------------------------------------------------------------- the example and the defaults


def test_example_config_parses(tmp_path: Path) -> None:
    path = REPO / "config.example.toml"
    if not path.exists():
        pytest.skip("config.example.toml is not written yet")
    text = path.read_text()
    # Every socket goes to the clients' own group, which check-config looks up on this host.
    assert text.count('socket_group = "spoold-writers"') == text.count("[[destination]]")
    local = tmp_path / "config.toml"
    local.write_text(text.replace('"spoold-writers"', f'"{os.getegid()}"'))
    cfg = host.resolve(config.load(local), {})
    by_name = {d.name: d for d in cfg.destinations}
    assert {d.kind for d in cfg.destinations} == {"kinesis", "firehose", "yds"}
    assert len(by_name) == len(cfg.destinations)
    yds = next(d for d in cfg.destinations if d.kind == "yds")
    assert yds.stream.startswith("/ru-central1/") and yds.endpoint_url == "https://yds.serverless.yandexcloud.net"
    for d in cfg.destinations:
        assert d.endpoint_url.startswith("https://")
        assert d.limits.max_line_bytes < d.limits.max_record_bytes <= d.limits.max_request_bytes
    roles = [d for d in cfg.destinations if d.credentials.role_arn]
    assert roles and all(d.credentials.external_id and d.credentials.role_session_name for d in roles)


def test_minimal_kinesis_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, SPOOL + KINESIS)
    assert cfg.path == tmp_path / "spoold.toml"
    assert cfg.shutdown_grace == 10.0
    assert cfg.sender == "inline"
    assert cfg.log_level == "info" and cfg.log_format == "auto"
    assert cfg.metrics_listen is None
    assert cfg.control_socket == Path("/var/lib/spoold/control.sock")
    assert cfg.spool.path == Path("/var/lib/spoold/spool.db")
    assert cfg.spool.synchronous == "full"
    assert cfg.spool.page_size == 16384
    assert cfg.spool.when_full == "block"
    assert cfg.spool.max_bytes == 1024 * MiB
    assert cfg.spool.max_age == 7 * 86400.0
    (d,) = cfg.destinations
    assert (d.name, d.kind, d.stream, d.stream_arn, d.region) == ("a", "kinesis", "s", None, "us-east-1")
    assert d.endpoint_url == "https://kinesis.us-east-1.amazonaws.com"
    assert d.socket == config.SocketConfig(Path("/run/a.sock"), "stream", 0o660, None)
    assert d.limits == config.Limits(500, 5 * MiB, MiB, MiB - 256, max_in_flight=8, linger=0.2, request_timeout=30.0)
    assert d.records == config.RecordConfig(b"", False, None, None, ordered=False, aggregation="none")
    assert d.retry == config.RetryConfig(base=0.1, cap_throttle=5.0, cap=60.0)
    assert d.files == config.FilesConfig((), "end") and d.credentials == config.CredentialConfig()
    assert d.signing_service == "kinesis"


def test_minimal_firehose_defaults(tmp_path: Path) -> None:
    d = only(tmp_path, FIREHOSE)
    assert d.limits.max_records_per_request == 500
    assert d.limits.max_request_bytes == 4 * MiB
    assert d.limits.max_record_bytes == 1_024_000
    assert d.limits.max_line_bytes == 1_024_000 - 1
    assert d.records.delimiter == b"\n" and d.records.pack_lines is False
    assert d.endpoint_url == "https://firehose.us-east-1.amazonaws.com"
    assert d.signing_service == "firehose"


def test_firehose_empty_delimiter_leaves_the_whole_record_for_the_line(tmp_path: Path) -> None:
    d = only(tmp_path, FIREHOSE + 'delimiter = ""\npack_lines = true\n')
    assert d.records.delimiter == b"" and d.records.pack_lines is True
    assert d.limits.max_line_bytes == 1_024_000


def test_minimal_yds_defaults(tmp_path: Path) -> None:
    d = only(tmp_path, YDS)
    assert d.limits == config.Limits(500, 5_000_000, 1_000_000, 1_000_000 - 256, 8, 0.2, 30.0)
    assert d.signing_service == "kinesis"


# ---------------------------------------------------------------- durations and sizes

DURATIONS = [("250ms", 0.25), ("10s", 10.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0),
             (3, 3.0), (0.5, 0.5), (0, 0.0), ("1.5s", 1.5), (" 20 ms ", 0.02)]


@pytest.mark.parametrize(("value", "seconds"), DURATIONS)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["fast", "10", "-1s", "1w", "", "ms", True, None, [1]])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


SIZES = [("4MiB", 4 * MiB), (1024, 1024), ("512KiB", 512 * 1024), ("1GiB", 1024**3), ("1kb", 1000),
         ("2MB", 2_000_000), ("100", 100), ("100B", 100), ("1.5KiB", 1536), ("4mib", 4 * MiB)]


@pytest.mark.parametrize(("value", "size"), SIZES)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["4 parsecs", "MiB", "-1", "4M", "", 1.5, True, None])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_socket_group_by_number_or_existing_name(tmp_path: Path) -> None:
    import grp

    name = grp.getgrgid(os.getgid()).gr_name
    for group in ("4242", name):
        (d,) = load(tmp_path, SPOOL + KINESIS + f'socket_group = "{group}"\n').destinations
        assert d.socket is not None and d.socket.group == group


def test_durations_and_sizes_in_the_file(tmp_path: Path) -> None:
    cfg = load(tmp_path, SPOOL + 'max_age = "7d"\nmax_bytes = "2GiB"\npage_size = "16KiB"\n'
               + '[daemon]\nshutdown_grace = 3\n'
               + KINESIS + 'linger = "250ms"\nretry_cap = "1h"\nmax_request_bytes = "4MiB"\nmax_record_bytes = 2048\n')
    assert cfg.spool.max_age == 604800.0 and cfg.spool.max_bytes == 2 * 1024**3
    assert cfg.spool.page_size == 16384
    assert cfg.shutdown_grace == 3.0
    (d,) = cfg.destinations
    assert d.limits.linger == 0.25 and d.retry.cap == 3600.0
    assert d.limits.max_request_bytes == 4 * MiB and d.limits.max_record_bytes == 2048
    assert d.limits.max_line_bytes == 2048 - 256  # the default follows max_record_bytes


# ---------------------------------------------------------------- regions and endpoints

KINESIS_NO_REGION = '[[destination]]\nname = "a"\nkind = "kinesis"\nsocket = "/run/a.sock"\n'

# (id, extra destination keys, environ, region, stream, endpoint)
REGION_CASES = [
    ("AWS_REGION", 'stream = "s"\n', {"AWS_REGION": "eu-west-1"}, "eu-west-1", "s",
     "https://kinesis.eu-west-1.amazonaws.com"),
    ("AWS_DEFAULT_REGION", 'stream = "s"\n', {"AWS_DEFAULT_REGION": "eu-north-1"}, "eu-north-1", "s",
     "https://kinesis.eu-north-1.amazonaws.com"),
    ("AWS_REGION first", 'stream = "s"\n', {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-north-1"},
     "eu-west-1", "s", "https://kinesis.eu-west-1.amazonaws.com"),
    ("the file beats the environment", 'stream = "s"\nregion = "us-west-2"\n', {"AWS_REGION": "eu-west-1"},
     "us-west-2", "s", "https://kinesis.us-west-2.amazonaws.com"),
    ("from stream_arn", 'stream_arn = "arn:aws:kinesis:ap-south-1:123456789012:stream/app.events"\n',
     {"AWS_REGION": "eu-west-1"}, "ap-south-1", "app.events", "https://kinesis.ap-south-1.amazonaws.com"),
    ("china", 'stream_arn = "arn:aws-cn:kinesis:cn-north-1:123456789012:stream/s"\n', {}, "cn-north-1", "s",
     "https://kinesis.cn-north-1.amazonaws.com.cn"),
    ("endpoint_url kept, trailing slash dropped", 'stream = "s"\nendpoint_url = "http://127.0.0.1:4566/"\n',
     {"AWS_REGION": "us-east-1"}, "us-east-1", "s", "http://127.0.0.1:4566"),
]


@pytest.mark.parametrize(("extra", "environ", "region", "stream", "endpoint"), [c[1:] for c in REGION_CASES],
                         ids=[c[0] for c in REGION_CASES])
def test_region(tmp_path: Path, extra: str, environ: dict[str, str], region: str, stream: str,
                endpoint: str) -> None:
    d = only(tmp_path, KINESIS_NO_REGION + extra, environ)
    assert (d.region, d.stream, d.endpoint_url) == (region, stream, endpoint)


def test_stream_arn_kept(tmp_path: Path) -> None:
    arn = "arn:aws:kinesis:ap-south-1:123456789012:stream/s1"
    d = only(tmp_path, KINESIS_NO_REGION + f'stream_arn = "{arn}"\n')
    assert d.stream_arn == arn


def test_no_region_anywhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        only(tmp_path, KINESIS_NO_REGION + 'stream = "s"\n')
    assert str(tmp_path / "spoold.toml") in str(info.value)
    assert 'destination "a": region: required' in str(info.value)


# (id, destination keys after kind/socket, stream, region)
YDS_CASES = [
    ("composed", 'folder = "b1g"\ndatabase = "etn"\nstream = "events"\n', "/ru-central1/b1g/etn/events",
     "ru-central1"),
    ("full path kept", 'stream = "/ru-central1/b1g/etn/events"\n', "/ru-central1/b1g/etn/events", "ru-central1"),
]


@pytest.mark.parametrize(("keys", "stream", "region"), [c[1:] for c in YDS_CASES], ids=[c[0] for c in YDS_CASES])
def test_yds(tmp_path: Path, keys: str, stream: str, region: str) -> None:
    d = only(tmp_path, '[[destination]]\nname = "y"\nkind = "yds"\nsocket = "/run/y.sock"\n' + keys,
             {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (d.stream, d.region) == (stream, region)
    assert d.endpoint_url == "https://yds.serverless.yandexcloud.net"


# ---------------------------------------------------------------- invalid configs

DUP = KINESIS.replace('socket = "/run/a.sock"', 'socket = "/run/b.sock"')

# (id, file text, texts the message must contain besides the file name)
INVALID = [
    ("unknown top-level key", "colour = 1\n" + SPOOL + KINESIS, ["colour: unknown key"]),
    ("unknown [spool] key", SPOOL + "colour = 1\n" + KINESIS, ["[spool].colour: unknown key"]),
    ("unknown destination key", SPOOL + KINESIS + 'colour = "red"\n', ["destination[0].colour: unknown key"]),
    ("misspelt required key", SPOOL + KINESIS.replace("region", "regoin"), ["destination[0].regoin: unknown key"]),
    ("misspelt spool path", SPOOL.replace("path", "pth") + KINESIS, ["[spool].pth: unknown key"]),
    ("unknown key in a later destination", SPOOL + KINESIS + FIREHOSE + "strem = 1\n",
     ["destination[1].strem: unknown key"]),
    ("missing [spool]", KINESIS, ["[spool]", "missing"]),
    ("missing path", "[spool]\nsynchronous = \"full\"\n" + KINESIS, ["[spool].path: required"]),
    ("bad synchronous", SPOOL + 'synchronous = "sometimes"\n' + KINESIS, ["[spool].synchronous"]),
    ("page_size not a power of two", SPOOL + "page_size = 12288\n" + KINESIS, ["[spool].page_size", "power of two"]),
    ("page_size too small", SPOOL + "page_size = 1024\n" + KINESIS, ["[spool].page_size", "4096"]),
    ("page_size too large", SPOOL + 'page_size = "128KiB"\n' + KINESIS, ["[spool].page_size", "65536"]),
    ("no destinations", SPOOL, ["[[destination]]", "at least one"]),
    ("destination not an array", SPOOL + '[destination]\nname = "a"\n', ["destination", "[[destination]]"]),
    ("bad name chars", SPOOL + KINESIS.replace('name = "a"', 'name = "a b"'), ["destination[0].name"]),
    ("duplicate names", SPOOL + KINESIS + DUP, ['destination[1].name: "a"']),
    ("duplicate sockets", SPOOL + KINESIS + KINESIS.replace('name = "a"', 'name = "b"'),
     ['destination "b": socket']),
    ("socket is the spool", SPOOL + KINESIS.replace("/run/a.sock", "/var/lib/spoold/spool.db"),
     ['destination "a": socket']),
    ("socket is the spool's WAL", SPOOL + KINESIS.replace("/run/a.sock", "/var/lib/spoold/spool.db-wal"),
     ['destination "a": socket', "WAL"]),
    ("socket is the spool's shm", SPOOL + KINESIS.replace("/run/a.sock", "/var/lib/spoold/spool.db-shm"),
     ['destination "a": socket', '"-shm"']),
    ("socket is the spool's lock file", SPOOL + KINESIS.replace("/run/a.sock", "/var/lib/spoold/spool.db.lock"),
     ['destination "a": socket', "lock file"]),
    ("socket reached through ..", SPOOL + KINESIS.replace("/run/a.sock", "/var/lib/x/../spoold/spool.db"),
     ['destination "a": socket', "[spool].path"]),
    ("socket is the default control socket", SPOOL + KINESIS.replace("/run/a.sock", "/var/lib/spoold/control.sock"),
     ['destination "a": socket', "[control].socket"]),
    ("control socket is the spool", SPOOL + '[control]\nsocket = "/var/lib/spoold/spool.db"\n' + KINESIS,
     ["[control].socket", "[spool].path"]),
    ("control socket is the spool's WAL", SPOOL + '[control]\nsocket = "/var/lib/spoold/spool.db-wal"\n' + KINESIS,
     ["[control].socket", "WAL"]),
    ("control socket is the lock file", SPOOL + '[control]\nsocket = "/var/lib/spoold/spool.db.lock"\n' + KINESIS,
     ["[control].socket", "lock file"]),
    ("control socket is a destination's", SPOOL + '[control]\nsocket = "/run/a.sock"\n' + KINESIS,
     ['destination "a": socket', "[control].socket"]),
    ("unknown kind", SPOOL + KINESIS.replace('"kinesis"', '"sqs"'), ['destination "a": kind']),
    ("missing kind", SPOOL + KINESIS.replace('kind = "kinesis"\n', ""), ['destination "a": kind: required']),
    ("missing socket", SPOOL + KINESIS.replace('socket = "/run/a.sock"\n', ""), ['destination "a": socket: required']),
    ("firehose with folder", SPOOL + FIREHOSE + 'folder = "x"\n', ['destination "f": folder', "yds"]),
    ("firehose with partition_key_field", SPOOL + FIREHOSE + 'partition_key_field = "u"\n',
     ['destination "f": partition_key_field']),
    ("yds without folder", SPOOL + YDS.replace('folder = "fo"\n', ""), ['destination "y": folder: required']),
    ("yds without database", SPOOL + YDS.replace('database = "db"\n', ""), ['destination "y": database: required']),
    ("yds full path and folder", SPOOL + YDS.replace('stream = "s"', 'stream = "/ru-central1/fo/db/s"'),
     ['destination "y": folder']),
    ("yds with stream_arn", SPOOL + YDS + 'stream_arn = "arn:aws:kinesis:us-east-1:123456789012:stream/s"\n',
     ['destination "y": stream_arn']),
    ("kinesis with delimiter", SPOOL + KINESIS + 'delimiter = "\\n"\n', ['destination "a": delimiter', "firehose"]),
    ("kinesis with pack_lines", SPOOL + KINESIS + "pack_lines = true\n", ['destination "a": pack_lines']),
    ("kinesis without stream", SPOOL + KINESIS.replace('stream = "s"\n', ""), ['destination "a": stream: required']),
    ("stream and stream_arn", SPOOL + KINESIS + 'stream_arn = "arn:aws:kinesis:us-east-1:123456789012:stream/s"\n',
     ['destination "a": stream_arn', "not both"]),
    ("bad stream_arn", SPOOL + KINESIS.replace('stream = "s"', 'stream_arn = "arn:aws:sqs:us-east-1:1:q"'),
     ['destination "a": stream_arn']),
    ("bad duration", SPOOL + KINESIS + 'linger = "fast"\n', ['destination "a": linger']),
    ("duration out of range", SPOOL + KINESIS + 'linger = "2m"\n', ['destination "a": linger']),
    ("bad daemon duration", SPOOL + "[daemon]\nshutdown_grace = \"soon\"\n" + KINESIS, ["[daemon].shutdown_grace"]),
    ("explicit_hash_key with a non-ASCII digit", SPOOL + KINESIS + 'explicit_hash_key = "\u00b2"\n',
     ['destination "a": explicit_hash_key']),
    ("bad sender", SPOOL + "[daemon]\nsender = \"thread\"\n" + KINESIS, ["[daemon].sender", "inline"]),
    ("bad size", SPOOL + KINESIS + 'max_record_bytes = "4 parsecs"\n', ['destination "a": max_record_bytes']),
    ("max_in_flight 0", SPOOL + KINESIS + "max_in_flight = 0\n", ['destination "a": max_in_flight']),
    ("max_in_flight not an integer", SPOOL + KINESIS + 'max_in_flight = "4"\n', ['destination "a": max_in_flight']),
    ("max_records_per_request 501", SPOOL + KINESIS + "max_records_per_request = 501\n",
     ['destination "a": max_records_per_request']),
    ("max_line_bytes too large", SPOOL + KINESIS + 'max_line_bytes = "1MiB"\n', ['destination "a": max_line_bytes']),
    ("max_line_bytes too large for firehose", SPOOL + FIREHOSE + "max_line_bytes = 1024000\n",
     ['destination "f": max_line_bytes']),
    ("firehose delimiter as long as a record",
     SPOOL + FIREHOSE + f'max_record_bytes = 1024\ndelimiter = "{"-" * 1024}"\n', ['destination "f": delimiter']),
    ("max_request_bytes below max_record_bytes", SPOOL + KINESIS + 'max_request_bytes = "512KiB"\n',
     ['destination "a": max_request_bytes']),
    ("unknown socket_group", SPOOL + KINESIS + 'socket_group = "no-such-group-spoold"\n',
     ['destination "a": socket_group', "no group"]),
    ("socket_group of a non-ASCII digit", SPOOL + KINESIS + 'socket_group = "\u00b2"\n',
     ['destination "a": socket_group']),
    ("socket_group with a NUL", SPOOL + KINESIS + 'socket_group = "a\\u0000b"\n', ['destination "a": socket_group']),
    ("bad socket_mode", SPOOL + KINESIS + 'socket_mode = "rw-rw----"\n', ['destination "a": socket_mode']),
    ("socket_mode as a number", SPOOL + KINESIS + "socket_mode = 660\n", ['destination "a": socket_mode']),
    ("bad explicit_hash_key", SPOOL + KINESIS + f'explicit_hash_key = "{2**128}"\n',
     ['destination "a": explicit_hash_key']),
    ("ordered with kpl", SPOOL + KINESIS + 'ordered = true\naggregation = "kpl"\n', ['destination "a": aggregation']),
    ("bad endpoint_url", SPOOL + KINESIS + 'endpoint_url = "kinesis.local"\n', ['destination "a": endpoint_url']),
    ("bad metrics listen", SPOOL + '[metrics]\nlisten = "9464"\n' + KINESIS, ["[metrics].listen"]),
    ("invalid TOML", SPOOL + KINESIS + "linger 5\n", ["invalid TOML", "line 9"]),
    ("not UTF-8", (SPOOL + KINESIS).encode() + b'# caf\xe9\n', ["UTF-8"]),
]


@pytest.mark.parametrize(("text", "wanted"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config(tmp_path: Path, text: str | bytes, wanted: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, {"AWS_REGION": "us-east-1"})
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'spoold.toml'}: ")
    for part in wanted:
        assert part in message
    assert "\n" not in message.strip()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(info.value)


# ---------------------------------------------------------------- the command line


def spoold(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(cwd / "no-aws-files")
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout
    return subprocess.run([sys.executable, "-m", "spoold", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_cli_check_config_valid(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(SPOOL + KINESIS)
    proc = spoold("check-config", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "a: kinesis" in proc.stdout


def test_cli_check_config_invalid(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SPOOL + KINESIS + "max_in_flight = 0\n")
    proc = spoold("check-config", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "max_in_flight" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_check_config_refuses_a_socket_on_the_spool(tmp_path: Path) -> None:
    """A socket path on a file the daemon owns (here the spool's WAL) would be replaced or
    unlinked by the daemon: check-config exits 2 naming the key and leaves the file alone."""
    spool = tmp_path / "spool.db"
    wal = tmp_path / "spool.db-wal"
    wal.write_bytes(b"acknowledged lines")
    path = tmp_path / "bad.toml"
    path.write_text(f'[spool]\npath = "{spool}"\n[control]\nsocket = "{wal}"\n' + KINESIS)
    proc = spoold("check-config", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert "[control].socket" in proc.stderr and "WAL" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert wal.read_bytes() == b"acknowledged lines"


@pytest.mark.parametrize("args", [
    pytest.param(["check-config", "--config", "missing.toml"], id="missing file"),
    pytest.param([], id="no arguments"),
    pytest.param(["send", "--socket", "/nonexistent"], id="send to no socket"),
])
def test_cli_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    proc = spoold(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("extra", "many"), [
    ("", True),
    ('aggregation = "kpl"\n', False),
    ("ordered = true\n", False),
])
def test_sender_process_serves_destinations_of_one_line_records(tmp_path: Path, extra: str, many: bool) -> None:
    (d,) = load(tmp_path, SPOOL + "[daemon]\nsender = \"process\"\n" + KINESIS + extra).destinations
    assert many_records_per_request(d) is many


def test_sender_process_leaves_packed_firehose_inline(tmp_path: Path) -> None:
    plain = 'kind = "firehose"\nstream = "fh"\nregion = "us-east-1"\n'
    (d,) = load(tmp_path, SPOOL + '[[destination]]\nname = "f"\nsocket = "/run/f.sock"\n' + plain).destinations
    assert many_records_per_request(d)
    (d,) = load(tmp_path, SPOOL + '[[destination]]\nname = "f"\nsocket = "/run/f.sock"\n' + plain
                + "pack_lines = true\n").destinations
    assert not many_records_per_request(d)


def test_kpl_defaults_to_one_aggregate_per_request(tmp_path: Path) -> None:
    (d,) = load(tmp_path, SPOOL + KINESIS + 'aggregation = "kpl"\n').destinations
    assert d.limits.max_request_bytes == d.limits.max_record_bytes == MiB
    (d,) = load(tmp_path, SPOOL + KINESIS + 'aggregation = "kpl"\nmax_request_bytes = "5MiB"\n').destinations
    assert d.limits.max_request_bytes == 5 * MiB
    (d,) = load(tmp_path, SPOOL + KINESIS).destinations
    assert d.limits.max_request_bytes == 5 * MiB


# ---------------------------------------------------------------- credential keys

ROLE = "arn:aws:iam::123456789012:role/central-writer"


def shared_files(tmp_path: Path, credentials: str = "", config_text: str = "") -> dict[str, str]:
    (tmp_path / "credentials").write_text(credentials)
    (tmp_path / "config").write_text(config_text)
    return {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_CONFIG_FILE": str(tmp_path / "config")}


def test_no_credential_keys_is_the_default_chain(tmp_path: Path) -> None:
    d = only(tmp_path, KINESIS)
    assert d.credentials == config.CredentialConfig(None, None, None, None)


def test_profile_from_either_shared_file(tmp_path: Path) -> None:
    env = shared_files(tmp_path, "[yc]\naws_access_key_id = A\naws_secret_access_key = B\n",
                       "[profile ops]\nrole_arn = " + ROLE + "\nsource_profile = yc\nregion = eu-west-1\n"
                       "[default]\nregion = eu-west-1\n")
    for name in ("yc", "ops", "default"):
        assert only(tmp_path, YDS + f'profile = "{name}"\n', env).credentials.profile == name


def test_profile_in_a_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "aws").write_text("[audit]\naws_access_key_id = A\naws_secret_access_key = B\n")
    d = only(tmp_path, KINESIS + 'profile = "audit"\n', {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert d.credentials.profile == "audit"


def test_role_with_defaults(tmp_path: Path) -> None:
    d = only(tmp_path, FIREHOSE + f'role_arn = "{ROLE}"\nexternal_id = "ext-1"\n')
    assert (d.credentials.role_arn, d.credentials.external_id) == (ROLE, "ext-1")
    assert d.credentials.role_session_name == config.default_session_name(__import__("socket").gethostname())
    d = only(tmp_path, KINESIS + f'role_arn = "{ROLE}"\nrole_session_name = "app@host-1"\n')
    assert (d.credentials.external_id, d.credentials.role_session_name) == (None, "app@host-1")
    d = only(tmp_path, KINESIS + 'role_arn = "arn:aws-cn:iam::123456789012:role/path/to/r+w=1,x.y@z"\n')
    assert d.credentials.role_arn == "arn:aws-cn:iam::123456789012:role/path/to/r+w=1,x.y@z"


@pytest.mark.parametrize(("hostname", "name"), [
    ("web-01.example.com", "spoold-web-01.example.com"),
    ("host with spaces/and:colons", "spoold-host-with-spaces-and-colons"),
    ("h\u00f6st", "spoold-h-st"),
    ("x" * 100, "spoold-" + "x" * 57),
    ("", "spoold-"),
])
def test_default_session_name_within_sts_limits(hostname: str, name: str) -> None:
    assert config.default_session_name(hostname) == name
    assert config.SESSION_NAME_RE.fullmatch(name)


CREDENTIAL_INVALID = [
    ("profile-missing", KINESIS + 'profile = "nope"\n', ["profile", "'nope'"]),
    ("profile-empty", KINESIS + 'profile = ""\n', ["profile", "''"]),
    ("profile-not-string", KINESIS + "profile = 1\n", ["profile", "must be a string"]),
    ("source-profile-missing", KINESIS + 'profile = "broken"\n', ["profile", "source_profile 'gone'"]),
    ("role-profile-no-region", KINESIS + 'profile = "noregion"\n', ["profile", "'noregion' assumes a role", "region"]),
    ("arn-kinesis", KINESIS + 'role_arn = "arn:aws:kinesis:us-east-1:123456789012:stream/s"\n', ["role_arn"]),
    ("arn-short-account", KINESIS + 'role_arn = "arn:aws:iam::12345:role/r"\n', ["role_arn"]),
    ("arn-user", KINESIS + 'role_arn = "arn:aws:iam::123456789012:user/r"\n', ["role_arn"]),
    ("arn-no-name", KINESIS + 'role_arn = "arn:aws:iam::123456789012:role/"\n', ["role_arn"]),
    ("arn-name-only", KINESIS + 'role_arn = "central-writer"\n', ["role_arn"]),
    ("external-id-alone", KINESIS + 'external_id = "x1"\n', ["external_id", "only valid with role_arn"]),
    ("session-name-alone", KINESIS + 'role_session_name = "s1"\n', ["role_session_name", "only valid with role_arn"]),
    ("external-id-short", KINESIS + f'role_arn = "{ROLE}"\nexternal_id = "x"\n', ["external_id"]),
    ("external-id-space", KINESIS + f'role_arn = "{ROLE}"\nexternal_id = "a b"\n', ["external_id"]),
    ("session-name-long", KINESIS + f'role_arn = "{ROLE}"\nrole_session_name = "{"s" * 65}"\n',
     ["role_session_name", "2 to 64"]),
    ("session-name-colon", KINESIS + f'role_arn = "{ROLE}"\nrole_session_name = "a:b"\n', ["role_session_name"]),
    ("yds-role", YDS + f'role_arn = "{ROLE}"\n', ["role_arn", "only valid for kind kinesis or firehose"]),
    ("yds-external-id", YDS + 'external_id = "x1"\n', ["external_id", "only valid for kind kinesis or firehose"]),
]


@pytest.mark.parametrize(("text", "wanted"), [c[1:] for c in CREDENTIAL_INVALID],
                         ids=[c[0] for c in CREDENTIAL_INVALID])
def test_invalid_credential_keys(tmp_path: Path, text: str, wanted: list[str]) -> None:
    env = shared_files(tmp_path, "[yc]\naws_access_key_id = A\naws_secret_access_key = B\n",
                       "[profile broken]\nrole_arn = " + ROLE + "\nsource_profile = gone\nregion = us-east-1\n"
                       "[profile noregion]\nrole_arn = " + ROLE + "\nsource_profile = yc\n")
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, SPOOL + text, env)
    message = str(exc.value)
    assert str(tmp_path / "spoold.toml") in message
    for part in wanted:
        assert part in message, message


def test_cli_check_config_names_a_missing_profile_without_the_network(tmp_path: Path) -> None:
    """Profiles that would call STS, SSO or a process are only looked up in the files: a listener
    standing in for STS and instance metadata sees no connection."""
    import socket

    files = shared_files(tmp_path, "[base]\naws_access_key_id = A\naws_secret_access_key = B\n",
                         f"[profile ops]\nrole_arn = {ROLE}\nsource_profile = base\nregion = us-east-1\n"
                         "[profile proc]\ncredential_process = /bin/false\n")
    good = tmp_path / "good.toml"
    good.write_text(SPOOL + KINESIS + 'profile = "ops"\nrole_arn = "' + ROLE + '"\n'
                    + FIREHOSE + 'profile = "proc"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(SPOOL + KINESIS + 'profile = "opps"\n')
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen(8)
        trap.setblocking(False)
        url = f"http://127.0.0.1:{trap.getsockname()[1]}"
        env = {**files, "AWS_ENDPOINT_URL_STS": url, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url,
               "AWS_ENDPOINT_URL": url}
        ok = spoold("check-config", "--config", str(good), cwd=tmp_path, env=env)
        assert ok.returncode == 0, ok.stderr
        proc = spoold("check-config", "--config", str(bad), cwd=tmp_path, env=env)
        assert proc.returncode == 2
        assert "profile" in proc.stderr and "'opps'" in proc.stderr and "Traceback" not in proc.stderr
        with pytest.raises(BlockingIOError):
            trap.accept()


def test_region_from_the_destinations_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = shared_files(tmp_path, "[team-b]\naws_access_key_id = A\naws_secret_access_key = B\n",
                       "[default]\nregion = us-east-1\n[profile team-b]\nregion = eu-north-1\n")
    # botocore reads the files named in os.environ, as the daemon's process has them.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    text = SPOOL + KINESIS_NO_REGION + 'stream = "s"\nprofile = "team-b"\n' + FIREHOSE.replace('"f"', '"g"', 1)
    by_name = {d.name: d for d in load(tmp_path, text.replace('region = "us-east-1"\n', ""), env).destinations}
    assert (by_name["a"].region, by_name["a"].endpoint_url) == (
        "eu-north-1", "https://kinesis.eu-north-1.amazonaws.com")
    assert by_name["g"].region == "us-east-1"  # no profile: the default one's region


# ---------------------------------------------------------------- parse is pure; resolve alone

HOST_BOUND = (SPOOL + KINESIS_NO_REGION + 'stream = "s"\nsocket_group = "no-such-group-here"\nprofile = "team"\n'
              + f'role_arn = "{ROLE}"\n')


def test_parse_consults_nothing_of_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups, AWS files, botocore, the host name and the environment are host.resolve()'s: parse()
    reads none of them, and leaves what they would give empty."""
    import grp
    import socket

    import botocore.session

    def consulted(*args: object, **kwargs: object) -> None:
        raise AssertionError("parse() consulted the host")

    for owner, name in ((grp, "getgrnam"), (grp, "getgrgid"), (socket, "gethostname"),
                        (botocore.session, "Session"), (host, "check_profile"), (host, "default_region"),
                        (os.path, "realpath")):
        monkeypatch.setattr(owner, name, consulted)
    monkeypatch.setattr(os, "environ", {})
    (d,) = load_only(tmp_path, HOST_BOUND).destinations
    assert (d.region, d.endpoint_url) == ("", "")
    assert d.socket is not None and d.socket.group == "no-such-group-here"
    assert d.credentials == config.CredentialConfig("team", ROLE, None, None)


def load_only(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "spoold.toml"
    path.write_text(text)
    return config.load(path)


def test_resolve_fills_in_what_the_host_gives(tmp_path: Path) -> None:
    env = {**shared_files(tmp_path, "[team]\naws_access_key_id = A\naws_secret_access_key = B\n"),
           "AWS_REGION": "eu-west-1"}
    parsed = load_only(tmp_path, HOST_BOUND.replace("no-such-group-here", str(os.getegid())))
    cfg = host.resolve(parsed, env)
    (d,) = cfg.destinations
    assert (d.region, d.endpoint_url) == ("eu-west-1", "https://kinesis.eu-west-1.amazonaws.com")
    assert d.credentials.role_session_name == config.default_session_name(__import__("socket").gethostname())
    assert d.limits == parsed.destinations[0].limits and d.socket == parsed.destinations[0].socket
    assert host.resolve(cfg, env) == cfg  # resolving twice changes nothing


def test_resolve_leaves_a_config_that_needs_nothing_of_the_host(tmp_path: Path) -> None:
    parsed = load_only(tmp_path, SPOOL + KINESIS + FIREHOSE + YDS)
    assert host.resolve(parsed, {}) == parsed


# (id, AWS_REGION set, profile "team" in the shared files, the group exists, texts the message must contain)
RESOLVE_ERRORS = [
    ("group", True, True, False, ['destination "a": socket_group', "no-such-group-here"]),
    ("profile", True, False, True, ['destination "a": profile', "no profile 'team'"]),
    ("region", False, True, True, ['destination "a": region: required']),
]


@pytest.mark.parametrize(("region", "profile", "group", "wanted"), [c[1:] for c in RESOLVE_ERRORS],
                         ids=[c[0] for c in RESOLVE_ERRORS])
def test_resolve_names_the_file_and_the_key(tmp_path: Path, region: bool, profile: bool, group: bool,
                                            wanted: list[str]) -> None:
    parsed = load_only(tmp_path, HOST_BOUND.replace("no-such-group-here", str(os.getegid())) if group else HOST_BOUND)
    env = shared_files(tmp_path, "[team]\naws_access_key_id = A\naws_secret_access_key = B\n" if profile else "")
    if region:
        env["AWS_REGION"] = "eu-west-1"
    with pytest.raises(ConfigError) as info:
        host.resolve(parsed, env)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'spoold.toml'}: ")
    for part in wanted:
        assert part in message, message


def test_group_id() -> None:
    import grp

    assert host.group_id("4242") == 4242
    name = grp.getgrgid(os.getgid()).gr_name
    assert host.group_id(name) == os.getgid()
    with pytest.raises(KeyError):
        host.group_id("no-such-group-here")
    with pytest.raises(ValueError):
        host.group_id("nul\0name")


def test_default_region_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert host.default_region({"AWS_REGION": "a-1", "AWS_DEFAULT_REGION": "b-1"}) == "a-1"
    assert host.default_region({"AWS_DEFAULT_REGION": "b-1"}) == "b-1"
    assert host.default_region({}) is None  # no_ambient_aws: no config file
    env = shared_files(tmp_path, "", "[default]\nregion = us-east-2\n[profile b]\nregion = eu-north-1\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert host.default_region({}) == "us-east-2"
    assert host.default_region({}, "b") == "eu-north-1"
    assert host.default_region({"AWS_REGION": "a-1"}, "b") == "a-1"


def test_check_profile(tmp_path: Path) -> None:
    env = shared_files(tmp_path, "[keys]\naws_access_key_id = A\naws_secret_access_key = B\n",
                       f"[profile role]\nrole_arn = {ROLE}\nsource_profile = keys\nregion = us-east-1\n"
                       f"[profile orphan]\nrole_arn = {ROLE}\nsource_profile = gone\nregion = us-east-1\n"
                       f"[profile noregion]\nrole_arn = {ROLE}\nsource_profile = keys\n")
    for good in ("keys", "role"):
        host.check_profile(good, env)
    host.check_profile("noregion", {**env, "AWS_DEFAULT_REGION": "us-east-1"})
    for bad, message in (("nope", "no profile 'nope'"), ("orphan", "source_profile 'gone'"),
                         ("noregion", "assumes a role")):
        with pytest.raises(ValueError, match=message):
            host.check_profile(bad, env)


def test_limits_of_kind_follow_the_given_sizes() -> None:
    assert config.Limits.of_kind("kinesis") == config.Limits(500, 5 * MiB, MiB, MiB - 256)
    assert config.Limits.of_kind("firehose", config.RecordConfig(delimiter=b"\r\n")).max_line_bytes == 1_024_000 - 2
    kpl = config.Limits.of_kind("kinesis", config.RecordConfig(aggregation="kpl"), max_record_bytes=64 * 1024)
    assert (kpl.max_request_bytes, kpl.max_line_bytes) == (64 * 1024, 64 * 1024 - 256)
