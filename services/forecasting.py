"""What the holder of a container knows for forecasting its freeze: the container's memory
now (runc and /proc) and the moves this host made before (its ledger). The forecast itself
is pure (workflows/freeze_forecast.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from services.runtime.ledger import HostLedger
from services.runtime.proc import resident_memory
from services.runtime.runc import Runc
from workflows.freeze_forecast import PastFreeze, history_of

LEDGER_ENTRIES_READ = 50  # the forecast counts the newest few of each kind


@dataclass(frozen=True)
class ForecastInputs:
    memory_bytes: int
    memory_basis: str
    history: tuple[PastFreeze, ...]
    missing: tuple[str, ...] = ()


class FreezeInputs(Protocol):
    async def inputs(self, container: str, dirty_tracking: bool) -> ForecastInputs: ...


class NothingKnown:
    """An intake that does not run on the container's holder knows neither its memory nor
    the holder's history: the forecast says so."""

    async def inputs(self, container: str, dirty_tracking: bool) -> ForecastInputs:
        why = "memory: not known here (this intake is not the container's holder), 0 assumed"
        return ForecastInputs(0, "memory unknown here", (), (why,))


class HolderInputs:
    """The holder's own view: resident memory of the container's processes, and its ledger's
    completed moves as the source."""

    def __init__(self, host: str, runc: Runc, ledger: HostLedger) -> None:
        self.host = host
        self.runc = runc
        self.ledger = ledger

    async def inputs(self, container: str, dirty_tracking: bool) -> ForecastInputs:
        state = await self.runc.state(container)
        missing: list[str] = []
        if state is None or state.pid is None:
            memory = 0
            missing.append(f"memory: runc does not know {container} here, 0 assumed")
        else:
            memory = await asyncio.to_thread(resident_memory, state.pid)
        if not dirty_tracking:
            missing.append(
                f"dirty rate: no dirty-page tracking (mem_dirty_track) on {self.host},"
                " so all resident memory counts"
            )
        migrations = await asyncio.to_thread(self.ledger.recent_migrations, LEDGER_ENTRIES_READ)
        history = history_of((m.record for m in migrations), self.host)
        return ForecastInputs(memory, "resident memory", tuple(history), tuple(missing))
