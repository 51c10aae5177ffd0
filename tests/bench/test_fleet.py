"""The fleet benchmark's endpoint (per-shard token buckets, line ids) and a smoke run of
tests/bench/fleet.py, so the harness cannot rot."""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

from spoold.aggregation import AggregateBuilder
from tests.bench.endpoint import FleetAWS, TokenBucket, subrecords
from tests.tools.fakeaws import ACCOUNT_ID, HASH_SPACE

ROOT = Path(__file__).resolve().parents[2]
FLEET = ROOT / "tests" / "bench" / "fleet.py"
PTEE = "ProvisionedThroughputExceededException"
SHARD0_KEY = "0"  # ExplicitHashKeys that pick shard 0 and shard 1 of two
SHARD1_KEY = str(HASH_SPACE // 2)
DEADLINE = 10.0


class Clock:
    """Monotonic nanoseconds the test moves by hand."""

    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fleet_server(clock: Clock, **kwargs: Any) -> FleetAWS:
    kwargs.setdefault("shards", 1)
    return FleetAWS(verify=False, store=False, clock=clock, **kwargs)


def put(srv: FleetAWS, records: list[dict[str, str]], stream: str = "S") -> httpx.Response:
    body = json.dumps({"StreamName": stream, "Records": records})
    return httpx.post(srv.url + "/", content=body, timeout=DEADLINE,
                      headers={"X-Amz-Target": "Kinesis_20131202.PutRecords",
                               "Content-Type": "application/x-amz-json-1.1"})


def rec(data: bytes, key: str = "k", explicit: str | None = None) -> dict[str, str]:
    r = {"Data": base64.b64encode(data).decode(), "PartitionKey": key}
    if explicit is not None:
        r["ExplicitHashKey"] = explicit
    return r


def line(daemon: int, seq: int, pad: int = 20) -> bytes:
    return b'{"id":"%03d-%07d","k":"x","p":"%s"}' % (daemon, seq, b"x" * pad)


def message(shard: str, stream: str = "S") -> str:
    return f"Rate exceeded for shard {shard} in stream {stream} under account {ACCOUNT_ID}."


# ---- token buckets -----------------------------------------------------------------------------

def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    b = TokenBucket(1000.0, 1.0, now_ns=0)
    assert b.tokens == 1000.0
    b.tokens = 0.0
    b.refill(250_000_000)
    assert b.tokens == pytest.approx(250.0)
    b.refill(10_000_000_000)
    assert b.tokens == 1000.0  # capped at one second of budget
    b.refill(5_000_000_000)  # a clock read out of order adds nothing
    assert b.tokens == 1000.0


def test_records_over_a_shards_budget_are_throttled_per_record_naming_the_shard(clock: Clock) -> None:
    with fleet_server(clock, shard_records=10) as srv:
        reply = put(srv, [rec(b"r%d" % i) for i in range(15)])
        assert reply.status_code == 200
        doc = reply.json()
        assert doc["FailedRecordCount"] == 5
        ok, failed = doc["Records"][:10], doc["Records"][10:]
        assert all(r["ShardId"] == "shardId-000000000000" and r["SequenceNumber"] for r in ok)
        assert all(r == {"ErrorCode": PTEE, "ErrorMessage": message("shardId-000000000000")} for r in failed)
        # Empty bucket: nothing passes until it refills; a refused record took nothing from it.
        assert put(srv, [rec(b"again")]).json()["FailedRecordCount"] == 1
        clock.advance(0.5)
        doc = put(srv, [rec(b"x%d" % i) for i in range(10)]).json()
        assert doc["FailedRecordCount"] == 5
        shard = srv.fleet_dump()["shards"]["S"][0]
        assert (shard["offered"], shard["accepted"], shard["throttled"]) == (26, 15, 11)


def test_shards_have_separate_budgets(clock: Clock) -> None:
    with fleet_server(clock, shards=2, shard_records=3) as srv:
        doc = put(srv, [rec(b"a", explicit=SHARD1_KEY) for _ in range(5)] + [rec(b"b", explicit=SHARD0_KEY)]).json()
        results = doc["Records"]
        assert doc["FailedRecordCount"] == 2
        assert [r.get("ShardId") for r in results[:3]] == ["shardId-000000000001"] * 3
        assert results[3]["ErrorMessage"] == results[4]["ErrorMessage"] == message("shardId-000000000001")
        assert results[5]["ShardId"] == "shardId-000000000000"  # the hot shard does not hold it back


def test_the_byte_budget_counts_data_and_partition_key(clock: Clock) -> None:
    with fleet_server(clock, shard_bytes=1000) as srv:
        doc = put(srv, [rec(b"x" * 590, key="k" * 10), rec(b"y" * 590, key="k" * 10),
                        rec(b"z" * 390, key="k" * 10)]).json()
        assert [("ShardId" in r) for r in doc["Records"]] == [True, False, True]
        assert doc["Records"][1]["ErrorCode"] == PTEE
        # A record as large as the whole budget passes a full bucket only.
        clock.advance(0.9)
        assert put(srv, [rec(b"w" * 999, key="k")]).json()["FailedRecordCount"] == 1
        clock.advance(0.1)
        assert put(srv, [rec(b"w" * 999, key="k")]).json()["FailedRecordCount"] == 0
        assert srv.fleet_dump()["shards"]["S"][0]["accepted_bytes"] == 600 + 400 + 1000


@pytest.mark.parametrize("code", [PTEE, "LimitExceededException"])
def test_whole_request_throttling_refuses_and_takes_nothing(clock: Clock, code: str) -> None:
    with fleet_server(clock, shard_records=4, whole_throttle_share=0.5, whole_code=code) as srv:
        reply = put(srv, [rec(b"r") for _ in range(8)])  # half of it over budget: refused whole
        assert reply.status_code == 400
        assert reply.json() == {"__type": code, "message": f"Rate exceeded for stream S under account {ACCOUNT_ID}."}
        doc = put(srv, [rec(b"r") for _ in range(5)]).json()  # one of five over: per record
        assert doc["FailedRecordCount"] == 1
        dump = srv.fleet_dump()
        assert dump["refused_requests"] == 1
        assert dump["shards"]["S"][0]["refused"] == 8
        assert dump["shards"]["S"][0]["accepted"] == 4


def test_botocore_reads_the_throttled_reply(clock: Clock) -> None:
    with fleet_server(clock, shards=4, shard_records=2) as srv:
        client = boto3.client("kinesis", endpoint_url=srv.url, region_name="us-east-1",
                              aws_access_key_id="AKIDSPOOLDTEST", aws_secret_access_key="spoold-test-secret",
                              config=Config(retries={"total_max_attempts": 1}))
        try:
            shards = client.list_shards(StreamName="S")["Shards"]
            start = shards[2]["HashKeyRange"]["StartingHashKey"]
            resp = client.put_records(StreamName="S", Records=[
                {"Data": b"d", "PartitionKey": "p", "ExplicitHashKey": start} for _ in range(3)])
        finally:
            client.close()
        assert resp["FailedRecordCount"] == 1
        assert [r.get("ShardId") for r in resp["Records"]] == ["shardId-000000000002"] * 2 + [None]
        assert resp["Records"][2]["ErrorCode"] == PTEE
        assert "shardId-000000000002" in resp["Records"][2]["ErrorMessage"]


def test_yds_shard_ids_name_shards_in_every_reply(clock: Clock) -> None:
    with fleet_server(clock, shards=2, shard_records=1, yds_shard_ids=True) as srv:
        doc = put(srv, [rec(b"a", explicit=SHARD1_KEY), rec(b"b", explicit=SHARD1_KEY)]).json()
        assert doc["Records"][0]["ShardId"] == "shard-000001"
        assert doc["Records"][1]["ErrorMessage"] == message("shard-000001")
        shards = httpx.post(srv.url + "/", content=b'{"StreamName": "S"}', timeout=DEADLINE,
                            headers={"X-Amz-Target": "Kinesis_20131202.DescribeStream",
                                     "Content-Type": "application/x-amz-json-1.1"}).json()
        assert [s["ShardId"] for s in shards["StreamDescription"]["Shards"]] == ["shard-000000", "shard-000001"]


# ---- line ids ----------------------------------------------------------------------------------

def test_subrecords_walks_every_line_of_an_aggregate() -> None:
    lines = [line(1, i, pad=i) for i in range(50)]
    builder = AggregateBuilder(1 << 20, "key")
    assert builder.extend(lines) == 50
    assert subrecords(builder.build()) == lines
    assert subrecords(b"plain line") is None


def test_lines_are_counted_by_id_through_aggregates(clock: Clock) -> None:
    with fleet_server(clock) as srv:
        builder = AggregateBuilder(1 << 20, "key")
        builder.extend([line(2, i) for i in range(100)])
        assert put(srv, [rec(builder.build(), key="key"), rec(line(3, 0)), rec(line(3, 2)),
                         rec(line(3, 2)), rec(b"no id here")]).status_code == 200
        dump = srv.fleet_dump()
        d2, d3 = dump["daemons"]["2"], dump["daemons"]["3"]
        assert (d2["distinct"], d2["duplicates"], d2["ids_below"]) == (100, 0, 100)
        assert (d3["distinct"], d3["duplicates"], d3["missing_below"]) == (2, 1, [1, [1]])
        assert dump["unparsed_lines"] == 1
        assert dump["shards"]["S"][0]["accepted_lines"] == 100 + 4


def test_held_requests_wait_for_the_release(clock: Clock) -> None:
    with fleet_server(clock, shard_records=10, hold=True) as srv:
        answers: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answers.append(put(srv, [rec(line(0, 0))])))
        sender.start()
        srv.wait_for(lambda s: s.count_requests >= 1, timeout=DEADLINE)
        assert sender.is_alive() and not answers  # arrived, not answered
        assert srv.fleet_summary()["held"]
        clock.advance(2.0)
        srv.release()
        sender.join(DEADLINE)
        assert answers and answers[0].json()["FailedRecordCount"] == 0
        assert srv.released_ns == clock.ns
        assert srv.fleet_summary()["daemons"] == {"0": [1, 1]}


# ---- the harness -------------------------------------------------------------------------------

def test_fleet_bench_smoke_every_line_exactly_once(tmp_path: Path) -> None:
    """Two real daemons, 200 lines each, one shard throttled to 150 records/s: the harness runs
    end to end and its JSON counts every line exactly once."""
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [sys.executable, str(FLEET), "--daemons", "2", "--lines", "200", "--shards", "1",
         "--shard-records", "150", "--timeout", "90", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:] + proc.stdout.decode()[-2000:]
    r = json.loads(out.read_text())
    assert r["complete"] and r["settled"]
    assert (r["lines_delivered"], r["lost"], r["duplicated"], r["unexpected"]) == (400, 0, 0, 0)
    assert r["records_accepted"] == 400
    assert r["records_offered"] > 400  # 400 lines against 150 records/s: some were throttled
    assert r["per_shard"][0]["throttled"] == r["records_offered"] - 400
    assert all(f is not None and f > 0 for f in r["finish_s"])
    assert r["daemon_totals"]["lines_sent"] == 400
    assert "lines lost 0, duplicated 0" in proc.stdout.decode()


@pytest.mark.parametrize("mode", ["records", "hot", "kpl"])
def test_fleet_simulation_runs_the_real_machine_to_completion(mode: str) -> None:
    """tests/bench/fleetsim.py: a small simulated fleet finishes, and a hot key leaves the other
    shards' lines within twice their own need (simulated time: no clock is read)."""
    from tests.bench.fleetsim import main, run

    args = argparse.Namespace(daemons=4, lines=400, shards=2, mode=mode, size=None, seed=3, rtt=0.01,
                              no_map=False, set=[])
    r = run(args)
    assert r["complete"] and r["sent_per_accepted"] >= 1.0
    if mode == "hot":
        assert r["others_ratio"] <= 2.0, r
    assert main(["--daemons", "2", "--lines", "50", "--shards", "1", "--no-map"]) == 0
