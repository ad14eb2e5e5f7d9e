"""What host-side code needs from the fleet's shared state, as protocols (no NATS here)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from schemas.v1.containers import Placement


class PlacementStore(Protocol):
    """Which host may run which container; every change is compare-and-set."""

    async def get(self, name: str) -> tuple[Placement, int] | None: ...

    async def claim(self, placement: Placement) -> int:
        """Create the record; raise Conflict if the name is taken. Returns the revision."""
        ...

    async def update(self, placement: Placement, revision: int) -> int:
        """Replace the record if it is still at `revision`; raise Conflict otherwise."""
        ...

    async def remove(self, name: str) -> None: ...

    async def all(self) -> list[Placement]:
        """Every container's placement; raises when the store cannot be read (unknown,
        never "none")."""
        ...


class AddressPool(Protocol):
    """Datacenter addresses, each owned by at most one container."""

    async def allocate(self, owner: str, candidates: list[str]) -> str: ...

    async def release(self, ip: str, owner: str) -> None: ...


class LayerSource(Protocol):
    """Where a host fetches root filesystem layers it does not have yet."""

    async def fetch(self, digest: str, into: Path) -> None: ...


class PeerDirectory(Protocol):
    """How to reach another host."""

    async def address_of(self, host: str) -> str: ...
