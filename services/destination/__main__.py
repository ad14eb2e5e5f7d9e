"""Wires the destination worker: container creation, layers, and destination-side steps."""

from __future__ import annotations

from schemas import subjects
from schemas.v1.containers import CreateContainer, ListLayers, PullLayers
from schemas.v1.migrations import HostCheck, StartPageServer
from services import bus
from services.destination.boot import restart_after_boot
from services.destination.handlers import Destination
from services.fleet_state import tickets
from services.kvstores import KvMigrationStore
from services.link_handover import LinkTaker
from services.runtime.destination_side import DestinationSide
from services.saga.runner import SagaRunner
from services.worker import WorkerContext, main


async def register(ctx: WorkerContext) -> None:
    side = DestinationSide(ctx.config, ctx.containers, ctx.faults)
    role = Destination(
        side=side,
        containers=ctx.containers,
        placements=ctx.placements,
        state_dir=ctx.config.state_dir,
        peers=ctx.directory,
        tickets=await tickets(ctx.js),
    )
    host, log_error = ctx.host_subject, ctx.log_error
    # Separate subscriptions: a listing is answered while a long pull is still fetching.
    await bus.serve(
        ctx.nc, host(subjects.CREATE_CONTAINER), CreateContainer, role.create_container,
        on_error=log_error,
    )  # fmt: skip
    await bus.serve(
        ctx.nc, host(subjects.LIST_LAYERS), ListLayers, role.list_layers, on_error=log_error
    )
    await bus.serve(
        ctx.nc, host(subjects.PULL_LAYERS), PullLayers, role.pull_layers, on_error=log_error
    )
    await bus.serve(
        ctx.nc, host(f"{subjects.HOST_CHECK}.destination"), HostCheck, role.check,
        on_error=log_error,
    )  # fmt: skip
    await bus.serve(
        ctx.nc, host(subjects.PAGE_SERVER), StartPageServer, role.start_page_server,
        on_error=log_error,
    )  # fmt: skip
    migrations = KvMigrationStore(await bus.bucket(ctx.js, subjects.MIGRATIONS_BUCKET))
    await LinkTaker(
        ctx.nc,
        migrations,
        ctx.placements,
        side,
        ctx.config.state_dir,
        ctx.config.host,
        identities=ctx.config.nats_creds is not None,
    ).serve()
    ctx.spawn(SagaRunner.for_worker(ctx, role.steps()).run())
    ctx.spawn(restart_after_boot(ctx.containers, ctx.config.watchdog_interval_s))


if __name__ == "__main__":
    main("destination", register)
