"""The source's part of a move: pre-flight, the freeze and dump, and the way back.

Every operation is idempotent: a redelivered command finds its work done (the markers in
the migration's directory say so) and returns the same result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from opentelemetry import trace

from schemas.v1.containers import Placement
from schemas.v2.results import DumpResult, PreflightResult
from services.config import HostConfig
from services.errors import RuntimeFailure
from services.runtime import (
    bundle,
    cmdlines,
    criu,
    firewall,
    layers,
    movable,
    netlock,
    netns,
    precopy,
    tcprepair,
    transfer,
)
from services.runtime import paths as layout
from services.runtime.containers import ContainerPaths, HostContainers
from services.runtime.paths import MigrationPaths
from services.runtime.proc import (
    arun,
    kill_working_on,
    process_state,
    resident_memory,
    spawn,
    wait_owned,
)
from services.runtime.proc import tree as proc_tree
from services.runtime.restore import restore_container
from services.runtime.runc import log_errors
from services.runtime.spans import fail, tracer
from services.runtime.transfer import Link
from workflows import movability

# The source is frozen and off the bridge: tell the destination to take the container's
# link (returns whether it did). Runs beside the dump; a handover that fails costs the
# packets of the freeze (clients retransmit), never the move.
Handover = Callable[[], Awaitable[bool]]
HANDOVER_WAIT_S = 5.0  # after the dump, how long its answer may still take

PRE_DUMP_TIMEOUT_S = 300.0
LAZY_DUMP_READY_S = 120.0  # freeze and dump everything but the pages
LAZY_DUMP_EXIT_S = 15.0  # a source CRIU whose peer is gone exits at once

log = logging.getLogger("ferry.source")


class SourceSide:
    """This host as the source of moves: it holds its containers and their runc."""

    def __init__(self, config: HostConfig, containers: HostContainers) -> None:
        self.config = config
        self.containers = containers
        self.runc = containers.runc

    def paths(self, migration_id: str) -> MigrationPaths:
        return MigrationPaths.of(self.config.state_dir, migration_id)

    def cpaths(self, name: str) -> ContainerPaths:
        return self.containers.paths(name)

    async def preflight(self, name: str) -> PreflightResult:
        await criu.check()
        state = await self.runc.state(name)
        if state is None or state.status != "running" or state.pid is None:
            status = state.status if state else "not known to runc"
            raise RuntimeFailure(
                f"{name} is {status} on {self.config.host}; only a running container moves"
            )
        found = movability.findings(await asyncio.to_thread(movable.container_facts, state.pid))
        refused = movability.refusal(found, name)
        if refused is not None:
            raise RuntimeFailure(refused)  # before the freeze: the container runs on, here
        for finding in found:
            log.info("%s: %s", name, finding.detail)
        ports = tuple(sorted(netlock.listening_ports(state.pid)))
        return PreflightResult(listening_ports=ports, source_pid=state.pid)

    async def check(self, name: str) -> tuple[list[criu.Check], int]:
        """Dry run for the source's part: CRIU works, the container runs here; returns the
        checks and the container's resident memory (what the destination must hold)."""
        results = [await criu.check_verdict()]
        state = await self.runc.state(name)
        running = state is not None and state.status == "running" and state.pid is not None
        detail = "running" if running else (state.status if state else "not known to runc")
        results.append(("container running here", running, detail))
        memory = 0
        if running and state is not None and state.pid is not None:
            memory = resident_memory(state.pid)
            ports = sorted(netlock.listening_ports(state.pid))
            results.append(("listening ports", True, f"{ports}"))
            facts = await asyncio.to_thread(movable.container_facts, state.pid)
            found = movability.findings(facts)
            results += [(f.what, not f.blocking, f.detail) for f in found]
            if not any(f.blocking for f in found):
                results.append(("CRIU can dump what it holds", True, f"{len(facts)} process(es)"))
        return results, memory

    async def _earlier_dump(self, name: str, paths: MigrationPaths) -> DumpResult | None:
        """An earlier delivery's dump result, or None once it is safe to dump now."""
        if paths.dump_done.exists():
            return DumpResult.model_validate_json(paths.dump_done.read_text())
        state = await self.runc.state(name)
        if state is None or state.status != "running":
            raise RuntimeFailure(f"{name} is not running on {self.config.host}; refusing to dump")
        paths.images.mkdir(parents=True, exist_ok=True)
        return None

    async def _freeze(self, name: str, handover: Handover | None) -> Frozen:
        """The first frozen instant, Ferry's own: runc's freezer (a tight loop, where CRIU's
        waits in 100 ms steps and then finds the cgroup frozen already), then the source
        off the bridge — from here its kernel neither acknowledges nor sends a byte, and
        no frame of it pulls the bridges back — then the destination told to take the
        link, beside the dump. CRIU still locks the netns as it dumps."""
        frozen_at = time.time()
        with tracer.start_as_current_span("source.freeze"):
            await self.runc.pause(name)
            paused_at = time.time()
            await netns.set_link(name, up=False, check=True)
        return Frozen(
            frozen_at=frozen_at,
            pause_ms=round((paused_at - frozen_at) * 1000),
            handover=_timed(handover, frozen_at) if handover else None,
        )

    async def _freeze_or_fail(
        self, name: str, handover: Handover | None, span: trace.Span, paths: MigrationPaths
    ) -> Frozen:
        try:
            return await self._freeze(name, handover)
        except RuntimeFailure as exc:  # the way back thaws what froze and plugs it in again
            raise _dump_failed(span, f"freezing {name}", paths, exc.reason) from exc

    async def dump(
        self,
        name: str,
        migration_id: str,
        page_server: str,
        *,
        parent: str | None = None,
        handover: Handover | None = None,
    ) -> DumpResult:
        """Freeze and dump; pages stream to the destination. The source copy stops here.
        After pre-copy rounds, `parent` (../it-N) makes it send only what changed since."""
        paths = self.paths(migration_id)
        earlier = await self._earlier_dump(name, paths)
        if earlier is not None:
            return earlier
        bundle.ensure_criu_config(self.cpaths(name).criu_config, tls=self.config.tls)
        span = tracer.start_span("criu.dump", attributes={"ferry.page_server": page_server})
        frozen = await self._freeze_or_fail(name, handover, span, paths)
        argv = cmdlines.runc_checkpoint(
            self.runc, name, paths.images, paths.runc_log, page_server=page_server, parent=parent
        )
        # Cancelled: runc and its CRIU die (their own process group), never the container.
        code = await wait_owned(await spawn(argv))
        dumped_at = time.time()
        handed_ms = await frozen.handed_over()
        if code != 0:
            raise _dump_failed(span, f"checkpoint of {name}", paths, f"exit {code}")
        stats = criu.load_stats(paths.stats_dump)
        result = DumpResult(
            frozen_at=frozen.frozen_at,
            dump_ms=round((dumped_at - frozen.frozen_at) * 1000),
            pause_ms=frozen.pause_ms,
            link_handover_ms=handed_ms,
            pages_written=stats.get("pages_written", 0),
            criu_freezing_us=stats.get("freezing_time", 0),
            criu_frozen_us=stats.get("frozen_time", 0),
            criu_memdump_us=stats.get("memdump_time", 0),
            criu_memwrite_us=stats.get("memwrite_time", 0),
        )
        for key, value in result.model_dump(exclude_none=True).items():
            span.set_attribute(f"criu.{key}", value)
        span.set_attribute("ferry.page_bytes", result.pages_written * 4096)
        span.set_attribute("criu.pages_scanned", stats.get("pages_scanned", 0))
        span.end()
        paths.dump_done.write_text(result.model_dump_json())
        return result

    async def pre_dump(
        self, name: str, migration_id: str, iteration: int, page_server: str
    ) -> dict[str, int]:
        """Pre-copy round `iteration`: the pages dirtied since the last round go to the
        destination while the container keeps running. Returns CRIU's statistics."""
        rounds = precopy.PrecopyLayout(self.paths(migration_id).root)
        images = rounds.iteration(iteration)
        stats_file = images / layout.STATS_DUMP
        if stats_file.exists():
            return criu.load_stats(stats_file)  # this round ran before a redelivery
        images.mkdir(parents=True, exist_ok=True)
        bundle.ensure_criu_config(self.cpaths(name).criu_config, tls=self.config.tls)
        log_file = images / layout.RUNC_LOG
        argv = precopy.pre_dump_argv(
            self.runc, name, rounds, iteration, page_server, log_file=log_file
        )
        with tracer.start_as_current_span(
            "criu.pre_dump", attributes={"ferry.round": iteration, "ferry.page_server": page_server}
        ) as span:
            done = await arun(argv, check=False, timeout=PRE_DUMP_TIMEOUT_S)
            if done.returncode != 0:
                errors = log_errors(log_file)
                failure = RuntimeFailure(
                    f"pre-dump round {iteration} of {name} failed:"
                    f" {errors[-1] if errors else f'exit {done.returncode}'}",
                    log_tail=criu.tail(images / layout.DUMP_LOG),
                )
                fail(span, failure)
                raise failure
            stats = criu.load_stats(stats_file)
            for key, value in stats.items():
                span.set_attribute(f"criu.{key}", value)
        return stats

    async def dump_lazy(
        self,
        name: str,
        migration_id: str,
        destination_address: str,
        *,
        handover: Handover | None = None,
    ) -> DumpResult:
        """Post-copy: freeze and dump all but the memory pages, which this host then serves
        to the destination on demand (only to `destination_address`, over TLS where the
        host has certificates). CRIU leaves the source *stopped*, not killed, once the
        pages are served: the way back until the destination is verified."""
        paths, cpaths = self.paths(migration_id), self.cpaths(name)
        if paths.lazy.exists() and criu.background_pid(paths.images, layout.LAZY_DUMP):
            # An earlier delivery's worker died while its dump ran; the dump did not (its
            # own session): adopt it. A second checkpoint beside it would break both.
            return await self._adopt_lazy_dump(name, paths)
        earlier = await self._earlier_dump(name, paths)
        if earlier is not None:
            return earlier
        port = netns.free_port(self.config.address)
        serve_at = f"{self.config.address}:{port}"
        # Tells resume that the source waits stopped, and where its page server listens.
        paths.lazy.write_text(serve_at)
        # Anyone else connecting first would end the page serving (services/runtime/firewall.py).
        firewall.admit_only(port, destination_address, migration_id)
        bundle.ensure_criu_config(cpaths.criu_config, leave_stopped=True, tls=self.config.tls)
        span = tracer.start_span("criu.dump", attributes={"ferry.lazy_pages": serve_at})
        frozen = await self._freeze_or_fail(name, handover, span, paths)
        argv = cmdlines.runc_checkpoint(
            self.runc, name, paths.images, paths.runc_log, page_server=serve_at, lazy_pages=True
        )
        try:
            await criu.start_background(argv, paths.images, layout.LAZY_DUMP, LAZY_DUMP_READY_S)
        except RuntimeFailure as exc:
            await frozen.handed_over()
            raise _dump_failed(span, f"lazy checkpoint of {name}", paths, exc.reason) from exc
        finally:
            # CRIU read the file when it started; later dumps of this container must not stop.
            bundle.ensure_criu_config(cpaths.criu_config, tls=self.config.tls)
        dumped_at = time.time()
        result = DumpResult(
            frozen_at=frozen.frozen_at,
            dump_ms=round((dumped_at - frozen.frozen_at) * 1000),
            lazy_pages=serve_at,
            pause_ms=frozen.pause_ms,
            link_handover_ms=await frozen.handed_over(),
        )
        span.set_attribute("criu.dump_ms", result.dump_ms)
        span.end()
        paths.dump_done.write_text(result.model_dump_json())
        return result

    async def _adopt_lazy_dump(self, name: str, paths: MigrationPaths) -> DumpResult:
        try:
            await criu.wait_ready(paths.images, layout.LAZY_DUMP, LAZY_DUMP_READY_S)
        except RuntimeFailure as exc:
            span = tracer.start_span("criu.dump", attributes={"ferry.adopted": True})
            raise _dump_failed(span, f"lazy checkpoint of {name}", paths, exc.reason) from exc
        bundle.ensure_criu_config(self.cpaths(name).criu_config, tls=self.config.tls)
        await netns.set_link(name, up=False)
        # It froze about when its pid file was written (this host's clock).
        frozen_at = layout.pid_file(paths.images, layout.LAZY_DUMP).stat().st_mtime
        result = DumpResult(
            frozen_at=frozen_at,
            dump_ms=max(0, round((time.time() - frozen_at) * 1000)),
            lazy_pages=paths.lazy.read_text(),
        )
        paths.dump_done.write_text(result.model_dump_json())
        return result

    async def resume(
        self, placement: Placement, migration_id: str, link: Callable[[], Awaitable[Link]]
    ) -> str:
        """Bring the container back on this host: untouched, thawed, or restored from its
        images with the pages fetched back from the destination (over `link()`, asked for
        only then)."""
        name = placement.name
        paths, cpaths = self.paths(migration_id), self.cpaths(name)
        if paths.lazy.exists():
            how = await self._resume_stopped(name, paths, cpaths)
            if how:
                # After a post-copy fallback the switches last saw it on the destination.
                await netns.announce(cpaths.netns, placement.ip)
                return how
        if kill_working_on(paths.root):
            await asyncio.sleep(0.2)  # let the kernel release what a killed CRIU held
        state = await self.runc.state(name)
        # Back on the bridge, then announced: since the freeze the destination answered for
        # the container's MAC, and the bridges' forwarding tables still point there.
        if state is not None and state.status == "running":
            await netlock.remove_criu_lock(cpaths.netns)
            await netns.set_link(name, up=True)
            await netns.announce(cpaths.netns, placement.ip)
            shutil.rmtree(paths.root, ignore_errors=True)
            return "still running"
        if state is not None and state.status == "paused":  # Ferry's freeze, or CRIU's
            await netlock.remove_criu_lock(cpaths.netns)
            await netns.set_link(name, up=True)
            await self.runc.resume(name)
            await netns.announce(cpaths.netns, placement.ip)
            shutil.rmtree(paths.root, ignore_errors=True)
            return "thawed"
        if not paths.dump_done.exists() and not paths.inventory.exists():
            raise RuntimeFailure(f"{name} is gone and no dump of it exists here: cannot resume")
        if not paths.page_images():
            peer = await link()
            with tracer.start_as_current_span(
                "pages.fetch_back", attributes={"ferry.peer": peer.address}
            ):
                await transfer.pull(
                    peer, migration_id, "pages", paths.images, self.config.state_dir / "tmp"
                )
        # The overlay normally stays mounted on the source until clean_source; mount it
        # again if it went (its layers are kept on this host; fetched if ever removed).
        ready = await self.containers.ensure_layers(placement.layers)
        await layers.mount_overlay(ready.paths, cpaths.upper, cpaths.work, cpaths.rootfs)
        # Ferry dumps with `network-lock skip` (the link down was the lock) and CRIU restores
        # with the dump's method: hold the netns ourselves, or a client's packet reaching a
        # socket not restored yet would be answered with a reset.
        await netlock.hold(cpaths.netns)
        await netns.set_link(name, up=True)
        stdio = await self.containers.logger_for(name)
        await restore_container(self.runc, name, paths, cpaths, stdio)
        await netlock.release(cpaths.netns)
        await netns.announce(cpaths.netns, placement.ip)
        shutil.rmtree(paths.root, ignore_errors=True)
        return "restored from images"

    async def _resume_stopped(
        self, name: str, paths: MigrationPaths, cpaths: ContainerPaths
    ) -> str | None:
        """Post-copy's way back: the source waits stopped. Let its CRIU finish (nobody will
        pull pages any more: the destination was stopped first), unlock its network, take
        its connections out of repair mode, and let it run. None if it is not there."""
        dumper = criu.background_pid(paths.images, layout.LAZY_DUMP)
        if dumper is not None:
            await _poke(paths.lazy.read_text())
            if (
                await criu.background_result(paths.images, layout.LAZY_DUMP, LAZY_DUMP_EXIT_S)
                is None
            ):
                # CRIU is hung: stop the tasks first, so killing it cannot set them running
                # behind our back, then kill it.
                await self.runc.kill(name, "STOP", all_processes=True)
                kill_working_on(paths.root)
                await asyncio.sleep(0.2)
        state = await self.runc.state(name)
        if state is None or state.pid is None or state.status not in ("running", "paused"):
            return None
        if state.status == "paused":  # a CRIU killed mid-dump leaves the freezer frozen
            await self.runc.resume(name)
        await netlock.remove_criu_lock(cpaths.netns)
        repaired = 0
        for pid in proc_tree(state.pid):
            with contextlib.suppress(OSError):
                repaired += await asyncio.to_thread(tcprepair.repair_off, pid)
        await netns.set_link(name, up=True)
        stopped = process_state(state.pid) in ("T", "t")
        await self.runc.kill(name, "CONT", all_processes=True)
        shutil.rmtree(paths.root, ignore_errors=True)
        return (
            f"resumed from stopped ({repaired} connection(s) out of repair)"
            if stopped
            else "still running"
        )


@dataclass
class Frozen:
    """The source frozen by Ferry: when, how long runc's pause took, and the destination's
    answer to the link handover, still coming."""

    frozen_at: float
    pause_ms: int
    handover: asyncio.Task[int | None] | None

    async def handed_over(self) -> int | None:
        """Milliseconds from the freeze to the destination holding the link; None when it
        did not (no handover, refused, no answer in time)."""
        if self.handover is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(self.handover), HANDOVER_WAIT_S)
        except TimeoutError:
            log.warning("the destination did not answer the link handover in time")
            return None


def _timed(handover: Handover, frozen_at: float) -> asyncio.Task[int | None]:
    async def run() -> int | None:
        try:
            taken = await handover()
        except Exception as exc:  # the move goes on: its restore plugs the link in
            log.warning("link handover failed: %s", exc)
            return None
        return round((time.time() - frozen_at) * 1000) if taken else None

    return asyncio.create_task(run(), name="ferry-link-handover")


def _dump_failed(
    span: trace.Span, what: str, paths: MigrationPaths, otherwise: str
) -> RuntimeFailure:
    """A failed dump in runc's own words (else `otherwise`), with CRIU's log, its span ended."""
    errors = log_errors(paths.runc_log)
    why = criu.cause(paths.dump_log)
    failure = RuntimeFailure(
        f"{what} failed: {errors[-1] if errors else otherwise}" + (f"; CRIU: {why}" if why else ""),
        log_tail=criu.tail(paths.dump_log),
    )
    fail(span, failure)
    span.end()
    return failure


async def _poke(address: str) -> None:
    """Connect to a waiting source page server and hang up: CRIU then ends its dump (and,
    with leave-stopped, leaves the source stopped) instead of waiting forever."""
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError, TimeoutError):
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
        writer.close()
