"""Dry-run answers: a side's checks as the reply a host gives. No NATS here."""

from __future__ import annotations

from collections.abc import Iterable

from schemas.v1.migrations import CheckResult, HostCheckReply
from services.runtime.criu import Check


def reply(host: str, checks: Iterable[Check], memory_bytes: int = 0) -> HostCheckReply:
    """Dry run: can this host play its side of a move? Nothing was changed."""
    return HostCheckReply(
        checks=tuple(
            CheckResult(host=host, check=name, ok=ok, detail=detail) for name, ok, detail in checks
        ),
        memory_bytes=memory_bytes,
    )
