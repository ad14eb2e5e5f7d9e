"""The transfer worker. Migration transfers arrive with the stop-and-copy saga; until then
it only registers and heartbeats, so the host's supervision covers all four roles."""

from __future__ import annotations

from services.worker import WorkerContext, main


async def register(ctx: WorkerContext) -> None:
    return None


if __name__ == "__main__":
    main("transfer", register)
