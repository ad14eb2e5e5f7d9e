"""Leases: what a live holder keeps fresh in the leases bucket, renewed by compare-and-set.

A lease carries no timestamps: whether it is fresh is the server's judgement (the bucket's
TTL and its limit markers), never a comparison of two hosts' clocks.
"""

from __future__ import annotations

from pydantic import Field

from schemas.v1.base import Message, Part
from schemas.v1.containers import HostNameStr
from schemas.v1.migrations import StepKind
from schemas.v1.types import MigrationId


class LeaseHolder(Part):
    """Who holds a lease: a host, the role of its process there, and that process's pid."""

    host: HostNameStr
    role: str = Field(min_length=1, max_length=32)
    pid: int = Field(ge=0)


class StepProgress(Part):
    """How far the holder's step has come, as the holder last said."""

    message: str = ""
    bytes_done: int | None = Field(default=None, ge=0)
    bytes_total: int | None = Field(default=None, ge=0)
    pages_done: int | None = Field(default=None, ge=0)


class StepLease(Message):
    """One attempt of one saga step is being worked on by `holder` (or, with `abandoned`,
    was given up by a watchdog: nobody may start it any more)."""

    migration_id: MigrationId
    step: str
    kind: StepKind
    attempt: int = Field(ge=1)
    holder: LeaseHolder
    progress: StepProgress = Field(default_factory=StepProgress)
    abandoned: bool = False


def step_lease_key(migration_id: str, kind: str, step: str, attempt: int) -> str:
    """The lease key of one step attempt (see subjects.LEASES_BUCKET)."""
    return f"{migration_id}.{kind}.{step}.{attempt}"
