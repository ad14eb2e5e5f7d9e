"""Wires the destination worker's handlers to its host's subjects."""

from __future__ import annotations

from schemas import subjects
from schemas.v1.containers import ContainerCreated, CreateContainer
from services import bus
from services.destination import handlers
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


if __name__ == "__main__":
    main("destination", register)
