"""Where a container may run: what it asks of its host, part of its `ContainerSpec`.

The scheduler (workflows/scheduler.py) judges every host against these; a host that breaks
one is never chosen, and a move or start that names such a host is refused.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from schemas.v1.base import HOST_PATTERN, NAME_PATTERN, Part

ZONE_PATTERN = r"^[A-Za-z0-9._-]{1,63}$"
ZoneStr = Annotated[str, StringConstraints(pattern=ZONE_PATTERN)]
HostLabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
HostLabelValue = Annotated[str, StringConstraints(pattern=r"^[^\x00,=]{0,256}$")]
GroupStr = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
PinnedHostStr = Annotated[str, StringConstraints(pattern=HOST_PATTERN)]
AntiAffinityScope = Literal["zone", "host"]


class AntiAffinity(Part):
    """Never two members of `group` on one host (scope host) or in one zone (scope zone)."""

    group: GroupStr
    scope: AntiAffinityScope = "host"


class Constraints(Part):
    """What a container asks of the host it runs on; the defaults ask nothing."""

    zone: ZoneStr | None = Field(default=None, description="the zone it must run in")
    host_labels: dict[HostLabelKey, HostLabelValue] = Field(
        default_factory=dict, max_length=16, description="labels its host must carry, all of them"
    )
    anti_affinity: AntiAffinity | None = None
    pinned_host: PinnedHostStr | None = Field(
        default=None, description="the only host it may run on: never moved by the scheduler"
    )


class PlacementTicket(Part):
    """A controller's decision, carried to whoever acts on it (who checks the term)."""

    host: PinnedHostStr
    term: int = Field(ge=1)
    instance: str
