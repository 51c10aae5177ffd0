"""The machine sees a stale shard map in replies: a PutRecords reply's ShardId (protocol.Outcomes.shard,
its first accepted record) against the shard the map predicted for that record."""

from __future__ import annotations

from spoold.machine import Outbox, Send
from spoold.protocol import Outcomes
from tests.unit.test_machine import (
    PTEE,
    WALL,
    keyed_lines,
    keys_on,
    lines,
    offer,
    send,
    shard_map,
    sharded,
)


def _keyed_send(shard: int) -> tuple[Outbox, Send]:
    m, smap = sharded(2, linger=0.0, partition_key_field="k")
    offer(m, 1, keyed_lines(keys_on(smap, shard, 5)))
    return m, send(m, 0.0)


def test_a_reply_naming_another_shard_says_the_map_is_stale() -> None:
    m, s = _keyed_send(1)
    assert set(s.shards or ()) == {1}
    m.on_reply(s, Outcomes([None] * len(s.batch), (0, "shardId-000000000007")), 0.01, WALL)
    effects = m.take_effects()
    assert effects.stale_map == ("shardId-000000000001", "shardId-000000000007")
    assert len(effects.deleted) == 1, "the records are accepted all the same"


def test_a_reply_naming_the_predicted_shard_says_nothing() -> None:
    m, s = _keyed_send(0)
    m.on_reply(s, Outcomes([None] * len(s.batch), (0, "shardId-000000000000")), 0.01, WALL)
    assert m.take_effects().stale_map is None


def test_the_first_accepted_record_of_a_partial_reply_is_the_one_checked() -> None:
    m, s = _keyed_send(1)
    outcomes = Outcomes([PTEE, None] + [None] * (len(s.batch) - 2), (1, "shardId-000000000000"))
    m.on_reply(s, outcomes, 0.01, WALL)
    assert m.take_effects().stale_map == ("shardId-000000000001", "shardId-000000000000")


def test_spread_records_a_plain_list_and_an_old_maps_batch_say_nothing() -> None:
    m, _ = sharded(4, linger=0.0)
    offer(m, 1, lines(20))
    s = send(m, 0.0)
    assert set(s.shards or ()) == {-1}, "random keys, no throttle yet: spread"
    m.on_reply(s, Outcomes([None] * len(s.batch), (0, "shardId-000000000099")), 0.01, WALL)
    assert m.take_effects().stale_map is None
    m, s = _keyed_send(1)
    m.on_reply(s, [None] * len(s.batch), 0.01, WALL)  # no hint
    assert m.take_effects().stale_map is None
    m, s = _keyed_send(1)
    m.set_shard_map(shard_map(4, first=2), 0.005)  # fetched meanwhile: the batch's prediction is moot
    m.on_reply(s, Outcomes([None] * len(s.batch), (0, "shardId-000000000004")), 0.01, WALL)
    assert m.take_effects().stale_map is None


def test_a_keyed_kpl_aggregate_is_checked_as_one_record() -> None:
    m, smap = sharded(2, linger=0.0, aggregation="kpl", partition_key_field="k", max_record_bytes=1024 * 1024)
    offer(m, 1, keyed_lines(keys_on(smap, 1, 30)))
    s = send(m, 0.0)
    assert len(s.batch) == 1 and s.shards == [1], "one aggregate, sent to shard 1's first hash key"
    m.on_reply(s, Outcomes([None], (0, "shardId-000000000002")), 0.01, WALL)
    assert m.take_effects().stale_map == ("shardId-000000000001", "shardId-000000000002")
