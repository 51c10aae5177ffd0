"""The transport's HTTP/1.1 codec against h11 (the state machine it replaces): the same request
bytes for every request spoold makes, and the same reading of every reply, whatever chunks it
arrives in: status, headers, body, whether the connection can be reused, and refusals."""

from __future__ import annotations

from typing import Any

import h11
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold.transport import ReplyError, ReplyReader, head_of, request_head

# ---------------------------------------------------------------- requests


def h11_request_head(request: httpx.Request) -> bytes:
    """What the transport sent with h11: the request's head as h11 writes it."""
    conn = h11.Connection(h11.CLIENT)
    return conn.send(h11.Request(method=request.method, target=request.url.raw_path, headers=request.headers.raw))


SIGNED = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "Kinesis_20131202.PutRecords",
          "X-Amz-Date": "20261203T180000Z", "X-Amz-Security-Token": "FwoGZXIvYXdzE+/=",
          "Authorization": "AWS4-HMAC-SHA256 Credential=AKID/20261203/eu-west-1/kinesis/aws4_request, "
                           "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=0123abcd"}


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:4567/", "https://kinesis.eu-west-1.amazonaws.com/", "https://yds.serverless.yandexcloud.net/",
    "http://[::1]:8080/", "https://firehose.us-east-1.amazonaws.com:443/", "http://localhost/a/b?c=d%20e",
])
@pytest.mark.parametrize("length", [0, 1, 99_000])
def test_the_head_is_what_h11_sent_for_httpx_request(url: str, length: int) -> None:
    body = b"x" * length
    request = httpx.Request("POST", httpx.URL(url), headers=SIGNED, content=body)
    ours, theirs = head_of(request, length), h11_request_head(request)
    if length:
        assert ours == theirs
    else:  # httpx puts Content-Length: 0 second; the same lines
        assert sorted(ours.split(b"\r\n")) == sorted(theirs.split(b"\r\n"))


@pytest.mark.parametrize(("target", "headers"), [
    (b"/", [(b"X-Evil", b"a\r\nInjected: 1")]),
    (b"/", [(b"X-Evil", b"a\nb")]),
    (b"/", [(b"X-Evil", b"a\x00b")]),
    (b"/", [(b"X Evil", b"a")]),
    (b"/", [(b"X-Evil:", b"a")]),
    (b"/", [(b"", b"a")]),
    (b"/", [(b"X-Evil", b" leading space")]),
    (b"/a b", [(b"Host", b"h")]),
    (b"", [(b"Host", b"h")]),
])
def test_request_head_refuses_what_h11_refuses(target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(h11.LocalProtocolError):
        h11.Connection(h11.CLIENT).send(h11.Request(method=b"POST", target=target, headers=[(b"Host", b"h"), *headers]))
    with pytest.raises(httpx.LocalProtocolError):
        request_head(b"POST", target, [(b"Host", b"h"), *headers])


# ---------------------------------------------------------------- replies


def read_h11(chunks: list[bytes]) -> Any:
    """(status, headers, body, reusable) as h11 reads ``chunks`` then the end of the stream,
    or "refused"."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    pending = iter(chunks)
    status, headers, body = 0, [], []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(next(pending, b""))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, event.headers.raw_items()
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                # The old transport's test, plus the end of the stream (it noticed that
                # later, when the idle connection's socket turned readable).
                reusable = (conn.our_state is conn.their_state is h11.DONE and conn.trailing_data == (b"", False))
                return status, headers, b"".join(body), reusable
            elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return "refused"
    except h11.RemoteProtocolError:
        return "refused"


def read_ours(chunks: list[bytes]) -> Any:
    reader = ReplyReader()
    try:
        for chunk in chunks:
            reply = reader.feed(chunk)
            if reply is not None:
                break
        else:
            reply = reader.end()
    except ReplyError:
        return "refused"
    return reply.status_code, _as_h11(reply.headers), reply.content, reader.keep_alive and not reader.leftover


def _as_h11(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # h11 rewrites the framing headers, which spoold reads from neither: one Content-Length
    # for "2, 2" or for two equal ones, a Transfer-Encoding in lower case.
    out, length_seen = [], False
    for name, value in headers:
        if name.lower() == b"content-length":
            if length_seen:
                continue
            value, length_seen = {v.strip() for v in value.split(b",")}.pop(), True
        elif name.lower() == b"transfer-encoding":
            value = value.lower()
        out.append((name, value))
    return out


def splits(raw: bytes) -> list[list[bytes]]:
    """``raw`` whole, byte by byte, and cut in two at every position."""
    return [[raw], [raw[i:i + 1] for i in range(len(raw))]] + [[raw[:i], raw[i:]] for i in range(1, len(raw))]


# (id, raw reply, what both read: (status, body, reusable) or "refused")
REPLIES: list[tuple[str, bytes, Any]] = [
    ("content-length", b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
                       b"x-amzn-RequestId: 0a1b\r\nContent-Length: 7\r\n\r\n{\"a\":1}", (200, b'{"a":1}', True)),
    ("no reason phrase", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n{}", (200, b"{}", True)),
    ("LF line ends", b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}", (200, b"{}", True)),
    ("chunked with extensions and trailers", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;name=v\r\nabc\r\nA \r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n", (200, b"abc0123456789", True)),
    ("chunked beats content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: Chunked\r\n\r\n"
     b"2\r\nab\r\n0\r\n\r\n", (200, b"ab", True)),
    ("until close", b"HTTP/1.1 500 Internal\r\nContent-Type: text/plain\r\n\r\noops", (500, b"oops", False)),
    ("HTTP/1.0 with a length", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", (200, b"{}", False)),
    ("Connection: close", b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\n{}",
     (200, b"{}", False)),
    ("100 Continue first", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad\r\nContent-Length: 2\r\n\r\n{}",
     (400, b"{}", True)),
    ("204 ignores its length", b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n", (204, b"", True)),
    ("bytes after the reply", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n",
     (200, b"{}", False)),
    ("equal lengths twice", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\n{}",
     (200, b"{}", True)),
    ("header whitespace", b"HTTP/1.1 200 OK\r\nX-A:   spaced  out \t\r\nContent-Length:2\r\n\r\n{}",
     (200, b"{}", True)),
    ("nothing at all", b"", "refused"),
    ("cut in the head", b"HTTP/1.1 200 OK\r\nContent-Le", "refused"),
    ("cut in the body", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}", "refused"),
    ("cut in a chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "refused"),
    ("no last chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n", "refused"),
    ("bad chunk footer", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n", "refused"),
    ("bad length in a trailer", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
     b"Content-Length: x\r\n\r\n", "refused"),
    ("bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "refused"),
    ("gzip coding", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "refused"),
    ("conflicting lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x", "refused"),
    ("negative length", b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n{}", "refused"),
    ("not HTTP", b"<html>hello</html>\r\n\r\n", "refused"),
    ("bad status", b"HTTP/1.1 20 OK\r\n\r\n", "refused"),
    ("status under 100", b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n", "refused"),
    ("bad header", b"HTTP/1.1 200 OK\r\nBad Header: 1\r\nContent-Length: 0\r\n\r\n", "refused"),
    ("NUL in a header", b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n", "refused"),
    ("switching protocols", b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n", "refused"),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in REPLIES], ids=[c[0] for c in REPLIES])
def test_replies_are_read_as_h11_reads_them_in_any_chunks(raw: bytes, expected: Any) -> None:
    for chunks in splits(raw):
        ours = read_ours(chunks)
        assert ours == read_h11(chunks), chunks
    whole = read_ours([raw])
    assert (whole if whole == "refused" else (whole[0], whole[2], whole[3])) == expected


def test_a_head_or_body_over_the_limits_is_refused() -> None:
    with pytest.raises(ReplyError):
        ReplyReader(max_body=10).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
    reader = ReplyReader(max_body=10)
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n")
    with pytest.raises(ReplyError):
        reader.feed(b"6\r\nabcdef\r\n")
    reader = ReplyReader(max_body=10)
    reader.feed(b"HTTP/1.1 200 OK\r\n\r\n0123456789")
    with pytest.raises(ReplyError):
        reader.feed(b"x")
    with pytest.raises(ReplyError):
        ReplyReader().feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000)


_header = st.sampled_from([
    (b"Content-Type", b"application/x-amz-json-1.1"), (b"x-amzn-RequestId", b"c0ffee"), (b"Connection", b"close"),
    (b"Connection", b"keep-alive"), (b"X-Spaced", b"a  b"), (b"Date", b"Thu, 03 Dec 2026 18:00:00 GMT"),
])


@st.composite
def replies(draw: st.DrawFn) -> list[bytes]:
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    status = draw(st.sampled_from([200, 200, 204, 304, 400, 500, 503]))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "close", "short", "long"]))
    headers = draw(st.lists(_header, max_size=3))
    if framing in ("length", "short", "long"):
        length = len(body) + {"length": 0, "short": -1, "long": 1}[framing]
        headers.append((b"Content-Length", b"%d" % max(length, 0)))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    head = eol.join([b"HTTP/%s %d Reason" % (version, status), *(n + b": " + v for n, v in headers)]) + eol + eol
    if draw(st.booleans()):
        head = b"HTTP/1.1 100 Continue" + eol + eol + head
    raw = head + body + draw(st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n"]))
    if draw(st.integers(0, 4)) == 0:  # one byte changed anywhere
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.sampled_from([b" ", b"\r", b"\n", b":", b"\x00", b"0", b"a", b";"])) + raw[i + 1:]
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=5)))
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)]) if b > a]  # b"" is the end of the stream


@settings(max_examples=1500, deadline=None)
@given(replies())
def test_generated_replies_in_generated_chunks_are_read_as_h11_reads_them(chunks: list[bytes]) -> None:
    assert read_ours(chunks) == read_h11(chunks)
