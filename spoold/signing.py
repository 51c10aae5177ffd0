"""AWS credentials per destination (botocore) and SigV4 signatures of exact body bytes.

A destination signs as one identity: botocore's default chain, a named profile of the shared
files (whatever the profile says: keys, role_arn + source_profile, credential_process, SSO), and
optionally a role assumed on top of either with botocore's AssumeRoleCredentialFetcher. The STS
client comes from the same botocore session, so its endpoint follows botocore's resolution
(AWS_ENDPOINT_URL_STS, AWS_ENDPOINT_URL, the profile's services section).

botocore may block while it finds or refreshes credentials (instance metadata, STS, a
credential_process), so every call that can refresh runs in a worker thread. Signing itself is
pure CPU on frozen credentials and runs on the event loop.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio
from botocore.auth import SIGNED_HEADERS_BLACKLIST, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from spoold.errors import RetryableSendError

if TYPE_CHECKING:
    from spoold.config import Destination

logger = structlog.get_logger()

# How long frozen credentials are reused before asking botocore again. Static ones (environment,
# shared files) are then read afresh, so rotated keys apply within this time; temporary ones are
# also fetched again as soon as botocore wants to refresh them (see CredentialSource.get).
CREDENTIALS_REUSE = 60.0
# While botocore wants to refresh (and a refresh failed, keeping the old credentials), ask it at
# most this often per identity: a failing STS or metadata service is not called on every request.
REFRESH_RETRY = 1.0
# botocore's refresh windows (seconds before expiry) for temporary credentials. They assume an
# hour-long session: with STS's 15-minute minimum they would refresh on every request, so an
# assumed role's windows are also capped at a share of the lifetime STS actually granted.
ROLE_ADVISORY_REFRESH = 15 * 60.0
ROLE_MANDATORY_REFRESH = 10 * 60.0
ROLE_ADVISORY_SHARE = 0.5
ROLE_MANDATORY_SHARE = 0.25
# The STS client: a hung STS must not hold a destination's credentials for long.
STS_CONNECT_TIMEOUT = 5.0
STS_READ_TIMEOUT = 10.0
STS_MAX_ATTEMPTS = 3
# Longest credential error message kept (it becomes the destination's last error).
ERROR_MESSAGE_MAX = 300


def quiet_botocore() -> None:
    """botocore logs credentials and request bodies at DEBUG: keep it at WARNING, always."""
    for name in ("botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


# systemd's LoadCredential= names -> the botocore variables pointed at them.
SYSTEMD_CREDENTIALS = (("aws", "AWS_SHARED_CREDENTIALS_FILE"), ("aws-config", "AWS_CONFIG_FILE"))


def use_systemd_credentials(environ: Any = os.environ) -> None:
    """Point botocore at the shared files passed by systemd's LoadCredential=aws:... (the
    credentials file) and LoadCredential=aws-config:... (the config file), unless set."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return
    for name, variable in SYSTEMD_CREDENTIALS:
        path = Path(directory) / name
        if variable not in environ and path.is_file():
            environ[variable] = str(path)


def shared_files(environ: Any = os.environ) -> tuple[Path, Path]:
    """The shared config and credentials files botocore reads in ``environ`` (systemd
    credentials included, as use_systemd_credentials would set them)."""
    env = dict(environ)
    use_systemd_credentials(env)
    config = env.get("AWS_CONFIG_FILE") or "~/.aws/config"
    credentials = env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    return Path(config).expanduser(), Path(credentials).expanduser()


@dataclass(frozen=True)
class Identity:
    """Who a destination signs as. Destinations with equal identities share one source."""

    profile: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    role_session_name: str | None = None
    sts_region: str | None = None  # the assumed role's STS region (the destination's)

    @classmethod
    def of(cls, dest: Destination) -> Identity:
        c = dest.credentials
        if c.role_arn is None:
            return cls(profile=c.profile)
        return cls(c.profile, c.role_arn, c.external_id, c.role_session_name, dest.region)


def _refresh_windows(lifetime: float) -> tuple[float, float]:
    """(advisory, mandatory) seconds before expiry for credentials granted for ``lifetime``."""
    lifetime = max(lifetime, 0.0)
    return (min(ROLE_ADVISORY_REFRESH, lifetime * ROLE_ADVISORY_SHARE),
            min(ROLE_MANDATORY_REFRESH, lifetime * ROLE_MANDATORY_SHARE))


def _describe_failure(exc: BaseException) -> str:
    # botocore's messages name the operation, the code and the service's reason (AccessDenied on
    # AssumeRole, ExpiredToken, ProfileNotFound); they never carry keys.
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:ERROR_MESSAGE_MAX]


class CredentialSource:
    """One identity's credentials, resolved and refreshed by botocore off the event loop."""

    def __init__(self, identity: Identity | None = None, session: Any = None) -> None:
        self.identity = identity or Identity()
        self._session = session  # a botocore Session to use instead of a new one (tests)
        self._provider: Any = None
        self._frozen: ReadOnlyCredentials | None = None
        self._fetched = float("-inf")
        self._checked = float("-inf")  # when botocore was last asked whether a refresh is due
        self._generation = 0  # credentials found so far
        self._lock = trio.Lock()

    def _new_session(self) -> Any:
        if self._session is not None:
            return self._session
        import botocore.session

        # profile= also takes the environment's keys out of the chain, as botocore does for an
        # explicit profile: a destination with a profile never signs with AWS_ACCESS_KEY_ID.
        return botocore.session.Session(profile=self.identity.profile)

    def _build(self) -> Any:
        """The botocore credentials object of this identity (may call STS)."""
        session = self._new_session()
        base = session.get_credentials()
        if base is None:
            return None
        role_arn = self.identity.role_arn
        if role_arn is None:
            return base
        from botocore.config import Config
        from botocore.credentials import AssumeRoleCredentialFetcher, RefreshableCredentials

        client_config = Config(connect_timeout=STS_CONNECT_TIMEOUT, read_timeout=STS_READ_TIMEOUT,
                               retries={"mode": "standard", "max_attempts": STS_MAX_ATTEMPTS})
        extra: dict[str, Any] = {"RoleSessionName": self.identity.role_session_name}
        if self.identity.external_id is not None:
            extra["ExternalId"] = self.identity.external_id
        fetcher = AssumeRoleCredentialFetcher(
            client_creator=functools.partial(session.create_client, region_name=self.identity.sts_region,
                                             config=client_config),
            source_credentials=base,
            role_arn=role_arn,
            extra_args=extra,
        )
        metadata = fetcher.fetch_credentials()
        lifetime = (datetime.fromisoformat(metadata["expiry_time"]) - datetime.now(timezone.utc)).total_seconds()
        advisory, mandatory = _refresh_windows(lifetime)
        return RefreshableCredentials.create_from_metadata(
            metadata, refresh_using=fetcher.fetch_credentials, method="assume-role",
            advisory_timeout=advisory, mandatory_timeout=mandatory,
        )

    def _resolve(self) -> ReadOnlyCredentials | None:
        provider = self._provider
        # Static credentials are found again (no network: environment and files); refreshable
        # ones are kept, since botocore renews them itself.
        if provider is None or not hasattr(provider, "refresh_needed"):
            provider = self._provider = self._build()
            if provider is None:
                return None
        frozen: ReadOnlyCredentials = provider.get_frozen_credentials()
        return frozen

    def reset(self) -> None:
        """Find the credentials afresh at the next request (the shared files may have changed)."""
        self._provider = None
        self._fetched = float("-inf")

    def _stale(self, now: float) -> bool:
        if self._frozen is None or now - self._fetched > CREDENTIALS_REUSE:
            return True
        # refresh_needed() only compares the expiry with the wall clock, on the loop, but costs
        # more than the rest of get(): once per REFRESH_RETRY is soon enough, as refresh windows
        # are minutes long (half the lifetime for a short assumed-role session).
        if now - self._checked <= REFRESH_RETRY:
            return False
        self._checked = now
        refresh_needed = getattr(self._provider, "refresh_needed", None)
        return refresh_needed is not None and bool(refresh_needed())

    async def get(self) -> ReadOnlyCredentials:
        """Current credentials; raises RetryableSendError when none can be found or refreshed."""
        now = trio.current_time()
        if not self._stale(now):
            assert self._frozen is not None
            return self._frozen  # the common case: no lock (taking one is a trip through trio's scheduler)
        generation = self._generation
        async with self._lock:
            now = trio.current_time()
            if generation == self._generation:  # not found afresh by another request while this one waited
                try:
                    # A hung credential_process or metadata call must not hold the daemon:
                    # the caller's deadline abandons the thread (it only reads credentials).
                    frozen = await trio.to_thread.run_sync(self._resolve, abandon_on_cancel=True)
                except Exception as exc:
                    raise RetryableSendError(
                        f"cannot get AWS credentials: {_describe_failure(exc)}", code="CredentialError"
                    ) from exc
                if frozen is None or not frozen.access_key:
                    raise RetryableSendError(
                        "no AWS credentials found (environment, shared files, profile, "
                        "container or instance metadata)",
                        code="NoCredentials",
                    )
                self._frozen, self._fetched, self._checked = frozen, now, now
                self._generation += 1
            assert self._frozen is not None
            return self._frozen

    def describe(self) -> dict[str, Any]:
        """The identity for status: never a secret, only the access key id's last 4 characters."""
        key = self._frozen.access_key if self._frozen is not None else None
        return {
            "profile": self.identity.profile,
            "role_arn": self.identity.role_arn,
            "access_key": f"...{key[-4:]}" if key else None,
            "method": getattr(self._provider, "method", None),
        }


class CredentialSources:
    """One CredentialSource per identity, shared by the destinations that sign as it."""

    def __init__(self) -> None:
        self._sources: dict[Identity, CredentialSource] = {}

    def for_destination(self, dest: Destination) -> CredentialSource:
        identity = Identity.of(dest)
        source = self._sources.get(identity)
        if source is None:
            source = self._sources[identity] = CredentialSource(identity)
        return source

    def reset(self) -> None:
        """On reload: every identity finds its credentials afresh at its next request."""
        for source in self._sources.values():
            source.reset()


# Request headers that change how botocore signs (a Date header, a payload hash given by the
# caller) or that it leaves unsigned: a request with any of them is signed by botocore itself.
_BOTOCORE_ONLY = frozenset({"date", "authorization", "x-amz-content-sha256", "x-amz-date", "x-amz-security-token",
                            *SIGNED_HEADERS_BLACKLIST})
SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"


def sign(
    credentials: ReadOnlyCredentials,
    *,
    url: str,
    body: bytes,
    headers: dict[str, str],
    region: str,
    service: str,
    now: float | None = None,
) -> dict[str, str]:
    """SigV4 headers (Authorization, X-Amz-Date, token) for a POST of exactly ``body``.

    The same headers as botocore's SigV4Auth gives (tests compare them over a table of requests),
    with what does not change between requests worked out once: the canonical headers but the
    date and token, the signed header list, and the signing key (one per secret, day, region and
    service). botocore spends about 120 µs of Python per request on those; the body's SHA-256
    is the only per-byte work. ``now``: Unix time to sign at (tests); the current time otherwise.
    """
    template = _template(url, tuple(headers.items()), bool(credentials.token))
    if template is None:
        return sign_botocore(credentials, url=url, body=body, headers=headers, region=region, service=service)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    day = stamp[:8]
    scope = f"{day}/{region}/{service}/aws4_request"
    head, signed = template
    token = " ".join(credentials.token.split()) if credentials.token else ""
    canonical = head.format(date=stamp, token=token) + "\n" + hashlib.sha256(body).hexdigest()
    to_sign = f"{SIGV4_ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _signing_key(credentials.secret_key, day, region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {**headers, "X-Amz-Date": stamp}
    if credentials.token:
        out["X-Amz-Security-Token"] = credentials.token
    out["Authorization"] = (f"{SIGV4_ALGORITHM} Credential={credentials.access_key}/{scope}, "
                            f"SignedHeaders={signed}, Signature={signature}")
    return out


@functools.lru_cache(maxsize=64)
def _template(url: str, headers: tuple[tuple[str, str], ...], token: bool) -> tuple[str, str] | None:
    """(the canonical request up to the payload hash, as a format string with {date} and {token},
    signed header list) for a POST to ``url`` with ``headers``, or None when botocore must sign
    it itself. botocore works out the host, the path, the query and each header's canonical value."""
    names = {name.lower() for name, _ in headers}
    if len(names) != len(headers) or _BOTOCORE_ONLY & names:
        return None
    request = AWSRequest(method="POST", url=url, headers=dict(headers))
    auth = SigV4Auth(ReadOnlyCredentials("", "", None), "", "")
    _, path, query, _ = auth.canonical_request(request).split("\n", 3)
    signed_map = auth.headers_to_sign(request)
    lines = {name: name + ":" + " ".join(signed_map[name].split()).replace("{", "{{").replace("}", "}}")
             for name in set(signed_map)}
    lines["x-amz-date"] = "x-amz-date:{date}"
    if token:
        lines["x-amz-security-token"] = "x-amz-security-token:{token}"
    order = sorted(lines)
    head = f"POST\n{_escape(path)}\n{_escape(query)}\n" + "\n".join(lines[n] for n in order) + "\n\n" + ";".join(order)
    return head, ";".join(order)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@functools.lru_cache(maxsize=64)
def _signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign_botocore(credentials: ReadOnlyCredentials, *, url: str, body: bytes, headers: dict[str, str], region: str,
                  service: str) -> dict[str, str]:
    """sign() done by botocore's SigV4Auth alone: the reference, and the path for odd headers."""
    request = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
    SigV4Auth(credentials, service, region).add_auth(request)
    return dict(request.headers.items())
