"""Common ground for every v1 message."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
HOST_PATTERN = r"^[a-z][a-z0-9-]{0,30}$"


class Message(BaseModel):
    """A frozen v1 message: unknown fields are ignored so newer senders stay readable."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: Literal[1] = 1

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        return cls.model_validate_json(data)


class Part(BaseModel):
    """A frozen piece of a message (versioned with the message that holds it)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class ErrorDetail(BaseModel):
    """Why a request was refused or failed: which field, and whether a retry could help."""

    model_config = ConfigDict(frozen=True)

    field: str | None = None
    reason: str
    kind: Literal["invalid", "not_found", "conflict", "unavailable", "forbidden", "failed"] = (
        "invalid"
    )
    retryable: bool = False


class ErrorReply(BaseModel):
    """The reply to a request that did not succeed."""

    model_config = ConfigDict(frozen=True)

    error: ErrorDetail
