"""`ferry lab up|down`, and the lab's columns of `ferry hosts`: the test lab as a `ferry` plugin.

The product CLI (services/cli) never imports deploy/; it finds this module through entry
points that pyproject.toml declares:

    [project.entry-points."ferry.cli"]        lab = "deploy.lab.commands:register"
    [project.entry-points."ferry.cli.hosts"]  lab = "deploy.lab.commands:host_details"

FERRY_LAB (default `ferry`) names the lab. `lab up` writes the lab's bus context — the
context named after the lab, which is what `FERRY_LAB=<lab> ferry …` selects, and the
default context when the user has not chosen one — and `lab down` removes it; see
deploy/lab/contexts.py for where and when.

`lab up --zones a,a,b,b --sizes 1024:2,512:1` gives each host a zone and a declared
capacity (its agent.toml's `zone` and `[capacity]`; fewer entries than hosts are cycled),
and `--controllers N` (default 2) is how many fleet controllers the lab runs (c1, c2, …).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import TYPE_CHECKING, Any

from deploy.lab import lab
from deploy.lab import layout as lab_paths
from deploy.lab.layout import (
    DEFAULT_CONTROLLERS,
    DEFAULT_LAB,
    LabLayout,
    LabSpec,
    validate_lab_name,
)
from services.cli.context import BusContext, say
from services.cli.parsing import Parser, int_at_least, positive_int

if TYPE_CHECKING:
    from services.cli.parsing import Subcommands


def lab_layout() -> LabLayout:
    return LabLayout(validate_lab_name(os.environ.get("FERRY_LAB", DEFAULT_LAB)))


# 0 or more (`--controllers 0`: a lab for tests that start their own).
whole_number = int_at_least(0)


def register(sub: Subcommands) -> None:
    """Add `ferry lab up|down` to `ferry`'s subcommands."""
    group = sub.add_parser(
        "lab", help="a lab of simulated hosts on this machine (FERRY_LAB names it)"
    )
    lab_sub = group.add_subparsers(dest="lab_command", required=True, parser_class=Parser)
    up = lab_sub.add_parser("up", help="start NATS and N hosts with their workers")
    up.add_argument("--hosts", type=positive_int, required=True, help="number of hosts, h1..hN")
    up.add_argument(
        "--segments",
        type=positive_int,
        default=1,
        help="spread the hosts over K routed segments joined by a router (default 1)",
    )
    up.add_argument(
        "--subnet",
        metavar="CIDR",
        help="the containers' private /24 (default: a free one derived from the lab's name)",
    )
    up.add_argument(
        "--allow-faults",
        action="store_true",
        help="accept `ferry migrate --inject-fault` (test labs only)",
    )
    up.add_argument(
        "--plain-transfers",
        action="store_true",
        help="hosts without TLS files: files and pages travel in the clear (to measure"
        " what encryption costs; NATS keeps its TLS)",
    )
    up.add_argument(
        "--zones",
        metavar="Z1,Z2,…",
        help="each host's zone, h1 first (fewer than hosts: cycled; default: no zones)",
    )
    up.add_argument(
        "--sizes",
        metavar="MIB:CPUS,…",
        help="each host's declared capacity, e.g. 2048:2,1024:1 (memory MiB:CPUs; fewer than"
        " hosts: cycled; default: none declared)",
    )
    up.add_argument(
        "--controllers",
        type=whole_number,
        default=DEFAULT_CONTROLLERS,
        metavar="N",
        help=f"fleet controllers c1..cN, one active at a time (default {DEFAULT_CONTROLLERS};"
        " 0: none, so nothing can be started)",
    )
    up.set_defaults(run=lab_up)
    down = lab_sub.add_parser("down", help="stop and remove everything the lab made")
    down.set_defaults(run=lab_down)


def lab_up(args: argparse.Namespace) -> int:
    layout = lab_layout()
    chosen = getattr(args, "context", None) or os.environ.get("FERRY_CONTEXT")
    spec = lab.up(
        layout,
        args.hosts,
        say,
        allow_faults=args.allow_faults,
        plain_transfers=args.plain_transfers,
        segments=args.segments,
        subnet=args.subnet,
        select_default=not chosen,
        # getattr: a caller's Namespace may predate these options.
        zones=getattr(args, "zones", None),
        sizes=getattr(args, "sizes", None),
        controllers=getattr(args, "controllers", DEFAULT_CONTROLLERS),
    )
    where = (
        f"{spec.segments} segments joined by a router, containers on {spec.subnet}"
        if spec.segmented
        else str(spec.subnet)
    )
    say(f"lab {layout.lab} is up: {', '.join(spec.hosts)} on {where}")
    if spec.controllers:
        say(f"lab {layout.lab}: fleet controllers {', '.join(spec.controllers)}")
    return 0


def lab_down(args: argparse.Namespace) -> int:
    lab.down(lab_layout(), say)
    return 0


def lab_serving(context: BusContext) -> tuple[LabLayout, LabSpec] | None:
    """The lab whose NATS the context names, if one is up on this machine."""
    root = lab_paths.LABS_ROOT
    for lab_file in sorted(root.glob("*/lab.json")) if root.is_dir() else []:
        with contextlib.suppress(Exception):  # a lab being made or torn down right now
            spec = LabSpec.from_json(lab_file.read_text())
            if set(spec.nats_urls) & set(context.servers):
                return LabLayout(spec.lab), spec
    return None


def host_details(context: BusContext, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`ferry hosts` on a lab: every host of the lab in order, with its network namespace,
    runc root, state dir and segment; a host the bus does not know (NATS down, or not
    joined yet) shows as down, as the lab always listed it."""
    found = lab_serving(context)
    if found is None:
        return rows
    layout, spec = found
    by_name = {row["name"]: row for row in rows}
    detailed = []
    for host in spec.hosts:
        row = by_name.pop(host, None) or {
            "name": host,
            "address": spec.address(host),
            "health": "down",
            "workers": {},
        }
        merged = {
            "name": host,
            "address": row["address"],
            "netns": layout.netns(host),
            "runc_root": str(layout.runc_root(host)),
            "state_dir": str(layout.state_dir(host)),
            "health": row["health"],
            "segment": spec.segment_of(host),
            "workers": row["workers"],
        }
        detailed.append({**merged, **{k: v for k, v in row.items() if k not in merged}})
    return detailed + list(by_name.values())
