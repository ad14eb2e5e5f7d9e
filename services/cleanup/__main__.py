"""Wires the cleanup worker: container removal and source clean-up after a move."""

from __future__ import annotations

from schemas import subjects
from schemas.v1.containers import ContainerRemoved, RemoveContainer
from schemas.v1.migrations import StepCommand
from services import bus
from services.cleanup import handlers
from services.saga_runner import SagaRunner
from services.steps import Progress, StepOutcome
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

    async def clean_source(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.clean_source(cmd, progress, ctx.migration)

    ctx.spawn(SagaRunner(ctx, {"clean_source": clean_source}).run())


if __name__ == "__main__":
    main("cleanup", register)
