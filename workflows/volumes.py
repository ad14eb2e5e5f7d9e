"""Which containers use a volume, from the placements. Pure: the CLI and the hosts ask it."""

from __future__ import annotations

from collections.abc import Iterable

from schemas.v1.containers import Placement


def users_of(
    placements: Iterable[Placement], volume: str, *, besides: str | None = None
) -> list[Placement]:
    """The placed containers whose spec mounts `volume` (but `besides`, a container's own)."""
    return [
        p for p in placements if p.name != besides and any(m.name == volume for m in p.spec.volumes)
    ]
