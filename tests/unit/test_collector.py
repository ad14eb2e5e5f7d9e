"""Orphan address reservations are released only when confirmed on two sweeps."""

from __future__ import annotations

from schemas.v1.containers import Placement
from services.cleanup.collector import collect_addresses


class Ledger:
    def __init__(self, owners: dict[str, str]) -> None:
        self.held = dict(owners)

    async def owners(self) -> dict[str, str]:
        return dict(self.held)

    async def release(self, ip: str, owner: str) -> None:
        if self.held.get(ip) == owner:
            del self.held[ip]


class Placements:
    def __init__(self, names: set[str]) -> None:
        self.names = names

    async def get(self, name: str) -> tuple[Placement, int] | None:
        if name not in self.names:
            return None
        return Placement(name=name, host="h1", ip="10.0.0.100", mac="02:fe:0a:00:00:64",
                         layers=("a" * 64,), args=("/bin/app",)), 1  # fmt: skip

    async def claim(self, placement: Placement) -> int:
        raise NotImplementedError

    async def update(self, placement: Placement, revision: int) -> int:
        raise NotImplementedError

    async def remove(self, name: str) -> None:
        raise NotImplementedError


async def test_an_orphan_is_released_on_the_second_sweep_only() -> None:
    ledger = Ledger({"10.0.0.100": "web", "10.0.0.101": "gone"})
    placements = Placements({"web"})
    released, suspects = await collect_addresses(ledger, placements, set())
    assert released == [] and suspects == {"10.0.0.101"}
    released, suspects = await collect_addresses(ledger, placements, suspects)
    assert released == ["10.0.0.101"] and suspects == set()
    assert ledger.held == {"10.0.0.100": "web"}


async def test_an_address_whose_owner_appears_in_between_is_kept() -> None:
    ledger = Ledger({"10.0.0.102": "new"})
    placements = Placements(set())
    _, suspects = await collect_addresses(ledger, placements, set())
    placements.names.add("new")  # the create finished its claim meanwhile
    released, suspects = await collect_addresses(ledger, placements, suspects)
    assert released == [] and ledger.held == {"10.0.0.102": "new"}
