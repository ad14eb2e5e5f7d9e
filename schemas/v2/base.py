"""Common ground for every v2 message: the same rules as v1, a new version number."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    """A frozen v2 message: unknown fields are ignored so newer senders stay readable."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: Literal[2] = 2

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        return cls.model_validate_json(data)
