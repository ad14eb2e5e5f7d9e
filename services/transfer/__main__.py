"""Wires the transfer worker: the host's file transfer service, and the transfer steps."""

from __future__ import annotations

from services.runtime.filesync import FileSync
from services.runtime.transfer import TransferServer
from services.saga.runner import SagaRunner
from services.transfer.handlers import Transfer
from services.worker import WorkerContext, main


async def register(ctx: WorkerContext) -> None:
    server = TransferServer(ctx.config.state_dir)
    listening = await server.serve(ctx.config.address, ctx.config.transfer_port)
    ctx.spawn(listening.serve_forever())
    role = Transfer(
        files=FileSync(ctx.config, ctx.containers),
        peers=ctx.directory,
        port=ctx.config.transfer_port,
        faults=ctx.faults,
    )
    ctx.spawn(SagaRunner.for_worker(ctx, role.steps()).run())


if __name__ == "__main__":
    main("transfer", register)
