"""`ferry controller --config FILE` (what ferry-controller.service runs)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from schemas import subjects
from schemas.v1.fleet import ControllerLease
from services import bus, topology, tracing
from services.controller.config import ControllerConfig
from services.controller.leadership import lead
from services.controller.placing import Controller
from services.errors import FerryError, InvalidInput
from services.fleet_state import FleetStore
from services.kvstores import KvHostDirectory, KvMigrationStore, KvPlacementStore
from services.leases import Leases
from workflows.placement_chain import OPERATOR_AUTHOR

log = logging.getLogger("ferry.controller")


async def run(config: ControllerConfig) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s controller {config.name} %(levelname)s %(name)s: %(message)s",
    )
    telemetry = tracing.setup("ferry-controller", config.name)
    nc = await bus.connect(
        config.bus.servers,
        f"ferry-controller-{config.name}",
        creds=config.bus.creds,
        ca=config.bus.ca,
    )
    js = nc.jetstream()
    await topology.wait_for_topology(js, log)
    telemetry.publish_spans_on(js)
    leases = await Leases.open(js, ControllerLease)
    controller = Controller(
        config.name,
        FleetStore(await bus.bucket(js, subjects.FLEET_BUCKET)),
        KvHostDirectory(
            await bus.bucket(js, subjects.REGISTRY_BUCKET),
            await bus.bucket(js, subjects.HOSTS_BUCKET),
        ),
        # Read only: a controller never writes a placement.
        KvPlacementStore(await bus.bucket(js, subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR),
        KvMigrationStore(await bus.bucket(js, subjects.MIGRATIONS_BUCKET)),
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await lead(nc, leases, controller, config, stopping)
    finally:
        await telemetry.flush()
        telemetry.shutdown()
        await bus.close(nc)


def main(config_file: Path | None = None) -> int:
    try:
        asyncio.run(run(ControllerConfig.load(config_file)))
    except InvalidInput as exc:  # a bad config: exit 2, which systemd does not restart
        print(f"ferry controller: {exc.reason}", file=sys.stderr)
        return 2
    except FerryError as exc:
        print(f"ferry controller: {exc.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
