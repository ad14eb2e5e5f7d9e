"""`ferry cordon|uncordon HOST` and `ferry controller`: the fleet controller's side of the CLI.

A cordoned host takes no new container and no incoming move; what runs there stays. The
active controller owns the cordons (services/controller/), so these ask it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import subjects
from schemas.v1.fleet import ControllerLease, CordonDone, CordonHost
from services import bus
from services.cli.context import connected, current_context, say
from services.cli.host_commands import check_host
from services.fleet_state import FleetStore, ask_cordon
from services.leases import Leases

if TYPE_CHECKING:
    from services.cli.parsing import Subcommands


def register(sub: Subcommands) -> None:
    for verb, helptext in (
        ("cordon", "a host takes no new container or move (what runs there stays)"),
        ("uncordon", "a cordoned host takes containers and moves again"),
    ):
        cmd = sub.add_parser(verb, help=helptext)
        cmd.add_argument("host", metavar="HOST")
        if verb == "cordon":
            cmd.add_argument("--reason", default="", help="why (shown by `ferry hosts`)")
        cmd.add_argument("--json", action="store_true")
        cmd.set_defaults(run=cordon_command, cordon=verb == "cordon")
    fleet = sub.add_parser("fleet", help="the active fleet controller and the cordoned hosts")
    fleet.add_argument("--json", action="store_true")
    fleet.set_defaults(run=fleet_command)
    ctl = sub.add_parser(
        "controller", help="run a fleet controller instance (one of them is active at a time)"
    )
    ctl.add_argument("--config", type=Path, help="its TOML file (default: FERRY_* variables)")
    ctl.set_defaults(run=controller_command)


async def _cordon(args: argparse.Namespace) -> CordonDone:
    async with connected(current_context(args)) as nc:
        await check_host(nc, args.host, field="HOST")
        ask = CordonHost(host=args.host, cordon=args.cordon, reason=getattr(args, "reason", ""))
        return await ask_cordon(nc, ask)


def cordon_command(args: argparse.Namespace) -> int:
    done = asyncio.run(_cordon(args))
    if args.json:
        print(json.dumps(done.model_dump(mode="json")))
        return 0
    state = "cordoned" if done.cordoned else "not cordoned"
    say(f"{done.host} is {state}" + ("" if done.changed else " (it already was)"))
    return 0


async def _fleet(args: argparse.Namespace) -> dict[str, Any]:
    async with connected(current_context(args)) as nc:
        js = nc.jetstream()
        found = await (await Leases.open(js, ControllerLease)).read(subjects.CONTROLLER_LEASE)
        state, _ = await FleetStore(await bus.bucket(js, subjects.FLEET_BUCKET)).state()
    lease = found.payload
    return {
        "controller": None
        if found.state != "held" or lease is None
        else {
            "instance": lease.instance,
            "term": lease.term,
            "pid": lease.holder.pid,
            "active": lease.term > 0,
        },
        "lease": found.state,
        "term": state.term,
        "cordoned": {h: c.model_dump(mode="json") for h, c in state.cordoned.items()},
    }


def fleet_command(args: argparse.Namespace) -> int:
    shown = asyncio.run(_fleet(args))
    if args.json:
        print(json.dumps(shown))
        return 0
    ctl = shown["controller"]
    if ctl is None:
        print(f"no active fleet controller (lease {shown['lease']})")
    else:
        print(f"active controller {ctl['instance']} (pid {ctl['pid']}), term {ctl['term']}")
    for host, cordon in sorted(shown["cordoned"].items()):
        print(f"cordoned {host} by {cordon['by']}: {cordon['reason'] or 'no reason given'}")
    return 0


def controller_command(args: argparse.Namespace) -> int:
    from services.controller.__main__ import main  # the service, only when asked to run

    return main(args.config)
