"""The destination worker's work: new containers and layers, and the destination's steps
of a move — prepare, restore, verify, commit, open, drain, and undoing them. No NATS here."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from schemas.v1.containers import (
    ContainerCreated,
    CreateContainer,
    LayerList,
    LayersPulled,
    ListLayers,
    Placement,
    PullLayers,
)
from schemas.v1.hosts import HostRegistration
from schemas.v1.migrations import HostCheck, HostCheckReply, PageServerStarted, StartPageServer
from schemas.v2.results import OpenNetworkResult
from services import faults
from services import preflight as dry_run
from services.errors import FerryError, RuntimeFailure
from services.fleet_state import Tickets
from services.runtime import cpuinfo, ledger
from services.runtime.containers import HostContainers
from services.runtime.criu import Check
from services.runtime.destination_side import DestinationSide
from services.runtime.lazy_pages import DaemonView
from services.runtime.paths import MigrationPaths
from services.runtime.transfer import auth
from services.saga.steps import Progress, StepHandler, StepOutcome, StepRun, placement_of
from services.stores import PeerDirectory, PlacementStore

# Post-copy falls back when pages stop arriving for this long, not after a fixed time: a
# large container may drain for hours. (The step's own timeout is far beyond it.)
DRAIN_STALLED_AFTER_S = float(os.environ.get("FERRY_DRAIN_STALLED_AFTER_S", "60"))
DRAIN_REPORT_EVERY_S = 2.0
PAGE_SIZE = 4096

log = logging.getLogger("ferry.destination")


class SourceHosts(PeerDirectory, Protocol):
    """Where a move's source is, and what it registered (the CPU it runs on among it)."""

    async def registered(self, host: str) -> HostRegistration | None: ...


@dataclass(frozen=True)
class Destination:
    """The destination role on this host, holding what its steps need."""

    side: DestinationSide
    containers: HostContainers
    placements: PlacementStore
    state_dir: Path  # where this host keeps its migrations (and their transfer keys)
    peers: SourceHosts  # where the migration's source is (its page servers admit only it)
    tickets: Tickets | None = None  # the fleet controller's decisions are checked here

    def steps(self) -> dict[str, StepHandler]:
        return {
            "prepare_destination": self.prepare_destination,
            "restore": self.restore,
            "verify": self.verify,
            "commit": self.commit,
            "open_network": self.open_network,
            "drain_pages": self.drain_pages,
            "uncommit": self.uncommit,
            "stop_destination": self.stop_destination,
            "discard_destination": self.discard_destination,
        }

    # -- requests ----------------------------------------------------------------------------

    async def create_container(self, cmd: CreateContainer) -> ContainerCreated:
        """A new container arrives on this host: fetch its layers, give it an address, start it
        — only as the active fleet controller decided, with the room it reserved here."""
        if self.tickets is not None:
            await self.tickets.check(
                cmd.placed, host=self.side.config.host, container=cmd.name, field="placed"
            )
        return await self.containers.create(cmd)

    async def list_layers(self, cmd: ListLayers) -> LayerList:
        """Which layers this host holds verified and unpacked."""
        return await self.containers.list_layers()

    async def pull_layers(self, cmd: PullLayers) -> LayersPulled:
        """Fetch, verify and unpack an image's layers now, before any container needs them."""
        return await self.containers.pull_layers(cmd)

    async def check(self, cmd: HostCheck) -> HostCheckReply:
        """Dry run of the destination's part."""
        checks = await self.side.check(cmd.container, cmd.needed_bytes)
        checks.append(await self._cpu_check(cmd.container))
        return dry_run.reply(self.side.config.host, checks)

    async def _cpu_check(self, container: str) -> Check:
        """This CPU has every feature the container's host started it with (a dry run is
        before the move: its placement names the source). Not checked is no failure: a
        move would go on too."""
        try:
            found = await self.placements.get(container)
            if found is None:
                return (cpuinfo.CHECK, True, f"not checked: no placement of {container}")
            source = found[0].host
            verdict, detail = await cpuinfo.judge_source(
                source, await self.peers.registered(source), container
            )
        except FerryError as exc:
            return (cpuinfo.CHECK, True, f"not checked: {exc.reason}")
        return (cpuinfo.CHECK, verdict is not False, detail)

    async def start_page_server(self, cmd: StartPageServer) -> PageServerStarted:
        """A page server for one pre-copy round (asked for by the source between rounds)."""
        address = await self.side.start_round_page_server(cmd.migration_id, cmd.images, cmd.parent)
        return PageServerStarted(address=address)

    # -- steps -------------------------------------------------------------------------------

    async def prepare_destination(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Layers present, network namespace built with its link down, page server listening,
        and the key the source's transfers must carry (services/transfer_keys.py)."""
        placement = await placement_of(run, self.placements)
        await self._refuse_lacking_cpu(run)
        migration_root = MigrationPaths.of(self.state_dir, run.migration_id).root
        auth.issue(migration_root, run.migration_id, source=run.source)
        result = await self.side.prepare(
            placement,
            run.migration_id,
            page_server=run.strategy == "stop-and-copy",
            source_address=await self.peers.address_of(run.source),
        )
        if result.layers_fetched:
            mib = result.layer_bytes_fetched / 2**20
            await progress(
                f"{result.layers_fetched} of {len(placement.layers)} layer(s) were missing here:"
                f" fetched from the layer store once ({mib:.1f} MiB) and verified",
                None,
                None,
            )
        else:
            await progress(f"all {len(placement.layers)} layer(s) already here", None, None)
        if run.strategy == "post-copy":
            await progress(
                "network namespace ready; pages will be pulled from the source", None, None
            )
        elif run.strategy == "pre-copy":
            await progress(
                "network namespace ready; a page server starts for each round", None, None
            )
        else:
            await progress(f"page server listening on {result.page_server}", None, None)
        return StepOutcome(result)

    async def _refuse_lacking_cpu(self, run: StepRun) -> None:
        """Restored here without a CPU feature it started with, the container would die
        with SIGILL: refused for good, before anything is prepared. A check that could not
        run is said in the log and the move goes on (CRIU's restore would not look)."""
        registration = await self.peers.registered(run.source)
        verdict, detail = await cpuinfo.judge_source(run.source, registration, run.container)
        if verdict is False:
            raise RuntimeFailure(f"refusing {run.container}: {detail}", retryable=False)
        if verdict is None:
            log.warning("%s: CPU features %s", run.migration_id, detail)

    async def restore(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Restore behind a held network: it runs, but no client can reach it yet."""
        placement = await placement_of(run, self.placements)
        dumped = run.needs(run.results.dump, "dump")
        lazy_from = (
            run.needs(dumped.lazy_pages, "the source's lazy pages")
            if run.strategy == "post-copy"
            else None
        )
        result = await self.side.restore(
            placement, run.migration_id, dumped.frozen_at, lazy_from=lazy_from
        )
        pulled = f"; its pages come from {lazy_from} as it touches them" if lazy_from else ""
        await progress(
            f"{run.container} restored, network held until the commit{pulled}", None, None
        )
        return StepOutcome(result)

    async def verify(self, run: StepRun, progress: Progress) -> StepOutcome:
        placement = await placement_of(run, self.placements)
        ports = run.needs(run.results.preflight, "preflight").listening_ports
        return StepOutcome(await self.side.verify(placement, ports))

    async def commit(self, run: StepRun, progress: Progress) -> StepOutcome:
        """The point of no return: the placement moves to this host by compare-and-set."""
        placement, revision = await self._locked_placement(run, "refusing to commit")
        if placement.host == run.destination:
            ledger.committed(run.record, placement)
            return StepOutcome()  # committed by an earlier delivery
        if placement.host != run.source:
            raise RuntimeFailure(
                f"{run.container} is placed on {placement.host}; refusing to commit"
            )
        if self.side.faults.fires(run.migration_id, "pause:commit:cas"):
            # make chaos's cas-cut: NATS's answer to the compare-and-set below is dropped.
            faults.go_silent(faults.PAUSE_BEFORE_CAS_S)
        await self.placements.update(
            placement.model_copy(update={"host": run.destination}), revision
        )
        ledger.committed(run.record, placement)  # what survives a lost store says "ours"
        await progress(f"committed: {run.container} belongs to {run.destination}", None, None)
        return StepOutcome()

    async def open_network(self, run: StepRun, progress: Progress) -> StepOutcome:
        placement = await placement_of(run, self.placements)
        opened = await self.side.open_network(placement, run.migration_id)
        hold = opened.hold
        held = (
            f"; {hold.held_in} packet(s) in and {hold.held_out} out had waited, let through"
            f" in order ({hold.kernel_dropped + hold.undelivered} lost)"
            if hold
            else "; no packet holder answered (an earlier delivery released it, or it died and"
            " what waited was dropped)"
        )
        await progress(
            f"{run.container} serves clients at {placement.ip}{held};"
            f" announced {', '.join(opened.announced) or 'nothing'} (gratuitous ARP, IPv6 NA)",
            None,
            None,
        )
        # From the freeze to an open network: what a client waits at the least (two hosts'
        # clocks are compared here; fine within NTP's error on real machines).
        dumped = run.results.dump
        gap = round((opened.opened_at - dumped.frozen_at) * 1000) if dumped else 0
        return StepOutcome(
            OpenNetworkResult(
                frozen_to_open_ms=max(gap, 0),
                opened_at=opened.opened_at,
                held_in=hold.held_in if hold else None,
                held_out=hold.held_out if hold else None,
                hold_lost=hold.kernel_dropped + hold.undelivered if hold else None,
                hold_ms=hold.hold_ms if hold else None,
            )
        )

    async def drain_pages(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Post-copy, after the commit: every page has arrived and the daemon exited 0."""
        await progress("pulling the pages not touched yet from the source", None, None)
        last_said = 0.0

        async def heard(view: DaemonView) -> None:
            nonlocal last_said
            if view.copied_pages is None or time.monotonic() - last_said < DRAIN_REPORT_EVERY_S:
                return
            last_said = time.monotonic()
            await progress(
                f"pages arriving: {view.copied_pages}/{view.total_pages}",
                view.copied_pages * PAGE_SIZE,
                (view.total_pages or 0) * PAGE_SIZE or None,
            )

        result = await self.side.drain_pages(run.migration_id, DRAIN_STALLED_AFTER_S, heard)
        if result:
            await progress(f"all pages arrived after {result.drain_ms} ms", None, None)
        return StepOutcome(result)

    async def uncommit(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Post-copy fallback: the placement goes back to the source, by compare-and-set, once
        the destination's copy has stopped."""
        placement, revision = await self._locked_placement(run, "cannot hand it back")
        if placement.host == run.destination:
            await self.placements.update(
                placement.model_copy(update={"host": run.source}), revision
            )
        ledger.uncommitted(run.record)
        await progress(f"{run.container} belongs to {run.source} again", None, None)
        return StepOutcome()

    async def stop_destination(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Compensation: the restored copy stops (before the commit, or in a fallback)."""
        await self.side.stop_restored(run.container, run.migration_id)
        return StepOutcome()

    async def discard_destination(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Compensation: nothing of the incoming container stays on this host."""
        await self.side.discard(run.container, run.migration_id)
        return StepOutcome()

    async def _locked_placement(self, run: StepRun, refusal: str) -> tuple[Placement, int]:
        """The placement and its revision, while this migration still holds its lock."""
        found = await self.placements.get(run.container)
        if found is None:
            raise RuntimeFailure(f"placement of {run.container} vanished; {refusal}")
        placement, revision = found
        if placement.migration_id != run.migration_id:
            raise RuntimeFailure(
                f"{run.container} is no longer locked by this migration; {refusal}"
            )
        return placement, revision
