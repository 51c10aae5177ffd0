"""AWS credentials (botocore's default chain) and SigV4 signatures of exact body bytes.

botocore may block while it finds or refreshes credentials (instance metadata, STS assume-role,
a credential_process), so every call that can refresh runs in a worker thread. Signing itself is
pure CPU on frozen credentials and runs on the event loop.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import structlog
import trio
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from spoold.errors import RetryableSendError

logger = structlog.get_logger()

# How long frozen credentials are reused before asking botocore again. botocore refreshes
# temporary credentials 10-15 minutes before they expire, so a minute is always safe.
CREDENTIALS_REUSE = 60.0


def quiet_botocore() -> None:
    """botocore logs credentials and request bodies at DEBUG: keep it at WARNING, always."""
    for name in ("botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def use_systemd_credentials(environ: Any = os.environ) -> None:
    """Point botocore at a credentials file passed by systemd's LoadCredential=aws:..."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory and "AWS_SHARED_CREDENTIALS_FILE" not in environ:
        path = Path(directory) / "aws"
        if path.is_file():
            environ["AWS_SHARED_CREDENTIALS_FILE"] = str(path)


class CredentialSource:
    """botocore's credential chain, resolved and refreshed off the event loop."""

    def __init__(self, session: Any = None) -> None:
        self._session = session
        self._provider: Any = None
        self._frozen: ReadOnlyCredentials | None = None
        self._fetched = float("-inf")
        self._lock = trio.Lock()

    def _resolve(self) -> ReadOnlyCredentials | None:
        if self._provider is None:
            if self._session is None:
                import botocore.session

                self._session = botocore.session.Session()
            self._provider = self._session.get_credentials()
            if self._provider is None:
                return None
        frozen: ReadOnlyCredentials = self._provider.get_frozen_credentials()
        return frozen

    async def get(self) -> ReadOnlyCredentials:
        """Current credentials; raises RetryableSendError when none can be found."""
        async with self._lock:
            now = trio.current_time()
            if self._frozen is None or now - self._fetched > CREDENTIALS_REUSE:
                try:
                    # A hung credential_process or metadata call must not hold the daemon:
                    # the caller's deadline abandons the thread (it only reads credentials).
                    frozen = await trio.to_thread.run_sync(self._resolve, abandon_on_cancel=True)
                except Exception as exc:
                    raise RetryableSendError(
                        f"cannot get AWS credentials: {type(exc).__name__}", code="NoCredentials"
                    ) from exc
                if frozen is None or not frozen.access_key:
                    raise RetryableSendError(
                        "no AWS credentials found (environment, shared files, profile, "
                        "container or instance metadata)",
                        code="NoCredentials",
                    )
                self._frozen, self._fetched = frozen, now
            return self._frozen


def sign(
    credentials: ReadOnlyCredentials,
    *,
    url: str,
    body: bytes,
    headers: dict[str, str],
    region: str,
    service: str,
) -> dict[str, str]:
    """SigV4 headers (Authorization, X-Amz-Date, token) for a POST of exactly ``body``."""
    request = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
    SigV4Auth(credentials, service, region).add_auth(request)
    return dict(request.headers.items())
