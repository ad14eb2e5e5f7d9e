"""Wires the source worker's handlers to its host's subjects."""

from __future__ import annotations

from schemas import subjects
from schemas.v1.containers import ContainerList, ListContainers
from services import bus
from services.source import handlers
from services.worker import WorkerContext, main


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


if __name__ == "__main__":
    main("source", register)
