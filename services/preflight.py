"""Pre-flight answers that need no NATS: a side's dry-run checks as the reply a host gives,
and whether the two hosts of a move can interoperate, judged from their registrations."""

from __future__ import annotations

from collections.abc import Iterable

from schemas.v1.hosts import HostRegistration
from schemas.v1.migrations import CheckResult, HostCheckReply
from schemas.v1.versions import HostVersions
from services.errors import Incompatible
from services.runtime.criu import Check
from workflows.compat import OLDER_AGENT, incompatibilities, notes


def reply(host: str, checks: Iterable[Check], memory_bytes: int = 0) -> HostCheckReply:
    """Dry run: can this host play its side of a move? Nothing was changed."""
    return HostCheckReply(
        checks=tuple(
            CheckResult(host=host, check=name, ok=ok, detail=detail) for name, ok, detail in checks
        ),
        memory_bytes=memory_bytes,
    )


def announced(host: str, registration: HostRegistration | None) -> tuple[HostVersions, list[str]]:
    """What the host's registration says it runs; an agent that announced nothing is judged
    as the oldest (wire 1..1, tools unknown), and that is said."""
    if registration is not None and registration.versions is not None:
        return registration.versions, []
    return OLDER_AGENT, [f"{host} announced no versions (an older agent): judged as wire 1..1"]


def refuse_incompatible(
    source: str,
    source_registration: HostRegistration | None,
    destination: str,
    destination_registration: HostRegistration | None,
) -> None:
    """Incompatible (not retryable) naming both hosts' versions when they cannot take part in
    one migration; nothing otherwise."""
    src, said_src = announced(source, source_registration)
    dst, said_dst = announced(destination, destination_registration)
    names = {"source_name": source, "destination_name": destination}
    reasons = incompatibilities(src, dst, **names)
    if reasons:
        context = [*said_src, *said_dst, *notes(src, dst, **names)]
        also = f" ({'; '.join(context)})" if context else ""
        raise Incompatible("; and ".join(reasons) + also, field="destination")
