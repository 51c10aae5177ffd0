"""spoold's exceptions, named by what the caller should do about them.

    SpooldError
    ├── ConfigError          fix the config file; the CLI exits 2 with the message
    ├── SpoolError           the SQLite spool could not be opened or written
    │   ├── SpoolCorrupt     the file is not a usable spool; operator action needed
    │   └── SpoolLocked      another process (a running daemon) holds the spool: ask it instead
    └── SendError            one request to the service did not succeed
        ├── RetryableSendError   try the same records again after a backoff
        └── FatalSendError       retrying cannot fix it until someone acts (ResourceNotFound,
                                 AccessDenied, KMS*): keep the records, back off long, log once
"""

from __future__ import annotations


class SpooldError(Exception):
    """Base class of every error spoold raises on purpose."""


class ConfigError(SpooldError):
    """The configuration is invalid; the message names the file and the key."""


class SpoolError(SpooldError):
    """The spool could not be read or written."""


class SpoolCorrupt(SpoolError):
    """The spool file is damaged or is not a spoold spool."""


class SpoolLocked(SpoolError):
    """Another process holds the spool's lock; ``pid`` is its pid when it could be read."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class SendError(SpooldError):
    """A request to the service failed as a whole."""

    def __init__(self, message: str, *, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class RetryableSendError(SendError):
    """Transient: network, 5xx, throttling, timeouts. Retry the same records."""


class FatalSendError(SendError):
    """Needs an operator (missing stream, denied access, KMS); records stay spooled."""
