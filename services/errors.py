"""Ferry's error hierarchy. Every error says whether trying again could help."""

from __future__ import annotations

from schemas.v1.base import ErrorDetail


class FerryError(Exception):
    """Base class; `retryable` tells callers whether the same call may succeed later."""

    kind = "failed"
    retryable = False

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field

    def detail(self) -> ErrorDetail:
        return ErrorDetail(
            field=self.field,
            reason=self.reason,
            kind=self.kind,
            retryable=self.retryable,
        )


class InvalidInput(FerryError):
    """The request is wrong; repeating it cannot help."""

    kind = "invalid"


class NotFound(FerryError):
    """A named container, host or migration does not exist."""

    kind = "not_found"


class Conflict(FerryError):
    """The request collides with existing state (a duplicate name, a concurrent change)."""

    kind = "conflict"


class Unavailable(FerryError):
    """A host or the bus did not answer in time; a retry may succeed."""

    kind = "unavailable"
    retryable = True


class TopologyMissing(Unavailable):
    """Buckets or streams of the bus are missing (a new or lost store): only an operator's
    bootstrap creates them; until then nothing may read their absence as "nothing"."""

    def __init__(
        self, reason: str, *, field: str | None = None, missing: tuple[str, ...] = ()
    ) -> None:
        super().__init__(reason, field=field)
        self.missing = missing


class Untrusted(Unavailable):
    """What the bus holds was written by someone not entitled to write it (a host changed a
    placement another host holds): it is no evidence of anything, so it reads as unknown
    until an operator repairs it."""


class Forbidden(FerryError):
    """The bus refused this identity (bad credentials, or a subject it may not use): a retry
    with the same credentials cannot help."""

    kind = "forbidden"


class RuntimeFailure(FerryError):
    """A host-side operation (runc, CRIU, ip, mount) failed."""

    kind = "failed"

    def __init__(
        self, reason: str, *, field: str | None = None, retryable: bool = False, log_tail: str = ""
    ) -> None:
        super().__init__(reason, field=field)
        self.retryable = retryable
        self.log_tail = log_tail


def from_detail(detail: ErrorDetail) -> FerryError:
    """Rebuild a typed error from the detail a remote worker replied with."""
    classes: dict[str, type[FerryError]] = {
        "invalid": InvalidInput,
        "not_found": NotFound,
        "conflict": Conflict,
        "unavailable": Unavailable,
        "forbidden": Forbidden,
    }
    cls = classes.get(detail.kind)
    if cls is None:
        return RuntimeFailure(detail.reason, field=detail.field, retryable=detail.retryable)
    return cls(detail.reason, field=detail.field)


class Incompatible(InvalidInput):
    """Two hosts cannot take part in one migration (their Ferry, CRIU or runc versions do not
    interoperate): repeating the request cannot help until one of them is upgraded."""


def described(exc: BaseException) -> str:
    """An exception as a log line can show it: its type and its message. (nats-py's API
    errors keep their description out of repr(): `BadRequestError()` hid which request
    the server refused, and why.)"""
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text and not text.startswith(f"nats: {name}") else text or name
