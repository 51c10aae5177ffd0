"""KPL aggregation end to end: the real daemon aggregates, the fake endpoint routes by hash key
to its shards, and the independent aws-kinesis-agg library de-aggregates what arrived."""

from __future__ import annotations

import base64
import collections
import hashlib
import json

import pytest

from tests.tools.client import send_lines, wait_until
from tests.tools.daemon import TEST_KEYS


@pytest.fixture
def sharded_aws():
    from tests.tools.fakeaws import FakeAWS

    with FakeAWS(access_key=TEST_KEYS["AWS_ACCESS_KEY_ID"], secret_key=TEST_KEYS["AWS_SECRET_ACCESS_KEY"],
                 shards=4, seed=3) as srv:
        _CACHE.clear()
        yield srv


_CACHE: dict[tuple[str, str], list] = {}


def _deaggregate(records):
    """(record, sub partition key, sub data) for every sub-record; each record is de-aggregated
    once (the library is slow and prints to stdout, which is silenced)."""
    out = []
    for r in records:
        key = (r.shard_id, r.sequence_number)
        if key not in _CACHE:
            _CACHE[key] = _deaggregate_one(r)
        out.extend(_CACHE[key])
    return out


def _deaggregate_one(r):
    import contextlib
    import io

    from aws_kinesis_agg.deaggregator import deaggregate_records

    out = []
    for n, rec in enumerate([r]):
        event = {"kinesis": {"data": base64.b64encode(rec.data).decode(), "partitionKey": rec.partition_key,
                             "sequenceNumber": str(n), "kinesisSchemaVersion": "1.0",
                             "approximateArrivalTimestamp": 1700000000.0},
                 "eventSource": "aws:kinesis"}
        if rec.explicit_hash_key:
            event["kinesis"]["explicitHashKey"] = rec.explicit_hash_key
        with contextlib.redirect_stdout(io.StringIO()):
            subs = deaggregate_records([event])
        for sub in subs:
            out.append((r, sub["kinesis"]["partitionKey"], base64.b64decode(sub["kinesis"]["data"])))
    return out


def _shard_of(key: str, shards) -> str:
    h = int.from_bytes(hashlib.md5(key.encode()).digest(), "big")
    return next(sid for sid, (lo, hi) in shards.items() if lo <= h <= hi)


def _shards(srv) -> dict[str, tuple[int, int]]:
    from tests.tools.fakeaws import shard_id, shard_ranges

    return {shard_id(i): rng for i, rng in enumerate(shard_ranges(4))}


def test_random_keys_aggregate_and_deaggregate_byte_for_byte(make_daemon, sharded_aws):
    lines = [f"agg-{i:05d} {'p' * (i % 90)}".encode() for i in range(5000)] + [b"\xff\x00 binary"]
    daemon = make_daemon({"endpoint_url": sharded_aws.url, "aggregation": "kpl"}).start()
    assert send_lines(daemon.sockets()[0], b"\n".join(lines))["accepted"] == len(lines)
    subs = wait_until(lambda: (s := _deaggregate(sharded_aws.all_records())) and len(s) >= len(lines) and s,
                      what="every line, de-aggregated")
    assert sorted(data for _, _, data in subs) == sorted(lines)
    records = sharded_aws.all_records()
    assert len(records) < len(lines) / 50, f"{len(records)} records for {len(lines)} lines: not aggregated"
    assert all(len(r.data) + len(r.partition_key) <= 1024 * 1024 for r in records)
    daemon.stop()


def test_keyed_lines_share_an_aggregate_only_within_one_shard(make_daemon, sharded_aws):
    daemon = make_daemon({"endpoint_url": sharded_aws.url, "aggregation": "kpl",
                          "partition_key_field": "k"}).start()
    # Let the daemon learn the shard map first, so that lines of different keys are grouped.
    wait_until(lambda: any(r.target.endswith("ListShards") for r in sharded_aws.requests), what="ListShards")
    lines = [json.dumps({"k": f"user-{i % 300}", "n": i}).encode() for i in range(6000)]
    assert send_lines(daemon.sockets()[0], b"\n".join(lines))["accepted"] == len(lines)
    subs = wait_until(lambda: (s := _deaggregate(sharded_aws.all_records())) and len(s) >= len(lines) and s,
                      what="every line, de-aggregated")
    assert sorted(data for _, _, data in subs) == sorted(lines)
    shards = _shards(sharded_aws)
    by_record = collections.defaultdict(set)
    for record, key, data in subs:
        assert json.loads(data)["k"] == key, "each sub-record keeps its own partition key"
        # The KCL drops a sub-record whose key hashes outside the shard holding its aggregate.
        assert _shard_of(key, shards) == record.shard_id, f"{key} aggregated into {record.shard_id}"
        by_record[id(record)].add(key)
    assert max(len(keys) for keys in by_record.values()) > 1, "keys of one shard should share aggregates"
    assert len(sharded_aws.all_records()) <= 40
    daemon.stop()


def test_failed_aggregate_is_resent_alone(make_daemon, sharded_aws):
    sharded_aws.faults.record_fail_rate = 0.3
    lines = [f"r-{i}".encode() for i in range(20000)]
    daemon = make_daemon({"endpoint_url": sharded_aws.url, "aggregation": "kpl", "max_record_bytes": "16KiB",
                          "max_line_bytes": 1024, "retry_base": "5ms"}).start()
    assert send_lines(daemon.sockets()[0], b"\n".join(lines))["accepted"] == len(lines)
    subs = wait_until(lambda: (s := _deaggregate(sharded_aws.all_records())) and len(s) >= len(lines) and s,
                      what="every line")
    got = collections.Counter(data for _, _, data in subs)
    assert set(got) == set(lines) and max(got.values()) == 1
    failed = sum(r.n_failed for r in sharded_aws.requests)
    offered = sum(r.n_records for r in sharded_aws.requests if r.target.endswith("PutRecords"))
    assert failed > 0 and offered == len(sharded_aws.all_records()) + failed
    daemon.stop()
