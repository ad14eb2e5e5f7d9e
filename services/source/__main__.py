"""Wires the source worker: container listing, migration intake, and source-side steps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from pydantic import BaseModel

from schemas import subjects
from schemas.v1.containers import ContainerList, ListContainers
from schemas.v1.migrations import (
    HostCheck,
    HostCheckReply,
    PageServerStarted,
    StartPageServer,
    StepCommand,
)
from services import bus
from services import preflight as host_checks
from services.errors import FerryError, RuntimeFailure
from services.intake import Intake
from services.kvstores import KvMigrationStore
from services.saga_runner import SagaRunner
from services.source import handlers
from services.steps import Progress, StepOutcome
from services.worker import WorkerContext, log, main


async def register(ctx: WorkerContext) -> None:
    async def list_containers(cmd: ListContainers) -> ContainerList:
        return await handlers.list_containers(cmd, ctx.containers)

    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.LIST_CONTAINERS),
        ListContainers,
        list_containers,
        on_error=ctx.log_error,
    )

    intake = Intake(
        ctx.nc,
        ctx.js,
        ctx.placements,
        KvMigrationStore(await bus.bucket(ctx.js, subjects.MIGRATIONS_BUCKET)),
        ctx.directory,
    )

    def answering(
        subject: str, work: Callable[[bytes], Awaitable[BaseModel]]
    ) -> Callable[[Msg], Awaitable[None]]:
        async def answer(msg: Msg) -> None:
            try:
                reply = (await work(msg.data)).model_dump_json().encode()
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
        (subjects.MIGRATION_REQUEST, intake.accept),
        (subjects.MIGRATION_CANCEL, intake.cancel),
    ):
        await ctx.nc.subscribe(subject, queue=subjects.INTAKE_QUEUE, cb=answering(subject, work))

    async def check_source(cmd: HostCheck) -> HostCheckReply:
        return await host_checks.check(cmd, ctx.migration)

    await bus.serve(
        ctx.nc,
        ctx.host_subject(f"{subjects.HOST_CHECK}.source"),
        HostCheck,
        check_source,
        on_error=ctx.log_error,
    )

    async def preflight(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.preflight(cmd, progress, ctx.migration, ctx.directory)

    async def dump(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.dump(cmd, progress, ctx.migration)

    async def resume_source(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.resume_source(
            cmd, progress, ctx.migration, ctx.placements, ctx.directory, ctx.config.transfer_port
        )

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

    async def precopy_rounds(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.precopy_rounds(cmd, progress, ctx.migration, page_server_for)

    runner = SagaRunner(
        ctx,
        {
            "preflight": preflight,
            "precopy_rounds": precopy_rounds,
            "dump": dump,
            "resume_source": resume_source,
        },
    )
    ctx.spawn(runner.run())


if __name__ == "__main__":
    main("source", register)
