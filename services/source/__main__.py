"""Wires the source worker: container listing, migration intake, and source-side steps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from pydantic import BaseModel

from schemas import subjects
from schemas.v1.containers import ListContainers, ReadLogs
from schemas.v1.migrations import ForwardedRequest, HostCheck, PageServerStarted, StartPageServer
from schemas.v2.ledger import LedgerReport, ReadLedger
from services import bus
from services.errors import FerryError, RuntimeFailure
from services.fleet_state import FleetClient, tickets
from services.forecasting import HolderInputs
from services.intake import Intake
from services.kvstores import KvMigrationStore
from services.link_handover import LinkGiver
from services.runtime.ledger import HostLedger
from services.runtime.source_side import SourceSide
from services.saga.runner import SagaRunner
from services.source.handlers import Source
from services.transfer_keys import KeyHolder
from services.worker import WorkerContext, log, main


async def register(ctx: WorkerContext) -> None:
    async def page_server_for(
        destination: str, migration_id: str, images: str, parent: str | None
    ) -> str:
        ask = StartPageServer(migration_id=migration_id, images=images, parent=parent)
        started = await bus.request(
            ctx.nc,
            subjects.host_request(destination, subjects.PAGE_SERVER),
            ask,
            PageServerStarted,
            timeout=30,
            what="a pre-copy round's page server",
        )
        return started.address

    keys = KeyHolder(
        ctx.nc, ctx.config.state_dir, ctx.directory, ctx.config.transfer_port, ctx.config.tls
    )
    role = Source(
        side=SourceSide(ctx.config, ctx.containers),
        containers=ctx.containers,
        placements=ctx.placements,
        peers=ctx.directory,
        page_server_for=page_server_for,
        keys=keys,
        links=LinkGiver(ctx.nc, keys),
    )
    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.LIST_CONTAINERS),
        ListContainers,
        role.list_containers,
        on_error=ctx.log_error,
    )
    await bus.serve(
        ctx.nc, ctx.host_subject(subjects.CONTAINER_LOGS), ReadLogs, ctx.containers.read_logs,
        on_error=ctx.log_error,
    )  # fmt: skip
    host_ledger = HostLedger(ctx.config.state_dir, ctx.config.host)

    async def read_ledger(cmd: ReadLedger) -> LedgerReport:
        """For `ferry reconcile`: this host's own record and what its runc runs now."""
        held, migrations = await asyncio.to_thread(
            lambda: (host_ledger.containers(), host_ledger.migrations())
        )
        runtime = await ctx.containers.list()
        return LedgerReport(
            host=ctx.config.host,
            containers=tuple(held),
            migrations=tuple(migrations),
            runtime=runtime.containers,
        )

    await bus.serve(
        ctx.nc, ctx.host_subject(subjects.HOST_LEDGER), ReadLedger, read_ledger,
        on_error=ctx.log_error,
    )  # fmt: skip
    await bus.serve(
        ctx.nc,
        ctx.host_subject(f"{subjects.HOST_CHECK}.source"),
        HostCheck,
        role.check,
        on_error=ctx.log_error,
    )

    intake = Intake(
        ctx.nc,
        ctx.js,
        ctx.placements,
        KvMigrationStore(await bus.bucket(ctx.js, subjects.MIGRATIONS_BUCKET)),
        ctx.directory,
        host=ctx.config.host,
        freeze_inputs=HolderInputs(ctx.config.host, ctx.containers.runc, host_ledger),
        fleet=FleetClient(ctx.nc, await tickets(ctx.js)),
    )
    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.MIGRATION_INTAKE),
        ForwardedRequest,
        intake.accept_forwarded,
        on_error=ctx.log_error,
    )

    def answering(
        subject: str, work: Callable[[bytes, str], Awaitable[BaseModel]]
    ) -> Callable[[Msg], Awaitable[None]]:
        async def answer(msg: Msg) -> None:
            try:
                # The bus lets an identity publish only on its own subject: that is who asked.
                asked_by = subjects.requester_of(msg.subject)
                reply = (await work(msg.data, asked_by)).model_dump_json().encode()
            except FerryError as exc:
                ctx.log_error(subject, exc)
                reply = bus.error_reply(exc)
            except Exception as exc:  # a bug must still answer, or the requester waits in vain
                log.exception("%s crashed", subject)
                reply = bus.error_reply(RuntimeFailure(f"internal error: {exc}"))
            if msg.reply:
                await msg.respond(reply)

        return answer

    for subject, work in (
        (subjects.migration_request("*"), intake.accept),
        (subjects.migration_cancel("*"), intake.cancel),
    ):
        await ctx.nc.subscribe(subject, queue=subjects.INTAKE_QUEUE, cb=answering(subject, work))
    ctx.spawn(SagaRunner.for_worker(ctx, role.steps()).run())


if __name__ == "__main__":
    main("source", register)
