"""Per-destination credentials, end to end: one daemon, three destinations, three identities.

- "app" (kinesis) signs with botocore's default chain (the environment's keys);
- "yc" (yds) signs with the static key of profile "yc" in the shared credentials file;
- "audit" (firehose) assumes a role with an external id, the default chain as its base.

Then: roles through profiles, and credential failures (AccessDenied on AssumeRole, an expired
session token) shown in status while the lines wait, until they are fixed.

The loopback endpoint verifies each request's SigV4 signature against the key it names, answers
STS AssumeRole (reached through AWS_ENDPOINT_URL_STS, as botocore resolves it) and refuses
temporary keys without their session token or after they expire. So every check below fails if
an identity leaks across destinations, a role's token is dropped, or a key is used past its end.
"""

from __future__ import annotations

import collections
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from spoold.config import default_session_name
from tests.tools.client import send_lines, wait_until
from tests.tools.daemon import TEST_KEYS
from tests.tools.fakeaws import STS_TARGET, FakeAWS, Role

ROLE = "arn:aws:iam::123456789012:role/central-writer"
EXTERNAL_ID = "spoold-ext-4711"
YC_KEY, YC_SECRET = "AKIDYANDEXSTATICYC", "yandex-static-secret"
YDS_STREAM = "/ru-central1/b1gfolder/etn0db/audit"
DROP = "<drop this key>"  # make_daemon writes stream and region for every destination
FAST_RETRY = {"retry_base": "50ms", "retry_cap": "500ms", "retry_cap_throttle": "100ms"}
# Lifetime of the temporary credentials the endpoint's STS grants in the refresh test: long
# enough that a request signed at the refresh point (half the lifetime before expiry) arrives
# well before the end on a busy machine, short enough to see several refreshes.
SHORT_LIFETIME = 16


def _daemon(make_daemon: Any, tmp_path: Path, fake: FakeAWS, *, audit: dict[str, Any] | None = None,
            more: tuple[dict[str, Any], ...] = ()) -> Any:
    (tmp_path / "aws-credentials").write_text(
        f"[yc]\naws_access_key_id = {YC_KEY}\naws_secret_access_key = {YC_SECRET}\n"
    )
    (tmp_path / "aws-config").write_text("[profile yc]\nregion = ru-central1\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
           "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
           "AWS_ENDPOINT_URL_STS": fake.url}
    daemon = make_daemon(
        {"name": "app", "endpoint_url": fake.url, "stream": "app-events", **FAST_RETRY},
        {"name": "yc", "kind": "yds", "profile": "yc", "stream": YDS_STREAM, "region": DROP,
         "endpoint_url": fake.url, **FAST_RETRY},
        {"name": "audit", "kind": "firehose", "stream": "audit-to-s3", "endpoint_url": fake.url,
         "role_arn": ROLE, "external_id": EXTERNAL_ID, **FAST_RETRY, **(audit or {})},
        *more,
        env=env,
    )
    drop = " = " + json.dumps(DROP)
    kept = [line for line in daemon.config.read_text().splitlines(keepends=True) if not line.rstrip().endswith(drop)]
    daemon.config.write_text("".join(kept))
    return daemon


def _lines(tag: str, n: int, start: int = 0) -> list[bytes]:
    return [f"{tag}-{i:05d} {'x' * (i % 50)}".encode() for i in range(start, start + n)]


def _send(daemon: Any, index: int, lines: list[bytes]) -> None:
    ack = send_lines(daemon.sockets()[index], b"\n".join(lines) + b"\n")
    assert ack["accepted"] == len(lines), ack


def _firehose_lines(fake: FakeAWS) -> list[bytes]:
    return [line for r in fake.records("audit-to-s3") for line in r.data.split(b"\n") if line]


def _puts(fake: FakeAWS, stream: str) -> list[Any]:
    return [r for r in fake.requests if r.stream == stream and r.target != STS_TARGET]


def test_three_destinations_sign_as_three_identities(make_daemon, fake_aws, tmp_path):
    fake_aws.keys[YC_KEY] = YC_SECRET
    fake_aws.roles[ROLE] = Role(external_id=EXTERNAL_ID, trusted_keys=frozenset({TEST_KEYS["AWS_ACCESS_KEY_ID"]}))
    # A fourth destination with audit's identity: it shares audit's credentials (one AssumeRole).
    same_role = {"name": "audit-copy", "endpoint_url": fake_aws.url, "stream": "audit-copy", "role_arn": ROLE,
                 "external_id": EXTERNAL_ID, **FAST_RETRY}
    daemon = _daemon(make_daemon, tmp_path, fake_aws, more=(same_role,)).start()
    sent = {"app": _lines("app", 300), "yc": _lines("yc", 300), "audit": _lines("audit", 300),
            "audit-copy": _lines("copy", 100)}
    for index, name in enumerate(("app", "yc", "audit", "audit-copy")):
        _send(daemon, index, sent[name])
    wait_until(lambda: (len(fake_aws.records("app-events")) >= 300 and len(fake_aws.records(YDS_STREAM)) >= 300
                        and len(_firehose_lines(fake_aws)) >= 300 and len(fake_aws.records("audit-copy")) >= 100),
               what="every line of the four destinations")
    assert collections.Counter(r.data for r in fake_aws.records("app-events")) == collections.Counter(sent["app"])
    assert collections.Counter(r.data for r in fake_aws.records(YDS_STREAM)) == collections.Counter(sent["yc"])
    assert collections.Counter(_firehose_lines(fake_aws)) == collections.Counter(sent["audit"])

    # Each destination signs with its own identity, and only with it.
    issued = fake_aws.issued_keys()
    assert {r.access_key for r in _puts(fake_aws, "app-events")} == {TEST_KEYS["AWS_ACCESS_KEY_ID"]}
    assert {(r.access_key, r.region, r.service) for r in _puts(fake_aws, YDS_STREAM)} == {
        (YC_KEY, "ru-central1", "kinesis")}
    audit_keys = {r.access_key for r in _puts(fake_aws, "audit-to-s3")}
    assert audit_keys and audit_keys <= set(issued), "the role's requests are signed with its temporary key"
    assert {issued[k].role_arn for k in audit_keys} == {ROLE}
    assert {r.access_key for r in _puts(fake_aws, "audit-copy")} == audit_keys
    assert all(r.status == 200 and r.signature_ok for r in fake_aws.requests), fake_aws.requests[-5:]
    assert fake_aws.bad_signatures == 0

    # The role was assumed once, by the default chain's key, naming role, external id and session.
    (call,) = fake_aws.assume_role_calls()
    assert (call.access_key, call.role_arn, call.external_id, call.role_session_name, call.status) == (
        TEST_KEYS["AWS_ACCESS_KEY_ID"], ROLE, EXTERNAL_ID, default_session_name(socket.gethostname()), 200)

    # status names each identity by the last 4 characters of its key, and never a secret.
    snap = daemon.status()
    ids = {name: d["identity"] for name, d in snap["destinations"].items()}
    (audit_key,) = audit_keys
    assert ids["app"] == {"profile": None, "role_arn": None, "access_key": "..." + TEST_KEYS["AWS_ACCESS_KEY_ID"][-4:],
                          "method": "env"}
    assert ids["yc"] == {"profile": "yc", "role_arn": None, "access_key": "..." + YC_KEY[-4:],
                         "method": "shared-credentials-file"}
    assert ids["audit"] == {"profile": None, "role_arn": ROLE, "access_key": "..." + audit_key[-4:],
                            "method": "assume-role"}
    table = daemon.cli("status").stdout
    assert f"  app: key ...{TEST_KEYS['AWS_ACCESS_KEY_ID'][-4:]}, from env\n" in table
    assert f"  yc: key ...{YC_KEY[-4:]}, profile yc, from shared-credentials-file\n" in table
    assert f"  audit: key ...{audit_key[-4:]}, role {ROLE}, from assume-role\n" in table
    text = json.dumps(snap) + table
    for secret in (TEST_KEYS["AWS_SECRET_ACCESS_KEY"], YC_SECRET, issued[audit_key].secret_key,
                   issued[audit_key].session_token, YC_KEY, audit_key, EXTERNAL_ID):
        assert secret not in text
    for secret in (TEST_KEYS["AWS_SECRET_ACCESS_KEY"], YC_SECRET, issued[audit_key].secret_key,
                   issued[audit_key].session_token):
        assert secret not in daemon.log()
    assert daemon.stop() == 0


def test_assumed_role_is_refreshed_before_it_expires(make_daemon, fake_aws, tmp_path):
    fake_aws.keys[YC_KEY] = YC_SECRET
    fake_aws.roles[ROLE] = Role(external_id=EXTERNAL_ID)
    fake_aws.sts_lifetime = SHORT_LIFETIME
    daemon = _daemon(make_daemon, tmp_path, fake_aws, audit={"role_session_name": "audit-writer"}).start()
    sent: list[bytes] = []

    def keep_sending() -> bool:
        # One small batch per poll, so requests are signed all along the keys' lifetimes.
        batch = _lines("audit", 5, start=len(sent))
        _send(daemon, 2, batch)
        sent.extend(batch)
        return len(fake_aws.assume_role_calls()) >= 3 and len(_firehose_lines(fake_aws)) >= len(sent) - 5

    wait_until(keep_sending, timeout=10 * SHORT_LIFETIME, what="two refreshes of the assumed role")
    wait_until(lambda: len(_firehose_lines(fake_aws)) >= len(sent), what="every line sent")
    assert collections.Counter(_firehose_lines(fake_aws)) == collections.Counter(sent)

    calls = fake_aws.assume_role_calls()
    assert all((c.role_arn, c.external_id, c.role_session_name, c.status) == (ROLE, EXTERNAL_ID, "audit-writer", 200)
               for c in calls)
    for before, after in zip(calls, calls[1:]):
        assert before.expiration is not None and after.at < before.expiration, "assumed again before expiry"
    # No request was signed with an expired key: the endpoint would have refused it.
    puts = _puts(fake_aws, "audit-to-s3")
    assert {r.error for r in puts} == {None} and all(r.signature_ok for r in puts)
    assert len({r.access_key for r in puts}) >= 2, "requests moved on to the refreshed key"
    assert daemon.stop() == 0


def test_access_denied_shows_in_status_and_lines_wait_until_fixed(make_daemon, fake_aws, tmp_path):
    fake_aws.keys[YC_KEY] = YC_SECRET
    fake_aws.roles[ROLE] = Role(external_id="another-customer")  # the trust policy wants another id
    daemon = _daemon(make_daemon, tmp_path, fake_aws).start()
    _send(daemon, 2, _lines("audit", 40))
    _send(daemon, 0, _lines("app", 40))
    wait_until(lambda: len(fake_aws.records("app-events")) >= 40, what="the healthy destination's lines")

    snap = wait_until(lambda: (s := daemon.status())["destinations"]["audit"]["last_error"] and s,
                      what="the credential failure as audit's last error")
    audit = snap["destinations"]["audit"]
    assert "AccessDenied" in audit["last_error"] and "AssumeRole" in audit["last_error"]
    assert audit["spooled_lines"] == 40 and audit["lines_sent"] == 0
    assert audit["identity"]["role_arn"] == ROLE and audit["identity"]["access_key"] is None
    assert snap["destinations"]["app"]["last_error"] == ""
    assert _puts(fake_aws, "audit-to-s3") == []
    assert {c.status for c in fake_aws.assume_role_calls()} == {403}

    fake_aws.roles[ROLE] = Role(external_id=EXTERNAL_ID)  # the trust policy is fixed
    wait_until(lambda: len(_firehose_lines(fake_aws)) >= 40, what="the waiting lines, once the role can be assumed")
    assert collections.Counter(_firehose_lines(fake_aws)) == collections.Counter(_lines("audit", 40))
    assert daemon.stop() == 0


def test_roles_through_profiles(make_daemon, fake_aws, tmp_path):
    """A profile that itself assumes a role (role_arn + source_profile in the config file, done by
    botocore), and a destination's own role_arn on top of a profile's static key."""
    base_key, base_secret = "AKIDBASEPROFILE0001", "base-profile-secret"
    other_role = "arn:aws:iam::123456789012:role/team-b-writer"
    fake_aws.keys[base_key] = base_secret
    trusted = frozenset({base_key})
    fake_aws.roles[ROLE] = Role(external_id=EXTERNAL_ID, trusted_keys=trusted)
    fake_aws.roles[other_role] = Role(trusted_keys=trusted)
    (tmp_path / "aws-credentials").write_text(
        f"[base]\naws_access_key_id = {base_key}\naws_secret_access_key = {base_secret}\n")
    (tmp_path / "aws-config").write_text(
        f"[profile ops]\nrole_arn = {ROLE}\nsource_profile = base\nexternal_id = {EXTERNAL_ID}\n"
        "role_session_name = ops-session\nregion = us-east-1\n")
    daemon = make_daemon(
        {"name": "viaprofile", "endpoint_url": fake_aws.url, "stream": "ops-events", "profile": "ops", **FAST_RETRY},
        {"name": "ownrole", "endpoint_url": fake_aws.url, "stream": "team-b-events", "profile": "base",
         "role_arn": other_role, "role_session_name": "team-b", **FAST_RETRY},
        env={"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
             "AWS_CONFIG_FILE": str(tmp_path / "aws-config"), "AWS_ENDPOINT_URL_STS": fake_aws.url},
    ).start()
    _send(daemon, 0, _lines("ops", 100))
    _send(daemon, 1, _lines("teamb", 100))
    wait_until(lambda: len(fake_aws.records("ops-events")) >= 100 and len(fake_aws.records("team-b-events")) >= 100,
               what="the lines of both destinations")
    assert collections.Counter(r.data for r in fake_aws.records("ops-events")) == collections.Counter(
        _lines("ops", 100))
    assert collections.Counter(r.data for r in fake_aws.records("team-b-events")) == collections.Counter(
        _lines("teamb", 100))
    issued = fake_aws.issued_keys()
    for stream, role in (("ops-events", ROLE), ("team-b-events", other_role)):
        keys = {r.access_key for r in _puts(fake_aws, stream)}
        assert keys and keys <= set(issued) and {issued[k].role_arn for k in keys} == {role}
    calls = {(c.access_key, c.role_arn, c.external_id, c.role_session_name, c.status)
             for c in fake_aws.assume_role_calls()}
    assert calls == {(base_key, ROLE, EXTERNAL_ID, "ops-session", 200), (base_key, other_role, None, "team-b", 200)}
    assert all(r.status == 200 and r.signature_ok for r in fake_aws.requests)
    assert daemon.stop() == 0


def test_expired_token_shows_in_status_until_the_keys_are_replaced(make_daemon, fake_aws, tmp_path):
    """A profile holding temporary keys that have expired: the endpoint refuses them, status
    says so, the lines wait; new keys in the file and a reload let them through."""
    fake_aws.roles[ROLE] = Role()
    fake_aws.sts_lifetime = 1
    sts = boto3.client("sts", endpoint_url=fake_aws.url, region_name="us-east-1",
                       config=Config(retries={"total_max_attempts": 1}),
                       aws_access_key_id=TEST_KEYS["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"])
    stale = sts.assume_role(RoleArn=ROLE, RoleSessionName="handed-out")["Credentials"]
    sts.close()
    files = tmp_path / "aws-credentials"
    files.write_text(f"[stale]\naws_access_key_id = {stale['AccessKeyId']}\n"
                     f"aws_secret_access_key = {stale['SecretAccessKey']}\n"
                     f"aws_session_token = {stale['SessionToken']}\n")
    end = fake_aws.issued_keys()[stale["AccessKeyId"]].expiration
    wait_until(lambda: time.time() >= end, what="the handed-out key's end")
    daemon = make_daemon({"name": "app", "endpoint_url": fake_aws.url, "stream": "app-events", "profile": "stale",
                          **FAST_RETRY},
                         env={"AWS_SHARED_CREDENTIALS_FILE": str(files),
                              "AWS_CONFIG_FILE": str(tmp_path / "no-config")}).start()
    _send(daemon, 0, _lines("app", 30))
    snap = wait_until(lambda: (s := daemon.status())["destinations"]["app"]["last_error"] and s,
                      what="the expired token as app's last error")
    app = snap["destinations"]["app"]
    assert "ExpiredTokenException" in app["last_error"]
    assert app["spooled_lines"] == 30 and app["lines_sent"] == 0
    assert app["identity"]["access_key"] == "..." + stale["AccessKeyId"][-4:]
    assert fake_aws.records("app-events") == []

    fake_aws.keys["AKIDREPLACEMENT0001"] = "replacement-secret"
    files.write_text("[stale]\naws_access_key_id = AKIDREPLACEMENT0001\naws_secret_access_key = replacement-secret\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(fake_aws.records("app-events")) >= 30, what="the waiting lines, with the new keys")
    assert collections.Counter(r.data for r in fake_aws.records("app-events")) == collections.Counter(
        _lines("app", 30))
    assert {r.access_key for r in _puts(fake_aws, "app-events") if r.status == 200} == {"AKIDREPLACEMENT0001"}
    assert daemon.stop() == 0
