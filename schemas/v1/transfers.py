"""Host to host, over the bus: the source asks the destination for a migration's transfer
key (services/transfer_keys.py). Never stored, never in an event or a trace."""

from __future__ import annotations

from pydantic import Field

from schemas.v1.base import Message
from schemas.v1.types import MigrationId


class TransferKeyRequest(Message):
    """Asked by the migration's source of its destination, before its first transfer."""

    migration_id: MigrationId


class TransferKey(Message):
    """The answer, on the source's own inbox: the key its transfers must be signed with."""

    migration_id: MigrationId
    key: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        repr=False,  # never in a log line
        description="64 hex digits; only the migration's source receives it",
    )


class LinkHandover(Message):
    """Sent by a migration's source to its destination the moment the source is frozen and
    off the bridge: plug the incoming container's port in and announce its MAC, so that
    what its clients send from now on waits in the destination's hold."""

    migration_id: MigrationId
    auth: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="HMAC-SHA256, under the migration's transfer key, of the handover",
    )


class LinkTaken(Message):
    """The destination's answer: the link is plugged in there; `announced`: the gratuitous
    ARP went out."""

    migration_id: MigrationId
    announced: bool
