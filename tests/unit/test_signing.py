"""signing: refresh windows, one source per identity, when frozen credentials are reused, how a
credential failure reads, and the shared files systemd passes. botocore's credential objects are
real; only the session that hands them out is a stand-in."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import botocore.auth
import pytest
import trio.testing
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import ClientError

from spoold.config import CredentialConfig, Destination, Limits, SocketConfig
from spoold.errors import RetryableSendError
from spoold.signing import (
    CREDENTIALS_REUSE,
    REFRESH_RETRY,
    CredentialSource,
    CredentialSources,
    Identity,
    _refresh_windows,
    shared_files,
    sign,
    sign_botocore,
    use_systemd_credentials,
)

ROLE = "arn:aws:iam::123456789012:role/central-writer"


@pytest.mark.parametrize(("lifetime", "windows"), [
    (3600.0, (900.0, 600.0)),  # botocore's own windows for an hour-long session
    (900.0, (450.0, 225.0)),  # STS's shortest session: not "refresh on every request"
    (16.0, (8.0, 4.0)),
    (-5.0, (0.0, 0.0)),
])
def test_refresh_windows(lifetime: float, windows: tuple[float, float]) -> None:
    assert _refresh_windows(lifetime) == windows


def dest(name: str, **keys: Any) -> Destination:
    return Destination(name=name, kind="kinesis", socket=SocketConfig(Path(f"/run/{name}.sock")), stream="s",
                       region=keys.pop("region", "us-east-1"), endpoint_url="https://kinesis.example",
                       limits=Limits.of_kind("kinesis"), credentials=CredentialConfig(**keys))


def test_destinations_with_the_same_identity_share_one_source() -> None:
    sources = CredentialSources()
    a, b = sources.for_destination(dest("a")), sources.for_destination(dest("b", region="eu-west-1"))
    assert a is b and a.identity == Identity()
    p1, p2 = sources.for_destination(dest("p1", profile="yc")), sources.for_destination(dest("p2", profile="yc"))
    assert p1 is p2 and p1 is not a
    role = dict(role_arn=ROLE, external_id="x1", role_session_name="spoold-h")
    r1, r2 = sources.for_destination(dest("r1", **role)), sources.for_destination(dest("r2", **role))
    assert r1 is r2 and r1.identity == Identity(None, ROLE, "x1", "spoold-h", "us-east-1")
    others = [sources.for_destination(dest("o1", **{**role, "external_id": "x2"})),
              sources.for_destination(dest("o2", **{**role, "profile": "yc"})),
              sources.for_destination(dest("o3", **role, region="eu-west-1"))]  # another STS region
    assert len({id(s) for s in [a, p1, r1, *others]}) == 6


class FakeSession:
    """What CredentialSource asks of a botocore session without a role: get_credentials()."""

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials
        self.calls = 0

    def get_credentials(self) -> Any:
        self.calls += 1
        if isinstance(self.credentials, Exception):
            raise self.credentials
        return self.credentials


async def test_temporary_credentials_reused_until_botocore_wants_a_refresh(mock_clock: trio.testing.MockClock) -> None:
    wall = [datetime(2030, 1, 1, tzinfo=timezone.utc)]
    issued: list[str] = []

    def refresh() -> dict[str, Any]:
        issued.append(f"ASIATEMPORARY{len(issued):04d}")
        return {"access_key": issued[-1], "secret_key": "secret", "token": "token",
                "expiry_time": (wall[0] + timedelta(seconds=100)).isoformat()}

    first = refresh()
    creds = RefreshableCredentials(first["access_key"], "secret", "token", wall[0] + timedelta(seconds=100),
                                   refresh, "assume-role", time_fetcher=lambda: wall[0],
                                   advisory_timeout=50, mandatory_timeout=25)
    source = CredentialSource(session=FakeSession(creds))
    assert (await source.get()).access_key == "ASIATEMPORARY0000"

    wall[0] += timedelta(seconds=40)  # 60 s left: outside botocore's advisory window
    mock_clock.jump(REFRESH_RETRY * 2)
    assert (await source.get()).access_key == "ASIATEMPORARY0000" and len(issued) == 1

    wall[0] += timedelta(seconds=20)  # 40 s left: botocore wants a refresh
    mock_clock.jump(REFRESH_RETRY * 2)
    assert (await source.get()).access_key == "ASIATEMPORARY0001"
    assert source.describe() == {"profile": None, "role_arn": None, "access_key": "...0001", "method": "assume-role"}


async def test_refresh_is_asked_at_most_once_per_retry_period(mock_clock: trio.testing.MockClock) -> None:
    wall = [datetime(2030, 1, 1, tzinfo=timezone.utc)]
    attempts = [0]

    def refresh() -> dict[str, Any]:
        attempts[0] += 1
        raise ClientError({"Error": {"Code": "Throttling", "Message": "slow down"}}, "AssumeRole")

    creds = RefreshableCredentials("ASIAOLD", "secret", "token", wall[0] + timedelta(seconds=45), refresh,
                                   "assume-role", time_fetcher=lambda: wall[0],
                                   advisory_timeout=50, mandatory_timeout=25)
    source = CredentialSource(session=FakeSession(creds))
    # In the advisory window a failed refresh keeps the old key (botocore logs it at WARNING).
    assert (await source.get()).access_key == "ASIAOLD"
    assert attempts[0] == 1
    for _ in range(6):
        mock_clock.jump(REFRESH_RETRY / 4)
        assert (await source.get()).access_key == "ASIAOLD"
    assert attempts[0] == 2  # one more attempt once REFRESH_RETRY had passed, not one per call


class CountingCredentials(Credentials):
    frozen_calls = 0

    def get_frozen_credentials(self) -> Any:
        self.frozen_calls += 1
        return super().get_frozen_credentials()


async def test_static_credentials_are_asked_again_after_the_reuse_period(mock_clock: trio.testing.MockClock) -> None:
    creds = CountingCredentials("AKIDSTATIC", "secret")
    session = FakeSession(creds)
    source = CredentialSource(session=session)
    assert (await source.get()).access_key == "AKIDSTATIC"
    mock_clock.jump(CREDENTIALS_REUSE - 1)
    await source.get()
    assert creds.frozen_calls == 1
    mock_clock.jump(2)
    await source.get()
    assert (creds.frozen_calls, session.calls) == (2, 2)  # found again: the files may have changed
    assert source.describe() == {"profile": None, "role_arn": None, "access_key": "...ATIC", "method": "explicit"}


async def test_requests_waiting_for_credentials_share_one_lookup(mock_clock: trio.testing.MockClock) -> None:
    creds = CountingCredentials("AKIDSTATIC", "secret")
    session = FakeSession(creds)
    source = CredentialSource(session=session)
    keys: list[str] = []

    async def one() -> None:
        keys.append((await source.get()).access_key)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert keys == ["AKIDSTATIC"] * 5 and session.calls == 1
    mock_clock.jump(CREDENTIALS_REUSE + 1)  # stale: the next requests look again, once
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert len(keys) == 8 and session.calls == 2


async def test_reset_finds_credentials_afresh_at_the_next_request() -> None:
    wall = datetime(2030, 1, 1, tzinfo=timezone.utc)
    temporary = RefreshableCredentials("ASIAKEPT", "secret", "token", wall + timedelta(hours=1), dict,
                                       "assume-role", time_fetcher=lambda: wall)
    session = FakeSession(temporary)
    sources = CredentialSources()
    source = sources.for_destination(dest("a"))
    source._session = session
    await source.get()
    await source.get()
    assert session.calls == 1  # refreshable credentials are kept: botocore renews them
    session.credentials = Credentials("AKIDROTATED", "secret")
    sources.reset()
    assert (await source.get()).access_key == "AKIDROTATED"


async def test_credential_failures_name_the_cause_and_no_secret() -> None:
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": f"not authorized on {ROLE}"}}, "AssumeRole")
    with pytest.raises(RetryableSendError) as exc:
        await CredentialSource(session=FakeSession(denied)).get()
    assert exc.value.code == "CredentialError"
    assert "AccessDenied" in str(exc.value) and "AssumeRole" in str(exc.value) and ROLE in str(exc.value)
    with pytest.raises(RetryableSendError) as exc:
        await CredentialSource(session=FakeSession(None)).get()
    assert exc.value.code == "NoCredentials"
    source = CredentialSource(Identity(role_arn=ROLE), session=FakeSession(None))
    assert source.describe() == {"profile": None, "role_arn": ROLE, "access_key": None, "method": None}


def test_systemd_credentials_point_botocore_at_both_shared_files(tmp_path: Path) -> None:
    (tmp_path / "aws").write_text("[default]\n")
    (tmp_path / "aws-config").write_text("[profile ops]\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert shared_files(env) == (tmp_path / "aws-config", tmp_path / "aws")
    assert "AWS_CONFIG_FILE" not in env, "shared_files does not change its argument"
    use_systemd_credentials(env)
    assert (env["AWS_SHARED_CREDENTIALS_FILE"], env["AWS_CONFIG_FILE"]) == (str(tmp_path / "aws"),
                                                                            str(tmp_path / "aws-config"))
    explicit = {"CREDENTIALS_DIRECTORY": str(tmp_path), "AWS_CONFIG_FILE": "/etc/other"}
    use_systemd_credentials(explicit)
    assert explicit["AWS_CONFIG_FILE"] == "/etc/other"  # set by the operator: kept
    (tmp_path / "aws-config").unlink()
    alone = {"CREDENTIALS_DIRECTORY": str(tmp_path), "HOME": "/home/x"}
    use_systemd_credentials(alone)
    assert "AWS_CONFIG_FILE" not in alone and alone["AWS_SHARED_CREDENTIALS_FILE"] == str(tmp_path / "aws")


# -- signatures: sign() must give exactly what botocore's SigV4Auth gives --------------------------
KINESIS_HEADERS = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "Kinesis_20131202.PutRecords"}
FIREHOSE_HEADERS = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "Firehose_20150804.PutRecordBatch"}
SIGNING_CASES = [
    # (url, headers, region, service, credentials, body, unix time)
    ("https://kinesis.us-east-1.amazonaws.com/", KINESIS_HEADERS, "us-east-1", "kinesis",
     ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None), b'{"StreamName":"s","Records":[]}', 1_764_720_000.0),
    ("https://kinesis.us-east-1.amazonaws.com/", KINESIS_HEADERS, "us-east-1", "kinesis",
     ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None), b"x" * 70_000, 1_764_806_399.9),  # a day's last second
    ("https://kinesis.us-east-1.amazonaws.com/", KINESIS_HEADERS, "us-east-1", "kinesis",
     ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None), b"x" * 70_000, 1_764_806_400.0),  # the next day
    ("https://kinesis.eu-west-1.amazonaws.com/", KINESIS_HEADERS, "eu-west-1", "kinesis",
     ("ASIATEMP", "secret/with+chars", "FQoGZXIvYXdzE//token==  with  spaces"), b"{}", 1_764_720_123.0),
    ("https://firehose.ap-south-1.amazonaws.com", FIREHOSE_HEADERS, "ap-south-1", "firehose",
     ("ASIATEMP", "s2", "tok"), b'{"DeliveryStreamName":"d","Records":[{"Data":"eA=="}]}', 1_700_000_000.0),
    ("https://yds.serverless.yandexcloud.net/", KINESIS_HEADERS, "ru-central1", "kinesis",
     ("YCAJEexample", "YCsecret", None), b'{"StreamName":"/ru-central1/b1g/etn/s","Records":[]}', 1_764_720_000.0),
    ("http://127.0.0.1:4567/", KINESIS_HEADERS, "us-east-1", "kinesis",
     ("AKIDSPOOLDTEST", "spoold-test-secret", None), b"", 1_764_720_000.5),  # a port, plain http, no body
    ("http://127.0.0.1:4567/some/path?b=2&a=1", {"content-type": "a  b", "X-Amz-Target": "T"}, "us-east-1", "kinesis",
     ("AKIDSPOOLDTEST", "spoold-test-secret", "t"), b"body", 1_764_720_000.0),  # lower-case name, spaces, query
    ("https://kinesis.us-east-1.amazonaws.com/", {**KINESIS_HEADERS, "User-Agent": "x"}, "us-east-1", "kinesis",
     ("AKIDEXAMPLE", "secret", None), b"{}", 1_764_720_000.0),  # a header botocore leaves unsigned
    ("https://kinesis.us-east-1.amazonaws.com/", {**KINESIS_HEADERS, "X-Amz-Zeta": "{curly}"}, "us-east-1", "kinesis",
     ("AKIDEXAMPLE", "secret", "tok"), b"{}", 1_764_720_000.0),  # a header after the token, braces
]


@pytest.mark.parametrize(("url", "headers", "region", "service", "keys", "body", "now"), SIGNING_CASES)
def test_signatures_equal_botocore(monkeypatch: pytest.MonkeyPatch, url: str, headers: dict[str, str], region: str,
                                   service: str, keys: tuple[str, str, str | None], body: bytes, now: float) -> None:
    creds = ReadOnlyCredentials(*keys)
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda: datetime.fromtimestamp(now, timezone.utc).replace(tzinfo=None))
    expected = sign_botocore(creds, url=url, body=body, headers=headers, region=region, service=service)
    for _ in range(2):  # the second time from the cached template and key
        assert sign(creds, url=url, body=body, headers=headers, region=region, service=service, now=now) == expected
    assert "Signature=" in expected["Authorization"]
