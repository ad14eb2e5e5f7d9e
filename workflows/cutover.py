"""The cut-over's one decision that crosses hosts: may this destination take a container's
link now? Pure: the caller reads the record and knows who asked.

Taking the link early is what keeps packets from being lost at the cut-over: the
destination plugs the incoming container's port in and announces its MAC while the source
is frozen, and what clients send waits in the destination's hold. It must never happen
while the source still runs (the bridges would send its clients' packets to a copy that is
not running yet), so it is done only for the migration's own source, named by the record,
while the record's dump step runs on it.
"""

from __future__ import annotations

from schemas.v2.migrations import MigrationRecord
from workflows.saga import current

FREEZING_STEPS = frozenset({"dump"})


def refuse_link_handover(
    record: MigrationRecord, host: str, asker: str | None, *, identities: bool
) -> str | None:
    """Why `host` must not take the container's link for `asker` now; None when it may.
    `identities`: the bus names who asks (per-host inboxes); without them the transfer
    key's signature is the only proof of the asker."""
    if record.destination != host:
        return f"migration {record.id} does not move to {host}"
    if record.state != "running":
        return f"migration {record.id} is {record.state}: no handover"
    if identities and asker != record.source:
        return (
            f"only {record.source}, the source of migration {record.id}, hands its link over"
            f" (asked by {asker or 'an identity that is not a host'})"
        )
    step = current(record)
    if step is None or step.kind != "forward" or step.name not in FREEZING_STEPS:
        now = f"{step.name} ({step.kind})" if step else "no step"
        return f"migration {record.id} is not freezing its source (running: {now})"
    if step.host != record.source:
        return f"migration {record.id}'s dump runs on {step.host}, not on its source"
    return None
