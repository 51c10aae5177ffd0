"""sender.uncycled: a sent request and its reply are freed by reference counting alone."""

from __future__ import annotations

import gc
import weakref

import httpx

from spoold.sender import uncycled


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
