"""Wires the destination worker: container creation, layers, and destination-side steps."""

from __future__ import annotations

from schemas import subjects
from schemas.v1.containers import (
    ContainerCreated,
    CreateContainer,
    LayerList,
    LayersPulled,
    ListLayers,
    PullLayers,
)
from schemas.v1.migrations import (
    HostCheck,
    HostCheckReply,
    PageServerStarted,
    StartPageServer,
    StepCommand,
)
from services import bus
from services import preflight as host_checks
from services.destination import handlers
from services.saga_runner import SagaRunner
from services.steps import Progress, StepHandler, StepOutcome
from services.worker import WorkerContext, main


async def register(ctx: WorkerContext) -> None:
    async def create_container(cmd: CreateContainer) -> ContainerCreated:
        return await handlers.create_container(cmd, ctx.containers)

    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.CREATE_CONTAINER),
        CreateContainer,
        create_container,
        on_error=ctx.log_error,
    )

    async def list_layers(cmd: ListLayers) -> LayerList:
        return await handlers.list_layers(cmd, ctx.containers)

    async def pull_layers(cmd: PullLayers) -> LayersPulled:
        return await handlers.pull_layers(cmd, ctx.containers)

    # Separate subscriptions: a listing is answered while a long pull is still fetching.
    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.LIST_LAYERS),
        ListLayers,
        list_layers,
        on_error=ctx.log_error,
    )
    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.PULL_LAYERS),
        PullLayers,
        pull_layers,
        on_error=ctx.log_error,
    )

    async def check_destination(cmd: HostCheck) -> HostCheckReply:
        return await host_checks.check(cmd, ctx.migration)

    await bus.serve(
        ctx.nc,
        ctx.host_subject(f"{subjects.HOST_CHECK}.destination"),
        HostCheck,
        check_destination,
        on_error=ctx.log_error,
    )

    host, placements = ctx.migration, ctx.placements

    async def start_page_server(cmd: StartPageServer) -> PageServerStarted:
        return await handlers.start_page_server(cmd, host)

    await bus.serve(
        ctx.nc,
        ctx.host_subject(subjects.PAGE_SERVER),
        StartPageServer,
        start_page_server,
        on_error=ctx.log_error,
    )

    async def prepare(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.prepare_destination(cmd, progress, host, placements)

    async def restore(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.restore(cmd, progress, host, placements)

    async def verify(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.verify(cmd, progress, host, placements)

    async def commit(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.commit(cmd, progress, placements)

    async def open_network(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.open_network(cmd, progress, host, placements)

    async def drain_pages(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.drain_pages(cmd, progress, host)

    async def uncommit(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.uncommit(cmd, progress, placements)

    async def stop_destination(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.stop_destination(cmd, progress, host)

    async def discard_destination(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.discard_destination(cmd, progress, host)

    steps: dict[str, StepHandler] = {
        "prepare_destination": prepare,
        "restore": restore,
        "verify": verify,
        "commit": commit,
        "open_network": open_network,
        "drain_pages": drain_pages,
        "uncommit": uncommit,
        "stop_destination": stop_destination,
        "discard_destination": discard_destination,
    }
    ctx.spawn(SagaRunner(ctx, steps).run())


if __name__ == "__main__":
    main("destination", register)
