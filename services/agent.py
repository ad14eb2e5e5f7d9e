"""A host's agent: runs the four workers, restarts any that dies, heartbeats the host.

In the lab, `ferry lab up` starts one per simulated host inside that host's namespaces.
On a real host a service manager would run it; a systemd unit for it comes with the
real-deployment work (none exists yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.v1.hosts import (
    WORKER_ROLES,
    HostHeartbeat,
    HostRegistration,
    WorkerRole,
    WorkerStatus,
)
from services import bus
from services.config import HostConfig
from services.errors import Unavailable
from services.runtime.features import host_features
from services.worker import setup_logging
from services.worker_clock import worker_env

log = logging.getLogger("ferry.agent")

RESTART_BACKOFF_MIN_S = 0.2
RESTART_BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a worker that ran this long starts again from the minimum backoff
STOP_GRACE_S = 5.0
REGISTRATION_CHECK_S = 5.0


@dataclass
class Supervised:
    """One worker process and its restart history."""

    role: WorkerRole
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    backoff: float = RESTART_BACKOFF_MIN_S
    started_at: float = field(default=0.0)

    def status(self) -> WorkerStatus:
        pid = self.process.pid if self.process and self.process.returncode is None else None
        return WorkerStatus(role=self.role, pid=pid, restarts=self.restarts)


async def _spawn(worker: Supervised, config: HostConfig) -> None:
    config.log_dir.mkdir(parents=True, exist_ok=True)
    with (config.log_dir / f"{worker.role}.log").open("ab") as logfile:
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"services.{worker.role}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            env=worker_env(config.host),  # tests: a host's clock off (libfaketime)
        )
    worker.started_at = time.monotonic()
    log.info("started %s worker, pid %d", worker.role, worker.process.pid)


async def supervise(worker: Supervised, config: HostConfig, stopping: asyncio.Event) -> None:
    """Keep one worker running; restart it with capped exponential backoff when it dies."""
    while not stopping.is_set():
        await _spawn(worker, config)
        assert worker.process is not None
        code = await worker.process.wait()
        if stopping.is_set():
            return
        ran_for = time.monotonic() - worker.started_at
        if ran_for >= STABLE_AFTER_S:
            worker.backoff = RESTART_BACKOFF_MIN_S
        log.warning(
            "%s worker (pid %d) exited %d after %.1fs; restarting in %.1fs",
            worker.role,
            worker.process.pid,
            code,
            ran_for,
            worker.backoff,
        )
        worker.restarts += 1
        await asyncio.sleep(worker.backoff)
        worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF_MAX_S)


async def heartbeat(config: HostConfig, workers: list[Supervised], stopping: asyncio.Event) -> None:
    while True:
        try:
            nc = await bus.connect(config.nats_url, name=f"ferry-{config.host}-agent")
            break
        except Unavailable as exc:
            log.warning("%s; retrying", exc.reason)
            await asyncio.sleep(1.0)
    js = nc.jetstream()
    await bus.wait_for_topology(js, log)  # made by an operator's bootstrap, never here
    kv = await bus.bucket(js, subjects.HOSTS_BUCKET)
    registry = await bus.bucket(js, subjects.REGISTRY_BUCKET)
    features, missing = await host_features()
    registration = HostRegistration(
        host=config.host,
        address=config.address,
        registered_at=time.time(),
        features=features,
        missing=missing,
    )
    registration = await _keep_declaration(registry, registration)
    await registry.put(config.host, registration.to_bytes())
    checked_at = time.monotonic()
    while not stopping.is_set():
        beat = HostHeartbeat(
            host=config.host,
            address=config.address,
            agent_pid=os.getpid(),
            workers=tuple(w.status() for w in workers),
            sent_at=time.time(),
        )
        try:
            await kv.put(config.host, beat.to_bytes())
        except Exception as exc:  # the bus may be restarting; keep supervising
            log.warning("heartbeat not published: %s", exc)
        if time.monotonic() - checked_at >= REGISTRATION_CHECK_S:
            checked_at = time.monotonic()
            await _stay_registered(js, registry, registration)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), subjects.HEARTBEAT_INTERVAL_S)
    await nc.close()


async def _keep_declaration(registry: KeyValue, registration: HostRegistration) -> HostRegistration:
    """A host an operator declared dead stays declared when its agent comes back: what the
    sagas decided on that evidence (its copies given up) must not be undone by a restart."""
    try:
        entry = await registry.get(registration.host)
    except KeyNotFoundError:
        return registration
    if not entry.value:
        return registration
    before = HostRegistration.from_bytes(entry.value)
    if before.declared_dead is None:
        return registration
    log.critical("this host was declared dead by an operator: %s", before.declared_dead.reason)
    return registration.model_copy(update={"declared_dead": before.declared_dead})


async def _stay_registered(
    js: JetStreamContext, registry: KeyValue, registration: HostRegistration
) -> None:
    """A store lost and bootstrapped again has an empty registry: join it again (reconcile
    asks the registered hosts). A missing topology is said, never recreated."""
    try:
        try:
            await registry.get(registration.host)
            return
        except KeyNotFoundError:  # a missing stream can answer this way too: put says
            pass
        await registry.put(registration.host, registration.to_bytes())
        log.warning("this host was not in the registry (a new store?): registered again")
    except Exception as exc:
        try:
            await bus.require_topology(js)
            log.warning("registration not checked: %r", exc)
        except Unavailable as why:  # TopologyMissing among them
            log.error("registration not checked: %s", why.reason)


async def _stop_all(workers: list[Supervised]) -> None:
    running = [w.process for w in workers if w.process and w.process.returncode is None]
    for proc in running:
        proc.terminate()
    for proc in running:
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def run_agent() -> None:
    config = HostConfig.from_env()
    setup_logging("agent", config.host)
    for d in (config.run_dir, config.log_dir):
        d.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "agent.pid").write_text(f"{os.getpid()}\n")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    workers = [Supervised(role) for role in WORKER_ROLES]
    tasks = [asyncio.create_task(supervise(w, config, stopping)) for w in workers]
    tasks.append(asyncio.create_task(heartbeat(config, workers, stopping)))
    await stopping.wait()
    log.info("agent stopping its workers")
    await _stop_all(workers)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(run_agent())
