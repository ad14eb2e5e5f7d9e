"""Wires the cleanup worker: container removal and source clean-up after a move."""

from __future__ import annotations

import asyncio

from schemas import subjects
from schemas.v1.containers import ContainerRemoved, RemoveContainer
from schemas.v1.migrations import StepCommand
from services import bus, watchdog
from services.cleanup import collector, handlers
from services.kvstores import KvAddressPool, KvMigrationStore
from services.saga_runner import SagaRunner
from services.steps import Progress, StepOutcome
from services.worker import WorkerContext, log, main


async def register(ctx: WorkerContext) -> None:
    async def remove_container(cmd: RemoveContainer) -> ContainerRemoved:
        return await handlers.remove_container(cmd, ctx.containers)

    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.REMOVE_CONTAINER),
        RemoveContainer,
        remove_container,
        on_error=ctx.log_error,
    )

    async def clean_source(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.clean_source(cmd, progress, ctx.migration)

    ctx.spawn(SagaRunner(ctx, {"clean_source": clean_source}).run())

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
