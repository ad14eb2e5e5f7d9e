"""Wires the cleanup worker: container removal, source clean-up after a move, the watchdog,
the leftover collector, unused layers' removal, and the answer to "do you run container X?"
that collectors ask."""

from __future__ import annotations

import asyncio

from schemas import subjects
from schemas.v1.containers import (
    ContainerRuns,
    ListVolumes,
    RemoveContainer,
    RemoveVolume,
    RuncStatus,
    RunsContainer,
    VolumeList,
)
from services import bus, watchdog
from services.cleanup import collector
from services.cleanup.evidence import BusEvidence
from services.cleanup.handlers import Cleanup
from services.cleanup.layers import LayerCollector
from services.errors import described
from services.kvstores import KvAddressPool, KvImageStore, KvMigrationStore
from services.runtime.runc import Runc
from services.runtime.source_cleanup import SourceCleanup
from services.saga.dispatch import Dispatcher
from services.saga.runner import SagaRunner
from services.worker import WorkerContext, log, main
from workflows.fencing import Rules

RUNS: dict[str, RuncStatus] = {"running": "running", "paused": "paused"}


async def runs_container(runc: Runc, host: str, cmd: RunsContainer) -> ContainerRuns:
    """runc's own word: `running` only while the container's init process runs."""
    state = await runc.state(cmd.name)
    status: RuncStatus = "absent" if state is None else RUNS.get(state.status, "stopped")
    return ContainerRuns(host=host, name=cmd.name, state=status)


async def register(ctx: WorkerContext) -> None:
    config = ctx.config
    role = Cleanup(cleanup=SourceCleanup(config, ctx.containers), containers=ctx.containers)
    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.REMOVE_CONTAINER),
        RemoveContainer,
        role.remove_container,
        on_error=ctx.log_error,
    )

    async def list_volumes(_: ListVolumes) -> VolumeList:
        return await ctx.containers.list_volumes()

    await bus.serve(
        ctx.nc, ctx.host_subject(subjects.LIST_VOLUMES), ListVolumes, list_volumes,
        on_error=ctx.log_error,
    )  # fmt: skip
    await bus.serve(
        ctx.nc, ctx.host_subject(subjects.REMOVE_VOLUME), RemoveVolume,
        ctx.containers.remove_volume, on_error=ctx.log_error,
    )  # fmt: skip

    async def runs(cmd: RunsContainer) -> ContainerRuns:
        return await runs_container(ctx.containers.runc, config.host, cmd)

    await bus.serve(
        ctx.nc, ctx.host_subject(subjects.CONTAINER_RUNS), RunsContainer, runs,
        on_error=ctx.log_error,
    )  # fmt: skip
    ctx.spawn(SagaRunner.for_worker(ctx, role.steps()).run())

    migrations = KvMigrationStore(await bus.bucket(ctx.js, subjects.MIGRATIONS_BUCKET))
    dispatcher = Dispatcher(ctx.js, config.host, ctx.placements)
    ctx.spawn(dispatcher.run())
    ctx.spawn(watchdog.run(ctx.js, migrations, dispatcher, interval=config.watchdog_interval_s))

    addresses = KvAddressPool(await bus.bucket(ctx.js, subjects.IPAM_BUCKET))
    evidence = BusEvidence(
        ctx.nc, config.host, ctx.placements, migrations, ask_timeout_s=config.owner_answer_timeout_s
    )
    rules = Rules(
        confirm_after_s=config.collector_confirm_s,
        min_age_s=config.collector_min_age_s,
        orphan_limit=config.orphan_limit,
    )
    sweeper = collector.Collector(
        ctx.containers, evidence, ctx.placements, rules, min_age_s=config.collector_min_age_s
    )

    layer_sweeper = LayerCollector(
        config.layers_dir,
        KvImageStore(await bus.bucket(ctx.js, subjects.IMAGES_BUCKET)),
        ctx.placements,
        min_age_s=config.collector_min_age_s,
    )

    async def collect_forever() -> None:
        suspects: set[str] = set()
        while True:
            try:
                done = await sweeper.sweep()
                ctx.health[:] = done.health()
                log.info(
                    "collector sweep %d: %d alert(s)%s", sweeper.sweeps, len(done.alerts),
                    f"; {done.mass_orphaning}" if done.mass_orphaning else "",
                )  # fmt: skip
            except Exception as exc:  # never let a sweep take the worker down
                log.error("leftover collection failed: %s", described(exc))
                ctx.health[:] = [f"collector: sweep failed: {described(exc)}"[:200]]
            try:
                hosts = await ctx.directory.known_hosts()
                released, suspects = await collector.collect_addresses(
                    addresses, evidence, suspects, hosts, limit=config.orphan_limit
                )
                if released:
                    log.info("released orphan addresses %s", released)
            except Exception as exc:  # the same: an unknown answer releases nothing
                log.warning("address collection failed: %s", described(exc))
            try:
                await layer_sweeper.sweep()
            except Exception as exc:  # a layer kept is only disk space
                log.warning("layer collection failed: %s", described(exc))
            await asyncio.sleep(config.collector_interval_s)

    ctx.spawn(collect_forever())


if __name__ == "__main__":
    main("cleanup", register)
