"""What every worker process starts with: connect, register its role, heartbeat, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas import subjects
from schemas.v1.hosts import WorkerHeartbeat, WorkerRole
from services import bus, metrics, topology, tracing
from services.config import HostConfig
from services.errors import FerryError, TopologyMissing, described
from services.faults import FaultPlan
from services.kvstores import KvAddressPool, KvHostDirectory, KvPlacementStore, ObjectStoreLayers
from services.runtime import ledger
from services.runtime.containers import HostContainers
from services.runtime.ledger import HostLedger

log = logging.getLogger("ferry.worker")

TOPOLOGY_CHECK_S = 5.0


@dataclass
class WorkerContext:
    """What a worker's wiring gets: its host, the bus, the fleet's shared state, the host's
    containers, and the host's fault plan (armed only in tests)."""

    role: WorkerRole
    config: HostConfig
    nc: NATS
    js: JetStreamContext
    containers: HostContainers
    faults: FaultPlan
    placements: KvPlacementStore
    directory: KvHostDirectory
    telemetry: tracing.Telemetry
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # Set once this worker's command consumer exists (the runner subscribed): from then on
    # its absence is a loss, not "not made yet".
    consumer_made: asyncio.Event = field(default_factory=asyncio.Event)
    # What the worker wants an operator to see (`ferry hosts`); its heartbeat carries it.
    health: list[str] = field(default_factory=list)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` for the worker's lifetime; if it dies, the worker exits and restarts."""
        task = asyncio.create_task(work)
        task.add_done_callback(_exit_if_failed)
        self.background.append(task)

    def host_subject(self, action: str) -> str:
        return subjects.host_request(self.config.host, action)

    def log_error(self, subject: str, error: FerryError) -> None:
        log.warning("%s: %s: %s", subject, type(error).__name__, error.reason)


Register = Callable[[WorkerContext], Awaitable[None]]


def _exit_if_failed(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.critical("background task died: %r; exiting so the agent restarts us", error)
        os._exit(70)


def setup_logging(role: str, host: str) -> None:
    logging.basicConfig(
        level=os.environ.get("FERRY_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {host} {role} %(levelname)s %(name)s: %(message)s",
    )


async def _heartbeat(ctx: WorkerContext) -> None:
    kv = await bus.bucket(ctx.js, subjects.HOSTS_BUCKET)
    key = subjects.worker_key(ctx.config.host, ctx.role)
    while True:
        beat = WorkerHeartbeat(
            host=ctx.config.host,
            role=ctx.role,
            pid=os.getpid(),
            sent_at=time.time(),
            health=tuple(ctx.health),
        )
        try:
            await kv.put(key, beat.to_bytes())
        except Exception as exc:  # the bus may be restarting; keep beating
            log.warning("heartbeat not published: %s", exc)
        await asyncio.sleep(subjects.HEARTBEAT_INTERVAL_S)


async def _watch_topology(
    js: JetStreamContext, host: str, role: WorkerRole, consumer_made: asyncio.Event
) -> None:
    """Exit (the agent restarts us, and the start waits for a bootstrap) once the topology,
    or this worker's own command consumer, is positively gone on two checks in a row: a
    store lost and restarted empty leaves a worker whose subscriptions point at nothing.
    No answer counts as nothing."""
    durable = subjects.command_durable(host, role)
    seen_consumer = False  # the runner makes it just after we start: only a loss counts
    seen_missing = 0
    while True:
        await asyncio.sleep(TOPOLOGY_CHECK_S)
        try:
            await topology.require_topology(js)
            try:
                await js.consumer_info(subjects.COMMANDS_STREAM, durable)
                seen_consumer = True
            except NotFoundError:
                if seen_consumer or consumer_made.is_set():
                    raise
            seen_missing = 0
        except TopologyMissing as exc:
            seen_missing += 1
            log.error("%s (seen %d time(s))", exc.reason, seen_missing)
        except NotFoundError:
            seen_missing += 1
            log.error("consumer %s is gone (seen %d time(s))", durable, seen_missing)
        except Exception as exc:  # no answer: proves nothing either way
            log.warning("could not check the bus's topology: %s", described(exc))
        if seen_missing >= 2:
            raise TopologyMissing(f"the topology this {role} worker relies on is gone")


async def run_worker(role: WorkerRole, register: Register) -> None:
    config = HostConfig.from_env()
    setup_logging(role, config.host)
    telemetry = tracing.setup(f"ferry-{role}", config.host)
    metrics.setup_metrics(f"ferry-{role}", config.host, config.state_dir)
    nc = await bus.connect(
        config.nats_servers,
        f"ferry-{config.host}-{role}",
        creds=config.nats_creds,
        ca=config.nats_ca,
    )
    js = nc.jetstream()
    # Never created here: a worker that recreated a lost store would make it read "empty".
    await topology.wait_for_topology(js, log)
    telemetry.publish_spans_on(js)
    placements = KvPlacementStore(
        await bus.bucket(js, subjects.PLACEMENT_BUCKET), author=config.host
    )
    containers = HostContainers(
        config,
        placements,
        KvAddressPool(await bus.bucket(js, subjects.IPAM_BUCKET)),
        ObjectStoreLayers(js),
    )
    directory = KvHostDirectory(
        await bus.bucket(js, subjects.REGISTRY_BUCKET), await bus.bucket(js, subjects.HOSTS_BUCKET)
    )
    ctx = WorkerContext(
        role=role,
        config=config,
        nc=nc,
        js=js,
        containers=containers,
        faults=FaultPlan(config.state_dir),
        placements=placements,
        directory=directory,
        telemetry=telemetry,
    )
    ledger.install(HostLedger(config.state_dir, config.host))
    await register(ctx)
    ctx.spawn(_watch_topology(js, config.host, role, ctx.consumer_made))
    log.info("%s worker ready on %s", role, config.host)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    beating = asyncio.create_task(_heartbeat(ctx))
    await stop.wait()
    log.info("%s worker stopping", role)
    beating.cancel()
    for task in ctx.background:
        task.cancel()
    await telemetry.flush()
    telemetry.shutdown()
    try:
        await nc.drain()
    finally:
        await bus.close(nc)


def main(role: WorkerRole, register: Register) -> None:
    asyncio.run(run_worker(role, register))
