"""A host's agent: runs the four workers, restarts any that dies, heartbeats the host.

In the lab, `ferry lab up` starts one per simulated host inside that host's namespaces
(`python -m services.agent`, configured by FERRY_* variables). On a real host systemd runs
`ferry agent --config /etc/ferry/agent.toml` (deploy/systemd/ferry-agent.service); the
workers it spawns read the same file (FERRY_CONFIG in their environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
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
from services import bus, metrics, topology
from services.config import HostConfig
from services.config_layout import CONFIG_ENV
from services.errors import FerryError, InvalidInput, Unavailable, described
from services.runtime import firewall, kdat
from services.runtime.cpuinfo import cpu_facts
from services.runtime.features import host_features
from services.runtime.usage import UsageMeter
from services.runtime.versions import host_versions
from services.worker import setup_logging
from services.worker_clock import worker_env

log = logging.getLogger("ferry.agent")

RESTART_BACKOFF_MIN_S = 0.2
RESTART_BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a worker that ran this long starts again from the minimum backoff
STOP_GRACE_S = 5.0  # deploy/systemd/ferry-agent.service's TimeoutStopSec allows for it
REGISTRATION_CHECK_S = 5.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True)  # resolved here: after fork, only the call


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


def _die_with_agent(agent_pid: int) -> None:
    """In a worker, between fork and exec: SIGTERM when the agent dies, even by SIGKILL.
    systemd stops only the agent (KillMode=process, so that CRIU daemons serving restored
    containers live on); without this a killed agent's workers would outlive it and run
    beside its successor's. What a worker started itself (runc, CRIU) is not affected."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != agent_pid:  # the agent died before prctl: no signal will come
        os._exit(1)


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
            env=_worker_environment(config),
            preexec_fn=functools.partial(_die_with_agent, os.getpid()),
        )
    worker.started_at = time.monotonic()
    log.info("started %s worker, pid %d", worker.role, worker.process.pid)


def _worker_environment(config: HostConfig) -> dict[str, str] | None:
    """The agent's environment (None: inherited as is), naming the agent's file so that
    its workers load the same one; the variables that override it are inherited too."""
    env = worker_env(config.host)  # tests: a host's clock off (libfaketime)
    if config.config_file is None:
        return env
    return {**(os.environ if env is None else env), CONFIG_ENV: str(config.config_file)}


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
            nc = await bus.connect(
                config.nats_servers,
                f"ferry-{config.host}-agent",
                creds=config.nats_creds,
                ca=config.nats_ca,
            )
            break
        except Unavailable as exc:
            log.warning("%s; retrying", exc.reason)
            await asyncio.sleep(1.0)
    js = nc.jetstream()
    await topology.wait_for_topology(js, log)  # made by an operator's bootstrap, never here
    kv = await bus.bucket(js, subjects.HOSTS_BUCKET)
    registry = await bus.bucket(js, subjects.REGISTRY_BUCKET)
    features, missing = await host_features()
    registration = HostRegistration(
        host=config.host,
        address=config.address,
        registered_at=time.time(),
        features=features,
        missing=missing,
        zone=config.zone,
        region=config.region,
        cloud=config.cloud,
        labels=config.labels,
        capacity=config.capacity,
        versions=await host_versions(),
        cpu=await cpu_facts(),  # a destination checks its CPU against this (SIGILL)
    )
    registration = await _keep_declaration(registry, registration)
    await registry.put(config.host, registration.to_bytes())
    checked_at = time.monotonic()
    meter = UsageMeter.for_parent(config.cgroup_parent)
    while not stopping.is_set():
        beat = HostHeartbeat(
            host=config.host,
            address=config.address,
            agent_pid=os.getpid(),
            workers=tuple(w.status() for w in workers),
            sent_at=time.time(),
            usage=meter.sample(),
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
    await bus.close(nc)


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
            await topology.require_topology(js)
            log.warning("registration not checked: %s", described(exc))
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


async def run_agent(config: HostConfig | None = None) -> None:
    """Until SIGTERM or SIGINT; then the workers are stopped, never their containers."""
    if config is None:
        config = HostConfig.load()
    setup_logging("agent", config.host)
    metrics.setup_metrics("ferry-agent", config.host, config.state_dir)
    for d in (config.run_dir, config.log_dir):
        d.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "agent.pid").write_text(f"{os.getpid()}\n")
    kdat.ensure_cache_dir()  # before the first CRIU run (the registration's feature checks)
    # Before any worker listens: nothing a container sends may reach this host's ports.
    fenced = firewall.fence_tenants(config.bridge, str(config.subnet))
    log.info("tenants fenced off this host (%s, bridge %s)", " and ".join(fenced), config.bridge)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    workers = [Supervised(role) for role in WORKER_ROLES]
    tasks = [asyncio.create_task(supervise(w, config, stopping)) for w in workers]
    beating = asyncio.create_task(heartbeat(config, workers, stopping))
    beating.add_done_callback(functools.partial(_heartbeat_ended, stopping=stopping))
    tasks.append(beating)
    await stopping.wait()
    log.info("agent stopping its workers")
    await _stop_all(workers)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    refused = _refusal(beating)
    if refused is not None:
        raise refused  # exit 2 (bad config: systemd leaves it) or 1 (restarted)


def _refusal(beating: asyncio.Task[None]) -> FerryError | None:
    """Why the heartbeat stopped for good: the bus refused these credentials, or the config
    names a creds or CA file that cannot be used; retrying as is cannot help."""
    if not beating.done() or beating.cancelled():
        return None
    exc = beating.exception()
    return exc if isinstance(exc, FerryError) and not exc.retryable else None


def _heartbeat_ended(beating: asyncio.Task[None], *, stopping: asyncio.Event) -> None:
    refused = _refusal(beating)
    if refused is not None:
        log.critical("the agent cannot join the bus: %s; stopping", refused.reason)
        stopping.set()
    elif not beating.cancelled() and beating.exception() is not None:
        log.critical("heartbeat stopped: %r", beating.exception())


def main() -> int:
    """`python -m services.agent`: FERRY_CONFIG and FERRY_* variables, as the lab sets them."""
    try:
        asyncio.run(run_agent())
    except InvalidInput as exc:  # a bad config: exit 2, which systemd does not restart
        print(f"ferry agent: {exc.reason}", file=sys.stderr)
        return 2
    except FerryError as exc:
        print(f"ferry agent: {exc.reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
