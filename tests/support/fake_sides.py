"""Stand-ins for the host runtime, for middle-tier tests: each side answers like the real
one (typed results, the same idempotence on a second call) without runc, CRIU or root, and
writes down what it was asked to do, on which host."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from schemas.v1.containers import Placement
from schemas.v2.results import (
    DrainResult,
    DumpResult,
    PreflightResult,
    PrepareResult,
    RestoreResult,
    VerifyResult,
)
from services.errors import RuntimeFailure
from services.faults import NO_FAULTS, FaultPlan
from services.runtime.destination_side import Opened
from services.runtime.filesync import BundleSent
from services.runtime.transfer import Link, Sent


@dataclass
class Journal:
    """Every runtime call, in order: (host, what, container)."""

    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def note(self, host: str, what: str, name: str) -> None:
        self.calls.append((host, what, name))

    def whats(self) -> list[str]:
        return [what for _, what, _ in self.calls]

    def count(self, what: str) -> int:
        return self.whats().count(what)


@dataclass
class FakeConfig:
    host: str


@dataclass
class FakeSourceSide:
    host: str
    journal: Journal
    config: Any = None

    def __post_init__(self) -> None:
        self.config = FakeConfig(self.host)

    async def check(self, name: str) -> tuple[list[tuple[str, bool, str]], int]:
        return [("container running here", True, "running")], 4096

    async def preflight(self, name: str) -> PreflightResult:
        self.journal.note(self.host, "preflight", name)
        return PreflightResult(listening_ports=(7000,), source_pid=4242)

    async def dump(
        self,
        name: str,
        migration_id: str,
        page_server: str,
        *,
        parent: str | None = None,
        handover: Any = None,
    ) -> DumpResult:
        self.journal.note(self.host, f"dump to {page_server}", name)
        return DumpResult(frozen_at=time.time(), dump_ms=5, pages_written=10)

    async def dump_lazy(
        self, name: str, migration_id: str, destination_address: str, *, handover: Any = None
    ) -> DumpResult:
        self.journal.note(self.host, "dump lazy", name)
        return DumpResult(frozen_at=time.time(), dump_ms=5, lazy_pages="10.77.1.1:40000")

    async def resume(self, placement: Placement, migration_id: str, link: Any) -> str:
        self.journal.note(self.host, "resume", placement.name)
        return "thawed"


@dataclass
class FakeFileSync:
    host: str
    journal: Journal

    async def presync_files(self, name: str, migration_id: str, link: Link, options: Any) -> Sent:
        self.journal.note(self.host, f"presync to {link.address}", name)
        return Sent(bytes=1000, sha256="a" * 64, seconds=0.01, entries=3)

    def forget_presync(self, migration_id: str) -> bool:
        self.journal.note(self.host, "forget presync", migration_id)
        return True

    async def push_bundle(
        self, name: str, migration_id: str, link: Link, options: Any, damage: Any
    ) -> BundleSent:
        self.journal.note(self.host, f"push bundle to {link.address}", name)
        return BundleSent(
            Sent(bytes=2000, sha256="b" * 64, seconds=0.01),
            Sent(bytes=30, sha256="c" * 64, seconds=0.01, entries=1),
        )


@dataclass
class FakeDestinationSide:
    host: str
    journal: Journal
    fail_restore: bool = False
    config: Any = None
    faults: FaultPlan = NO_FAULTS

    def __post_init__(self) -> None:
        self.config = FakeConfig(self.host)

    async def check(self, name: str, needed_bytes: int) -> list[tuple[str, bool, str]]:
        return [("no container of that name here", True, "free")]

    async def prepare(
        self, placement: Placement, migration_id: str, *, page_server: bool, source_address: str
    ) -> PrepareResult:
        self.journal.note(self.host, "prepare", placement.name)
        return PrepareResult(
            layers_present=1, page_server="10.77.1.2:41000" if page_server else None
        )

    async def restore(
        self, placement: Placement, migration_id: str, frozen_at: float, *, lazy_from: str | None
    ) -> RestoreResult | None:
        self.journal.note(self.host, "restore", placement.name)
        if self.fail_restore:
            raise RuntimeFailure("restore of web failed: injected by the test")
        return RestoreResult(running_at=time.time(), freeze_ms=25)

    async def verify(self, placement: Placement, ports: tuple[int, ...]) -> VerifyResult:
        self.journal.note(self.host, f"verify {list(ports)}", placement.name)
        return VerifyResult(restored_pid=77)

    async def open_network(self, placement: Placement, migration_id: str) -> Opened:
        self.journal.note(self.host, "open network", placement.name)
        return Opened(announced=[placement.ip], opened_at=time.time(), hold=None)

    async def drain_pages(self, migration_id: str, timeout: float) -> DrainResult | None:
        self.journal.note(self.host, "drain", migration_id)
        return DrainResult(drain_ms=3)

    async def stop_restored(self, name: str, migration_id: str) -> None:
        self.journal.note(self.host, "stop restored", name)

    async def discard(self, name: str, migration_id: str) -> None:
        self.journal.note(self.host, "discard", name)


@dataclass
class FakeSourceCleanup:
    host: str
    journal: Journal

    async def pages_served(self, migration_id: str, timeout: float) -> tuple[int, int]:
        return 0, 10

    def local_volumes(self, name: str) -> list[str]:
        return []

    async def clean_source(self, name: str, migration_id: str, volumes: list[str]) -> list[str]:
        self.journal.note(self.host, "clean source", name)
        return []
