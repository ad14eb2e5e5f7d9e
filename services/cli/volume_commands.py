"""`ferry volume ls|rm`, and the fleet's view of volumes that `ferry container run` checks."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS

from schemas import subjects
from schemas.v1.containers import (
    ListVolumes,
    RemoveVolume,
    VolumeList,
    VolumeMount,
    VolumeRemoved,
)
from services import bus
from services.cli.context import (
    connected,
    context_or_none,
    current_context,
    operator_placements,
    say,
)
from services.cli.image_commands import live_hosts
from services.errors import Conflict, FerryError, NotFound, Unavailable
from workflows.volumes import users_of

LIST_TIMEOUT_S = 10.0
REMOVE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class FleetVolumes:
    """What every host said it holds; `unknown`: hosts that were down or did not answer."""

    held: dict[str, VolumeList]
    unknown: list[str]

    def holders(self, name: str) -> list[str]:
        return sorted(
            h for h, listed in self.held.items() if any(v.name == name for v in listed.volumes)
        )


async def fleet_volumes(nc: NATS) -> FleetVolumes:
    known, alive = await live_hosts(nc)

    async def ask(host: str) -> VolumeList | None:
        try:
            return await bus.request(
                nc,
                subjects.host_request(host, subjects.LIST_VOLUMES),
                ListVolumes(),
                VolumeList,
                timeout=LIST_TIMEOUT_S,
                what=f"list volumes on {host}",
            )
        except FerryError as exc:
            say(f"warning: {exc.reason}")
            return None

    answers = dict(zip(alive, await asyncio.gather(*(ask(h) for h in alive)), strict=True))
    held = {h: a for h, a in answers.items() if a is not None}
    return FleetVolumes(held=held, unknown=sorted(set(known) - set(held)))


async def check_volumes_for_run(
    nc: NATS, container: str, host: str, mounts: tuple[VolumeMount, ...]
) -> None:
    """Before a container is started on `host` with `mounts`: no volume is in use by
    another container, and none lives on another host (a volume is made, or found, on the
    host its container runs on). The host checks the first again; a host that does not
    answer cannot be checked, and a move there later is refused if it holds the name."""
    if not mounts:
        return
    placements = await (await operator_placements(nc.jetstream())).all()
    fleet = await fleet_volumes(nc)
    for mount in mounts:
        users = users_of(placements, mount.name, besides=container)
        if users:
            raise Conflict(
                f"volume {mount.name!r} is in use by container {users[0].name} on {users[0].host}",
                field="--volume",
            )
        elsewhere = [h for h in fleet.holders(mount.name) if h != host]
        if elsewhere:
            raise Conflict(
                f"volume {mount.name!r} lives on {elsewhere[0]}: run the container there,"
                " or pick another name",
                field="--volume",
            )


async def _ls(args: argparse.Namespace) -> list[dict[str, Any]]:
    context = context_or_none(args)
    if context is None:
        return []
    async with connected(context) as nc:
        placements = await (await operator_placements(nc.jetstream())).all()
        fleet = await fleet_volumes(nc)
    rows = []
    for host, listed in sorted(fleet.held.items()):
        for volume in listed.volumes:
            users = [p.name for p in users_of(placements, volume.name)]
            rows.append(
                {
                    "name": volume.name,
                    "host": host,
                    "size_bytes": volume.size_bytes,
                    "used_by": users,
                    "arrived_by": volume.arrived_by,
                }
            )
    for host in fleet.unknown:
        say(f"warning: {host} did not answer: its volumes are unknown")
    return sorted(rows, key=lambda r: (r["name"], r["host"]))


def volume_ls(args: argparse.Namespace) -> int:
    rows = asyncio.run(_ls(args))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'NAME':<24} {'HOST':<8} {'SIZE':>10}  USED BY")
    for row in rows:
        size = f"{row['size_bytes'] / 2**20:.1f}M"
        print(f"{row['name']:<24} {row['host']:<8} {size:>10}  {', '.join(row['used_by']) or '-'}")
    return 0


async def _rm(args: argparse.Namespace) -> VolumeRemoved:
    async with connected(current_context(args)) as nc:
        placements = await (await operator_placements(nc.jetstream())).all()
        users = users_of(placements, args.name)
        if users:
            raise Conflict(
                f"volume {args.name!r} is in use by container {users[0].name} on {users[0].host}",
                field="NAME",
            )
        fleet = await fleet_volumes(nc)
        holders = fleet.holders(args.name)
        if not holders:
            if fleet.unknown:
                raise Unavailable(
                    f"no host that answered holds a volume named {args.name!r};"
                    f" {', '.join(fleet.unknown)} did not answer"
                )
            raise NotFound(f"no volume named {args.name!r}", field="NAME")
        if len(holders) > 1:  # made on two hosts while they could not see each other
            raise Conflict(
                f"volume {args.name!r} is on {', '.join(holders)}: remove it on the host you"
                " mean with that host's own tools, Ferry will not guess",
                field="NAME",
            )
        host = holders[0]
        say(f"removing volume {args.name} from {host}")
        return await bus.request(
            nc,
            subjects.host_request(host, subjects.REMOVE_VOLUME),
            RemoveVolume(name=args.name),
            VolumeRemoved,
            timeout=REMOVE_TIMEOUT_S,
            what=f"remove volume {args.name} from {host}",
        )


def volume_rm(args: argparse.Namespace) -> int:
    removed = asyncio.run(_rm(args))
    if args.json:
        print(removed.model_dump_json())
    else:
        say(f"volume {removed.name} removed from {removed.host} ({removed.size_bytes} bytes)")
    return 0
