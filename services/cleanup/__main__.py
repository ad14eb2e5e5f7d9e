"""Wires the cleanup worker's handlers to its host's subjects."""

from __future__ import annotations

from schemas import subjects
from schemas.v1.containers import ContainerRemoved, RemoveContainer
from services import bus
from services.cleanup import handlers
from services.worker import WorkerContext, main


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


if __name__ == "__main__":
    main("cleanup", register)
