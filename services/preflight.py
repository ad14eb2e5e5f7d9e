"""Dry-run checks a host answers for its side of a move. No NATS here."""

from __future__ import annotations

from schemas.v1.migrations import CheckResult, HostCheck, HostCheckReply
from services.runtime.migration import MigrationHost


async def check(cmd: HostCheck, host: MigrationHost) -> HostCheckReply:
    """Dry run: can this host play its side of a move? Changes nothing."""
    results, memory = await host.check(cmd.container, cmd.side, cmd.needed_bytes)
    return HostCheckReply(
        checks=tuple(
            CheckResult(host=host.config.host, check=name, ok=ok, detail=detail)
            for name, ok, detail in results
        ),
        memory_bytes=memory,
    )
