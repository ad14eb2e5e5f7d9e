"""One active controller at a time: a standby takes the lease when it is free or expired,
writes its term, serves until the lease is lost, then stands by again.

The requests are served only while active, on plain (not queue) subscriptions: a stopped
instance that still holds a subscription gets its copy too, but the live one answers first,
and what the stopped one decides later carries a term nobody accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from schemas import subjects
from schemas.v1.fleet import ControllerLease, CordonHost, PlaceContainer
from schemas.v1.leases import LeaseHolder
from services import bus
from services.controller.config import ControllerConfig
from services.controller.placing import Controller
from services.errors import Conflict, FerryError, Unavailable
from services.leases import Held, LeaseLost, Leases

log = logging.getLogger("ferry.controller")


def asker_of(reply_to: str | None) -> str:
    """The bus identity that asked: replies go to its own inbox, `_INBOX.<identity>.…`."""
    parts = (reply_to or "").split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "_INBOX" else subjects.ANONYMOUS


async def serve_while_active(
    nc: Any, controller: Controller, held: Held[ControllerLease], config: ControllerConfig
) -> None:
    def on_error(subject: str, error: FerryError) -> None:
        log.info("%s refused: %s", subject, error.reason)

    async def cordon(q: CordonHost, reply_to: str | None) -> Any:
        return await controller.cordon(q, asker_of(reply_to))

    subs = []
    # The fleet's subjects, and this instance's own copy of each (to ask it alone).
    for place, cordon_subject in (
        (subjects.FLEET_PLACE, subjects.FLEET_CORDON),
        (
            subjects.controller_subject(config.name, subjects.FLEET_PLACE),
            subjects.controller_subject(config.name, subjects.FLEET_CORDON),
        ),
    ):
        subs.append(
            await bus.serve(
                nc, place, PlaceContainer, controller.place, on_error=on_error, span="fleet.place"
            )
        )
        subs.append(
            await bus.serve_asked(
                nc, cordon_subject, CordonHost, cordon, on_error=on_error, span="fleet.cordon"
            )
        )
    try:
        while not held.lost.is_set():
            try:
                await controller.sweep()
            except Unavailable as exc:
                log.warning("sweep: %s", exc.reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.lost.wait(), config.sweep_interval_s)
    finally:
        controller.lost.set()
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def lead(
    nc: Any, leases: Leases[ControllerLease], controller: Controller, config: ControllerConfig,
    stopping: asyncio.Event,
) -> None:  # fmt: skip
    """Stand by, lead when the lease is ours, stand by again when it is lost."""
    holder = LeaseHolder(host=config.name, role="controller", pid=os.getpid())
    said = ""
    while not stopping.is_set():
        payload = ControllerLease(holder=holder, instance=config.name)
        try:
            async with leases.hold(subjects.CONTROLLER_LEASE, payload, take_expired=True) as held:
                term = held.revision
                await held.renew_now(payload.model_copy(update={"term": term}))
                await controller.take_term(term)
                log.info("controller %s is active, term %d", config.name, term)
                said = ""
                serving = asyncio.create_task(serve_while_active(nc, controller, held, config))
                stop = asyncio.create_task(stopping.wait())
                await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
                for task in (serving, stop):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                controller.lost.set()
                if held.lost.is_set():
                    log.warning("controller %s lost its lease: %s", config.name, held.lost_reason)
        except (Conflict, LeaseLost) as exc:
            if exc.reason != said:
                log.info("standing by: %s", exc.reason)
                said = exc.reason
        except Unavailable as exc:
            log.warning("standing by: %s", exc.reason)
        controller.lost.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), config.standby_poll_s)
