"""Helpers for testing against spoold's services on one machine, as ``trio.testing`` is for trio.

Shared by ``spoold demo`` and the test suite, so neither imports the other. moto, boto3 and
werkzeug come with the dev extra (``pip install -e '.[dev]'``); they are imported only when a
helper is used, so importing this module costs nothing.
"""

from __future__ import annotations

import threading
from typing import Any

# moto does not check signatures; these only have to look like keys.
MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDSPOOLDMOTO", "AWS_SECRET_ACCESS_KEY": "spoold-moto-secret"}
MOTO_REGION = "us-east-1"
# Seconds MotoServer waits for its thread to finish after shutdown.
SHUTDOWN_TIMEOUT = 10.0
# Records asked for per GetRecords call (the service's maximum).
GET_RECORDS_LIMIT = 10000


class LockedApp:
    """moto's Kinesis store is not thread-safe (concurrent PutRecords can lose records after a
    200 answer), so requests are served one at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.lock:
            return list(self.app(environ, start_response))


class MotoServer:
    """moto's server on 127.0.0.1 and a free port, in a thread of this process."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app  # type: ignore[attr-defined]
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        app = LockedApp(DomainDispatcherApplication(create_backend_app))
        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> MotoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=SHUTDOWN_TIMEOUT)

    def client(self, service: str = "kinesis", region: str = MOTO_REGION) -> Any:
        """A boto3 client for ``service`` pointed at this server."""
        import boto3

        return boto3.client(
            service, endpoint_url=self.url, region_name=region,
            aws_access_key_id=MOTO_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=MOTO_KEYS["AWS_SECRET_ACCESS_KEY"],
        )


def read_stream(kinesis: Any, stream: str) -> list[tuple[str, bytes]]:
    """Every record in every shard, from the start: (partition key, data)."""
    out: list[tuple[str, bytes]] = []
    shards = kinesis.describe_stream(StreamName=stream)["StreamDescription"]["Shards"]
    for shard in shards:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            reply = kinesis.get_records(ShardIterator=it, Limit=GET_RECORDS_LIMIT)
            out.extend((r["PartitionKey"], r["Data"]) for r in reply["Records"])
            if not reply["Records"]:
                break
            it = reply.get("NextShardIterator")
    return out
