"""After the host comes back from a reboot: the destination worker starts again the
containers the placement says run here (workflows/boot.py decides which). It waits for
the bus rather than guess from this host's own record: until the placements can be read,
nothing starts. Each start needs the placement seen twice, unchanged."""

from __future__ import annotations

import asyncio
import logging

from services.errors import described
from services.runtime.containers import HostContainers
from workflows.boot import BootDecision, after_boot

log = logging.getLogger("ferry.boot")


async def restart_after_boot(containers: HostContainers, retry_s: float) -> None:
    """Runs once as the worker starts (after a worker restart it finds runc knows them)."""
    await start_placed(containers, retry_s)


async def start_placed(containers: HostContainers, retry_s: float) -> list[BootDecision]:
    host = containers.config.host
    while True:
        try:
            placements = await containers.placements.all()
            break
        except Exception as exc:  # the bus or its store is not there (yet): wait, never guess
            log.warning("placements unreadable, nothing started yet: %s", described(exc))
            await asyncio.sleep(retry_s)
    known = {state.name for state in await containers.runc.list()}
    decisions = after_boot(placements, host, known, containers.on_disk())
    for decision in decisions:
        if decision.action == "leave":
            log.info("after boot: %s left as it is: %s", decision.name, decision.reason)
            continue
        first = next(p for p in placements if p.name == decision.name)
        again = await containers.placements.get(decision.name)
        if again is None or again[0] != first:
            log.warning("after boot: %s not started: its placement changed meanwhile", first.name)
            continue
        try:
            pid = await containers.start_again(first)
        except Exception as exc:
            log.error("after boot: %s could not start again: %s", first.name, described(exc))
            continue
        log.info("after boot: %s runs again (pid %d): %s", first.name, pid, decision.reason)
    return decisions
