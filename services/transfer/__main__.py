"""Wires the transfer worker: the host's file transfer service, and the transfer step."""

from __future__ import annotations

from schemas.v1.migrations import StepCommand
from services.runtime.transfer import TransferServer
from services.saga_runner import SagaRunner
from services.steps import Progress, StepHandler, StepOutcome
from services.transfer import handlers
from services.worker import WorkerContext, main


async def register(ctx: WorkerContext) -> None:
    server = TransferServer(ctx.config.state_dir)
    listening = await server.serve(ctx.config.address, ctx.config.transfer_port)
    ctx.spawn(listening.serve_forever())

    async def transfer(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.transfer(
            cmd, progress, ctx.migration, ctx.directory, ctx.config.transfer_port
        )

    async def presync_files(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.presync_files(
            cmd, progress, ctx.migration, ctx.directory, ctx.config.transfer_port
        )

    async def forget_presync(cmd: StepCommand, progress: Progress) -> StepOutcome:
        return await handlers.forget_presync(cmd, progress, ctx.migration)

    steps: dict[str, StepHandler] = {
        "presync_files": presync_files,
        "transfer": transfer,
        "forget_presync": forget_presync,
    }
    ctx.spawn(SagaRunner(ctx, steps).run())


if __name__ == "__main__":
    main("transfer", register)
