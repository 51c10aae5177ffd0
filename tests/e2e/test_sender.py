"""spoold.sender: freeing each reply at once, the helper's wire framing, and the helper
process itself (real subprocess, real loopback endpoint): outcomes, kill -9, hangs, exits."""

from __future__ import annotations

import gc
import json
import os
import signal
import struct
import subprocess
import sys
import weakref

import httpx
import pytest
import trio
import trio.testing
from botocore.credentials import ReadOnlyCredentials

from spoold.batching import Entry
from spoold.errors import RetryableSendError
from spoold.protocol import Api
from spoold.sender import MAX_FRAME, ProcessSender, _frames, uncycled
from spoold.signing import sign
from tests.tools.client import DEADLINE, send_lines, wait_until
from tests.tools.daemon import TEST_KEYS


def _reply(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b'{"FailedRecordCount":0,"Records":[]}')


async def _post(body: bytes) -> tuple[weakref.ref[httpx.Response], weakref.ref[httpx.Request], bytes]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(_reply)) as client:
        response = await client.post("http://127.0.0.1:9/", content=body)
        content = response.content
        return weakref.ref(uncycled(response)), weakref.ref(response.request), content


async def test_uncycled_response_and_request_die_without_the_cycle_collector() -> None:
    # Without uncycled(), httpx's response stream points back at the response: both refs would
    # stay alive until gc.collect() (the check below would fail).
    gc.collect()
    gc.disable()
    try:
        response, request, content = await _post(b"x" * 100_000)
        assert content == b'{"FailedRecordCount":0,"Records":[]}'
        assert response() is None
        assert request() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------- framing


async def _read_all(chunks: list[bytes]) -> list[bytes]:
    send, receive = trio.testing.memory_stream_one_way_pair()
    for chunk in chunks:
        await send.send_all(chunk)
    await send.aclose()
    return [frame async for frame in _frames(receive)]


async def test_frames_survive_any_split() -> None:
    frames = [b"", b"x", b'{"id":1}', bytes(range(256)) * 8]
    wire = b"".join(struct.pack("<I", len(f)) + f for f in frames)
    for cut in (1, 3, 4, 5, 7, 4096, len(wire)):
        chunks = [wire[i:i + cut] for i in range(0, len(wire), cut)]
        assert await _read_all(chunks) == frames


async def test_frames_refuse_a_truncated_or_oversized_frame() -> None:
    with pytest.raises(ValueError, match="inside a frame"):
        await _read_all([struct.pack("<I", 10) + b"short"])
    with pytest.raises(ValueError, match="frame of"):
        await _read_all([struct.pack("<I", MAX_FRAME + 1)])


# ---------------------------------------------------------------- the helper process, for real

CREDS = ReadOnlyCredentials(TEST_KEYS["AWS_ACCESS_KEY_ID"], TEST_KEYS["AWS_SECRET_ACCESS_KEY"], None)
KINESIS = Api.for_destination("kinesis", "test-stream", None)


def _request(url: str, lines: list[bytes]) -> tuple[dict[str, str], bytes]:
    batch = [Entry(line, f"{i:032x}", [], 1, 0.0) for i, line in enumerate(lines)]
    body = KINESIS.body(batch, hex_keys=True)
    return sign(CREDS, url=url, body=body, headers=KINESIS.headers(), region="us-east-1", service="kinesis"), body


async def test_process_sender_delivers_and_survives_kill_9(fake_aws) -> None:
    """Real helper, real endpoint: outcomes per record (failures included); a helper killed by
    SIGKILL fails its requests as retryable and a new one takes over."""
    url = fake_aws.url + "/"
    sender = ProcessSender()
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await _wait(lambda: sender.pid is not None)
        headers, body = _request(url, [b"a", b"b", b"c"])
        outcomes = await sender.put(url, headers, body, 10.0, False, 3)
        assert outcomes == [None, None, None]
        assert outcomes.shard == (0, "shardId-000000000000"), "the reply's ShardId crosses the pipe"

        fake_aws.faults.record_fail_rate = 1.0
        headers, body = _request(url, [b"d", b"e"])
        outcomes = await sender.put(url, headers, body, 10.0, False, 2)
        assert len(outcomes) == 2 and all(outcomes) and outcomes.shard is None
        fake_aws.faults.record_fail_rate = 0.0

        first = sender.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await _wait(lambda: sender.pid not in (None, first))
        assert sender.starts == 2
        headers, body = _request(url, [b"f"])
        assert await sender.put(url, headers, body, 10.0, False, 1) == [None]
        nursery.cancel_scope.cancel()
    assert sorted(r.data for r in fake_aws.all_records()) == [b"a", b"b", b"c", b"f"]


async def test_process_sender_replaces_a_helper_that_never_answers() -> None:
    sender = ProcessSender([sys.executable, "-c", "import sys; sys.stdin.buffer.read()"])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await _wait(lambda: sender.pid is not None)
        first = sender.pid
        with pytest.raises(RetryableSendError) as info:
            await sender.put("http://127.0.0.1:9/", {}, b"{}", 0.2, False, 1)
        assert info.value.code == "Timeout"
        await _wait(lambda: sender.pid not in (None, first))  # killed and started again
        assert sender.starts == 2
        nursery.cancel_scope.cancel()


# A helper that answers every request with the reply given on its command line (id filled in).
FAKE_HELPER = """
import json, struct, sys
reply = json.loads(sys.argv[1])
while True:
    frames = []
    for _ in range(2):
        head = sys.stdin.buffer.read(4)
        if len(head) < 4:
            sys.exit(0)
        frames.append(sys.stdin.buffer.read(struct.unpack("<I", head)[0]))
    out = json.dumps({**reply, "id": json.loads(frames[0])["id"]}).encode()
    sys.stdout.buffer.write(struct.pack("<I", len(out)) + out)
    sys.stdout.buffer.flush()
"""


@pytest.mark.parametrize("reply", [
    {"outcomes": []},  # fewer outcomes than records: must not ack the batch
    {"outcomes": [None]},
    {"outcomes": [None, None, None, None]},
    {"outcomes": [None, 7, None]},
    {"outcomes": [None, "", None]},
    {"outcomes": "all good"},
])
async def test_process_sender_refuses_outcomes_that_do_not_add_up(reply) -> None:
    """The helper's answer is checked like a service reply: one outcome per record, each None
    or an error code, else the whole batch is retried (MalformedReply)."""
    sender = ProcessSender([sys.executable, "-c", FAKE_HELPER, json.dumps(reply)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        with pytest.raises(RetryableSendError) as info:
            await sender.put("http://127.0.0.1:9/", {}, b"{}", 5.0, False, 3)
        assert info.value.code == "MalformedReply"
        nursery.cancel_scope.cancel()


async def test_process_sender_passes_exact_outcomes() -> None:
    reply = {"outcomes": [None, "ProvisionedThroughputExceededException", None]}
    sender = ProcessSender([sys.executable, "-c", FAKE_HELPER, json.dumps(reply)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        assert await sender.put("http://127.0.0.1:9/", {}, b"{}", 5.0, False, 3) == reply["outcomes"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("reply", "shard"), [
    ({"all": True, "count": 3, "shard": [2, "shardId-000000000005"]}, (2, "shardId-000000000005")),
    ({"outcomes": ["InternalFailure", None, None], "shard": [1, "shardId-000000000001"]}, (1, "shardId-000000000001")),
    ({"all": True, "count": 3, "shard": [3, "shardId-000000000005"]}, None),  # past the batch: dropped
    ({"all": True, "count": 3, "shard": [0, ""]}, None),
    ({"all": True, "count": 3, "shard": "shardId-000000000005"}, None),
    ({"all": True, "count": 3}, None),
])
async def test_process_sender_passes_the_shard_hint_only_when_well_formed(reply, shard) -> None:
    sender = ProcessSender([sys.executable, "-c", FAKE_HELPER, json.dumps(reply)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        outcomes = await sender.put("http://127.0.0.1:9/", {}, b"{}", 5.0, False, 3)
        assert outcomes == reply.get("outcomes", [None] * 3) and outcomes.shard == shard
        nursery.cancel_scope.cancel()


def _ignores(pid: int, sig: int) -> bool:
    """The process ignores ``sig`` (its SigIgn mask in /proc)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (sig - 1)))


def test_process_sender_helper_survives_the_daemon_going_mid_request() -> None:
    """The helper ignores SIGTERM (systemd signals the whole service; the daemon decides when
    its helper stops) and exits 0 when its stdin closes, even in the middle of a request."""
    with subprocess.Popen([sys.executable, "-P", "-m", "spoold.sender"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        try:
            # Once it has imported and installed its handlers, a head frame gets through.
            head = b'{"id":1}'
            proc.stdin.write(struct.pack("<I", len(head)) + head)
            proc.stdin.flush()
            wait_until(lambda: _ignores(proc.pid, signal.SIGTERM), what="the helper ignoring SIGTERM")
            proc.send_signal(signal.SIGTERM)
            proc.stdin.close()  # no body: the daemon went mid-request
            assert proc.wait(timeout=DEADLINE) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_process_sender_helper_that_exits_fails_requests_as_retryable() -> None:
    sender = ProcessSender([sys.executable, "-c", "pass"])
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await _wait(lambda: sender.starts >= 2)  # it exited, and was started again
        with pytest.raises(RetryableSendError) as info:
            await sender.put("http://127.0.0.1:9/", {}, b"{}", 5.0, False, 1)
        assert info.value.code == "SenderExited"
        nursery.cancel_scope.cancel()


async def _wait(predicate) -> None:
    with trio.fail_after(DEADLINE):
        while not predicate():  # noqa: ASYNC110 (polls state another task changes)
            await trio.sleep(0.01)


def test_helper_survives_sighup_to_the_process_group(make_daemon, fake_aws) -> None:
    """A SIGHUP sent to the service's process group (a reload by hand, a closed terminal) reaches
    the helper as well as the daemon: the daemon reloads, the helper keeps running, and lines
    written after it are delivered by the same helper."""
    daemon = make_daemon({"endpoint_url": fake_aws.url, "retry_base": "5ms"},
                         extra='[daemon]\nsender = "process"\n').start()
    sock = daemon.sockets()[0]
    assert send_lines(sock, b"before\n")["accepted"] == 1
    wait_until(lambda: daemon.spool_rows() == 0, what="the first line sent")
    helper = wait_until(lambda: _child_of(daemon.proc.pid), what="the sender helper")
    wait_until(lambda: _ignores(helper, signal.SIGHUP), what="the helper ignoring SIGHUP")
    # Both members of the group, one by one: the test's own process group is pytest's.
    os.kill(helper, signal.SIGHUP)
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "reloaded" for e in daemon.log_events()), what="the reload")
    assert send_lines(sock, b"after\n")["accepted"] == 1
    wait_until(lambda: {b"before", b"after"} <= {r.data for r in fake_aws.all_records()}, what="both lines")
    assert _child_of(daemon.proc.pid) == helper, "the helper was replaced"
    assert not any(e.get("event") == "sender_exited" for e in daemon.log_events())
    assert daemon.stop() == 0


def _child_of(pid: int) -> int | None:
    """The process's child (a child belongs to the thread that started it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = f.read().split()
        except OSError:
            continue
        if children:
            return int(children[0])
    return None
