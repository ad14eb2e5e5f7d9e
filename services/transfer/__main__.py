"""Wires the transfer worker: the host's file transfer service, the keys of the migrations
it takes files for, and the transfer steps."""

from __future__ import annotations

from schemas import subjects
from services import bus
from services.kvstores import KvMigrationStore
from services.runtime.filesync import FileSync
from services.runtime.transfer import TransferServer
from services.saga.runner import SagaRunner
from services.transfer.handlers import Transfer
from services.transfer_keys import KeyHolder, KeyIssuer
from services.worker import WorkerContext, main


async def register(ctx: WorkerContext) -> None:
    config = ctx.config
    server = TransferServer(config.state_dir, tls=config.tls)
    listening = await server.serve(config.address, config.transfer_port)
    ctx.spawn(listening.serve_forever())
    if config.tls is None:
        ctx.health.append("transfers unencrypted: no [tls] files in the host's config")
    migrations = KvMigrationStore(await bus.bucket(ctx.js, subjects.MIGRATIONS_BUCKET))
    issuer = KeyIssuer(
        ctx.nc, migrations, config.state_dir, config.host, identities=config.nats_creds is not None
    )
    await issuer.serve()
    role = Transfer(
        files=FileSync(config, ctx.containers),
        keys=KeyHolder(ctx.nc, config.state_dir, ctx.directory, config.transfer_port, config.tls),
        faults=ctx.faults,
    )
    ctx.spawn(SagaRunner.for_worker(ctx, role.steps()).run())


if __name__ == "__main__":
    main("transfer", register)
