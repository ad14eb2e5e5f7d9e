"""Wires the cleanup worker: container removal and source clean-up after a move."""

from __future__ import annotations

import asyncio

from schemas import subjects
from schemas.v1.containers import RemoveContainer
from services import bus, watchdog
from services.cleanup import collector
from services.cleanup.handlers import Cleanup
from services.kvstores import KvAddressPool, KvMigrationStore
from services.runtime.source_cleanup import SourceCleanup
from services.saga.runner import SagaRunner
from services.worker import WorkerContext, log, main


async def register(ctx: WorkerContext) -> None:
    role = Cleanup(cleanup=SourceCleanup(ctx.config, ctx.containers), containers=ctx.containers)
    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.REMOVE_CONTAINER),
        RemoveContainer,
        role.remove_container,
        on_error=ctx.log_error,
    )
    ctx.spawn(SagaRunner.for_worker(ctx, role.steps()).run())

    migrations = KvMigrationStore(await bus.bucket(ctx.js, subjects.MIGRATIONS_BUCKET))
    ctx.spawn(watchdog.run(ctx.js, migrations, interval=ctx.config.watchdog_interval_s))

    addresses = KvAddressPool(await bus.bucket(ctx.js, subjects.IPAM_BUCKET))

    async def collect_forever() -> None:
        suspects: set[str] = set()
        while True:
            try:
                await collector.collect(
                    ctx.containers, ctx.placements, migrations, ctx.config.collector_min_age_s
                )
                released, suspects = await collector.collect_addresses(
                    addresses, ctx.placements, suspects
                )
                if released:
                    log.info("released orphan addresses %s", released)
            except Exception as exc:  # never let a sweep take the worker down
                log.warning("leftover collection failed: %s", exc)
            await asyncio.sleep(ctx.config.collector_interval_s)

    ctx.spawn(collect_forever())


if __name__ == "__main__":
    main("cleanup", register)
