"""Per-shard pacing against the real daemon: the shard map is fetched and used (a whole-request
throttle ends slow start, after which random-key records are routed to shards by
ExplicitHashKey), a reshard seen in replies (a ShardId the map did not predict) refreshes the map
at once, and without permission to list shards the daemon paces per destination, says so once,
and still delivers every line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spoold.flusher import SHARD_MAP_RETRY
from tests.conftest import TEST_KEYS, send_lines, wait_until
from tests.tools.fakeaws import FakeAWS

PTEE = "ProvisionedThroughputExceededException"
RETRY = {"retry_base": "5ms", "retry_cap": "50ms", "retry_cap_throttle": "50ms", "linger": "5ms"}


def _status(daemon: Any) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "spoold", "status", "--json", "--config", str(daemon.config)],
                         capture_output=True, text=True, timeout=60, env=daemon.env)
    return json.loads(out.stdout)["destinations"]["d0"]  # type: ignore[no-any-return]


def _lines(n: int, tag: str) -> list[bytes]:
    return [b"%s-%05d" % (tag.encode(), i) for i in range(n)]


@pytest.fixture
def four_shards() -> Iterator[FakeAWS]:
    """The fake endpoint with a stream of four shards (the shared fixture's has one)."""
    with FakeAWS(access_key=TEST_KEYS["AWS_ACCESS_KEY_ID"], secret_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
                 verify=True, store=True, seed=9, shards=4) as srv:
        yield srv


def test_shard_map_is_fetched_and_routes_records_after_a_throttle(make_daemon, four_shards):
    fake_aws = four_shards
    daemon = make_daemon({"endpoint_url": fake_aws.url, **RETRY}).start()
    wait_until(lambda: any(r.target.endswith("ListShards") and r.status == 200 for r in fake_aws.requests),
               what="ListShards")
    wait_until(lambda: _status(daemon)["pace_shards"] == 4, what="four shards paced")
    first = _lines(200, "a")
    send_lines(daemon.sockets()[0], b"\n".join(first) + b"\n")
    wait_until(lambda: len(fake_aws.all_records()) >= 200, what="the first lines")
    assert all(r.explicit_hash_key is None for r in fake_aws.all_records()), "no throttle yet: keys hash"
    fake_aws.faults.scripted.append((400, json.dumps({"__type": PTEE, "message": "Rate exceeded"}).encode()))
    second = _lines(300, "b")
    send_lines(daemon.sockets()[0], b"\n".join(second) + b"\n")
    wait_until(lambda: len(fake_aws.all_records()) >= 500, what="every line")
    records = fake_aws.all_records()
    assert sorted(r.data for r in records) == sorted(first + second), "each line once"
    routed = [r for r in records if r.explicit_hash_key is not None]
    assert routed, "after a throttle, random keys are routed by ExplicitHashKey"
    assert len({r.shard_id for r in routed}) > 1, "routed over several shards"
    assert _status(daemon)["throttled_records"] >= 1
    daemon.stop()


def _list_shards(fake_aws: FakeAWS) -> int:
    return sum(1 for r in fake_aws.requests if r.target.endswith("ListShards") and r.status == 200)


@pytest.mark.parametrize("sender", ["inline", "process"])  # the ShardId crosses the helper's pipe too
def test_a_reshard_seen_in_replies_refreshes_the_shard_map_at_once(make_daemon, four_shards, sender):
    fake_aws = four_shards
    daemon = make_daemon({"endpoint_url": fake_aws.url, "partition_key_field": "k", **RETRY},
                         extra=f'[daemon]\nsender = "{sender}"\n').start()
    wait_until(lambda: _status(daemon)["pace_shards"] == 4, what="four shards paced")
    first = [b'{"k":"key%d","n":%d}' % (i % 50, i) for i in range(400)]
    send_lines(daemon.sockets()[0], b"\n".join(first) + b"\n")
    wait_until(lambda: len(fake_aws.all_records()) >= 400, what="the first lines")
    assert _list_shards(fake_aws) == 1 and not [e for e in daemon.log_events() if e.get("event") == "shard_map_stale"]

    new_ids = fake_aws.reshard(8)
    second = [b'{"k":"key%d","n":%d}' % (i % 50, i + 400) for i in range(400)]
    send_lines(daemon.sockets()[0], b"\n".join(second) + b"\n")
    # Well before the periodic refresh (60 s after the first fetch): the replies named new shards.
    wait_until(lambda: _list_shards(fake_aws) >= 2, timeout=20.0, what="the shard map fetched again")
    wait_until(lambda: _status(daemon)["pace_shards"] == 8, timeout=20.0, what="eight shards paced")
    wait_until(lambda: len(fake_aws.all_records()) >= 800, what="every line")
    records = fake_aws.all_records()
    assert sorted(r.data for r in records) == sorted(first + second), "each line once"
    stale = [e for e in daemon.log_events() if e.get("event") == "shard_map_stale"]
    assert stale and stale[0]["reply"] in new_ids and stale[0]["predicted"].startswith("shardId-00000000000")
    assert stale[0]["predicted"] not in new_ids
    assert len(stale) <= _list_shards(fake_aws) - 1, "logged once per refresh"
    daemon.stop()


def test_stale_signs_the_listed_map_does_not_confirm_wait_for_the_periodic_refresh(make_daemon, four_shards):
    """An endpoint whose replies keep naming shards its listing lacks (a listing that lags, or a
    service that routes otherwise): one extra ListShards, then no more than before."""
    fake_aws = four_shards
    daemon = make_daemon({"endpoint_url": fake_aws.url, "partition_key_field": "k", **RETRY}).start()
    wait_until(lambda: _status(daemon)["pace_shards"] == 4, what="four shards paced")
    fake_aws.reshard(8, listed=False)
    sent: list[bytes] = []

    def send_round() -> None:
        lines = [b'{"k":"key%d","n":%d}' % (i % 50, len(sent) + i) for i in range(100)]
        sent.extend(lines)
        send_lines(daemon.sockets()[0], b"\n".join(lines) + b"\n")
        wait_until(lambda: len(fake_aws.all_records()) >= len(sent), what="the round's lines")

    send_round()
    wait_until(lambda: _list_shards(fake_aws) >= 2, timeout=20.0, what="the shard map fetched again")
    # Replies still name unlisted shards: without the fallback a ListShards would follow each retry gap.
    end = time.monotonic() + SHARD_MAP_RETRY + 3.0
    while time.monotonic() < end:
        send_round()
    assert _list_shards(fake_aws) == 2
    assert len([e for e in daemon.log_events() if e.get("event") == "shard_map_stale"]) == 1
    assert sorted(r.data for r in fake_aws.all_records()) == sorted(sent), "each line once"
    assert _status(daemon)["pace_shards"] == 4
    daemon.stop()


def test_no_permission_to_list_shards_paces_per_destination_and_logs_once(make_daemon, fake_aws):
    fake_aws.faults.denied = frozenset({"ListShards"})
    daemon = make_daemon({"endpoint_url": fake_aws.url, **RETRY}).start()
    lines = _lines(2000, "c")
    fake_aws.faults.record_fail_rate = 0.2  # failures and retries meanwhile: still every line, once
    for i in range(0, 2000, 500):
        send_lines(daemon.sockets()[0], b"\n".join(lines[i:i + 500]) + b"\n")
    wait_until(lambda: len(fake_aws.all_records()) >= 2000, what="every line")
    assert sorted(r.data for r in fake_aws.all_records()) == sorted(lines)
    assert _status(daemon)["pace_shards"] == 0
    denied = [e for e in daemon.log_events() if e.get("event") == "shard_map_unavailable"]
    assert len(denied) == 1 and "AccessDeniedException" in denied[0]["error"], denied
    assert all(r.explicit_hash_key is None for r in fake_aws.all_records())
    daemon.stop()
